"""One-GPU step benchmark of the Qwen-Image MMDiT (megatron-core as a wheel, no Transformer Engine), <= 5 min.

    python -m benchmarks.gpu [--dry-run] [--tiny] [--phases smoke,gemm,attention,blocks,step] [--budget-s 280]
                             [--peak-tflops 989] [--out FILE]

Phases (one module each):
  (a) smoke      phase_smoke.py      the tiny model through consumer.train.train: bf16, TP=1, padded micro-batches
  (b) gemm       phase_gemm.py       bf16 matmul at the block's linear shapes: the GEMM ceiling
  (c) attention  phase_attention.py  which SDPA backend runs, masked vs unmasked vs packed, its TFLOP/s
  (d) blocks     phase_blocks.py     4 full-width blocks, recompute none/selective/full: time, MFU/HFU, memory
                                     vs plan, profiler split into GEMM / attention / elementwise / communication
  (e) step       phase_step.py       the optimizer step (megatron DDP + distributed optimizer), timed by part
FLOP counting: flops.py (pure; what MFU and HFU divide). Results: benchmarks/results/gpu_step.json, written
only by a full-size run on a GPU. --dry-run (dry_run.py) needs no GPU and prints FLOPs and planned memory.
docs/performance.md describes the method.
"""

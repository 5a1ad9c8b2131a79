"""Peak memory of checkpoint conversion (issue 5): streaming import/export vs. the model's size.

    python -m benchmarks.bench_convert_memory [--hidden-heads 12] [--layers 2,4] [--dtype bf16]

Builds (in a child process) diffusers QwenImageTransformer2DModels of a few hundred MB — the real block
structure at a reduced width (12 heads x 128 = 1536 hidden, 2 and 4 blocks, 1536-wide text features) — saved
as the release is (bf16, sharded safetensors + index). Then, each in a fresh child process that has
already imported everything and run a tiny warm-up conversion:
  import    python -m megatron_qwen_image.convert import-diffusers --tp 2 (streaming)
  export    export-diffusers of that checkpoint (streaming)
  naive     the baseline a converter without streaming would be: load every shard (safetensors
            load_file), map the whole state dict (diffusers_to_megatron), i.e. the model held twice
Peak = the process's high-water RSS during the measured call minus its RSS just before it (VmHWM reset
through /proc/self/clear_refs), reported as ratios to the model's bytes and to its largest tensor's
bytes. Streaming should stay at a few largest tensors, far below the model; the naive baseline at
about twice the model. Writes benchmarks/results/convert_memory.json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1)) * 1024


def _measure(fn) -> int:
    """Peak RSS growth (bytes) while fn() runs."""
    import gc

    gc.collect()
    before = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    fn()
    return _status("VmHWM") - before


# ------------------------------------------------------------------------------------------- child phases
def build(dst: str, heads: int, layers: int, dtype: str) -> None:
    import torch
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(num_layers=layers, num_attention_heads=heads, attention_head_dim=128,
                                        joint_attention_dim=heads * 128, axes_dims_rope=(16, 56, 56))
    model.to({"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]).save_pretrained(dst, max_shard_size="100MB")


def _warm_up(tmp: str) -> None:
    """Import and exercise every code path once on a tiny model, so that measured peaks are the
    conversion's, not first-use costs of the libraries."""
    import torch
    from diffusers import QwenImageTransformer2DModel

    from megatron_qwen_image.convert.exporter import export_diffusers
    from megatron_qwen_image.convert.importer import import_diffusers
    from megatron_qwen_image.model.diffusers_mapping import diffusers_to_megatron  # noqa: F401

    tiny = os.path.join(tmp, "warm")
    QwenImageTransformer2DModel(num_layers=1, num_attention_heads=2, attention_head_dim=16, joint_attention_dim=32,
                                axes_dims_rope=(4, 6, 6)).to(torch.bfloat16).save_pretrained(tiny)
    import_diffusers(tiny, os.path.join(tmp, "warm_ckpt"), tp=2, progress=False)
    export_diffusers(os.path.join(tmp, "warm_ckpt"), os.path.join(tmp, "warm_out"), progress=False)


def measure(phase: str, src: str, dst: str) -> None:
    tmp = tempfile.mkdtemp(prefix="mqi-warm-")
    try:
        _warm_up(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if phase == "import":
        from megatron_qwen_image.convert.importer import import_diffusers

        peak = _measure(lambda: import_diffusers(src, dst, tp=2, progress=False))
    elif phase == "export":
        from megatron_qwen_image.convert.exporter import export_diffusers

        peak = _measure(lambda: export_diffusers(src, dst, max_shard_bytes=100 * 2**20, progress=False))
    else:  # naive: the whole model in memory, twice
        import glob

        from safetensors.torch import load_file

        from megatron_qwen_image.model.diffusers_mapping import diffusers_to_megatron

        def naive():
            sd = {}
            for file in sorted(glob.glob(os.path.join(src, "*.safetensors"))):
                sd.update(load_file(file))
            mapped = diffusers_to_megatron(sd, tp_size=1, tp_rank=0)
            return len(mapped)

        peak = _measure(naive)
    print(json.dumps({"phase": phase, "peak_rss_delta_bytes": peak}))


# ------------------------------------------------------------------------------------------- driver
def _child(*args) -> dict:
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, "-m", "benchmarks.bench_convert_memory", *args], cwd=REPO, env=env,
                         check=True, capture_output=True, text=True).stdout
    lines = [line for line in out.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden-heads", type=int, default=12, help="heads of 128 (hidden = 128 x heads)")
    ap.add_argument("--layers", default="2,4", help="block counts to measure, comma-separated: the peak should "
                                                  "not grow with the model")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--phase", choices=["build", "import", "export", "naive"], help=argparse.SUPPRESS)
    ap.add_argument("--src", help=argparse.SUPPRESS)
    ap.add_argument("--dst", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.phase == "build":
        build(args.dst, args.hidden_heads, int(args.layers), args.dtype)
        return 0
    if args.phase:
        measure(args.phase, args.src, args.dst)
        return 0

    from benchmarks.common import environment, print_table, save_results
    from megatron_qwen_image.convert.diffusers_dir import DiffusersTransformerDir

    rows, models = [], []
    for layers in (int(x) for x in args.layers.split(",")):
        work = tempfile.mkdtemp(prefix="mqi-convert-bench-")
        try:
            src, ckpt, out = (os.path.join(work, n) for n in ("diffusers", "ckpt", "exported"))
            print(f"building a {layers}-block, {128 * args.hidden_heads}-wide Qwen-Image transformer ({args.dtype}) ...",
                  flush=True)
            _child("--phase", "build", "--dst", src, "--hidden-heads", str(args.hidden_heads), "--layers",
                   str(layers), "--dtype", args.dtype)
            d = DiffusersTransformerDir(src)
            model_bytes = d.total_bytes
            largest_name, largest = d.largest_tensor()
            results = {}
            for phase, s, t in (("import", src, ckpt), ("export", ckpt, out), ("naive", src, None)):
                print(f"  measuring {phase} ...", flush=True)
                peak = _child("--phase", phase, "--src", s, "--dst", t or os.path.join(work, "unused"))[
                    "peak_rss_delta_bytes"]
                results[phase] = {"peak_rss_delta_bytes": peak, "per_model_bytes": peak / model_bytes,
                                  "per_largest_tensor_bytes": peak / largest}
                rows.append([layers, f"{model_bytes / 2**20:.0f}", phase, f"{peak / 2**20:.0f}", peak / model_bytes,
                             peak / largest])
            models.append({"layers": layers, "model_bytes": model_bytes, "num_tensors": len(d.tensors),
                           "largest_tensor": largest_name, "largest_tensor_bytes": largest, "results": results})
            print(f"  model: {len(d.tensors)} tensors, {model_bytes / 2**20:.0f} MiB; largest tensor {largest_name} "
                  f"{largest / 2**20:.1f} MiB", flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print_table(["blocks", "model MiB", "phase", "peak RSS delta MiB", "÷ model bytes", "÷ largest tensor bytes"], rows)
    path = save_results("convert_memory", {"environment": environment(), "config": vars(args), "models": models})
    print(f"\nresults -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

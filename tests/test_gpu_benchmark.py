"""benchmarks/gpu: the FLOP counts MFU divides by (against hand calculations), the dry run (no GPU), the kernel
classifier of the profiler split, and (slow) every phase at --tiny shapes as a code check."""
import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks.gpu import cli
from megatron_qwen_image import flops
from benchmarks.gpu.phase_attention import backend_from_ops
from benchmarks.gpu.profiling import kernel_category
from benchmarks.gpu.report import RESULTS_FILE
from consumer.config import load_config
from consumer.planner import plan_memory
from tests.torchrun import REPO

H = 3072                      # released model: hidden 3072 = 24 heads x 128, MLP 4h = 12288
N_1328 = (1328 // 16) ** 2    # 6,889 image tokens at 1328^2


def test_per_block_flops_are_the_hand_count():
    s = N_1328 + 1024
    f = flops.block_forward_flops(s, flops.ModelDims())
    assert s == 7913
    assert f.linear == 2 * s * 12 * H * H
    assert f.attention == 4 * s * s * H
    assert (f.linear, f.attention) == (1_792_234_487_808, 769_420_111_872)  # 2.5617 TFLOP per block and sample
    assert f.modulation == 2 * 2 * H * 6 * H  # img_mod + txt_mod, once per sample


def test_training_flops_multiples_and_recompute():
    d, s = flops.ModelDims(), 7913
    fwd = flops.block_forward_flops(s, d).total
    step = flops.training_step_flops([(N_1328, 1024)], 60, d)
    assert step.forward == 60 * fwd and step.model == 3 * step.forward and step.hardware == step.model
    full = flops.training_step_flops([(N_1328, 1024)], 60, d, "full")
    assert full.hardware == 4 * step.forward and full.model == step.model  # recompute is HFU only
    sel = flops.training_step_flops([(N_1328, 1024)], 60, d, "selective", ("core_attn",))
    assert sel.recompute == 60 * 4 * s * s * H
    assert 153.7e12 < step.forward < 153.8e12  # "forward for the 60 blocks = 154 TFLOP per sample"
    # a micro-batch of two captions: each sample counts its own valid tokens
    two = flops.training_step_flops([(N_1328, 512), (N_1328, 256)], 4, d)
    assert two.forward == 4 * (flops.block_forward_flops(N_1328 + 512, d).total
                               + flops.block_forward_flops(N_1328 + 256, d).total)
    assert flops.utilisation(989e12, 1.0, 989) == 1.0


def test_parameter_count_matches_the_planner():
    assert flops.parameter_count(flops.ModelDims(), 60) == 20_430_401_088  # diffusers' released model
    tiny = load_config(os.path.join(REPO, "configs", "model", "tiny.yaml"))
    dims = flops.ModelDims.from_model_section(tiny.model)
    assert flops.parameter_count(dims, tiny.model.num_layers) == plan_memory(tiny, dp=1).total_params
    assert 2.0 < flops.six_p_t_ratio(flops.ModelDims(), 60, N_1328, 1024) < 2.2


def test_dry_run_prints_flops_and_planned_memory_without_writing_results(tmp_path, capsys):
    before = os.stat(RESULTS_FILE).st_mtime_ns if os.path.exists(RESULTS_FILE) else None
    out = tmp_path / "dry.json"
    assert cli.main(["--dry-run", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    after = os.stat(RESULTS_FILE).st_mtime_ns if os.path.exists(RESULTS_FILE) else None
    assert after == before  # the dry run never writes gpu_step.json

    rec = json.loads(out.read_text())
    s = N_1328 + 1024
    assert rec["reference"]["per_block_forward_flops"] == 2 * s * 12 * H * H + 4 * s * s * H
    assert "2.5617 TFLOP" in text and "| qkv | 1328x1328 | 13,778 | 3,072 | 9,216 |" in text
    # phase d at 1328^2: samples with 512 and 256 valid caption tokens, 4 blocks, fwd + bwd
    rows = {(r["resolution"], r["sample"]): r for r in rec["blocks_per_sample"]}
    for sample, valid in ((0, 512), (1, 256)):
        sv = N_1328 + valid
        hand = 2 * sv * 12 * H * H + 4 * sv * sv * H + 24 * H * H
        assert rows[("1328x1328", sample)]["block_forward_gflop"] * 1e9 == pytest.approx(hand, rel=1e-12)
    steps = {(r["resolution"], r["recompute"]): r for r in rec["blocks_per_step"]}
    fwd = sum(4 * (2 * sv * 12 * H * H + 4 * sv * sv * H + 24 * H * H) for sv in (N_1328 + 512, N_1328 + 256))
    assert steps[("1328x1328", "none")]["model_tflop"] * 1e12 == pytest.approx(3 * fwd, rel=1e-12)
    assert steps[("1328x1328", "full")]["hardware_tflop"] * 1e12 == pytest.approx(4 * fwd, rel=1e-12)
    # phase e's planned state: bf16 params, fp32 grads, fp32 main params + Adam m, v, one rank
    state = rec["step"]["planned_state"]
    assert state["param_bytes"] == 2 * state["params"] and state["grad_bytes"] == 4 * state["params"]
    assert state["total_bytes"] == 18 * state["params"]
    assert "planned activations" in text


def test_without_a_gpu_a_measured_run_is_refused(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert cli.main(["--phases", "gemm"]) == 2
    assert "no CUDA GPU is visible" in capsys.readouterr().err
    assert cli.main(["--device", "cpu", "--phases", "gemm"]) == 2  # full size on CPU: --tiny only


@pytest.mark.parametrize("name, category", [
    ("nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNN", "gemm"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1", "gemm"),
    ("void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8>(...)", "gemm"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false, false, bf16>>", "attention"),
    ("fmha_cutlassF_bf16_aligned_64x128_rf_sm80(PyTorchMemEffAttention::AttentionKernel<...>::Params)", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128_4x1x1_kernel0_0", "attention"),
    ("ncclDevKernel_ReduceScatter_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "communication"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::BinaryFunctor<c10::BFloat16, ...>>", "elementwise"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float>(...)", "elementwise"),
    ("aten::mm", "gemm"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
])
def test_kernel_categories(name, category):
    assert kernel_category(name) == category


def test_backend_from_profiled_ops():
    assert backend_from_ops(["aten::scaled_dot_product_attention", "aten::_scaled_dot_product_flash_attention",
                             "aten::_flash_attention_forward"]) == "flash"
    assert backend_from_ops(["aten::_scaled_dot_product_efficient_attention"]) == "efficient"
    assert backend_from_ops(["aten::_scaled_dot_product_cudnn_attention"]) == "cudnn"
    assert backend_from_ops(["aten::_scaled_dot_product_attention_math", "aten::_safe_softmax"]) == "math"
    assert backend_from_ops(["aten::mm"]) == "unknown"


@pytest.mark.slow
def test_every_phase_runs_at_tiny_shapes(tmp_path):
    """A code check, not figures: all five phases at --tiny shapes (on CPU where no GPU is visible)."""
    out = tmp_path / "tiny.json"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--tiny", "--device", device, "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rec = json.loads(out.read_text())
    assert "NOT performance figures" in rec["figures_are"]
    assert {n: p["status"] for n, p in rec["phases"].items()} == dict.fromkeys(
        ("smoke", "gemm", "attention", "blocks", "step"), "ok")
    smoke = rec["phases"]["smoke"]["figures"]
    assert smoke["losses_finite"] and smoke["steps"] == 3 and smoke["batches_with_padding"] >= 1
    blocks = rec["phases"]["blocks"]["figures"]["runs"]
    assert {r["recompute"] for r in blocks} == {"none", "selective", "full"}
    assert all(r["profile"]["total_ms"] > 0 and r["fwd_bwd_s"] > 0 for r in blocks)
    assert set(rec["phases"]["step"]["figures"]["parts_median_s"]) == {
        "zero_grad", "forward", "backward", "finalize_model_grads", "optimizer_step", "scheduler_step"}

"""consumer.activation_plan against what autograd really saves: one forward (+ loss) of a tiny MMDiT under
torch.autograd.graph.saved_tensors_hooks, each saved storage counted once, attributed to the block that saved it
(or to 'outside'), compared with the planner's figures at fp32, TP=1, for no/selective/full recompute, with and
without padded captions, and for the flash (torch's CPU default) and math SDPA kernels.

The measurement (tests/support/saved_tensors.py) is shared with the TP=2 worker, which checks the same figures
with and without sequence parallelism (tests/test_model_tp.py).
"""
from __future__ import annotations

import contextlib
import os

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from consumer.activation_plan import (FLASH, MATH, ActivationPlan, PlanInputError, activation_plan, parse_bytes,
                                      parse_resolution, recommend_recompute, worst_case_text_lengths)
from consumer.config import load_config
from consumer.planner import plan_memory
from consumer.train import main
from megatron_qwen_image import cpu_emulation
from megatron_qwen_image.flow_matching import flow_matching_loss
from megatron_qwen_image.model import QwenImageMMDiT
from tests.reference_models import make_inputs, single_process_model_parallel
from tests.support.saved_tensors import OUTSIDE, SavedBytes, measure_saved_bytes
from tests.torchrun import REPO

TINY = os.path.join(REPO, "configs", "model", "tiny.yaml")
BIG = os.path.join(REPO, "configs", "model", "qwen_image_20b.yaml")
H_PATCHES, W_PATCHES, TEXT_LEN = 8, 6, 12   # 48 image tokens (128 x 96 px), 12 text tokens


@pytest.fixture(scope="module")
def world():
    from megatron.core.tensor_parallel import random as mrandom

    cpu_emulation.apply_if_needed()  # megatron's recompute checkpoint saves CUDA RNG states
    with single_process_model_parallel():
        mrandom.model_parallel_cuda_manual_seed(0, tp_rank=0, ep_rank=0, etp_rank=0, force_reset_rng=True)
        yield


RECOMPUTES = {
    "none": [],
    "core_attn": ["recompute.recompute_granularity=selective", "recompute.recompute_modules=[core_attn]"],
    "layernorm+mlp": ["recompute.recompute_granularity=selective", "recompute.recompute_modules=[layernorm,mlp]"],
    "all selective": ["recompute.recompute_granularity=selective",
                      "recompute.recompute_modules=[core_attn,layernorm,mlp]"],
    "full uniform 1": ["recompute.recompute_granularity=full", "recompute.recompute_method=uniform",
                       "recompute.recompute_num_layers=1"],
    "full block 1": ["recompute.recompute_granularity=full", "recompute.recompute_method=block",
                     "recompute.recompute_num_layers=1"],
}


def _tiny(recompute: str, bf16: bool = False):
    cfg = load_config(TINY, ["precision.bf16=false"] + RECOMPUTES[recompute])
    torch.manual_seed(0)
    model = QwenImageMMDiT(cfg.model_config(bf16=bf16, use_cpu_initialization=True, tp_size=1))
    return cfg, model


def _breakdown(plan: ActivationPlan, measured: SavedBytes, block) -> str:
    terms = "\n".join(f"  {t.name:62s} {t.per:18s} {t.count:6d} x {t.bytes_per_unit:6d} = {t.bytes:8d}"
                      for t in plan.block_terms)
    shapes = "\n".join(f"  {s}" for s in measured.shapes[block])
    return f"planner terms (block):\n{terms}\nmeasured storages saved in block {block}:\n{shapes}"


def _measure(recompute, batch, text_lengths, kernel, bf16=False):
    cfg, model = _tiny(recompute, bf16)
    inputs = make_inputs(batch, H_PATCHES, W_PATCHES, text_lengths, seed=1,
                         joint_attention_dim=cfg.model.joint_attention_dim)
    inputs["text_lengths"] = list(text_lengths)
    if bf16:
        for key in ("hidden_states", "encoder_hidden_states"):
            inputs[key] = inputs[key].bfloat16()
    target = torch.randn(batch, H_PATCHES * W_PATCHES, cfg.model.patch_size ** 2 * cfg.model.out_channels)
    backend = sdpa_kernel(SDPBackend.MATH) if kernel == MATH else contextlib.nullcontext()
    with backend:
        measured = measure_saved_bytes(model, lambda: flow_matching_loss(model(**inputs), target).mean())
    plan = activation_plan(cfg, 16 * H_PATCHES, 16 * W_PATCHES, batch, max(text_lengths), tp=1, bf16=bf16,
                           attention_kernel=kernel, text_lengths=text_lengths)
    return plan, measured


CASES = [  # recompute, micro-batch, caption lengths (padded when they differ), SDPA kernel, bf16
    ("none", 2, [TEXT_LEN, TEXT_LEN], FLASH),
    ("none", 2, [TEXT_LEN, 7], FLASH),
    ("none", 1, [TEXT_LEN], FLASH),
    ("none", 2, [TEXT_LEN, TEXT_LEN], MATH),
    ("none", 2, [TEXT_LEN, 7], MATH),
    ("core_attn", 2, [TEXT_LEN, TEXT_LEN], FLASH),
    ("core_attn", 2, [TEXT_LEN, 7], MATH),
    ("layernorm+mlp", 2, [TEXT_LEN, 7], FLASH),
    ("all selective", 2, [TEXT_LEN, TEXT_LEN], FLASH),
    ("full uniform 1", 2, [TEXT_LEN, 7], FLASH),
    ("full block 1", 2, [TEXT_LEN, TEXT_LEN], FLASH),
    # bf16 (CPU runs it too): checks the fp32 upcasts; CPU keeps LayerNorm's mean/rstd in bf16 where CUDA (and
    # the planner) keeps fp32, 0.2 % of a block here
    ("none", 2, [TEXT_LEN, 7], FLASH, True),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-b{c[1]}-{'padded' if len(set(c[2])) > 1 else 'unpadded'}-{c[3]}"
                                             + ("-bf16" if c[4:] else "") for c in CASES])
def test_planner_matches_what_autograd_saves(world, case):
    plan, measured = _measure(*case)
    n = plan.num_layers
    assert sorted(measured.per_block) == list(range(n))
    units = plan.units()
    expected = []  # what each block keeps: its inputs when checkpointed, else its whole activations
    for size, checkpointed in units:
        expected += [plan.checkpoint_bytes] * size if checkpointed else [plan.per_layer_bytes] * size
    for i in range(n):
        got, want = measured.per_block[i], expected[i]
        assert abs(got - want) <= 0.10 * got, (
            f"block {i}: planner {want:,} vs measured {got:,} bytes ({want / got - 1:+.1%})\n"
            + _breakdown(plan, measured, i))
    assert plan.layers_bytes == pytest.approx(sum(measured.per_block.values()), rel=0.10)
    terms = "\n".join(f"  {t.name:62s} {t.bytes:8d}" for t in plan.outside_terms)
    assert abs(plan.outside_bytes - measured.outside) <= 0.10 * measured.outside, (
        f"outside: planner {plan.outside_bytes:,} vs measured {measured.outside:,}\n{terms}\n"
        + "\n".join(f"  {s}" for s in measured.shapes[OUTSIDE]))


def test_recompute_ordering_and_sequence_parallel_on_the_20b_model():
    cfg = load_config(BIG)
    kw = dict(height=1328, width=1328, micro_batch=1, text_len=1024, sequence_parallel=False)
    none = activation_plan(cfg, **kw, recompute={})
    full = activation_plan(cfg, **kw)  # the config: full, uniform, 1
    assert full.recompute.label() == "full uniform, 1 layer"
    assert full.layers_bytes == 60 * full.checkpoint_bytes < none.layers_bytes == 60 * none.per_layer_bytes
    assert full.recompute_bytes == full.per_layer_bytes - full.checkpoint_bytes
    # with GPU kernels core_attn recompute only drops the output and log-sum-exp; layernorm and mlp drop more
    sel = {mods: activation_plan(cfg, **kw, recompute={"recompute_granularity": "selective",
                                                       "recompute_modules": list(mods)}).per_layer_bytes
           for mods in (("core_attn",), ("layernorm",), ("layernorm", "mlp"))}
    assert none.per_layer_bytes > sel[("core_attn",)] > sel[("layernorm",)] > sel[("layernorm", "mlp")]
    # SP divides the full-width per-token terms by TP: between 1/TP and 1 of the no-SP figure; the config has it on
    kw["sequence_parallel"] = None
    sp = activation_plan(cfg, **kw, recompute={})
    assert sp.sequence_parallel and none.per_layer_bytes / 4 < sp.per_layer_bytes < 0.7 * none.per_layer_bytes
    assert activation_plan(cfg, **kw).checkpoint_bytes == pytest.approx(full.checkpoint_bytes / 4, rel=0.01)
    # bf16 halves most terms; the fp32 stats, rsqrt, upcasts and log-sum-exp keep it above half
    fp32 = activation_plan(cfg, **kw, recompute={}, bf16=False)
    assert 0.5 < sp.per_layer_bytes / fp32.per_layer_bytes < 0.6


def test_recommendation_takes_the_cheapest_setting_that_fits():
    cfg = load_config(BIG)
    static = plan_memory(cfg, dp=8).total_bytes
    kw = dict(height=1328, width=1328, micro_batch=1, text_len=1024, static_bytes=static)
    rec = recommend_recompute(cfg, **kw, gpu_bytes=parse_bytes("80GB"))
    assert rec.chosen is not None and rec.chosen.fits and rec.chosen.total_per_gpu <= rec.usable_bytes
    costs = [c.plan.extra_compute_fraction for c in rec.candidates]
    assert costs == sorted(costs) and rec.candidates[0].plan.recompute.label() == "none"
    cheaper = [c for c in rec.candidates if c.plan.extra_compute_fraction < rec.chosen.plan.extra_compute_fraction]
    assert not any(c.fits for c in cheaper)
    if rec.chosen.plan.recompute.method == "block":  # the smallest k that fits
        k = rec.chosen.plan.recompute.num_layers
        smaller = activation_plan(cfg, 1328, 1328, 1, 1024, recompute={
            "recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": k - 1})
        assert static + smaller.total_bytes > rec.usable_bytes
    assert recommend_recompute(cfg, **kw, gpu_bytes=parse_bytes("1TB")).chosen.plan.recompute.label() == "none"
    # every choice's printed overrides load as a config that plans the same
    for c in rec.candidates:
        again = load_config(BIG, c.plan.recompute.overrides().split())
        assert activation_plan(again, 1328, 1328, 1, 1024).total_bytes == c.plan.total_bytes
    # without sequence parallelism 1328 px needs recompute: on 80 GB the nearly free selective layernorm, on
    # 64 GB the smallest full 'block' k that fits
    no_sp = recommend_recompute(cfg, **kw, gpu_bytes=parse_bytes("80GB"), sequence_parallel=False)
    assert not no_sp.candidates[0].fits and no_sp.recompute.label() == "selective [layernorm]"
    no_sp = recommend_recompute(cfg, **kw, gpu_bytes=parse_bytes("64GB"), sequence_parallel=False)
    assert no_sp.recompute.method == "block" and 1 < no_sp.recompute.num_layers < 60
    assert recommend_recompute(cfg, **kw, gpu_bytes=parse_bytes("40GB")).chosen is None


def test_inputs_are_checked_with_one_line_errors():
    cfg = load_config(BIG)
    assert parse_resolution("1328") == (1328, 1328) and parse_resolution("928x1664") == (928, 1664)
    assert parse_bytes("80GB") == 80e9 and parse_bytes("80GiB") == 80 * 2 ** 30 and parse_bytes("141") == 141e9
    assert worst_case_text_lengths(1, 1024) is None and worst_case_text_lengths(3, 8) == (8, 8, 7)
    for bad, match in (("13x", "--resolution"), ("abc", "--resolution")):
        with pytest.raises(PlanInputError, match=match):
            parse_resolution(bad)
    with pytest.raises(PlanInputError, match="--gpu-memory"):
        parse_bytes("80 parsecs")
    with pytest.raises(PlanInputError, match="multiple of 16"):
        activation_plan(cfg, 1000, 1328, 1, 1024)
    with pytest.raises(PlanInputError, match="--micro-batch"):
        activation_plan(cfg, 1328, 1328, 0, 1024)


def test_dry_run_prints_activations_and_a_recommendation(capsys):
    assert main(["--config", BIG, "--dry-run", "--dp", "8", "--resolution", "1328", "--gpu-memory", "80GB"]) == 0
    out = capsys.readouterr().out
    assert "20,430,401,088" in out and "Activations: 1328x1328 px = 6,889 image + 1,024 text tokens" in out
    assert "one MMDiT block" in out and "total per GPU" in out and "recommended:" in out
    assert main(["--config", BIG, "--dry-run", "--resolution", "1000"]) == 2
    assert "multiple of 16" in capsys.readouterr().err
    assert main(["--config", BIG, "--resolution", "1328"]) == 2
    assert "--dry-run" in capsys.readouterr().err

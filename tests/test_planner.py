"""The --dry-run planner: exact parameter counts (vs diffusers' own model) and the memory budget of TP=4 x DP=8.

Per-rank counts are also checked against real TP=2 ranks in tests/test_distributed_optimizer.py."""
import os

import pytest
import torch
from diffusers import QwenImageTransformer2DModel

from consumer.planner import plan_memory, tensor_splits
from consumer.config import load_config
from tests.torchrun import REPO

BIG = os.path.join(REPO, "configs", "model", "qwen_image_20b.yaml")


def _diffusers_params(**config) -> int:
    with torch.device("meta"):  # no memory: shapes only
        return sum(p.numel() for p in QwenImageTransformer2DModel(**config).parameters())


def test_total_parameters_equal_diffusers_released_shape():
    p = plan_memory(load_config(BIG), dp=8)
    assert p.total_params == _diffusers_params() == 20_430_401_088


def test_tiny_total_equals_diffusers_tiny():
    cfg = load_config(os.path.join(REPO, "configs", "model", "tiny.yaml"))
    m = cfg.model
    assert plan_memory(cfg, dp=1).total_params == _diffusers_params(
        num_layers=m.num_layers, attention_head_dim=m.hidden_size // m.num_attention_heads,
        num_attention_heads=m.num_attention_heads, joint_attention_dim=m.joint_attention_dim,
        in_channels=m.in_channels, out_channels=m.out_channels, patch_size=m.patch_size,
        axes_dims_rope=tuple(m.axes_dims_rope))


def test_tp_split_accounting():
    cfg = load_config(BIG)
    tensors = tensor_splits(cfg)
    sharded = sum(t.numel for t in tensors if t.tp_axis is not None)
    replicated = sum(t.numel for t in tensors if t.tp_axis is None)
    for tp in (1, 2, 4, 8):
        p = plan_memory(cfg, dp=1, tp=tp)
        assert p.sharded_params_per_rank * tp == sharded  # every split tensor divides evenly
        assert p.replicated_params_per_rank == replicated
    # the modulation projections (img_mod / txt_mod) hold about a third of the model and are sharded
    mod = sum(t.numel for t in tensors if "_mod." in t.name)
    assert 0.33 < mod / (sharded + replicated) < 0.35
    assert all(t.tp_axis == 0 for t in tensors if "_mod.linear" in t.name)
    assert replicated / (sharded + replicated) < 0.002


def test_20b_at_tp4_dp8_fits_the_memory_budget():
    """The budget: ~10 GB bf16 params + 20 GB fp32 grads + 8 GB optimizer (fp32 main + Adam m, v over DP=8)."""
    p = plan_memory(load_config(BIG), dp=8)
    assert p.tp == 4 and p.bf16 and p.distributed_optimizer
    assert p.param_bytes == 2 * p.params_per_rank and p.grad_bytes == 4 * p.params_per_rank
    assert p.param_bytes / 1e9 == pytest.approx(10, abs=0.5)
    assert p.grad_bytes / 1e9 == pytest.approx(20, abs=1.0)
    assert p.optimizer_bytes / 1e9 == pytest.approx(8, abs=0.5)
    assert p.optimizer_bytes == 12 * p.params_per_rank / 8
    # without the distributed optimizer the Adam state alone would be 61 GB per GPU
    no_dist = plan_memory(load_config(BIG, ["optimizer.use_distributed_optimizer=false"]), dp=8)
    assert no_dist.optimizer_bytes == 8 * p.optimizer_bytes


def test_dry_run_cli_prints_the_table_without_allocating(capsys):
    from consumer.train import main

    assert main(["--config", BIG, "--dry-run", "--dp", "8"]) == 0
    out = capsys.readouterr().out
    assert "TP 4 x DP 8 = 32 ranks" in out and "20,430,401,088" in out
    assert "10.25 GB" in out and "20.50 GB" in out and "7.69 GB" in out

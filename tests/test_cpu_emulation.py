"""The CPU emulation layer: pinned, narrow, and megatron's code paths behave like their torch references on CPU."""
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from megatron_qwen_image import cpu_emulation
from tests.torchrun import REPO

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="tests the CPU emulation; a GPU is visible")


@pytest.fixture(scope="module")
def world_of_one():
    """A one-process gloo world with megatron parallel_state (TP=1), emulation on; torn down afterwards."""
    from megatron.core import parallel_state

    cpu_emulation.apply()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # no port to race for
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    yield
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def test_refuses_other_megatron_core_versions(monkeypatch):
    from megatron.core import package_info

    monkeypatch.setattr(package_info, "__version__", "0.17.0")
    with pytest.raises(cpu_emulation.CpuEmulationError, match=r"written for megatron-core 0\.16\.1 and refuses 0\.17\.0"):
        cpu_emulation.apply()


def test_every_patch_applies_exactly_and_keeps_megatron_file_and_lines():
    """apply() checked each edit's occurrence count; the new code still points at megatron's own lines."""
    import linecache

    cpu_emulation.apply()
    for patch in cpu_emulation.PATCHES:
        _, _, name, raw = cpu_emulation._resolve(patch)
        func = cpu_emulation._underlying_function(raw)
        assert getattr(func, "__cpu_emulated__", False), patch.qualname
        if isinstance(patch, cpu_emulation.SourcePatch):
            code = func.__code__
            assert "site-packages/megatron/core" in code.co_filename, patch.qualname
            window = "".join(linecache.getline(code.co_filename, code.co_firstlineno + i) for i in range(4))
            assert f"def {name}(" in window, (patch.qualname, window)


def test_not_applied_when_a_gpu_is_visible():
    """With CUDA visible, apply_if_needed() does nothing: megatron is not even imported by it."""
    code = ("import sys, torch; torch.cuda.is_available = lambda: True\n"
            "from megatron_qwen_image import cpu_emulation as c\n"
            "assert c.apply_if_needed() is False and not c.is_active()\n"
            "assert not [m for m in sys.modules if m.startswith('megatron.core')], 'megatron was imported'\n")
    subprocess.run([sys.executable, "-W", "ignore", "-c", code], cwd=REPO, check=True)


def test_rng_tracker_streams_are_seeded_forked_and_restored():
    from megatron.core.tensor_parallel import random as mrandom

    cpu_emulation.apply()
    mrandom.model_parallel_cuda_manual_seed(100, tp_rank=1, ep_rank=0, etp_rank=0, force_reset_rng=True)
    tracker = mrandom.get_cuda_rng_tracker()
    torch.manual_seed(5)
    before = torch.get_rng_state()
    with tracker.fork():  # 'model-parallel-rng' = seed + 2718 + tp_rank, as megatron documents
        a1 = torch.randn(4)
    with tracker.fork():
        a2 = torch.randn(4)  # the stream continues, not restarts
    assert torch.equal(torch.get_rng_state(), before)  # the default stream is untouched
    g = torch.Generator().manual_seed(100 + 2718 + 1)
    torch.testing.assert_close(torch.cat([a1, a2]), torch.randn(8, generator=g), rtol=0, atol=0)


def test_recompute_checkpoint_replays_rng_and_matches_plain_backward():
    """tensor_parallel.checkpoint (activation recompute) restores the RNG so dropout masks repeat exactly."""
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import random as mrandom

    cpu_emulation.apply()
    mrandom.model_parallel_cuda_manual_seed(3, tp_rank=0, ep_rank=0, etp_rank=0, force_reset_rng=True)
    tracker = mrandom.get_cuda_rng_tracker()
    initial = {k: v.clone() for k, v in tracker.get_states().items()}
    w = torch.randn(8, 8, requires_grad=True)
    x = torch.randn(4, 8, requires_grad=True)

    def block(inp):
        with tracker.fork():  # a TP-region dropout, as megatron does
            h = torch.nn.functional.dropout(inp @ w, p=0.5, training=True)
        return torch.nn.functional.dropout(torch.tanh(h), p=0.3, training=True)  # default-stream dropout

    results = []
    for use_checkpoint in (False, True):
        w.grad = x.grad = None
        torch.manual_seed(11)
        tracker.set_states({k: v.clone() for k, v in initial.items()})
        out = tensor_parallel.checkpoint(block, False, x) if use_checkpoint else block(x)
        out.sum().backward()
        results.append((out.detach(), w.grad.clone(), x.grad.clone()))
    for plain, recomputed in zip(*results):
        torch.testing.assert_close(plain, recomputed, rtol=0, atol=0)


def test_grad_norm_and_clipping_match_torch(world_of_one):
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32, get_grad_norm_fp32

    params = [torch.nn.Parameter(torch.randn(s)) for s in [(5, 3), (7,), (2, 2, 2)]]
    for p in params:
        p.grad = torch.randn_like(p)
    reference = [p.grad.clone() for p in params]
    ref_norm = torch.nn.utils.get_total_norm(reference)
    norm = get_grad_norm_fp32([p.grad for p in params], grad_stats_parallel_group=dist.group.WORLD)
    assert norm == pytest.approx(ref_norm.item(), rel=1e-6)
    clip_grad_by_total_norm_fp32(params, max_norm=0.5, total_norm=norm)
    for p, g in zip(params, reference):
        torch.testing.assert_close(p.grad, g * (0.5 / (ref_norm + 1e-6)))


@pytest.mark.parametrize("distributed", [True, False])
def test_megatron_ddp_and_optimizer_step_match_torch_adamw(world_of_one, distributed):
    """megatron DDP (+ DistributedOptimizer or FP32Optimizer) on CPU == torch.optim.AdamW on a copy."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.module import MegatronModule

    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1, use_cpu_initialization=True)

    class Net(MegatronModule):
        def __init__(self):
            super().__init__(config)
            self.fc = ColumnParallelLinear(8, 6, config=config, init_method=torch.nn.init.normal_, bias=True,
                                           gather_output=True)
            self.norm = torch.nn.LayerNorm(6)

        def forward(self, x):
            return self.norm(self.fc(x)[0])

    torch.manual_seed(0)
    net = Net()
    ref = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.LayerNorm(6))  # the same function in plain torch
    with torch.no_grad():
        for a, b in zip(ref.parameters(), net.parameters()):
            a.copy_(b)
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=distributed), net)
    opt = get_megatron_optimizer(OptimizerConfig(lr=0.01, weight_decay=0.0, clip_grad=0.0, bf16=False,
                                                 use_distributed_optimizer=distributed), [ddp])
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.01, weight_decay=0.0)
    for step in range(3):
        x = torch.randn(5, 8)
        ddp.zero_grad_buffer()
        opt.zero_grad()
        ddp(x).pow(2).mean().backward()
        finalize_model_grads([ddp])
        ok, _, _ = opt.step()
        assert ok
        ref_opt.zero_grad()
        ref(x).pow(2).mean().backward()
        ref_opt.step()
    for (name, a), b in zip(net.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_dist_checkpointing_save_and_load_on_cpu(world_of_one, tmp_path):
    """The two save-path patches: megatron's torch_dist save works on CPU and loads back bit-exactly."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    tensor = torch.randn(3, 4)
    dist_checkpointing.save({"w": ShardedTensor.from_rank_offsets("w", tensor, replica_id=0)}, str(tmp_path))
    loaded = dist_checkpointing.load({"w": ShardedTensor.from_rank_offsets("w", torch.zeros(3, 4), replica_id=0)},
                                     str(tmp_path))
    assert torch.equal(loaded["w"], tensor)


def test_markdown_table_lists_every_patch():
    table = cpu_emulation.markdown_table()
    assert table.count("\n") == len(cpu_emulation.PATCHES) + 1

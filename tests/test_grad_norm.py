"""megatron_compat.multi_tensor_l2_norm, megatron's apex/TE-free gradient-norm helper without a host sync per
tensor: the same value, shape and dtype as megatron-core 0.16.1's local_multi_tensor_l2_norm, on the tensors'
device; use_sync_free_grad_norm puts it at megatron's call site; on a GPU neither it nor the clipping scale
syncs the host (torch's sync debug mode), while megatron's own helper does."""
import pytest
import torch
import torch.distributed as dist

from megatron_qwen_image import cpu_emulation
from megatron_qwen_image.megatron_compat import multi_tensor_l2_norm, use_sync_free_grad_norm

CHUNK = 2048 * 32  # what megatron's local_multi_tensor_applier passes


def _tensors(device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(5, 3), (7,), (2, 2, 2), (1,), (64, 33), (1000,)]
    return [(torch.randn(s, generator=g) * (i + 1)).to(device=device, dtype=dtype) for i, s in enumerate(shapes)]


def _megatrons_own():
    """megatron-core's local_multi_tensor_l2_norm (on CPU with the emulation's edit of its "cuda" literal)."""
    cpu_emulation.apply_if_needed()
    from megatron.core import utils

    return utils.local_multi_tensor_l2_norm


def _exact(tensors) -> float:
    return float(torch.linalg.vector_norm(torch.cat([t.double().flatten() for t in tensors])))


def test_same_norm_shape_and_dtype_as_megatrons_on_the_input_device():
    tensors = _tensors()  # fp32, as megatron's main grads
    flag = torch.zeros(1, dtype=torch.int)
    ours, per_tensor = multi_tensor_l2_norm(CHUNK, flag, [tensors], False)
    ref, ref_per_tensor = _megatrons_own()(CHUNK, flag, [tensors], False)
    assert per_tensor is None and ref_per_tensor is None
    assert ours.shape == ref.shape == (1,) and ours.dtype == ref.dtype == torch.float32
    assert ours.device == tensors[0].device
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)
    assert float(ours) == pytest.approx(_exact(tensors), rel=1e-6)


def test_16_bit_tensors_are_reduced_in_fp32():
    """megatron's own reduces bf16 norms in bf16 (torch.tensor keeps their dtype); this one in fp32."""
    tensors = _tensors(dtype=torch.bfloat16)
    flag = torch.zeros(1, dtype=torch.int)
    ours, _ = multi_tensor_l2_norm(CHUNK, flag, [tensors], False)
    ref, _ = _megatrons_own()(CHUNK, flag, [tensors], False)
    assert ours.dtype == torch.float32
    assert float(ours) == pytest.approx(_exact(tensors), rel=1e-6)
    assert float(ref) == pytest.approx(_exact(tensors), rel=8e-3)  # within bf16 rounding, and further off


def test_empty_lists_give_zero_on_the_flag_device():
    out, _ = multi_tensor_l2_norm(CHUNK, torch.zeros(1, dtype=torch.int), [[]], False)
    assert out.shape == (1,) and out.dtype == torch.float32 and float(out) == 0.0


@pytest.fixture
def world_of_one():
    """A one-process gloo world with megatron parallel_state (TP=1); torn down afterwards."""
    from megatron.core import parallel_state

    cpu_emulation.apply_if_needed()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    yield
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path of megatron's get_grad_norm_fp32")
def test_megatrons_grad_norm_uses_it_and_matches_torch(world_of_one, monkeypatch):
    from megatron.core.optimizer import clip_grads

    monkeypatch.setattr(clip_grads, "l2_norm_impl", clip_grads.l2_norm_impl)  # restored after the test
    assert use_sync_free_grad_norm() and use_sync_free_grad_norm()  # idempotent
    assert clip_grads.l2_norm_impl is multi_tensor_l2_norm
    grads = _tensors(seed=3)
    norm = clip_grads.get_grad_norm_fp32(grads, grad_stats_parallel_group=dist.group.WORLD)
    assert isinstance(norm, float)
    assert norm == pytest.approx(torch.nn.utils.get_total_norm(grads).item(), rel=1e-6)


@pytest.mark.gpu
def test_no_host_sync_on_a_gpu():
    from megatron.core.utils import local_multi_tensor_scale

    tensors = _tensors("cuda")
    flag = torch.zeros(1, dtype=torch.int, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing CUDA call raises
    try:
        norm, _ = multi_tensor_l2_norm(CHUNK, flag, [tensors], False)
        local_multi_tensor_scale(CHUNK, flag, [tensors, tensors], 0.5)  # clip_grad_by_total_norm_fp32's scaling
        with pytest.raises(RuntimeError, match="synchroniz"):  # megatron's own reads every norm on the host
            _megatrons_own()(CHUNK, flag, [tensors], False)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert norm.is_cuda and norm.shape == (1,)
    torch.testing.assert_close(norm.cpu(), _megatrons_own()(CHUNK, flag, [tensors], False)[0].cpu(), rtol=1e-5, atol=0)

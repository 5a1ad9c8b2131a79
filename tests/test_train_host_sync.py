"""The train step's micro-batch loop without host syncs: text lengths read from the loader's CPU mask (not
from a device tensor), the same loss as the masked model call, copies from pinned memory (the cache loader
pins its batches by default when a GPU is visible); on a GPU no synchronizing call in a micro-batch's
forward and backward (torch's sync debug mode)."""
import pytest
import torch

from consumer.config import load_config
from consumer.synthetic_data import SyntheticLatentBatches
from consumer.train import host_text_lengths, microbatch_loss
from megatron_qwen_image.cache import BucketedLoader, CacheWriter, seal
from megatron_qwen_image.flow_matching import draw_noise_and_sigmas, flow_matching_loss, noisy_latents, velocity_target
from megatron_qwen_image.model import QwenImageMMDiT, pack_latents


@pytest.fixture(scope="module")
def tiny():
    """The tiny MMDiT in a one-process world (TP=1), its config and a batch of 4 with unequal text lengths."""
    from megatron_qwen_image.parallel import destroy_parallel, init_parallel

    cfg = load_config("configs/model/tiny.yaml", ["data.synthetic.resolutions=[[32, 48]]",
                                                   "data.synthetic.text_len=[2, 9]"])
    ctx = init_parallel(1, seed=3)
    model = QwenImageMMDiT(cfg.model_config(bf16=False, use_cpu_initialization=True)).to(ctx.device)
    batch = next(SyntheticLatentBatches(4, 0, 1, seed=5, text_dim=64, **cfg.data.synthetic.build_kwargs()))
    yield cfg, model, batch, ctx.device
    destroy_parallel()


def test_text_lengths_are_read_from_the_host_mask():
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    assert host_text_lengths(mask) == [2, 4, 0]
    with pytest.raises(ValueError, match="prefix of valid tokens"):
        host_text_lengths(torch.tensor([[1, 0, 1]], dtype=torch.bool))


def _masked_reference(model, batch, sl, step, cfg, device):
    """The loss as the model computes it from the device mask (its own, syncing, path)."""
    p = cfg.model.patch_size
    mask = batch["text_mask"][sl].to(device)
    length = max(int(mask.sum(dim=1).max()), 1)
    z = batch["latents"][sl].to(device=device, dtype=torch.float32)
    b, c, h, w = z.shape
    x0 = pack_latents(z, p)
    noise, sigma = draw_noise_and_sigmas(batch["keys"][sl], step, cfg.train.seed, (c, h, w), x0.shape[1],
                                         cfg.flow_matching, device)
    noise = pack_latents(noise, p)
    text = batch["text_embeds"][sl, :length].to(device)
    pred = model(noisy_latents(x0, noise, sigma), text, mask[:, :length], sigma, img_shapes=[(1, h // p, w // p)] * b)
    return flow_matching_loss(pred, velocity_target(x0, noise)).mean()


@pytest.mark.parametrize("sl", [slice(0, 1), slice(1, 3), slice(0, 4)])  # one sample, and strided text slices
def test_loss_equals_the_masked_model_call(tiny, sl):
    cfg, model, batch, device = tiny
    lengths = host_text_lengths(batch["text_mask"][sl])
    assert len(set(host_text_lengths(batch["text_mask"]))) > 1  # the batch is padded
    loss = microbatch_loss(model, batch, sl, 2, cfg, cfg.flow_matching, device, torch.float32)
    torch.testing.assert_close(loss, _masked_reference(model, batch, sl, 2, cfg, device), rtol=0, atol=0)
    assert batch["text_embeds"][sl, :max(lengths)].is_contiguous() == (sl != slice(1, 3))  # both copy paths ran


def _small_cache(root):
    with CacheWriter(str(root), work_unit="unit-0", latent_dtype="fp32", text_dtype="fp32") as writer:
        for i in range(4):
            writer.add(f"k{i}", torch.randn(16, 8, 8), torch.randn(3 + i, 8), caption="x", source="test")
        writer.commit()
    seal(str(root))
    return str(root)


def test_loader_pins_batches_only_when_a_gpu_is_visible(tmp_path):
    root = _small_cache(tmp_path / "cache")
    loader = BucketedLoader(root, global_batch_size=2, prefetch=0)
    try:
        assert loader.pin_memory is torch.cuda.is_available()
        batch = next(loader)
        pinned = torch.cuda.is_available()
        assert batch["latents"].is_pinned() is pinned and batch["text_embeds"].is_pinned() is pinned
    finally:
        loader.close()
    assert BucketedLoader(root, global_batch_size=2, prefetch=0, pin_memory=False).pin_memory is False


@pytest.mark.gpu
def test_no_host_sync_in_a_micro_batch_on_a_gpu(tiny):
    cfg, model, batch, device = tiny
    batch = {k: (v.pin_memory() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in batch.items()}
    microbatch_loss(model, batch, slice(0, 2), 0, cfg, cfg.flow_matching, device, torch.float32).backward()  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing CUDA call raises
    try:
        loss = microbatch_loss(model, batch, slice(0, 2), 1, cfg, cfg.flow_matching, device, torch.float32)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert loss.is_cuda

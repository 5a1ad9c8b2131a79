"""Tiny random reference models and helpers shared by tests (importable by any test: `from tests.reference_models
import ...`).

- `TINY_DIFFUSERS_CONFIG` / `build_tiny_diffusers_transformer(seed)`: a tiny random diffusers
  QwenImageTransformer2DModel at the contract's tiny sizes (configs/model/tiny.yaml), every parameter randomised
  (norm weights and biases too, so a wrong mapping cannot hide behind ones/zeros).
- `make_inputs(...)`: a batch in the model's forward signature, with per-sample text lengths (padding mask);
  `make_edit_inputs(...)` the same with condition images' tokens after the target's (the edit layout).
- `single_process_model_parallel(tp=1)`: a gloo world of size 1 with megatron parallel_state initialised, for
  in-process tests; cleans up afterwards.
- `megatron_from_diffusers(diff_model, tp_size, tp_rank, **config_overrides)`: our QwenImageMMDiT holding the
  diffusers model's weights (this rank's TP shard).
- `rel_max_err(a, b)`: max |a - b| / max |b|.
"""
from __future__ import annotations

import contextlib

import torch


TINY_DIFFUSERS_CONFIG = dict(
    patch_size=2,
    in_channels=64,
    out_channels=16,
    num_layers=2,
    attention_head_dim=16,
    num_attention_heads=4,
    joint_attention_dim=64,
    axes_dims_rope=(4, 6, 6),
)

# Parity shapes (batch, h, w, text lengths per sample, frames), shared by the TP=1 and TP=2 tests:
# non-square grids (odd and even sides exercise the centred MSRoPE positions), batches whose text lengths
# differ (padding mask), a batch with no padding, and 2 frames.
PARITY_SHAPES = [
    (2, 4, 6, [7, 3], 1),
    (1, 5, 3, [4], 1),
    (2, 6, 2, [5, 5], 1),
    (3, 3, 5, [2, 9, 6], 1),
    (1, 2, 3, [4], 2),
]


# Edit parity shapes (batch, target (h, w), condition (h, w) per image, text lengths): the condition larger,
# smaller or of another aspect than the target (odd sides), one and two condition images (Edit-2509 "Plus").
EDIT_PARITY_SHAPES = [
    (2, (4, 6), [(3, 5)], [7, 3]),
    (1, (3, 3), [(4, 2)], [5]),
    (2, (2, 4), [(3, 3), (2, 5)], [4, 6]),
]


def build_tiny_diffusers_transformer(seed: int = 0, **overrides):
    """A tiny fp32 QwenImageTransformer2DModel with all parameters random (deterministic for `seed`)."""
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    model = QwenImageTransformer2DModel(**{**TINY_DIFFUSERS_CONFIG, **overrides})
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:  # RMSNorm weights: around 1
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif p.dim() == 1:  # biases
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
    return model.eval()


def make_inputs(batch: int, h: int, w: int, text_lens, seed: int = 0, frames: int = 1,
                joint_attention_dim: int = 64, in_channels: int = 64):
    """Inputs for one forward: h, w in patch units; text_lens per sample (padded to the max, mask marks valid)."""
    gen = torch.Generator().manual_seed(seed)
    text_lens = list(text_lens)
    assert len(text_lens) == batch
    max_len = max(text_lens)
    mask = torch.zeros(batch, max_len, dtype=torch.bool)
    for i, n in enumerate(text_lens):
        mask[i, :n] = True
    txt = torch.randn(batch, max_len, joint_attention_dim, generator=gen) * mask[..., None]
    return dict(
        hidden_states=torch.randn(batch, frames * h * w, in_channels, generator=gen),
        encoder_hidden_states=txt,
        encoder_hidden_states_mask=mask,
        timestep=torch.rand(batch, generator=gen),
        img_shapes=[(frames, h, w)] * batch,
    )


def make_edit_inputs(batch: int, target, conds, text_lens, seed: int = 0):
    """make_inputs for a target of `target` = (h, w) patches, with each condition image's (h, w) tokens
    appended to hidden_states and img_shapes as QwenImageEditPipeline builds them: [(1, h, w), (1, ch, cw)...]."""
    inputs = make_inputs(batch, *target, text_lens, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1000)
    n_cond = sum(h * w for h, w in conds)
    cond = torch.randn(batch, n_cond, inputs["hidden_states"].shape[2], generator=gen)
    inputs["hidden_states"] = torch.cat([inputs["hidden_states"], cond], dim=1)
    inputs["img_shapes"] = [[(1, *target)] + [(1, h, w) for h, w in conds]] * batch
    return inputs


def diffusers_forward(model, inputs) -> torch.Tensor:
    """diffusers' forward with the pipeline's img_shapes layout ([[(f, h, w), ...]] per sample)."""
    return model(
        hidden_states=inputs["hidden_states"],
        encoder_hidden_states=inputs["encoder_hidden_states"],
        encoder_hidden_states_mask=inputs["encoder_hidden_states_mask"],
        timestep=inputs["timestep"],
        img_shapes=[[tuple(f) for f in s] if isinstance(s, list) else [tuple(s)] for s in inputs["img_shapes"]],
        return_dict=False,
    )[0]


@contextlib.contextmanager
def single_process_model_parallel(tp: int = 1):
    """torch.distributed (gloo, world size 1) + megatron parallel_state with TP=1, torn down on exit.

    Reuses an already-initialised world of size 1 (and leaves it), so tests of different owners can nest."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    assert tp == 1, "a single process can only hold TP=1; use tests/torchrun.py for TP>1"
    created_pg = not dist.is_initialized()
    if created_pg:
        dist.init_process_group("gloo", store=dist.HashStore(), world_size=1, rank=0)  # no port to race for
    elif dist.get_world_size() != 1:
        raise RuntimeError("a multi-process torch.distributed world is already initialised in this process")
    created_mp = not parallel_state.model_parallel_is_initialized()
    if created_mp:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    try:
        yield
    finally:
        if created_mp:
            parallel_state.destroy_model_parallel()
        if created_pg:
            dist.destroy_process_group()


def megatron_from_diffusers(diff_model, tp_size: int = 1, tp_rank: int = 0, **config_overrides):
    """QwenImageMMDiT (fp32) holding `diff_model`'s weights, TP rank `tp_rank` of `tp_size`."""
    from megatron_qwen_image.model import QwenImageMMDiT
    from megatron_qwen_image.model.diffusers_mapping import config_from_diffusers, diffusers_to_megatron

    config = config_from_diffusers(dict(diff_model.config), tensor_model_parallel_size=tp_size,
                                   perform_initialization=False, **config_overrides)
    model = QwenImageMMDiT(config)
    model.load_state_dict(diffusers_to_megatron(diff_model.state_dict(), tp_size, tp_rank), strict=True)
    return model


def rel_max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to the reference's scale max |b| (0 when both are all zeros)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))

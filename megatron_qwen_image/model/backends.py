"""Which implementation backs the block's layers, chosen once, as megatron-core's gpt_layer_specs chooses.

With Transformer Engine importable (megatron's own probe, extensions.transformer_engine.HAVE_TE) and a CUDA
device, the block spec takes TE's pieces where they keep this model's semantics; otherwise megatron-core's
local ones, which run on CPU and GPU. `block_spec_backend(...).spec_kwargs()` are the keyword arguments of
block.get_qwen_image_block_spec.

                      transformer_engine                        local
    linears           TEColumnParallelLinear / TERowParallel    ColumnParallelLinear / RowParallelLinear
    q/k RMSNorm       HeadRMSNorm                               HeadRMSNorm
    core attention    TEJointCoreAttention (TE DotProductAtt.)  SDPACoreAttention

Why the q/k norm stays HeadRMSNorm under TE: its weight is replicated but each TP rank normalises only its
own heads, so each rank's weight gradient is partial. HeadRMSNorm sums it over TP inside autograd by passing
the weight through copy_to_tensor_model_parallel_region. TE's RMSNorm applies `self.weight` inside its own
autograd function, so the weight cannot be wrapped; its gradient would then be summed only by
finalize_model_grads, which does so for a parameter marked `sequence_parallel` when config.sequence_parallel
is on, or by name ("q_layernorm"/"k_layernorm", with config.qk_layernorm) - neither holds here without
sequence parallelism (our norms are img_q_norm, ...), so at TP > 1 the gradient would be silently partial.
Besides, fused.rms_norm_rope fuses the norm with the RoPE that follows it, which a TE norm module would split.

TE's DotProductAttention expresses the joint attention because attention.py orders it [image, text]: each
sample's text padding is at the END of its sequence, which is what TE's "padding" mask (one [b, 1, 1, s]
mask for queries and keys, True = padding) assumes when it turns the mask into per-sample lengths. Its
constructor and forward differ from SDPACoreAttention's, hence the adapter TEJointCoreAttention.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from megatron.core import optimizer as megatron_optimizer
from megatron.core.extensions import transformer_engine as te_ext
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from .attention import SDPACoreAttention
from .config import QwenImageConfig
from .layers import HeadRMSNorm

TRANSFORMER_IMPLS = ("auto", "transformer_engine", "local")  # megatron-LM's --transformer-impl, plus auto


def transformer_engine_available() -> bool:
    """megatron-core's probe: `import transformer_engine` and its fp8 module both succeed."""
    return bool(te_ext.HAVE_TE)


def fused_adam_available() -> bool:
    """Whether megatron's optimizer got TE's or apex's FusedAdam (else torch's AdamW)."""
    return not megatron_optimizer.USING_PYTORCH_OPTIMIZER


@functools.lru_cache(maxsize=8)
def _padding_mask(valid_lengths: tuple, seq: int, device: torch.device) -> torch.Tensor:
    """[b, 1, 1, seq] bool, True past each sample's valid prefix (TE's convention: True = masked out).
    Cached: all blocks of a step (and their recompute) share one host-to-device copy."""
    lengths = torch.tensor(valid_lengths).to(device, non_blocking=True)
    return (torch.arange(seq, device=device)[None, :] >= lengths[:, None])[:, None, None, :]


class TEJointCoreAttention(MegatronModule):
    """SDPACoreAttention's contract on TE's DotProductAttention: q, k, v [S, B, H, D] sequence-first (TE's
    "sbhd"), `valid_lengths` per sample the length of its valid prefix (None: all valid); returns
    [S, B, H * D] with zeros past each prefix.

    The zeros are written here because TE does not document what it leaves in padded query rows, and a
    non-finite value there would poison the weight gradients of the next linears (0 * nan).
    """

    def __init__(self, config: QwenImageConfig, layer_number: int = 1):
        super().__init__(config=config)
        self.dpa = te_ext.TEDotProductAttention(config=config, layer_number=layer_number,
                                                attn_mask_type=AttnMaskType.padding, attention_type="self")

    def forward(self, q, k, v, valid_lengths: Optional[Sequence[int]] = None):
        seq = q.shape[0]
        if valid_lengths is None or all(n == seq for n in valid_lengths):
            return self.dpa(q, k, v, None, attn_mask_type=AttnMaskType.no_mask)
        mask = _padding_mask(tuple(int(n) for n in valid_lengths), seq, q.device)
        out = self.dpa(q, k, v, mask, attn_mask_type=AttnMaskType.padding)
        return out.masked_fill(mask[:, 0, 0, :].t()[:, :, None], 0.0)  # [S, B, 1]


@dataclass(frozen=True)
class BackendChoice:
    """The block's layer implementations, and what the start-up banner says about them."""

    name: str  # "transformer_engine" | "local"
    column_parallel_linear: type
    row_parallel_linear: type
    qk_norm: type
    core_attention: type
    reason: str
    fused_adam: bool

    def spec_kwargs(self) -> dict:
        """The keyword arguments of block.get_qwen_image_block_spec."""
        return {"column_parallel_linear": self.column_parallel_linear, "row_parallel_linear": self.row_parallel_linear,
                "qk_norm": self.qk_norm, "core_attention": self.core_attention}


def block_spec_backend(prefer: str = "auto", device_type: Optional[str] = None) -> BackendChoice:
    """The backend for setting `transformer_impl` (auto | transformer_engine | local).

    auto: Transformer Engine when it imports and the device is CUDA (TE has no CPU kernels), else local.
    transformer_engine: refused with the reason when that does not hold. device_type defaults to this
    machine's ("cuda" when a GPU is visible)."""
    if prefer not in TRANSFORMER_IMPLS:
        raise ValueError(f"transformer_impl must be one of {list(TRANSFORMER_IMPLS)}, got {prefer!r}")
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if not transformer_engine_available():
        missing = "transformer_engine is not importable"
    elif device_type != "cuda":
        missing = f"Transformer Engine needs a CUDA device, this run is on {device_type!r}"
    else:
        missing = None

    fused_adam = fused_adam_available()
    if prefer == "local" or (prefer == "auto" and missing):
        return BackendChoice(name="local", column_parallel_linear=ColumnParallelLinear,
                             row_parallel_linear=RowParallelLinear, qk_norm=HeadRMSNorm,
                             core_attention=SDPACoreAttention, fused_adam=fused_adam,
                             reason="transformer_impl=local" if prefer == "local" else missing)
    if missing:
        raise ValueError(f"transformer_impl=transformer_engine: {missing}")
    return BackendChoice(name="transformer_engine", column_parallel_linear=te_ext.TEColumnParallelLinear,
                         row_parallel_linear=te_ext.TERowParallelLinear, qk_norm=HeadRMSNorm,
                         core_attention=TEJointCoreAttention, fused_adam=fused_adam,
                         reason="transformer_engine importable on a CUDA device")

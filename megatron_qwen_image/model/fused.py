"""The block's per-token elementwise groups, each ONE pure function, and the backend that runs them.

Left to eager PyTorch, every norm, modulation, residual and RoPE of a block is a chain of kernels, each
reading and writing the whole activation (Transformer Engine and apex fuse a norm into the next linear, not
adaLN modulation or interleaved RoPE, so they do not help here). Each group below is written once, as a pure
function of already-broadcastable tensors (the caller reshapes shift/scale/gate and cos/sin); a backend
chosen once at start-up runs either these definitions as they are ("eager") or `torch.compile`d copies of
them ("compiled": one fused kernel per group, forward and backward):

    layer_norm_modulate(x, shift, scale, eps)   LayerNorm (no affine) -> x * (1 + scale) + shift     (adaLN)
    gated_residual(x, gate, y)                  x + gate * y                                          (residual)
    rms_norm_rope(x, weight, cos, sin, eps)     RoPE(RMSNorm(x) * weight), RoPE in float32            (q and k)

The fourth group, bias + GELU(tanh) after the MLP's first linear, is megatron-core's own fused kernel
(fusions/fused_bias_gelu.bias_gelu_impl, `torch.compile`d by megatron's jit_fuser in 0.16.1): megatron's MLP
takes it only for `activation_func is F.gelu` with `bias_activation_fusion=True`, and with the same F.gelu but
without the fusion flag it would apply erf-GELU, which is not this model's. `mlp_activation_fields` gives the
two config fields as one consistent pair.

Numerics: in float32 a compiled group matches its eager definition to rounding (~1e-7 relative, forward
and backward). In bf16, Inductor keeps the intermediates of a fused group in float32 and rounds once at the
end, where eager rounds after every op, so the two differ by about one bf16 ulp (the compiled one is the
closer to float64).

Shapes: a run sees few image-stream shapes (bucketed resolutions) but many text lengths (text is padded to
the batch's longest caption) and a batch size per bucket. `dynamic=False` would compile once per text length
and fall back to eager after dynamo's per-function recompile limit (8); torch.compile's automatic dynamic
shapes would compile a static graph first and then one per newly varying dim (sequence, then batch), which
with recompute's no-grad first pass and a batch of 1 (sizes 0 and 1 are always specialised) reaches 7. So
every dim but the last of every tensor argument is marked dynamic before the call (maybe_mark_dynamic: a
hint, not an error if dynamo specialises it): per grad mode one graph for all sequence lengths and batch
sizes, and one for a batch of 1. The last dim (hidden / head dim) stays static, so reductions over it stay
specialised. (megatron's own compiled bias_gelu keeps torch.compile's defaults: it always runs without grad,
inside its autograd.Function, so it stays within the limit too.)
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .config import gelu_tanh

FUSION_MODES = ("auto", "eager", "compile")


# ---------------------------------------------------------------------------------------------------------
# The definitions (eager). Every other implementation of these groups must match them.
# ---------------------------------------------------------------------------------------------------------
def layer_norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """adaLN: LayerNorm over the last dim without weight or bias (diffusers' norm1/norm2, eps 1e-6), then
    `* (1 + scale) + shift`. shift/scale broadcast against x (e.g. [1, B, h] for sequence-first x)."""
    return F.layer_norm(x, (x.shape[-1],), eps=eps) * (1 + scale) + shift


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The gated residual `x + gate * y` (diffusers' `hidden_states + gate * attn_output`)."""
    return x + gate * y


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim exactly as diffusers' RMSNorm (layers.RMSNorm / HeadRMSNorm): variance in
    float32; the normalised x is cast to the weight's dtype only when that is fp16/bf16, then scaled."""
    variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + eps)
    if weight.dtype in (torch.float16, torch.bfloat16):
        x = x.to(weight.dtype)
    return x * weight


def rotate_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on interleaved pairs (x[2j], x[2j+1]) of the last dim, computed in float32 and cast
    back to x's dtype (as diffusers). cos/sin: float32, broadcastable to x's shape with the last dim halved
    (e.g. [S, 1, 1, D/2] for sequence-first [S, B, H, D])."""
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)
    return out.to(x.dtype)


def rms_norm_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  eps: float) -> torch.Tensor:
    """q or k of this rank's heads [..., D]: per-head RMSNorm with `weight` [D], then RoPE.

    `weight` is an argument, not a module's parameter, so that HeadRMSNorm can pass its weight through
    copy_to_tensor_model_parallel_region (identity forward, TP all-reduce of the gradient in backward)."""
    return rotate_interleaved(rms_norm(x, weight, eps), cos, sin)


def bias_gelu_tanh(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """GELU(tanh)(x + bias): what megatron's MLP computes after linear_fc1 (skip_bias_add=True), unfused."""
    return gelu_tanh(x + bias)


def mlp_activation_fields(fused: bool) -> dict:
    """The QwenImageConfig fields that make megatron's MLP compute GELU(tanh)(fc1 + bias).

    fused: megatron's bias_gelu_impl (tanh form, torch.compile'd), which megatron's MLP takes only for
    `activation_func is F.gelu` and `bias_activation_fusion=True`. Unfused: our gelu_tanh after a separate
    bias add. Never F.gelu without the fusion flag: that is erf-GELU."""
    if fused:
        return {"activation_func": F.gelu, "bias_activation_fusion": True}
    return {"activation_func": gelu_tanh, "bias_activation_fusion": False}


# ---------------------------------------------------------------------------------------------------------
# The backend: chosen once, read by the blocks.
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FusionBackend:
    """The implementations a block calls for its elementwise groups. `name` is the banner's one word."""

    name: str  # "eager" | "compiled"
    layer_norm_modulate: Callable[..., torch.Tensor]
    gated_residual: Callable[..., torch.Tensor]
    rms_norm_rope: Callable[..., torch.Tensor]
    fuse_bias_gelu: bool  # whether the MLP should take megatron's fused bias-GELU (see mlp_activation_fields)

    def mlp_activation_fields(self) -> dict:
        return mlp_activation_fields(self.fuse_bias_gelu)


EAGER = FusionBackend(name="eager", layer_norm_modulate=layer_norm_modulate, gated_residual=gated_residual,
                      rms_norm_rope=rms_norm_rope, fuse_bias_gelu=False)


@functools.lru_cache(maxsize=None)
def compiled_backend(compiler: str = "inductor") -> FusionBackend:
    """The groups wrapped in torch.compile once per process (compilation itself happens lazily, on each
    group's first call). fullgraph=True: a pure elementwise group that breaks the graph is a bug to see, not
    a silent partial fusion. `compiler` is torch.compile's backend; tests also use "aot_eager"."""

    def compile_group(fn):
        compiled = torch.compile(fn, backend=compiler, fullgraph=True)

        @functools.wraps(fn)
        def run(*args, **kwargs):
            for arg in (*args, *kwargs.values()):
                if isinstance(arg, torch.Tensor):
                    for dim in range(arg.dim() - 1):
                        torch._dynamo.maybe_mark_dynamic(arg, dim)
            return compiled(*args, **kwargs)

        return run

    return FusionBackend(name="compiled", layer_norm_modulate=compile_group(layer_norm_modulate),
                         gated_residual=compile_group(gated_residual), rms_norm_rope=compile_group(rms_norm_rope),
                         fuse_bias_gelu=True)


def select_fusion(mode: str, device_type: str) -> FusionBackend:
    """The backend for setting `fusion` (auto | eager | compile) on a `device_type` ("cuda", "cpu") machine.

    auto: compiled on CUDA (Inductor's Triton kernels), eager elsewhere: on CPU a cold Inductor compile of
    the groups costs about a minute of gcc on 2 cores, more than the short CPU runs gain. compile: compiled
    on any device (what the CPU tests use)."""
    if mode not in FUSION_MODES:
        raise ValueError(f"fusion must be one of {list(FUSION_MODES)}, got {mode!r}")
    if mode == "eager" or (mode == "auto" and device_type != "cuda"):
        return EAGER
    return compiled_backend()

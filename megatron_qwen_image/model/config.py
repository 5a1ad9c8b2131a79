"""QwenImageConfig: megatron-core's TransformerConfig plus the few fields the Qwen-Image MMDiT adds.

Defaults are the released model (diffusers' QwenImageTransformer2DModel defaults, 20.43 B parameters):
60 dual-stream blocks, hidden 3072 = 24 heads x 128, MLP 12288, text features 3584, 16-channel latents
packed 2x2 into 64 channels, MSRoPE axes (16, 56, 56), every norm eps 1e-6.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

# Selective-recompute targets this model implements (a subset of megatron-core's names, same meaning):
#   core_attn  - softmax(QK^T)V of the joint attention (SDPA), incl. the padding mask
#   layernorm  - the adaLN pre-norms: LayerNorm + (1 + scale) * x + shift, both streams, both halves
#   mlp        - the whole GELU(tanh) MLP of both streams
SUPPORTED_RECOMPUTE_MODULES = ("core_attn", "layernorm", "mlp")


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation, as diffusers' FeedForward(activation_fn="gelu-approximate")."""
    return F.gelu(x, approximate="tanh")


@dataclass
class QwenImageConfig(TransformerConfig):
    """TransformerConfig for the Qwen-Image MMDiT.

    Added fields: in_channels (packed latent channels), out_channels (latent channels before packing),
    patch_size, joint_attention_dim (text feature width), axes_dims_rope (MSRoPE frame/height/width dims,
    summing to the head dim), rope_theta.

    Fields of TransformerConfig that this model reads: num_layers, hidden_size, num_attention_heads,
    kv_channels (head dim), ffn_hidden_size, layernorm_epsilon, tensor_model_parallel_size, params_dtype,
    bf16/fp16, use_cpu_initialization, perform_initialization, init_method(_std),
    recompute_granularity / recompute_method / recompute_num_layers / recompute_modules,
    distribute_saved_activations. sequence/context/pipeline parallelism are refused.
    """

    # --- Qwen-Image additions ---
    in_channels: int = 64
    out_channels: int = 16
    patch_size: int = 2
    joint_attention_dim: int = 3584
    axes_dims_rope: Tuple[int, int, int] = (16, 56, 56)
    rope_theta: int = 10000

    # --- TransformerConfig fields whose defaults become the released model's ---
    num_layers: int = 60
    hidden_size: int = 3072
    num_attention_heads: int = 24
    layernorm_epsilon: float = 1e-6
    activation_func: Callable = gelu_tanh
    normalization: str = "RMSNorm"  # q/k norms; the block pre-norms are affine-free LayerNorms (fixed)
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    # None = decide from the machine: CPU initialisation when no GPU is visible. megatron-core's
    # tensor-parallel layers otherwise allocate on torch.cuda.current_device().
    use_cpu_initialization: Optional[bool] = None

    def __post_init__(self):
        if self.use_cpu_initialization is None:
            self.use_cpu_initialization = not torch.cuda.is_available()
        self.axes_dims_rope = tuple(int(a) for a in self.axes_dims_rope)
        super().__post_init__()
        self._validate()

    def _validate(self):
        def bad(key, msg):
            raise ValueError(f"QwenImageConfig.{key}={getattr(self, key)!r}: {msg}")

        for key in ("num_layers", "hidden_size", "num_attention_heads", "in_channels", "out_channels",
                    "patch_size", "joint_attention_dim"):
            if int(getattr(self, key)) <= 0:
                bad(key, "must be a positive integer")
        if self.kv_channels * self.num_attention_heads != self.hidden_size:
            bad("kv_channels", f"head dim x num_attention_heads ({self.num_attention_heads}) must equal "
                               f"hidden_size ({self.hidden_size})")
        if len(self.axes_dims_rope) != 3 or any(a <= 0 or a % 2 for a in self.axes_dims_rope):
            bad("axes_dims_rope", "must be three positive even numbers (frame, height, width)")
        if sum(self.axes_dims_rope) != self.kv_channels:
            bad("axes_dims_rope", f"must sum to the head dim kv_channels={self.kv_channels}")
        if self.num_query_groups != self.num_attention_heads:
            bad("num_query_groups", "Qwen-Image uses full multi-head attention: must equal num_attention_heads")
        if self.gated_linear_unit:
            bad("gated_linear_unit", "Qwen-Image's MLP is GELU(tanh), not gated")
        if not self.add_bias_linear:
            bad("add_bias_linear", "every Qwen-Image linear has a bias")
        if self.sequence_parallel:
            bad("sequence_parallel", "not supported by this model (activations are replicated across TP)")
        if self.context_parallel_size != 1:
            bad("context_parallel_size", "not supported by this model; use 1")
        if self.pipeline_model_parallel_size != 1:
            bad("pipeline_model_parallel_size", "not supported by this model; use 1")
        if self.hidden_dropout or self.attention_dropout:
            bad("hidden_dropout" if self.hidden_dropout else "attention_dropout",
                "Qwen-Image has no dropout; must be 0.0")
        if self.recompute_granularity == "full" and not 1 <= self.recompute_num_layers <= self.num_layers:
            bad("recompute_num_layers", f"must be between 1 and num_layers={self.num_layers} for full recompute")
        if self.recompute_granularity == "selective":
            unsupported = [m for m in self.recompute_modules if m not in SUPPORTED_RECOMPUTE_MODULES]
            if unsupported:
                bad("recompute_modules", f"{unsupported} not implemented by the Qwen-Image MMDiT; "
                                         f"choose from {list(SUPPORTED_RECOMPUTE_MODULES)}")

    @property
    def head_dim(self) -> int:
        return self.kv_channels

    @property
    def proj_out_channels(self) -> int:
        """Width of proj_out: one patch of out_channels latents (64 for 2x2 x 16)."""
        return self.patch_size * self.patch_size * self.out_channels

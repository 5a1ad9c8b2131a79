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


class ModelConfigError(ValueError):
    """A QwenImageConfig field holds a value this model cannot take; `field` names it."""

    def __init__(self, field: str, message: str):
        self.field, self.message = field, message
        super().__init__(f"QwenImageConfig.{field}: {message}")


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation, as diffusers' FeedForward(activation_fn="gelu-approximate")."""
    return F.gelu(x, approximate="tanh")


@dataclass
class QwenImageConfig(TransformerConfig):
    """TransformerConfig for the Qwen-Image MMDiT.

    Added fields: in_channels (packed latent channels), out_channels (latent channels before packing),
    patch_size, joint_attention_dim (text feature width), axes_dims_rope (MSRoPE frame/height/width dims,
    summing to the head dim), rope_theta, zero_cond_t (Qwen-Image-Edit-2511: the condition images' tokens are
    modulated with the embedding of timestep 0, the target's with the sample's timestep; no extra weights).

    Fields of TransformerConfig that this model reads: num_layers, hidden_size, num_attention_heads,
    kv_channels (head dim), ffn_hidden_size, layernorm_epsilon, tensor_model_parallel_size, params_dtype,
    bf16/fp16, use_cpu_initialization, perform_initialization, init_method(_std),
    recompute_granularity / recompute_method / recompute_num_layers / recompute_modules,
    distribute_saved_activations, sequence_parallel. context/pipeline parallelism are refused.
    """

    # --- Qwen-Image additions ---
    in_channels: int = 64
    out_channels: int = 16
    patch_size: int = 2
    joint_attention_dim: int = 3584
    axes_dims_rope: Tuple[int, int, int] = (16, 56, 56)
    rope_theta: int = 10000
    zero_cond_t: bool = False

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
        self.axes_dims_rope = tuple(self.axes_dims_rope)
        self._validate_shape()  # before megatron's own checks, which would fail on the same values less clearly
        super().__post_init__()

    def _validate_shape(self):
        """The architecture, its tensor-parallel split and the recompute settings, each error naming its field."""
        def require(ok, key, msg):
            if not ok:
                raise ModelConfigError(key, msg)

        for key in ("num_layers", "hidden_size", "num_attention_heads", "in_channels", "out_channels",
                    "patch_size", "joint_attention_dim", "tensor_model_parallel_size"):
            value = getattr(self, key)
            require(isinstance(value, int) and value >= 1, key, f"must be a positive integer, got {value!r}")
        require(self.layernorm_epsilon > 0, "layernorm_epsilon", f"must be > 0, got {self.layernorm_epsilon}")
        require(self.hidden_size % self.num_attention_heads == 0, "hidden_size",
                f"{self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}")
        head_dim = self.kv_channels or self.hidden_size // self.num_attention_heads
        require(head_dim * self.num_attention_heads == self.hidden_size, "kv_channels",
                f"head dim x num_attention_heads ({self.num_attention_heads}) must equal hidden_size ({self.hidden_size})")
        require(len(self.axes_dims_rope) == 3 and all(isinstance(a, int) and a > 0 and a % 2 == 0
                                                     for a in self.axes_dims_rope),
                "axes_dims_rope", f"must be three positive even integers (frame, height, width), got "
                                  f"{list(self.axes_dims_rope)}")
        require(sum(self.axes_dims_rope) == head_dim, "axes_dims_rope",
                f"must sum to the head dim hidden_size/num_attention_heads = {head_dim}, got {sum(self.axes_dims_rope)}")
        require(self.in_channels == self.out_channels * self.patch_size ** 2, "in_channels",
                f"must equal out_channels*patch_size^2 = {self.out_channels * self.patch_size ** 2} (2x2-packed latents)")
        tp = self.tensor_model_parallel_size
        require(self.num_attention_heads % tp == 0, "tensor_model_parallel_size",
                f"{tp} does not divide num_attention_heads={self.num_attention_heads} (heads are split across TP ranks)")
        ffn = self.ffn_hidden_size or 4 * self.hidden_size
        require(ffn % tp == 0, "tensor_model_parallel_size", f"{tp} does not divide ffn_hidden_size={ffn}")
        require(self.num_query_groups in (None, self.num_attention_heads), "num_query_groups",
                "Qwen-Image uses full multi-head attention: must equal num_attention_heads")
        require(not self.gated_linear_unit, "gated_linear_unit", "Qwen-Image's MLP is GELU(tanh), not gated")
        act = self.activation_func
        require(act is gelu_tanh or (act is F.gelu and self.bias_activation_fusion), "activation_func",
                "Qwen-Image's MLP is GELU(tanh): gelu_tanh, or F.gelu with bias_activation_fusion=True (megatron's "
                "fused tanh bias-GELU; fused.mlp_activation_fields); F.gelu without the fusion is erf-GELU")
        require(not self.use_te_activation_func, "use_te_activation_func", "not supported: the MLP is GELU(tanh)")
        require(self.add_bias_linear, "add_bias_linear", "every Qwen-Image linear has a bias")
        require(not self.sequence_parallel or tp > 1, "sequence_parallel",
                "needs tensor_model_parallel_size > 1 (it splits the token sequence over the TP group)")
        require(not (self.sequence_parallel and self.distribute_saved_activations), "distribute_saved_activations",
                "cannot be combined with sequence_parallel (the saved activations are already split over TP)")
        require(self.context_parallel_size == 1, "context_parallel_size", "not supported by this model; use 1")
        require(self.pipeline_model_parallel_size == 1, "pipeline_model_parallel_size",
                "not supported by this model; use 1")
        require(not self.hidden_dropout, "hidden_dropout", "Qwen-Image has no dropout; must be 0.0")
        require(not self.attention_dropout, "attention_dropout", "Qwen-Image has no dropout; must be 0.0")
        g, method, n = self.recompute_granularity, self.recompute_method, self.recompute_num_layers
        if g == "full":
            require(method in ("uniform", "block"), "recompute_method",
                    "must be 'uniform' or 'block' when recompute_granularity=full")
            require(n is not None and 1 <= n <= self.num_layers, "recompute_num_layers",
                    f"must be in [1, num_layers={self.num_layers}] when recompute_granularity=full, got {n}")
        else:
            require(method is None, "recompute_method", f"only applies to recompute_granularity=full (it is {g!r})")
            require(n is None, "recompute_num_layers", f"only applies to recompute_granularity=full (it is {g!r})")
        if self.recompute_modules is not None:
            require(g == "selective", "recompute_modules",
                    f"only applies to recompute_granularity=selective (it is {g!r})")
            bad = [m for m in self.recompute_modules if m not in SUPPORTED_RECOMPUTE_MODULES]
            require(self.recompute_modules and not bad, "recompute_modules",
                    f"{bad or 'empty list'}: choose from {list(SUPPORTED_RECOMPUTE_MODULES)}")

    @property
    def head_dim(self) -> int:
        return self.kv_channels

    @property
    def proj_out_channels(self) -> int:
        """Width of proj_out: one patch of out_channels latents (64 for 2x2 x 16)."""
        return self.patch_size * self.patch_size * self.out_channels

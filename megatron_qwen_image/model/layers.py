"""Small building blocks of the MMDiT: RMSNorm, adaLN modulation, the timestep embedding, replicated linears.

Placement across tensor-parallel ranks:
- AdaLNModulation (img_mod / txt_mod in every block: 3072 -> 18432, a third of all parameters; and norm_out's
  3072 -> 6144) is column-parallel: each rank holds 1/TP of the output rows and the small [B, k * hidden] output
  is all-gathered, because every rank needs all of shift/scale/gate for the replicated residual stream.
- Everything else outside the blocks (timestep MLP, txt_norm, img_in, txt_in, proj_out: ~0.2 % of the
  parameters at full size) is replicated on every TP rank, as Megatron replicates layer norms. Replicated
  parameters get identical gradients on every TP rank because their inputs and output-gradients are
  identical there (with sequence parallelism too: they run on whole sequences, outside the SP region), so
  they need no extra TP communication.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel import ColumnParallelLinear, copy_to_tensor_model_parallel_region
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from megatron_qwen_image.megatron_compat import GatherLastDim

from .config import QwenImageConfig
from .fused import rms_norm


class RMSNorm(torch.nn.Module):
    """RMSNorm with a weight, computed exactly like diffusers' RMSNorm (variance in float32).

    Constructor matches megatron-core's norm modules (config, hidden_size, eps) so a spec can swap in TENorm.
    """

    def __init__(self, config: QwenImageConfig, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class HeadRMSNorm(RMSNorm):
    """The per-head RMSNorm on q and k (weight: head_dim), applied to THIS rank's heads only.

    Its weight is replicated on every TP rank but each rank sees only its own heads, so each rank's weight
    gradient is partial. The weight therefore enters through megatron's copy_to_tensor_model_parallel_region
    (identity forward, all-reduce backward): p.grad is the full gradient on every rank by construction, with
    no reliance on finalize_model_grads' name-based q_layernorm/k_layernorm all-reduce (config.qk_layernorm
    stays False so that one never runs twice).
    """

    def tp_weight(self) -> torch.Tensor:
        """The weight as this rank's computation must see it (identity forward, TP all-reduce backward); the
        attention's fused RMSNorm + RoPE takes it as an argument."""
        return copy_to_tensor_model_parallel_region(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.tp_weight(), self.eps)


def replicated_linear(config: QwenImageConfig, in_features: int, out_features: int,
                      init_method=None) -> torch.nn.Linear:
    """A plain nn.Linear held whole on every TP rank, initialised Megatron's way (normal weight, zero bias).

    Identical values on every TP rank come from identical seeds (torch's default generator), as for
    megatron-core's replicated layer norms.
    """
    device = None if config.use_cpu_initialization else torch.cuda.current_device()
    layer = torch.nn.Linear(in_features, out_features, bias=True, device=device, dtype=config.params_dtype)
    if config.perform_initialization:
        with torch.no_grad():
            (init_method or config.init_method)(layer.weight)
            layer.bias.zero_()
    return layer


def gather_last_dim_from_tp(x: torch.Tensor, group=None) -> torch.Tensor:
    """`x` all-gathered along its last dim over the TP group (megatron_compat.GatherLastDim); x at TP=1."""
    group = group or parallel_state.get_tensor_model_parallel_group()
    if dist.get_world_size(group) == 1:
        return x
    return GatherLastDim.apply(x, group)


@dataclass
class AdaLNModulationSubmodules:
    linear: Union[ModuleSpec, type] = ColumnParallelLinear


class AdaLNModulation(MegatronModule):
    """SiLU -> Linear(hidden -> num_chunks * hidden), column-parallel; returns the full [B, num_chunks * hidden].

    The output rows keep diffusers' order (blocks: shift1, scale1, gate1, shift2, scale2, gate2; norm_out:
    scale, shift), and rank r holds contiguous rows [r * n / TP, (r + 1) * n / TP), so the TP split of the
    weight is a plain chunk along dim 0 and the gathered output is the unsharded output.

    `tokens_sharded`: the output modulates sequence-parallel token shards, so each TP rank's gradient of it
    covers only its own tokens; the gathered output then passes megatron's copy_to_tensor_model_parallel_region
    (identity forward, all-reduce backward) to sum those partial gradients. Its input, temb [B, hidden], is never
    a token sequence, so the linear itself runs without sequence parallelism whatever the config says.
    """

    def __init__(self, config: QwenImageConfig, submodules: AdaLNModulationSubmodules, num_chunks: int,
                 tokens_sharded: bool = False):
        super().__init__(config=config)
        self.num_chunks = num_chunks
        self.tokens_sharded = tokens_sharded
        linear_config = copy.copy(config)
        linear_config.sequence_parallel = False
        self.linear = build_module(
            submodules.linear, config.hidden_size, num_chunks * config.hidden_size,
            config=linear_config, init_method=config.init_method, bias=True, gather_output=False,
            skip_bias_add=False, is_expert=False, tp_comm_buffer_name="adaln",
        )

    def forward(self, temb: torch.Tensor) -> torch.Tensor:
        out, _ = self.linear(F.silu(temb))
        out = gather_last_dim_from_tp(out)
        return copy_to_tensor_model_parallel_region(out) if self.tokens_sharded else out


def sinusoidal_timestep_embedding(timesteps: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """diffusers' Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0, scale=1000): [cos, sin]."""
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    emb = torch.exp(exponent).to(timesteps.dtype)
    emb = 1000 * (timesteps[:, None].float() * emb[None, :])
    return torch.cat([torch.cos(emb), torch.sin(emb)], dim=-1)


class TimestepEmbedding(MegatronModule):
    """sigma in [0, 1] -> sinusoidal(256, x1000) -> Linear -> SiLU -> Linear (replicated on every TP rank)."""

    FREQ_DIM = 256

    def __init__(self, config: QwenImageConfig):
        super().__init__(config=config)
        self.linear_1 = replicated_linear(config, self.FREQ_DIM, config.hidden_size)
        self.linear_2 = replicated_linear(config, config.hidden_size, config.hidden_size)

    def forward(self, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        proj = sinusoidal_timestep_embedding(timestep, self.FREQ_DIM).to(dtype)
        return self.linear_2(F.silu(self.linear_1(proj)))

"""The Qwen-Image dual-stream (MMDiT) block and its layer spec.

Per block (diffusers' QwenImageTransformerBlock):
    img_mod = Linear(SiLU(temb)) -> [shift1, scale1, gate1, shift2, scale2, gate2]   (txt_mod likewise)
    img_attn, txt_attn = joint_attention(LN(img) * (1 + scale1) + shift1, LN(txt) * (1 + scale1') + shift1')
    img += gate1 * img_attn;  txt += gate1' * txt_attn
    img += gate2 * MLP_img(LN(img) * (1 + scale2) + shift2);  txt likewise with txt_mlp
LN is LayerNorm without weight or bias (eps 1e-6); MLP is Linear -> GELU(tanh) -> Linear (megatron's MLP).

Editing models append the condition images' tokens to the image stream (after the target's). With
zero_cond_t (Qwen-Image-Edit-2511) those tokens take their shift/scale/gate from img_mod(temb of timestep 0)
and the target's from img_mod(temb), as diffusers' `_modulate(..., modulate_index)`; the text stream and
everything else see the sample's timestep only. The two segments are contiguous (target first), so each is
modulated with its own [b, h] parameters (`per_segment`) instead of materialising per-token [s, b, h]
parameters as diffusers does: no extra activation memory, the same arithmetic.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from .attention import QwenJointAttention, QwenJointAttentionSubmodules, SDPACoreAttention
from .config import QwenImageConfig
from .fused import EAGER, FusionBackend
from .layers import AdaLNModulation, AdaLNModulationSubmodules, HeadRMSNorm


@dataclass
class QwenImageBlockSubmodules:
    modulation: Union[ModuleSpec, type] = None  # img_mod and txt_mod
    attention: Union[ModuleSpec, type] = None
    mlp: Union[ModuleSpec, type] = None  # img_mlp and txt_mlp


def get_qwen_image_block_spec(
    column_parallel_linear: type = ColumnParallelLinear,
    row_parallel_linear: type = RowParallelLinear,
    qk_norm: type = HeadRMSNorm,
    core_attention: type = SDPACoreAttention,
    fusion: FusionBackend = EAGER,
) -> ModuleSpec:
    """The block's ModuleSpec. The defaults are megatron-core's local tensor-parallel linears (they run on CPU
    and GPU) and eager elementwise groups; backends.block_spec_backend picks Transformer Engine's pieces when
    TE is installed, fused.select_fusion the compiled groups on CUDA (the trainer chooses both once, from
    the `kernels` config section). A replacement `qk_norm` must provide HeadRMSNorm's `tp_weight()` and `eps`
    (its weight gradient is summed over TP: each rank normalises only its own heads)."""
    return ModuleSpec(
        module=QwenImageBlock,
        params={"fusion": fusion},
        submodules=QwenImageBlockSubmodules(
            modulation=ModuleSpec(
                module=AdaLNModulation,
                submodules=AdaLNModulationSubmodules(linear=column_parallel_linear),
            ),
            attention=ModuleSpec(
                module=QwenJointAttention,
                params={"fusion": fusion},
                submodules=QwenJointAttentionSubmodules(
                    linear_qkv=column_parallel_linear,
                    q_layernorm=qk_norm,
                    k_layernorm=qk_norm,
                    core_attention=core_attention,
                    linear_proj=row_parallel_linear,
                ),
            ),
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(linear_fc1=column_parallel_linear, linear_fc2=row_parallel_linear),
            ),
        ),
    )


def per_segment(fn, tokens: tuple, params: tuple, split) -> torch.Tensor:
    """fn(*tokens, *params[0]) when `params` has one set; with two, fn on tokens[:split] with params[0] and on
    tokens[split:] with params[1], concatenated along the sequence (dim 0). `split` is a host int (this rank's
    count of target tokens; with sequence parallelism it may be 0 or the whole shard)."""
    if len(params) == 1 or split >= tokens[0].shape[0]:
        return fn(*tokens, *params[0])
    if split <= 0:
        return fn(*tokens, *params[1])
    return torch.cat([fn(*(t[:split] for t in tokens), *params[0]),
                      fn(*(t[split:] for t in tokens), *params[1])])


class QwenImageBlock(MegatronModule):
    """One dual-stream block. forward(img, txt, temb, img_cos, img_sin, txt_cos, txt_sin, text_lengths,
    cond_temb, image_split) -> (img, txt), streams sequence-first [s, b, h] (with sequence parallelism: this
    rank's token shards).

    cond_temb (zero_cond_t only, else None): the timestep-0 embedding for the image tokens from `image_split`
    on (this rank's first condition token). Every argument but the host values `text_lengths` and
    `image_split` is a tensor (or None), so the whole block can run under megatron's tensor_parallel.checkpoint
    for full recompute (the caller closes over the host values).
    """

    def __init__(self, config: QwenImageConfig, submodules: QwenImageBlockSubmodules, layer_number: int = 1,
                 fusion: FusionBackend = EAGER):
        super().__init__(config=config)
        self.layer_number = layer_number
        self.eps = config.layernorm_epsilon
        self.fusion = fusion
        selective = config.recompute_granularity == "selective"
        self.recompute_norm = selective and "layernorm" in config.recompute_modules
        self.recompute_mlp = selective and "mlp" in config.recompute_modules
        # With sequence parallelism the modulation (computed whole on every rank) is applied to this rank's
        # tokens only, so its gradient is partial per rank: AdaLNModulation then sums it over TP.
        sharded = config.sequence_parallel and config.tensor_model_parallel_size > 1

        self.img_mod = build_module(submodules.modulation, config=config, num_chunks=6, tokens_sharded=sharded)
        self.txt_mod = build_module(submodules.modulation, config=config, num_chunks=6, tokens_sharded=sharded)
        self.attention = build_module(submodules.attention, config=config)
        self.img_mlp = build_module(submodules.mlp, config=config, ffn_hidden_size=config.ffn_hidden_size)
        self.txt_mlp = build_module(submodules.mlp, config=config, ffn_hidden_size=config.ffn_hidden_size)

    def _norm_modulate(self, x, shift, scale):
        return self.fusion.layer_norm_modulate(x, shift, scale, self.eps)  # [s, b, h] with [b, h]

    def _modulated(self, x, shift, scale):
        if self.recompute_norm and torch.is_grad_enabled():
            return tensor_parallel.checkpoint(self._norm_modulate, False, x, shift, scale)
        return self._norm_modulate(x, shift, scale)

    @staticmethod
    def _run_mlp(mlp, x):
        out, bias = mlp(x)
        return out if bias is None else out + bias

    def _mlp(self, mlp, x):
        if self.recompute_mlp and torch.is_grad_enabled():
            return tensor_parallel.checkpoint(lambda t: self._run_mlp(mlp, t), False, x)
        return self._run_mlp(mlp, x)

    def forward(self, img, txt, temb, img_cos, img_sin, txt_cos, txt_sin, text_lengths=None, cond_temb=None,
                image_split=None):
        if cond_temb is None:
            img_mods = (self.img_mod(temb).chunk(6, dim=-1),)
        else:  # one GEMM for both timesteps, as diffusers runs img_mod on cat([temb, temb0])
            img_mods = tuple(m.chunk(6, dim=-1) for m in self.img_mod(torch.cat([temb, cond_temb])).chunk(2))
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = self.txt_mod(temb).chunk(6, dim=-1)

        def on_img(fn, tokens, which):  # fn over the image stream, each segment with its own modulation
            return per_segment(fn, tokens, tuple(tuple(m[i] for i in which) for m in img_mods), image_split)

        img_attn, txt_attn = self.attention(
            on_img(self._modulated, (img,), (0, 1)), self._modulated(txt, t_shift1, t_scale1),
            img_cos, img_sin, txt_cos, txt_sin, text_lengths,
        )
        residual = self.fusion.gated_residual
        img = on_img(lambda x, y, gate: residual(x, gate, y), (img, img_attn), (2,))
        txt = residual(txt, t_gate1, txt_attn)

        img_mlp = self._mlp(self.img_mlp, on_img(self._modulated, (img,), (3, 4)))
        img = on_img(lambda x, y, gate: residual(x, gate, y), (img, img_mlp), (5,))
        txt = residual(txt, t_gate2, self._mlp(self.txt_mlp, self._modulated(txt, t_shift2, t_scale2)))

        if img.dtype == torch.float16:  # as diffusers: keep fp16 finite
            img, txt = img.clip(-65504, 65504), txt.clip(-65504, 65504)
        return img, txt

"""Joint (text + image) attention of a Qwen-Image dual-stream block, tensor-parallel over heads.

Per stream: a fused q/k/v projection (column-parallel; rows laid out per head as [q_h; k_h; v_h] so that a
contiguous TP split hands each rank whole heads), RMSNorm on q and k per head, MSRoPE; then ONE attention over
the concatenation [text, image] of both streams on this rank's heads (not causal, text padding keys masked),
and per-stream output projections (row-parallel, all-reduced).

The core attention is torch's scaled_dot_product_attention with a bool key-padding mask. megatron-core's
local DotProductAttention materialises the full score matrix and needs CUDA, so it is not used.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from .config import QwenImageConfig
from .layers import HeadRMSNorm
from .rope import apply_rotary_interleaved


class SDPACoreAttention(MegatronModule):
    """softmax(q k^T / sqrt(d) + mask) v with torch SDPA. q, k, v: [B, H, S, D]; mask: [B, S] bool
    (True = key is valid) or None. Returns [B, S, H * D].

    On GPU SDPA picks a memory-efficient kernel (flash when there is no mask); on CPU it is the math kernel,
    which keeps the [B, H, S, S] probabilities for backward - what selective 'core_attn' recompute drops.
    """

    def __init__(self, config: QwenImageConfig):
        super().__init__(config=config)

    def forward(self, q, k, v, key_mask: Optional[torch.Tensor]):
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=0.0, is_causal=False)
        return out.transpose(1, 2).flatten(2)


@dataclass
class QwenJointAttentionSubmodules:
    linear_qkv: Union[ModuleSpec, type] = ColumnParallelLinear
    q_layernorm: Union[ModuleSpec, type] = HeadRMSNorm
    k_layernorm: Union[ModuleSpec, type] = HeadRMSNorm
    core_attention: Union[ModuleSpec, type] = SDPACoreAttention
    linear_proj: Union[ModuleSpec, type] = RowParallelLinear


class QwenJointAttention(MegatronModule):
    """Dual-stream joint attention. Parameter names: img_qkv, txt_qkv, img_q_norm, img_k_norm, txt_q_norm,
    txt_k_norm, img_proj, txt_proj (diffusers: to_q/k/v, add_q/k/v_proj, norm_q/k, norm_added_q/k, to_out.0,
    to_add_out)."""

    def __init__(self, config: QwenImageConfig, submodules: QwenJointAttentionSubmodules):
        super().__init__(config=config)
        tp = config.tensor_model_parallel_size
        self.head_dim = config.kv_channels
        self.heads_per_rank = config.num_attention_heads // tp
        self.recompute_core_attention = (
            config.recompute_granularity == "selective" and "core_attn" in config.recompute_modules
        )
        hidden = config.hidden_size

        def qkv():
            return build_module(submodules.linear_qkv, hidden, 3 * hidden, config=config,
                                init_method=config.init_method, gather_output=False, bias=True,
                                skip_bias_add=False, is_expert=False, tp_comm_buffer_name="qkv")

        def proj():
            return build_module(submodules.linear_proj, hidden, hidden, config=config,
                                init_method=config.output_layer_init_method, bias=True, input_is_parallel=True,
                                skip_bias_add=False, is_expert=False, tp_comm_buffer_name="proj")

        def norm():
            return build_module(submodules.q_layernorm, config=config, hidden_size=self.head_dim,
                                eps=config.layernorm_epsilon)

        self.img_qkv, self.txt_qkv = qkv(), qkv()
        self.img_q_norm, self.img_k_norm = norm(), norm()
        self.txt_q_norm, self.txt_k_norm = norm(), norm()
        self.core_attention = build_module(submodules.core_attention, config=config)
        self.img_proj, self.txt_proj = proj(), proj()

    def _qkv(self, x, linear, q_norm, k_norm, cos, sin):
        out, _ = linear(x)  # [B, S, heads_per_rank * 3 * head_dim], per head [q; k; v]
        q, k, v = out.unflatten(-1, (self.heads_per_rank, 3, self.head_dim)).unbind(-2)  # [B, S, H, D]
        q = apply_rotary_interleaved(q_norm(q), cos, sin)
        k = apply_rotary_interleaved(k_norm(k), cos, sin)
        return q, k, v

    def forward(self, img, txt, key_mask, img_cos, img_sin, txt_cos, txt_sin):
        """img [B, N, hidden], txt [B, L, hidden]; key_mask [B, L + N] bool or None. Returns (img_out, txt_out)."""
        iq, ik, iv = self._qkv(img, self.img_qkv, self.img_q_norm, self.img_k_norm, img_cos, img_sin)
        tq, tk, tv = self._qkv(txt, self.txt_qkv, self.txt_q_norm, self.txt_k_norm, txt_cos, txt_sin)
        # Joint sequence order is [text, image], as in diffusers; SDPA wants [B, H, S, D].
        q, k, v = (torch.cat([t, i], dim=1).transpose(1, 2) for t, i in ((tq, iq), (tk, ik), (tv, iv)))
        if self.recompute_core_attention and torch.is_grad_enabled():
            joint = tensor_parallel.checkpoint(self.core_attention, False, q, k, v, key_mask)
        else:
            joint = self.core_attention(q, k, v, key_mask)
        text_len = txt.shape[1]
        txt_out, _ = self.txt_proj(joint[:, :text_len].contiguous())
        img_out, _ = self.img_proj(joint[:, text_len:].contiguous())
        return img_out, txt_out

"""Joint (text + image) attention of a Qwen-Image dual-stream block, tensor-parallel over heads.

Per stream: a fused q/k/v projection (column-parallel; rows laid out per head as [q_h; k_h; v_h] so that a
contiguous TP split hands each rank whole heads), RMSNorm on q and k per head and MSRoPE (one elementwise group,
fused.rms_norm_rope); then ONE attention over
the concatenation of both streams on this rank's heads (not causal, text padding never attended), and
per-stream output projections (row-parallel).

Streams are sequence-first [s, b, h]. With sequence parallelism the q/k/v projections all-gather the token
shards (megatron's ColumnParallelLinear) and the output projections reduce-scatter them back
(RowParallelLinear); the pad tokens that make each stream divisible by TP are dropped right after q/k/v.

Attention without padding cost: the joint order is [image, text] (attention is permutation-equivariant and
every position is already rotated, so the order changes nothing but rounding), which puts each sample's text
padding at the END of its sequence. A batch with no padding is one SDPA call without a mask (flash / cuDNN
on GPU); a padded batch runs SDPA per sample on its valid prefix, also without a mask, so no kernel computes
on padding and none falls back to a masked kernel. The padded text positions' outputs are zeros; they feed
only their own positions in later layers and never the loss (diffusers computes them and drops them too).
megatron-core's local DotProductAttention materialises the full score matrix and needs CUDA: not used.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from .config import QwenImageConfig
from .layers import HeadRMSNorm
from .fused import EAGER, FusionBackend
from .sequence import pad_tokens


class SDPACoreAttention(MegatronModule):
    """softmax(q k^T / sqrt(d)) v with torch SDPA. q, k, v: [S, B, H, D] sequence-first; `valid_lengths`: per
    sample, the length of its valid prefix (None: all S valid). Returns [S, B, H * D], zeros past each prefix.

    Without a mask SDPA takes a flash-style kernel on CPU (torch 2.13) as on GPU (flash / cuDNN), which keeps
    only q, k, v, the output and the log-sum-exp for backward; selective 'core_attn' recompute drops those.
    """

    def __init__(self, config: QwenImageConfig):
        super().__init__(config=config)

    @staticmethod
    def _sdpa(q, k, v):
        """[S, B, H, D] -> [S, B, H * D]."""
        out = F.scaled_dot_product_attention(*(t.permute(1, 2, 0, 3) for t in (q, k, v)), dropout_p=0.0,
                                             is_causal=False)
        return out.permute(2, 0, 1, 3).flatten(2)

    def forward(self, q, k, v, valid_lengths: Optional[Sequence[int]] = None):
        seq = q.shape[0]
        if valid_lengths is None or all(n == seq for n in valid_lengths):
            return self._sdpa(q, k, v)
        per_sample = [self._sdpa(q[:n, b:b + 1], k[:n, b:b + 1], v[:n, b:b + 1]) for b, n in enumerate(valid_lengths)]
        return torch.cat([pad_tokens(o, seq) for o in per_sample], dim=1)


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

    def __init__(self, config: QwenImageConfig, submodules: QwenJointAttentionSubmodules,
                 fusion: FusionBackend = EAGER):
        super().__init__(config=config)
        self.fusion = fusion
        tp = config.tensor_model_parallel_size
        self.head_dim = config.kv_channels
        self.heads_per_rank = config.num_attention_heads // tp
        self.recompute_core_attention = (
            config.recompute_granularity == "selective" and "core_attn" in config.recompute_modules
        )
        hidden = config.hidden_size
        # With sequence parallelism the streams arrive as 1/TP shards; the projections' full length is TP x that.
        self._sp_factor = tp if config.sequence_parallel and tp > 1 else 1

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
        out, _ = linear(x)  # [S, B, heads_per_rank * 3 * head_dim], per head [q; k; v] (SP: gathered, padded)
        out = out[:cos.shape[0]]  # drop the sequence-parallel pad tokens
        q, k, v = out.unflatten(-1, (self.heads_per_rank, 3, self.head_dim)).unbind(-2)  # [S, B, H, D]
        cos, sin = cos[:, None, None, :], sin[:, None, None, :]  # over batch and heads
        q = self.fusion.rms_norm_rope(q, q_norm.tp_weight(), cos, sin, q_norm.eps)
        k = self.fusion.rms_norm_rope(k, k_norm.tp_weight(), cos, sin, k_norm.eps)
        return q, k, v

    def forward(self, img, txt, img_cos, img_sin, txt_cos, txt_sin, text_lengths: Optional[Sequence[int]] = None):
        """img [N, B, hidden], txt [L, B, hidden] (with sequence parallelism: this rank's padded shards);
        cos/sin [N or L, head_dim / 2] give the true stream lengths; text_lengths: valid text tokens per
        sample (None: no padding). Returns (img_out, txt_out) shaped like img and txt."""
        n_img, n_txt = img_cos.shape[0], txt_cos.shape[0]
        iq, ik, iv = self._qkv(img, self.img_qkv, self.img_q_norm, self.img_k_norm, img_cos, img_sin)
        tq, tk, tv = self._qkv(txt, self.txt_qkv, self.txt_q_norm, self.txt_k_norm, txt_cos, txt_sin)
        q, k, v = (torch.cat([i, t], dim=0) for i, t in ((iq, tq), (ik, tk), (iv, tv)))  # [image, text]
        valid = None if text_lengths is None else [n_img + n for n in text_lengths]
        if self.recompute_core_attention and torch.is_grad_enabled():
            joint = tensor_parallel.checkpoint(lambda q, k, v: self.core_attention(q, k, v, valid), False, q, k, v)
        else:
            joint = self.core_attention(q, k, v, valid)
        # Back to each stream's own length (the SP-padded one, so the row-parallel linear can reduce-scatter).
        img_out, _ = self.img_proj(pad_tokens(joint[:n_img], img.shape[0] * self._sp_factor))
        txt_out, _ = self.txt_proj(pad_tokens(joint[n_img:], txt.shape[0] * self._sp_factor))
        return img_out, txt_out

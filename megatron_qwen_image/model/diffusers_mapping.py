"""Weight mapping between diffusers' QwenImageTransformer2DModel and QwenImageMMDiT, tensor by tensor.

Each `TensorMapping` names one of our tensors, the diffusers tensor(s) it comes from, and its TP split axis
(None = replicated on every TP rank). Only the fused q/k/v projections combine several diffusers tensors:
ours is [q_h; k_h; v_h] per head h (rows), so that a contiguous TP split along dim 0 gives each rank whole
heads; every other tensor is a plain rename. So a converter can stream: read the 1 (or 3) diffusers tensors
of a mapping, call `to_megatron` + `shard`, write; and back: `unshard` + `to_diffusers`.

Whole-state-dict helpers `diffusers_to_megatron(sd, tp_size, tp_rank)` and
`megatron_to_diffusers([rank0_sd, rank1_sd, ...])` are built on the same entries, and
`config_from_diffusers(config_dict)` / `diffusers_config_from(config)` translate the configs.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .config import QwenImageConfig

DIFFUSERS_CLASS_NAME = "QwenImageTransformer2DModel"
EXTRA_STATE_SUFFIX = "_extra_state"  # megatron-core linears add `<prefix>._extra_state` (None) to state dicts


@dataclass(frozen=True)
class TensorMapping:
    megatron: str                 # our parameter name
    diffusers: Tuple[str, ...]    # one name, or (q, k, v) names for a fused projection
    tp_axis: Optional[int]        # dim of OUR tensor split across TP ranks; None = replicated
    num_heads: int = 0            # for fused q/k/v only

    @property
    def fused_qkv(self) -> bool:
        return len(self.diffusers) == 3

    # ---- layout conversion (full, unsharded tensors) ----
    def to_megatron(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """The diffusers tensor(s), in the order of `self.diffusers`, -> our full tensor."""
        if len(tensors) != len(self.diffusers):
            raise ValueError(f"{self.megatron}: expected {len(self.diffusers)} tensors {self.diffusers}, "
                             f"got {len(tensors)}")
        if not self.fused_qkv:
            return tensors[0]
        q, k, v = tensors
        if not (q.shape == k.shape == v.shape) or q.shape[0] % self.num_heads:
            raise ValueError(f"{self.megatron}: q/k/v shapes {tuple(q.shape)}, {tuple(k.shape)}, "
                             f"{tuple(v.shape)} do not fit {self.num_heads} heads")
        per_head = [t.reshape(self.num_heads, q.shape[0] // self.num_heads, *q.shape[1:]) for t in (q, k, v)]
        return torch.stack(per_head, dim=1).reshape(3 * q.shape[0], *q.shape[1:])

    def to_diffusers(self, full: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Our full tensor -> {diffusers name: tensor}."""
        if not self.fused_qkv:
            return {self.diffusers[0]: full}
        rows = full.shape[0] // 3
        per_head = full.reshape(self.num_heads, 3, rows // self.num_heads, *full.shape[1:])
        return {name: per_head[:, i].reshape(rows, *full.shape[1:]).contiguous()
                for i, name in enumerate(self.diffusers)}

    # ---- tensor parallelism ----
    def shard(self, full: torch.Tensor, tp_size: int, tp_rank: int) -> torch.Tensor:
        """This rank's piece of our full tensor (a contiguous copy)."""
        if self.tp_axis is None:
            return full.clone()
        if full.shape[self.tp_axis] % tp_size:
            raise ValueError(f"{self.megatron}: dim {self.tp_axis} of shape {tuple(full.shape)} is not divisible "
                             f"by tensor_model_parallel_size={tp_size}")
        return full.chunk(tp_size, dim=self.tp_axis)[tp_rank].clone()

    def unshard(self, pieces: Sequence[torch.Tensor]) -> torch.Tensor:
        """The full tensor from every rank's piece (rank order); replicated pieces must agree exactly."""
        if self.tp_axis is not None:
            return torch.cat(list(pieces), dim=self.tp_axis)
        for rank, piece in enumerate(pieces[1:], start=1):
            if not torch.equal(piece, pieces[0]):
                raise ValueError(f"{self.megatron}: replicated tensor differs between TP rank 0 and rank {rank}")
        return pieces[0]


def tensor_mappings(num_layers: int, num_heads: int) -> List[TensorMapping]:
    """Every tensor of the model, in diffusers' state-dict order."""
    def m(ours, theirs, axis=None):
        return TensorMapping(ours, (theirs,) if isinstance(theirs, str) else tuple(theirs), axis, num_heads)

    def linear(ours, theirs, weight_axis, bias_axis):
        return [m(f"{ours}.weight", f"{theirs}.weight", weight_axis), m(f"{ours}.bias", f"{theirs}.bias", bias_axis)]

    out = [
        *linear("time_embed.linear_1", "time_text_embed.timestep_embedder.linear_1", None, None),
        *linear("time_embed.linear_2", "time_text_embed.timestep_embedder.linear_2", None, None),
        m("txt_norm.weight", "txt_norm.weight"),
        *linear("img_in", "img_in", None, None),
        *linear("txt_in", "txt_in", None, None),
    ]
    for i in range(num_layers):
        o, d = f"layers.{i}", f"transformer_blocks.{i}"
        out += [
            *linear(f"{o}.img_mod.linear", f"{d}.img_mod.1", 0, 0),
            m(f"{o}.attention.img_q_norm.weight", f"{d}.attn.norm_q.weight"),
            m(f"{o}.attention.img_k_norm.weight", f"{d}.attn.norm_k.weight"),
            *[m(f"{o}.attention.img_qkv.{p}", [f"{d}.attn.to_{x}.{p}" for x in "qkv"], 0) for p in ("weight", "bias")],
            *[m(f"{o}.attention.txt_qkv.{p}", [f"{d}.attn.add_{x}_proj.{p}" for x in "qkv"], 0)
              for p in ("weight", "bias")],
            *linear(f"{o}.attention.img_proj", f"{d}.attn.to_out.0", 1, None),
            *linear(f"{o}.attention.txt_proj", f"{d}.attn.to_add_out", 1, None),
            m(f"{o}.attention.txt_q_norm.weight", f"{d}.attn.norm_added_q.weight"),
            m(f"{o}.attention.txt_k_norm.weight", f"{d}.attn.norm_added_k.weight"),
            *linear(f"{o}.img_mlp.linear_fc1", f"{d}.img_mlp.net.0.proj", 0, 0),
            *linear(f"{o}.img_mlp.linear_fc2", f"{d}.img_mlp.net.2", 1, None),
            *linear(f"{o}.txt_mod.linear", f"{d}.txt_mod.1", 0, 0),
            *linear(f"{o}.txt_mlp.linear_fc1", f"{d}.txt_mlp.net.0.proj", 0, 0),
            *linear(f"{o}.txt_mlp.linear_fc2", f"{d}.txt_mlp.net.2", 1, None),
        ]
    out += [*linear("norm_out.linear", "norm_out.linear", 0, 0), *linear("proj_out", "proj_out", None, None)]
    return out


def tensor_mappings_for(config: QwenImageConfig) -> List[TensorMapping]:
    return tensor_mappings(config.num_layers, config.num_attention_heads)


def megatron_shapes(config: QwenImageConfig) -> Dict[str, Tuple[int, ...]]:
    """Full (unsharded) shape of every tensor of QwenImageMMDiT for `config`, keyed by our names.

    Diffusers' shapes follow from it without allocating: `mp.to_diffusers(torch.empty(shape, device="meta"))`.
    """
    d, hd, f = config.hidden_size, config.kv_channels, config.ffn_hidden_size
    j, c, p = config.joint_attention_dim, config.in_channels, config.proj_out_channels

    def lin(name, out_f, in_f):
        return {f"{name}.weight": (out_f, in_f), f"{name}.bias": (out_f,)}

    shapes = {**lin("time_embed.linear_1", d, 256), **lin("time_embed.linear_2", d, d), "txt_norm.weight": (j,),
              **lin("img_in", d, c), **lin("txt_in", d, j)}
    for i in range(config.num_layers):
        o = f"layers.{i}"
        for s in ("img", "txt"):
            shapes.update({**lin(f"{o}.{s}_mod.linear", 6 * d, d), **lin(f"{o}.attention.{s}_qkv", 3 * d, d),
                           f"{o}.attention.{s}_q_norm.weight": (hd,), f"{o}.attention.{s}_k_norm.weight": (hd,),
                           **lin(f"{o}.attention.{s}_proj", d, d), **lin(f"{o}.{s}_mlp.linear_fc1", f, d),
                           **lin(f"{o}.{s}_mlp.linear_fc2", d, f)})
    shapes.update({**lin("norm_out.linear", 2 * d, d), **lin("proj_out", p, d)})
    return shapes


def parameter_counts(config: QwenImageConfig, tp_size: Optional[int] = None) -> Dict[str, int]:
    """Parameter counts without building the model: total, sharded (split over TP), replicated (on every
    TP rank) and per_rank = sharded / TP + replicated, for tp_size (default: the config's)."""
    tp = tp_size or config.tensor_model_parallel_size
    shapes = megatron_shapes(config)
    sharded = replicated = 0
    for mp in tensor_mappings_for(config):
        n = 1
        for s in shapes[mp.megatron]:
            n *= s
        if mp.tp_axis is None:
            replicated += n
        else:
            sharded += n
    if sharded % tp:
        raise ValueError(f"tensor_model_parallel_size={tp} does not divide the sharded tensors")
    return {"total": sharded + replicated, "sharded": sharded, "replicated": replicated,
            "per_rank": sharded // tp + replicated, "tp_size": tp}


# ---------------------------------------------------------------- whole state dicts
def _num_layers(keys, pattern: str) -> int:
    idx = {int(mt.group(1)) for k in keys if (mt := re.match(pattern, k))}
    if idx != set(range(len(idx))):
        raise ValueError(f"block indices are not contiguous from 0: {sorted(idx)}")
    return len(idx)


def _check_keys(have, expected, what: str):
    missing, unexpected = sorted(set(expected) - set(have)), sorted(set(have) - set(expected))
    if missing or unexpected:
        raise KeyError(f"{what}: missing {missing[:10]}{' ...' if len(missing) > 10 else ''}, "
                       f"unexpected {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")


def layers_and_heads_of(sd: Mapping[str, torch.Tensor]) -> Tuple[int, int]:
    """(num_layers, num_heads) of a diffusers QwenImageTransformer2DModel state dict."""
    try:
        head_dim = sd["transformer_blocks.0.attn.norm_q.weight"].shape[0]
        hidden = sd["transformer_blocks.0.attn.to_q.weight"].shape[0]
    except KeyError as e:
        raise KeyError(f"not a {DIFFUSERS_CLASS_NAME} state dict: no {e}") from None
    return _num_layers(sd.keys(), r"transformer_blocks\.(\d+)\."), hidden // head_dim


def diffusers_to_megatron(sd: Mapping[str, torch.Tensor], tp_size: int = 1, tp_rank: int = 0) -> Dict[str, torch.Tensor]:
    """A diffusers state dict -> the state dict of TP rank `tp_rank` of `tp_size` (no _extra_state entries;
    load it with model.load_state_dict(..., strict=True))."""
    num_layers, num_heads = layers_and_heads_of(sd)
    if tp_size < 1 or not 0 <= tp_rank < tp_size or num_heads % tp_size:
        raise ValueError(f"tp_size={tp_size}, tp_rank={tp_rank}: tp_size must divide num_heads={num_heads} "
                         f"and 0 <= tp_rank < tp_size")
    mappings = tensor_mappings(num_layers, num_heads)
    _check_keys(sd.keys(), [n for mp in mappings for n in mp.diffusers], "diffusers state dict")
    return {mp.megatron: mp.shard(mp.to_megatron([sd[n] for n in mp.diffusers]), tp_size, tp_rank)
            for mp in mappings}


def megatron_to_diffusers(rank_sds: Sequence[Mapping[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Every TP rank's state dict (in rank order) -> one diffusers state dict."""
    if isinstance(rank_sds, Mapping):
        rank_sds = [rank_sds]
    sds = [{k: v for k, v in sd.items() if not k.endswith(EXTRA_STATE_SUFFIX)} for sd in rank_sds]
    sd0 = sds[0]
    try:
        head_dim = sd0["layers.0.attention.img_q_norm.weight"].shape[0]
        hidden = sd0["layers.0.attention.img_qkv.weight"].shape[1]
    except KeyError as e:
        raise KeyError(f"not a QwenImageMMDiT state dict: no {e}") from None
    mappings = tensor_mappings(_num_layers(sd0.keys(), r"layers\.(\d+)\."), hidden // head_dim)
    for rank, sd in enumerate(sds):
        _check_keys(sd.keys(), [mp.megatron for mp in mappings], f"TP rank {rank} state dict")
    out = {}
    for mp in mappings:
        out.update(mp.to_diffusers(mp.unshard([sd[mp.megatron] for sd in sds])))
    return out


# ---------------------------------------------------------------- configs
_UNSUPPORTED_VARIANTS = {  # diffusers options for other Qwen-Image variants, refused unless at their default
    "guidance_embeds": False, "use_additional_t_cond": False, "use_layer3d_rope": False,
}


def _strict_bool(value, key: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"diffusers config {key}={value!r} must be true or false")
    return value


def config_from_diffusers(config_dict: Mapping, **overrides) -> QwenImageConfig:
    """A diffusers QwenImageTransformer2DModel config (config.json as a dict) -> QwenImageConfig.

    `overrides` are QwenImageConfig fields (tensor_model_parallel_size, params_dtype, recompute_*, ...).
    Keys starting with '_' (diffusers metadata) are ignored; unknown keys and unsupported variants are refused.
    """
    cfg = dict(config_dict)
    cls = cfg.get("_class_name", DIFFUSERS_CLASS_NAME)
    if cls != DIFFUSERS_CLASS_NAME:
        raise ValueError(f"_class_name={cls!r}: expected {DIFFUSERS_CLASS_NAME!r}")
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    for key, default in _UNSUPPORTED_VARIANTS.items():
        if cfg.pop(key, default) != default:
            raise ValueError(f"diffusers config {key}={config_dict[key]!r} is not supported (only {default!r})")
    known = {"patch_size", "in_channels", "out_channels", "num_layers", "attention_head_dim",
             "num_attention_heads", "joint_attention_dim", "axes_dims_rope", "zero_cond_t"}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(f"unknown keys in the diffusers config: {unknown}")
    # A key the diffusers config leaves out has diffusers' default, which is the released model's and
    # QwenImageConfig's default too: take it from there instead of restating it.
    q = QwenImageConfig
    heads = int(cfg.get("num_attention_heads", q.num_attention_heads))
    head_dim = int(cfg.get("attention_head_dim", q.hidden_size // q.num_attention_heads))
    in_channels = int(cfg.get("in_channels", q.in_channels))
    hidden = heads * head_dim
    kwargs = dict(
        num_layers=int(cfg.get("num_layers", q.num_layers)),
        hidden_size=hidden,
        num_attention_heads=heads,
        kv_channels=head_dim,
        ffn_hidden_size=4 * hidden,  # diffusers' FeedForward default mult=4
        in_channels=in_channels,
        # diffusers: out_channels=None means in_channels (which this model refuses: it predicts the packed input)
        out_channels=int(cfg.get("out_channels", q.out_channels) or in_channels),
        patch_size=int(cfg.get("patch_size", q.patch_size)),
        joint_attention_dim=int(cfg.get("joint_attention_dim", q.joint_attention_dim)),
        axes_dims_rope=tuple(int(a) for a in cfg.get("axes_dims_rope", q.axes_dims_rope)),
        # Edit-2511: condition tokens modulated at timestep 0; the same weights as every other variant
        zero_cond_t=_strict_bool(cfg.get("zero_cond_t", q.zero_cond_t), "zero_cond_t"),
    )
    kwargs.update(overrides)
    return QwenImageConfig(**kwargs)


def diffusers_config_from(config: QwenImageConfig) -> dict:
    """QwenImageConfig -> kwargs for QwenImageTransformer2DModel (plus '_class_name', as in config.json)."""
    if config.ffn_hidden_size != 4 * config.hidden_size:
        raise ValueError(f"ffn_hidden_size={config.ffn_hidden_size}: diffusers' model has 4 * hidden_size "
                         f"({4 * config.hidden_size})")
    return {
        "_class_name": DIFFUSERS_CLASS_NAME,
        "patch_size": config.patch_size,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "num_layers": config.num_layers,
        "attention_head_dim": config.kv_channels,
        "num_attention_heads": config.num_attention_heads,
        "joint_attention_dim": config.joint_attention_dim,
        "axes_dims_rope": list(config.axes_dims_rope),
        "guidance_embeds": False,
        "zero_cond_t": bool(config.zero_cond_t),
        "use_additional_t_cond": False,
        "use_layer3d_rope": False,
    }

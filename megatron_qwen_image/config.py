"""Training configuration: YAML files with Megatron's names, `key=value` overrides, early validation.

A config file is a flat mapping of training keys (Megatron-LM's argument names where one exists:
``tensor_model_parallel_size``, ``use_distributed_optimizer``, ``recompute_granularity``, ``lr``, ...) plus
a ``model:`` mapping with the MMDiT's shape. A file may start from other files with ``base:`` (a path or
a list of paths, relative to the file; later files and the file itself win, mappings merge key by key):

    base: model/tiny.yaml
    tensor_model_parallel_size: 2
    model: {num_layers: 2}

Command-line overrides are ``key=value`` (``model.num_layers=4``, ``lr=3e-4``, ``recompute_granularity=null``);
values are parsed as YAML scalars/lists.

Every bad value is refused at start-up by ``ConfigError`` whose message begins with the offending key
(unknown keys get a "did you mean" hint), never deep in a traceback.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A configuration value is invalid. The message starts with the key it is about."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"config key '{key}': {message}")


# --------------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    """Shape of the Qwen-Image MMDiT (diffusers' QwenImageTransformer2DModel defaults = released 20B)."""

    num_layers: int = 60
    hidden_size: int = 3072
    num_attention_heads: int = 24
    ffn_hidden_size: int = 12288
    joint_attention_dim: int = 3584
    in_channels: int = 64
    out_channels: int = 16
    patch_size: int = 2
    axes_dims_rope: list = field(default_factory=lambda: [16, 56, 56])
    layernorm_epsilon: float = 1e-6


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)

    # parallelism (data-parallel size = world size / tensor_model_parallel_size)
    tensor_model_parallel_size: int = 1
    use_distributed_optimizer: bool = True
    # activation recompute, as Megatron: granularity full|selective|null, method uniform|block
    recompute_granularity: Optional[str] = None
    recompute_method: Optional[str] = None
    recompute_num_layers: Optional[int] = None
    recompute_modules: Optional[list] = None  # selective only; null = megatron's default ['core_attn']
    # precision: null = automatic (bf16 on a GPU, fp32 on CPU)
    bf16: Optional[bool] = None
    # null = automatic (True on CPU). True initialises each full weight on CPU from the default
    # generator and slices the TP shard, so the initial model does not depend on the TP layout.
    use_cpu_initialization: Optional[bool] = None

    # batch: global = micro x data-parallel x accumulation steps
    micro_batch_size: int = 1
    global_batch_size: int = 1
    train_iters: int = 100

    # optimizer (megatron OptimizerConfig) and LR schedule (megatron OptimizerParamScheduler)
    optimizer: str = "adam"
    lr: float = 1e-4
    min_lr: float = 0.0
    lr_warmup_init: float = 0.0
    lr_warmup_iters: int = 0
    lr_decay_iters: Optional[int] = None  # null = train_iters
    lr_decay_style: str = "constant"
    lr_wsd_decay_iters: Optional[int] = None
    lr_wsd_decay_style: str = "linear"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0

    seed: int = 1234

    # flow matching: sigma = sigmoid(N(logit_mean, logit_std)), then an optional shift as diffusers'
    # FlowMatchEulerDiscreteScheduler: static (`shift`) or resolution-dependent (`dynamic`, mu from
    # calculate_shift(image_seq_len, base_image_seq_len, max_image_seq_len, base_shift, max_shift)).
    logit_mean: float = 0.0
    logit_std: float = 1.0
    timestep_shift: str = "none"
    shift: float = 1.0
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    base_shift: float = 0.5
    max_shift: float = 1.15
    time_shift_type: str = "exponential"

    # data: `synthetic` is the flagged stand-in source; `cache` reads the latent cache
    data: str = "synthetic"
    cache_dir: Optional[str] = None
    cache_streaming: bool = False
    cache_prefetch: int = 2
    synthetic_resolutions: list = field(default_factory=lambda: [[64, 64]])  # pixel [height, width]
    synthetic_text_len: list = field(default_factory=lambda: [4, 16])  # [min, max] tokens
    synthetic_num_classes: int = 4

    # logging
    log_interval: int = 1
    tensorboard_dir: Optional[str] = None
    log_jsonl: Optional[str] = None

    # checkpoints (consumer/checkpointing.py)
    save: Optional[str] = None
    save_interval: Optional[int] = None
    keep_last: Optional[int] = None     # keep only the newest k checkpoints (null = keep all)
    load: Optional[str] = None          # resume everything from this directory's latest complete checkpoint
    pretrained: Optional[str] = None    # start from these model weights only (e.g. imported diffusers weights)
    keep_last: Optional[int] = None   # keep only the newest k checkpoints under `save` (null = keep all)
    pretrained: Optional[str] = None  # model weights only (e.g. imported diffusers weights) when `load` holds none

    # ---- derived -------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.model.hidden_size // self.model.num_attention_heads

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // self.tensor_model_parallel_size

    def num_microbatches(self, world_size: int) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.data_parallel_size(world_size))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_CHOICES = {
    "recompute_granularity": (None, "full", "selective"),
    "recompute_method": (None, "uniform", "block"),
    "optimizer": ("adam", "sgd"),
    "lr_decay_style": ("constant", "linear", "cosine", "inverse-square-root", "WSD"),
    "lr_wsd_decay_style": ("linear", "cosine", "exponential", "minus_sqrt"),
    "timestep_shift": ("none", "static", "dynamic"),
    "time_shift_type": ("exponential", "linear"),
    "data": ("synthetic", "cache"),
}


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------
def _read_yaml(path: str, seen: tuple = ()) -> dict:
    path = os.path.abspath(path)
    if path in seen:
        raise ConfigError("base", f"{path} includes itself")
    if not os.path.isfile(path):
        raise ConfigError("config", f"file not found: {path}")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError("config", f"{path} must hold a mapping, not {type(data).__name__}")
    bases = data.pop("base", None) or []
    merged: dict = {}
    for base in [bases] if isinstance(bases, str) else bases:
        merged = _merge(merged, _read_yaml(os.path.join(os.path.dirname(path), base), seen + (path,)))
    return _merge(merged, data)


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_overrides(overrides: list[str]) -> dict:
    """`["lr=3e-4", "model.num_layers=4"]` -> nested dict; values parsed as YAML."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "command-line overrides must look like key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as e:
            raise ConfigError(key, f"cannot parse value {raw!r}: {e}") from None
        node = out
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def _coerce(key: str, value: Any, typ: Any) -> Any:
    origin = get_origin(typ)
    if origin is Union:  # Optional[X]
        (inner,) = [a for a in get_args(typ) if a is not type(None)]
        return None if value is None else _coerce(key, value, inner)
    if value is None:
        raise ConfigError(key, "must not be null")
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"must be true or false, got {value!r}")
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"must be an integer, got {value!r}")
        return value
    if typ is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads 3e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"must be a number, got {value!r}")
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"must be a string, got {value!r}")
        return value
    if typ is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"must be a list, got {value!r}")
        return list(value)
    return value


def _build(cls, data: dict, prefix: str = ""):
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = prefix + key
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean '{prefix + close[0]}'?" if close else ""
            raise ConfigError(full, f"unknown key{hint}")
        if dataclasses.is_dataclass(hints[key]):
            if not isinstance(value, dict):
                raise ConfigError(full, f"must be a mapping, got {value!r}")
            kwargs[key] = _build(hints[key], value, full + ".")
        else:
            kwargs[key] = _coerce(full, value, hints[key])
    return cls(**kwargs)


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> TrainConfig:
    """Read a YAML config (with its `base:` chain), apply `key=value` overrides, validate."""
    data = _read_yaml(path) if path else {}
    data = _merge(data, parse_overrides(overrides or []))
    cfg = _build(TrainConfig, data)
    validate(cfg)
    return cfg


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------
def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


def validate(cfg: TrainConfig, world_size: Optional[int] = None, cuda_available: Optional[bool] = None) -> None:
    """Check every value and the relations between them. `world_size` adds the parallel-layout checks."""
    m = cfg.model
    for key in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "joint_attention_dim",
                "in_channels", "out_channels", "patch_size"):
        _require(getattr(m, key) >= 1, f"model.{key}", f"must be >= 1, got {getattr(m, key)}")
    _require(m.layernorm_epsilon > 0, "model.layernorm_epsilon", "must be > 0")
    _require(m.hidden_size % m.num_attention_heads == 0, "model.hidden_size",
             f"{m.hidden_size} is not divisible by model.num_attention_heads={m.num_attention_heads}")
    _require(len(m.axes_dims_rope) == 3 and all(isinstance(a, int) and a > 0 and a % 2 == 0
                                                 for a in m.axes_dims_rope),
             "model.axes_dims_rope", f"must be three positive even integers (frame, height, width), "
             f"got {m.axes_dims_rope}")
    _require(sum(m.axes_dims_rope) == cfg.head_dim, "model.axes_dims_rope",
             f"must sum to the head dim hidden_size/num_attention_heads = {cfg.head_dim}, "
             f"got {sum(m.axes_dims_rope)}")
    _require(m.in_channels == m.out_channels * m.patch_size ** 2, "model.in_channels",
             f"must equal out_channels*patch_size^2 = {m.out_channels * m.patch_size ** 2} (2x2-packed latents)")

    tp = cfg.tensor_model_parallel_size
    _require(tp >= 1, "tensor_model_parallel_size", f"must be >= 1, got {tp}")
    _require(m.num_attention_heads % tp == 0, "tensor_model_parallel_size",
             f"{tp} does not divide model.num_attention_heads={m.num_attention_heads} (heads are split across TP ranks)")
    _require(m.ffn_hidden_size % tp == 0, "tensor_model_parallel_size",
             f"{tp} does not divide model.ffn_hidden_size={m.ffn_hidden_size}")

    for key, choices in _CHOICES.items():
        _require(getattr(cfg, key) in choices, key, f"must be one of {list(choices)}, got {getattr(cfg, key)!r}")

    g, meth, n = cfg.recompute_granularity, cfg.recompute_method, cfg.recompute_num_layers
    if g == "full":
        _require(meth is not None, "recompute_method", "must be 'uniform' or 'block' when recompute_granularity=full")
        _require(n is not None and 1 <= n <= m.num_layers, "recompute_num_layers",
                 f"must be in [1, model.num_layers={m.num_layers}] when recompute_granularity=full, got {n}")
    else:
        _require(meth is None, "recompute_method", f"only applies to recompute_granularity=full (it is {g!r})")
        _require(n is None, "recompute_num_layers", f"only applies to recompute_granularity=full (it is {g!r})")
    if cfg.recompute_modules is not None:
        from megatron_qwen_image.model.config import SUPPORTED_RECOMPUTE_MODULES

        _require(g == "selective", "recompute_modules", f"only applies to recompute_granularity=selective (it is {g!r})")
        bad = [x for x in cfg.recompute_modules if x not in SUPPORTED_RECOMPUTE_MODULES]
        _require(not bad and len(cfg.recompute_modules) > 0, "recompute_modules",
                 f"{bad or 'empty list'}: choose from {list(SUPPORTED_RECOMPUTE_MODULES)}")

    _require(cfg.micro_batch_size >= 1, "micro_batch_size", f"must be >= 1, got {cfg.micro_batch_size}")
    _require(cfg.global_batch_size % cfg.micro_batch_size == 0, "global_batch_size",
             f"{cfg.global_batch_size} is not a multiple of micro_batch_size={cfg.micro_batch_size}")
    _require(cfg.train_iters >= 1, "train_iters", f"must be >= 1, got {cfg.train_iters}")

    _require(cfg.lr > 0, "lr", f"must be > 0, got {cfg.lr}")
    _require(0 <= cfg.min_lr <= cfg.lr, "min_lr", f"must be in [0, lr={cfg.lr}], got {cfg.min_lr}")
    _require(0 <= cfg.lr_warmup_init <= cfg.lr, "lr_warmup_init", f"must be in [0, lr={cfg.lr}]")
    decay = cfg.lr_decay_iters if cfg.lr_decay_iters is not None else cfg.train_iters
    _require(decay >= 1, "lr_decay_iters", f"must be >= 1, got {decay}")
    _require(0 <= cfg.lr_warmup_iters < decay, "lr_warmup_iters",
             f"must be in [0, lr_decay_iters={decay}) (megatron's OptimizerParamScheduler), got {cfg.lr_warmup_iters}")
    if cfg.lr_decay_style == "WSD":
        _require(cfg.lr_wsd_decay_iters is not None and 1 <= cfg.lr_wsd_decay_iters <= decay,
                 "lr_wsd_decay_iters", f"must be in [1, {decay}] with lr_decay_style=WSD")
    _require(cfg.weight_decay >= 0, "weight_decay", "must be >= 0")
    for key in ("adam_beta1", "adam_beta2"):
        _require(0 <= getattr(cfg, key) < 1, key, f"must be in [0, 1), got {getattr(cfg, key)}")
    _require(cfg.adam_eps > 0, "adam_eps", "must be > 0")
    _require(cfg.clip_grad >= 0, "clip_grad", "must be >= 0 (0 disables clipping)")
    _require(cfg.seed >= 0, "seed", "must be >= 0")

    _require(cfg.logit_std > 0, "logit_std", f"must be > 0, got {cfg.logit_std}")
    _require(cfg.shift > 0, "shift", f"must be > 0, got {cfg.shift}")
    _require(cfg.max_image_seq_len > cfg.base_image_seq_len >= 1, "max_image_seq_len",
             f"must be > base_image_seq_len={cfg.base_image_seq_len}")

    _require(cfg.cache_prefetch >= 0, "cache_prefetch", "must be >= 0")
    res = cfg.synthetic_resolutions
    factor = 8 * m.patch_size  # VAE factor x patch size
    _require(len(res) >= 1 and all(isinstance(r, list) and len(r) == 2 and all(isinstance(x, int) and x > 0
                                                                               and x % factor == 0 for x in r)
                                   for r in res),
             "synthetic_resolutions", f"must be a list of [height, width] pixel sizes divisible by {factor}, got {res}")
    tl = cfg.synthetic_text_len
    _require(len(tl) == 2 and all(isinstance(x, int) for x in tl) and 1 <= tl[0] <= tl[1], "synthetic_text_len",
             f"must be [min, max] with 1 <= min <= max, got {tl}")
    _require(cfg.synthetic_num_classes >= 1, "synthetic_num_classes", "must be >= 1")

    _require(cfg.log_interval >= 1, "log_interval", "must be >= 1")
    if cfg.keep_last is not None:
        _require(cfg.keep_last >= 1, "keep_last", f"must be >= 1, got {cfg.keep_last}")
    if cfg.save_interval is not None:
        _require(cfg.save_interval >= 1, "save_interval", "must be >= 1")
        _require(cfg.save is not None, "save_interval", "needs save=DIR")
    if cfg.keep_last is not None:
        _require(cfg.keep_last >= 1, "keep_last", f"must be >= 1, got {cfg.keep_last}")

    if cuda_available is not None:
        _require(not (cfg.bf16 and not cuda_available), "bf16",
                 "bf16=true needs a GPU; CPU runs are fp32 (set bf16=null for automatic)")

    if world_size is not None:  # checks that only matter when training starts
        if cfg.data == "cache":
            _require(bool(cfg.cache_dir), "cache_dir", "is required with data=cache (--cache-dir DIR)")
            from megatron_qwen_image.cache.format import CacheFormatError, read_cache_file

            try:  # the cache's own check (marker present, format version readable), before any rank starts
                read_cache_file(cfg.cache_dir)
            except CacheFormatError as e:
                raise ConfigError("cache_dir", f"{e}; fill it with `python -m producer`" + (
                    ", or, to stream while producers start, create it first with "
                    "`python -m megatron_qwen_image.cache init DIR`" if cfg.cache_streaming else "")) from None
        _require(world_size % tp == 0, "tensor_model_parallel_size",
                 f"world size {world_size} is not divisible by tensor_model_parallel_size={tp}")
        dp = world_size // tp
        _require(cfg.global_batch_size % (cfg.micro_batch_size * dp) == 0, "global_batch_size",
                 f"{cfg.global_batch_size} is not a multiple of micro_batch_size x data-parallel size "
                 f"= {cfg.micro_batch_size} x {dp}")


def resolve_precision(cfg: TrainConfig, cuda_available: bool) -> tuple[bool, bool]:
    """(bf16, use_cpu_initialization) with the automatic (null) values filled in."""
    bf16 = cuda_available if cfg.bf16 is None else cfg.bf16
    cpu_init = (not cuda_available) if cfg.use_cpu_initialization is None else cfg.use_cpu_initialization
    return bf16, cpu_init

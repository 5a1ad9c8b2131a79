"""Producer configuration: YAML (configs/producer/*.yaml) -> validated dataclasses.

Every bad value is refused at start-up with a `ConfigError` naming the key (`filters.min_side: ...`),
never deep in an actor. Command-line `--set section.key=value` overrides use the same checks.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field

import yaml

from producer.sources import SourceOptions


class _Loader(yaml.SafeLoader):
    """YAML without YAML 1.1's base-60 numbers, so `cpu_actors: 1:4` stays the string "1:4", not 64."""


_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0x[0-9a-fA-F_]+|[-+]?(?:0|[1-9][0-9_]*))$"),
    list("-+0123456789"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)"
               r"|\.[0-9_]+(?:[eE][-+][0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def yaml_load(text):
    return yaml.load(text, Loader=_Loader)


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key."""


@dataclass
class FilterConfig:
    """Thresholds of the rule-based filters (report §3.2). `null` disables a check."""

    # files
    min_file_bytes: int | None = 1024
    max_file_bytes: int | None = 50 * 1024 * 1024
    max_pixels: int = 89_478_485  # decompression-bomb guard, checked from the header before decoding
    # resolution
    min_side: int | None = 256
    max_aspect: float | None = 3.0
    # duplicates (within a work unit: deterministic and safe to redo; see docs/producer.md)
    dedup_exact: bool = True
    dedup_near_max_distance: int | None = 4  # perceptual-hash Hamming distance (64-bit pHash)
    # image quality, measured on a grey thumbnail of at most `stats_side` px
    stats_side: int = 256
    min_clarity: float | None = 40.0  # variance of the Laplacian (blur)
    min_luma: float | None = 0.05  # mean brightness in [0, 1]
    max_luma: float | None = 0.97
    max_saturation: float | None = 0.9  # mean HSV saturation in [0, 1]
    min_entropy: float | None = 1.0  # grey-histogram entropy in bits (flat, information-poor images)
    max_texture: float | None = 0.3  # fraction of strong-gradient pixels (over-complex textures, noise)
    texture_gradient: float = 48.0  # what counts as a strong gradient (grey levels)
    # captions
    min_caption_tokens: int | None = 1
    max_caption_tokens: int | None = 1024  # the MLLM tokenizer's count; the text encoder keeps 1024 tokens
    caption_boilerplate: list = field(default_factory=lambda: [
        r"^(image|img|photo|picture|untitled|no caption|caption|dsc|screenshot)[\s_\-#]*\d*$",
        r"^\S+\.(jpe?g|png|webp|gif|bmp|tiff?)$",
        r"(?i)\b(click here|stock photo|royalty[- ]free|all rights reserved)\b",
        r"^(null|none|nan|n/a|undefined)$",
    ])


@dataclass
class EncoderConfig:
    dir: str | None = None  # local HF-layout directory (a Qwen-Image repo or make_tiny's output)
    device: str = "auto"  # auto: cuda when the actor was given a GPU, else cpu
    dtype: str = "auto"  # auto: bf16 on cuda, fp32 on cpu; or fp32 | bf16 | fp16
    text_batch_size: int = 8
    vae_batch_size: int = 4
    vae_sample_mode: str = "mode"  # mode (deterministic) | sample (seeded per sample key)
    seed: int = 0


@dataclass
class PoolSize:
    """A fixed size (min == max) or an autoscaling range."""

    min: int = 1
    max: int = 1

    @property
    def fixed(self) -> bool:
        return self.min == self.max


@dataclass
class PoolConfig:
    cpu_actors: PoolSize = field(default_factory=lambda: PoolSize(2, 2))
    encoder_actors: PoolSize = field(default_factory=lambda: PoolSize(1, 1))
    cpu_actor_num_cpus: float = 1.0
    encoder_num_cpus: float = 1.0
    encoder_num_gpus: float | str = "auto"  # auto: 1 when the cluster has GPUs, else 0
    threads_per_actor: int = 1  # torch / BLAS threads inside each actor
    cpu_shards_per_actor: int = 2  # shards given to a CPU actor at once (the 2nd queues: no idle gap between)
    chunk_size: int = 16  # samples per message from a CPU actor to an encoder actor
    max_chunks_in_flight: int = 4  # per shard: produced but not yet encoded (bounds memory)
    max_restarts: int = 3  # Ray restarts of a dead actor
    max_shard_attempts: int = 3  # a shard whose actor died is redone up to this many times
    scale_interval_s: float = 5.0  # autoscaling decisions at most this often


@dataclass
class ModelFilterSpec:
    type: str = "clip_score"  # a registered name or "package.module:Class"
    options: dict = field(default_factory=dict)


@dataclass
class ProducerConfig:
    base_resolution: int = 256  # cache bucket family: 256 | 640 | 1328 (report's stages)
    latent_dtype: str = "bf16"
    progress_interval_s: float = 5.0
    filters: FilterConfig = field(default_factory=FilterConfig)
    model_filters: list = field(default_factory=list)  # of ModelFilterSpec
    encoders: EncoderConfig = field(default_factory=EncoderConfig)
    pools: PoolConfig = field(default_factory=PoolConfig)
    sources: SourceOptions = field(default_factory=SourceOptions)


_POOL_RANGE = re.compile(r"^\d+:\d+$")

_CHOICES = {
    "base_resolution": (256, 640, 1328),
    "latent_dtype": ("bf16", "fp16", "fp32"),
    "encoders.device": ("auto", "cpu", "cuda"),
    "encoders.dtype": ("auto", "fp32", "bf16", "fp16"),
    "encoders.vae_sample_mode": ("mode", "sample"),
}


def _coerce(value, tp, key: str):
    """Check/convert one value against a dataclass field type; raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        if tp is PoolSize:
            return _pool_size(value, key)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if tp in (list, dict) or origin in (list, dict):
        if not isinstance(value, origin or tp):
            raise ConfigError(f"{key}: expected a {(origin or tp).__name__}, got {value!r}")
        return value
    return value


def _pool_size(value, key: str) -> PoolSize:
    """`4` -> fixed 4; `{min: 1, max: 8}` or "1:8" -> autoscale between 1 and 8."""
    if isinstance(value, PoolSize):
        lo, hi = value.min, value.max
    elif isinstance(value, int) and not isinstance(value, bool):
        lo = hi = value
    elif isinstance(value, str) and value.strip().isdigit():  # "4" from the command line (--cpu-actors 4)
        lo = hi = int(value)
    elif isinstance(value, str) and _POOL_RANGE.match(value):
        lo, hi = (int(x) for x in value.split(":"))
    elif isinstance(value, dict) and set(value) <= {"min", "max"} and "max" in value:
        lo, hi = value.get("min", 1), value["max"]
    else:
        raise ConfigError(f"{key}: expected an actor count (4), 'MIN:MAX' or {{min: MIN, max: MAX}}, got {value!r}")
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in (lo, hi)) or lo < 1 or hi < lo:
        raise ConfigError(f"{key}: need 1 <= min <= max, got min={lo!r} max={hi!r}")
    return PoolSize(lo, hi)


def build(cls, data: dict, prefix: str = ""):
    """Instantiate dataclass `cls` from a mapping, refusing unknown keys and bad types by name."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for k, v in (data or {}).items():
        key = f"{prefix}.{k}" if prefix else k
        if k not in fields:
            raise ConfigError(f"{key}: unknown key (known: {', '.join(sorted(fields))})")
        kwargs[k] = _coerce(v, hints[k], key)
    obj = cls(**kwargs)
    return obj


def _set_dotted(d: dict, dotted: str, value):
    parts = dotted.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ConfigError(f"{dotted}: {p} is not a section")
    d[parts[-1]] = value


def load_config(path: str | None = None, overrides: list[str] | None = None, extra: dict | None = None) -> ProducerConfig:
    """Read YAML, apply `key.sub=value` overrides (values parsed as YAML) and `extra` (dotted keys), validate."""
    data: dict = {}
    if path:
        with open(path) as f:
            data = yaml_load(f) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    for ov in overrides or []:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r}: expected key.sub=value")
        k, v = ov.split("=", 1)
        _set_dotted(data, k.strip(), yaml_load(v))
    for k, v in (extra or {}).items():
        if v is not None:
            _set_dotted(data, k, v)
    cfg = build(ProducerConfig, data)
    cfg.model_filters = [
        build(ModelFilterSpec, m, f"model_filters[{i}]") if isinstance(m, dict) else _bad_model_filter(i, m)
        for i, m in enumerate(cfg.model_filters)
    ]
    validate(cfg)
    return cfg


def _bad_model_filter(i, m):
    raise ConfigError(f"model_filters[{i}]: expected a mapping with 'type' and 'options', got {m!r}")


def validate(cfg: ProducerConfig) -> None:
    """Range checks that types alone do not express."""
    for key, allowed in _CHOICES.items():
        obj = cfg
        for part in key.split("."):
            obj = getattr(obj, part)
        if obj not in allowed:
            raise ConfigError(f"{key}: must be one of {list(allowed)}, got {obj!r}")
    f = cfg.filters
    positive = {
        "filters.max_pixels": f.max_pixels, "filters.stats_side": f.stats_side, "filters.min_side": f.min_side,
        "pools.chunk_size": cfg.pools.chunk_size, "pools.max_chunks_in_flight": cfg.pools.max_chunks_in_flight,
        "pools.max_shard_attempts": cfg.pools.max_shard_attempts, "pools.threads_per_actor": cfg.pools.threads_per_actor,
        "pools.cpu_shards_per_actor": cfg.pools.cpu_shards_per_actor,
        "encoders.text_batch_size": cfg.encoders.text_batch_size, "encoders.vae_batch_size": cfg.encoders.vae_batch_size,
        "sources.folder_shard_size": cfg.sources.folder_shard_size, "sources.max_member_bytes": cfg.sources.max_member_bytes,
        "sources.parquet_batch_rows": cfg.sources.parquet_batch_rows,
        "pools.cpu_actor_num_cpus": cfg.pools.cpu_actor_num_cpus, "pools.encoder_num_cpus": cfg.pools.encoder_num_cpus,
    }
    for key, v in positive.items():
        if v is not None and v <= 0:
            raise ConfigError(f"{key}: must be > 0, got {v!r}")
    if f.max_aspect is not None and f.max_aspect < 1:
        raise ConfigError(f"filters.max_aspect: must be >= 1 (long side / short side), got {f.max_aspect!r}")
    if f.dedup_near_max_distance is not None and not 0 <= f.dedup_near_max_distance < 32:
        raise ConfigError(f"filters.dedup_near_max_distance: must be in 0..31 bits, got {f.dedup_near_max_distance!r}")
    for lo_key, hi_key in (("min_luma", "max_luma"), ("min_file_bytes", "max_file_bytes"),
                           ("min_caption_tokens", "max_caption_tokens")):
        lo, hi = getattr(f, lo_key), getattr(f, hi_key)
        if lo is not None and hi is not None and lo > hi:
            raise ConfigError(f"filters.{lo_key} ({lo}) is larger than filters.{hi_key} ({hi})")
    for key in ("min_luma", "max_luma", "max_saturation", "max_texture"):
        v = getattr(f, key)
        if v is not None and not 0 <= v <= 1:
            raise ConfigError(f"filters.{key}: must be in [0, 1], got {v!r}")
    if f.max_caption_tokens is not None and f.max_caption_tokens > 1024:
        raise ConfigError(f"filters.max_caption_tokens: the text encoder keeps at most 1024 tokens, got {f.max_caption_tokens}")
    for i, pat in enumerate(f.caption_boilerplate):
        try:
            re.compile(pat)
        except (re.error, TypeError) as e:
            raise ConfigError(f"filters.caption_boilerplate[{i}]: not a regular expression ({e}): {pat!r}")
    g = cfg.pools.encoder_num_gpus
    if isinstance(g, str) and g != "auto" or (not isinstance(g, str) and g < 0):
        raise ConfigError(f"pools.encoder_num_gpus: expected 'auto' or a number >= 0, got {g!r}")

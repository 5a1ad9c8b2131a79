"""Producer configuration (configs/producer/*.yaml) on the shared config layer (megatron_qwen_image.config):
YAML with `base:`, `key=value` overrides (`filters.min_side=384`), errors naming the full key.

Every bad value is refused at start-up with a `ConfigError` naming the key (`filters.min_side`), never
deep in an actor. docs/configuration.md lists every key (generated from these dataclasses).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from megatron_qwen_image import config as layer
from megatron_qwen_image.config import ConfigError, option, require
from producer.categories import CategoryConfig, validate_categories
from producer.sources import SourceOptions

@dataclass
class FilterConfig:
    """Thresholds of the rule-based filters (report §3.2). `null` disables a check."""

    min_file_bytes: int | None = option(1024, "smallest image file accepted")
    max_file_bytes: int | None = option(50 * 1024 * 1024, "largest image file accepted")
    max_pixels: int = option(89_478_485, "decompression-bomb guard, checked from the header before decoding")
    min_side: int | None = option(256, "shortest image side accepted (pixels)")
    max_aspect: float | None = option(3.0, "largest long side / short side")
    dedup_exact: bool = option(True, "drop byte-identical images within an input shard")
    dedup_near_max_distance: int | None = option(4, "drop images whose 64-bit pHash is within this Hamming "
                                                 "distance of a kept one, within an input shard")
    stats_side: int = option(256, "side of the grey thumbnail the quality measures use")
    min_clarity: float | None = option(40.0, "variance of the Laplacian (blur)")
    min_luma: float | None = option(0.05, "mean brightness in [0, 1]")
    max_luma: float | None = option(0.97, "mean brightness in [0, 1]")
    max_saturation: float | None = option(0.9, "mean HSV saturation in [0, 1]")
    min_entropy: float | None = option(1.0, "grey-histogram entropy in bits (flat, information-poor images)")
    max_texture: float | None = option(0.3, "fraction of strong-gradient pixels (over-complex textures, noise)")
    texture_gradient: float = option(48.0, "what counts as a strong gradient (grey levels)")
    min_caption_tokens: int | None = option(1, "fewest caption tokens (the MLLM tokenizer's count)")
    max_caption_tokens: int | None = option(1024, "most caption tokens (the text encoder keeps 1024)")
    caption_boilerplate: list[str] = option([
        r"^(image|img|photo|picture|untitled|no caption|caption|dsc|screenshot)[\s_\-#]*\d*$",
        r"^\S+\.(jpe?g|png|webp|gif|bmp|tiff?)$",
        r"(?i)\b(click here|stock photo|royalty[- ]free|all rights reserved)\b",
        r"^(null|none|nan|n/a|undefined)$",
    ], "regular expressions of captions that say nothing (boilerplate)")


@dataclass
class EncoderConfig:
    """The Qwen2.5-VL text encoder and the Qwen-Image VAE, loaded from a local directory."""

    dir: str | None = option(None, "local HF-layout directory: a Qwen-Image repo or make_tiny's output (--encoders)")
    device: str = option("auto", "auto: cuda when the actor was given a GPU, else cpu", choices=("auto", "cpu", "cuda"))
    dtype: str = option("auto", "auto: bf16 on cuda, fp32 on cpu", choices=("auto", "fp32", "bf16", "fp16"))
    text_batch_size: int = option(8, "captions per Qwen2.5-VL forward")
    vae_batch_size: int = option(4, "images per VAE forward")
    vae_sample_mode: str = option("mode", "mode (deterministic) or sample (seeded per sample key)",
                                  choices=("mode", "sample"))
    seed: int = option(0, "seed of vae_sample_mode=sample")


@dataclass
class EditConfig:
    """Edit samples (TI2I: source image, instruction, target image), found by their inputs (producer/layouts.py)."""

    template: str = option("edit", "how the instruction is encoded with its source image(s), as diffusers' "
                           "QwenImageEditPipeline (edit) or QwenImageEditPlusPipeline (edit_plus: several sources, "
                           "'Picture N:' prompts, 384² vision-tower images)", choices=("edit", "edit_plus"))
    condition_area: int = option(1024 * 1024, "pixel area of a source image as the VAE encodes it (aspect kept, "
                                 "sides multiples of 32): the edit pipelines' 1024²")


_POOL_RANGE = re.compile(r"^\d+:\d+$")


@dataclass
class PoolSize:
    """A fixed size (min == max) or an autoscaling range."""

    min: int = option(1, "fewest actors")
    max: int = option(1, "most actors")

    @property
    def fixed(self) -> bool:
        return self.min == self.max

    @classmethod
    def from_config_value(cls, value) -> "PoolSize":
        """`4` (or "4", as from --cpu-actors 4) -> fixed 4; "1:8" or {min: 1, max: 8} -> autoscale between 1
        and 8 (a mapping replaces the whole size; min defaults to 1)."""
        if isinstance(value, PoolSize):
            return value
        if isinstance(value, dict) and set(value) <= {"min", "max"} and "max" in value:
            lo, hi = value.get("min", 1), value["max"]
            if not all(isinstance(x, int) and not isinstance(x, bool) for x in (lo, hi)):
                raise ValueError(f"min and max must be integers, got {value!r}")
        elif isinstance(value, int) and not isinstance(value, bool):
            lo = hi = value
        elif isinstance(value, str) and value.strip().isdigit():
            lo = hi = int(value)
        elif isinstance(value, str) and _POOL_RANGE.match(value.strip()):
            lo, hi = (int(x) for x in value.split(":"))
        else:
            raise ValueError(f"expected an actor count (4), 'MIN:MAX' or {{min: MIN, max: MAX}}, got {value!r}")
        return cls(lo, hi)


@dataclass
class PoolConfig:
    """The two Ray actor pools, each a fixed size (4) or an autoscaling range ("1:8" or {min: 1, max: 8})."""

    cpu_actors: PoolSize = field(default_factory=lambda: PoolSize(2, 2))
    encoder_actors: PoolSize = field(default_factory=lambda: PoolSize(1, 1))
    cpu_actor_num_cpus: float = option(1.0, "Ray CPUs each CPU (decode + filter) actor reserves")
    encoder_num_cpus: float = option(1.0, "Ray CPUs each encoder actor reserves")
    encoder_num_gpus: int | float | str = option("auto", "GPUs per encoder actor (auto: 1 when the cluster has GPUs, else 0)")
    threads_per_actor: int = option(1, "torch / BLAS threads inside each actor")
    cpu_shards_per_actor: int = option(2, "shards given to a CPU actor at once (the 2nd queues: no idle gap between)")
    chunk_size: int = option(16, "samples per message from a CPU actor to an encoder actor")
    max_chunks_in_flight: int = option(4, "per shard: chunks produced but not yet encoded (bounds memory)")
    max_restarts: int = option(3, "Ray restarts of a dead actor")
    max_shard_attempts: int = option(3, "a shard whose actor died is redone up to this many times")
    max_actor_start_failures: int = option(3, "actors of one pool that die before they are ready, in a row, before "
                                           "the run stops with the last one's error (a wrong encoders dir, no memory)")
    scale_interval_s: float = option(5.0, "autoscaling decisions at most this often")


@dataclass
class ModelFilterSpec:
    """One model-based filter (e.g. CLIP score) and its options."""

    type: str = option("clip_score", "a registered model filter or 'package.module:Class'")
    options: dict[str, Any] = option({}, "the filter's keyword arguments")


@dataclass
class ProducerConfig:
    base_resolution: int = option(256, "cache bucket family (the report's stages)", choices=(256, 640, 1328))
    latent_dtype: str = option("bf16", "dtype of the stored latents", choices=("bf16", "fp16", "fp32"))
    progress_interval_s: float = option(5.0, "seconds between progress lines")
    filters: FilterConfig = field(default_factory=FilterConfig)
    model_filters: list[ModelFilterSpec] = option([], "model-based filters run before encoding, in order")
    encoders: EncoderConfig = field(default_factory=EncoderConfig)
    pools: PoolConfig = field(default_factory=PoolConfig)
    sources: SourceOptions = field(default_factory=SourceOptions)
    categories: CategoryConfig = field(default_factory=CategoryConfig)
    edit: EditConfig = field(default_factory=EditConfig)


def load_config(path: str | None = None, overrides: list[str] | None = None, flags: dict | None = None) -> ProducerConfig:
    """Read YAML, apply `key=value` overrides and flag values ({dotted key: value}; None = not given), validate."""
    cfg = layer.load(ProducerConfig, path, overrides, flags)
    validate(cfg)
    return cfg


def validate(cfg: ProducerConfig) -> None:
    """Range and cross-field checks that types alone do not express."""
    f, p = cfg.filters, cfg.pools
    for key in ("cpu_actors", "encoder_actors"):
        size = getattr(p, key)
        require(1 <= size.min <= size.max, f"pools.{key}", f"need 1 <= min <= max, got min={size.min} max={size.max}")
    positive = {
        "filters.max_pixels": f.max_pixels, "filters.stats_side": f.stats_side, "filters.min_side": f.min_side,
        "pools.chunk_size": p.chunk_size, "pools.max_chunks_in_flight": p.max_chunks_in_flight,
        "pools.max_shard_attempts": p.max_shard_attempts, "pools.threads_per_actor": p.threads_per_actor,
        "pools.cpu_shards_per_actor": p.cpu_shards_per_actor,
        "pools.max_actor_start_failures": p.max_actor_start_failures,
        "encoders.text_batch_size": cfg.encoders.text_batch_size, "encoders.vae_batch_size": cfg.encoders.vae_batch_size,
        "sources.folder_shard_size": cfg.sources.folder_shard_size, "sources.max_member_bytes": cfg.sources.max_member_bytes,
        "sources.parquet_batch_rows": cfg.sources.parquet_batch_rows,
        "pools.cpu_actor_num_cpus": p.cpu_actor_num_cpus, "pools.encoder_num_cpus": p.encoder_num_cpus,
    }
    for key, v in positive.items():
        require(v is None or v > 0, key, f"must be > 0, got {v!r}")
    require(cfg.edit.condition_area >= 32 * 32, "edit.condition_area",
            f"must be at least 32² = 1024 pixels, got {cfg.edit.condition_area}")
    require(f.max_aspect is None or f.max_aspect >= 1, "filters.max_aspect",
            f"must be >= 1 (long side / short side), got {f.max_aspect!r}")
    require(f.dedup_near_max_distance is None or 0 <= f.dedup_near_max_distance < 32, "filters.dedup_near_max_distance",
            f"must be in 0..31 bits, got {f.dedup_near_max_distance!r}")
    for lo_key, hi_key in (("min_luma", "max_luma"), ("min_file_bytes", "max_file_bytes"),
                           ("min_caption_tokens", "max_caption_tokens")):
        lo, hi = getattr(f, lo_key), getattr(f, hi_key)
        require(lo is None or hi is None or lo <= hi, f"filters.{lo_key}", f"{lo} is larger than filters.{hi_key} ({hi})")
    for key in ("min_luma", "max_luma", "max_saturation", "max_texture"):
        v = getattr(f, key)
        require(v is None or 0 <= v <= 1, f"filters.{key}", f"must be in [0, 1], got {v!r}")
    require(f.max_caption_tokens is None or f.max_caption_tokens <= 1024, "filters.max_caption_tokens",
            f"the text encoder keeps at most 1024 tokens, got {f.max_caption_tokens}")
    for i, pat in enumerate(f.caption_boilerplate):
        try:
            re.compile(pat)
        except (re.error, TypeError) as e:
            raise ConfigError(f"filters.caption_boilerplate[{i}]", f"not a regular expression ({e}): {pat!r}") from None
    validate_categories(cfg.categories)
    g = p.encoder_num_gpus
    require(g == "auto" or (not isinstance(g, str) and g >= 0), "pools.encoder_num_gpus",
            f"expected 'auto' or a number >= 0, got {g!r}")

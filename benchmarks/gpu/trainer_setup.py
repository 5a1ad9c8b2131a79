"""The trainer's own configuration and process group, as the benchmark's phases use them.

Configs are the trainer's (consumer.config.load_config on configs/model/*.yaml with key=value overrides), so
the benchmark measures the model the trainer builds. The process group is the trainer's too
(megatron_qwen_image.parallel.init_parallel): a world of one process (NCCL on a GPU, gloo and megatron-core's
CPU emulation on CPU), TP=1; megatron's parallel layers and RNG tracker need it even for a bare block.
"""
from __future__ import annotations

import dataclasses

from consumer.config import ParallelismSection, TrainConfig, load_config
from megatron_qwen_image.parallel import ParallelContext, init_parallel

from benchmarks.gpu.settings import NO_RECOMPUTE, RecomputeMode, Settings


def _single_gpu_overrides() -> list[str]:
    """Sequence parallelism needs TP > 1; the 20B config turns it on for its TP=4 (where the key exists)."""
    fields = {f.name for f in dataclasses.fields(ParallelismSection)}
    return ["parallelism.sequence_parallel=false"] if "sequence_parallel" in fields else []


def bench_config(settings: Settings, recompute: RecomputeMode = NO_RECOMPUTE,
                 extra: list[str] | None = None) -> TrainConfig:
    """settings.model_yaml with settings.num_layers blocks, TP=1, this recompute mode, precision as the device."""
    return load_config(settings.model_yaml, [*settings.model_overrides(recompute), *_single_gpu_overrides(),
                                             f"precision.bf16={'true' if settings.bf16 else 'false'}",
                                             f"train.seed={settings.seed}", *(extra or [])])


def ensure_world(settings: Settings) -> ParallelContext:
    """The one-process world (idempotent: the smoke phase's train() may already have started it)."""
    return init_parallel(1, settings.seed)

"""The planner's memory predictions, to set beside what the GPU measures.

State (parameters, gradients, optimizer) comes from consumer.planner.plan_memory at TP=1, DP=1. Activations
come from consumer.activation_plan.activation_plan when that module exists; until then they are reported as
"planned activations: not available" and the measured figures stand alone.
"""
from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

from consumer.config import TrainConfig
from consumer.planner import plan_memory

NOT_AVAILABLE = "planned activations: not available"


@dataclass(frozen=True)
class PlannedState:
    """Per-rank bytes of parameters, gradients and optimizer state (no activations)."""
    params: int
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: float
    total_bytes: float


@dataclass(frozen=True)
class PlannedActivations:
    """consumer.activation_plan's prediction, or why there is none (`note`)."""
    per_layer_bytes: Optional[float] = None
    layers_bytes: Optional[float] = None
    outside_bytes: Optional[float] = None
    recompute_bytes: Optional[float] = None   # full recompute: a unit's activations rebuilt during backward
    total_bytes: Optional[float] = None
    note: Optional[str] = None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def planned_state(cfg: TrainConfig, bf16: bool) -> PlannedState:
    p = plan_memory(cfg, dp=1, tp=1, bf16=bf16)
    return PlannedState(params=p.params_per_rank, param_bytes=p.param_bytes, grad_bytes=p.grad_bytes,
                        optimizer_bytes=p.optimizer_bytes, total_bytes=p.total_bytes)


def planned_activations(cfg: TrainConfig, resolution: tuple[int, int], micro_batch: int, text_len: int,
                        bf16: bool, text_lengths: Optional[Sequence[int]] = None) -> PlannedActivations:
    """The activation plan for one micro-batch (recompute as set in `cfg`), at TP=1 without sequence
    parallelism; `text_lengths`: the valid text tokens per sample of a padded batch, passed on where the
    planner takes them. Imported here, not at the top: the planner of activations is optional."""
    try:
        from consumer.activation_plan import activation_plan
    except ModuleNotFoundError as e:
        if e.name in ("consumer.activation_plan",):
            return PlannedActivations(note=NOT_AVAILABLE)
        raise
    height, width = resolution
    extra = {}
    if text_lengths is not None and "text_lengths" in inspect.signature(activation_plan).parameters:
        extra["text_lengths"] = tuple(text_lengths)
    try:
        plan = activation_plan(cfg, height, width, micro_batch, text_len, tp=1, sequence_parallel=False, bf16=bf16,
                               **extra)
    except Exception as e:  # an unfinished planner must not cost the measured figures
        return PlannedActivations(note=f"{NOT_AVAILABLE} ({type(e).__name__}: {e})")
    return PlannedActivations(per_layer_bytes=plan.per_layer_bytes, layers_bytes=plan.layers_bytes,
                              outside_bytes=plan.outside_bytes, recompute_bytes=getattr(plan, "recompute_bytes", None),
                              total_bytes=plan.total_bytes)

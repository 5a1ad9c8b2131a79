"""The producer's autoscaling rule, as a pure function of what the driver sees at one moment.

The driver (`producer.pipeline.ProducerRun`) takes a snapshot of its queue, its open shards and its two
actor pools, asks `plan_scaling` what to do, and carries that out. Keeping the rule free of Ray and of
the clock means it can be checked state by state; whether a real run ever *reaches* a given state
depends on how fast its actors are, so end-to-end runs assert only what holds at any speed (bounds).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from producer.config import PoolSize


@dataclass(frozen=True)
class OpenShard:
    """One shard being processed: which actors hold it and where its chunks are."""

    cpu: str  # id of the CPU actor producing its chunks
    encoder: str  # id of the encoder actor its work unit is pinned to
    chunks_at_encoder: int  # chunks sent to the encoder, not yet encoded
    generator_done: bool  # the CPU actor has produced all its chunks


@dataclass(frozen=True)
class PoolState:
    """One actor pool: the ids of usable actors, how many are starting or restarting, its size range."""

    ready: tuple[str, ...]
    starting: int  # new actors whose constructor is still running
    restarting: int  # actors out of service after a failed call, until a ping shows them back
    size: PoolSize

    @property
    def total(self) -> int:
        return len(self.ready) + self.starting + self.restarting


@dataclass(frozen=True)
class ScalePlan:
    """What to do now: grow a pool by one actor, and which idle actors (by id) to retire."""

    grow_cpu: bool = False
    grow_encoder: bool = False
    retire_cpu: tuple[str, ...] = ()
    retire_encoder: tuple[str, ...] = ()
    reasons: tuple[str, ...] = field(default=(), compare=False)  # one log line per action


def plan_scaling(queued: int, shards: list[OpenShard], cpu: PoolState, encoder: PoolState,
                 max_chunks_in_flight: int) -> ScalePlan:
    """Grow the pool that is the bottleneck, by one actor at a time (never while one of it is starting);
    retire idle actors above `min` once no shard is queued.

    CPU-bound: shards wait, every CPU actor is busy, and some encoder has no chunk to work on.
    Encoder-bound: every open shard has its full `max_chunks_in_flight` waiting at its encoder (or has
    no more to send), and there are more shards (queued or open) than encoders to spread them over.
    """
    busy_cpu = {s.cpu for s in shards}
    free_cpu = [a for a in cpu.ready if a not in busy_cpu]
    fed = {s.encoder for s in shards if s.chunks_at_encoder}
    idle_encoders = [a for a in encoder.ready if a not in fed]
    saturated = bool(shards) and all(s.chunks_at_encoder >= max_chunks_in_flight or s.generator_done
                                     for s in shards)
    reasons = []
    grow_cpu = bool(queued and not free_cpu and idle_encoders and not cpu.starting and cpu.total < cpu.size.max)
    if grow_cpu:
        reasons.append(f"autoscale: cpu pool {cpu.total} -> {cpu.total + 1} ({queued} shards queued, "
                       f"{len(idle_encoders)} encoders idle)")
    grow_encoder = bool(saturated and (queued or len(shards) > len(encoder.ready)) and not encoder.starting
                        and encoder.total < encoder.size.max)
    if grow_encoder:
        reasons.append(f"autoscale: encoder pool {encoder.total} -> {encoder.total + 1} "
                       "(every open shard is waiting on its encoder)")
    retire_cpu: list[str] = []
    retire_encoder: list[str] = []
    if not queued:
        retire_cpu = free_cpu[: max(0, len(cpu.ready) - cpu.size.min)]
        load = Counter(s.encoder for s in shards)
        unused = [a for a in encoder.ready if not load[a]]
        retire_encoder = unused[: max(0, len(encoder.ready) - encoder.size.min)]
        reasons += ["autoscale: retiring an idle cpu actor"] * len(retire_cpu)
        reasons += ["autoscale: retiring an idle encoder actor"] * len(retire_encoder)
    return ScalePlan(grow_cpu, grow_encoder, tuple(retire_cpu), tuple(retire_encoder), tuple(reasons))

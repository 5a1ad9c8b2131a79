"""Timing and memory on the device: synchronised wall-clock timing after warm-up, peak memory, the time budget.

GPU work is asynchronous: every timed region starts and ends with torch.cuda.synchronize(), so a time is
what the device took, not how long the host took to queue it. Every CUDA call here is guarded by the
device type, so the same code runs (for checking) on CPU, where memory figures are None.
"""
from __future__ import annotations

import contextlib
import gc
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch


class Budget:
    """The run's total time budget: phases (and steps inside them) that would start after it are skipped."""

    def __init__(self, total_s: float):
        self.total_s = total_s
        self.start = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @property
    def left(self) -> float:
        return self.total_s - self.elapsed

    @property
    def expired(self) -> bool:
        return self.left <= 0

    def skip_note(self, what: str) -> str:
        return f"{what} skipped: the time budget of {self.total_s:.0f} s was spent ({self.elapsed:.0f} s elapsed)"

    def items(self, items, notes: list, describe):
        """Yield the items while time is left; for each one after that, a skip note `describe(item)` in notes."""
        for item in items:
            if self.expired:
                notes.append(self.skip_note(describe(item)))
            else:
                yield item


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Seconds per call of the timed runs (after warm-up)."""
    runs_s: list = field(default_factory=list)

    @property
    def median_s(self) -> float:
        return statistics.median(self.runs_s)

    @property
    def best_s(self) -> float:
        return min(self.runs_s)

    def to_dict(self) -> dict:
        return {"median_s": self.median_s, "best_s": self.best_s, "runs_s": self.runs_s}


def time_calls(fn: Callable[[], object], device: torch.device, warmup: int, iters: int, inner: int = 1,
               budget: Optional[Budget] = None) -> Timing:
    """`warmup` untimed calls, then `iters` timed samples of `inner` calls each (inner > 1 for calls of a few
    microseconds, where one synchronize would dominate). Stops early, keeping at least one sample, when the
    budget runs out."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    timing = Timing()
    for _ in range(iters):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        synchronize(device)
        timing.runs_s.append((time.perf_counter() - t0) / inner)
        if budget is not None and budget.expired:
            break
    return timing


class PartTimer:
    """Synchronised wall time of named parts of one iteration: `with timer.part("forward"): ...`."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def part(self, name: str):
        synchronize(self.device)
        t0 = time.perf_counter()
        yield
        synchronize(self.device)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


def median_parts(iterations: list[dict[str, float]]) -> dict[str, float]:
    """Per part, the median over iterations."""
    return {name: statistics.median(it[name] for it in iterations) for name in iterations[0]}


# ---------------------------------------------------------------------------------------- memory
def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def allocated_bytes(device: torch.device) -> Optional[int]:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def peak_bytes(device: torch.device) -> Optional[int]:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def free_device_memory(device: torch.device) -> None:
    """Hand cached blocks back between phases, so one phase's cache does not look like the next one's use
    (collecting first: megatron's DDP hooks hold reference cycles)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

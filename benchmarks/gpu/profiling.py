"""Where device time goes: a torch.profiler run split into GEMM / attention / elementwise / communication.

On a GPU the split is over CUDA kernels, by kernel name (cuBLAS/cuBLASLt GEMMs are named *gemm*, nvjet_*,
*xmma*, cutlass_*; attention kernels flash_*, fmha_* (memory-efficient), cudnn *sdpa*; NCCL kernels nccl*).
"elementwise" is everything else: norms, RoPE, GELU, modulation, casts, copies, memsets and reductions.
On CPU (only for checking the code) it is over the aten operators' self CPU time, by operator name.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

CATEGORIES = ("gemm", "attention", "elementwise", "communication")

_COMMUNICATION = ("nccl", "all_reduce", "allreduce", "all_gather", "allgather", "reduce_scatter", "reducescatter",
                  "c10d::", "gloo", "record_param_comms")
_ATTENTION = ("flash", "fmha", "sdpa", "attention", "softmax")  # softmax: the math backend's
_GEMM = ("gemm", "nvjet", "xmma", "wgmma", "cutlass", "cublas", "splitk", "aten::mm", "aten::addmm", "aten::bmm",
         "aten::baddbmm", "aten::_addmm_activation", "aten::matmul", "aten::linear")


def kernel_category(name: str) -> str:
    """The category of one CUDA kernel (or, on CPU, aten operator) by its name. Attention is tested before
    GEMM because the memory-efficient kernels are CUTLASS kernels (fmha_cutlass*)."""
    n = name.lower()
    if any(k in n for k in _COMMUNICATION):
        return "communication"
    if any(k in n for k in _ATTENTION):
        return "attention"
    if any(k in n for k in _GEMM):
        return "gemm"
    return "elementwise"


@dataclass
class KernelSplit:
    """Device time of one profiled iteration by category (milliseconds), with the largest kernels."""
    source: str                               # "cuda kernels" or "cpu aten ops (code check only)"
    total_ms: float = 0.0
    by_category_ms: dict = field(default_factory=lambda: {c: 0.0 for c in CATEGORIES})
    top: list = field(default_factory=list)   # [(name, ms, category)], largest first
    wall_ms: float | None = None              # the profiled iteration's wall time (includes profiler overhead)

    @property
    def fractions(self) -> dict:
        return {c: (t / self.total_ms if self.total_ms else 0.0) for c, t in self.by_category_ms.items()}

    def to_dict(self) -> dict:
        return {"source": self.source, "total_ms": self.total_ms, "by_category_ms": self.by_category_ms,
                "fractions": self.fractions, "wall_ms": self.wall_ms,
                "top_kernels": [{"name": n[:160], "ms": ms, "category": c} for n, ms, c in self.top]}

    def summary(self) -> str:
        return " ".join(f"{c} {f:.0%}" for c, f in self.fractions.items())


def _device_us(event) -> float:
    """Self device time of a profiler row in microseconds (the attribute was renamed in torch 2.4)."""
    t = getattr(event, "self_device_time_total", None)
    return float(t if t is not None else getattr(event, "self_cuda_time_total", 0.0))


def split_rows(rows: list[tuple[str, float]], source: str, top_n: int = 8) -> KernelSplit:
    """KernelSplit from (name, microseconds) rows."""
    split = KernelSplit(source=source)
    for name, us in rows:
        split.by_category_ms[kernel_category(name)] += us / 1e3
    split.total_ms = sum(split.by_category_ms.values())
    split.top = [(name, us / 1e3, kernel_category(name)) for name, us in sorted(rows, key=lambda r: -r[1])[:top_n]]
    return split


def profiler_rows(prof, device: torch.device) -> tuple[list[tuple[str, float]], str]:
    """(name, self microseconds) rows of a finished profile: CUDA kernels on a GPU, aten ops on CPU."""
    averages = prof.key_averages()
    if device.type == "cuda":
        rows = [(e.key, _device_us(e)) for e in averages if e.device_type == DeviceType.CUDA and _device_us(e) > 0]
        if rows:
            return rows, "cuda kernels"
        # no kernel rows (an old profiler build): the operators' own device time, by operator name
        return [(e.key, _device_us(e)) for e in averages if _device_us(e) > 0], "cuda time of operators"
    rows = [(e.key, float(e.self_cpu_time_total)) for e in averages
            if e.key.startswith(("aten::", "c10d::")) and e.self_cpu_time_total > 0]
    return rows, "cpu aten ops (code check only)"


def op_names(prof) -> list[str]:
    """Every operator / kernel name the profile recorded."""
    return [e.key for e in prof.key_averages()]


def profile_call(fn: Callable[[], object], device: torch.device) -> tuple[KernelSplit, object]:
    """Run fn() once under torch.profiler; its KernelSplit and the profile (for op_names)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - t0
    rows, source = profiler_rows(prof, device)
    split = split_rows(rows, source)
    split.wall_ms = wall * 1e3
    return split, prof

"""Results of a benchmark run: per-phase records, the environment, Markdown tables, the JSON file."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
from megatron.core import __version__ as megatron_version

from benchmarks.common import RESULTS_DIR, environment
from benchmarks.gpu.settings import Settings

RESULTS_FILE = os.path.join(RESULTS_DIR, "gpu_step.json")   # written only by a full-size run on a GPU
PHASE_LABELS = {"smoke": "(a)", "gemm": "(b)", "attention": "(c)", "blocks": "(d)", "step": "(e)"}


@dataclass
class PhaseResult:
    """One phase's outcome: ok, failed (ran, but a check failed), error (raised), skipped (budget)."""
    name: str
    status: str
    seconds: float = 0.0
    figures: dict = field(default_factory=dict)
    error: Optional[str] = None
    traceback: Optional[str] = None

    def line(self) -> str:
        what = self.figures.get("summary", "") if self.status in ("ok", "failed") else (self.error or "")
        return f"{PHASE_LABELS.get(self.name, '')} {self.name:<9} {self.status:<7} {self.seconds:6.1f} s  {what}"


def device_record(device: str) -> dict:
    """What ran the benchmark: GPU name and memory, torch / CUDA / cuDNN / megatron-core versions."""
    rec = {"device": "cpu", "torch": torch.__version__, "cuda": torch.version.cuda, "megatron_core": megatron_version,
           "cuda_device_max_connections": os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS")}
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        rec.update(device=torch.cuda.get_device_name(0), capability=f"sm{props.major}{props.minor}",
                   memory_bytes=props.total_memory, cudnn=torch.backends.cudnn.version())
    return rec


def build_record(settings: Settings, phases: list[PhaseResult], budget_elapsed_s: float) -> dict:
    measured = settings.device == "cuda" and not settings.tiny
    return {
        "benchmark": "gpu_step",
        "figures_are": "measured" if measured else "a code check (--tiny / --device cpu): NOT performance figures",
        **device_record(settings.device),
        "peak_tflops": settings.peak_tflops,
        "settings": asdict(settings),
        "budget": {"total_s": settings.budget_s, "elapsed_s": budget_elapsed_s},
        "phases": {p.name: asdict(p) for p in phases},
        "environment": environment(),
    }


def write_json(path: str, record: dict) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=1, sort_keys=True, default=str)
        f.write("\n")
    return path


def markdown_table(headers: list[str], rows: list[list]) -> str:
    """A Markdown table (pasteable into docs/performance.md); floats to 4 significant figures."""
    def cell(c):
        return f"{c:,.4g}" if isinstance(c, float) else (f"{c:,}" if isinstance(c, int) else str(c))

    rule = "|".join("---:" if i else "---" for i in range(len(headers)))
    lines = ["| " + " | ".join(headers) + " |", f"|{rule}|"]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def gib(n: Optional[float]) -> str:
    return "n/a" if n is None else f"{n / 2**30:,.2f} GiB"

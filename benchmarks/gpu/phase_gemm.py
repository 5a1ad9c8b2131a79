"""Phase (b), GEMM ceiling: bf16 torch.matmul at the block's linear-layer shapes, achieved TFLOP/s.

Rows M = micro-batch x image tokens (the image stream's activations flattened), for each resolution, times
each weight: q/k/v h -> 3h, attention out h -> h, MLP up h -> ffn, MLP down ffn -> h. The weight is held
[out, in] and used transposed, as megatron's linear layers do (x @ W^T). The per-resolution "linear ceiling"
is the four GEMMs' FLOPs over their summed time: the best the block's linear layers could do as they are
shaped. One modulation GEMM (M = micro-batch rows, h -> 6h) shows the memory-bound end.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_qwen_image.flops import MODULATION_CHUNKS, gemm_flops, utilisation

from benchmarks.gpu.settings import Settings
from benchmarks.gpu.timing import Budget, time_calls

MIN_SAMPLE_S = 2e-3  # one timed sample should last at least this long (inner repetitions) for a steady median


@dataclass(frozen=True)
class GemmShape:
    name: str
    m: int
    k: int
    n: int
    resolution: str

    @property
    def flops(self) -> int:
        return gemm_flops(self.m, self.k, self.n)


def gemm_shapes(settings: Settings) -> list[GemmShape]:
    h, f = settings.dims.hidden, settings.dims.ffn
    shapes = []
    for res in settings.resolutions:
        m, label = settings.micro_batch * settings.image_tokens(res), f"{res[0]}x{res[1]}"
        shapes += [GemmShape("qkv", m, h, 3 * h, label), GemmShape("attn_out", m, h, h, label),
                   GemmShape("mlp_up", m, h, f, label), GemmShape("mlp_down", m, f, h, label)]
    shapes.append(GemmShape("modulation", settings.micro_batch, h, MODULATION_CHUNKS * h, "per sample"))
    return shapes


def run_gemm(settings: Settings, budget: Budget) -> dict:
    device, dtype = settings.torch_device, settings.dtype
    rows, notes = [], []
    for shape in budget.items(gemm_shapes(settings), notes, lambda g: f"GEMM {g.name} {g.resolution}"):
        x = torch.randn(shape.m, shape.k, device=device, dtype=dtype)
        w = torch.randn(shape.n, shape.k, device=device, dtype=dtype)  # [out, in], as a linear layer's weight
        probe = time_calls(lambda: torch.matmul(x, w.t()), device, warmup=settings.warmup, iters=1)
        inner = max(1, min(1000, int(MIN_SAMPLE_S / max(probe.median_s, 1e-7))))
        t = time_calls(lambda: torch.matmul(x, w.t()), device, warmup=1, iters=settings.iters * 2, inner=inner,
                       budget=budget)
        rows.append({"name": shape.name, "resolution": shape.resolution, "m": shape.m, "k": shape.k, "n": shape.n,
                     "gflop": shape.flops / 1e9, "median_ms": t.median_s * 1e3, "inner_calls": inner,
                     "tflops": shape.flops / t.median_s / 1e12,
                     "fraction_of_peak": utilisation(shape.flops, t.median_s, settings.peak_tflops)})
    ceilings = {}
    for res in {r["resolution"] for r in rows if r["name"] != "modulation"}:
        part = [r for r in rows if r["resolution"] == res]
        if len(part) == 4:
            flops = sum(r["gflop"] for r in part) * 1e9
            seconds = sum(r["median_ms"] for r in part) / 1e3
            ceilings[res] = {"tflops": flops / seconds / 1e12,
                             "fraction_of_peak": utilisation(flops, seconds, settings.peak_tflops)}
    summary = ", ".join(f"{res}: {c['tflops']:.0f} TFLOP/s ({c['fraction_of_peak']:.0%} of peak)"
                        for res, c in sorted(ceilings.items()))
    return {"shapes": rows, "linear_ceiling": ceilings, "notes": notes, "dtype": str(dtype),
            "summary": f"linear-layer ceiling {summary or 'not measured'}"}

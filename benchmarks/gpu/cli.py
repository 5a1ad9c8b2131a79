"""Command line of the GPU step benchmark: settings from flags, the phases in turn, the results file.

Each phase runs inside its own guard: an exception (a CUDA error, out of memory, a backend refusing a shape)
is recorded as that phase's error with its traceback, and the next phase still runs. Phases that would start
after the time budget is spent are skipped with a note; long phases also check it between their items.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from dataclasses import replace

import torch

from consumer.config import load_config
from megatron_qwen_image.parallel import destroy_parallel
from megatron_qwen_image.flops import ModelDims

from benchmarks.gpu.dry_run import dry_run
from benchmarks.gpu.phase_attention import run_attention
from benchmarks.gpu.phase_blocks import run_blocks
from benchmarks.gpu.phase_gemm import run_gemm
from benchmarks.gpu.phase_smoke import run_smoke
from benchmarks.gpu.phase_step import run_step
from benchmarks.gpu.report import RESULTS_FILE, PhaseResult, build_record, write_json
from benchmarks.gpu.settings import H100_H200_BF16_TFLOPS, PHASES, Settings, tiny_settings
from benchmarks.gpu.timing import Budget, free_device_memory

PHASE_FUNCTIONS = {"smoke": run_smoke, "gemm": run_gemm, "attention": run_attention, "blocks": run_blocks,
                   "step": run_step}

USAGE = """\
    python -m benchmarks.gpu                      # all phases on the GPU -> benchmarks/results/gpu_step.json
    python -m benchmarks.gpu --dry-run            # FLOP counts and planned memory; no GPU, writes nothing
    python -m benchmarks.gpu --tiny               # the same code at toy shapes (checks the code, not figures)
    CUDA_VISIBLE_DEVICES= python -m benchmarks.gpu --device cpu --tiny   # the code check without a GPU
"""


def _resolutions(text: str) -> tuple:
    try:
        return tuple(tuple(int(v) for v in r.lower().split("x")) for r in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW[,HxW...], got {text!r}") from None


def _ints(text: str) -> tuple:
    return tuple(int(v) for v in text.split(","))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", usage=USAGE,
                                description="One-GPU step benchmark of the Qwen-Image MMDiT (docs/performance.md).")
    p.add_argument("--dry-run", action="store_true", help="print FLOP counts and planned memory; needs no GPU")
    p.add_argument("--tiny", action="store_true", help="toy shapes: for checking the code, never for figures")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: only with --tiny, on a machine without a visible GPU (a code check)")
    p.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}")
    p.add_argument("--budget-s", type=float, default=280.0, help="total seconds; later phases are skipped (280)")
    p.add_argument("--peak-tflops", type=float, default=H100_H200_BF16_TFLOPS,
                   help=f"the device's dense bf16 peak for MFU/HFU ({H100_H200_BF16_TFLOPS:g}: H100/H200 SXM)")
    p.add_argument("--warmup", type=int, help="untimed iterations before timing (2; --tiny 1)")
    p.add_argument("--iters", type=int, help="timed iterations; figures are their median (5; --tiny 2)")
    p.add_argument("--resolutions", type=_resolutions, help="phases b-d, pixels HxW,... (1024x1024,1328x1328)")
    p.add_argument("--step-resolution", type=_resolutions, help="phase e, pixels HxW (1328x1328)")
    p.add_argument("--text-len", type=int, help="phases d-e: text columns, the longest caption (512)")
    p.add_argument("--text-valid", type=_ints, help="phases d-e: valid text tokens per sample; their number is "
                                                    "the micro-batch (512,256)")
    p.add_argument("--out", help=f"results JSON (default for a full-size GPU run: {os.path.relpath(RESULTS_FILE)}; "
                                 "--tiny, --device cpu and --dry-run write one only when given this)")
    return p.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> Settings:
    s = Settings(device=args.device, budget_s=args.budget_s, peak_tflops=args.peak_tflops,
                 phases=tuple(x.strip() for x in args.phases.split(",") if x.strip()))
    if args.tiny:
        s = tiny_settings(s)
    given = {"warmup": args.warmup, "iters": args.iters, "resolutions": args.resolutions,
             "text_len": args.text_len, "text_valid": args.text_valid,
             "step_resolution": args.step_resolution[0] if args.step_resolution else None}
    s = replace(s, **{k: v for k, v in given.items() if v is not None})
    s = replace(s, micro_batch=len(s.text_valid),
                dims=ModelDims.from_model_section(load_config(s.model_yaml).model))
    s.check()
    return s


def run_phase(name: str, settings: Settings, budget: Budget) -> PhaseResult:
    if budget.expired:
        return PhaseResult(name, "skipped", error=budget.skip_note(f"phase {name}"))
    t0 = time.perf_counter()
    try:
        figures = PHASE_FUNCTIONS[name](settings, budget)
        result = PhaseResult(name, "ok" if figures.get("ok", True) else "failed", figures=figures)
    except Exception as e:  # recorded; the next phase still runs
        result = PhaseResult(name, "error", error=f"{type(e).__name__}: {str(e)[:1000]}",
                             traceback=traceback.format_exc()[-6000:])
    try:
        free_device_memory(settings.torch_device)
    except Exception:  # a device left unusable by this phase's error: the next phase records its own
        pass
    result.seconds = time.perf_counter() - t0
    return result


def refusal(settings: Settings) -> str | None:
    """Why this machine cannot run these settings (None: it can)."""
    if settings.device == "cuda" and not torch.cuda.is_available():
        return ("no CUDA GPU is visible: use --dry-run for the FLOP counts, or --device cpu --tiny to check "
                "the code on CPU")
    if settings.device == "cpu" and torch.cuda.is_available():
        return "--device cpu needs a machine without a visible GPU (CUDA_VISIBLE_DEVICES= hides it)"
    if settings.device == "cpu" and not settings.tiny:
        return "--device cpu runs only with --tiny (it checks the code; full-size phases need a GPU)"
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        text, record = dry_run(settings)
        print(text, flush=True)
        if args.out:
            print(f"dry run -> {write_json(args.out, record)}")
        return 0
    why = refusal(settings)
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 2
    if settings.device == "cuda":  # before CUDA initialises (the module's __main__ sets it before torch loads)
        if torch.cuda.is_initialized() and os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS") != "1":
            print("warning: CUDA was initialised before CUDA_DEVICE_MAX_CONNECTIONS=1 could be set", file=sys.stderr)
        os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"

    figures_are = "measured" if settings.device == "cuda" and not settings.tiny else "CODE CHECK, not figures"
    print(f"GPU step benchmark ({figures_are}): phases {', '.join(settings.phases)} on {settings.device}, "
          f"budget {settings.budget_s:.0f} s, peak {settings.peak_tflops:g} TFLOP/s", flush=True)
    budget, results = Budget(settings.budget_s), []
    out = args.out or (RESULTS_FILE if figures_are == "measured" else None)
    try:
        for name in settings.phases:
            results.append(run_phase(name, settings, budget))
            print(results[-1].line(), flush=True)
    finally:
        record = build_record(settings, results, budget.elapsed)
        if out:
            print(f"results -> {write_json(out, record)}", flush=True)
        destroy_parallel()
    print(f"total {budget.elapsed:.1f} s", flush=True)
    return 1 if any(r.status in ("error", "failed") for r in results) else 0

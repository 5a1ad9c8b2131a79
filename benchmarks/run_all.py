"""Run every benchmark (`benchmarks/bench_*.py`) in turn, then print a summary.  `make bench` calls this.

    python -m benchmarks.run_all [--only cache,producer] [--list] [--timeout 1800] [--stop-on-fail]

Each benchmark runs as its own subprocess (`python -m benchmarks.bench_NAME`, this same Python, from the
repo root, in its own process group) with its default arguments, so one benchmark's threads, Ray cluster or
torchrun ranks cannot disturb the next. Its output streams through as it runs; the summary lists each
benchmark's exit status, wall time and the result files it wrote (`benchmarks/results/*.json`, the figures
the README quotes). Benchmarks measure ratios against a baseline run in the same process, but other jobs on
the machine still add noise: run them on an otherwise idle machine.

Exit status: 0 when every benchmark that ran succeeded, 1 otherwise.
"""
from __future__ import annotations

import argparse
import glob
import os
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULTS_DIR = os.path.join(HERE, "results")


def discover() -> list[str]:
    """Benchmark names (the NAME of bench_NAME.py), sorted."""
    return sorted(os.path.basename(p)[len("bench_"):-len(".py")] for p in glob.glob(os.path.join(HERE, "bench_*.py")))


def _result_mtimes() -> dict:
    return {p: os.stat(p).st_mtime_ns for p in glob.glob(os.path.join(RESULTS_DIR, "*.json"))}


def _changed_since(before: dict) -> list[str]:
    """Result files created or rewritten since the `before` snapshot."""
    return sorted(p for p, m in _result_mtimes().items() if before.get(p) != m)


def run_one(name: str, timeout_s: float) -> dict:
    """Run one benchmark, streaming its output; return {name, rc, seconds, results, note}."""
    cmd = [sys.executable, "-m", f"benchmarks.bench_{name}"]
    print(f"\n=== benchmark {name}: {' '.join(['python', *cmd[1:]])} ===", flush=True)
    env = {**os.environ, "PYTHONPATH": REPO + (os.pathsep + os.environ["PYTHONPATH"]
                                               if os.environ.get("PYTHONPATH") else "")}
    before, t0 = _result_mtimes(), time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True)
    note = ""
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        rc, note = 124, f"timed out after {timeout_s:.0f} s"
    except KeyboardInterrupt:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    finally:
        try:  # the benchmark and anything it left behind (Ray workers, torchrun ranks)
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
    if rc and not note:
        note = f"exit status {rc}"
    return {"name": name, "rc": rc, "seconds": time.perf_counter() - t0,
            "results": _changed_since(before), "note": note}


def print_summary(rows: list[dict], skipped: list[str]) -> None:
    print("\n=== Benchmark summary ===")
    width = max([len(r["name"]) for r in rows] + [len(s) for s in skipped] + [9])
    print(f"  {'benchmark':<{width}}  {'status':<8}{'time':>9}  results")
    for r in rows:
        status = "ok" if r["rc"] == 0 else "FAILED"
        res = ", ".join(os.path.relpath(p, REPO) for p in r["results"]) or "-"
        print(f"  {r['name']:<{width}}  {status:<8}{r['seconds']:>8.1f}s  {res}" + (f"  ({r['note']})" if r["note"] else ""))
    for name in skipped:
        print(f"  {name:<{width}}  {'not run':<8}{'':>9}  (an earlier benchmark failed; --stop-on-fail)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run_all", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=None, help="comma-separated benchmark names (e.g. cache,producer)")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per benchmark (default 1800)")
    p.add_argument("--stop-on-fail", action="store_true", help="stop at the first failing benchmark")
    args = p.parse_args(argv)
    names = discover()
    if args.list:
        print("\n".join(names))
        return 0
    if args.only:
        wanted = [n.strip().removeprefix("bench_") for n in args.only.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in names]
        if unknown:
            p.error(f"--only: unknown benchmark(s) {unknown}; available: {names}")
        names = wanted
    if not names:
        print(f"no benchmarks found (benchmarks/bench_*.py in {HERE})", file=sys.stderr)
        return 1
    rows, t0 = [], time.perf_counter()
    for i, name in enumerate(names):
        rows.append(run_one(name, args.timeout))
        if rows[-1]["rc"] != 0 and args.stop_on_fail:
            print_summary(rows, names[i + 1:])
            return 1
    print_summary(rows, [])
    print(f"  total {time.perf_counter() - t0:.1f} s", flush=True)
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

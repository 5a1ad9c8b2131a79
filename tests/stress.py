"""Run the test suite with busy-loop processes beside it, to show that no outcome depends on speed.

    python -m tests.stress                       # 2 busy loops, the whole suite once
    python -m tests.stress --busy 4 --runs 3 -- -q tests/test_producer_ray.py

Each busy loop is a process spinning on one core (nice 0, the same priority as the tests), so on a
2-core machine 2 of them leave the suite about half the CPU it would have on a quiet machine. The loops
live in their own process group and are killed when the runs end, also on Ctrl-C or SIGTERM; they end by
themselves when this process is gone. Every run's pytest
summary line is printed at the end; the exit status is the first failing run's (0 if all passed).
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time

from tests.support.processes import kill_process_group

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUMMARY = re.compile(r"^=*\s*(\d+ (passed|failed|error).*) in [\d.]+s.*$")


# Spins until its parent is gone: a stress run that is itself killed (SIGKILL, a closed terminal) leaves no
# busy loop eating the machine's cores behind it.
BUSY_LOOP = "import os\nparent = os.getppid()\nwhile os.getppid() == parent:\n    pass\n"


def start_busy_loops(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", BUSY_LOOP], start_new_session=True) for _ in range(n)]


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        kill_process_group(p)
        p.wait()


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def run_suite(pytest_args: list[str]) -> tuple[int, str, float]:
    """One pytest run, its output streamed through; returns (exit code, summary line, seconds)."""
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "pytest", *pytest_args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    summary = ""
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        m = SUMMARY.match(line.strip())
        if m:
            summary = line.strip().strip("= ")
    return proc.wait(), summary, time.time() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.stress", description=__doc__.split("\n")[0])
    ap.add_argument("--busy", type=int, default=2, help="busy-loop processes beside the suite (default 2)")
    ap.add_argument("--runs", type=int, default=1, help="how many times to run the suite (default 1)")
    ap.add_argument("--stop-on-failure", action="store_true", help="stop after the first failing run")
    ap.add_argument("pytest_args", nargs="*", help="after --: pytest's arguments (default: -q tests)")
    args = ap.parse_args(argv)
    if args.busy < 0 or args.runs < 1:
        ap.error("--busy must be >= 0 and --runs >= 1")
    pytest_args = args.pytest_args or ["-q", "tests"]
    results = []
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # so that the loops are stopped below
    loops = start_busy_loops(args.busy)
    print(f"[stress] {args.busy} busy-loop process(es) on {os.cpu_count()} core(s): "
          f"{' '.join(str(p.pid) for p in loops) or 'none'}", flush=True)
    try:
        for i in range(1, args.runs + 1):
            print(f"[stress] run {i}/{args.runs}: pytest {' '.join(pytest_args)}", flush=True)
            code, summary, secs = run_suite(pytest_args)
            results.append((code, summary, secs))
            if code != 0 and args.stop_on_failure:
                break
    finally:
        stop(loops)
    print(f"[stress] {args.busy} busy loop(s); results:")
    for i, (code, summary, secs) in enumerate(results, 1):
        print(f"[stress]   run {i}: exit {code} ({secs:.0f} s): {summary or 'no summary line'}")
    return next((code for code, _, _ in results if code != 0), 0)


if __name__ == "__main__":
    sys.exit(main())

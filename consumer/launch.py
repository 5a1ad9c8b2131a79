"""Start the trainer under torchrun after checking its start once, here, before any worker exists.

    python -m consumer.launch [torchrun options] -- [trainer arguments]
    python -m consumer.launch --standalone --nproc-per-node 2 -- --config configs/smoke_tp2.yaml --data cache --cache-dir DIR
    python -m consumer.launch --check-only --nnodes 4 --nproc-per-node 8 -- --config ...   # the checks alone
                                                               (launch/slurm/train.sbatch, on its batch node)

Before `--`: torchrun's options (`python -m torch.distributed.run --help`) and --check-only; after it:
`python -m consumer.train`'s arguments. For the world size torchrun will start (--nnodes x
--nproc-per-node) `consumer.train.check_start` checks the configuration and layout, the cache directory
(it is a cache, and a bucket of it fills a global batch) and the checkpoint to load. A refusal is the
trainer's one line `error: config key '...': ...` (printed on node rank 0 only) and exit code 2, and no
worker starts. Otherwise torchrun runs `-m consumer.train` with the same arguments, in this process
(torch.distributed.run's own `run`, so its signal handling and shutdown timeout are unchanged).

Why: torchrun 2.x exits 1 for any failed worker and prints a ChildFailedError traceback and report after the
workers' output, once per failure, whatever the workers printed. Workers that fail later (a refusal found
only after the model is built, a crash) are still reported here in one line, naming the failed ranks and
their exit codes, and this process exits with the first failure's code (2 for a refusal, 128 + N for a
signal N); the workers' own messages stand above it.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

import torch
from torch.distributed import run as torchrun
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from consumer.train import REFUSALS, check_start, config_from_args, parse_args, refuse
from launch.passthrough import split_at_separator

TRAINER = ["-m", "consumer.train"]


def world_size(args) -> int:
    """The number of workers torchrun's parsed `args` start (ValueError for an elastic node range)."""
    min_nodes, max_nodes = torchrun.parse_min_max_nnodes("1" if args.standalone else args.nnodes)
    if min_nodes != max_nodes:
        raise ValueError(f"--nnodes {args.nnodes}: the trainer's layout is checked for one world size; give a fixed "
                         f"node count (or use torchrun directly)")
    return max_nodes * torchrun.determine_local_world_size(args.nproc_per_node)


# What the workers' environment gets unless the user set it: one hardware queue per GPU, so that megatron's
# tensor-parallel communication runs in launch order and overlaps with compute as megatron schedules it
# (megatron-LM requires it with TP). torchrun's workers inherit this process's environment.
WORKER_ENV_DEFAULTS = {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}


def worker_environment(env) -> None:
    """Set WORKER_ENV_DEFAULTS in `env` (os.environ) where not already set."""
    for key, value in WORKER_ENV_DEFAULTS.items():
        env.setdefault(key, value)


def failure_line(error: ChildFailedError) -> tuple[str, int]:
    """One line for torchrun's report of failed workers, and the exit code to end with."""
    by_outcome: dict[str, list[int]] = {}
    for rank, failure in sorted(error.failures.items()):
        outcome = (f"killed by {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}")
        by_outcome.setdefault(outcome, []).append(rank)
    parts = [f"{outcome} on rank{'s' if len(ranks) > 1 else ''} {_ranks(ranks)}" for outcome, ranks in by_outcome.items()]
    _, first = error.get_first_failure()
    code = first.exitcode if first.exitcode > 0 else 128 - first.exitcode
    return f"consumer.launch: training failed: {'; '.join(parts)} (the workers' output is above)", code


def _ranks(ranks: list[int]) -> str:
    shown = ", ".join(map(str, ranks[:8]))
    return shown + (f", ... ({len(ranks)} ranks)" if len(ranks) > 8 else "")


def main(argv: list[str] | None = None) -> int:
    own, trainer_argv = split_at_separator(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m consumer.launch", add_help=False)
    p.add_argument("--check-only", action="store_true", help="run the start-up checks for this layout and exit")
    mine, torchrun_argv = p.parse_known_args(own)
    args = torchrun.parse_args([*torchrun_argv, *TRAINER, *trainer_argv])
    try:
        world = world_size(args)
    except ValueError as e:
        print(f"consumer.launch: {e}", file=sys.stderr)
        return 2
    trainer_args = parse_args(trainer_argv)
    # Only refusals here: the workers log the cache loader's warnings again, each with its rank.
    logging.getLogger("megatron_qwen_image").setLevel(logging.ERROR)
    try:  # --check-only may run elsewhere than the workers (a SLURM batch node): their GPUs are not judged
        check_start(config_from_args(trainer_args), world, None if mine.check_only else torch.cuda.is_available())
    except REFUSALS as e:
        return refuse(e, printed=args.node_rank == 0)  # every node finds the same; the first says it
    if mine.check_only:
        return 0
    worker_environment(os.environ)
    try:
        torchrun.run(args)
    except ChildFailedError as e:
        line, code = failure_line(e)
        print(line, file=sys.stderr, flush=True)
        return code
    except SignalException as e:  # torchrun got SIGTERM/SIGINT, passed it on and stopped the workers
        print(f"consumer.launch: stopped by {e.sigval.name}", file=sys.stderr, flush=True)
        return 128 + e.sigval
    return 0


if __name__ == "__main__":
    sys.exit(main())

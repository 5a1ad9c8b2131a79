"""torchrun worker for tests/test_checkpoint_train.py: a consumer.train run whose every rank SIGKILLs itself
(and its helper processes) at one point of one save, as a node failure would.

    ckpt_fault_worker.py --fault PHASE@STEP [consumer.train's arguments: --config ..., --save ..., key=value ...]

PHASE is one of consumer.checkpointing.SAVE_PHASES; the kill happens in Checkpointer.on_save_phase, the hook
every save calls at those points. Without a save at STEP the run finishes normally.
"""
import argparse
import os
import signal
import sys

import consumer.train as train_mod
from consumer.checkpointing import SAVE_PHASES, Checkpointer
from megatron_qwen_image.parallel import destroy_parallel


def fault_spec(text: str) -> tuple[str, int]:
    phase, _, step = text.partition("@")
    if phase not in SAVE_PHASES or not step.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected PHASE@STEP with PHASE one of {SAVE_PHASES}")
    return phase, int(step)


def child_pids(parent: int) -> list[int]:
    """The processes whose parent is `parent` (from /proc)."""
    out = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                out.append(int(entry))
    return out


def kill_process_tree() -> None:
    """SIGKILL this process and its children (dist_checkpointing's writer-result manager process and
    multiprocessing's resource tracker), as a node failure would; orphans would otherwise linger."""
    me = os.getpid()
    if os.getpgrp() == me:  # torchrun starts each worker as its own process-group leader
        os.killpg(me, signal.SIGKILL)
    for pid in child_pids(me):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    os.kill(me, signal.SIGKILL)


class FaultyCheckpointer(Checkpointer):
    """The real Checkpointer, killed (SIGKILL, no cleanup) at `fault` = (phase, step) of a save."""

    def __init__(self, cfg, ctx, fault: tuple[str, int]):
        super().__init__(cfg, ctx)
        self.fault = fault

    def on_save_phase(self, phase: str, step: int) -> None:
        if (phase, step) == self.fault:
            print(f"[fault] --fault {phase}@{step}: rank {self.ctx.rank} killing itself during the save", flush=True)
            sys.stderr.flush()
            kill_process_tree()


def main() -> int:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    ap.add_argument("--fault", required=True, type=fault_spec, metavar="PHASE@STEP")
    args, train_argv = ap.parse_known_args()
    cfg = train_mod.config_from_args(train_mod.parse_args(train_argv))
    try:
        train_mod.train(cfg, make_checkpointer=lambda cfg, ctx: FaultyCheckpointer(cfg, ctx, args.fault))
    finally:
        destroy_parallel()
    return 0


if __name__ == "__main__":  # guard needed: dist_checkpointing's writer starts processes that re-import __main__
    sys.exit(main())

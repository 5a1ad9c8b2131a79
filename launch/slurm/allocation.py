"""What a SLURM allocation looks like from inside it: its hosts, in order, and the address of each.

Both batch scripts take their "first node" from here, so training's torchrun master and the producer's
Ray head are chosen by one rule: the first host of the node list as `scontrol show hostnames` expands it,
at the address SLURM itself uses for it (`NodeAddr`, which is the host name unless the cluster sets
another address).

    python -m launch.slurm.allocation hosts          # one host per line
    python -m launch.slurm.allocation head-address   # the first host's address
"""
from __future__ import annotations

import os
import subprocess
import sys


class SlurmEnvError(RuntimeError):
    """The SLURM environment is missing or inconsistent; the message names the variable."""


def _scontrol(*args: str) -> str:
    try:
        r = subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise SlurmEnvError("scontrol not found: run this inside a SLURM allocation")
    if r.returncode != 0:
        raise SlurmEnvError(f"`scontrol {' '.join(args)}` failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout


def expand_hostlist(nodelist: str) -> list[str]:
    """`node[01-03],gpu7` -> ['node01', 'node02', 'node03', 'gpu7'], by SLURM's own parser."""
    return _scontrol("show", "hostnames", nodelist).split()


def node_address(node: str) -> str:
    """The address SLURM uses for `node` (its NodeAddr); the node name itself if scontrol cannot say."""
    try:
        out = _scontrol("show", "node", "-o", node)
    except SlurmEnvError:
        return node
    for tok in out.split():
        if tok.startswith("NodeAddr="):
            return tok.split("=", 1)[1] or node
    return node


def allocation_hosts(env: dict | None = None) -> list[str]:
    """Hosts of the current step (SLURM_STEP_NODELIST) or, in the batch shell, of the whole job."""
    env = os.environ if env is None else env
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise SlurmEnvError("SLURM_JOB_NODELIST not set: run this inside a SLURM allocation (sbatch / srun)")
    return expand_hostlist(nodelist)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv not in (["hosts"], ["head-address"]):
        print("usage: python -m launch.slurm.allocation hosts|head-address", file=sys.stderr)
        return 2
    try:
        hosts = allocation_hosts()
    except SlurmEnvError as e:
        print(f"allocation: {e}", file=sys.stderr)
        return 2
    print("\n".join(hosts) if argv == ["hosts"] else node_address(hosts[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

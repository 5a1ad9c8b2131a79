"""Start torchrun on this node of a SLURM allocation, with the rendezvous derived from the SLURM environment.

The training batch script runs this once per node (`srun --ntasks-per-node=1`). Every node computes
the same rendezvous from the same inputs, so nothing is exchanged before torchrun starts:

- master: the first host of the step's node list (`SLURM_STEP_NODELIST`, which is `SLURM_JOB_NODELIST`
  when the step spans the whole allocation, as the batch scripts' steps do) at its SLURM address
  (launch/slurm/allocation.py: the same rule picks the producer's Ray head);
- port: `MASTER_PORT` if set, else 20000 + job id mod 10000 (the same on every node, and the same again
  when a requeued job restarts);
- nnodes: the step's node count (`SLURM_STEP_NUM_NODES`, else `SLURM_JOB_NUM_NODES`); node rank: `SLURM_NODEID` (0 on the master);
- processes per node: `--nproc-per-node`, default `SLURM_GPUS_ON_NODE`, else 1.

    python -m launch.slurm.torchrun_slurm --nproc-per-node 8 [--shutdown-timeout 120] -- -m consumer.train --config X ...
    python -m launch.slurm.torchrun_slurm --print      # show the rendezvous this node would use, as JSON

torchrun's static rendezvous (`--nnodes N --node-rank R --master-addr A --master-port P`) gives global
rank = R * nproc + local rank, so rank 0 is on the master node. On SIGTERM torchrun forwards the signal
to its workers and waits `--shutdown-timeout` seconds for them (to save a checkpoint) before SIGKILL;
keep it below SLURM's GraceTime / the `--signal` lead time.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass

from launch.passthrough import split_at_separator
from launch.slurm.allocation import SlurmEnvError, allocation_hosts, node_address


@dataclass(frozen=True)
class Rendezvous:
    master_addr: str
    master_port: int
    nnodes: int
    node_rank: int
    hosts: tuple[str, ...]


def _int_env(env: dict, *names: str) -> int:
    for name in names:
        if env.get(name, "") != "":
            try:
                return int(env[name])
            except ValueError:
                raise SlurmEnvError(f"{name}={env[name]!r} is not an integer")
    raise SlurmEnvError(f"{' / '.join(names)} not set: run this inside a SLURM allocation (srun within sbatch)")


def slurm_rendezvous(env: dict | None = None) -> Rendezvous:
    """Derive torchrun's static rendezvous from the SLURM variables of a job step (see module doc)."""
    env = dict(os.environ if env is None else env)
    hosts = allocation_hosts(env)
    nnodes = _int_env(env, "SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES", "SLURM_NNODES")
    if nnodes != len(hosts):
        raise SlurmEnvError(f"node count {nnodes} (SLURM_STEP_NUM_NODES / SLURM_JOB_NUM_NODES) but the node list "
                            f"has {len(hosts)} hosts: {hosts}")
    node_rank = _int_env(env, "SLURM_NODEID")
    if not 0 <= node_rank < nnodes:
        raise SlurmEnvError(f"SLURM_NODEID={node_rank} outside 0..{nnodes - 1}")
    if env.get("MASTER_PORT"):
        port = _int_env(env, "MASTER_PORT")
    else:
        port = 20000 + _int_env(env, "SLURM_JOB_ID", "SLURM_JOBID") % 10000
    master_addr = env.get("MASTER_ADDR") or node_address(hosts[0])
    return Rendezvous(master_addr=master_addr, master_port=port, nnodes=nnodes, node_rank=node_rank,
                      hosts=tuple(hosts))


def torchrun_argv(rdzv: Rendezvous, nproc_per_node: int, target: list[str], shutdown_timeout: int,
                  python: str = sys.executable) -> list[str]:
    """The torchrun command line for this node (torchrun = `python -m torch.distributed.run`)."""
    return [python, "-m", "torch.distributed.run",
            "--nnodes", str(rdzv.nnodes), "--node-rank", str(rdzv.node_rank),
            "--nproc-per-node", str(nproc_per_node),
            "--master-addr", rdzv.master_addr, "--master-port", str(rdzv.master_port),
            "--shutdown-timeout", str(shutdown_timeout),
            *target]


def main(argv: list[str] | None = None) -> int:
    argv, target = split_at_separator(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m launch.slurm.torchrun_slurm", description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc-per-node", type=int, default=None,
                   help="processes (GPUs) per node; default SLURM_GPUS_ON_NODE, else 1")
    p.add_argument("--shutdown-timeout", type=int, default=int(os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", 120)),
                   help="seconds torchrun waits for workers after SIGTERM before SIGKILL (default 120)")
    p.add_argument("--print", action="store_true", help="print the rendezvous as JSON and exit")
    args = p.parse_args(argv)
    try:
        rdzv = slurm_rendezvous()
    except SlurmEnvError as e:
        print(f"torchrun_slurm: {e}", file=sys.stderr)
        return 2
    nproc = args.nproc_per_node or int(os.environ.get("SLURM_GPUS_ON_NODE") or 1)
    if args.print:
        print(json.dumps({**asdict(rdzv), "nproc_per_node": nproc}))
        return 0
    if not target:
        p.error("give the training command after `--`, e.g. -- -m consumer.train --config configs/smoke_tp2.yaml")
    cmd = torchrun_argv(rdzv, nproc, target, args.shutdown_timeout)
    print(f"torchrun_slurm: node {rdzv.node_rank}/{rdzv.nnodes} ({os.environ.get('SLURMD_NODENAME', '?')}) "
          f"master {rdzv.master_addr}:{rdzv.master_port} nproc/node {nproc}: {' '.join(cmd)}", flush=True)
    sys.stdout.flush()
    # exec, so that SLURM's signals reach torchrun itself (the step's task) and nothing sits in between.
    os.execv(cmd[0], cmd)
    return 0  # unreachable


if __name__ == "__main__":
    sys.exit(main())

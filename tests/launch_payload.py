"""A stand-in trainer for the launch tests: the smallest real distributed job with the consumer's CLI shape.

    torchrun ... tests/launch_payload.py --config X [--save DIR] [--load DIR] [steps=N] [step_s=S]

It joins the process group torchrun sets up (gloo), runs N "steps" (an all-reduce each, checked), and
follows the checkpoint contract the real trainer has: `--load DIR` resumes from the step saved there,
SIGTERM (SLURM preemption) makes every rank stop at the same step boundary, save and exit 0, and
`--save DIR` also saves at the end. Each run appends one JSON line per rank to DIR/payload_runs.jsonl
(step range, why it stopped, world size, rank, node, master), which is what the tests read.
"""
import json
import os
import signal
import sys
import time

import torch
import torch.distributed as dist


def parse(argv):
    opts = {"config": None, "save": None, "load": None, "steps": 10, "step_s": 0.2}
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("--config", "--save", "--load"):
            opts[a[2:]] = argv[i + 1]
            i += 2
            continue
        if "=" in a and not a.startswith("-"):
            k, v = a.split("=", 1)
            if k not in opts:
                sys.exit(f"launch_payload: unknown override {k!r}")
            opts[k] = type(opts[k])(v) if opts[k] is not None else v
            i += 1
            continue
        sys.exit(f"launch_payload: unknown argument {a!r}")
    return opts


def main():
    opts = parse(sys.argv[1:])
    stop = {"term": False}

    def on_term(signum, frame):  # idempotent: SLURM and torchrun may both deliver SIGTERM
        stop["term"] = True

    signal.signal(signal.SIGTERM, on_term)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    state_path = os.path.join(opts["load"], "payload_state.json") if opts["load"] else None
    start = 0
    if state_path and os.path.exists(state_path):
        with open(state_path) as f:
            start = json.load(f)["step"]
    step, reason = start, "finished"
    while step < opts["steps"]:
        t = torch.tensor([float(rank + 1), float(stop["term"])])
        dist.all_reduce(t[:1])
        flag = t[1:].clone()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # all ranks stop at the same step
        assert t[0].item() == world * (world + 1) / 2, f"all-reduce gave {t[0].item()}"
        if flag.item() > 0:
            reason = "sigterm"
            break
        step += 1
        if rank == 0:
            print(f"launch_payload step {step}", flush=True)
        time.sleep(opts["step_s"])
    if opts["save"]:
        os.makedirs(opts["save"], exist_ok=True)
        dist.barrier()
        if rank == 0:
            tmp = os.path.join(opts["save"], "payload_state.json.tmp")
            with open(tmp, "w") as f:
                json.dump({"step": step}, f)
            os.replace(tmp, os.path.join(opts["save"], "payload_state.json"))
        record = {"run": int(os.environ.get("SLURM_RESTART_COUNT", 0)), "start": start, "end": step, "reason": reason,
                  "rank": rank, "world": world, "node": os.environ.get("SLURMD_NODENAME", ""),
                  "master": f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}", "config": opts["config"]}
        with open(os.path.join(opts["save"], "payload_runs.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
    dist.barrier()
    dist.destroy_process_group()
    print(f"launch_payload rank {rank}/{world}: steps {start}->{step} ({reason})", flush=True)


if __name__ == "__main__":
    main()

"""A stand-in Ray application for the launch tests: joins the cluster given by --address, checks that the
expected number of nodes is there, runs one tiny task pinned to each node, and writes what ran where.

    python tests/ray_payload.py --address HOST:PORT --nodes N --out result.json
"""
import argparse
import json
import os
import socket
import time

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


@ray.remote(num_cpus=0.1)
def where(x):
    return {"x": x, "square": x * x, "host": socket.gethostname(), "slurm_node": os.environ.get("SLURMD_NODENAME", ""),
            "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--address", default=None)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    ray.init(address=args.address, logging_level="WARNING")
    deadline = time.time() + 60
    while True:
        alive = [n for n in ray.nodes() if n["Alive"]]
        if len(alive) >= args.nodes or time.time() > deadline:
            break
        time.sleep(0.5)
    results = ray.get([where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                       .remote(i) for i, n in enumerate(alive)])
    out = {"nodes_alive": len(alive), "results": results, "cluster_cpus": ray.cluster_resources().get("CPU", 0),
           "auth_mode": os.environ.get("RAY_AUTH_MODE", "")}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"ray_payload: {len(alive)} node(s), tasks ran on {sorted({r['node_id'][:8] for r in results})}", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()

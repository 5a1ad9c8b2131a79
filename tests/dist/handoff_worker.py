"""torchrun worker for tests/test_stage_handoff.py: load one training checkpoint three ways in one process, as
consumer.train does at start-up (setup + Checkpointer.load), and record what each start holds:

    handoff_worker.py --ckpt DIR --out PREFIX [key=value ...]   (config: configs/smoke_tp2.yaml + overrides)

  resume      checkpoint.load=DIR: everything
  handoff     checkpoint.pretrained=DIR checkpoint.pretrained_optimizer=true: weights and optimizer state
  weights     checkpoint.pretrained=DIR: weights only

Writes PREFIX.rank<r>.json ({start: {"step", "lr", "consumed_samples", "has_adam_state"}}) and
PREFIX.rank<r>.safetensors (per start: the model's output on fixed inputs and this rank's Adam moments).
"""
import argparse
import json
import os
import sys

import torch
import torch.distributed as dist


def adam_moments(optimizer) -> dict:
    """This rank's Adam state tensors (its distributed-optimizer shard), in parameter order."""
    out = {}
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        for g, group in enumerate(inner.param_groups):
            for i, p in enumerate(group["params"]):
                for name in ("exp_avg", "exp_avg_sq"):
                    if name in inner.state[p]:
                        out[f"{name}.{g}.{i}"] = inner.state[p][name].detach().clone()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    from safetensors.torch import save_file

    from consumer.checkpointing import Checkpointer
    from consumer.config import load_config
    from consumer.train import setup
    from megatron_qwen_image.parallel import destroy_parallel
    from tests.dist.ckpt_worker import probe_output

    starts = {"resume": [f"checkpoint.load={args.ckpt}"],
              "handoff": [f"checkpoint.pretrained={args.ckpt}", "checkpoint.pretrained_optimizer=true"],
              "weights": [f"checkpoint.pretrained={args.ckpt}"]}
    info, tensors = {}, {}
    for name, keys in starts.items():
        cfg = load_config(os.path.join("configs", "smoke_tp2.yaml"), [*args.overrides, *keys])
        state, ctx, _ = setup(cfg)
        assert Checkpointer(cfg, ctx).load(state)
        moments = adam_moments(state.optimizer)
        info[name] = {"step": state.step, "consumed_samples": state.consumed_samples,
                      "lr": state.optimizer.param_groups[0]["lr"], "has_adam_state": bool(moments),
                      "data_position": state.data_iterator.state_dict()["position"]}
        tensors[f"{name}/output"] = probe_output(state.model)
        tensors.update({f"{name}/{k}": v.contiguous() for k, v in moments.items()})
        state.data_iterator.close()
    rank = dist.get_rank()
    with open(f"{args.out}.rank{rank}.json", "w") as f:
        json.dump(info, f)
    save_file(tensors, f"{args.out}.rank{rank}.safetensors")
    destroy_parallel()
    return 0


if __name__ == "__main__":  # guard needed: dist_checkpointing's loader may start processes that re-import __main__
    sys.exit(main())

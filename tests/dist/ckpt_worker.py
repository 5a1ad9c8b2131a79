"""torchrun worker for tests/test_checkpoint_train.py: consumer.train.train with the real Checkpointer,
plus probes of the model's output on fixed inputs after a load and after each save.

    ckpt_worker.py --out PREFIX [--stop-at STEP] [key=value ...]   (config: configs/smoke_tp2.yaml + overrides)

Writes PREFIX.rank<r>.json ({"losses": {step: loss}, "loaded_step", "overlap": [grad reduce, param gather],
"tp", "dp"}) and, from rank 0,
PREFIX.probes.safetensors with "load" (output right after the checkpoint was loaded) and "save@<step>".
--stop-at STEP ends training after STEP (through the checkpoint seam's stop signal).
"""
import argparse
import json
import os
import sys

import torch
import torch.distributed as dist


def probe_output(model) -> torch.Tensor:
    """The model's forward on fixed inputs (padding, non-square grid), identical on every TP rank."""
    from tests.reference_models import make_inputs

    inputs = make_inputs(2, 4, 6, [7, 3], seed=11)
    module = model
    while hasattr(module, "module"):
        module = module.module
    with torch.no_grad():
        return module(**inputs).detach().clone()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--stop-at", type=int)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    import consumer.train as train_mod
    from consumer.checkpointing import Checkpointer
    from consumer.config import load_config

    probes = {}
    info = {}

    class ProbingCheckpointer(Checkpointer):
        def load(self, state):
            loaded = super().load(state)
            info["loaded_step"] = state.step
            ddp = state.model.ddp_config
            info["overlap"] = [ddp.overlap_grad_reduce, ddp.overlap_param_gather]
            if loaded:
                probes["load"] = probe_output(state.model)
            return loaded

        def save(self, state):
            path = super().save(state)
            probes[f"save@{state.step}"] = probe_output(state.model)
            return path

        def maybe_save(self, state):
            stop = super().maybe_save(state)
            return stop or (args.stop_at is not None and state.step >= args.stop_at)

    cfg = load_config(os.path.join("configs", "smoke_tp2.yaml"), args.overrides)
    records = train_mod.train(cfg, make_checkpointer=ProbingCheckpointer)

    from megatron.core import parallel_state

    rank = dist.get_rank()
    result = {"rank": rank, "losses": {r["step"]: r["loss"] for r in records}, "loaded_step": info["loaded_step"],
              "overlap": info["overlap"],
              "tp": parallel_state.get_tensor_model_parallel_world_size(),
              "dp": parallel_state.get_data_parallel_world_size()}
    with open(f"{args.out}.rank{rank}.json", "w") as f:
        json.dump(result, f)
    if rank == 0 and probes:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in probes.items()}, f"{args.out}.probes.safetensors")
    from megatron_qwen_image.parallel import destroy_parallel

    destroy_parallel()
    return 0


if __name__ == "__main__":  # guard needed: dist_checkpointing's writer starts processes that re-import __main__
    sys.exit(main())

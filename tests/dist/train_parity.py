"""torchrun worker for tests/test_distributed_optimizer.py and tests/test_overlap.py: a few training steps
through consumer.train.train.

Runs the real training path (megatron DDP, megatron optimizer, scheduler, recompute as configured) on the
tiny model and synthetic data, and writes one JSON per rank with the per-step losses / grad norms, the
sample keys it trained on, its local parameter count, the bytes of optimizer state it holds and the number
of DDP bucket groups.

--save-init FILE  (TP=1 only) write the freshly initialised full weights (safetensors) before training
--load-init FILE  load those full weights, taking this rank's TP shard of each tensor (model's weight mapping)
"""
import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from consumer.synthetic_data import SyntheticLatentBatches
from consumer.train import train
from consumer.config import load_config


class RecordingIterator:
    """Wraps the data iterator and remembers the keys of every batch this rank received."""

    def __init__(self, inner):
        self.inner, self.keys = inner, []

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.inner)
        self.keys.append(list(batch["keys"]))
        return batch


class InitAndInspect:
    """In the checkpointer's place: `load` sets the initial weights, `maybe_save` measures optimizer state."""

    def __init__(self, save_init=None, load_init=None):
        self.save_init, self.load_init = save_init, load_init
        self.optimizer_state_bytes = None
        self.local_params = None
        self.bucket_groups = None

    def load(self, state):
        from megatron.core import parallel_state

        from megatron_qwen_image.model.diffusers_mapping import tensor_mappings_for

        model = state.model.module
        self.local_params = sum(p.numel() for p in model.parameters())
        self.bucket_groups = len(state.model.bucket_groups)
        if self.save_init:
            assert parallel_state.get_tensor_model_parallel_world_size() == 1
            if dist.get_rank() == 0:
                save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()
                           if isinstance(v, torch.Tensor)}, self.save_init)
            dist.barrier()
        if self.load_init:
            full = load_file(self.load_init)
            tp, rank = (parallel_state.get_tensor_model_parallel_world_size(),
                        parallel_state.get_tensor_model_parallel_rank())
            params = dict(model.named_parameters())
            with torch.no_grad():
                for mp in tensor_mappings_for(model.config):
                    params[mp.megatron].copy_(mp.shard(full[mp.megatron], tp, rank))
            state.optimizer.reload_model_params()
        return False

    def maybe_save(self, state):
        if self.optimizer_state_bytes is None:  # after the first step Adam's state exists
            inner = state.optimizer.optimizer
            self.optimizer_state_bytes = sum(t.numel() * t.element_size() for s in inner.state.values()
                                             for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
        return False

    def close(self):
        pass


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--save-init")
    ap.add_argument("--load-init")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_config(os.path.join("configs", "model", "tiny.yaml"), args.overrides)

    world = int(os.environ["WORLD_SIZE"])
    dp = world // cfg.parallelism.tensor_model_parallel_size
    rank = int(os.environ["RANK"])
    dp_rank = rank // cfg.parallelism.tensor_model_parallel_size  # megatron's default order: TP ranks are adjacent
    data = RecordingIterator(SyntheticLatentBatches(
        cfg.train.global_batch_size, dp_rank, dp, cfg.train.seed, text_dim=cfg.model.joint_attention_dim,
        **cfg.data.synthetic.build_kwargs()))
    hook = InitAndInspect(args.save_init, args.load_init)
    records = train(cfg, data_iterator=data, make_checkpointer=lambda cfg, ctx: hook)

    from megatron.core import parallel_state

    assert parallel_state.get_data_parallel_rank() == dp_rank
    result = {
        "rank": rank, "tp_rank": parallel_state.get_tensor_model_parallel_rank(), "dp_rank": dp_rank,
        "losses": [r["loss"] for r in records], "grad_norms": [r["grad_norm"] for r in records],
        "keys": data.keys, "local_params": hook.local_params, "optimizer_state_bytes": hook.optimizer_state_bytes,
        "bucket_groups": hook.bucket_groups,
    }
    with open(f"{args.out}.rank{rank}.json", "w") as f:
        json.dump(result, f)
    from megatron_qwen_image.parallel import destroy_parallel

    destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())

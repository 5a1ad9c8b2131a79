"""torchrun worker for tests/test_validation_loss.py: the validation loss of a cache at TP=world size (with
sequence parallelism) and at DP=world size, in one launch.

Every rank builds the same tiny random diffusers model (same seed) and loads its TP shard into our model;
writes OUT/{layout}-rank{r}.json with what consumer.validation_loss.validation_loss returned."""
import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megatron.core import parallel_state  # noqa: E402

from consumer.validation_loss import DEFAULT_SIGMAS, load_held_out, validation_loss  # noqa: E402
from megatron_qwen_image import cpu_emulation  # noqa: E402
from tests.reference_models import build_tiny_diffusers_transformer, megatron_from_diffusers  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cache", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--max-samples", type=int, required=True)
    parser.add_argument("--micro-batch-size", type=int, required=True)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cpu_emulation.apply_if_needed()  # sequence parallelism's megatron gathers allocate on CUDA
    diff = build_tiny_diffusers_transformer(seed=0)
    samples = load_held_out(args.cache, None, args.max_samples)
    for layout, tp in (("tp", world), ("dp", 1)):
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
        model = megatron_from_diffusers(diff, tp, parallel_state.get_tensor_model_parallel_rank(),
                                        sequence_parallel=tp > 1).eval()
        result = validation_loss(model, samples, DEFAULT_SIGMAS, args.seed, args.micro_batch_size,
                                 model.config.patch_size, torch.device("cpu"), torch.float32,
                                 dp_rank=parallel_state.get_data_parallel_rank(),
                                 dp_size=parallel_state.get_data_parallel_world_size(),
                                 dp_group=parallel_state.get_data_parallel_group())
        with open(os.path.join(args.out, f"{layout}-rank{rank}.json"), "w") as f:
            json.dump({"tp": tp, **result}, f, indent=1)
        parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""torchrun worker (1 process) for tests/test_train_smoke.py: the same short run under several recompute
settings, one after another in this process (same seed -> same initial weights and data), losses to JSON."""
import json
import os
import sys

from consumer.train import train
from consumer.config import load_config
from megatron_qwen_image.parallel import destroy_parallel

VARIANTS = {
    "none": [],
    "selective": ["recompute.recompute_granularity=selective", "recompute.recompute_modules=[core_attn, layernorm, mlp]"],
    "full_uniform": ["recompute.recompute_granularity=full", "recompute.recompute_method=uniform", "recompute.recompute_num_layers=2"],
    "full_block": ["recompute.recompute_granularity=full", "recompute.recompute_method=block", "recompute.recompute_num_layers=1"],
}


def main():
    out, *common = sys.argv[1:]
    losses = {}
    for name, extra in VARIANTS.items():
        cfg = load_config(os.path.join("configs", "model", "tiny.yaml"),
                          [*common, *extra, f"logging.log_jsonl={out}.{name}.jsonl"])
        losses[name] = [r["loss"] for r in train(cfg)]
    with open(out, "w") as f:
        json.dump(losses, f)
    destroy_parallel()


if __name__ == "__main__":
    main()

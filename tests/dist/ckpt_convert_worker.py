"""torchrun worker for tests/test_convert.py: the train loop's `--pretrained CKPT` path at the config's TP
(configs/smoke_tp2.yaml: TP=2) with an imported diffusers checkpoint, then our model's outputs against the
diffusers model's on the parity shapes. Writes OUT.rank<r>.json with the relative errors."""
import argparse
import json
import sys

import torch
import torch.distributed as dist


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--diffusers", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from diffusers import QwenImageTransformer2DModel

    from consumer.checkpointing import Checkpointer, unwrap_model
    from consumer.train import setup
    from consumer.config import load_config
    from megatron_qwen_image.parallel import destroy_parallel
    from tests.reference_models import PARITY_SHAPES, diffusers_forward, make_inputs, rel_max_err

    cfg = load_config("configs/smoke_tp2.yaml", [f"checkpoint.pretrained={args.ckpt}"])
    state, ctx, _ = setup(cfg)
    assert Checkpointer(cfg, ctx).load(state)
    model = unwrap_model(state.model)
    reference = QwenImageTransformer2DModel.from_pretrained(args.diffusers).eval()
    errors = []
    with torch.no_grad():
        for i, (batch, h, w, lens, frames) in enumerate(PARITY_SHAPES):
            inputs = make_inputs(batch, h, w, lens, seed=100 + i, frames=frames)
            errors.append(rel_max_err(model(**inputs), diffusers_forward(reference, inputs)))
    with open(f"{args.out}.rank{dist.get_rank()}.json", "w") as f:
        json.dump({"tp": ctx.tp_size, "errors": errors, "step": state.step}, f)
    destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())

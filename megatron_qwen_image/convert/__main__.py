"""python -m megatron_qwen_image.convert import-diffusers|export-diffusers ... (see --help)."""
from __future__ import annotations

import argparse
import sys

import torch

from megatron_qwen_image.checkpoint_format import CheckpointNotFoundError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_qwen_image.convert",
                                description="Convert between diffusers' QwenImageTransformer2DModel and "
                                            "megatron-qwen-image (torch_dist) checkpoints, tensor by tensor.")
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import-diffusers", help="diffusers transformer directory -> megatron checkpoint")
    imp.add_argument("--src", required=True, help="diffusers QwenImageTransformer2DModel directory (config.json + "
                                                  "safetensors), or a pipeline directory with transformer/")
    imp.add_argument("--dst", required=True, help="checkpoint directory to create (for --pretrained / --load)")
    imp.add_argument("--tp", type=int, default=1, help="tensor-parallel size to lay the checkpoint out for "
                                                      "(must divide the heads; it loads at any valid TP)")
    imp.add_argument("--dtype", choices=sorted(DTYPES), help="cast the weights (default: keep the stored dtype)")
    exp = sub.add_parser("export-diffusers", help="megatron checkpoint -> diffusers transformer directory")
    exp.add_argument("--src", required=True, help="checkpoint directory, or a --save root (its `latest` is used)")
    exp.add_argument("--dst", required=True, help="directory to create for QwenImageTransformer2DModel.from_pretrained")
    exp.add_argument("--dtype", choices=sorted(DTYPES), help="cast the weights (default: keep the stored dtype)")
    exp.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    for sp in (imp, exp):
        sp.add_argument("--quiet", action="store_true", help="no progress output")
    args = p.parse_args(argv)

    # Imported only now: these import megatron-core (seconds, and its import-time warnings), which --help
    # and usage errors do not need.
    from .diffusers_dir import ConversionError
    from .exporter import export_diffusers, parse_size
    from .importer import import_diffusers

    try:
        if args.command == "import-diffusers":
            import_diffusers(args.src, args.dst, tp=args.tp, dtype=DTYPES.get(args.dtype), progress=not args.quiet)
        else:
            export_diffusers(args.src, args.dst, dtype=DTYPES.get(args.dtype),
                             max_shard_bytes=parse_size(args.max_shard_size), progress=not args.quiet)
    except (ConversionError, CheckpointNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

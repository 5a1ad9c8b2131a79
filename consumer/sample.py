"""Generate images from a training checkpoint or an imported release, as diffusers' QwenImagePipeline does.

    python -m consumer.sample --load runs/ckpt --encoders ENCODERS --prompt "a red sign that reads OPEN" --out out/
    torchrun --standalone --nproc-per-node 2 -m consumer.sample --pretrained ckpt/qwen-image-tp2 \\
        --encoders ENCODERS --prompts prompts.yaml --negative-prompt " " --guidance 4 --steps 50 --out out/

All processes form one tensor-parallel group (TP = the number of processes) and run the same sampling loop
(megatron_qwen_image.sampling); rank 0 encodes the prompts (the only process that loads the text encoder),
shares their features, decodes the final latents with the VAE and writes `NNN_<prompt>.png` per prompt,
`grid.png`, and `samples.jsonl` (prompt, size, seed, steps, guidance, checkpoint of every image).

Noise: image i of `--prompt` is drawn from `torch.Generator().manual_seed(--seed + i)`, a prompts-file entry
from its own `seed`, exactly as QwenImagePipeline draws it for that generator: an image made here is
reproduced by diffusers from the exported checkpoint (`python -m megatron_qwen_image.convert export-diffusers`)
with `generator=torch.Generator().manual_seed(seed)`, the same steps and true_cfg_scale, and the other way round.

`--prompts` takes a prompts file (YAML or JSONL: prompt, negative_prompt, width, height, seed, image) or an
encoded prompts file (`python -m megatron_qwen_image.prompts encode`), which needs no text encoder.

Editing: `--image SRC` (repeat for the edit_plus template's several sources) makes every --prompt an edit
instruction for that source, and a prompts-file entry with `image:` is one; they are encoded, sampled and
sized as QwenImageEditPipeline does (`--edit-template edit_plus`: QwenImageEditPlusPipeline), so an Edit or
Edit-2511 checkpoint (imported, or fine-tuned here) edits as diffusers would:

    python -m consumer.sample --pretrained ckpt/qwen-image-edit-2511 --encoders EDIT_REPO --image photo.png \
        --prompt "Change the sign's text to OPEN" --negative-prompt " " --guidance 4 --out out/
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from tqdm import tqdm

from consumer.checkpointing import load_model_weights
from consumer.builders import build_model
from consumer.config import KernelsSection
from megatron_qwen_image import checkpoint_format
from megatron_qwen_image.encoders.text import QwenTextEncoder
from megatron_qwen_image.encoders.vae import QwenVAEEncoder
from megatron_qwen_image.cache.buckets import CONDITION_AREA, condition_size
from megatron_qwen_image.encoders.local_dir import (PROCESSOR, TEXT_ENCODER, TOKENIZER, VAE, EncoderDirError,
                                                    check_encoders_dir)
from megatron_qwen_image.image_grid import image_grid, save_png
from megatron_qwen_image.model.diffusers_mapping import config_from_diffusers
from megatron_qwen_image.parallel import destroy_parallel, init_parallel
from megatron_qwen_image.prompts import (DEFAULT_SIZE, EncodedPrompts, PromptsFileError, PromptSpec, check_encoded,
                                         encode_prompts, is_encoded_file, load_edit_encoders, load_encoded,
                                         read_prompts_file)
from megatron_qwen_image.sampling import SampleRequest, check_size, decode_images, generate, load_scheduler


class SampleError(ValueError):
    """A refused command line; the message is one line."""


def resolve_checkpoint(load: Optional[str], pretrained: Optional[str]) -> str:
    """The complete checkpoint directory named by --load (a checkpoint root or directory) or --pretrained."""
    flag, path = ("--load", load) if load else ("--pretrained", pretrained)
    if not path:
        raise SampleError("give the model: --load CKPT (a training checkpoint root or directory) or --pretrained DIR "
                          "(an imported release: python -m megatron_qwen_image.convert import-diffusers)")
    if load and pretrained:
        raise SampleError("give one of --load and --pretrained, not both")
    try:
        found = checkpoint_format.resolve(path) if os.path.isdir(path) else None
    except checkpoint_format.CheckpointNotFoundError as e:
        raise SampleError(f"{flag} {path}: {e}") from None
    if found is None:
        raise SampleError(f"{flag} {path}: no complete checkpoint there")
    return found


def load_model(ckpt_dir: str, tp: int, device: torch.device, bf16: bool):
    """Our QwenImageMMDiT at TP=`tp` (megatron parallel state initialised), with the checkpoint's weights, in
    eval mode. The model shape comes from the checkpoint itself (its diffusers config)."""
    dconfig = dist_checkpointing.load_common_state_dict(ckpt_dir).get("diffusers_config")
    if not dconfig:
        raise SampleError(f"{ckpt_dir}: the checkpoint records no model configuration (diffusers_config)")
    kernels = KernelsSection()
    fusion = kernels.fusion_backend(device.type)
    config = config_from_diffusers(dconfig, tensor_model_parallel_size=tp, perform_initialization=False,
                                   use_cpu_initialization=True, bf16=bf16,
                                   params_dtype=torch.bfloat16 if bf16 else torch.float32,
                                   **fusion.mlp_activation_fields())
    model = build_model(config, device, fusion, kernels.layer_backend(device.type))
    load_model_weights(model, ckpt_dir)
    return model.eval()


def prompt_specs(args) -> list[PromptSpec]:
    """The --prompt / --prompts entries, with --negative-prompt, --width/--height and --seed as defaults."""
    width, height = args.width or DEFAULT_SIZE, args.height or DEFAULT_SIZE
    if args.prompts:
        specs = read_prompts_file(args.prompts, default_width=width, default_height=height,
                                  condition_area=args.condition_area)
        return [s if s.negative_prompt is not None else dataclasses.replace(s, negative_prompt=args.negative_prompt)
                for s in specs]
    images = tuple(os.path.abspath(p) for p in args.image)
    if images and not (args.width and args.height):  # the edit pipeline's output size, from the source
        from PIL import Image

        with Image.open(images[0]) as im:
            width, height = condition_size(*im.size, args.condition_area)
    return [PromptSpec(p, args.negative_prompt, width, height, args.seed + i, images=images)
            for i, p in enumerate(args.prompt)]


def check_args(args, encoded_file: bool) -> None:
    """Every refusal that needs no process group, before any process loads a model (`encoded_file`: --prompts
    is an encoded prompts file, which needs no text encoder)."""
    if bool(args.prompt) == bool(args.prompts):
        raise SampleError("give --prompt TEXT (repeatable) or --prompts FILE")
    try:
        check_size(args.width or DEFAULT_SIZE, args.height or DEFAULT_SIZE)
    except ValueError as e:
        raise SampleError(f"--{e}") from None
    if args.steps < 1:
        raise SampleError(f"--steps must be >= 1, got {args.steps}")
    if args.batch_size < 1:
        raise SampleError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.guidance < 0:
        raise SampleError(f"--guidance must be >= 0, got {args.guidance}")
    needs_text = not encoded_file
    if not args.encoders:
        raise SampleError("--encoders DIR is required (the VAE that decodes the images"
                          + (", and the text encoder" if needs_text else "") + ")")
    try:
        check_encoders_dir(args.encoders, (TEXT_ENCODER, TOKENIZER, VAE) if needs_text else (VAE,))
    except EncoderDirError as e:
        raise SampleError(f"--encoders: {e}") from None
    if args.prompts and not os.path.isfile(args.prompts):
        raise SampleError(f"--prompts {args.prompts}: no such file")
    if args.image and args.prompts:
        raise SampleError("--image goes with --prompt; in a prompts file give each entry its `image:`")
    for path in args.image:
        if not os.path.isfile(path):
            raise SampleError(f"--image {path}: no such file")
    if len(args.image) > 1 and args.edit_template != "edit_plus":
        raise SampleError(f"{len(args.image)} --image sources need --edit-template edit_plus (the edit template takes one)")
    if args.image and needs_text:
        try:
            check_encoders_dir(args.encoders, (PROCESSOR,))
        except EncoderDirError as e:
            raise SampleError(f"--encoders: editing needs the Qwen2-VL processor: {e}") from None


def encode_on_rank0(args, specs: Optional[list[PromptSpec]], rank: int, device: torch.device) -> EncodedPrompts:
    """Rank 0 encodes `specs` (None: reads the encoded --prompts file) and sends the result, or its refusal
    (a prompt longer than the text encoder takes), to every rank: all of them stop together."""
    box = [None]
    if rank == 0:
        try:
            if specs is None:
                box[0] = load_encoded(args.prompts)
            else:
                t0 = time.perf_counter()
                encoder = QwenTextEncoder.from_pretrained(args.encoders, device=device)
                edit = load_edit_encoders(args.encoders, args.edit_template, args.condition_area, device) \
                    if any(s.images for s in specs) else None
                box[0] = encode_prompts(specs, encoder, edit)
                del encoder, edit
                print(f"encoded {len(box[0].prompts)} prompts in {time.perf_counter() - t0:.1f} s", flush=True)
        except PromptsFileError as e:
            box[0] = SampleError(str(e))
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], SampleError):
        raise box[0]
    return box[0]


def slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:n] or "prompt"


def write_outputs(out_dir: str, images, encoded: EncodedPrompts, meta: dict) -> str:
    """One PNG per prompt, grid.png and samples.jsonl under out_dir; returns the grid's path."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "samples.jsonl"), "w") as f:
        for i, (image, item) in enumerate(zip(images, encoded.prompts)):
            name = f"{i:03d}_{slug(item.spec.prompt)}.png"
            save_png(image, os.path.join(out_dir, name))
            f.write(json.dumps({"file": name, "prompt": item.spec.prompt, "negative_prompt": item.spec.negative_prompt,
                                "width": item.spec.width, "height": item.spec.height, "seed": item.spec.seed,
                                **({"images": list(item.spec.images)} if item.spec.images else {}),
                                **meta}) + "\n")
    grid = os.path.join(out_dir, "grid.png")
    save_png(image_grid(images, [item.spec.prompt for item in encoded.prompts]), grid)
    return grid


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m consumer.sample", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 1)[1])
    p.add_argument("--load", help="a training checkpoint root (its latest) or checkpoint directory")
    p.add_argument("--pretrained", help="an imported release (python -m megatron_qwen_image.convert import-diffusers)")
    p.add_argument("--encoders", help="Qwen-Image pipeline directory: text_encoder/, tokenizer/, vae/ (scheduler/ "
                                      "if present, else the released scheduler settings)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    p.add_argument("--prompts", help="prompts file (YAML/JSONL) or encoded prompts file")
    p.add_argument("--image", action="append", default=[],
                   help="an edit's source image: every --prompt edits it (repeat for edit_plus's several sources)")
    p.add_argument("--edit-template", default="edit", choices=("edit", "edit_plus"),
                   help="edit prompts as QwenImageEditPipeline (edit) or QwenImageEditPlusPipeline (edit_plus)")
    p.add_argument("--condition-area", type=int, default=CONDITION_AREA,
                   help="pixel area a source image is encoded at (the edit pipelines' 1024²); also the output "
                        "size without --width/--height")
    p.add_argument("--negative-prompt", help="negative prompt for true classifier-free guidance (Qwen-Image: ' ')")
    p.add_argument("--guidance", type=float, default=4.0,
                   help="true CFG scale (the pipeline's true_cfg_scale; off at <= 1 or without a negative prompt)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps")
    p.add_argument("--width", type=int, help=f"pixels, a multiple of 16 (default {DEFAULT_SIZE})")
    p.add_argument("--height", type=int, help=f"pixels, a multiple of 16 (default {DEFAULT_SIZE})")
    p.add_argument("--seed", type=int, default=0, help="seed of the first --prompt's noise (+1 per further prompt)")
    p.add_argument("--batch-size", type=int, default=4, help="images per sampling forward (same size)")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                   help="model dtype (auto: bf16 on a GPU, fp32 on CPU)")
    p.add_argument("--save-latents", action="store_true",
                   help="also write latents.pt: the final packed latents of every image (before the VAE)")
    p.add_argument("--out", default="samples", help="output directory")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    try:
        encoded_file = bool(args.prompts) and is_encoded_file(args.prompts)
        check_args(args, encoded_file)
        ckpt = resolve_checkpoint(args.load, args.pretrained)
        specs = None if encoded_file else prompt_specs(args)  # a bad prompts file is refused before any model loads
    except (SampleError, PromptsFileError) as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    world = int(os.environ.get("WORLD_SIZE", 1))
    ctx = init_parallel(world, seed=0)
    try:
        bf16 = {"auto": ctx.device.type == "cuda", "fp32": False, "bf16": True}[args.dtype]
        dtype = torch.bfloat16 if bf16 else torch.float32
        encoded = encode_on_rank0(args, specs, ctx.rank, ctx.device)
        model = load_model(ckpt, ctx.tp_size, ctx.device, bf16)
        try:
            check_encoded(encoded, model.config.joint_attention_dim)
        except PromptsFileError as e:
            raise SampleError(str(e)) from None
        if ctx.is_main:
            print(f"megatron-qwen-image sample: {len(encoded.prompts)} images from {ckpt} at TP {ctx.tp_size} | "
                  f"{'bf16' if bf16 else 'fp32'} on {ctx.device} | {args.steps} steps | guidance {args.guidance} "
                  f"(true CFG where a negative prompt is given)", flush=True)
        bar = tqdm(total=None, desc="sampling", unit="step", disable=not ctx.is_main, file=sys.stderr)

        def progress(done, total):
            bar.total = total
            bar.update(done - bar.n)

        t0 = time.perf_counter()
        requests = [SampleRequest.from_prompt(p) for p in encoded.prompts]
        latents = generate(model, requests, args.steps, args.guidance, ctx.device, dtype, args.batch_size,
                           load_scheduler(args.encoders), progress)
        bar.close()
        if ctx.is_main:
            sampled_s = time.perf_counter() - t0
            vae = QwenVAEEncoder.from_pretrained(args.encoders, device=ctx.device, decoder_only=True)
            images = [decode_images(vae, lat[None], item.spec.width, item.spec.height)[0]
                      for lat, item in zip(latents, encoded.prompts)]
            meta = {"steps": args.steps, "guidance": args.guidance, "checkpoint": ckpt, "tp": ctx.tp_size,
                    "dtype": "bf16" if bf16 else "fp32"}
            grid = write_outputs(args.out, images, encoded, meta)
            if args.save_latents:
                torch.save([lat.cpu() for lat in latents], os.path.join(args.out, "latents.pt"))
            print(f"{len(images)} images in {sampled_s:.1f} s -> {args.out} (grid: {grid})", flush=True)
    except SampleError as e:
        if ctx.is_main:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        destroy_parallel()
    return 0


if __name__ == "__main__":  # guard: megatron's dist_checkpointing may spawn processes that re-import __main__
    sys.exit(main())

"""Validation prompts: read from a small file, encoded once by the text encoder, stored next to the run.

Training ranks sample validation images from the stored embeddings, so they never load Qwen2.5-VL (7B):

    python -m megatron_qwen_image.prompts encode PROMPTS_FILE --encoders DIR --out FILE [--device auto|cpu|cuda]
                                          [--dtype auto|fp32|bf16] [--width W --height H]
    python -m megatron_qwen_image.prompts show FILE

Prompts file, chosen by extension:
  .yaml / .yml / .json  a list of entries, or a mapping whose only key `prompts:` holds that list; entries are
                        counted from 0 ("item 2") in messages;
  .jsonl                one entry per line; blank lines and lines starting with `#` are skipped; messages name
                        the line number.
An entry is a prompt string, or a mapping with the fields prompt (required, non-empty), negative_prompt,
width, height (positive multiples of 16: the VAE's factor 8 times the 2x2 patch), seed (an int >= 0) and image
(an edit prompt: the source image's path, or a list of paths for the edit_plus template, relative to the
prompts file). Sizes default to the reader's defaults (--width/--height, 1024 x 1024 as diffusers'
QwenImagePipeline); an edit entry's to what QwenImageEditPipeline makes of its first source image (the
condition area, aspect kept, multiples of 32). The seed defaults to the entry's index among the entries.

Edit prompts are encoded as QwenImageEditPipeline (or ...EditPlusPipeline, `--edit-template edit_plus`) does:
the instruction (and the negative prompt) with the source image(s) in the prompt, and the sources' VAE latents
(megatron_qwen_image.encoders.edit), so validation and sampling edit exactly as the pipeline would.

Encoded file (one safetensors file, format PROMPTS_FORMAT, version PROMPTS_VERSION): tensor `prompt.{i}`
[L_i, D] per prompt and `negative.{i}` [L'_i, D] for those with a negative prompt, unpadded, exactly as
QwenTextEncoder.encode returns them (the edit encoder's for edit prompts), and `cond.{i}.{k}` [16, h, w], the
k-th source image's normalised latents of edit prompt i; the metadata holds `format`, `version`, `prompts`
(the specs as a JSON list) and `info` (JSON: text_encoder, hidden_size, drop_index, max_length, dtype,
format_version; edit_template and condition_area when it has edit prompts). Version 2 added the edit prompts;
version-1 files read unchanged.
A prompt longer than the encoder's limit is refused, never truncated: a validation image of a cut prompt
would silently show something else than the file says.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import torch
import yaml
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from megatron_qwen_image.cache.buckets import CONDITION_AREA, condition_size
from megatron_qwen_image.cache.format import PIXEL_MULTIPLE  # VAE factor 8 x patch 2
from megatron_qwen_image.config import yaml_load
from megatron_qwen_image.encoders.local_dir import EncoderDirError
from megatron_qwen_image.fsutil import atomic_replace

if TYPE_CHECKING:  # only for annotations: the trainer reads encoded files through this module without transformers
    from megatron_qwen_image.encoders.text import QwenTextEncoder

PROMPTS_FORMAT = "megatron-qwen-image-prompts"
PROMPTS_VERSION = 2
DEFAULT_SIZE = 1024  # QwenImagePipeline's default height and width
FIELDS = ("prompt", "negative_prompt", "width", "height", "seed", "image")
PROMPTS_FILE_EXTENSIONS = (".yaml", ".yml", ".json", ".jsonl")
_MAX_SEED = 2**64  # torch.Generator.manual_seed's range
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class PromptsFileError(ValueError):
    """A prompts file or an encoded-prompts file is invalid; the one-line message names the file and entry."""


@dataclass(frozen=True)
class PromptSpec:
    prompt: str
    negative_prompt: str | None = None
    width: int = DEFAULT_SIZE
    height: int = DEFAULT_SIZE
    seed: int = 0
    origin: str = field(default="", compare=False)  # "prompts file F, item 2": where messages point
    images: tuple = ()  # an edit prompt's source image paths (absolute), in order


@dataclass
class EncodedPrompt:
    spec: PromptSpec
    embeds: torch.Tensor  # [L, D]
    negative_embeds: torch.Tensor | None  # [L', D], None without a negative prompt
    cond_latents: tuple = ()  # an edit prompt's source latents, [16, h, w] each


@dataclass
class EncodedPrompts:
    prompts: list[EncodedPrompt]
    info: dict[str, Any]
    path: str = field(default="", compare=False)  # the file it was loaded from, for messages


# --------------------------------------------------------------------------------------------------
# Reading a prompts file
# --------------------------------------------------------------------------------------------------
def read_prompts_file(path: str, default_width: int = DEFAULT_SIZE, default_height: int = DEFAULT_SIZE,
                      condition_area: int = CONDITION_AREA) -> list[PromptSpec]:
    """The file's entries as PromptSpecs, in order; raises PromptsFileError (one line) on any bad entry.
    `condition_area`: the edit pipeline's condition area, which sizes an edit entry without width/height."""
    where = f"prompts file {path}"
    for name, value in (("default width", default_width), ("default height", default_height)):
        if not _is_size(value):
            raise PromptsFileError(f"{where}: {name} must be a positive integer divisible by {PIXEL_MULTIPLE}, "
                                   f"got {value!r}")
    ext = os.path.splitext(path)[1].lower()
    if ext not in PROMPTS_FILE_EXTENSIONS:
        raise PromptsFileError(f"{where}: unknown file type {ext or '(none)'!r}; use .yaml/.yml/.json (a list of "
                               "prompts) or .jsonl (one JSON object per line)")
    if not os.path.isfile(path):
        raise PromptsFileError(f"{where}: not found (or not a file)")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise PromptsFileError(f"{where}: cannot read it: {e}") from None
    entries = _jsonl_entries(where, text) if ext == ".jsonl" else _list_entries(where, text, ext)
    if not entries:
        raise PromptsFileError(f"{where}: holds no prompts")
    defaults = {"width": default_width, "height": default_height}
    base = os.path.dirname(os.path.abspath(path))
    return [_spec(f"{where}, {entry}", value, index, defaults, base, condition_area)
            for index, (entry, value) in enumerate(entries)]


def _jsonl_entries(where: str, text: str) -> list[tuple[str, Any]]:
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            entries.append((f"line {number}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise PromptsFileError(f"{where}, line {number}: invalid JSON: {e.msg} (column {e.colno})") from None
    return entries


def _list_entries(where: str, text: str, ext: str) -> list[tuple[str, Any]]:
    try:
        data = json.loads(text) if ext == ".json" else yaml_load(text)
    except json.JSONDecodeError as e:
        raise PromptsFileError(f"{where}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise PromptsFileError(f"{where}: YAML syntax error{at}: {problem}") from None
    if isinstance(data, dict):
        for key in data:
            if key != "prompts":
                raise PromptsFileError(f"{where}: unknown top-level key {key!r}{_did_you_mean(key, ('prompts',))}; "
                                       "the file holds a list of prompts or a mapping with a 'prompts:' list")
        data = data.get("prompts")
    if data is None:
        return []
    if not isinstance(data, list):
        raise PromptsFileError(f"{where}: must hold a list of prompts (or a mapping with a 'prompts:' list), "
                               f"not {type(data).__name__}")
    return [(f"item {i}", value) for i, value in enumerate(data)]


def _spec(where: str, value: Any, index: int, defaults: dict[str, int], base: str = "",
          condition_area: int = CONDITION_AREA) -> PromptSpec:
    if isinstance(value, str):
        value = {"prompt": value}
    if not isinstance(value, dict):
        raise PromptsFileError(f"{where}: an entry is a prompt string or a mapping with fields {', '.join(FIELDS)}, "
                               f"not {type(value).__name__}")
    for key in value:
        if key not in FIELDS:
            hint = _did_you_mean(key, FIELDS) or f"; allowed: {', '.join(FIELDS)}"
            raise PromptsFileError(f"{where}: unknown field {key!r}{hint}")
    if "prompt" not in value:
        raise PromptsFileError(f"{where}: missing field 'prompt'")
    prompt, negative = value["prompt"], value.get("negative_prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise PromptsFileError(f"{where}: field 'prompt' must be a non-empty string, got {prompt!r}")
    if negative is not None and not isinstance(negative, str):
        raise PromptsFileError(f"{where}: field 'negative_prompt' must be a string (or absent), got {negative!r}")
    images = _source_images(where, value.get("image"), base)
    if images:  # QwenImageEditPipeline's output size: calculate_dimensions of its (first) source image
        defaults = dict(zip(("width", "height"), condition_size(*_image_size(where, images[0]), condition_area)))
    sizes = {}
    for key in ("width", "height"):
        sizes[key] = value.get(key, defaults[key])
        if not _is_size(sizes[key]):
            raise PromptsFileError(f"{where}: field {key!r} must be a positive integer divisible by {PIXEL_MULTIPLE} "
                                   f"(VAE factor 8 x patch 2), got {sizes[key]!r}")
    seed = value.get("seed", index)
    if not _is_int(seed) or not 0 <= seed < _MAX_SEED:
        raise PromptsFileError(f"{where}: field 'seed' must be an integer in 0..2**64-1, got {seed!r}")
    return PromptSpec(prompt, negative, sizes["width"], sizes["height"], seed, origin=where, images=images)


def _source_images(where: str, value: Any, base: str) -> tuple:
    """An entry's `image` field -> absolute paths of existing files (a path or a list of paths)."""
    if value is None:
        return ()
    paths = value if isinstance(value, list) else [value]
    if not paths or not all(isinstance(p, str) and p for p in paths):
        raise PromptsFileError(f"{where}: field 'image' must be a path or a non-empty list of paths, got {value!r}")
    out = tuple(os.path.normpath(os.path.join(base, p)) for p in paths)
    for p in out:
        if not os.path.isfile(p):
            raise PromptsFileError(f"{where}: source image {p} not found")
    return out


def _image_size(where: str, path: str) -> tuple[int, int]:
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, ValueError) as e:
        raise PromptsFileError(f"{where}: source image {path} is not a readable image ({e})") from None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # YAML's `yes` is a bool, and bool is an int


def _is_size(v) -> bool:
    return _is_int(v) and v > 0 and v % PIXEL_MULTIPLE == 0


def _did_you_mean(key, names: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(key), names, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# --------------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------------
def encode_prompts(specs: Sequence[PromptSpec], text_encoder: QwenTextEncoder, edit=None) -> EncodedPrompts:
    """Embeddings of every prompt and negative prompt, as `text_encoder.encode` gives them; raises
    PromptsFileError naming the entry if one is longer than the encoder's limit. Edit prompts (with source
    images) need `edit` = (QwenEditTextEncoder, QwenEditConditionEncoder): their prompts and negative prompts are
    encoded with the source images, as QwenImageEditPipeline encodes them, and the sources' latents kept."""
    plain = [i for i, s in enumerate(specs) if not s.images]
    edits = [i for i, s in enumerate(specs) if s.images]
    if edits and edit is None:
        raise PromptsFileError(f"{specs[edits[0]].origin or f'prompt {edits[0]}'}: an edit prompt (with an image) "
                               "needs the edit encoders (an encoders directory with processor/)")
    negatives = [i for i in plain if specs[i].negative_prompt is not None]
    for name, idx, texts in (("prompt", plain, [specs[i].prompt for i in plain]),
                             ("negative_prompt", negatives, [specs[i].negative_prompt for i in negatives])):
        for i, count in zip(idx, text_encoder.token_counts(texts)):
            if count > text_encoder.max_length:
                where = specs[i].origin or f"prompt {i}"
                raise PromptsFileError(f"{where}: {name} is {count} tokens, over the text encoder's limit of "
                                       f"{text_encoder.max_length}; shorten it (it is not truncated)")
    embeds: list = [None] * len(specs)
    negative_embeds: list[torch.Tensor | None] = [None] * len(specs)
    conds: list[tuple] = [()] * len(specs)
    for i, e in zip(plain, text_encoder.encode([specs[i].prompt for i in plain])):
        embeds[i] = e.cpu()
    for i, e in zip(negatives, text_encoder.encode([specs[i].negative_prompt for i in negatives])):
        negative_embeds[i] = e.cpu()
    info = {
        "text_encoder": getattr(text_encoder.model.config, "_name_or_path", ""),
        "hidden_size": text_encoder.hidden_size,
        "drop_index": text_encoder.drop_idx,
        "max_length": text_encoder.max_length,
        "format_version": PROMPTS_VERSION,
    }
    if edits:
        edit_text, edit_vae = edit
        for i in edits:
            s = specs[i]
            sources = [_open_rgb(s.origin, p) for p in s.images]
            embeds[i] = edit_text.encode([s.prompt], [sources])[0].cpu()
            if s.negative_prompt is not None:
                negative_embeds[i] = edit_text.encode([s.negative_prompt], [sources])[0].cpu()
            conds[i] = tuple(c.cpu() for c in edit_vae.encode(sources))
        info.update(edit_template=edit_text.template.name, condition_area=edit_vae.template.vae_area,
                    edit_drop_index=edit_text.drop_idx)
    info["dtype"] = str(embeds[0].dtype).removeprefix("torch.") if embeds else ""
    return EncodedPrompts([EncodedPrompt(s, e, n, c) for s, e, n, c in zip(specs, embeds, negative_embeds, conds)],
                          info)


def _open_rgb(where: str, path: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as e:
        raise PromptsFileError(f"{where}: source image {path} is not a readable image ({e})") from None


def check_encoded(encoded: EncodedPrompts, text_dim: int) -> None:
    """Refuse embeddings whose width is not the model's joint_attention_dim (another text encoder's)."""
    width = encoded.info["hidden_size"]
    if width != text_dim:
        raise PromptsFileError(f"encoded prompts {encoded.path or '(in memory)'}: embeddings are {width} wide (text "
                               f"encoder {encoded.info.get('text_encoder') or '?'}) but the model's "
                               f"joint_attention_dim is {text_dim}; encode the prompts with the model's text encoder")


# --------------------------------------------------------------------------------------------------
# The encoded file
# --------------------------------------------------------------------------------------------------
def save_encoded(path: str, encoded: EncodedPrompts) -> None:
    """Write one safetensors file atomically (readers see the old file or the new one)."""
    tensors = {}
    for i, p in enumerate(encoded.prompts):
        # a copy each: a batch's embeddings are views of one buffer, and safetensors refuses shared storage
        tensors[f"prompt.{i}"] = p.embeds.clone(memory_format=torch.contiguous_format)
        if p.negative_embeds is not None:
            tensors[f"negative.{i}"] = p.negative_embeds.clone(memory_format=torch.contiguous_format)
        for k, c in enumerate(p.cond_latents):
            tensors[f"cond.{i}.{k}"] = c.clone(memory_format=torch.contiguous_format)
    specs = [dataclasses.asdict(p.spec) for p in encoded.prompts]
    metadata = {"format": PROMPTS_FORMAT, "version": str(PROMPTS_VERSION),
                "prompts": json.dumps(specs, ensure_ascii=False), "info": json.dumps(encoded.info, ensure_ascii=False)}
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    atomic_replace(path, safetensors_bytes(tensors, metadata=metadata), directory)


def is_encoded_file(path: str) -> bool:
    """Whether `path` is a file save_encoded wrote (by its header), as opposed to a prompts file."""
    try:
        with safe_open(path, framework="pt") as f:
            return (f.metadata() or {}).get("format") == PROMPTS_FORMAT
    except (SafetensorError, OSError):
        return False


def load_encoded(path: str) -> EncodedPrompts:
    """Read a file save_encoded wrote; raises PromptsFileError (one line) if it is not one, or is newer."""
    where = f"encoded prompts {path}"
    if not os.path.isfile(path):
        raise PromptsFileError(f"{where}: not found (or not a file)")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != PROMPTS_FORMAT:
                raise PromptsFileError(f"{where}: not an encoded-prompts file (format {metadata.get('format')!r}, "
                                       f"expected {PROMPTS_FORMAT!r}); write it with "
                                       "`python -m megatron_qwen_image.prompts encode`")
            version = metadata.get("version", "")
            if not version.isdigit() or int(version) > PROMPTS_VERSION:
                raise PromptsFileError(f"{where}: format version {version!r} is newer than this code reads "
                                       f"({PROMPTS_VERSION}); update megatron_qwen_image")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        hint = (": it looks like a prompts file; encode it first with `python -m megatron_qwen_image.prompts encode "
                f"{path} --encoders DIR --out FILE`" if path.endswith(PROMPTS_FILE_EXTENSIONS) else f": {e}")
        raise PromptsFileError(f"{where}: not a readable safetensors file{hint}") from None
    try:
        info = json.loads(metadata["info"])
        width = int(info["hidden_size"])
        specs = [PromptSpec(**{**d, "images": tuple(d.get("images", ()))}) for d in json.loads(metadata["prompts"])]
    except (KeyError, TypeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise PromptsFileError(f"{where}: corrupt metadata ({type(e).__name__}: {e})") from None
    expected = {f"prompt.{i}" for i in range(len(specs))}
    expected |= {f"negative.{i}" for i, s in enumerate(specs) if s.negative_prompt is not None}
    expected |= {f"cond.{i}.{k}" for i, s in enumerate(specs) for k in range(len(s.images))}
    if set(tensors) != expected:
        raise PromptsFileError(f"{where}: tensors {sorted(set(tensors) ^ expected)} do not match its "
                               f"{len(specs)} prompts")
    bad = [k for k, t in tensors.items() if not k.startswith("cond.") and (t.dim() != 2 or t.shape[1] != width)]
    bad += [k for k, t in tensors.items() if k.startswith("cond.") and t.dim() != 3]
    if bad:
        raise PromptsFileError(f"{where}: tensor {bad[0]} has shape {list(tensors[bad[0]].shape)}, expected "
                               + ("[channels, h, w]" if bad[0].startswith("cond.") else f"[tokens, {width}]"))
    prompts = [EncodedPrompt(s, tensors[f"prompt.{i}"], tensors.get(f"negative.{i}"),
                             tuple(tensors[f"cond.{i}.{k}"] for k in range(len(s.images)))) for i, s in enumerate(specs)]
    return EncodedPrompts(prompts, info, path=path)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------
def _describe(i: int, p: EncodedPrompt) -> str:
    s = p.spec
    negative = f", negative {p.negative_embeds.shape[0]} tokens" if p.negative_embeds is not None else ""
    negative += "".join(f", source {os.path.basename(im)} ({c.shape[2] * 8}x{c.shape[1] * 8})"
                        for im, c in zip(s.images, p.cond_latents))
    text = " ".join(s.prompt.split())
    text = text if len(text) <= 70 else text[:69] + "…"
    return f"{i:4d}  {s.width}x{s.height}  seed {s.seed}  {p.embeds.shape[0]} tokens{negative}  {text}"


def _encode(args) -> int:
    specs = read_prompts_file(args.prompts_file, default_width=args.width, default_height=args.height,
                              condition_area=args.condition_area)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise PromptsFileError("--device cuda: no CUDA device is visible")
    dtype = _DTYPES.get(args.dtype, torch.bfloat16 if device == "cuda" else torch.float32)  # auto
    # Imported here, not at the top: every training rank imports this module for the encoded-file format, and must
    # not pay for importing transformers (seconds per process), which only this command needs.
    from megatron_qwen_image.encoders.text import QwenTextEncoder

    t0 = time.time()
    encoder = QwenTextEncoder.from_pretrained(args.encoders, device=device, dtype=dtype)
    edit = load_edit_encoders(args.encoders, args.edit_template, args.condition_area, device, dtype) \
        if any(s.images for s in specs) else None
    encoded = encode_prompts(specs, encoder, edit)
    for i, p in enumerate(encoded.prompts):
        print(_describe(i, p))
    save_encoded(args.out, encoded)
    print(f"encoded {len(specs)} prompts ({encoded.info['hidden_size']} wide, {encoded.info['dtype']}) in "
          f"{time.time() - t0:.1f}s -> {args.out}")
    return 0


def load_edit_encoders(encoders_dir: str, template: str = "edit", condition_area: int = CONDITION_AREA,
                       device="cpu", dtype=None):
    """(QwenEditTextEncoder, QwenEditConditionEncoder) of an edit pipeline directory, for encode_prompts; the
    condition area is the template's VAE area (the pipelines' 1024²)."""
    from megatron_qwen_image.encoders.edit import TEMPLATES, QwenEditConditionEncoder, QwenEditTextEncoder

    chosen = dataclasses.replace(TEMPLATES[template], vae_area=condition_area)
    text = QwenEditTextEncoder.from_pretrained(encoders_dir, device=device, dtype=dtype, template=chosen)
    vae = QwenEditConditionEncoder.from_pretrained(encoders_dir, device=device, dtype=dtype, template=chosen)
    return text, vae


def _show(args) -> int:
    encoded = load_encoded(args.file)
    info = encoded.info
    print(f"{args.file}: {len(encoded.prompts)} prompts, {info['hidden_size']} wide, {info['dtype']}, "
          f"text encoder {info.get('text_encoder') or '?'}")
    for i, p in enumerate(encoded.prompts):
        print(_describe(i, p))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_qwen_image.prompts", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    enc = sub.add_parser("encode", help="encode a prompts file into one safetensors file")
    enc.add_argument("prompts_file")
    enc.add_argument("--encoders", required=True, help="local HF-layout directory with text_encoder/ and tokenizer/")
    enc.add_argument("--out", required=True, help="the encoded file to write (.safetensors)")
    enc.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    enc.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"), help="auto: bf16 on cuda, else fp32")
    enc.add_argument("--width", type=int, default=DEFAULT_SIZE, help="width of entries without one")
    enc.add_argument("--height", type=int, default=DEFAULT_SIZE, help="height of entries without one")
    enc.add_argument("--edit-template", default="edit", choices=("edit", "edit_plus"),
                     help="how entries with an image are encoded: QwenImageEditPipeline's or QwenImageEditPlusPipeline's")
    enc.add_argument("--condition-area", type=int, default=CONDITION_AREA,
                     help="pixel area of a source image as the VAE encodes it (the edit pipelines' 1024²)")
    enc.set_defaults(run=_encode)
    show = sub.add_parser("show", help="list an encoded file's prompts, sizes and seeds")
    show.add_argument("file")
    show.set_defaults(run=_show)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (PromptsFileError, EncoderDirError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

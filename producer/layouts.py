"""What the inputs are: the layouts the tools people use write, detected without flags.

| layout | recognised by | image | caption |
|---|---|---|---|
| img2dataset webdataset | `NNNNN.tar` beside `NNNNN.parquet` (metadata only) and `NNNNN_stats.json` | `KEY.jpg` member | `KEY.txt` |
| WebDataset | tars | `KEY.<image ext>` member | `KEY.txt` (or `caption` in `KEY.json`) |
| img2dataset parquet | a binary column named by an image format (`jpg`) and a `status` column | that column | `caption` |
| Hugging Face datasets parquet | the schema's `huggingface` metadata names an `Image` feature | `{bytes, path}`: the bytes, else the file at `path` | `caption`, `text` or `prompt` |
| Parquet | any other Parquet file | a binary column `image`/`img`/`jpg`/... | `caption`, `text` or `prompt` |
| Hugging Face imagefolder | `metadata.jsonl` or `metadata.csv` with a `file_name` column | the file it names | `caption`, `text` or `prompt` |
| image folder | images with `NAME.txt` sidecars | `NAME.jpg` | `NAME.txt` |

Edit samples (image editing, TI2I: source image, instruction, target image) in the same layouts: a tar
sample with a `KEY.src.<ext>` member (several sources: `KEY.src0.<ext>`, `KEY.src1.<ext>`, ...) beside its
target `KEY.jpg` and instruction `KEY.txt`; a Parquet file with a second image column named like a source
(`source_image`, `src_img`, `input_image`, `original_image`, ...: CONDITION_COLUMN_NAMES), whose target is
the other image column (an `edited_image`/`target_image`-like name wins when there are several) and whose
instruction is an `instruction`/`edit_prompt`-like column before a plain caption.

Columns are found by name and type; `sources.image_column` / `caption_column` / `key_column` /
`condition_columns` name them instead. Two candidates for one role is an error that lists them (never a
guess).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import pyarrow as pa

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
IMAGE_COLUMN_NAMES = ("image", "img") + IMAGE_EXTS  # binary columns that hold encoded images
CAPTION_COLUMN_NAMES = ("caption", "text", "prompt")
# Edit datasets (InstructPix2Pix, MagicBrush, UltraEdit, OmniEdit, ...): the source image and the instruction.
CONDITION_COLUMN_NAMES = ("source_image", "source_img", "src_image", "src_img", "input_image", "input_img",
                          "original_image", "original_img", "condition_image", "reference_image")
TARGET_COLUMN_NAMES = ("edited_image", "edited_img", "target_image", "target_img", "output_image", "output_img")
INSTRUCTION_COLUMN_NAMES = ("instruction", "edit_instruction", "edit_prompt", "edit")
SUCCESS = "success"  # img2dataset's status of a downloaded row


class LayoutError(ValueError):
    """The columns of an input cannot be told apart without a config key (ambiguous or missing)."""


@dataclass(frozen=True)
class Columns:
    """The columns of one table-like input (a Parquet file, an imagefolder's metadata file)."""

    image: str
    caption: str
    key: str | None = None      # None: file stem + row number (Parquet), the file's stem (imagefolder)
    status: str | None = None   # img2dataset: rows whose status is not "success" are failed downloads
    layout: str = "Parquet"
    conditions: tuple = ()      # edit samples: the source image column(s), in order

    def describe(self) -> str:
        key = f"key column {self.key!r}" if self.key else "keys from the row number"
        status = f", failed downloads from {self.status!r}" if self.status else ""
        if self.conditions:
            return (f"edit pairs: source image column{'s' * (len(self.conditions) > 1)} "
                    f"{', '.join(map(repr, self.conditions))}, target image column {self.image!r}, instruction "
                    f"column {self.caption!r}, {key}{status}")
        return f"image column {self.image!r}, caption column {self.caption!r}, {key}{status}"


def _hf_features(schema: pa.Schema) -> dict:
    """The `datasets` features stored in a Parquet schema's metadata, {} if none."""
    try:
        return json.loads((schema.metadata or {}).get(b"huggingface", b"{}")).get("info", {}).get("features", {}) or {}
    except (ValueError, AttributeError):
        return {}


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or _is_binary(t)


def _is_image_struct(t: pa.DataType) -> bool:
    return pa.types.is_struct(t) and {t.field(i).name for i in range(t.num_fields)} >= {"bytes", "path"}


def _pick(role: str, candidates: list[str], where: str, names: list, option: str) -> str:
    if len(candidates) == 1:
        return candidates[0]
    if candidates:
        raise LayoutError(f"{where}: {len(candidates)} candidate {role} columns {candidates}; name one with "
                          f"{option}=NAME")
    raise LayoutError(f"{where}: no {role} column among {names}; name it with {option}=NAME")


def _named(option_value: str | None, names: list, where: str, option: str) -> str | None:
    if option_value is not None and option_value not in names:
        raise LayoutError(f"{where}: no column {option_value!r} ({option}); columns: {names}")
    return option_value


def parquet_columns(schema: pa.Schema, where: str, image: str | None = None, caption: str | None = None,
                    key: str | None = None, conditions: list | None = None) -> Columns:
    """The image, caption, key, status and (edit samples) source image columns of a Parquet file, by its
    schema (LayoutError if unclear). `image`/`caption`/`key`/`conditions`: the config's choices (None: detect)."""
    names = list(schema.names)
    types = {f.name: f.type for f in schema}
    features = _hf_features(schema)
    hf = [n for n in names if isinstance(features.get(n), dict) and features[n].get("_type") == "Image"]
    structs = [n for n in names if _is_image_struct(types[n])]
    binaries = [n for n in names if n.lower() in IMAGE_COLUMN_NAMES + CONDITION_COLUMN_NAMES + TARGET_COLUMN_NAMES
                and _is_binary(types[n])]
    holds_images = hf or structs or binaries  # the kind of image column this file has (first kind found)
    if conditions is None:
        found = [n for n in holds_images if n.lower() in CONDITION_COLUMN_NAMES]
        if len(found) > 1:
            raise LayoutError(f"{where}: {len(found)} candidate source image columns {found}; name them in order "
                              f"with sources.condition_columns=[...] ([] for none)")
        conditions = found
    for c in conditions:
        _named(c, names, where, "sources.condition_columns")
    image = _named(image, names, where, "sources.image_column")
    if image is None:
        rest = [n for n in holds_images if n not in conditions]
        if conditions and len(rest) > 1:
            rest = [n for n in rest if n.lower() in TARGET_COLUMN_NAMES] or rest
        image = _pick("image", rest, where, names, "sources.image_column")
    if image in conditions:
        raise LayoutError(f"{where}: column {image!r} is both the target image and a source image")
    caption = _named(caption, names, where, "sources.caption_column")
    if caption is None:
        texts = [n for n in names if _is_text(types[n])]
        instructions = [n for n in texts if n.lower() in INSTRUCTION_COLUMN_NAMES] if conditions else []
        caption = _pick("caption", instructions or [n for n in texts if n.lower() in CAPTION_COLUMN_NAMES],
                        where, names, "sources.caption_column")
    img2dataset = "status" in names and image.lower() in IMAGE_EXTS and _is_binary(types[image])
    if key is None and img2dataset and "key" in names:
        key = "key"  # img2dataset's sample keys (the same as its webdataset members')
    key = _named(key, names, where, "sources.key_column")
    layout = ("img2dataset parquet" if img2dataset else
              "Hugging Face datasets parquet" if features or _is_image_struct(types[image]) else "Parquet")
    return Columns(image, caption, key, "status" if img2dataset else None, layout, tuple(conditions))


def metadata_columns(names: list, where: str, caption: str | None = None, key: str | None = None) -> Columns:
    """The columns of a Hugging Face imagefolder's metadata file: `file_name` and a caption."""
    if "file_name" not in names:
        raise LayoutError(f"{where}: no 'file_name' column (a Hugging Face imagefolder's metadata names each "
                          f"image in it); columns: {names}")
    caption = _named(caption, names, where, "sources.caption_column")
    if caption is None:
        caption = _pick("caption", [n for n in names if n.lower() in CAPTION_COLUMN_NAMES], where, names,
                        "sources.caption_column")
    return Columns("file_name", caption, _named(key, names, where, "sources.key_column"), None,
                   "Hugging Face imagefolder")

"""The latent-cache format: names, versions, dtypes and the shard schema (spec: docs/cache_format.md).

Everything that both the writer and the reader must agree on lives here, so that the format has one
implementation. Bump FORMAT_VERSION for any change an older reader could misread (version 2 added
optional condition latents per sample, for image editing).
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import warnings

try:  # the same CRC-32 as zlib's, with SIMD (PCLMULQDQ): ~6x faster than the system zlib 1.2 here
    from zlib_ng.zlib_ng import crc32
except ImportError:  # pragma: no cover - identical values, just slower
    from zlib import crc32
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

FORMAT_NAME = "megatron-qwen-image-latent-cache"
FORMAT_VERSION = 2  # what writers write
SUPPORTED_VERSIONS = (1, 2)  # what readers read: version-1 files read unchanged (no condition latents)

# Pixel size = latent size x VAE_SCALE_FACTOR; buckets are multiples of VAE_SCALE_FACTOR x PATCH_SIZE.
VAE_SCALE_FACTOR = 8
PATCH_SIZE = 2
PIXEL_MULTIPLE = VAE_SCALE_FACTOR * PATCH_SIZE

# Layout below the cache root.
CACHE_FILE = "CACHE.json"       # format marker, written once
SEALED_FILE = "SEALED.json"     # optional: the log is complete (num_entries)
MANIFEST_DIR = "manifest"       # commit log: 000000000000.json, 000000000001.json, ...
SNAPSHOT_DIR = "manifest_snapshots"  # NNNNNNNNNNNN.json: entries 0..N-1 in one file (N = its number)
WORKUNITS_DIR = "workunits"     # hints: <work_unit_id>.json exists once that work unit is committed
TMP_DIR = "_tmp"                # temp files of writers in progress; never read
EXCLUSIONS_DIR = "exclusions"   # NNNNNN.json: committed samples readers skip (newest number wins)
BUCKET_PREFIX = "bucket="
SHARD_SUFFIX = ".arrow"
ENTRY_DIGITS = 12


class CacheFormatError(RuntimeError):
    """The cache (or one of its files) is of a format/version this code cannot read. Never skipped."""


class CorruptShardError(RuntimeError):
    """A shard failed an integrity check (missing, truncated, checksum mismatch). The loader skips it."""


@dataclass(frozen=True)
class StorageDType:
    name: str            # "bf16" | "fp16" | "fp32"
    arrow: pa.DataType   # how Arrow stores it (Arrow has no bfloat16: raw uint16 bits)
    numpy: np.dtype      # a numpy dtype with the same bytes (int16 for bf16, only ever viewed)
    torch: torch.dtype


DTYPES = {
    "bf16": StorageDType("bf16", pa.uint16(), np.dtype(np.int16), torch.bfloat16),
    "fp16": StorageDType("fp16", pa.float16(), np.dtype(np.float16), torch.float16),
    "fp32": StorageDType("fp32", pa.float32(), np.dtype(np.float32), torch.float32),
}
_TORCH_ALIASES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def storage_dtype(name) -> StorageDType:
    """'bf16'|'fp16'|'fp32' (or the torch dtype) -> StorageDType; a clear error for anything else."""
    if isinstance(name, torch.dtype):
        name = _TORCH_ALIASES.get(name, str(name))
    if name not in DTYPES:
        raise ValueError(f"latent/text dtype {name!r} is not supported; use one of {sorted(DTYPES)}")
    return DTYPES[name]


def tensor_to_numpy(t: torch.Tensor, dt: StorageDType) -> np.ndarray:
    """Cast a tensor to the storage dtype and return a C-contiguous numpy array of the same bytes."""
    t = t.detach().to(device="cpu", dtype=dt.torch).contiguous()
    if dt.torch == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy()


_warned_once = threading.Lock()


def numpy_to_tensor(a: np.ndarray, dt: StorageDType) -> torch.Tensor:
    """Zero-copy: a numpy view over (read-only, memory-mapped) storage bytes -> torch tensor of dt.

    torch warns once per process that it cannot mark such tensors read-only; they are read-only in
    fact and only ever copied from, so that one warning is silenced (the first call, under a lock
    because warnings.catch_warnings is process-global)."""
    if not a.flags.writeable and _warned_once.acquire(blocking=False):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(a)
    else:
        t = torch.from_numpy(a)
    return t.view(torch.bfloat16) if dt.torch == torch.bfloat16 else t


def work_unit_id(work_unit: str) -> str:
    """Deterministic, filesystem-safe id of a producer work unit (an input shard path, say)."""
    if not isinstance(work_unit, str) or not work_unit:
        raise ValueError(f"work_unit must be a non-empty string, got {work_unit!r}")
    return hashlib.sha256(work_unit.encode("utf-8")).hexdigest()[:20]


def bucket_name(width: int, height: int) -> str:
    return f"{int(width)}x{int(height)}"


def parse_bucket_name(name: str) -> tuple[int, int]:
    if name.startswith(BUCKET_PREFIX):
        name = name[len(BUCKET_PREFIX):]
    try:
        w, h = name.split("x")
        return int(w), int(h)
    except ValueError:
        raise ValueError(f"bad bucket name {name!r}; expected 'WIDTHxHEIGHT', e.g. '640x480'") from None


def bucket_dir(width: int, height: int) -> str:
    return BUCKET_PREFIX + bucket_name(width, height)


CondShapes = tuple[tuple[int, int, int], ...]  # (C, h, w) of each condition image; () for text-to-image


def cond_shapes_text(cond_shapes: CondShapes) -> str:
    """The shard schema's `cond_shapes` metadata: "16,64,48;16,32,32" ("" for text-to-image)."""
    return ";".join(",".join(str(int(d)) for d in shape) for shape in cond_shapes)


def cond_numel(cond_shapes: CondShapes) -> int:
    """Values per row of the `cond_latent` column: every condition image of the row, one after another."""
    return sum(int(np.prod(shape)) for shape in cond_shapes)


def _shape_name(shape) -> str:
    return "x".join(str(int(d)) for d in shape)  # (16, 80, 60) -> "16x80x60"


def group_name(bucket: tuple[int, int], cond_shapes: CondShapes) -> str:
    """How tools name a bucket's group of samples: "640x480" (text-to-image) or "640x480 +cond 16x80x60"
    (one condition image; several: "16x80x60+16x32x32")."""
    name = bucket_name(*bucket)
    return f"{name} +cond " + "+".join(map(_shape_name, cond_shapes)) if cond_shapes else name


def cond_file_tag(cond_shapes: CondShapes) -> str:
    """The part of a shard's file name that tells its condition group from the bucket's other groups in one
    attempt (so that their files never share a name): "" for text-to-image (version 1's names),
    ".cond16x80x60" for one condition image, ".cond16x80x60-16x32x32" for several."""
    return ".cond" + "-".join(map(_shape_name, cond_shapes)) if cond_shapes else ""


def _fixed_list(name: str, dt: StorageDType, numel: int) -> pa.Field:
    return pa.field(name, pa.list_(pa.field("item", dt.arrow, nullable=False), numel), nullable=False)


def shard_schema(latent_dt: StorageDType, latent_shape, text_dt: StorageDType, text_dim: int,
                 metadata: dict, cond_shapes: CondShapes = ()) -> pa.Schema:
    """One row per sample. Latents of one shard share a shape (one bucket): a fixed-size list whose
    values are one contiguous buffer. Condition latents (image editing; only when `cond_shapes` is not
    empty) likewise share their shapes within a shard: one fixed-size list per row holding every
    condition image in turn. Text embeddings are stored unpadded: a large list of L*D values per row
    (row i's tokens are values[offsets[i]:offsets[i+1]] reshaped to [L_i, D])."""
    fields = [
        pa.field("key", pa.string(), nullable=False),
        _fixed_list("latent", latent_dt, int(np.prod(latent_shape))),
        *([_fixed_list("cond_latent", latent_dt, cond_numel(cond_shapes))] if cond_shapes else []),
        pa.field("text_embed", pa.large_list(pa.field("item", text_dt.arrow, nullable=False)), nullable=False),
        pa.field("text_len", pa.int32(), nullable=False),
        pa.field("caption", pa.large_string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("meta", pa.large_string(), nullable=False),
        pa.field("crc32", pa.uint32(), nullable=False),
    ]
    md = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "latent_dtype": latent_dt.name,
        "latent_shape": ",".join(str(int(s)) for s in latent_shape),
        "text_dtype": text_dt.name,
        "text_dim": str(int(text_dim)),
        **({"cond_shapes": cond_shapes_text(cond_shapes)} if cond_shapes else {}),
        **{k: str(v) for k, v in metadata.items()},
    }
    return pa.schema(fields, metadata=md)


def sample_crc(key: str, latent: np.ndarray, text: np.ndarray, cond: np.ndarray | None = None) -> int:
    """Per-sample checksum over exactly the bytes training consumes: key, latent, the condition latents
    (`cond`: the row's `cond_latent` values, when it has any), text embedding. Without conditions this is
    version 1's checksum, so one function checks rows of both versions."""
    crc = crc32(key.encode("utf-8"))
    crc = crc32(np.ascontiguousarray(latent), crc)
    if cond is not None:
        crc = crc32(np.ascontiguousarray(cond), crc)
    return crc32(np.ascontiguousarray(text), crc)


def file_crc32(path: str, chunk: int = 16 << 20) -> int:
    crc = 0
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(chunk)
        view = memoryview(buf)
        while True:
            n = f.readinto(view)
            if not n:
                return crc
            crc = crc32(view[:n], crc)


def check_version(version, where: str) -> int:
    """Refuse any format version this code does not know, with a message that says what to do."""
    try:
        v = int(version)
    except (TypeError, ValueError):
        v = None
    if v not in SUPPORTED_VERSIONS:
        raise CacheFormatError(
            f"{where}: latent-cache format_version {version!r} is not supported by this code "
            f"(it reads version(s) {list(SUPPORTED_VERSIONS)}). Use the megatron-qwen-image release that "
            f"wrote this cache, or rebuild the cache with this one."
        )
    return v


def read_cache_file(root: str) -> dict:
    path = os.path.join(root, CACHE_FILE)
    try:
        with open(path, "rb") as f:
            info = json.loads(f.read())
    except FileNotFoundError:
        raise CacheFormatError(f"{root!r} is not a latent cache: {path} is missing") from None
    except ValueError as e:
        raise CacheFormatError(f"{path} is not valid JSON: {e}") from None
    if info.get("format") != FORMAT_NAME:
        raise CacheFormatError(f"{path}: format is {info.get('format')!r}, expected {FORMAT_NAME!r}")
    check_version(info.get("format_version"), path)
    return info


def new_cache_file_content() -> bytes:
    return json.dumps({"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                       "created_unix": time.time()}, indent=1).encode()

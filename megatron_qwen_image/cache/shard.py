"""Reading one shard file: memory-mapped Arrow IPC, zero-copy torch views, integrity checks.

Checks, from cheap to thorough (docs/cache_format.md, "Integrity"):
- on open (always): the file exists and has the manifest's byte count (catches truncation), the Arrow
  footer and schema parse, the format version is known, shapes/dtypes/row count agree with the
  manifest, and the text offsets are consistent with the stored lengths (vectorised, no row loop);
- per sample (verify="sample", the default): the CRC-32 of the sample's key, latent, condition latent
  (image editing) and text bytes is checked the first time the sample is read in this process, so each
  byte is hashed once, and only the bytes training actually reads (no read amplification under random
  access);
- whole file (verify="full"): CRC-32 of the file against the manifest, when the shard is opened.
A failure raises CorruptShardError (the loader skips the shard); an unknown version raises
CacheFormatError (never skipped).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from .format import (FORMAT_NAME, CacheFormatError, CorruptShardError, check_version, cond_numel, cond_shapes_text,
                     file_crc32, numpy_to_tensor, sample_crc, storage_dtype)
from .manifest import ShardInfo

VERIFY_MODES = ("sample", "full", "none")


def _np_values(arr: pa.Array, dtype: np.dtype, count: int) -> np.ndarray:
    """Zero-copy numpy view of a primitive Arrow array's data buffer (honouring its offset)."""
    buf = arr.buffers()[1]
    return np.frombuffer(buf, dtype=dtype, count=count, offset=arr.offset * dtype.itemsize)


def _fixed_rows(col: pa.Array, dtype: np.dtype, numel: int) -> np.ndarray:
    """Zero-copy [n, numel] numpy view of a fixed-size-list column (latent, cond_latent): its rows are one
    contiguous buffer."""
    if col.type.list_size != numel:
        raise ValueError(f"{col.type.list_size} values per row where the manifest's shapes make {numel}")
    n = len(col)
    return _np_values(col.values, dtype, (col.offset + n) * numel)[col.offset * numel:].reshape(n, numel)


@dataclass(frozen=True, slots=True)
class _Batch:
    """One record batch of a shard, as zero-copy views (`read` checks its text offsets first)."""
    rb: pa.RecordBatch
    start: int               # the shard row of its first row
    n: int
    keys: list[str]
    crc: np.ndarray          # per-row CRC-32
    lens: np.ndarray         # per-row text length (tokens)
    lat_np: np.ndarray       # [n, C*H*W] storage bytes
    lat_t: torch.Tensor      # [n, C, H, W]
    cond_np: np.ndarray | None  # [n, sum of C*h*w over the condition images]; None: no condition latents
    cond_t: torch.Tensor | None
    txt_np: np.ndarray       # every row's text values, concatenated
    txt_t: torch.Tensor
    off: np.ndarray          # in elements; row j's tokens: txt[off[j] : off[j+1]] viewed as [L_j, D]

    @staticmethod
    def read(rb: pa.RecordBatch, start: int, latent_dt, latent_shape, text_dt, text_dim, cond_shapes) -> "_Batch":
        n = rb.num_rows
        txt_col = rb.column("text_embed")
        lens = rb.column("text_len").to_numpy()
        off = _np_values(txt_col, np.dtype(np.int64), n + 1)  # offsets live in buffers()[1] of a list too
        rel = off - off[0]
        if (rel[1:] - rel[:-1] != lens.astype(np.int64) * text_dim).any() or (lens < 1).any():
            raise ValueError("text offsets disagree with text_len x text_dim")
        values = txt_col.values
        if off[-1] > len(values):
            raise ValueError("text offsets point past the end of the values")
        lat_np = _fixed_rows(rb.column("latent"), latent_dt.numpy, int(np.prod(latent_shape)))
        cond_np = None
        if cond_shapes:  # image editing: every condition image of a row, in one fixed-size list
            cond_np = _fixed_rows(rb.column("cond_latent"), latent_dt.numpy, cond_numel(cond_shapes))
        txt_np = _np_values(values, text_dt.numpy, int(off[-1]))[int(off[0]):]
        return _Batch(rb, start, n, rb.column("key").to_pylist(), rb.column("crc32").to_numpy(), lens, lat_np,
                      numpy_to_tensor(lat_np, latent_dt).view(n, *latent_shape), cond_np,
                      None if cond_np is None else numpy_to_tensor(cond_np, latent_dt), txt_np,
                      numpy_to_tensor(txt_np, text_dt), off)


class ShardFile:
    """An open, structurally validated shard. `sample(i)` -> (key, latent [C,H,W], text [L,D]) views;
    `conditions(i)` -> the row's condition latent views ([C,h,w] each; () for text-to-image)."""

    def __init__(self, root: str, info: ShardInfo, verify: str = "sample", verified: np.ndarray | None = None):
        """`verified`: a bool array [num_samples] of rows already checked, kept by the caller so that a
        shard closed and reopened (LRU) is not re-hashed."""
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify={verify!r}; use one of {VERIFY_MODES}")
        self.info, self.verify = info, verify
        self.path = path = os.path.join(root, info.path)
        try:
            size = os.path.getsize(path)
        except FileNotFoundError:
            raise CorruptShardError(f"{path}: missing (the manifest lists it)") from None
        if size != info.bytes:
            raise CorruptShardError(f"{path}: {size} bytes, the manifest says {info.bytes} (truncated or replaced)")
        if verify == "full":
            crc = file_crc32(path)
            if crc != info.crc32:
                raise CorruptShardError(f"{path}: file CRC-32 {crc:#010x} != manifest {info.crc32:#010x}")
        try:
            mm = pa.memory_map(path, "r")
            try:
                reader = pa.ipc.open_file(mm)
                self._check_schema(reader.schema)
                self.latent_dt = storage_dtype(info.latent_dtype)
                self.text_dt = storage_dtype(info.text_dtype)
                self.batches, start = [], 0
                for b in range(reader.num_record_batches):
                    batch = _Batch.read(reader.get_batch(b), start, self.latent_dt, info.latent_shape, self.text_dt,
                                        info.text_dim, info.cond_shapes)
                    self.batches.append(batch)
                    start += batch.n
            finally:
                mm.close()  # the mapping itself lives on as long as views of it do
        except CacheFormatError:
            raise
        except (pa.ArrowException, OSError, ValueError, KeyError, IndexError) as e:
            raise CorruptShardError(f"{path}: unreadable Arrow shard ({type(e).__name__}: {e})") from None
        if start != info.num_samples:
            raise CorruptShardError(f"{path}: {start} rows, the manifest says {info.num_samples}")
        self.num_samples = start
        self._starts = np.array([b.start for b in self.batches], dtype=np.int64)
        self._cond_slices, first = [], 0  # where each condition image lies in a row's cond_latent values
        for shape in info.cond_shapes:
            numel = int(np.prod(shape))
            self._cond_slices.append((first, first + numel, shape))
            first += numel
        if verify != "sample":
            self.verified = None
        elif verified is not None and verified.shape == (start,):
            self.verified = verified
        else:
            self.verified = np.zeros(start, dtype=bool)

    def _check_schema(self, schema: pa.Schema) -> None:
        md = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}
        if md.get("format") != FORMAT_NAME:
            raise CacheFormatError(f"{self.path}: not a {FORMAT_NAME} shard (format={md.get('format')!r})")
        check_version(md.get("format_version"), self.path)
        md.setdefault("cond_shapes", "")  # absent: no condition latents (every version-1 shard)
        expect = {"latent_dtype": self.info.latent_dtype, "text_dtype": self.info.text_dtype,
                  "text_dim": str(self.info.text_dim),
                  "latent_shape": ",".join(str(s) for s in self.info.latent_shape),
                  "cond_shapes": cond_shapes_text(self.info.cond_shapes)}
        for k, v in expect.items():
            if md.get(k) != v:
                raise CorruptShardError(f"{self.path}: schema {k}={md.get(k)!r} but the manifest says {v!r}")

    def _locate(self, i: int) -> tuple[_Batch, int]:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"{self.path}: row {i} out of range [0, {self.num_samples})")
        b = self.batches[int(np.searchsorted(self._starts, i, side="right")) - 1]
        return b, i - b.start

    def _checked(self, i: int) -> tuple[_Batch, int, int, int]:
        """Row i's record batch, its index there and its text values' range [lo, hi); the row's CRC-32 is checked
        the first time (verify="sample"): CorruptShardError if it does not match."""
        b, j = self._locate(i)
        lo, hi = int(b.off[j] - b.off[0]), int(b.off[j + 1] - b.off[0])
        if self.verified is not None and not self.verified[i]:
            cond = None if b.cond_np is None else b.cond_np[j]
            if sample_crc(b.keys[j], b.lat_np[j], b.txt_np[lo:hi], cond) != b.crc[j]:
                raise CorruptShardError(f"{self.path}: row {i} ({b.keys[j]!r}) fails its CRC-32")
            self.verified[i] = True
        return b, j, lo, hi

    def sample(self, i: int) -> tuple[str, torch.Tensor, torch.Tensor]:
        """Row i as (key, latent view [C,H,W], text view [L,D]). The views are READ-ONLY (memory map):
        copy before modifying. Raises CorruptShardError if the row's checksum does not match."""
        b, j, lo, hi = self._checked(i)
        return b.keys[j], b.lat_t[j], b.txt_t[lo:hi].view(-1, self.info.text_dim)

    def conditions(self, i: int) -> tuple[torch.Tensor, ...]:
        """Row i's condition latents (image editing) as READ-ONLY views [C,h,w], one per condition image in the
        order they were added; () for a text-to-image row. Checked by the row's CRC-32 like sample()."""
        b, j, _, _ = self._checked(i)
        return tuple(b.cond_t[j, lo:hi].view(shape) for lo, hi, shape in self._cond_slices)

    def record(self, i: int) -> dict:
        """Row i with every field (for tools and tests; tensors are copies, safe to modify)."""
        key, lat, txt = self.sample(i)
        b, j = self._locate(i)
        return {"key": key, "latent": lat.clone(), "text_embed": txt.clone(), "text_len": int(b.lens[j]),
                "cond_latents": [c.clone() for c in self.conditions(i)],
                "caption": b.rb.column("caption")[j].as_py(), "source": b.rb.column("source")[j].as_py(),
                "meta": json.loads(b.rb.column("meta")[j].as_py())}

    def column(self, name: str) -> list:
        """One column of every row as Python values, in row order (tools: keys, meta JSON strings)."""
        return [v for b in self.batches for v in b.rb.column(name).to_pylist()]

    def text_lengths(self) -> np.ndarray:
        return np.concatenate([b.lens for b in self.batches]) if self.batches else np.zeros(0, np.int32)

"""Input sources: WebDataset tar shards (img2dataset layout), Parquet files, folders of images with .txt sidecars.

The unit of work is one input shard (`ShardSpec`): one tar, one Parquet file, or one slice of an image
folder. `iter_shard(spec)` yields, in a deterministic order, either a `RawSample` (undecoded bytes) or a
`BadRecord` (a reason name from `producer.filters.REASONS` plus detail) — it never raises for bad data,
so one bad member cannot crash an actor or lose the rest of its shard.

Tars are read as a stream from memory, never extracted: members with absolute paths, `..` components,
links or device files are dropped (`unsafe_path`), so nothing can be written anywhere. A tar whose data
or headers end early (no end-of-archive marker) yields its complete samples and one `truncated_tar`.
Such a shard ended early (`ENDED_EARLY`): the CPU worker then fails its attempt unless
`sources.commit_partial_units` (producer/errors.py `IncompleteShard`).

`ShardSpec.fingerprint()` is what an input looked like when an attempt began; the work unit's commit
records it, so a later run can tell that an input changed since (producer/committed.py).
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import posixpath
import re
import tarfile
import zlib
from dataclasses import dataclass, field
from typing import Iterator

import pyarrow.parquet as pq

from megatron_qwen_image.config import option

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
TAR_EXTS = (".tar", ".tar.gz", ".tgz")
PARQUET_EXTS = (".parquet",)
FOLDER_SIZE_SAMPLES = 8  # images stat'ed to estimate a folder slice's bytes (ShardSpec.input_bytes)
# BadRecord reasons that mean the shard could not be read to its end (the rest of it is missing).
ENDED_EARLY = ("truncated_tar", "broken_shard")


@dataclass(frozen=True)
class InputFingerprint:
    """An input shard's files as they were when an attempt began: how many, their total size and the newest
    modification time. Taken before reading, so a file that grows or is replaced during the read is
    found changed on the next run."""

    files: int
    bytes: int
    mtime_ns: int


@dataclass(frozen=True)
class ShardSpec:
    """One work unit. `work_unit` is stable across runs (derived from the path relative to its input root)."""

    kind: str  # "tar" | "parquet" | "folder"
    path: str  # the tar/parquet file, or the folder
    work_unit: str
    files: tuple = ()  # folder shards: the image files (relative to path) in this slice
    key_prefix: str = ""  # folder shards: the folder relative to its input root (keys are prefix/stem)

    def input_bytes(self) -> int:
        """Bytes this shard reads, 0 if they are gone: a size estimate for scheduling, not a check (reading
        reports missing input as it should). A tar or Parquet shard: its file's size. A folder slice: its
        image count times the mean size of at most FOLDER_SIZE_SAMPLES evenly spaced images, so planning a
        run over millions of images on a network filesystem costs a few stats per shard, not one per image."""
        if self.kind != "folder":
            return _size_or_zero(self.path)
        if not self.files:
            return 0
        step = max(1, len(self.files) // FOLDER_SIZE_SAMPLES)
        sampled = self.files[::step][:FOLDER_SIZE_SAMPLES]
        return round(len(self.files) * sum(_size_or_zero(os.path.join(self.path, f)) for f in sampled) / len(sampled))

    def fingerprint(self) -> InputFingerprint:
        """One stat per file (a tar or Parquet shard: one; a folder slice: one per image); a file that is
        gone is left out, which changes the count."""
        paths = [self.path] if self.kind != "folder" else [os.path.join(self.path, f) for f in self.files]
        stats = []
        for p in paths:
            try:
                stats.append(os.stat(p))
            except OSError:
                pass
        return InputFingerprint(len(stats), sum(st.st_size for st in stats),
                                max((st.st_mtime_ns for st in stats), default=0))


def _size_or_zero(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


@dataclass
class RawSample:
    key: str
    image: bytes
    image_ext: str
    caption: bytes | None  # raw bytes: UTF-8 validity is a filter, not a reader concern
    meta: dict = field(default_factory=dict)  # the img2dataset KEY.json / parquet extra columns
    source: str = ""


@dataclass
class BadRecord:
    key: str | None
    reason: str
    detail: str = ""


@dataclass
class SourceOptions:
    """How input shards are read (tar members, Parquet columns, image-folder slices), and what becomes of a
    shard that ends early or changed since its work unit was committed."""

    parquet_image_column: str = option("image", "Parquet column of the image bytes")
    parquet_caption_column: str = option("caption", "Parquet column of the caption")
    parquet_key_column: str | None = option(None, "Parquet column of the sample key (null: file stem + row number)")
    parquet_batch_rows: int = option(256, "Parquet rows read at once")
    folder_shard_size: int = option(1000, "images of an image folder per work unit")
    max_member_bytes: int = option(64 * 1024 * 1024, "largest tar member read (bigger ones are dropped)")
    commit_partial_units: bool = option(False, "commit the complete samples of a shard that ends early (truncated tar, "
                                        "unreadable Parquet); false: fail it, the next run tries it again")
    redo_changed: bool = option(False, "an input changed since its work unit was committed: redo it as the unit's "
                                "next version (the old one's samples go on the exclusion list); false: keep the "
                                "committed version and warn (--redo-changed)")


def work_unit_name(rel: str) -> str:
    """A file-name-safe, collision-free id for a shard path relative to its input root."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", rel).strip("_")[:80] or "shard"
    return f"{readable}-{hashlib.sha1(rel.encode('utf-8')).hexdigest()[:8]}"


def _is_image(name: str) -> bool:
    return name.rsplit(".", 1)[-1].lower() in IMAGE_EXTS


class InputError(ValueError):
    """The producer's inputs cannot be used as given (missing, unsupported, empty, ambiguous)."""


def discover_shards(inputs: list[str], options: SourceOptions | None = None) -> list[ShardSpec]:
    """Expand CLI inputs (files, directories, globs) into sorted work units.

    A directory holding tar/parquet files contributes each file as one shard; otherwise every directory
    under it that holds images becomes a folder source, sliced into `folder_shard_size` images per shard.
    """
    options = options or SourceOptions()
    specs: list[ShardSpec] = []
    for inp in inputs:
        paths = sorted(glob.glob(inp)) if any(c in inp for c in "*?[") else [inp]
        if not paths:
            raise InputError(f"input {inp!r} matches nothing")
        for path in paths:
            path = os.path.abspath(path)
            if os.path.isfile(path):
                specs.append(_file_spec(path, os.path.basename(path)))
            elif os.path.isdir(path):
                specs.extend(_dir_specs(path, options))
            else:
                raise InputError(f"input {path!r} does not exist")
    seen = set()
    for s in specs:
        if s.work_unit in seen:
            raise InputError(f"two inputs map to the same work unit {s.work_unit!r}; pass each input once")
        seen.add(s.work_unit)
    return specs


def _file_spec(path: str, rel: str) -> ShardSpec:
    low = path.lower()
    if low.endswith(TAR_EXTS):
        return ShardSpec("tar", path, work_unit_name(rel))
    if low.endswith(PARQUET_EXTS):
        return ShardSpec("parquet", path, work_unit_name(rel))
    raise InputError(f"unsupported input file {path!r}: expected {TAR_EXTS + PARQUET_EXTS}")


def _dir_specs(root: str, options: SourceOptions) -> list[ShardSpec]:
    base = os.path.basename(root.rstrip("/"))
    shard_files = sorted(
        os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.lower().endswith(TAR_EXTS + PARQUET_EXTS)
    )
    if shard_files:
        return [_file_spec(p, posixpath.join(base, os.path.relpath(p, root))) for p in shard_files]
    specs = []
    for d, dirs, fs in sorted(os.walk(root)):
        dirs.sort()
        images = sorted(f for f in fs if _is_image(f))
        rel_dir = posixpath.join(base, os.path.relpath(d, root))
        for i in range(0, len(images), options.folder_shard_size):
            part = i // options.folder_shard_size
            specs.append(ShardSpec("folder", d, work_unit_name(f"{rel_dir}/part-{part:05d}"),
                                   tuple(images[i : i + options.folder_shard_size]), posixpath.normpath(rel_dir)))
    if not specs:
        raise InputError(f"input directory {root!r} holds no tar, parquet or image files")
    return specs


def iter_shard(spec: ShardSpec, options: SourceOptions | None = None) -> Iterator[RawSample | BadRecord]:
    options = options or SourceOptions()
    if spec.kind == "tar":
        return iter_tar(spec.path, options, source=spec.work_unit)
    if spec.kind == "parquet":
        return iter_parquet(spec.path, options, source=spec.work_unit)
    if spec.kind == "folder":
        return iter_folder(spec.path, spec.files, options, source=spec.work_unit, key_prefix=spec.key_prefix)
    raise ValueError(f"unknown shard kind {spec.kind!r}")


# --------------------------------------------------------------------------- tar (WebDataset / img2dataset)

def unsafe_member_reason(member: tarfile.TarInfo) -> str | None:
    """Why a member must not be read, or None. Absolute names and '..' are refused even though we never
    extract: a key derived from them would name a path outside wherever a tool might put it."""
    name = member.name
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "absolute path"
    if ".." in re.split(r"[\\/]+", name):
        return "'..' component"
    if member.issym() or member.islnk():
        return "link member"
    if member.isdev() or member.isfifo():
        return "device or fifo member"
    return None


_OVERSIZE = "\0oversize"  # marks a group with a member over max_member_bytes


def split_key(name: str) -> tuple[str, str]:
    """WebDataset convention: key = path up to the first '.' of the basename, ext = the rest, lower case."""
    d, b = posixpath.split(name)
    stem, _, ext = b.partition(".")
    return posixpath.join(d, stem) if d else stem, ext.lower()


def _group_to_sample(key: str, parts: dict[str, bytes], source: str) -> RawSample | BadRecord | None:
    if _OVERSIZE in parts:  # already reported as file_too_large
        return None
    img_ext = next((e for e in IMAGE_EXTS if e in parts), None)
    if img_ext is None:
        return BadRecord(key, "missing_image", f"members: {sorted(parts)}")
    meta: dict = {}
    if "json" in parts:
        try:
            meta = json.loads(parts["json"].decode("utf-8"))
            if not isinstance(meta, dict):
                meta = {"json": meta}
        except (UnicodeDecodeError, ValueError):
            meta = {"json_error": "invalid JSON sidecar"}
    caption = parts.get("txt")
    if caption is None and isinstance(meta.get("caption"), str):
        caption = meta["caption"].encode("utf-8")
    return RawSample(key, parts[img_ext], img_ext, caption, meta, source)


def iter_tar(path: str, options: SourceOptions, source: str = "") -> Iterator[RawSample | BadRecord]:
    """Stream a tar: group consecutive members by key, yield complete samples; never extract to disk."""
    compressed = path.lower().endswith((".gz", ".tgz"))
    key, parts = None, {}
    try:
        with open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r|gz" if compressed else "r|") as tf:
            for member in tf:
                if member.isdir():
                    continue
                why = unsafe_member_reason(member)
                if why:
                    yield BadRecord(member.name, "unsafe_path", why)
                    continue
                if not member.isfile():
                    yield BadRecord(member.name, "unsafe_path", f"unsupported member type {member.type!r}")
                    continue
                k, ext = split_key(member.name)
                if k != key:
                    if key is not None and (done := _group_to_sample(key, parts, source)) is not None:
                        yield done
                    key, parts = k, {}
                if member.size > options.max_member_bytes:
                    yield BadRecord(k, "file_too_large", f"{member.name}: {member.size} bytes in tar")
                    parts[_OVERSIZE] = b""
                    continue
                parts[ext] = tf.extractfile(member).read()
            end_offset = tf.offset
            if not compressed:
                # A complete tar ends with two zero blocks; a file cut at a header boundary silently stops
                # tarfile's iteration, so check for the end-of-archive marker ourselves.
                raw.seek(end_offset)
                tail = raw.read(1024)
                if len(tail) < 1024 or tail.strip(b"\0"):
                    # The group in progress may be missing members: it is dropped with the shard's tail.
                    yield BadRecord(key, "truncated_tar", f"no end-of-archive marker after byte {end_offset}")
                    return
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        yield BadRecord(key, "truncated_tar", f"{type(e).__name__}: {e}")
        return
    if key is not None and (done := _group_to_sample(key, parts, source)) is not None:
        yield done


# --------------------------------------------------------------------------- parquet

def iter_parquet(path: str, options: SourceOptions, source: str = "") -> Iterator[RawSample | BadRecord]:
    """Rows of a Parquet file, read `parquet_batch_rows` at a time (memory stays flat).

    The image column may be binary or a struct with a `bytes` field (Hugging Face `datasets` Image
    feature); the caption column string or binary.
    """
    stem = os.path.splitext(os.path.basename(path))[0]
    img_col, cap_col, key_col = options.parquet_image_column, options.parquet_caption_column, options.parquet_key_column
    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        for col in (img_col, cap_col) + ((key_col,) if key_col else ()):
            if col not in names:
                yield BadRecord(None, "broken_shard", f"{path}: no column {col!r} (columns: {names})")
                return
        columns = [c for c in names]
        row = 0
        for batch in pf.iter_batches(batch_size=options.parquet_batch_rows, columns=columns):
            cols = batch.to_pydict()
            for i in range(batch.num_rows):
                key = str(cols[key_col][i]) if key_col else f"{stem}-{row:08d}"
                row += 1
                img = cols[img_col][i]
                if isinstance(img, dict):
                    img = img.get("bytes")
                cap = cols[cap_col][i]
                if isinstance(cap, str):
                    cap = cap.encode("utf-8", errors="surrogatepass")
                if not isinstance(img, (bytes, bytearray)):
                    yield BadRecord(key, "missing_image", f"row {row - 1}: image column holds {type(img).__name__}")
                    continue
                meta = {k: v for k, v in ((c, cols[c][i]) for c in columns if c not in (img_col, cap_col))
                        if isinstance(v, (str, int, float, bool)) or v is None}
                yield RawSample(key, bytes(img), "", cap, meta, source)
    except Exception as e:  # pyarrow raises several types for corrupt files; none may crash the actor
        yield BadRecord(None, "broken_shard", f"{path}: {type(e).__name__}: {e}")


# --------------------------------------------------------------------------- image folder

def iter_folder(folder: str, files: tuple, options: SourceOptions, source: str = "",
                key_prefix: str = "") -> Iterator[RawSample | BadRecord]:
    """Images with `stem.txt` caption sidecars (and optional `stem.json` metadata); key = prefix/stem."""
    for name in files:
        stem = os.path.splitext(name)[0]
        key = f"{key_prefix}/{stem}" if key_prefix else stem
        p = os.path.join(folder, name)
        try:
            size = os.path.getsize(p)
            if size > options.max_member_bytes:
                yield BadRecord(key, "file_too_large", f"{p}: {size} bytes")
                continue
            with open(p, "rb") as f:
                data = f.read()
        except OSError as e:
            yield BadRecord(key, "broken_file", f"{p}: {e}")
            continue
        caption = None
        cap_path = os.path.join(folder, stem + ".txt")
        if os.path.isfile(cap_path):
            with open(cap_path, "rb") as f:
                caption = f.read()
        meta = {}
        meta_path = os.path.join(folder, stem + ".json")
        if os.path.isfile(meta_path):
            try:
                with open(meta_path, "rb") as f:
                    meta = json.loads(f.read().decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                meta = {"json_error": "invalid JSON sidecar"}
        yield RawSample(key, data, name.rsplit(".", 1)[-1].lower(), caption, meta if isinstance(meta, dict) else {}, source)

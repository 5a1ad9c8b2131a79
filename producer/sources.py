"""Input sources: WebDataset tars (img2dataset's webdataset output), Parquet files (img2dataset's parquet
output, Hugging Face `datasets`), Hugging Face imagefolders, folders of images with .txt sidecars.

`discover_inputs` finds each input's layout and columns (producer/layouts.py) before Ray starts. The unit
of work is one input shard (`ShardSpec`): one tar, one Parquet file, or one slice of an image folder or
of an imagefolder's metadata. `iter_shard(spec)` yields, in a deterministic order, either a `RawSample` (undecoded bytes) or a
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

import csv
import glob
import hashlib
import json
import logging
import os
import posixpath
import re
import tarfile
import zlib
from dataclasses import dataclass, field
from typing import Iterator

import pyarrow.parquet as pq

from megatron_qwen_image.config import option
from producer.layouts import IMAGE_EXTS, SUCCESS, Columns, LayoutError, metadata_columns, parquet_columns

TAR_EXTS = (".tar", ".tar.gz", ".tgz")
PARQUET_EXTS = (".parquet",)
METADATA_FILES = ("metadata.jsonl", "metadata.csv")  # a Hugging Face imagefolder's captions
log = logging.getLogger("producer.sources")
FOLDER_SIZE_SAMPLES = 8  # images stat'ed to estimate a folder slice's bytes (ShardSpec.input_bytes)
# BadRecord reasons that mean the shard could not be read to its end (the rest of it is missing).
ENDED_EARLY = ("truncated_tar", "broken_shard")
FOLDER_KINDS = ("folder", "imagefolder")  # shards that read one file per sample


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

    kind: str  # "tar" | "parquet" | "folder" | "imagefolder"
    path: str  # the tar/parquet file, or the folder (an imagefolder's: its metadata file's)
    work_unit: str
    files: tuple = ()  # folder shards: the image files (relative to path) in this slice
    key_prefix: str = ""  # folder shards: the folder relative to its input root (keys are prefix/stem)
    rows: tuple = ()  # imagefolder shards: the metadata rows of `files`, as JSON
    sidecar: str = ""  # tars: img2dataset's metadata Parquet of the same stem beside it
    root: str = ""  # the directory the user's input names: image paths in a table must stay inside it

    def input_bytes(self) -> int:
        """Bytes this shard reads, 0 if they are gone: a size estimate for scheduling, not a check (reading
        reports missing input as it should). A tar or Parquet shard: its file's size. A folder slice: its
        image count times the mean size of at most FOLDER_SIZE_SAMPLES evenly spaced images, so planning a
        run over millions of images on a network filesystem costs a few stats per shard, not one per image."""
        if self.kind not in FOLDER_KINDS:
            return _size_or_zero(self.path)
        if not self.files:
            return 0
        step = max(1, len(self.files) // FOLDER_SIZE_SAMPLES)
        sampled = self.files[::step][:FOLDER_SIZE_SAMPLES]
        return round(len(self.files) * sum(_size_or_zero(os.path.join(self.path, f)) for f in sampled) / len(sampled))

    def fingerprint(self) -> InputFingerprint:
        """One stat per file (a tar or Parquet shard: one; a folder slice: one per image); a file that is
        gone is left out, which changes the count."""
        paths = [self.path] if self.kind not in FOLDER_KINDS else [os.path.join(self.path, f) for f in self.files]
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
    # An edit sample (TI2I): the source images the instruction (`caption`) edits into `image`, in order;
    # a tar's KEY.src.<ext> (or KEY.src0.<ext>, KEY.src1.<ext>, ...), a table's condition image column(s).
    cond_images: tuple = ()


@dataclass
class BadRecord:
    key: str | None
    reason: str
    detail: str = ""


@dataclass
class SourceOptions:
    """How input shards are read (tar members, Parquet columns, image-folder slices), and what becomes of a
    shard that ends early or changed since its work unit was committed."""

    image_column: str | None = option(None, "Parquet column of the image (null: detect: an Image feature, a "
                                      "{bytes, path} struct or a binary column named image/jpg/png/...)")
    caption_column: str | None = option(None, "Parquet or imagefolder-metadata column of the caption (null: "
                                        "detect: caption, text or prompt)")
    condition_columns: list[str] | None = option(None, "Parquet columns of an edit sample's source image(s), in order "
                                            "(null: detect: one image column named source_image, src_img, "
                                            "input_image, original_image, ...; []: none, text-to-image)")
    key_column: str | None = option(None, "column of the sample key (null: img2dataset's `key`, else file stem + "
                                    "row number / the image's file name)")
    image_paths_outside_input: bool = option(False, "read image files a table names (Hugging Face `{bytes: null, "
                                             "path}`, imagefolder file_name) outside the input's directory; false: "
                                             "drop them as image_path_outside")
    parquet_batch_rows: int = option(256, "Parquet rows read at once")
    folder_shard_size: int = option(1000, "images of an image folder per work unit")
    max_member_bytes: int = option(64 * 1024 * 1024, "largest tar member read (bigger ones are dropped)")
    commit_partial_units: bool = option(False, "commit the complete samples of a shard that ends early (truncated tar, "
                                        "unreadable Parquet); false: fail it, the next run tries it again")
    redo_changed: bool = option(False, "an input changed since its work unit was committed: redo it as the unit's "
                                "next version (the old one's samples go on the exclusion list); false: keep the "
                                "committed version and warn (--redo-changed)")


def _scalars(pairs, skip=()) -> dict:
    """The JSON-scalar values of (column, value) pairs, less the `skip` columns: what a sample's metadata keeps
    of a table row."""
    return {k: v for k, v in pairs if k not in skip and (isinstance(v, (str, int, float, bool)) or v is None)}


def _caption_bytes(cap):
    """A table's caption value as the bytes the filters judge (str encoded; bytes and None as they are)."""
    return cap.encode("utf-8", errors="surrogatepass") if isinstance(cap, str) else cap


def work_unit_name(rel: str) -> str:
    """A file-name-safe, collision-free id for a shard path relative to its input root."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", rel).strip("_")[:80] or "shard"
    return f"{readable}-{hashlib.sha1(rel.encode('utf-8')).hexdigest()[:8]}"


def _is_image(name: str) -> bool:
    return name.rsplit(".", 1)[-1].lower() in IMAGE_EXTS


class InputError(ValueError):
    """The producer's inputs cannot be used as given (missing, unsupported, empty, ambiguous)."""


@dataclass(frozen=True)
class DetectedInput:
    """What one input (a file, a directory, a glob match) was found to be, printed before Ray starts."""

    input: str
    layout: str
    shards: tuple  # tuple[ShardSpec, ...]
    notes: tuple = ()  # columns, sidecars, files that are not inputs

    def line(self) -> str:
        n = len(self.shards)
        return f"input {self.input}: {self.layout}, {n} shard{'s' * (n != 1)}" + "".join(f"; {x}" for x in self.notes)


def discover_inputs(inputs: list[str], options: SourceOptions | None = None) -> list[DetectedInput]:
    """Expand CLI inputs (files, directories, globs) into detected layouts and their sorted work units.

    A directory holding tar/parquet files contributes each file as one shard (a Parquet file of a tar's
    stem beside it is img2dataset's metadata of that tar, not a shard); else each `metadata.jsonl/csv`
    makes a Hugging Face imagefolder; else every directory under it that holds images becomes a folder
    source. Folders are sliced into `folder_shard_size` images per shard. InputError when an input is
    missing, empty or its columns are ambiguous.
    """
    options = options or SourceOptions()
    found: list[DetectedInput] = []
    for inp in inputs:
        paths = sorted(glob.glob(inp)) if any(c in inp for c in "*?[") else [inp]
        if not paths:
            raise InputError(f"input {inp!r} matches nothing")
        for path in paths:
            path = os.path.abspath(path)
            if os.path.isfile(path):
                found.extend(_file_inputs(path, options))
            elif os.path.isdir(path):
                found.extend(_dir_inputs(path, options))
            else:
                raise InputError(f"input {path!r} does not exist")
    seen = set()
    for s in (s for d in found for s in d.shards):
        if s.work_unit in seen:
            raise InputError(f"two inputs map to the same work unit {s.work_unit!r}; pass each input once")
        seen.add(s.work_unit)
    return found


def discover_shards(inputs: list[str], options: SourceOptions | None = None) -> list[ShardSpec]:
    """The work units of `discover_inputs`, in order."""
    return [s for d in discover_inputs(inputs, options) for s in d.shards]


def _stem(path: str) -> str:
    name = os.path.basename(path)
    for ext in TAR_EXTS + PARQUET_EXTS:
        if name.lower().endswith(ext):
            return os.path.join(os.path.dirname(path), name[: -len(ext)])
    return path


def _tar_input(where: str, tars: list[str], rel, sidecars: dict, stats: int) -> DetectedInput:
    specs = tuple(ShardSpec("tar", p, work_unit_name(rel(p)), sidecar=sidecars.get(_stem(p), ""))
                  for p in tars)
    notes = []
    if sidecars:
        notes.append(f"{len(sidecars)} metadata .parquet beside their tars (read as their metadata)")
    if stats:
        notes.append(f"{stats} *_stats.json (not inputs)")
    return DetectedInput(where, "img2dataset webdataset" if sidecars or stats else "WebDataset", specs, tuple(notes))


def _parquet_input(where: str, files: list[str], rel, root: str, options: SourceOptions) -> DetectedInput:
    """Parquet shards; their columns are detected on the first readable one (each shard is checked again
    when it is read, so one that differs is a broken_shard, not wrong data)."""
    columns, unreadable = None, 0
    for p in files:
        try:
            schema = pq.read_schema(p)
        except Exception:  # a corrupt file is reported when read; the others decide the columns
            unreadable += 1
            continue
        try:
            columns = _parquet_columns(schema, p, options)
        except LayoutError as e:
            raise InputError(str(e)) from None
        break
    specs = tuple(ShardSpec("parquet", p, work_unit_name(rel(p)), root=root) for p in files)
    if columns is None:
        return DetectedInput(where, "Parquet", specs, ("no readable file: columns unknown",))
    return DetectedInput(where, columns.layout, specs, (columns.describe(),) + ((f"{unreadable} unreadable",)
                                                                                if unreadable else ()))


def _parquet_columns(schema, path: str, options: SourceOptions) -> Columns:
    return parquet_columns(schema, path, options.image_column, options.caption_column, options.key_column,
                           options.condition_columns)


def _file_inputs(path: str, options: SourceOptions) -> list[DetectedInput]:
    low, base, d = path.lower(), os.path.basename(path), os.path.dirname(path)
    if low.endswith(TAR_EXTS):
        sidecar = _stem(path) + ".parquet"
        sidecars = {_stem(path): sidecar} if os.path.isfile(sidecar) else {}
        return [_tar_input(path, [path], lambda p: base, sidecars, 0)]
    if low.endswith(PARQUET_EXTS):
        tars = [_stem(path) + ext for ext in TAR_EXTS if os.path.isfile(_stem(path) + ext)]
        if tars:
            raise InputError(f"{path} is img2dataset's metadata of {tars[0]} (no images in it): pass the tar, "
                             "or the folder")
        return [_parquet_input(path, [path], lambda p: base, d, options)]
    if base in METADATA_FILES:
        return [_imagefolder_input(path, [path], d, os.path.basename(d), options)]
    raise InputError(f"unsupported input file {path!r}: expected {TAR_EXTS + PARQUET_EXTS} or {METADATA_FILES}")


def _dir_inputs(root: str, options: SourceOptions) -> list[DetectedInput]:
    base = os.path.basename(root.rstrip("/"))
    walk = sorted((d, sorted(fs)) for d, _, fs in os.walk(root))

    def rel(p):
        return posixpath.join(base, os.path.relpath(p, root))

    files = [os.path.join(d, f) for d, fs in walk for f in fs]
    tars = [p for p in files if p.lower().endswith(TAR_EXTS)]
    tar_stems = {_stem(p) for p in tars}
    parquets = [p for p in files if p.lower().endswith(PARQUET_EXTS)]
    sidecars = {_stem(p): p for p in parquets if _stem(p) in tar_stems}
    stats = sum(1 for p in files if p.endswith("_stats.json") and p[: -len("_stats.json")] in tar_stems)
    found = []
    if tars:
        found.append(_tar_input(root, tars, rel, sidecars, stats))
    shard_parquets = [p for p in parquets if _stem(p) not in sidecars]
    if shard_parquets:
        found.append(_parquet_input(root, shard_parquets, rel, root, options))
    if found:
        return found
    metadata = [p for p in files if os.path.basename(p) in METADATA_FILES]
    if metadata:
        return [_imagefolder_input(root, metadata, root, base, options)]
    specs = []
    for d, fs in walk:
        images = [f for f in fs if _is_image(f)]
        rel_dir = posixpath.join(base, os.path.relpath(d, root))
        for i in range(0, len(images), options.folder_shard_size):
            part = i // options.folder_shard_size
            specs.append(ShardSpec("folder", d, work_unit_name(f"{rel_dir}/part-{part:05d}"),
                                   tuple(images[i : i + options.folder_shard_size]), posixpath.normpath(rel_dir)))
    if not specs:
        raise InputError(f"input directory {root!r} holds no tar, parquet, imagefolder metadata or image files")
    return [DetectedInput(root, "image folder", tuple(specs), ("captions from NAME.txt",))]


def read_metadata_rows(path: str) -> list[dict]:
    """An imagefolder's metadata file as dicts (JSON Lines, or CSV with a header). A line that is not a JSON
    object becomes {"__error__": why}: it is dropped as broken_metadata when its shard is read."""
    with open(path, encoding="utf-8", newline="") as f:
        if path.endswith(".csv"):
            return list(csv.DictReader(f))
        rows = []
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                row = {"__error__": f"{path}:{n}: {e}"}
            rows.append(row if isinstance(row, dict) else {"__error__": f"{path}:{n}: not a JSON object"})
        return rows


def _metadata_names(rows: list[dict]) -> list[str]:
    """The columns of imagefolder metadata rows (their union: JSON Lines rows may differ)."""
    return sorted({k for r in rows for k in r if k != "__error__"})


def _imagefolder_input(where: str, metadata: list[str], root: str, base: str,
                       options: SourceOptions) -> DetectedInput:
    """Each metadata file's rows, `folder_shard_size` a shard; `file_name` is relative to the file's folder."""
    specs, captions = [], set()
    for meta_path in metadata:
        d = os.path.dirname(meta_path)
        rows = read_metadata_rows(meta_path)
        try:
            cols = metadata_columns(_metadata_names(rows), meta_path, options.caption_column, options.key_column)
        except LayoutError as e:
            raise InputError(str(e)) from None
        captions.add(cols.caption)
        rel_dir = posixpath.normpath(posixpath.join(base, os.path.relpath(d, root)))
        for i in range(0, len(rows), options.folder_shard_size):
            part = rows[i : i + options.folder_shard_size]
            specs.append(ShardSpec(
                "imagefolder", d, work_unit_name(f"{rel_dir}/{os.path.basename(meta_path)}/part-"
                                                 f"{i // options.folder_shard_size:05d}"),
                files=tuple(str(r.get("file_name", "")) for r in part), key_prefix=rel_dir,
                rows=tuple(json.dumps(r, ensure_ascii=False, default=str) for r in part), root=root))
    return DetectedInput(where, "Hugging Face imagefolder", tuple(specs),
                         (f"{len(metadata)} metadata file{'s' * (len(metadata) != 1)}",
                          f"caption column {', '.join(map(repr, sorted(captions)))}"))


def iter_shard(spec: ShardSpec, options: SourceOptions | None = None) -> Iterator[RawSample | BadRecord]:
    options = options or SourceOptions()
    if spec.kind == "tar":
        return iter_tar(spec.path, options, source=spec.work_unit, sidecar=spec.sidecar)
    if spec.kind == "parquet":
        return iter_parquet(spec.path, options, source=spec.work_unit, root=spec.root)
    if spec.kind == "folder":
        return iter_folder(spec.path, spec.files, options, source=spec.work_unit, key_prefix=spec.key_prefix)
    if spec.kind == "imagefolder":
        return iter_imagefolder(spec, options)
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


_CONDITION_MEMBER = re.compile(r"^src(\d*)\.(" + "|".join(IMAGE_EXTS) + r")$")


def condition_members(parts: dict) -> list[bytes] | str:
    """An edit sample's source images among a tar group's members: `src.<ext>` (one), or `src0.<ext>`,
    `src1.<ext>`, ... (several, in that order). A problem (a number given twice, a gap) is returned as text."""
    found: dict[int, list[str]] = {}
    for ext in parts:
        m = _CONDITION_MEMBER.match(ext)
        if m:
            found.setdefault(int(m.group(1) or 0), []).append(ext)
    if not found:
        return []
    clash = [names for names in found.values() if len(names) > 1]
    if clash or sorted(found) != list(range(len(found))):
        return f"source image members {sorted(e for names in found.values() for e in names)} are not src.<ext> " \
               f"or src0.<ext>, src1.<ext>, ... once each"
    return [parts[found[i][0]] for i in range(len(found))]


def _group_to_sample(key: str, parts: dict[str, bytes], source: str) -> RawSample | BadRecord | None:
    if _OVERSIZE in parts:  # already reported as file_too_large
        return None
    img_ext = next((e for e in IMAGE_EXTS if e in parts), None)
    if img_ext is None:
        return BadRecord(key, "missing_image", f"members: {sorted(parts)}")
    conds = condition_members(parts)
    if isinstance(conds, str):
        return BadRecord(key, "missing_image", conds)
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
    return RawSample(key, parts[img_ext], img_ext, caption, meta, source, tuple(conds))


def read_sidecar(path: str) -> tuple[dict[str, dict], list[BadRecord]]:
    """img2dataset's metadata Parquet of a tar: the scalar columns of each downloaded row by key, and its
    failed downloads (rows whose status is not "success", absent from the tar) as `download_failed`. An
    unreadable sidecar is only warned about: the tar holds the samples and their own KEY.json."""
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:
        log.warning("img2dataset metadata %s unreadable, the tar is read without it: %s: %s", path,
                    type(e).__name__, e)
        return {}, []
    by_key, failed = {}, []
    for r in rows:
        key = str(r.get("key"))
        if r.get("status", SUCCESS) != SUCCESS:
            failed.append(BadRecord(key, "download_failed", f"{r.get('status')}: {r.get('error_message')}"))
        else:
            by_key[key] = _scalars(r.items())
    return by_key, failed


def iter_tar(path: str, options: SourceOptions, source: str = "", sidecar: str = "") -> Iterator[RawSample | BadRecord]:
    """Stream a tar: group consecutive members by key, yield complete samples; never extract to disk. With an
    img2dataset `sidecar`, its failed downloads come first and its columns fill what a KEY.json lacks."""
    extra, failed = read_sidecar(sidecar) if sidecar else ({}, [])
    yield from failed
    for sample in _iter_tar_members(path, options, source):
        if isinstance(sample, RawSample) and sample.key in extra:
            sample.meta = {**extra[sample.key], **sample.meta}
        yield sample


def _iter_tar_members(path: str, options: SourceOptions, source: str) -> Iterator[RawSample | BadRecord]:
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

def iter_parquet(path: str, options: SourceOptions, source: str = "", root: str = "") -> Iterator[RawSample | BadRecord]:
    """Rows of a Parquet file, read `parquet_batch_rows` at a time (memory stays flat), its columns detected
    from its own schema (producer/layouts.py).

    The image column may be binary or a `datasets` Image struct: its `bytes`, else the file at its `path`
    (relative to the Parquet file's folder; inside `root` unless sources.image_paths_outside_input).
    img2dataset rows whose status is not "success" are `download_failed`.
    """
    stem = os.path.splitext(os.path.basename(path))[0]
    base = os.path.dirname(path)
    try:
        pf = pq.ParquetFile(path)
        try:
            cols_of = _parquet_columns(pf.schema_arrow, path, options)
        except LayoutError as e:
            yield BadRecord(None, "broken_shard", str(e))
            return
        img_col, cap_col, key_col, status_col = cols_of.image, cols_of.caption, cols_of.key, cols_of.status
        cond_cols = cols_of.conditions
        columns = pf.schema_arrow.names
        row = 0
        for batch in pf.iter_batches(batch_size=options.parquet_batch_rows, columns=columns):
            cols = batch.to_pydict()
            for i in range(batch.num_rows):
                key = str(cols[key_col][i]) if key_col else f"{stem}-{row:08d}"
                row += 1
                if status_col and cols[status_col][i] != SUCCESS:
                    err = cols.get("error_message", [None] * batch.num_rows)[i]
                    yield BadRecord(key, "download_failed", f"row {row - 1}: {cols[status_col][i]}: {err}")
                    continue
                images = [_table_image(cols[c][i], c, row - 1, key, base, root or base, options)
                          for c in (img_col, *cond_cols)]
                bad = next((x for x in images if isinstance(x, BadRecord)), None)
                if bad is not None:  # the pair is dropped together
                    yield bad
                    continue
                cap = _caption_bytes(cols[cap_col][i])
                meta = _scalars(((c, cols[c][i]) for c in columns), skip=(img_col, cap_col, *cond_cols))
                (img, ext), conds = images[0], tuple(data for data, _ in images[1:])
                yield RawSample(key, img, ext, cap, meta, source, conds)
    except Exception as e:  # pyarrow raises several types for corrupt files; none may crash the actor
        yield BadRecord(None, "broken_shard", f"{path}: {type(e).__name__}: {e}")


def _table_image(value, column: str, row: int, key: str, base: str, root: str,
                 options: SourceOptions) -> tuple[bytes, str] | BadRecord:
    """A table cell holding an image -> (bytes, ext): binary, or a `datasets` Image struct's `bytes`, else the
    file at its `path` (read_named_file); a cell without an image is `missing_image` naming the column."""
    ext = ""
    if isinstance(value, dict):
        if value.get("bytes") is None and value.get("path"):
            got = read_named_file(value["path"], base, root, key, options)
            if isinstance(got, BadRecord):
                return got
            value, ext = got, _ext(value["path"])
        else:
            value = value.get("bytes")
    if not isinstance(value, (bytes, bytearray)):
        return BadRecord(key, "missing_image", f"row {row}: column {column!r} holds {type(value).__name__}")
    return bytes(value), ext


# --------------------------------------------------------------------------- files a sample names

def _ext(name: str) -> str:
    return name.rsplit(".", 1)[-1].lower() if "." in os.path.basename(name) else ""


def _inside(path: str, root: str) -> bool:
    root = os.path.realpath(root)
    return os.path.commonpath([os.path.realpath(path), root]) == root


def read_file(path: str, key: str, options: SourceOptions) -> bytes | BadRecord:
    """One image file's bytes, or why not: file_too_large (not read), image_file_missing, broken_file."""
    try:
        size = os.path.getsize(path)
        if size > options.max_member_bytes:
            return BadRecord(key, "file_too_large", f"{path}: {size} bytes")
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return BadRecord(key, "image_file_missing", f"{path}: no such file")
    except OSError as e:
        return BadRecord(key, "broken_file", f"{path}: {e}")


def read_named_file(name: str, base: str, root: str, key: str, options: SourceOptions) -> bytes | BadRecord:
    """The file a table row names (absolute, or relative to `base`), never outside `root` (the folder the
    user's input names) unless sources.image_paths_outside_input: a table must not read what it likes."""
    path = name if os.path.isabs(name) else os.path.join(base, name)
    if not options.image_paths_outside_input and not _inside(path, root):
        return BadRecord(key, "image_path_outside", f"{name} is outside the input {root} (not read; "
                         "sources.image_paths_outside_input=true reads it)")
    return read_file(path, key, options)


# --------------------------------------------------------------------------- image folder

def iter_folder(folder: str, files: tuple, options: SourceOptions, source: str = "",
                key_prefix: str = "") -> Iterator[RawSample | BadRecord]:
    """Images with `stem.txt` caption sidecars (and optional `stem.json` metadata); key = prefix/stem."""
    for name in files:
        stem = os.path.splitext(name)[0]
        key = f"{key_prefix}/{stem}" if key_prefix else stem
        data = read_file(os.path.join(folder, name), key, options)
        if isinstance(data, BadRecord):
            yield data
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
        yield RawSample(key, data, _ext(name), caption, meta if isinstance(meta, dict) else {}, source)


def iter_imagefolder(spec: ShardSpec, options: SourceOptions) -> Iterator[RawSample | BadRecord]:
    """A Hugging Face imagefolder's metadata rows: the image at `file_name` (relative to the metadata file's
    folder), the caption column, the other columns as metadata; key = prefix/file name without extension."""
    rows = [json.loads(r) for r in spec.rows]
    try:
        cols = metadata_columns(_metadata_names(rows), spec.path, options.caption_column, options.key_column)
    except LayoutError as e:
        yield BadRecord(None, "broken_shard", str(e))
        return
    for row in rows:
        if "__error__" in row:
            yield BadRecord(None, "broken_metadata", row["__error__"])
            continue
        name = str(row.get("file_name") or "")
        stem = posixpath.splitext(name)[0]
        key = str(row[cols.key]) if cols.key and row.get(cols.key) is not None else (
            f"{spec.key_prefix}/{stem}" if spec.key_prefix else stem)
        if not name:
            yield BadRecord(key, "missing_image", "metadata row without a file_name")
            continue
        data = read_named_file(name, spec.path, spec.root or spec.path, key, options)
        if isinstance(data, BadRecord):
            yield data
            continue
        cap = row.get(cols.caption)
        yield RawSample(key, data, _ext(name), _caption_bytes(cap) if isinstance(cap, str) else None,
                        _scalars(row.items(), skip=("file_name", cols.caption)), spec.work_unit)

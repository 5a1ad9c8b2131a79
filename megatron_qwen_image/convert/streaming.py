"""Tensor-by-tensor I/O for conversion: never more than about one tensor (plus its pieces) in memory.

* `write_torch_dist(dir, entries, objects)` writes a torch.distributed.checkpoint (DCP) directory, which is
  what megatron-core's torch_dist format is, from ONE process without torch.distributed: a save planner
  whose write items are declared from shapes alone (`TensorEntry`) and whose data is produced only when the
  writer asks for it (`resolve_data`). A tensor split over TP is declared as TP chunks along its split axis,
  exactly as a save from TP ranks would store it; the files always describe the GLOBAL tensor, so the
  checkpoint loads at any TP.
* `DcpTensorReader(dir)` reads one global tensor at a time from such a directory (any chunking).
* `write_safetensors(path, entries)` writes a .safetensors file whose header is computed up front from
  shapes and dtypes, then streams each tensor's bytes (safetensors' own `save_file` needs every tensor of
  the file in memory at once).

Why the storage release in the save planner's `resolve_data`: torch 2.13's FileSystemWriter keeps a
reference to every tensor of a file until the file is closed (for its optional safetensors output), so
with one file per process the whole model would stay alive. Each tensor handed to the writer is written
before the next one is requested, so its storage is released (resized to 0) at that point.
"""
from __future__ import annotations

import io
import json
import os
import struct
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
DTYPES_BY_SAFETENSORS_NAME = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def keep_freed_tensors_out_of_the_heap(threshold: int = 1 << 20) -> bool:
    """Pin glibc's mmap threshold so that every allocation >= `threshold` gets its own mapping, returned
    to the OS when freed. glibc otherwise raises the threshold to the largest block freed so far, after
    which tensors of that size come from the heap, whose fragments are not given back: a streaming
    conversion's RSS then creeps up towards the model size although only ~one tensor is alive (measured:
    401 MiB instead of 57 MiB peak for a 686 MiB model). Process-wide; no-op outside glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, int(threshold)))  # M_MMAP_THRESHOLD = -3 (malloc.h)
    except (OSError, AttributeError):
        return False


def nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()


# ---------------------------------------------------------------------------------------------- DCP writing
@dataclass
class TensorEntry:
    """One global tensor to write: its shape/dtype, how it is chunked, and how to produce it (once)."""

    key: str
    shape: Tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]
    split_axis: Optional[int] = None  # chunk along this axis ...
    num_chunks: int = 1               # ... into this many equal pieces (TP ranks)

    def chunks(self) -> List[Tuple[Tuple[int, ...], Tuple[int, ...]]]:
        """(offsets, sizes) of each stored chunk."""
        if self.split_axis is None or self.num_chunks == 1:
            return [((0,) * len(self.shape), tuple(self.shape))]
        dim = self.shape[self.split_axis]
        if dim % self.num_chunks:
            raise ValueError(f"{self.key}: dim {self.split_axis} of shape {self.shape} is not divisible into "
                             f"{self.num_chunks} chunks")
        step = dim // self.num_chunks
        out = []
        for i in range(self.num_chunks):
            offsets = [0] * len(self.shape)
            offsets[self.split_axis] = i * step
            sizes = list(self.shape)
            sizes[self.split_axis] = step
            out.append((tuple(offsets), tuple(sizes)))
        return out


@dataclass
class ObjectEntry:
    """A byte object (megatron ShardedObject payload) stored under `key`."""

    key: str
    payload: bytes


def _release(t: Optional[torch.Tensor]) -> None:
    if t is None:
        return
    try:
        t.untyped_storage().resize_(0)
    except RuntimeError:  # a storage we do not own (e.g. a view of a file mapping): leave it to refcounting
        pass


def write_torch_dist(ckpt_dir: str, tensors: Sequence[TensorEntry], objects: Sequence[ObjectEntry] = (),
                     progress: Optional[Callable[[int, int, str], None]] = None) -> None:
    """Write a DCP directory (.metadata + one data file) holding `tensors` and `objects`, streaming."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
    from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

    by_key = {e.key: e for e in tensors}
    if len(by_key) != len(tensors):
        raise ValueError("duplicate tensor keys")
    payloads = {o.key: o.payload for o in objects}
    total = sum(len(e.chunks()) for e in tensors)

    class StreamingSavePlanner(DefaultSavePlanner):
        def __init__(self):
            super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
            self._current_key: Optional[str] = None
            self._current: Optional[torch.Tensor] = None
            self._handed_out: Optional[torch.Tensor] = None
            self._done = 0

        def create_local_plan(self) -> SavePlan:
            items = []
            for e in tensors:
                for offsets, sizes in e.chunks():
                    items.append(WriteItem(
                        index=MetadataIndex(e.key, torch.Size(offsets)), type=WriteItemType.SHARD,
                        tensor_data=TensorWriteData(
                            chunk=ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes)),
                            properties=TensorProperties(dtype=e.dtype), size=torch.Size(e.shape))))
            for key in payloads:
                items.append(WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO))
            self.plan = SavePlan(items)
            return self.plan

        def resolve_data(self, write_item):
            if write_item.type == WriteItemType.BYTE_IO:
                return io.BytesIO(payloads[write_item.index.fqn])
            # the previous tensor handed out has been written by now (the writer is sequential)
            if self._handed_out is not self._current:
                _release(self._handed_out)
            self._handed_out = None
            key = write_item.index.fqn
            entry = by_key[key]
            if key != self._current_key:
                _release(self._current)
                self._current, self._current_key = None, key
                full = entry.produce()
                if tuple(full.shape) != tuple(entry.shape) or full.dtype != entry.dtype:
                    raise ValueError(f"{key}: produced {tuple(full.shape)} {full.dtype}, declared "
                                     f"{tuple(entry.shape)} {entry.dtype}")
                full = full.contiguous()
                if not full.untyped_storage().resizable():  # e.g. straight from safetensors: own a copy
                    full = full.clone()
                self._current = full
                del full
            chunk = write_item.tensor_data.chunk
            piece = self._current
            for axis, (off, size) in enumerate(zip(chunk.offsets, chunk.sizes)):
                if size != piece.shape[axis]:
                    piece = piece.narrow(axis, off, size)
            if piece is not self._current:
                piece = piece.contiguous().clone()  # own storage, so that it can be released after writing
            self._handed_out = piece
            self._done += 1
            if progress is not None:
                progress(self._done, total, key)
            return piece

    os.makedirs(ckpt_dir, exist_ok=True)
    planner = StreamingSavePlanner()
    writer = dcp.FileSystemWriter(ckpt_dir, single_file_per_rank=True, sync_files=True, thread_count=1)
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.save({}, storage_writer=writer, planner=planner, no_dist=True)
    _release(planner._handed_out)
    _release(planner._current)


# ---------------------------------------------------------------------------------------------- DCP reading
class DcpTensorReader:
    """Reads global tensors one at a time from a DCP (torch_dist) checkpoint directory, in one process."""

    def __init__(self, ckpt_dir: str):
        from torch.distributed.checkpoint import FileSystemReader

        class _CachedReader(FileSystemReader):  # read (and unpickle) .metadata once, not once per tensor
            _md = None

            def read_metadata(self):
                if _CachedReader._md is None:
                    _CachedReader._md = super().read_metadata()
                return _CachedReader._md

        self.ckpt_dir = ckpt_dir
        self._reader_cls = _CachedReader
        self._reader = _CachedReader(ckpt_dir)
        self.metadata = self._reader.read_metadata()

    def tensor_keys(self) -> Dict[str, Tuple[Tuple[int, ...], torch.dtype]]:
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        return {k: (tuple(md.size), md.properties.dtype) for k, md in self.metadata.state_dict_metadata.items()
                if isinstance(md, TensorStorageMetadata)}

    def read(self, key: str) -> torch.Tensor:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

        shape, dtype = self.tensor_keys()[key]
        out = {key: torch.empty(shape, dtype=dtype)}
        reader = self._reader_cls(self.ckpt_dir)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
            dcp.load(out, storage_reader=reader, planner=DefaultLoadPlanner(allow_partial_load=True), no_dist=True)
        return out[key]


# ---------------------------------------------------------------------------------------------- safetensors
@dataclass
class SafetensorsEntry:
    name: str
    shape: Tuple[int, ...]
    dtype: torch.dtype


def write_safetensors(path: str, entries: Sequence[SafetensorsEntry], produce: Callable[[str], torch.Tensor],
                      metadata: Optional[dict] = None) -> int:
    """Write `entries` (in this order) to a .safetensors file, asking `produce(name)` for one tensor at a
    time. The header is computed from shapes/dtypes first (format: 8-byte little-endian header length,
    JSON header with dtype/shape/data_offsets per tensor, then the raw little-endian bytes). Written to a
    temp file and renamed. Returns the file size."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for e in entries:
        if e.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{e.name}: dtype {e.dtype} cannot be stored in safetensors")
        n = nbytes(e.shape, e.dtype)
        header[e.name] = {"dtype": SAFETENSORS_DTYPES[e.dtype], "shape": list(e.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes with spaces
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for e in entries:
            t = produce(e.name)
            if tuple(t.shape) != tuple(e.shape) or t.dtype != e.dtype:
                raise ValueError(f"{e.name}: produced {tuple(t.shape)} {t.dtype}, declared {tuple(e.shape)} {e.dtype}")
            flat = t.contiguous().reshape(-1)
            f.write(memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else b"")
            del t, flat
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return 8 + len(raw) + offset


def read_safetensors_header(path: str) -> Dict[str, Tuple[Tuple[int, ...], torch.dtype]]:
    """{name: (shape, dtype)} from a .safetensors file's header, without reading any tensor data."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > 100 * 2**20:
            raise ValueError(f"{path}: not a safetensors file (header length {n})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a safetensors file ({e})") from None
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in DTYPES_BY_SAFETENSORS_NAME:
            raise ValueError(f"{path}: tensor {name} has dtype {info['dtype']}, not supported here")
        out[name] = (tuple(info["shape"]), DTYPES_BY_SAFETENSORS_NAME[info["dtype"]])
    return out


def read_safetensors_tensor(path: str, name: str) -> torch.Tensor:
    """One tensor, opening (memory-mapping) the file only for this read so that no mapping accumulates
    resident pages of the whole file over a long conversion."""
    from safetensors import safe_open

    with safe_open(path, framework="pt", device="cpu") as f:
        t = f.get_tensor(name)
    return t

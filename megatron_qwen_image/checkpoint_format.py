"""The on-disk format of megatron-qwen-image checkpoint directories, shared by the trainer's Checkpointer
(consumer.checkpointing) and the converter (megatron_qwen_image.convert).

A checkpoint root (the trainer's ``--save DIR``) holds one directory per saved iteration plus a pointer:

    DIR/
      iter_0000040/          a megatron-core dist_checkpointing directory (torch_dist format):
        metadata.json          megatron's backend record ({"sharded_backend": "torch_dist", ...})
        common.pt              the non-sharded state (scheduler, step, data position, ...), rank 0
        .metadata, __*.distcp  torch.distributed.checkpoint metadata and data files
        complete.json          OUR marker, written last: the checkpoint is complete
      iter_0000060/
      latest                 the name of the newest COMPLETE checkpoint ("iter_0000060"), replaced atomically

A checkpoint directory counts only once ``complete.json`` exists; ``latest`` is rewritten (temp file, fsync,
rename, fsync of the directory) only after that. A process killed in the middle of a save therefore leaves
``latest`` on the previous good checkpoint, and the half-written directory is ignored (and removed by the
next save). A converted checkpoint (``python -m megatron_qwen_image.convert import-diffusers``) is a single
checkpoint directory of the same format whose content is the model only.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from typing import Optional

from megatron_qwen_image.fsutil import atomic_replace

FORMAT = "megatron-qwen-image-checkpoint"
FORMAT_VERSION = 1
LATEST_FILE = "latest"
COMPLETE_MARKER = "complete.json"
MEGATRON_METADATA = "metadata.json"  # megatron-core dist_checkpointing's own record
_ITER_RE = re.compile(r"^iter_(\d{7,})$")


class CheckpointNotFoundError(FileNotFoundError):
    pass


def iteration_dir_name(step: int) -> str:
    return f"iter_{step:07d}"


def iteration_of(dir_name: str) -> Optional[int]:
    m = _ITER_RE.match(os.path.basename(os.path.normpath(dir_name)))
    return int(m.group(1)) if m else None


def is_complete(ckpt_dir: str) -> bool:
    return (os.path.isfile(os.path.join(ckpt_dir, COMPLETE_MARKER))
            and os.path.isfile(os.path.join(ckpt_dir, MEGATRON_METADATA)))


def read_marker(ckpt_dir: str) -> dict:
    with open(os.path.join(ckpt_dir, COMPLETE_MARKER)) as f:
        return json.load(f)


def atomic_write_text(path: str, text: str) -> None:
    """Write `text` to `path` so that readers see either the old or the new content, never a mix."""
    path = os.path.abspath(path)
    atomic_replace(path, text.encode(), tmp_dir=os.path.dirname(path))


def mark_complete(ckpt_dir: str, info: dict) -> None:
    atomic_write_text(os.path.join(ckpt_dir, COMPLETE_MARKER),
                      json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, **info}, indent=1) + "\n")


def write_latest(root: str, ckpt_dir_name: str) -> None:
    atomic_write_text(os.path.join(root, LATEST_FILE), ckpt_dir_name + "\n")


def complete_iterations(root: str) -> list[tuple[int, str]]:
    """(step, path) of every complete iter_* checkpoint under `root`, oldest first."""
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        step = iteration_of(name)
        path = os.path.join(root, name)
        if step is not None and os.path.isdir(path) and is_complete(path):
            out.append((step, path))
    return sorted(out)


def incomplete_iterations(root: str) -> list[str]:
    """iter_* directories without the completion marker (a save that was killed, or one in progress)."""
    if not os.path.isdir(root):
        return []
    return sorted(os.path.join(root, n) for n in os.listdir(root)
                  if iteration_of(n) is not None and os.path.isdir(os.path.join(root, n))
                  and not is_complete(os.path.join(root, n)))


def looks_like_checkpoint_dir(path: str) -> bool:
    """A (possibly incomplete) checkpoint directory rather than a root: an iter_* name, or any file that
    only a checkpoint directory holds."""
    return iteration_of(path) is not None or any(
        os.path.isfile(os.path.join(path, f)) for f in (MEGATRON_METADATA, COMPLETE_MARKER, "common.pt", ".metadata"))


def resolve(path: str) -> Optional[str]:
    """The complete checkpoint directory that `path` designates, or None when it holds none yet.

    `path` is either a checkpoint directory itself (it has metadata.json) or a checkpoint root: then
    ``latest`` decides; without ``latest`` (e.g. it was lost), the newest complete iter_* directory.
    Raises CheckpointNotFoundError for a checkpoint directory that is incomplete, or a ``latest``
    that names a missing/incomplete directory (someone edited or deleted it; never guess then).
    """
    if not os.path.isdir(path):
        return None
    if looks_like_checkpoint_dir(path):
        if not is_complete(path):
            raise CheckpointNotFoundError(
                f"{path}: checkpoint is incomplete (no {COMPLETE_MARKER}); it was probably interrupted while "
                f"saving. Load its parent directory to use the newest complete checkpoint instead.")
        return path
    latest = os.path.join(path, LATEST_FILE)
    if os.path.isfile(latest):
        with open(latest) as f:
            name = f.read().strip()
        target = os.path.join(path, name)
        if not (name and os.path.isdir(target) and is_complete(target)):
            raise CheckpointNotFoundError(f"{latest} names {name!r}, which is not a complete checkpoint directory")
        return target
    done = complete_iterations(path)
    return done[-1][1] if done else None


def prune(root: str, keep_last: Optional[int], protect: str) -> list[str]:
    """Delete all but the newest `keep_last` complete checkpoints (never `protect`), and every incomplete
    iter_* directory older than `protect` (left by a killed save). Returns the removed paths."""
    removed = []
    keep_step = iteration_of(protect)
    for path in incomplete_iterations(root):
        if keep_step is not None and iteration_of(path) < keep_step:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if keep_last is not None:
        done = complete_iterations(root)
        for _, path in done[:max(len(done) - keep_last, 0)]:
            if os.path.abspath(path) != os.path.abspath(protect):
                # drop the marker first so that a crash in the middle never leaves a "complete" half
                os.remove(os.path.join(path, COMPLETE_MARKER))
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed

"""Durable, atomic file operations that also hold on NFS-like shared filesystems.

Only three primitives are relied on: write+fsync a private temp file, rename() within one directory
tree (atomic replace), and link() to a new name (atomic create-if-absent: the classic NFS-safe lock;
O_EXCL was unreliable on old NFS). No fcntl locks: they need a working lock daemon on NFSv3 and are
silently local on some FUSE filesystems.
"""
from __future__ import annotations

import os
import uuid


def fsync_dir(path: str) -> None:
    """Make a rename/link/unlink in `path` durable (no-op where directories cannot be fsynced)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: str, data: bytes) -> None:
    """Write a new private file and fsync it (the caller then renames or links it into place)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def unique_tmp_name(tmp_dir: str, stem: str) -> str:
    return os.path.join(tmp_dir, f"{stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def atomic_replace(path: str, data: bytes, tmp_dir: str) -> None:
    """Readers see either the old content or the new, never a partial file."""
    tmp = unique_tmp_name(tmp_dir, os.path.basename(path))
    try:
        write_durable(tmp, data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    fsync_dir(os.path.dirname(path))


def link_exclusive(src: str, dst: str) -> bool:
    """Give the complete file `src` the new name `dst` if and only if `dst` does not exist yet.

    True if we created `dst`. On NFS a retransmitted LINK whose first reply was lost answers EEXIST
    although it succeeded; comparing inodes tells that case apart.
    """
    try:
        os.link(src, dst)
        return True
    except FileExistsError:
        try:
            a, b = os.stat(src), os.stat(dst)
        except FileNotFoundError:
            return False
        return (a.st_ino, a.st_dev) == (b.st_ino, b.st_dev)


def create_exclusive(path: str, data: bytes, tmp_dir: str) -> bool:
    """Atomically create `path` with `data` unless it exists. True if we created it."""
    tmp = unique_tmp_name(tmp_dir, os.path.basename(path))
    try:
        write_durable(tmp, data)
        created = link_exclusive(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    if created:
        fsync_dir(os.path.dirname(path))
    return created

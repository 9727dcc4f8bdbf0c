"""A root directory on any fsspec filesystem with atomic writes: the base of the lake and the registry."""

from __future__ import annotations

import functools
import os
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO

import fsspec
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from common.processes import alive

TEMP_SUFFIX = ".tmp"  # of the dot-named file a write goes through before its rename
UPLOAD_PREFIX = "lambdarec-upload-"  # + the pid: a local copy of an object being uploaded

# Object stores publish an upload whole when it completes (S3's PUT and CompleteMultipartUpload), and
# have no rename: their `mv` is a copy then a delete.
OBJECT_STORE_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "abfs", "az"})


class Store:
    """Paths under one root URL (a local path by default), written atomically."""

    def __init__(self, root: str) -> None:
        self.root_url = str(root)
        # No listings cache: other processes write here too (a second lake writer, the DAG publishing a
        # version), and a cached listing would hide their files from dedup, CURRENT and the readers.
        fs, path = fsspec.core.url_to_fs(self.root_url, use_listings_cache=False)
        self.fs: AbstractFileSystem = fs
        self.root = path.rstrip("/")

    @property
    def is_object_store(self) -> bool:
        protocols = (self.fs.protocol,) if isinstance(self.fs.protocol, str) else tuple(self.fs.protocol)
        return not OBJECT_STORE_PROTOCOLS.isdisjoint(protocols)

    @property
    def is_local(self) -> bool:
        """Whether the paths are this machine's files (what a memory map can open)."""
        return isinstance(self.fs, LocalFileSystem)

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def write_atomic(self, target: str, write: Callable[[IO[bytes]], object]) -> None:
        """Write through `write` so that readers see the whole file at `target` or nothing.

        On a filesystem: into a dot-named temp file, then renamed into place (readers, pyarrow, DuckDB
        and Spark, skip dot-files); a failed write removes its temp file. On an object store: into a
        local temp file, then uploaded, since the object appears only when its upload completes; a
        write that fails, or a process killed, before that leaves no object.
        """
        if self.is_object_store:
            self._upload_whole(target, write)
            return
        directory, name = target.rsplit("/", 1)
        tmp = f"{directory}/.{name}.{uuid.uuid4().hex}{TEMP_SUFFIX}"
        self.fs.makedirs(directory, exist_ok=True)
        try:
            with self.fs.open(tmp, "wb") as f:
                write(f)
            self.fs.mv(tmp, target)
        except BaseException:
            if self.fs.exists(tmp):
                self.fs.rm(tmp)
            raise

    def write_bytes(self, target: str, data: bytes) -> None:
        self.write_atomic(target, lambda f: f.write(data))

    def _upload_whole(self, target: str, write: Callable[[IO[bytes]], object]) -> None:
        # Not fs.open(target, "wb"): closing it on an exception would complete the upload of half a file.
        remove_orphaned_uploads(tempfile.gettempdir())
        fd, local = tempfile.mkstemp(prefix=f"{UPLOAD_PREFIX}{os.getpid()}-")
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
            self.fs.put_file(local, target)
        finally:
            os.unlink(local)


@functools.cache
def remove_orphaned_uploads(directory: str) -> int:
    """Delete the local copies of uploads whose process is gone: one killed mid-upload never ran the
    `finally` that deletes its copy (a file of the object's size). Once per process and directory, at its
    first upload, so a restarted writer clears what the killed one left. Returns how many it deleted."""
    removed = 0
    for path in Path(directory).glob(f"{UPLOAD_PREFIX}*-*"):
        pid = path.name.removeprefix(UPLOAD_PREFIX).partition("-")[0]
        if pid.isdigit() and not alive(int(pid)):
            path.unlink(missing_ok=True)
            removed += 1
    return removed

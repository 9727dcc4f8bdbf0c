"""A root directory on any fsspec filesystem with atomic writes: the base of the lake and the registry."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import IO

import fsspec
from fsspec import AbstractFileSystem

TEMP_SUFFIX = ".tmp"  # of the dot-named file a write goes through before its rename


class Store:
    """Paths under one root URL (a local path by default), written atomically."""

    def __init__(self, root: str) -> None:
        self.root_url = str(root)
        fs, path = fsspec.core.url_to_fs(self.root_url)
        self.fs: AbstractFileSystem = fs
        self.root = path.rstrip("/")

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def write_atomic(self, target: str, write: Callable[[IO[bytes]], object]) -> None:
        """Write through `write` into a dot-named temp file, then rename it into place.

        Readers (pyarrow, DuckDB, Spark) skip dot-files, so they never see half a file; a failed
        write removes its temp file.
        """
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

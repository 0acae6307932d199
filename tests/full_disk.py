"""A folder on a full disk, for the tests of what codetr does when a write fails with ENOSPC.

Where the machine allows it (root, Linux), a small tmpfs is mounted: writes fail in the kernel, as on
a real full disk, whatever library writes. Elsewhere, ``open`` (builtins, io) and ``os.fdopen`` are patched so that
writes into the folder fail with ENOSPC after a budget of bytes (the library writers codetr uses go
through them).
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

TMPFS_BYTES = 64 * 2**20  # room for a tiny model; memory is used only by what is written


NO_TMPFS_ENV = "CODETR_TEST_NO_TMPFS"  # =1: use the patched writers even where a tmpfs could be mounted


def _mount_tmpfs(folder: Path) -> bool:
    if not sys.platform.startswith("linux") or os.geteuid() != 0 or os.environ.get(NO_TMPFS_ENV):
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES}", "tmpfs", str(folder)],
                          capture_output=True)
    return done.returncode == 0


class _LimitedFile:
    """A binary file whose writes fail with ENOSPC once the disk's budget is spent."""

    def __init__(self, file: Any, disk: FullDisk) -> None:
        self._file, self._disk = file, disk

    def write(self, data: Any) -> int:
        size = len(memoryview(data).cast("B"))
        if size > self._disk.free:
            written = self._file.write(bytes(memoryview(data).cast("B")[:self._disk.free]))
            self._disk.free -= written
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._disk.free -= size
        return self._file.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)

    def __enter__(self) -> _LimitedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()


class FullDisk:
    """``folder`` lies on a disk that :meth:`fill` fills up, leaving ``leave`` bytes free."""

    def __init__(self, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.folder = folder
        self.tmpfs = _mount_tmpfs(folder)
        self.free: int | None = None  # the patched writers' budget (None: unlimited)
        self._filler = 0
        if not self.tmpfs:
            self._patch(monkeypatch)

    def fill(self, leave: int = 0) -> None:
        """Use up the space of the disk but ``leave`` bytes (roughly: the tmpfs counts pages)."""
        if not self.tmpfs:
            self.free = leave
            return
        stats = os.statvfs(self.folder)
        spare = stats.f_bavail * stats.f_frsize - leave
        self._filler += 1
        with open(self.folder / f"filler{self._filler}", "wb") as f:
            try:
                f.write(bytes(max(spare, 0)))
                f.flush()
            except OSError:
                pass

    def empty(self) -> None:
        """Free the space again."""
        self.free = None
        for i in range(1, self._filler + 1):
            (self.folder / f"filler{i}").unlink(missing_ok=True)

    def unmount(self) -> None:
        if self.tmpfs:
            subprocess.run(["umount", "-l", str(self.folder)], check=False)

    def _patch(self, monkeypatch: pytest.MonkeyPatch) -> None:
        folder = str(self.folder.resolve())
        original_open, original_fdopen = builtins.open, os.fdopen

        def inside(path: Any) -> bool:
            return isinstance(path, (str, os.PathLike)) and os.path.abspath(path).startswith(folder)

        def limited(file: Any, mode: str) -> Any:
            return _LimitedFile(file, self) if self.free is not None and "b" in mode and "r" not in mode else file

        def patched_open(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            file = original_open(path, mode, *args, **kwargs)
            return limited(file, mode) if inside(path) else file

        def patched_fdopen(fd: int, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            file = original_fdopen(fd, mode, *args, **kwargs)
            return limited(file, mode) if inside(os.readlink(f"/proc/self/fd/{fd}")) else file

        monkeypatch.setattr(builtins, "open", patched_open)
        monkeypatch.setattr(io, "open", patched_open)  # pathlib's
        monkeypatch.setattr(os, "fdopen", patched_fdopen)


def full_disk_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FullDisk]:
    """The body of the ``full_disk`` fixture (tests/conftest.py)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    disk = FullDisk(folder, monkeypatch)
    try:
        yield disk
    finally:
        disk.unmount()

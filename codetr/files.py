"""The files codetr writes: the names of a run folder's files, writing them atomically (a kill or a
full disk during a save leaves the previous file intact), and the lock that keeps one run per folder."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch

from codetr.distributed import log
from codetr.errors import FileWriteError, UserError

try:  # POSIX; on Windows the run lock is skipped and a temporary still being written cannot be deleted
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

# What a training run writes in its --out folder (and Detector.save_pretrained: config + weights).
CHECKPOINT_NAME = "last.pt"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.yaml"
METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "training.png"
TENSORBOARD_DIR = "tensorboard"
# Another run in a folder holding these must resume it or be allowed to replace it.
RUN_OUTPUTS = (CHECKPOINT_NAME, WEIGHTS_NAME, METRICS_NAME, PLOT_NAME, CONFIG_NAME, TENSORBOARD_DIR)
# The lock file of a run folder (held by the process training or evaluating there; see run_lock).
LOCK_NAME = ".codetr.lock"

TEMPORARY_SUFFIX = ".tmp"


def _file_mode() -> int:
    """Permissions of a newly created file under the current umask (mkstemp uses 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


class _RecordingFile:
    """A binary file that remembers the OSError of a failed write: libraries (torch.save, Pillow)
    re-raise it as other exceptions, and the error message must still say what happened."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self._file.write(data)
        except OSError as err:
            self.error = err
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` through ``write(file)`` into a temporary file in its folder (fsync'ed), then
    ``os.replace`` it.

    Any failure (an exception, SIGINT, SIGTERM under the ``codetr`` command, a kill) leaves the
    previous content of ``path`` intact; an exception removes the temporary file, and one left by a
    killed process is removed by :func:`remove_orphan_temporaries`. A write that fails in the file
    system (a full disk, no permission) is a :class:`FileWriteError` naming ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        file, tmp = _open_temporary(path)
    except OSError as err:
        raise _write_error(path, err) from err
    recorder = _RecordingFile(file)
    written = False
    try:
        with file:
            write(recorder)  # type: ignore[arg-type]
            written = True
            file.flush()
            os.fsync(file.fileno())
            os.chmod(tmp, _file_mode())
            os.replace(tmp, path)  # while locked: nobody removes a temporary that is being renamed
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        cause = err if written and isinstance(err, OSError) else recorder.error
        if cause is not None and isinstance(err, Exception) and not isinstance(err, UserError):
            raise _write_error(path, cause) from err
        raise


def _write_error(path: Path, err: OSError) -> FileWriteError:
    what = "no space left on device" if err.errno == errno.ENOSPC else (err.strerror or str(err)).lower()
    kept = f"the previous {path.name} is unchanged" if path.is_file() else "nothing was written"
    return FileWriteError(f"cannot write {path}: {what} ({kept})")


def _open_temporary(path: Path) -> tuple[BinaryIO, Path]:
    """A new temporary file beside ``path``, open for writing and locked while this process writes
    it (so that :func:`remove_orphan_temporaries` in another process leaves it alone)."""
    while True:
        fd, name = tempfile.mkstemp(prefix=_temporary_prefix(path.name), suffix=TEMPORARY_SUFFIX, dir=path.parent)
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        if os.fstat(fd).st_nlink:
            return os.fdopen(fd, "wb"), Path(name)
        os.close(fd)  # removed by another process' cleanup before it was locked: take another name


def _temporary_prefix(name: str) -> str:
    """Start of the name of :func:`atomic_write`'s temporary files for a file ``name``: ``.<name>.``
    (then mkstemp's random characters and ``.tmp``)."""
    return f".{name}."


def remove_orphan_temporaries(folder: str | Path, names: Iterable[str]) -> list[tuple[Path, int]]:
    """Delete the temporary files that interrupted :func:`atomic_write` calls (a kill, a power cut)
    left in ``folder`` for the files ``names``; returns the removed paths and their sizes in bytes.
    A temporary file that a live process is still writing is left alone."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    names = set(names)
    removed = []
    for path in sorted(folder.iterdir()):
        # .<name>.<8 random characters>.tmp
        if not (path.name.startswith(".") and path.name.endswith(TEMPORARY_SUFFIX)):
            continue
        target = path.name[1:-len(TEMPORARY_SUFFIX)].rpartition(".")[0]
        if target in names and path.is_file():
            size = _remove_unless_in_use(path)
            if size is not None:
                removed.append((path, size))
    return removed


def _remove_unless_in_use(path: Path) -> int | None:
    """Delete ``path`` unless a live process holds its lock; returns its size when deleted."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the writer's lock ends with its process
        size = os.fstat(fd).st_size
        path.unlink()
        return size
    except OSError:  # locked by a live writer (or, on Windows, still open)
        return None
    finally:
        os.close(fd)


def remove_interrupted_writes(folder: str | Path, names: Iterable[str]) -> None:
    """:func:`remove_orphan_temporaries`, saying on the main process' log what it removed."""
    removed = remove_orphan_temporaries(folder, names)
    if removed:
        megabytes = sum(size for _, size in removed) / 2**20
        log(f"removed {len(removed)} temporary file(s) of interrupted saves in {folder} ({megabytes:.1f} MB): "
            f"{', '.join(path.name for path, _ in removed[:3])}{' ...' if len(removed) > 3 else ''}")


def check_writable_folder(folder: str | Path, what: str) -> Path:
    """Create ``folder`` if needed and check that a file can be written in it, before long work;
    a UserError naming the folder (``what``: e.g. "--out") otherwise. Returns the folder."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise UserError(f"{what} {folder}: cannot write there ({err.strerror or err})") from err
    return folder


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)``, atomically."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def append_text(path: str | Path, text: str) -> None:
    """Append ``text`` to ``path`` (fsync'ed); a failed write (a full disk) truncates the file back to
    its previous content and is a :class:`FileWriteError` naming it: no half-written line stays."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("ab") as f:
            size = f.tell()
            try:
                f.write(text.encode())
                f.flush()
                os.fsync(f.fileno())
            except BaseException:
                f.truncate(size)
                raise
    except OSError as err:
        raise _write_error(path, err) from err


# ------------------------------------------------------------------------------------ run lock


_held_locks: set[int] = set()  # descriptors of the run locks this process holds


def _release_in_child() -> None:
    """A forked child (a data-loading worker) closes its copies of the run locks: the lock then ends
    with the process that took it, not with the last of its children."""
    for fd in _held_locks:
        with contextlib.suppress(OSError):
            os.close(fd)
    _held_locks.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_release_in_child)


@contextlib.contextmanager
def run_lock(folder: str | Path, what: str = "--out") -> Iterator[None]:
    """Hold the lock of the run folder ``folder`` for the block: a second codetr process (training,
    evaluating or resuming there) stops with a UserError naming the process that holds it. An OS
    file lock on ``folder/.codetr.lock``: the kernel releases it when the process ends, however it
    ends. Skipped where the OS has no ``fcntl`` (Windows)."""
    folder = Path(folder)
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    check_writable_folder(folder, what)
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, _file_mode())
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise UserError(f"{what} {folder} is in use by another codetr run ({holder}): wait for it to end, "
                            "or choose another folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
        _held_locks.add(fd)
        yield
    finally:
        _held_locks.discard(fd)
        os.close(fd)

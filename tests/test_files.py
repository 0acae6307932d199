"""codetr/files.py: atomic writes on a full disk, temporaries of killed and of live writers, the run lock."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import pytest
import torch

from codetr.errors import FileWriteError, UserError
from codetr.files import (
    append_text,
    atomic_save,
    atomic_write,
    atomic_write_text,
    remove_orphan_temporaries,
    run_lock,
)
from full_disk import FullDisk

posix = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_a_full_disk_is_one_error_naming_the_file_and_the_previous_file_stays(full_disk: FullDisk) -> None:
    folder = full_disk.folder
    atomic_save({"w": torch.zeros(4)}, folder / "last.pt")
    atomic_write_text(folder / "config.yaml", "a: 1\n")
    append_text(folder / "metrics.jsonl", '{"iter": 1}\n')
    before = {name: (folder / name).read_bytes() for name in ("last.pt", "config.yaml", "metrics.jsonl")}
    full_disk.fill(leave=2000)
    # torch.save turns the failed write into a RuntimeError of its own: still the one error naming the file
    with pytest.raises(FileWriteError, match=rf"^cannot write {folder / 'last.pt'}: no space left on device "
                                             r"\(the previous last.pt is unchanged\)$"):
        atomic_save({"w": torch.zeros(100_000)}, folder / "last.pt")
    with pytest.raises(FileWriteError, match="cannot write .*config.yaml: no space left"):
        atomic_write_text(folder / "config.yaml", "b" * 100_000)
    with pytest.raises(FileWriteError, match="cannot write .*metrics.jsonl: no space left"):
        append_text(folder / "metrics.jsonl", "x" * 100_000 + "\n")  # no half-written line stays
    with pytest.raises(FileWriteError, match=r"cannot write .*new.pt: no space left on device \(nothing was written\)"):
        atomic_save({"w": torch.zeros(100_000)}, folder / "new.pt")
    assert {name: (folder / name).read_bytes() for name in before} == before
    assert temporaries(folder) == [] and not (folder / "new.pt").exists()
    assert isinstance(FileWriteError("x"), OSError)  # callers catching OSError still catch it
    full_disk.empty()
    atomic_save({"w": torch.zeros(100_000)}, folder / "last.pt")
    assert torch.load(folder / "last.pt")["w"].shape == (100_000,)


def test_an_error_of_the_writer_itself_is_not_a_write_error(tmp_path: Path) -> None:
    def broken(f: object) -> None:
        raise ValueError("not serialisable")

    (tmp_path / "a.txt").write_text("old")
    with pytest.raises(ValueError, match="not serialisable"):
        atomic_write(tmp_path / "a.txt", broken)
    assert (tmp_path / "a.txt").read_text() == "old" and temporaries(tmp_path) == []


def _fork_writer(path: Path, ready: Path) -> int:
    """A child process stopped in the middle of ``atomic_write(path)`` (it sleeps there)."""
    child = os.fork()
    if child == 0:
        try:
            atomic_write(path, lambda f: (f.write(bytes(100)), f.flush(), ready.touch(), time.sleep(60)))
        finally:
            os._exit(1)
    while not ready.exists():
        time.sleep(0.01)
    return child


@posix
def test_a_temporary_is_removed_only_once_its_writer_is_dead(tmp_path: Path) -> None:
    child = _fork_writer(tmp_path / "last.pt", tmp_path / "ready")
    try:
        [name] = temporaries(tmp_path)
        assert remove_orphan_temporaries(tmp_path, ["last.pt"]) == []  # still being written: left alone
        assert temporaries(tmp_path) == [name]
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
    (tmp_path / ".notes.tmp").write_text("not ours")
    (tmp_path / ".other.pt.abcdefgh.tmp").write_text("not one of the names")
    assert remove_orphan_temporaries(tmp_path, ["last.pt"]) == [(tmp_path / name, 100)]
    assert temporaries(tmp_path) == [".notes.tmp", ".other.pt.abcdefgh.tmp"]


def test_the_run_lock_names_its_holder_and_ends_with_the_block(tmp_path: Path) -> None:
    with run_lock(tmp_path):
        with pytest.raises(UserError, match=rf"^--out {tmp_path} is in use by another codetr run \(pid {os.getpid()} "
                                            rf"on host {socket.gethostname()}\): wait for it to end"):
            with run_lock(tmp_path):
                pass
    with run_lock(tmp_path):  # released
        pass


@posix
def test_the_run_lock_ends_with_its_process_not_with_its_children(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    holder = os.fork()
    if holder == 0:
        try:
            with run_lock(tmp_path):
                worker = os.fork()  # as a data-loading worker: it must not keep the lock alive
                if worker == 0:
                    time.sleep(60)
                    os._exit(0)
                ready.write_text(str(worker))
                time.sleep(60)
        finally:
            os._exit(1)
    while not ready.exists() or not ready.read_text():
        time.sleep(0.01)
    worker = int(ready.read_text())
    try:
        with pytest.raises(UserError, match=f"in use by another codetr run \\(pid {holder} "):
            with run_lock(tmp_path):
                pass
        os.kill(holder, signal.SIGKILL)  # killed: the kernel releases the lock, the worker lives on
        os.waitpid(holder, 0)
        with run_lock(tmp_path):
            pass
    finally:
        os.kill(worker, signal.SIGKILL)

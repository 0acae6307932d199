"""Shared test fixtures."""

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from full_disk import FullDisk, full_disk_folder

# Without CUDA, Triton kernels run only in Triton's interpreter, which must be chosen before triton
# is first imported (torch._dynamo imports it): so here, before any test module.
# tests/ops/test_deform_attn_triton.py runs the kernels in it on CPU tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models run faster on one thread, and much faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FullDisk]:
    """A folder ``full_disk.folder`` whose disk ``full_disk.fill(leave=bytes)`` fills up: a small tmpfs
    where the machine allows mounting one, else patched writers (tests/full_disk.py)."""
    yield from full_disk_folder(tmp_path, monkeypatch)

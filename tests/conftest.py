"""Shared test fixtures."""

import os
from collections.abc import Iterator

import pytest
import torch

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

"""What the fused kernels of multi-scale deformable attention (C++ on the CPU, Triton) share as
torch custom operators ``op(value, shapes, locations, weights)``: the autograd formula, which saves
the three input tensors and recomputes the samples in a backward operator, and that operator's fake
(meta) implementation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

BackwardOp = Callable[[Tensor, Tensor, list[int], Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]


def backward_fake(grad: Tensor, value: Tensor, shapes: list[int], locations: Tensor,
                  weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Shapes and dtypes of ``(grad_value, grad_locations, grad_weights)``: those of the inputs."""
    return torch.empty_like(value), torch.empty_like(locations), torch.empty_like(weights)


def register_autograd(op: Any, backward_op: BackwardOp) -> None:
    """Give ``op`` (a name or a custom op) the gradient ``backward_op(grad, value, shapes, locations,
    weights) -> (grad_value, grad_locations, grad_weights)``; ``shapes`` gets no gradient."""

    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        value, shapes, locations, weights = inputs
        ctx.save_for_backward(value, locations, weights)
        ctx.shapes = shapes

    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, Tensor, Tensor]:
        value, locations, weights = ctx.saved_tensors
        grad_value, grad_locations, grad_weights = backward_op(grad, value, ctx.shapes, locations, weights)
        return grad_value, None, grad_locations, grad_weights

    torch.library.register_autograd(op, backward, setup_context=setup_context)

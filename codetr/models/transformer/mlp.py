"""The multi-layer perceptron of the DETR heads (box branches, reference-point heads)."""

from __future__ import annotations

from torch import nn


def mlp(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> nn.Sequential:
    """``num_layers`` Linear layers with ReLU between them (layer k at Sequential index 2k)."""
    dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
    layers: list[nn.Module] = []
    for k in range(num_layers):
        layers += [nn.Linear(dims[k], dims[k + 1])] + ([nn.ReLU()] if k < num_layers - 1 else [])
    return nn.Sequential(*layers)

"""Sine positional encodings: of feature-map pixels, and of boxes (two-stage / positive queries)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _frequencies(num_feats: int, temperature: float, device: torch.device) -> Tensor:
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=device)
    return temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)


def _interleave_sin_cos(pos: Tensor) -> Tensor:
    """(..., F) angles -> (..., F) with sin on even and cos on odd frequencies, interleaved."""
    return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)


def sine_position_embedding(mask: Tensor, num_feats: int, temperature: float = 10000.0,
                            offset: float = -0.5) -> Tensor:
    """Normalised 2-d sine encoding of the valid pixels of a padded map (Deformable-DETR).

    mask: (B, H, W) bool, True on padding. Returns (B, 2 * num_feats, H, W): y features then x.
    Coordinates are cumulative counts of valid pixels plus ``offset``, divided by the valid
    extent and scaled to [0, 2π].
    """
    valid = (~mask).float()
    y = valid.cumsum(1)
    x = valid.cumsum(2)
    eps, scale = 1e-6, 2 * math.pi
    y = (y + offset) / (y[:, -1:, :] + eps) * scale
    x = (x + offset) / (x[:, :, -1:] + eps) * scale
    dim_t = _frequencies(num_feats, temperature, mask.device)
    pos_x = _interleave_sin_cos(x[..., None] / dim_t)
    pos_y = _interleave_sin_cos(y[..., None] / dim_t)
    return torch.cat((pos_y, pos_x), dim=-1).permute(0, 3, 1, 2)


def proposal_pos_embed(coords_logits: Tensor, num_feats: int = 128, temperature: float = 10000.0) -> Tensor:
    """Sine encoding of boxes given as logits (inverse-sigmoid of cxcywh normalised).

    coords_logits: (B, Q, 4). Returns (B, Q, 4 * num_feats): each coordinate is sigmoid'ed,
    scaled to [0, 2π] and encoded with ``num_feats`` frequencies.
    """
    coords = coords_logits.sigmoid().float() * (2 * math.pi)
    pos = coords[..., None] / _frequencies(num_feats, temperature, coords.device)
    return _interleave_sin_cos(pos).flatten(-2).to(coords_logits.dtype)


def box_sine_embed(boxes: Tensor, num_feats: int = 128, temperature: float = 10000.0) -> Tensor:
    """Sine encoding of normalised boxes for DINO's query positions (``ref_point_head`` input), or of
    points (Conditional DETR's reference points).

    boxes: (B, Q, 4) cxcywh or (B, Q, 2) xy in [0, 1]. Returns (B, Q, 4 * num_feats) ordered y, x, w, h
    (DINO's order; ``proposal_pos_embed`` keeps x, y, w, h), or (B, Q, 2 * num_feats) ordered y, x.
    """
    pos = boxes[..., None].float() * (2 * math.pi) / _frequencies(num_feats, temperature, boxes.device)
    pos = _interleave_sin_cos(pos)  # (B, Q, 4 or 2, F)
    return pos[..., [1, 0, *range(2, boxes.shape[-1])], :].flatten(-2).to(boxes.dtype)

"""Layer-wise learning-rate decay for a ViT backbone, as the released
``LayerDecayOptimizerConstructor`` (Sense-X/Co-DETR ``mmdet/core/optimizers/layer_decay_optimizer_constructor.py``,
``get_layer_id_for_vit``), which the Co-DINO ViT-L COCO config trains with (rate 0.8, 24 layers).

Each trainable parameter gets a layer id from its name in the detector (``backbone.`` prefixed;
:func:`codetr.models.base.layer_id`):
0 for the patch embedding and the position embedding (and class / mask tokens), ``i + 1`` for
``backbone.blocks.{i}``, ``num_layers + 1`` for everything else (the rest of the backbone, the
neck, the transformer, the heads). Its learning rate is ``lr * rate ** (num_layers + 1 - id)``:
the last block gets ``lr * rate``, the first ``lr * rate ** num_layers``, the embeddings
``lr * rate ** (num_layers + 1)``, the detector above the backbone ``lr``.

Weight decay as released: none for 1-d parameters (norms), biases and relative position tables.
The released exemption of ``pos_embed`` and ``cls_token`` compares the unprefixed names, which no
detector parameter has, so ``backbone.pos_embed`` (3-d) is decayed, as in the released training.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from codetr.models.base import BACKBONE_BLOCKS, base_detector_name, layer_id


def has_weight_decay(name: str, ndim: int) -> bool:
    """False for 1-d parameters, biases and relative position tables (see the module docstring)."""
    return not (ndim == 1 or name.endswith(".bias") or "relative_position_bias_table" in name or "rel_pos" in name)


def layer_decay_param_groups(model: nn.Module, lr: float, weight_decay: float, rate: float,
                             num_layers: int) -> list[dict[str, Any]]:
    """AdamW parameter groups, one per (layer id, with or without weight decay), named
    ``layer_{id}_decay`` / ``layer_{id}_no_decay``, each with ``lr_mult`` (the layer's scale), ``lr``
    and ``weight_decay``; frozen parameters are left out. Names are taken relative to the base
    detector (a Co-DETR wrapper's ``detector.`` prefix removed)."""
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"train.layer_decay.rate must be in (0, 1], got {rate}")
    groups: dict[str, dict[str, Any]] = {}
    blocks_seen = False
    for full_name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        name = base_detector_name(full_name)
        layer = layer_id(name, num_layers)
        if layer > num_layers + 1 or (name.startswith(BACKBONE_BLOCKS) and layer == num_layers + 1):
            raise ValueError(f"train.layer_decay.num_layers is {num_layers}, but the backbone has {name}: "
                             "set it to the number of ViT blocks")
        blocks_seen |= name.startswith(BACKBONE_BLOCKS)
        decay = has_weight_decay(name, param.ndim)
        key = f"layer_{layer}_{'decay' if decay else 'no_decay'}"
        scale = rate ** (num_layers + 1 - layer)
        group = groups.setdefault(key, {"params": [], "name": key, "lr_mult": scale, "lr": lr * scale,
                                        "weight_decay": weight_decay if decay else 0.0})
        group["params"].append(param)
    if not blocks_seen:
        raise ValueError("train.layer_decay needs a ViT backbone (parameters named backbone.blocks.{i}...); "
                         "this model has none: set train.layer_decay.rate=null")
    return list(groups.values())

"""Weights files into a detector: the one loading path behind ``codetr eval`` / ``predict`` /
``export``, ``train --init`` and the Python API, with a short diagnosis when they do not fit.

A file is inference weights (``.safetensors``: class names, category ids and the config in its
metadata) or a training checkpoint (``last.pt``; with ``train.ema`` its average replaces the
weights, as training evaluated and saved it).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from torch import Tensor, nn

from codetr.engine.checkpoint import load_checkpoint, read_safetensors
from codetr.errors import UserError

# Parameters whose shape follows the number of classes: when fine-tuning on another class count
# (train.init) they keep their fresh initialisation. The DETR class branches, the RoI head's
# classifier and class-wise box regression, the ATSS classifier, a denoising label embedding.
CLASS_LAYERS = (r"^class_branches\.", r"\.roi\.fc_(cls|reg)\.", r"\.atss_cls\.", r"label_embedding\.")
# The tensor whose first dimension is the number of classes.
CLASS_TENSOR = "class_branches.0.bias"
# Repeated modules (name prefix before the index) and the config key that sets how many there are.
REPEATED = {"decoder_layers": "model.transformer.dec_layers", "encoder.layers": "model.transformer.enc_layers",
            "neck.convs": "model.transformer.num_feature_levels", "aux_heads": "model.co.aux_heads"}
# Config sizes that shape many tensors, named when a mismatched dimension equals one of them.
SIZES = ("transformer.d_model", "transformer.ffn_dim", "transformer.num_queries", "transformer.n_heads",
         "transformer.n_points", "transformer.num_feature_levels", "co.roi_fc_dim", "dino.num_dn_queries")
SHOWN = 4  # names listed per kind of mismatch


@dataclass
class WeightsFile:
    """What a weights file holds: tensors, and when stored, class names, category ids and config YAML."""

    state: dict[str, Tensor]
    class_names: list[str] | None
    category_ids: list[int] | None
    config_text: str | None


def read_weights(path: str | Path) -> WeightsFile:
    """Read ``.safetensors`` inference weights or a ``.pt`` training checkpoint (UserError naming the
    file when it is neither)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        state, metadata = read_safetensors(path)
        try:
            names = json.loads(metadata["class_names"]) if "class_names" in metadata else None
            ids = json.loads(metadata["category_ids"]) if "category_ids" in metadata else None
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: unreadable class names or category ids in its metadata ({err})") from None
        return WeightsFile(state, names, ids, metadata.get("config"))
    ckpt = load_checkpoint(path)
    averages = ckpt.get("hooks", {}).get("EMAHook", {}).get("averages", {})
    return WeightsFile({**ckpt["model"], **averages}, ckpt["class_names"], ckpt["category_ids"],
                       yaml.safe_dump(ckpt["config"], sort_keys=False))


def build_detector(model_cfg: Any, build: Callable[[Any], nn.Module] | None = None) -> nn.Module:
    """``build(model_cfg)`` (default :func:`codetr.models.build.build_model`); a ValueError, which
    building raises for a config value it cannot use (an unknown ``model.neck``, a backbone weights
    file of another network, ...), becomes a UserError."""
    if build is None:
        from codetr.models.build import build_model as build  # heavy import, only when a model is needed
    try:
        return build(model_cfg)
    except ValueError as err:
        raise UserError(f"cannot build the model from the config: {err}") from err


def _shape(t: Tensor) -> str:
    return "x".join(map(str, t.shape)) or "scalar"


def _listed(keys: list[str]) -> str:
    more = f" (+{len(keys) - SHOWN} more)" if len(keys) > SHOWN else ""
    return ", ".join(keys[:SHOWN]) + more


def _config_value(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part, None)
    return cfg


def likely_causes(state: dict[str, Tensor], own: dict[str, Tensor], cfg: Any = None) -> list[str]:
    """Config differences that explain why ``state`` does not fit a model with tensors ``own``
    (``cfg``: its ModelConfig, to name the keys): another class count, another repeat count of a
    module (decoder layers, ...), another size (d_model, ...), or no common names at all."""
    causes = []
    if not set(state) & set(own):
        return [f"none of the file's {len(state)} tensor names is one of this model: weights of another "
                "implementation or architecture (`codetr convert` converts official mmdet and Hugging Face weights)"]
    if CLASS_TENSOR in state and CLASS_TENSOR in own and state[CLASS_TENSOR].shape != own[CLASS_TENSOR].shape:
        causes.append(f"another number of classes: {state[CLASS_TENSOR].shape[0]} in the file, model.num_classes "
                      f"{own[CLASS_TENSOR].shape[0]} in the config (to fine-tune on other classes: --init / train.init)")
    for prefix, key in REPEATED.items():
        pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
        count = [len({m.group(1) for k in keys if (m := pattern.match(k))}) for keys in (state, own)]
        if count[0] != count[1] and count[0] and count[1]:
            causes.append(f"another number of {prefix}: {count[0]} in the file, {count[1]} in the model ({key})")
    pairs: Counter[tuple[int, int]] = Counter()
    for k in state.keys() & own.keys():
        if _is_class_layer(k) or state[k].shape == own[k].shape or state[k].dim() != own[k].dim():
            continue
        pairs.update({(a, b) for a, b in zip(state[k].shape, own[k].shape) if a != b})
    for (in_file, in_model), n in pairs.most_common(2):
        keys = [f"model.{s}" for s in SIZES if cfg is not None and _config_value(cfg, s) == in_model]
        named = f" ({' or '.join(keys)} = {in_model} in the config)" if keys else ""
        causes.append(f"a size of {in_file} in the file where the model has {in_model}, in {n} tensor(s){named}")
    return causes


def _is_class_layer(name: str) -> bool:
    return any(re.search(p, name) for p in CLASS_LAYERS)


def load_weights(model: nn.Module, state: dict[str, Tensor], source: str, cfg: Any = None,
                 reinit_classes: bool = False) -> list[str]:
    """Load ``state`` (full or inference-only) into ``model``; returns report lines.

    Every tensor the model needs at inference (``inference_state_dict``) must be in ``state`` with
    its shape; training-only parts missing from ``state`` keep the model's initialisation and
    those of ``state`` the model lacks (a plain detector) are skipped. ``reinit_classes``
    (fine-tuning): tensors of :data:`CLASS_LAYERS` of another shape keep their fresh
    initialisation. Anything else that differs is a UserError naming ``source``, with counts, the
    first names and the likely cause (:func:`likely_causes`; ``cfg`` the model's ModelConfig).
    """
    from codetr.models.codetr import TRAINING_ONLY  # the parts a plain detector does not have

    own = model.state_dict()
    needed = set(model.inference_state_dict()) if hasattr(model, "inference_state_dict") else set(own)
    other_shape = [k for k in state if k in own and state[k].shape != own[k].shape]
    reinit = [k for k in other_shape if reinit_classes and _is_class_layer(k)]
    # the tensors telling most first: those of other shapes that do not depend on the number of classes
    wrong = [f"{k} (file {_shape(state[k])}, model {_shape(own[k])})"
             for k in sorted(other_shape, key=_is_class_layer) if k not in reinit]
    unknown = [k for k in state if k not in own and not k.startswith(TRAINING_ONLY)]
    missing = [k for k in own if k not in state and k in needed]
    if wrong or unknown or missing:
        lines = [f"{source} does not fit the model built from the config ({len(wrong)} tensors of other shapes, "
                 f"{len(missing)} missing, {len(unknown)} not in the model):"]
        lines += [f"  {what}: {_listed(keys)}" for what, keys in
                  (("other shapes", wrong), ("missing", missing), ("not in the model", unknown)) if keys]
        lines += [f"  likely cause: {cause}" for cause in likely_causes(state, own, cfg)]
        raise UserError("\n".join(lines))
    loaded = {k: v for k, v in state.items() if k in own and k not in reinit}
    model.load_state_dict(loaded, strict=False)
    lines = [f"{source}: loaded {len(loaded)} of the model's {len(own)} tensors"]
    if reinit:
        lines.append(f"re-initialised (the number of classes differs): {', '.join(sorted(reinit))}")
    fresh = sorted(k for k in own if k not in state)
    if fresh:
        lines.append(f"not in the file, freshly initialised: {len(fresh)} tensors under "
                     f"{', '.join(sorted({k.split('.')[0] for k in fresh}))}")
    skipped = sorted(k for k in state if k not in own)
    if skipped:
        lines.append(f"skipped (training-only parts this model does not have): {len(skipped)} tensors")
    return lines

"""Weights files: reading and writing them, and loading their tensors into a detector with a short
diagnosis when they do not fit (behind ``codetr eval`` / ``predict`` / ``export``, ``train --init``
and the Python API; :mod:`codetr.inference.loading` builds the model).

A file is inference weights (``.safetensors``: class names, category ids and the config in its
metadata) or a training checkpoint (``last.pt``; with ``train.ema`` its average replaces the
weights, as training evaluated and saved it).
"""

from __future__ import annotations

import json
import pickle
import re
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from codetr.errors import UserError
from codetr.files import atomic_write
from codetr.models.base import CLASS_COUNT_TENSOR, MASK_BRANCH, REPEATED_MODULES, TRAINING_ONLY, class_dependent_tensors

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


def read_weights_file(path: str | Path) -> WeightsFile:
    """Read ``.safetensors`` inference weights or a ``.pt`` training checkpoint (UserError naming the
    file when it is neither)."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        raise UserError(f"{path} is an ONNX model: run it with --onnx (codetr predict) or Detector.from_onnx; weights "
                        "are a model.safetensors or a training checkpoint (last.pt)")
    if path.suffix == ".safetensors":
        state, metadata = read_safetensors(path)
        try:
            names = json.loads(metadata["class_names"]) if "class_names" in metadata else None
            ids = json.loads(metadata["category_ids"]) if "category_ids" in metadata else None
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: unreadable class names or category ids in its metadata ({err})") from None
        return WeightsFile(state, names, ids, metadata.get("config"))
    ckpt = read_checkpoint(path)
    averages = ckpt.get("hooks", {}).get("EMAHook", {}).get("averages", {})
    return WeightsFile({**ckpt["model"], **averages}, ckpt["class_names"], ckpt["category_ids"],
                       yaml.safe_dump(ckpt["config"], sort_keys=False))


def _shape(t: Tensor) -> str:
    return "x".join(map(str, t.shape)) or "scalar"


def _listed(keys: list[str]) -> str:
    more = f" (+{len(keys) - SHOWN} more)" if len(keys) > SHOWN else ""
    return ", ".join(keys[:SHOWN]) + more


def _config_value(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part, None)
    return cfg


def likely_causes(state: dict[str, Tensor], own: dict[str, Tensor], cfg: Any = None,
                  classes: Collection[str] = ()) -> list[str]:
    """Config differences that explain why ``state`` does not fit a model with tensors ``own``
    (``cfg``: its ModelConfig, to name the keys; ``classes``: its class-dependent tensors): another class count, another repeat count of a
    module (decoder layers, ...), another size (d_model, ...), or no common names at all."""
    causes = []
    if not set(state) & set(own):
        return [f"none of the file's {len(state)} tensor names is one of this model: weights of another "
                "implementation or architecture (`codetr convert` converts official mmdet and Hugging Face weights)"]
    if CLASS_COUNT_TENSOR in state and CLASS_COUNT_TENSOR in own and state[CLASS_COUNT_TENSOR].shape != own[CLASS_COUNT_TENSOR].shape:
        causes.append(f"another number of classes: {state[CLASS_COUNT_TENSOR].shape[0]} in the file, model.num_classes "
                      f"{own[CLASS_COUNT_TENSOR].shape[0]} in the config (to fine-tune on other classes: --init / train.init)")
    for prefix, key in REPEATED_MODULES.items():
        pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
        count = [len({m.group(1) for k in keys if (m := pattern.match(k))}) for keys in (state, own)]
        if count[0] != count[1] and count[0] and count[1]:
            causes.append(f"another number of {prefix}: {count[0]} in the file, {count[1]} in the model ({key})")
    pairs: Counter[tuple[int, int]] = Counter()
    for k in state.keys() & own.keys():
        if k in classes or state[k].shape == own[k].shape or state[k].dim() != own[k].dim():
            continue
        pairs.update({(a, b) for a, b in zip(state[k].shape, own[k].shape) if a != b})
    for (in_file, in_model), n in pairs.most_common(2):
        keys = [f"model.{s}" for s in SIZES if cfg is not None and _config_value(cfg, s) == in_model]
        named = f" ({' or '.join(keys)} = {in_model} in the config)" if keys else ""
        causes.append(f"a size of {in_file} in the file where the model has {in_model}, in {n} tensor(s){named}")
    return causes


def load_state(model: nn.Module, state: dict[str, Tensor], source: str, cfg: Any = None,
                 reinit_classes: bool = False) -> list[str]:
    """Load ``state`` (full or inference-only) into ``model``; returns report lines.

    Every tensor the model needs at inference (``inference_state_dict``) must be in ``state`` with
    its shape; training-only parts missing from ``state`` keep the model's initialisation and
    those of ``state`` the model lacks (a plain detector) are skipped. ``reinit_classes``
    (fine-tuning): the model's class-dependent tensors (:func:`codetr.models.base.class_dependent_tensors`)
    of another shape keep their fresh initialisation. Anything else that differs is a UserError naming ``source``, with counts, the
    first names and the likely cause (:func:`likely_causes`; ``cfg`` the model's ModelConfig).
    """
    own = model.state_dict()
    classes = class_dependent_tensors(model)
    needed = set(model.inference_state_dict()) if hasattr(model, "inference_state_dict") else set(own)
    other_shape = [k for k in state if k in own and state[k].shape != own[k].shape]
    reinit = [k for k in other_shape if reinit_classes and k in classes]
    # the tensors telling most first: those of other shapes that do not depend on the number of classes
    wrong = [f"{k} (file {_shape(state[k])}, model {_shape(own[k])})"
             for k in sorted(other_shape, key=lambda k: k in classes) if k not in reinit]
    unknown = [k for k in state if k not in own and not k.startswith((*TRAINING_ONLY, MASK_BRANCH))]
    missing = [k for k in own if k not in state and k in needed]
    # fine-tuning box-only weights into a model with a mask branch: the branch starts afresh
    fresh_masks = [k for k in missing if reinit_classes and k.startswith(MASK_BRANCH)
                   and not any(s.startswith(MASK_BRANCH) for s in state)]
    missing = [k for k in missing if k not in fresh_masks]
    if wrong or unknown or missing:
        lines = [f"{source} does not fit the model built from the config ({len(wrong)} tensors of other shapes, "
                 f"{len(missing)} missing, {len(unknown)} not in the model):"]
        lines += [f"  {what}: {_listed(keys)}" for what, keys in
                  (("other shapes", wrong), ("missing", missing), ("not in the model", unknown)) if keys]
        lines += [f"  likely cause: {cause}" for cause in likely_causes(state, own, cfg, classes)]
        raise UserError("\n".join(lines))
    loaded = {k: v for k, v in state.items() if k in own and k not in reinit}
    model.load_state_dict(loaded, strict=False)
    lines = [f"{source}: loaded {len(loaded)} of the model's {len(own)} tensors"]
    if reinit:
        lines.append(f"re-initialised (the number of classes differs): {', '.join(sorted(reinit))}")
    if fresh_masks:
        lines.append(f"the mask branch starts afresh: {source} has no mask weights ({len(fresh_masks)} tensors "
                     f"under {MASK_BRANCH.rstrip('.')} keep their initialisation)")
    fresh = sorted(k for k in own if k not in state)
    if fresh:
        lines.append(f"not in the file, freshly initialised: {len(fresh)} tensors under "
                     f"{', '.join(sorted({k.split('.')[0] for k in fresh}))}")
    skipped = sorted(k for k in state if k not in own)
    if skipped:
        lines.append(f"skipped (training-only parts or a mask branch this model does not have): {len(skipped)} tensors")
    return lines


CHECKPOINT_VERSION = 1
CHECKPOINT_FORMAT = "codetr-checkpoint"
# What a checkpoint must hold besides its format and version (Trainer.state_dict and the run's labels).
CHECKPOINT_KEYS = ("model", "optimizer", "epoch", "iter_in_epoch", "iteration", "rng", "config", "class_names",
                   "category_ids")


def _existing_file(path: Path, what: str) -> None:
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder, not a file")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} not found")


def torch_load_failure(err: Exception) -> str:
    """The informative line of a ``torch.load`` error, whole (torch's messages run over many lines
    of advice; the line that says what failed is kept)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    detail = next((line for line in lines if "WeightsUnpickler error" in line or line.startswith("Unsupported")), None)
    if detail and detail.endswith("error:"):
        detail = lines[lines.index(detail) + 1] if lines.index(detail) + 1 < len(lines) else detail
    return detail or (lines[0].split(". ")[0] if lines else type(err).__name__)


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a training checkpoint written by the trainer (``weights_only=True``); a UserError naming
    the file when it is not one (another pickle, a plain state dict, a truncated or corrupt file)."""
    path = Path(path)
    _existing_file(path, "checkpoint")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as err:
        raise UserError(f"{path} is not a codetr training checkpoint: torch.load cannot read it, it is truncated, "
                        f"corrupted or not a PyTorch file ({torch_load_failure(err)})") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        hint = (": it looks like an mmdet checkpoint; convert it with `codetr convert mmdet`"
                if isinstance(ckpt, dict) and "state_dict" in ckpt else "")
        raise UserError(f"{path} is not a codetr training checkpoint (no 'format': '{CHECKPOINT_FORMAT}'){hint}")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise UserError(f"{path}: checkpoint version {ckpt.get('version')} is not supported "
                        f"(expected {CHECKPOINT_VERSION})")
    missing = [key for key in CHECKPOINT_KEYS if key not in ckpt]
    if missing:
        raise UserError(f"{path}: incomplete codetr checkpoint, no {', '.join(missing)}")
    return ckpt


def save_inference_weights(
    path: str | Path,
    state_dict: dict[str, Tensor],
    class_names: list[str],
    category_ids: list[int],
    config: dict[str, Any],
) -> None:
    """Write ``state_dict`` as safetensors (atomically) with class names, category ids and config."""
    metadata = {
        "format": "codetr",
        "class_names": json.dumps(class_names),
        "category_ids": json.dumps(category_ids),
        "config": yaml.safe_dump(config, sort_keys=False),
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    data = safetensors_bytes(tensors, metadata=metadata)
    atomic_write(path, lambda f: f.write(data))


def read_safetensors(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file."""
    path = Path(path)
    _existing_file(path, "weights file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except SafetensorError as err:
        raise UserError(f"{path} is not a safetensors weights file ({err})") from err
    return tensors, metadata

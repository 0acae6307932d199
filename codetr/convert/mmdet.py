"""Convert the official Co-DETR checkpoints (mmdet) to codetr safetensors.

    codetr convert mmdet CHECKPOINT --config NAME --out W.safetensors [--keep-aux] [--classes FILE]

(:func:`convert_mmdet_file`; the command's arguments: :mod:`codetr.cli.convert`.)

Sources: Co-Deformable-DETR and Co-DINO as released by Sense-X/Co-DETR (mmdet 2.x names), and
Co-DINO of the mmdetection 3.x port (``projects/CO-DETR``: the same names but the denoising label
embedding under ``query_head.dn_generator``), with a ResNet backbone (mmdet's ResNet names are
torchvision's) or a Swin backbone in the release's ``SwinTransformerV1`` names or mmdet's
``SwinTransformer`` names. The parameter names are translated by the rule tables of
:mod:`codetr.convert.mmdet_rules`, one table per part (``BACKBONE_TABLES``, ``DETECTOR_TABLES``);
:mod:`codetr.convert.mmdet_checkpoint` reads the checkpoint files.

Strict: every source tensor is used (or is a buffer codetr recomputes, checked and dropped, or a
training-only tensor dropped without ``--keep-aux``), every target tensor is filled, every shape
is checked; anything else is an error listing what does not match. The number of classes is read
from the weights. The output holds the class names, their dataset category ids and the config in
its metadata, so ``codetr eval CONFIG --weights OUT`` and ``codetr predict`` use it directly.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from codetr.config import Config, ModelConfig
from codetr.convert.mmdet_checkpoint import CheckpointError, load_mmdet_checkpoint
from codetr.convert.mmdet_rules import (
    BACKBONE_TABLES,
    DETECTOR_TABLES,
    FAMILIES,
    NECK_TABLES,
    TRAINING_STATE,
    Layout,
    Rule,
    detect_backbone,
    detect_detector,
)

# ---------------------------------------------------------------------------------- conversion


@dataclass
class Conversion:
    """The converted tensors and what happened to every source tensor."""

    state_dict: dict[str, Tensor] = field(default_factory=dict)
    sources: dict[str, list[str]] = field(default_factory=dict)  # target -> source names
    dropped_aux: list[str] = field(default_factory=list)
    derived: list[str] = field(default_factory=list)
    dropped: dict[str, list[str]] = field(default_factory=dict)  # reason -> source names (part "dropped")
    unused: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # shape mismatches and failed checks

    @property
    def ok(self) -> bool:
        return not (self.unused or self.missing or self.unexpected or self.problems)

    def report(self) -> str:
        lines = [f"converted {len(self.state_dict)} tensors",
                 f"checked and dropped {len(self.derived)} buffers codetr recomputes (num_batches_tracked, "
                 "relative_position_index, RoPE tables)"]
        lines += [f"dropped {len(names)} {reason}" for reason, names in self.dropped.items()]
        if self.dropped_aux:
            lines.append(f"dropped {len(self.dropped_aux)} auxiliary-head / positive-query tensors (--keep-aux keeps them)")
        for title, keys in (("source tensors no rule uses", self.unused),
                            ("model tensors the checkpoint does not fill", self.missing),
                            ("converted tensors the model does not have", self.unexpected)):
            if keys:
                lines.append(f"{title} ({len(keys)}):")
                lines += [f"  {line}" for line in summarise(keys)]
        if self.problems:
            lines.append(f"mismatches ({len(self.problems)}):")
            lines += [f"  {p}" for p in self.problems[:20]] + (["  ..."] if len(self.problems) > 20 else [])
        return "\n".join(lines)


def summarise(keys: list[str], limit: int = 20) -> list[str]:
    """Names grouped by their pattern with numbers as ``*``: ``pattern (count), e.g. first``."""
    groups: dict[str, list[str]] = {}
    for key in sorted(keys):
        groups.setdefault(re.sub(r"\.\d+(?=\.|$)", ".*", key), []).append(key)
    lines = [f"{pattern} ({len(members)}), e.g. {members[0]}" if len(members) > 1 else members[0]
             for pattern, members in groups.items()]
    return lines[:limit] + ([f"... {len(lines) - limit} more patterns"] if len(lines) > limit else [])


def convert_state_dict(source: dict[str, Tensor], rules: list[Rule], layout: Layout,
                       expected: dict[str, tuple[int, ...]], keep_aux: bool) -> Conversion:
    """Apply ``rules`` (first match wins) to every source tensor and check the result against
    ``expected`` (target name -> shape). Source tensors may be on the meta device (names and shapes only)."""
    out = Conversion()
    compiled = [(re.compile(rule.pattern), rule) for rule in rules]
    stacks: dict[str, dict[int, Tensor]] = {}
    for name, tensor in source.items():
        match, rule = next(((m, r) for p, r in compiled if (m := p.match(name))), (None, None))
        if rule is None:
            out.unused.append(name)
            continue
        if rule.part == "derived":
            problem = rule.check(tensor) if rule.check else None
            if problem:
                out.problems.append(f"{name}: {problem}")
            out.derived.append(name)
            continue
        if rule.part == "dropped":
            out.dropped.setdefault(rule.reason, []).append(name)
            continue
        if rule.part == "aux" and not keep_aux:
            out.dropped_aux.append(name)
            continue
        target = match.expand(rule.target) if isinstance(rule.target, str) else rule.target(match, layout)
        if rule.stack:
            stacks.setdefault(target, {})[int(match.group("idx"))] = tensor
            out.sources.setdefault(target, []).append(name)
            continue
        if target in out.state_dict:
            out.problems.append(f"{target} is filled by both {out.sources[target][0]} and {name}")
            continue
        if target in expected and rule.transform is not None:
            tensor = rule.transform(tensor, expected[target], layout)
        out.state_dict[target] = tensor
        out.sources[target] = [name]
    for target, parts in stacks.items():
        if sorted(parts) != list(range(len(parts))) or any(p.dim() != 0 for p in parts.values()):
            out.problems.append(f"{target}: expected 0-d entries 0..{len(parts) - 1}, got {out.sources[target]}")
            continue
        out.state_dict[target] = torch.stack([parts[i] for i in range(len(parts))])
    for target, tensor in out.state_dict.items():
        if target in expected and tuple(tensor.shape) != tuple(expected[target]):
            out.problems.append(f"{target}: shape {tuple(tensor.shape)} from {', '.join(out.sources[target])}, "
                                f"the model has {tuple(expected[target])}")
    out.missing = sorted(set(expected) - set(out.state_dict))
    out.unexpected = sorted(set(out.state_dict) - set(expected))
    return out


def checkpoint_heads(state: dict[str, Tensor]) -> tuple[tuple[str, int], ...]:
    """The checkpoint's auxiliary heads in the released positive-query order (RoI heads, then ATSS)."""
    roi = sorted({int(m.group(1)) for k in state if (m := re.match(r"^roi_head\.(\d+)\.", k))})
    atss = sorted({int(m.group(1)) for k in state if (m := re.match(r"^bbox_head\.(\d+)\.", k))})
    return tuple([("rcnn", k) for k in roi] + [("atss", k) for k in atss])


def classes_in_weights(state: dict[str, Tensor]) -> int:
    """Number of classes of a Co-Deformable-DETR checkpoint (sigmoid classifier, no background)."""
    return int(state["query_head.cls_branches.0.weight"].shape[0])


def model_config_for(cfg: ModelConfig, state: dict[str, Tensor]) -> ModelConfig:
    """``cfg`` with the number of classes of the weights; errors when the checkpoint's backbone kind or
    number of queries does not match the config."""
    import dataclasses

    from codetr.models.backbones.resnet import RESNETS
    from codetr.models.backbones.swin import SWINS
    from codetr.models.backbones.vit import VITS

    family = detect_detector(state)
    arch, query_key = FAMILIES[family]
    if cfg.arch != arch:
        raise CheckpointError(f"the checkpoint is a {family} but the config builds model.arch={cfg.arch}")
    backbone = detect_backbone(state).split("_")[0]  # resnet, swin or vit
    kinds = {"resnet": ("ResNet", RESNETS), "swin": ("Swin", SWINS), "vit": ("ViT", VITS)}
    label, names = kinds[backbone]
    if cfg.backbone.name not in names:
        raise CheckpointError(f"the checkpoint has a {label} backbone but the config builds {cfg.backbone.name}")
    queries = state[query_key].shape[0]
    if queries != cfg.transformer.num_queries:
        raise CheckpointError(f"the checkpoint has {queries} queries ({query_key}) but the config "
                              f"has model.transformer.num_queries={cfg.transformer.num_queries}: choose the config of the "
                              "checkpoint's model-zoo row")
    return dataclasses.replace(cfg, num_classes=classes_in_weights(state),
                               backbone=dataclasses.replace(cfg.backbone, weights=None))


def convert_checkpoint(state: dict[str, Tensor], cfg: ModelConfig, keep_aux: bool = False,
                       expected: dict[str, tuple[int, ...]] | None = None) -> Conversion:
    """Convert an official state_dict for the model of ``cfg`` (with the weights' class count, see
    :func:`model_config_for`). ``expected`` (target name -> shape) defaults to the model's
    inference tensors, or all its tensors with ``keep_aux``."""
    backbone = detect_backbone(state)
    rules = TRAINING_STATE + BACKBONE_TABLES[backbone] + NECK_TABLES[cfg.neck] + DETECTOR_TABLES[detect_detector(state)]
    problems = _check_ema_entries(state)
    derived: list[str] = []
    renamed: dict[str, str] = {}
    if backbone == "vit":
        state, derived, renamed = _rename_vit(state, cfg)
    if expected is None:
        from codetr.models.build import build_model

        model = build_model(cfg)
        tensors = model.state_dict() if keep_aux else model.inference_state_dict()
        expected = {k: tuple(v.shape) for k, v in tensors.items()}
    layout = Layout(len(cfg.backbone.out_indices), tuple(cfg.co.aux_heads), checkpoint_heads(state))
    if keep_aux:
        for kind, k in layout.checkpoint_heads:
            layout.aux_index(kind, k)  # every auxiliary head of the checkpoint has a place in the config
    conversion = convert_state_dict(state, rules, layout, expected, keep_aux)
    conversion.derived += derived
    conversion.problems += problems
    conversion.sources = {target: [renamed.get(name, name) for name in names] for target, names in conversion.sources.items()}
    return conversion


def _rename_vit(state: dict[str, Tensor], cfg: ModelConfig) -> tuple[dict[str, Tensor], list[str], dict[str, str]]:
    """``state`` with its ``backbone.*`` tensors renamed by ``convert_vit_state_dict`` (the window
    settings of ``cfg.backbone`` checked against the RoPE tables), the dropped RoPE table names, and
    new name -> released name."""
    from codetr.models.backbones.vit import convert_vit_state_dict, interleaved_window_blocks

    released = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    depth = len({k.split(".")[1] for k in released if k.startswith("blocks.")})
    try:
        renamed = convert_vit_state_dict(released, cfg.backbone.window_size,
                                         interleaved_window_blocks(depth, cfg.backbone.global_every))
    except ValueError as err:
        raise CheckpointError(f"{err} (model.backbone.window_size={cfg.backbone.window_size}, "
                              f"global_every={cfg.backbone.global_every})") from err
    origin = {id(v): k for k, v in released.items()}  # renaming keeps the tensor objects
    kept = {id(v) for v in renamed.values()}
    derived = [f"backbone.{k}" for k, v in released.items() if id(v) not in kept]  # the RoPE tables
    rest = {k: v for k, v in state.items() if not k.startswith("backbone.")}
    return ({**{f"backbone.{k}": v for k, v in renamed.items()}, **rest}, derived,
            {f"backbone.{k}": f"backbone.{origin[id(v)]}" for k, v in renamed.items()})


def _check_ema_entries(state: dict[str, Tensor]) -> list[str]:
    """Every ``ema_*`` entry must shadow a tensor of the checkpoint (same name with dots as underscores,
    same shape): otherwise the file is not what the EMA hook saves."""
    shapes = {"ema_" + k.replace(".", "_"): tuple(v.shape) for k, v in state.items() if not k.startswith("ema_")}
    return [f"{k}: an ema_* entry {'of shape ' + str(tuple(v.shape)) + ' ' if k in shapes else ''}without a matching "
            "model tensor" for k, v in state.items() if k.startswith("ema_") and shapes.get(k) != tuple(v.shape)]


# ------------------------------------------------------------------------------------- classes


def coco_classes() -> tuple[list[str], list[int]]:
    """COCO's 80 class names and their category ids (1..90 with gaps), from torchvision's metadata."""
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

    categories = FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]
    kept = [(i, name) for i, name in enumerate(categories) if name not in ("__background__", "N/A")]
    return [name for _, name in kept], [i for i, _ in kept]


def metadata_classes(meta: dict) -> list[str]:
    """The class names an mmdet checkpoint's metadata stores (mmdet 2.x ``CLASSES``, mmdet 3.x
    ``dataset_meta.classes``), [] when none."""
    dataset_meta = meta.get("dataset_meta")
    names = meta.get("CLASSES") or (dataset_meta.get("classes") if isinstance(dataset_meta, dict) else None)
    return [str(name) for name in names] if isinstance(names, (list, tuple)) else []


def read_classes(path: str | Path) -> tuple[list[str], list[int]]:
    """Class names and category ids from a COCO-format JSON (its ``categories``, sorted by id, as
    codetr's dataset orders labels) or a text file with one name per line (ids 1..C)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"classes file {path} not found")
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        categories = data.get("categories") if isinstance(data, dict) else data
        if not isinstance(categories, list) or not all(isinstance(c, dict) and "id" in c and "name" in c for c in categories):
            raise ValueError(f"{path}: expected a COCO-format file with 'categories': [{{'id', 'name'}}, ...]")
        categories = sorted(categories, key=lambda c: c["id"])
        return [str(c["name"]) for c in categories], [int(c["id"]) for c in categories]
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return names, list(range(1, len(names) + 1))


# ------------------------------------------------------------------------------------ the file


def convert_mmdet_file(checkpoint: Path, config: str | Path, out: Path, keep_aux: bool = False,
                       classes: Path | None = None, overrides: Sequence[str] = ()) -> Conversion:
    """Convert the official ``checkpoint`` for the codetr ``config`` (+ dotted ``overrides``) into the
    safetensors file ``out`` (``codetr convert mmdet``); ``keep_aux`` keeps the auxiliary heads and
    positive-query layers; ``classes``: a COCO-format JSON or a text file of class names (default
    COCO's for an 80-class checkpoint, else the names in its metadata with ids 1..C). Prints the report;
    a CheckpointError when it does not fit."""
    from codetr.config_parsing import config_to_dict, load_config
    from codetr.inference.weights import load_state, save_inference_weights
    from codetr.models.build import build_model

    cfg: Config = load_config(config, list(overrides))
    loaded = load_mmdet_checkpoint(checkpoint)
    state, meta = loaded.state_dict, loaded.meta
    if loaded.numpy_globals:
        print(f"{checkpoint.name}: its metadata holds numpy values ({', '.join(loaded.numpy_globals)}), loaded as "
              "plain numbers")
    cfg.model = model_config_for(cfg.model, state)
    num_classes = cfg.model.num_classes
    if classes is not None:
        names, ids = read_classes(classes)
    elif num_classes == 80:
        names, ids = coco_classes()
    elif len(stored := metadata_classes(meta)) == num_classes:  # e.g. LVIS v1, whose ids are 1..1203 in this order
        names, ids = stored, list(range(1, num_classes + 1))
        print(f"{checkpoint.name}: class names from its metadata, category ids 1..{num_classes}")
    else:
        hint = f" (its metadata names {list(meta['CLASSES'])[:5]}...)" if meta.get("CLASSES") else ""
        raise CheckpointError(f"{checkpoint} has {num_classes} classes{hint}: pass --classes FILE with their names")
    if len(names) != num_classes:
        raise CheckpointError(f"{classes or 'COCO'} names {len(names)} classes but the checkpoint has {num_classes}")

    model = build_model(cfg.model)
    tensors = model.state_dict() if keep_aux else model.inference_state_dict()
    conversion = convert_checkpoint(state, cfg.model, keep_aux, {k: tuple(v.shape) for k, v in tensors.items()})
    if not conversion.ok:
        raise CheckpointError(f"{checkpoint} does not fit config {config}:\n{conversion.report()}")
    load_state(model, conversion.state_dict, str(checkpoint))
    save_inference_weights(out, conversion.state_dict, names, ids, config_to_dict(cfg))
    print(conversion.report())
    print(f"wrote {out}: {num_classes} classes, config {config}")
    return conversion

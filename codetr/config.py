"""Typed configuration: nested dataclasses, YAML in and out, dotted ``key=value`` overrides.

A YAML file may name another one with ``base: other.yaml`` (relative to itself, or the name
of a packaged config); its keys are merged over the base. Unknown keys, values of the wrong type
and values out of range (:data:`LIMITS`) are :class:`~codetr.errors.UserError` naming the key.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from codetr.errors import UserError

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class TTAConfig:
    """Test-time augmentation (``codetr eval --tta``, ``Detector.predict(..., tta=True)``), as
    mmdetection 3.x's generic ``DetTTAModel``: the image runs once per (scale, flip) view, every
    view's detections are mapped back to the original image and merged class-wise."""

    # Test scales: the shorter side for data.augment "detr" (data.max_size still caps the longer
    # side), the canvas side for "lsj". Empty: the config's own (data.test_scale / data.lsj_size).
    scales: list[int] = field(default_factory=list)
    flip: bool = True  # also run every scale horizontally flipped
    # "nms" (mmdet's default TTA merge), "soft_nms" (linear Soft-NMS, mmcv's defaults) or "wbf"
    # (weighted box fusion of the ensemble-boxes package: pip install ensemble-boxes).
    merge: str = "nms"
    iou: float = 0.5  # IoU threshold of the merge
    # Detections scoring below it are left out of every view before the merge (ensemble-boxes'
    # skip_box_thr). Weighted box fusion averages the scores of a cluster, so DETR's many
    # low-scoring near-duplicates dilute the score of a well-found object: raise it for "wbf".
    min_score: float = 0.0
    max_detections: int | None = None  # kept per image after the merge; None: model.max_detections


@dataclass
class DataConfig:
    """COCO-format data: image folders and instances JSON files."""

    train_images: str = "data/synth/train"
    train_annotations: str = "data/synth/annotations/instances_train.json"
    val_images: str = "data/synth/val"
    val_annotations: str = "data/synth/annotations/instances_val.json"
    # Built-in synthetic dataset: generated at the paths above when they are missing.
    synthetic: bool = False
    synthetic_train: int = 64
    synthetic_val: int = 16
    synthetic_size: int = 256
    synthetic_seed: int = 0
    # Augmentation: "detr" (the fields below) or "lsj" (large-scale jitter on a square canvas of side
    # lsj_size padded with 114, as the released Co-DINO LSJ configs; the canvas is the model's image).
    augment: str = "detr"
    lsj_size: int = 1024
    lsj_scale_range: list[float] = field(default_factory=lambda: [0.1, 2.0])
    # DETR augmentation: random flip; multi-scale resize of the shorter side (max_size caps the
    # longer side), or resize + random crop + multi-scale resize.
    train_scales: list[int] = field(default_factory=lambda: list(range(480, 801, 32)))
    max_size: int = 1333
    crop_resize_scales: list[int] = field(default_factory=lambda: [400, 500, 600])
    crop_max_size: int = 4200  # cap of the longer side in the crop branch's first resize (as released)
    crop_size: list[int] = field(default_factory=lambda: [384, 600])
    test_scale: int = 800
    # Resize arithmetic (DETR multi-scale and test resize, LSJ resize): "torchvision" (v2.Resize /
    # RandomShortestSize: sizes floored, antialiased bilinear; LSJ: mmcv's sizes, bilinear without
    # antialiasing) or "mmcv" (the released mmcv 1.x Resize and Normalize: sizes by mmcv.rescale_size,
    # uint8 pixels identical to cv2.resize INTER_LINEAR, normalisation in 0-255 as mmcv.imnormalize).
    resize: str = "torchvision"
    batch_size: int = 2  # training images per process and step
    # Training batches of landscape (width / height > 1) or of other images only, as mmdet's group
    # sampler; false: batches of any images.
    group_by_aspect_ratio: bool = True
    # Evaluation images per forward. 1, as released: in a padded batch an image's detections would
    # depend on the size of its batch partners (zero padding at the convolutions' borders).
    eval_batch_size: int = 1
    # Batches are padded to a multiple of this (the released ViT-L configs: 32, so the patch grid
    # covers the whole image; the ResNet / Swin ones: 1).
    pad_size_divisor: int = 1
    num_workers: int = 2
    # Box metrics: "coco"; "lvis" (APr / APc / APf, at most 300 detections per image, federated
    # rules: negative and not-exhaustive categories per image); "auto": "lvis" when every category
    # of the validation annotations has a "frequency" field, else "coco".
    eval_style: str = "auto"
    tta: TTAConfig = field(default_factory=TTAConfig)
    # A training set without any usable box (no annotations, all crowd) is an error unless this is
    # true (background-only training); a validation set always needs boxes.
    allow_empty: bool = False
    # Images with more pixels are refused (Pillow's decompression-bomb limit, 2 x
    # PIL.Image.MAX_IMAGE_PIXELS); raise it for trusted large images, null: no limit.
    max_image_pixels: int | None = 178956970


@dataclass
class BackboneConfig:
    # resnet18/34/50/101 (torchvision) or a timm Swin: swin_{tiny,small}_patch4_window7_224,
    # swin_{base,large}_patch4_window12_384 (as released; window7_224 variants of base/large too);
    # or vit_large: the EVA-02-style ViT-L of the released Co-DINO ViT-L (use with model.neck: sfp).
    name: str = "resnet50"
    # None: random init; "torchvision": torchvision's ImageNet V1 ResNet weights (= mmdet's
    # torchvision://resnet50 of the released configs); "torchvision_v2": its IMAGENET1K_V2 weights
    # (ResNet-50/101); "timm": timm's pretrained Swin weights; or a file path.
    weights: str | None = None
    # ResNet: -1 none, 0 the stem, k the stem and layer1..layerk. Swin: -1 none, 0 the patch
    # embedding, k also the first k stages (mmdet's convention; the released Swin configs use -1).
    frozen_stages: int = 1
    # ResNet only: "frozen_bn" for pretrained weights (their batch-norm statistics, fixed);
    # "group_norm" (32 groups, trained) for a backbone trained from scratch, which frozen
    # identity batch norm would leave without any normalisation.
    norm: str = "frozen_bn"
    # Stages returned (0 = stride 4 ... 3 = stride 32; ResNet layer1..layer4 / C2-C5):
    # Deformable-DETR uses 1-3, DINO 0-3.
    out_indices: list[int] = field(default_factory=lambda: [1, 2, 3])
    # Swin only: stochastic depth, rising linearly over the blocks to this rate (released: 0.2-0.6).
    drop_path_rate: float = 0.0
    # Activation checkpointing of every residual / Swin block (less memory, slower backward).
    with_cp: bool = False
    # Swin: architecture overrides for timm.create_model (embed_dim, depths, num_heads, ...);
    # ViT: overrides of the ViT constructor (embed_dim, depth, num_heads, pretrain_img_size) for a tiny model.
    timm_args: dict[str, Any] = field(default_factory=dict)
    # ViT only: window attention in window_size x window_size windows, every global_every-th block global
    # (released COCO 24 / 4, LVIS 16 / 3). drop_path_rate and with_cp (activation checkpointing) apply too.
    window_size: int = 24
    global_every: int = 4


@dataclass
class TransformerConfig:
    d_model: int = 256
    n_heads: int = 8
    n_points: int = 4
    num_feature_levels: int = 4
    enc_layers: int = 6
    dec_layers: int = 6
    ffn_dim: int = 2048
    dropout: float = 0.0
    num_queries: int = 300
    two_stage: bool = True
    box_refine: bool = True
    mixed_selection: bool = True
    look_forward_twice: bool = True
    # Sine position encoding of the feature maps: Deformable-DETR 10000 and -0.5, DINO 20 and 0.
    pos_temperature: float = 10000.0
    pos_offset: float = -0.5
    # Activation checkpointing of the first enc_with_cp encoder / dec_with_cp decoder layers (all when
    # more; less memory, slower backward, same numbers): the released encoder ``with_cp`` (Co-DINO R50
    # 4, Swin-L / ViT-L 6, 9-layer encoder 9); the release checkpoints no decoder layer.
    enc_with_cp: int = 0
    dec_with_cp: int = 0


@dataclass
class LossConfig:
    """DETR set-prediction loss; the Hungarian matcher uses the same weights as costs (the
    classification cost is ``cls_cost`` when set)."""

    cls_weight: float = 2.0
    l1_weight: float = 5.0
    giou_weight: float = 2.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    # "focal" (Deformable-DETR) or "quality_focal" (DINO / Co-DINO: the target of a positive is
    # the IoU of its predicted box with the ground truth, beta below).
    cls_loss: str = "focal"
    qfl_beta: float = 2.0
    cls_cost: float | None = None  # matcher classification cost; None: cls_weight


@dataclass
class DinoConfig:
    """DINO's contrastive denoising and inference (used when ``model.arch`` is "dino")."""

    num_dn_queries: int = 100  # denoising queries per batch, split into dynamic groups
    label_noise: float = 0.5
    box_noise: float = 1.0
    # Inference as released: top ``num_queries`` (query, class) pairs, class-wise Soft-NMS,
    # keep ``max_detections``. Off: top ``max_detections`` without NMS.
    soft_nms: bool = True
    soft_nms_iou: float = 0.8


@dataclass
class CoConfig:
    """Collaborative hybrid assignment training (training only)."""

    # Auxiliary one-to-many heads, in order; any of "rcnn", "atss", repeats allowed (each its own
    # weights and positive-query layers, as the paper's 2x / 6x ATSS ablations). Empty: plain DETR.
    aux_heads: list[str] = field(default_factory=list)
    positive_queries: bool = True
    lambda1: float = 1.0  # weight of the positive-query decoder losses
    lambda2: float = 2.0  # weight of the auxiliary-head losses (times the decoder layers)
    max_pos_queries: int = 300
    min_pos_queries: int = 9
    zero_padding: bool = False  # pad groups with masked zero boxes instead of random negatives
    eval_head: str = "detr"  # detr | atss | rcnn
    # Sizes of the auxiliary heads (official values; the tiny configs scale them down).
    atss_stacked_convs: int = 1
    rpn_pre_nms: int = 4000  # proposals kept per level before NMS, in training
    rpn_proposals: int = 1000  # proposals per image after NMS
    roi_samples: int = 512  # sampled RoIs per image
    roi_fc_dim: int = 1024
    # RoI box head (mmdet ConvFCBBoxHead): roi_convs shared 3x3 convs (GroupNorm(32), ReLU) then roi_fcs
    # shared FCs; released Shared2FCBBoxHead 0 / 2, class-specific deltas with stds 0.1, 0.1, 0.2, 0.2;
    # Co-DINO ViT-L (COCO) 4 / 1, class-agnostic, stds 0.05, 0.05, 0.1, 0.1.
    roi_convs: int = 0
    roi_fcs: int = 2
    roi_class_agnostic: bool = False
    roi_target_stds: list[float] = field(default_factory=lambda: [0.1, 0.1, 0.2, 0.2])
    # RoI level of a box: floor(log2(sqrt(area) / roi_finest_scale)) over the encoder levels;
    # official 112 with strides 8-64 (Co-Deformable-DETR), 56 with strides 4-64 (Co-DINO).
    roi_finest_scale: float = 112.0


@dataclass
class ModelConfig:
    arch: str = "deformable_detr"  # deformable_detr | dino
    num_classes: int = 80
    max_detections: int = 100
    # Bias in the channel mapper's convolutions: none as released; transformers' Deformable-DETR
    # input projections have one (set by its converter).
    neck_bias: bool = False
    # "channel_mapper" (1x1 conv + GN per backbone map, extra stride-2 levels; ResNet / Swin) or "sfp"
    # (simple feature pyramid p2-p6 at strides 4-64 from a ViT's single stride-16 map; 5 feature levels).
    neck: str = "channel_mapper"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    co: CoConfig = field(default_factory=CoConfig)
    dino: DinoConfig = field(default_factory=DinoConfig)


@dataclass
class LayerDecayConfig:
    """Layer-wise learning-rate decay of a ViT backbone, as the released LayerDecayOptimizerConstructor
    (ViT-L: rate 0.8 over 24 layers): block i trains at lr * rate ** (num_layers - i), the patch and
    position embeddings at lr * rate ** (num_layers + 1), the rest of the detector at lr; no weight
    decay for 1-d parameters and biases. Replaces ``lr_mult`` when on."""

    rate: float | None = None  # None: off
    num_layers: int = 24  # the number of ViT blocks


@dataclass
class TrainConfig:
    epochs: int = 12
    lr: float = 2e-4
    weight_decay: float = 1e-4
    # Learning-rate multipliers by parameter-name substring (first match wins).
    lr_mult: dict[str, float] = field(
        default_factory=lambda: {"backbone": 0.1, "sampling_offsets": 0.1, "reference_points": 0.1}
    )
    grad_clip: float | None = 0.1  # max L2 norm of the gradients; 0 or null: off
    lr_steps: list[int] = field(default_factory=lambda: [11])  # epochs where lr is x0.1
    max_iters: int | None = None  # stop after this many iterations in all (tiny runs)
    eval_every: int = 1  # epochs
    seed: int = 42
    device: str = "auto"
    log_every: int = 10
    # Start from these weights (.safetensors, e.g. converted official weights, or a codetr
    # checkpoint): every tensor loads except the class-dependent layers when the number of
    # classes differs (those keep their fresh initialisation). The backbone's ImageNet weights
    # are then not loaded.
    init: str | None = None
    # Linear warm-up, as mmcv's warmup="linear" (released ViT-L config: 500 iterations, ratio 0.01):
    # before iteration i < warmup_iters (0-based) the learning rate is multiplied by
    # 1 - (1 - i / warmup_iters) * (1 - warmup_ratio). 0: off.
    warmup_iters: int = 0
    warmup_ratio: float = 0.1
    layer_decay: LayerDecayConfig = field(default_factory=LayerDecayConfig)
    # Exponential moving average of the weights, as mmdet's ExpMomentumEMAHook (released ViT-L COCO
    # config: momentum 1e-4, total_iter 2000, interval 1): after step i (0-based), every ema_interval
    # steps, average = (1 - m) * average + m * weights, m = (1 - ema_momentum) * exp(-(1 + i) /
    # ema_total_iter) + ema_momentum. When on, evaluation and model.safetensors use the average.
    ema: bool = False
    ema_momentum: float = 1e-4
    ema_total_iter: int = 2000
    ema_interval: int = 1
    # Mixed precision: "bf16" (CPU or GPU), "fp16" (GPU; with gradient scaling) or null (float32).
    # torch.autocast over the training forward; the deformable attention, the matching, the losses and
    # the auxiliary heads' training step stay in float32 (codetr/engine/amp.py). Evaluation runs in float32.
    amp: str | None = None
    # Gradient accumulation: an iteration (optimizer step) runs `accumulate` micro-batches of
    # data.batch_size images per process; epochs, lr_steps, warmup_iters, max_iters, log_every and
    # the EMA count iterations, as with a batch `accumulate` times larger.
    accumulate: int = 1
    # TensorBoard event files in <out>/tensorboard (needs the tensorboard package): loss terms,
    # learning rate and images/s every log_every iterations; after each evaluation the COCO metrics
    # and the first tensorboard_images validation images with their detections drawn.
    tensorboard: bool = False
    tensorboard_images: int = 4
    # Also write last.pt every checkpoint_every iterations (besides every epoch end); 0: epoch ends only.
    # A resume from such a mid-epoch checkpoint continues exactly as the uninterrupted run.
    checkpoint_every: int = 0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def resolve_config_path(name: str | Path) -> Path:
    """A config file path, or the name of a packaged config (with or without ``.yaml``)."""
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / path.name, CONFIG_DIR / f"{path.name}.yaml"):
        if candidate.is_file():
            return candidate
    known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise FileNotFoundError(f"config {str(name)!r} not found; packaged configs: {known}")


# Smallest allowed value of numeric fields (lists: of each element; None stays allowed where the type
# allows it). Checked when a config is read and when training starts.
LIMITS: dict[str, float] = {
    "train.epochs": 1, "train.max_iters": 1, "train.eval_every": 0, "train.log_every": 1, "train.warmup_iters": 0,
    "train.accumulate": 1, "train.ema_total_iter": 1, "train.ema_interval": 1, "train.tensorboard_images": 0,
    "train.checkpoint_every": 0, "train.weight_decay": 0, "train.grad_clip": 0, "train.lr_steps": 0,
    "train.lr_mult": 0,
    "data.batch_size": 1, "data.eval_batch_size": 1, "data.num_workers": 0, "data.pad_size_divisor": 1,
    "data.train_scales": 1, "data.max_size": 1, "data.crop_resize_scales": 1, "data.crop_max_size": 1,
    "data.crop_size": 1, "data.test_scale": 1, "data.lsj_size": 1, "data.synthetic_train": 1,
    "data.synthetic_val": 1, "data.synthetic_size": 1,
    "model.num_classes": 1, "model.max_detections": 1, "model.transformer.d_model": 1, "model.transformer.n_heads": 1,
    "model.transformer.n_points": 1, "model.transformer.num_feature_levels": 1, "model.transformer.dec_layers": 1,
    "model.transformer.enc_layers": 0, "model.transformer.ffn_dim": 1, "model.transformer.num_queries": 1,
}
# Fields that must be strictly positive.
POSITIVE = ("train.lr", "train.ema_momentum", "train.warmup_ratio")


class ConfigError(UserError):
    """A config file or override that cannot be read: unknown key, wrong type, value out of range."""


def yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML parse error in one line: what is wrong and where (line and column, 1-based)."""
    if isinstance(err, yaml.MarkedYAMLError) and err.problem_mark is not None:
        mark = err.problem_mark
        return f"{err.problem} at line {mark.line + 1}, column {mark.column + 1}"
    return str(err).splitlines()[0]


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({yaml_problem(err)})") from None
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config must be a mapping, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return raw
    base_path = path.parent / base
    merged = _read_yaml(base_path if base_path.is_file() else resolve_config_path(base))
    _deep_update(merged, raw)
    return merged


def _deep_update(dst: dict[str, Any], src: dict[str, Any]) -> None:
    for key, value in src.items():
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _deep_update(dst[key], value)
        else:
            dst[key] = value


def _type_name(hint: Any) -> str:
    """``int | None`` -> "an integer or null", ``list[int]`` -> "a list of integers"."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_type_name(a) for a in args)
    if origin is list:
        return f"a list of {_type_name(args[0]).split(' ', 1)[1]}s" if args and args[0] is not Any else "a list"
    if origin is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            type(None): "null", Any: "any value"}.get(hint, getattr(hint, "__name__", str(hint)))


def _checked(value: Any, hint: Any, key: str) -> Any:
    """``value`` of config field ``key`` converted to ``hint`` (an int or a numeric string to a float,
    a tuple to a list); a ConfigError naming the key, the value and the expected type otherwise."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (types.UnionType, typing.Union):
        for option in sorted(args, key=lambda a: a is not type(None)):  # null first: it never converts
            try:
                return _checked(value, option, key)
            except ConfigError:
                pass
    elif hint is type(None):
        if value is None:
            return None
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:  # YAML reads 1e-4 (no dot) as a string
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin is list:
        if isinstance(value, (list, tuple)):
            return [_checked(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else list(value)
    elif origin is dict:
        if isinstance(value, dict):
            return {k: _checked(v, args[1], f"{key}.{k}") for k, v in value.items()} if args else value
    else:
        return value
    raise ConfigError(f"config key {key}: {value!r} is not {_type_name(hint)}")


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ConfigError(f"unknown config key(s) {sorted(unknown)} in {where or 'config'}; known: {sorted(names)}")
    kwargs = {}
    for key, value in values.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {where}{key} must be a mapping of {hint.__name__} fields, got {value!r}")
            value = _build(hint, value, f"{where}{key}.")
        else:
            value = _checked(value, hint, f"{where}{key}")
        kwargs[key] = value
    return cls(**kwargs)


def _numbers(value: Any) -> list[Any]:
    """The numbers of a field value: itself, a list's elements or a mapping's values."""
    if isinstance(value, dict):
        return list(value.values())
    return list(value) if isinstance(value, list) else [value]


def validate_config(cfg: Config) -> Config:
    """Check every field's type and the ranges of :data:`LIMITS` and :data:`POSITIVE`; returns ``cfg``.
    A ConfigError names the key, the value and what is expected."""
    values = _build(Config, config_to_dict(cfg), "")  # the types, on a copy
    for key, minimum in LIMITS.items():
        section, name = key.rsplit(".", 1)
        node = values
        for part in section.split("."):
            node = getattr(node, part)
        value = getattr(node, name)
        for number in _numbers(value):
            if number is not None and number < minimum:
                raise ConfigError(f"config key {key}: {value!r} is out of range (must be >= {minimum:g})")
    for key in POSITIVE:
        section, name = key.split(".")
        value = getattr(getattr(values, section), name)
        if not value > 0:
            raise ConfigError(f"config key {key}: {value!r} is out of range (must be > 0)")
    return cfg


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["train.lr=1e-4", "model.co.aux_heads=[atss]"]`` -> nested dict (values parsed as YAML)."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like dotted.key=value")
        key, text = item.split("=", 1)
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is set to a value and used as a section")
        try:
            node[parts[-1]] = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({yaml_problem(err)})") from None
    return nested


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None), apply overrides and check the
    result (:func:`validate_config`). Errors are ConfigError naming the file or key."""
    values = _read_yaml(resolve_config_path(path)) if path is not None else {}
    return config_from_dict(values, overrides, None if path is None else str(path))


def config_from_dict(values: dict[str, Any], overrides: list[str] | None = None, source: str | None = None) -> Config:
    """A checked Config from nested ``values`` (as :func:`config_to_dict` gives) and dotted overrides;
    ConfigError messages start with ``source`` (e.g. the file the values come from) when given."""
    values = copy.deepcopy(values)
    _deep_update(values, parse_overrides(overrides or []))
    try:
        return validate_config(_build(Config, values, ""))
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}" if source is not None else str(err)) from None


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))

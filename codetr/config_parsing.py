"""Configs in and out: YAML files, dotted ``key=value`` overrides, type and range checks.

A YAML file may name another one with ``base: other.yaml`` (relative to itself, or the name
of a packaged config); its keys are merged over the base. Unknown keys, values of the wrong type
and values out of range (:data:`LIMITS`) are :class:`~codetr.errors.UserError` naming the key.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from codetr.config import Config
from codetr.errors import UserError
from codetr.files import atomic_write_text

CONFIG_DIR = Path(__file__).parent / "configs"


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
    "train.lr_mult": 0, "train.skip_nonfinite": 0,
    "data.batch_size": 1, "data.eval_batch_size": 1, "data.num_workers": 0, "data.pad_size_divisor": 1,
    "data.train_scales": 1, "data.max_size": 1, "data.crop_resize_scales": 1, "data.crop_max_size": 1,
    "data.crop_size": 1, "data.test_scale": 1, "data.lsj_size": 1, "data.synthetic_train": 1,
    "data.synthetic_val": 1, "data.synthetic_size": 1,
    "model.num_classes": 1, "model.max_detections": 1, "model.transformer.d_model": 1, "model.transformer.n_heads": 1,
    "model.transformer.n_points": 1, "model.transformer.num_feature_levels": 1, "model.transformer.dec_layers": 1,
    "model.transformer.enc_layers": 0, "model.transformer.ffn_dim": 1, "model.transformer.num_queries": 1,
    "model.mask.instance_convs": 0, "model.mask.semantic_convs": 0, "model.mask.stage_sizes": 2,
    "model.mask.dilations": 1, "model.mask.finest_scale": 1e-6, "model.mask.train_rois": 1, "model.mask.roi_samples": 1,
    "model.mask.loss_weight": 0, "model.mask.stage_loss_weights": 0, "model.mask.boundary_width": 1,
    "model.mask.iou_loss_weight": 0, "model.mask.iou_convs": 1, "model.mask.iou_fcs": 1, "model.mask.iou_fc_dim": 1,
    "model.dino.soft_nms_candidates": 1,
}


# Fields that must be strictly positive.
POSITIVE = ("train.lr", "train.ema_momentum", "train.warmup_ratio")

# Thresholds, probabilities and rates: in [0, 1].
UNIT_INTERVAL = ("data.tta.iou", "data.tta.min_score", "model.loss.focal_alpha", "model.dino.soft_nms_iou",
                 "model.transformer.dropout", "model.backbone.drop_path_rate", "train.ema_momentum",
                 "train.warmup_ratio", "model.mask.threshold")


def check_unit_interval(value: float, name: str) -> float:
    """``value`` when it is a number in [0, 1]; a UserError naming ``name`` (the option or key) otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise UserError(f"{name}: {value!r} is out of range (must be a number in [0, 1])")
    return float(value)


class ConfigError(UserError):
    """A config file or override that cannot be read: unknown key, wrong type, value out of range."""


def yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML parse error in one line: what is wrong and where (line and column, 1-based)."""
    if isinstance(err, yaml.MarkedYAMLError) and err.problem_mark is not None:
        mark = err.problem_mark
        return f"{err.problem} at line {mark.line + 1}, column {mark.column + 1}"
    return str(err).splitlines()[0]


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The keys of the YAML file ``path`` merged over those of its ``base:`` chain (``seen``: the
    files that named it, a ConfigError when the chain comes back to one of them)."""
    if path.resolve() in seen:
        chain = " -> ".join(str(p) for p in (*seen, path.resolve()))
        raise ConfigError(f"{path}: the base: chain refers back to a file already in it ({chain})")
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
    merged = _read_yaml(base_path if base_path.is_file() else resolve_config_path(base), (*seen, path.resolve()))
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
        number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        if isinstance(value, str):
            try:  # YAML reads 1e-4 (no dot) as a string
                number = float(value)
            except ValueError:
                pass
        if number is not None and not math.isnan(number):
            return float(number)
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
    for key in UNIT_INTERVAL:
        node = values
        for part in key.split("."):
            node = getattr(node, part)
        try:
            check_unit_interval(node, f"config key {key}")
        except UserError as err:
            raise ConfigError(str(err)) from None
    _check_mask(values.model.mask)
    return cfg


def _check_mask(mask: Any) -> None:
    """The mask branch's stage lists: sizes doubling from an even first size, one loss weight per stage."""
    sizes = mask.stage_sizes
    if len(sizes) < 2 or sizes[0] % 2 or any(b != 2 * a for a, b in zip(sizes, sizes[1:])):
        raise ConfigError(f"config key model.mask.stage_sizes: {sizes!r} must be two or more sizes, each twice the "
                          "one before, the first even (released [14, 28, 56, 112])")
    if len(mask.stage_loss_weights) != len(sizes):
        raise ConfigError(f"config key model.mask.stage_loss_weights: {mask.stage_loss_weights!r} needs one weight per "
                          f"stage of model.mask.stage_sizes ({len(sizes)})")


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
    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def config_from_text(text: str, overrides: list[str] | None = None, source: str = "config") -> Config:
    """A Config from YAML text (as stored with weights), with dotted overrides; errors name ``source``."""
    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{source}: not valid YAML ({yaml_problem(err)})") from None
    if not isinstance(values, dict):
        raise UserError(f"{source}: a config must be a mapping, got {type(values).__name__}")
    return config_from_dict(values, overrides, source)

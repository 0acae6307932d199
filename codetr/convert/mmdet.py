"""Convert the official Co-DETR checkpoints (mmdet) to codetr safetensors.

    codetr convert mmdet CHECKPOINT --config NAME --out W.safetensors [--keep-aux] [--classes FILE]

Sources: Co-Deformable-DETR and Co-DINO as released by Sense-X/Co-DETR (mmdet 2.x names), and
Co-DINO of the mmdetection 3.x port (``projects/CO-DETR``: the same names but the denoising label
embedding under ``query_head.dn_generator``), with a ResNet backbone (mmdet's ResNet names are
torchvision's) or a Swin backbone in the release's ``SwinTransformerV1`` names or mmdet's
``SwinTransformer`` names. The parameter names are translated by the rule tables below, one table
per part (``BACKBONE_TABLES``, ``DETECTOR_TABLES``; the codetr names of auxiliary heads come from
:func:`aux_prefix`).

Strict: every source tensor is used (or is a buffer codetr recomputes, checked and dropped, or a
training-only tensor dropped without ``--keep-aux``), every target tensor is filled, every shape
is checked; anything else is an error listing what does not match. The number of classes is read
from the weights. The output holds the class names, their dataset category ids and the config in
its metadata, so ``codetr eval CONFIG --weights OUT`` and ``codetr predict`` use it directly.
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from codetr.config import Config, ModelConfig

# ------------------------------------------------------------------------- reading checkpoints


def _numpy_globals() -> list[tuple[Any, str]]:
    """Plain numpy number and array types, under the module paths numpy 1.x and 2.x pickle them with.

    mmcv checkpoints keep run metadata next to the weights (``meta``: epoch, config text, class
    names, and evaluation scores that may be numpy scalars). Unpickling these rebuilds a number or a
    numeric array from bytes and a dtype; none of them calls code named by the file, so they are
    allowed on top of ``weights_only``. Any other global is refused.
    """
    import importlib

    import numpy as np

    try:
        multiarray = importlib.import_module("numpy._core.multiarray")
    except ImportError:  # numpy < 2
        multiarray = importlib.import_module("numpy.core.multiarray")
    allowed: list[tuple[Any, str]] = []
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed += [(multiarray.scalar, f"{module}.scalar"), (multiarray._reconstruct, f"{module}._reconstruct")]
    allowed += [(np.dtype, "numpy.dtype"), (np.ndarray, "numpy.ndarray")]
    for name in dir(getattr(np, "dtypes", None)):
        dtype_class = getattr(np.dtypes, name)
        if isinstance(dtype_class, type) and issubclass(getattr(dtype_class, "type", type), (np.number, np.bool_)):
            allowed.append((dtype_class, f"numpy.dtypes.{name}"))
    return allowed


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says why."""


@dataclass
class OfficialCheckpoint:
    """state_dict: name -> tensor; meta: mmcv run metadata (may be empty); numpy_globals: the plain
    numpy types the file needed beyond ``weights_only`` (allowed, see :func:`_numpy_globals`)."""

    state_dict: dict[str, Tensor]
    meta: dict[str, Any]
    numpy_globals: list[str]


def load_mmdet_checkpoint(path: str | Path) -> OfficialCheckpoint:
    """An mmdet checkpoint ``{"state_dict": ..., "meta": ...}`` or a bare state_dict, loaded with
    ``torch.load(weights_only=True)`` (plus plain numpy types in ``meta``); anything that would need
    other Python objects is refused, naming them."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    numpy_globals: list[str] = []
    try:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            unsafe = _unsafe_globals(path, err)
            if not unsafe:
                raise CheckpointError(f"cannot read checkpoint {path}: it is truncated, corrupted or not a PyTorch "
                                      f"file ({_unpickler_error(err)})") from err
            refused = [name for name in unsafe if name not in {name for _, name in _numpy_globals()}]
            try:
                if refused:
                    raise err
                with torch.serialization.safe_globals(_numpy_globals()):
                    ckpt = torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as again:
                raise CheckpointError(
                    f"{path} holds Python objects that torch.load(weights_only=True) refuses to rebuild, since "
                    f"unpickling them could run code: {refused or _unsafe_globals(path, again)}. Re-save its tensors "
                    "alone where that code is installed and trusted, e.g. "
                    "torch.save(torch.load(PATH)['state_dict'], 'clean.pth')") from again
            numpy_globals = sorted(unsafe)
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"cannot read checkpoint {path}: it is truncated, corrupted or not a PyTorch file "
                              f"({type(err).__name__}: {_unpickler_error(err)})") from err
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a state_dict or an mmdet checkpoint")
    state, meta = (ckpt["state_dict"], ckpt.get("meta") or {}) if "state_dict" in ckpt else (ckpt, {})
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: 'state_dict' is a {type(state).__name__}, not a mapping of tensors")
    bad = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"{path}: state_dict entries that are not tensors: {bad[:5]}")
    return OfficialCheckpoint(dict(state), meta if isinstance(meta, dict) else {}, numpy_globals)


def _unsafe_globals(path: Path, err: Exception) -> list[str]:
    """The Python globals a checkpoint needs beyond weights_only: all of them for a zip checkpoint,
    else the one named by the unpickler's error; [] when the file is not a readable pickle."""
    try:
        found = list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # a legacy (non-zip) or unreadable file
        found = []
    return found or re.findall(r"Unsupported global: GLOBAL (\S+)", str(err))


def _unpickler_error(err: Exception) -> str:
    """The informative line of a torch.load error."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    detail = next((line for line in lines if "WeightsUnpickler error" in line or line.startswith("Unsupported")), None)
    if detail and detail.endswith("error:"):
        detail = lines[lines.index(detail) + 1] if lines.index(detail) + 1 < len(lines) else detail
    return detail or (lines[0] if lines else type(err).__name__)


# ------------------------------------------------------------------------------- rule tables

Transform = Callable[[Tensor, tuple[int, ...], "Layout"], Tensor]  # (source tensor, target shape, layout) -> target


@dataclass(frozen=True)
class Layout:
    """What the rules need to know about the codetr model being filled.

    backbone_levels: number of backbone maps the neck maps (its extra levels follow them).
    aux_heads: model.co.aux_heads (auxiliary head kinds in codetr order).
    checkpoint_heads: the checkpoint's auxiliary heads in its positive-query order: Faster R-CNN
        heads (``roi_head.k``) first, then ATSS heads (``bbox_head.k``), as (kind, k).
    """

    backbone_levels: int
    aux_heads: tuple[str, ...]
    checkpoint_heads: tuple[tuple[str, int], ...]

    def aux_index(self, kind: str, k: int) -> int:
        """Index in model.co.aux_heads of the checkpoint's k-th auxiliary head of this kind."""
        positions = [i for i, name in enumerate(self.aux_heads) if name == kind]
        if k >= len(positions):
            found = sum(1 for head, _ in self.checkpoint_heads if head == kind)
            raise CheckpointError(f"the checkpoint has {found} {kind} auxiliary head(s) but the config's "
                                  f"model.co.aux_heads is {list(self.aux_heads)}")
        return positions[k]

    def positive_index(self, i: int) -> int:
        """Index in model.co.aux_heads of the checkpoint's positive-query head i."""
        if i >= len(self.checkpoint_heads):
            raise CheckpointError(f"positive-query layers {i} exist but the checkpoint has only "
                                  f"{len(self.checkpoint_heads)} auxiliary heads")
        return self.aux_index(*self.checkpoint_heads[i])


# The codetr prefix of the auxiliary head at ``index`` of model.co.aux_heads, of kind ``kind``
# ("rcnn": submodules rpn. and roi.; "atss"): the one place to change when the heads become a list.
def aux_prefix(kind: str, index: int) -> str:
    return f"aux_heads.{index}."


POSITIVE_QUERIES = "positive_queries."  # codetr prefix of the positive-query layers


Target = str | Callable[[re.Match[str], Layout], str] | None


@dataclass(frozen=True)
class Rule:
    """Source names matching ``pattern`` become ``target`` (an ``re`` expand template, or a function
    of the match and the layout).

    part: "inference" (kept), "aux" (training-only: auxiliary heads, positive-query layers, the
    denoising label embedding; kept only with --keep-aux), "derived" (a buffer codetr recomputes: verified with ``check``, then dropped),
    "dropped" (a training-time tensor codetr has no use for, dropped and reported: ``reason``).
    transform: (tensor, target shape, layout) -> tensor, for tensor layouts that differ. stack: sources with the
    same target are 0-d entries stacked by their ``idx`` group into one vector.
    """

    pattern: str
    target: Target
    part: str = "inference"
    transform: Transform | None = None
    stack: bool = False
    check: Callable[[Tensor], str | None] | None = None
    reason: str = ""


def _head(kind: str, match: re.Match[str], layout: Layout) -> str:
    """codetr prefix of the checkpoint's auxiliary head ``kind`` number ``k`` (named group; else 0)."""
    return aux_prefix(kind, layout.aux_index(kind, int(match.groupdict().get("k") or 0)))


def _aux(kind: str, template: str) -> Callable[[re.Match[str], Layout], str]:
    """Target ``template`` (formatted with the named groups) inside auxiliary head ``kind``."""
    return lambda match, layout: _head(kind, match, layout) + template.format(**match.groupdict())


def _positive(layer: str) -> Callable[[re.Match[str], Layout], str]:
    def target(match: re.Match[str], layout: Layout) -> str:
        return f"{POSITIVE_QUERIES}{layer}.{layout.positive_index(int(match.group(1)))}.{match.group(2)}"
    return target


def relative_index_check(index: Tensor) -> str | None:
    """The released relative-position index buffer must equal the one codetr (timm) computes."""
    from timm.models.swin_transformer import get_relative_position_index

    window = round(index.shape[0] ** 0.5)
    if index.is_meta:
        return None
    expected = get_relative_position_index(window, window)
    return None if torch.equal(index.long(), expected) else f"differs from Swin's relative-position index for window {window}"


def unfold_to_concat(tensor: Tensor, shape: tuple[int, ...], layout: Layout | None = None) -> Tensor:
    """mmdet's PatchMerging (nn.Unfold) orders the 4C merged features channel-major, (c, dy, dx) at
    c * 4 + dy * 2 + dx; Swin's and timm's concatenation orders them (dx, dy, c) at dx * 2C + dy * C + c.
    Permutes the last dimension (reduction.weight columns, norm weight and bias) from the first
    order to the second; the merge followed by norm and reduction then computes the same outputs."""
    channels = tensor.shape[-1] // 4
    c = torch.arange(channels)
    order = torch.cat([c * 4 + dy * 2 + dx for dx in (0, 1) for dy in (0, 1)])  # concat position -> unfold position
    return tensor.index_select(-1, order.to(tensor.device))


def head_pos_embed_per_channel(tensor: Tensor, shape: tuple[int, ...], layout: Layout) -> Tensor:
    """Released Co-Deformable-DETR: ``head_pos_embed`` is an (heads, 1) table, and row ``h`` is added
    to every channel of head h's positional queries (its padding_idx never acts: the transformer's
    xavier init overwrites it, and the row is indexed directly). codetr keeps (heads, d), one row per
    entry of model.co.aux_heads: the scalar broadcast to every channel gives the same sum."""
    heads = len(layout.checkpoint_heads)
    if tensor.shape != (heads, 1) or shape[0] != heads:
        raise CheckpointError(f"head_pos_embed.weight is {tuple(tensor.shape)}; expected ({heads}, 1), one row per "
                              f"auxiliary head of the checkpoint, for a model with {shape[0]}")
    rows = [layout.positive_index(i) for i in range(heads)]
    out = torch.empty(shape, dtype=tensor.dtype, device=tensor.device)
    out[rows] = tensor.expand(-1, shape[1])
    return out


RESNET = [
    Rule(r"^backbone\..+\.num_batches_tracked$", None, "derived"),
    Rule(r"^backbone\.((?:conv1|bn1|layer[1-4]\.\d+\.(?:conv\d|bn\d|downsample\.[01]))"
         r"\.(?:weight|bias|running_mean|running_var))$", r"backbone.\1"),
]

_SWIN_BLOCK = r"(?:norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(?:weight|bias)|attn\.relative_position_bias_table"
# Swin as released by Sense-X/Co-DETR (SwinTransformerV1: the original Swin names); its patch merging
# sits at the end of stage s, timm's at the start of stage s + 1, in the same feature order.
SWIN_V1 = [
    Rule(r"^backbone\.patch_embed\.((?:proj|norm)\.(?:weight|bias))$", r"backbone.patch_embed.\1"),
    Rule(rf"^backbone\.layers\.(\d+)\.blocks\.(\d+)\.({_SWIN_BLOCK})$", r"backbone.layers.\1.blocks.\2.\3"),
    Rule(r"^backbone\.layers\.\d+\.blocks\.\d+\.attn\.relative_position_index$", None, "derived",
         check=relative_index_check),
    Rule(r"^backbone\.layers\.(\d+)\.downsample\.(reduction\.weight|norm\.weight|norm\.bias)$",
         lambda m, _: f"backbone.layers.{int(m[1]) + 1}.downsample.{m[2]}"),
    Rule(r"^backbone\.(norm[0-3]\.(?:weight|bias))$", r"backbone.\1"),
]
# Swin in mmdet's names (mmdet 2.x/3.x SwinTransformer, used by the mmdetection 3.x port).
SWIN_MMDET = [
    Rule(r"^backbone\.patch_embed\.projection\.(weight|bias)$", r"backbone.patch_embed.proj.\1"),
    Rule(r"^backbone\.patch_embed\.norm\.(weight|bias)$", r"backbone.patch_embed.norm.\1"),
    Rule(r"^backbone\.stages\.(\d+)\.blocks\.(\d+)\.(norm[12]\.(?:weight|bias))$", r"backbone.layers.\1.blocks.\2.\3"),
    Rule(r"^backbone\.stages\.(\d+)\.blocks\.(\d+)\.attn\.w_msa\.((?:qkv|proj)\.(?:weight|bias)|relative_position_bias_table)$",
         r"backbone.layers.\1.blocks.\2.attn.\3"),
    Rule(r"^backbone\.stages\.\d+\.blocks\.\d+\.attn\.w_msa\.relative_position_index$", None, "derived",
         check=relative_index_check),
    Rule(r"^backbone\.stages\.(\d+)\.blocks\.(\d+)\.ffn\.layers\.0\.0\.(weight|bias)$", r"backbone.layers.\1.blocks.\2.mlp.fc1.\3"),
    Rule(r"^backbone\.stages\.(\d+)\.blocks\.(\d+)\.ffn\.layers\.1\.(weight|bias)$", r"backbone.layers.\1.blocks.\2.mlp.fc2.\3"),
    Rule(r"^backbone\.stages\.(\d+)\.downsample\.(reduction\.weight|norm\.weight|norm\.bias)$",
         lambda m, _: f"backbone.layers.{int(m[1]) + 1}.downsample.{m[2]}", transform=unfold_to_concat),
    Rule(r"^backbone\.(norm[0-3]\.(?:weight|bias))$", r"backbone.\1"),
]

# The released EVA-02-style ViT (mmdet/models/backbones/vit.py): convert_checkpoint first renames its
# tensors with codetr.models.vit.convert_vit_state_dict (which checks and drops the RoPE tables).
VIT = [Rule(r"^backbone\.(.+)$", r"backbone.\1")]
# The released simple feature pyramid (mmdet/models/necks/sfp.py): the same Sequential indexes.
SFP = [Rule(r"^neck\.(p[2-6]\.\d+\.(?:weight|bias))$", r"neck.\1")]

# mmdet's ChannelMapper: ConvModule(conv without bias, gn) per level; extra levels follow the inputs.
CHANNEL_MAPPER = [
    Rule(r"^neck\.convs\.(\d+)\.conv\.weight$", r"neck.convs.\1.0.weight"),
    Rule(r"^neck\.convs\.(\d+)\.gn\.(weight|bias)$", r"neck.convs.\1.1.\2"),
    Rule(r"^neck\.extra_convs\.(\d+)\.conv\.weight$", lambda m, layout: f"neck.convs.{layout.backbone_levels + int(m[1])}.0.weight"),
    Rule(r"^neck\.extra_convs\.(\d+)\.gn\.(weight|bias)$", lambda m, layout: f"neck.convs.{layout.backbone_levels + int(m[1])}.1.{m[2]}"),
]

_T = r"^query_head\.transformer\."
_MSDA = r"(?:sampling_offsets|attention_weights|value_proj|output_proj)\.(?:weight|bias)"
# Transformer layers and prediction branches, the same in both released detectors and in the
# mmdetection 3.x port (mmcv-style BaseTransformerLayer names: attentions / ffns.0.layers.{0.0,1} / norms).
TRANSFORMER_LAYERS = [
    Rule(_T + r"level_embeds$", "level_embed"),
    Rule(_T + r"((?:enc_output|enc_output_norm)\.(?:weight|bias))$", r"\1"),
    Rule(r"^query_head\.cls_branches\.(\d+)\.(weight|bias)$", r"class_branches.\1.\2"),
    Rule(r"^query_head\.reg_branches\.(\d+)\.([024])\.(weight|bias)$", r"box_branches.\1.\2.\3"),
    Rule(_T + rf"encoder\.layers\.(\d+)\.attentions\.0\.({_MSDA})$", r"encoder.layers.\1.self_attn.\2"),
    Rule(_T + r"encoder\.layers\.(\d+)\.ffns\.0\.layers\.0\.0\.(weight|bias)$", r"encoder.layers.\1.ffn.0.\2"),
    Rule(_T + r"encoder\.layers\.(\d+)\.ffns\.0\.layers\.1\.(weight|bias)$", r"encoder.layers.\1.ffn.3.\2"),
    Rule(_T + r"encoder\.layers\.(\d+)\.norms\.([01])\.(weight|bias)$", lambda m, _: f"encoder.layers.{m[1]}.norm{int(m[2]) + 1}.{m[3]}"),
    Rule(_T + r"decoder\.layers\.(\d+)\.attentions\.0\.attn\.(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)$",
         r"decoder_layers.\1.self_attn.\2"),
    Rule(_T + rf"decoder\.layers\.(\d+)\.attentions\.1\.({_MSDA})$", r"decoder_layers.\1.cross_attn.\2"),
    Rule(_T + r"decoder\.layers\.(\d+)\.ffns\.0\.layers\.0\.0\.(weight|bias)$", r"decoder_layers.\1.ffn.0.\2"),
    Rule(_T + r"decoder\.layers\.(\d+)\.ffns\.0\.layers\.1\.(weight|bias)$", r"decoder_layers.\1.ffn.3.\2"),
    Rule(_T + r"decoder\.layers\.(\d+)\.norms\.([012])\.(weight|bias)$", lambda m, _: f"decoder_layers.{m[1]}.norm{int(m[2]) + 1}.{m[3]}"),
]
# Deformable-DETR of the Sense-X release (CoDeformDETRHead + CoDeformableDetrTransformer).
DEFORMABLE_DETR_MMDET2 = [
    Rule(_T + r"((?:pos_trans|pos_trans_norm|reference_points)\.(?:weight|bias))$", r"\1"),
    Rule(r"^query_head\.query_embedding\.weight$", "query_embedding.weight"),
]
# DINO of the Sense-X release (CoDINOHead + CoDinoTransformer + DinoTransformerDecoder) and of the
# mmdetection 3.x port, whose denoising label embedding sits in query_head.dn_generator.
DINO_MMDET = [
    Rule(_T + r"query_embed\.weight$", "query_embedding.weight"),
    Rule(_T + r"decoder\.ref_point_head\.([02])\.(weight|bias)$", r"ref_point_head.\1.\2"),
    Rule(_T + r"decoder\.norm\.(weight|bias)$", r"decoder_norm.\1"),
    Rule(r"^query_head\.(?:dn_generator\.)?label_embedding\.weight$", "denoising.label_embedding.weight", "aux"),
]

# Training-only parts: the pyramid adapter's extra level, the positive-query layers (index = the
# checkpoint's auxiliary head order), RPN + RoI head (roi_head.k) and ATSS (bbox_head.k). Co-DINO's
# positive queries have the box projection only.
CO_AUX_MMDET = [
    Rule(r"^query_head\.downsample\.([01])\.(weight|bias)$", r"adapter.downsample.\1.\2", "aux"),
    Rule(_T + r"aux_pos_trans\.(\d+)\.(weight|bias)$", _positive("box_proj"), "aux"),
    Rule(_T + r"aux_pos_trans_norm\.(\d+)\.(weight|bias)$", _positive("box_norm"), "aux"),
]
CO_DEFORMABLE_AUX_MMDET2 = [
    Rule(_T + r"pos_feats_trans\.(\d+)\.(weight|bias)$", _positive("feat_proj"), "aux"),
    Rule(_T + r"pos_feats_norm\.(\d+)\.(weight|bias)$", _positive("feat_norm"), "aux"),
    Rule(_T + r"head_pos_embed\.weight$", f"{POSITIVE_QUERIES}head_embed.weight", "aux",
         transform=head_pos_embed_per_channel),
]
AUX_HEADS_MMDET = [
    Rule(r"^rpn_head\.(?P<name>rpn_conv|rpn_cls|rpn_reg)\.(?P<p>weight|bias)$", _aux("rcnn", "rpn.{name}.{p}"), "aux"),
    Rule(r"^roi_head\.(?P<k>\d+)\.bbox_head\.shared_fcs\.(?P<j>[01])\.(?P<p>weight|bias)$",  # Linear-ReLU-Linear-ReLU
         lambda m, layout: _head("rcnn", m, layout) + f"roi.shared_fcs.{2 * int(m['j'])}.{m['p']}", "aux"),
    Rule(r"^roi_head\.(?P<k>\d+)\.bbox_head\.(?P<name>fc_cls|fc_reg)\.(?P<p>weight|bias)$", _aux("rcnn", "roi.{name}.{p}"), "aux"),
    Rule(r"^roi_head\.(?P<k>\d+)\.bbox_head\.shared_convs\.(?P<j>\d+)\.(?P<m>conv|gn)\.(?P<p>weight|bias)$",  # ConvFC: Conv-GN-ReLU
         lambda m, layout: _head("rcnn", m, layout) + f"roi.shared_convs.{3 * int(m['j']) + (m['m'] == 'gn')}.{m['p']}", "aux"),
    Rule(r"^bbox_head\.(?P<k>\d+)\.(?P<tower>cls|reg)_convs\.(?P<j>\d+)\.(?P<m>conv|gn)\.(?P<p>weight|bias)$",  # Conv-GN-ReLU
         lambda m, layout: _head("atss", m, layout) + f"{m['tower']}_convs.{3 * int(m['j']) + (m['m'] == 'gn')}.{m['p']}",
         "aux"),
    Rule(r"^bbox_head\.(?P<k>\d+)\.(?P<name>atss_cls|atss_reg|atss_centerness)\.(?P<p>weight|bias)$",
         _aux("atss", "{name}.{p}"), "aux"),
    Rule(r"^bbox_head\.(?P<k>\d+)\.scales\.(?P<idx>\d+)\.scale$", _aux("atss", "scales"), "aux", stack=True),
]

# Training-time tensors outside the model. mmcv's EMA hook (the ViT-L COCO config's ExpMomentumEMAHook) keeps
# ema_<name with dots as underscores> buffers and, before every checkpoint, swaps them with the weights: the
# weights saved under the model's names are the averages, the ema_* entries the raw last-step weights
# (mmdet/core/hook/ema.py, ``_swap_ema_parameters`` in after_train_epoch, ahead of the CheckpointHook).
# The released LVIS checkpoints carry FedLoss class weights in their classification losses (Sense-X/Co-DETR
# issues #55, #152), although the released configs train with quality focal loss.
TRAINING_STATE = [
    Rule(r"^ema_.+$", None, "dropped", reason="ema_* entries (EMA hook: the raw weights; the averages are the "
         "weights loaded)"),
    Rule(r"^(?:query_head|bbox_head\.\d+|roi_head\.\d+\.bbox_head)\.loss_cls\.fed_loss_weight$", None, "dropped",
         reason="FedLoss class-weight buffers (a training loss's state)"),
]

BACKBONE_TABLES = {"resnet": RESNET, "swin_v1": SWIN_V1, "swin_mmdet": SWIN_MMDET, "vit": VIT}
NECK_TABLES = {"channel_mapper": CHANNEL_MAPPER, "sfp": SFP}
DETECTOR_TABLES = {
    "co_deformable_detr": TRANSFORMER_LAYERS + DEFORMABLE_DETR_MMDET2 + CO_AUX_MMDET + CO_DEFORMABLE_AUX_MMDET2
    + AUX_HEADS_MMDET,
    "co_dino": TRANSFORMER_LAYERS + DINO_MMDET + CO_AUX_MMDET + AUX_HEADS_MMDET,
}
# Per detector family: codetr's model.arch and the source tensor holding the learned queries.
FAMILIES = {"co_deformable_detr": ("deformable_detr", "query_head.query_embedding.weight"),
            "co_dino": ("dino", "query_head.transformer.query_embed.weight")}


def detect_backbone(state: dict[str, Tensor]) -> str:
    """"resnet", "swin_v1", "swin_mmdet" or "vit", from characteristic source names."""
    if "backbone.conv1.weight" in state:
        return "resnet"
    if "backbone.blocks.0.attn.q_proj.weight" in state:
        return "vit"
    if "backbone.layers.0.blocks.0.attn.qkv.weight" in state:
        return "swin_v1"
    if "backbone.stages.0.blocks.0.attn.w_msa.qkv.weight" in state:
        return "swin_mmdet"
    sample = sorted(k for k in state if k.startswith("backbone."))[:5]
    raise CheckpointError(f"unknown backbone: expected an mmdet ResNet (backbone.conv1.weight), Swin "
                          "(backbone.layers.0.blocks.0.attn.qkv.weight or backbone.stages.0...) or ViT "
                          f"(backbone.blocks.0.attn.q_proj.weight), found {sample or 'no backbone.* keys'}")


def detect_detector(state: dict[str, Tensor]) -> str:
    """The detector family of a checkpoint: "co_deformable_detr" or "co_dino" (Sense-X release, or
    the mmdetection 3.x port of Co-DINO)."""
    if "query_head.transformer.level_embeds" in state:
        if "query_head.query_embedding.weight" in state:
            return "co_deformable_detr"
        if "query_head.transformer.query_embed.weight" in state:
            return "co_dino"
    prefixes = sorted({k.split(".")[0] for k in state})
    raise CheckpointError("not a Co-DETR checkpoint: no query_head.transformer.level_embeds with "
                          "query_head.query_embedding (Co-Deformable-DETR) or query_head.transformer.query_embed "
                          f"(Co-DINO); its top-level modules are {prefixes[:12]}")


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

    from codetr.models.backbones import RESNETS, SWINS, VITS

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
    from codetr.models.vit import convert_vit_state_dict, interleaved_window_blocks

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


# ---------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="official .pth ({'state_dict', 'meta'} or a bare state_dict)")
    parser.add_argument("--config", required=True,
                        help="codetr config of the checkpoint's model-zoo row, e.g. co_deformable_detr_r50_1x_coco")
    parser.add_argument("--out", required=True, type=Path, help="output .safetensors")
    parser.add_argument("--keep-aux", action="store_true",
                        help="keep the auxiliary heads and positive-query layers (to fine-tune with Co- training)")
    parser.add_argument("--classes", type=Path,
                        help="class names: a COCO-format JSON (names and ids of its categories) or a text file with "
                             "one name per line; default COCO's 80 classes for an 80-class checkpoint")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")


def run(args: argparse.Namespace) -> Conversion:
    from codetr.config import config_to_dict, load_config
    from codetr.engine.checkpoint import save_inference_weights
    from codetr.engine.weights import load_weights
    from codetr.models.build import build_model

    cfg: Config = load_config(args.config, args.overrides)
    loaded = load_mmdet_checkpoint(args.checkpoint)
    state, meta = loaded.state_dict, loaded.meta
    if loaded.numpy_globals:
        print(f"{args.checkpoint.name}: its metadata holds numpy values ({', '.join(loaded.numpy_globals)}), loaded as "
              "plain numbers")
    cfg.model = model_config_for(cfg.model, state)
    num_classes = cfg.model.num_classes
    if args.classes is not None:
        names, ids = read_classes(args.classes)
    elif num_classes == 80:
        names, ids = coco_classes()
    else:
        hint = f" (its metadata names {list(meta['CLASSES'])[:5]}...)" if meta.get("CLASSES") else ""
        raise CheckpointError(f"{args.checkpoint} has {num_classes} classes{hint}: pass --classes FILE with their names")
    if len(names) != num_classes:
        raise CheckpointError(f"{args.classes or 'COCO'} names {len(names)} classes but the checkpoint has {num_classes}")

    model = build_model(cfg.model)
    tensors = model.state_dict() if args.keep_aux else model.inference_state_dict()
    conversion = convert_checkpoint(state, cfg.model, args.keep_aux, {k: tuple(v.shape) for k, v in tensors.items()})
    if not conversion.ok:
        raise CheckpointError(f"{args.checkpoint} does not fit config {args.config}:\n{conversion.report()}")
    load_weights(model, conversion.state_dict, str(args.checkpoint))
    save_inference_weights(args.out, conversion.state_dict, names, ids, config_to_dict(cfg))
    print(conversion.report())
    print(f"wrote {args.out}: {num_classes} classes, config {args.config}")
    return conversion

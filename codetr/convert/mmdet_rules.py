"""The rule tables translating the official Co-DETR (mmdet) parameter names to codetr's: one table
per part (backbone, neck, detector), each rule a source-name pattern with its codetr name and an
optional tensor transform (:mod:`codetr.convert.mmdet` applies them); the codetr names of
auxiliary heads come from :func:`aux_prefix`."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from codetr.convert.mmdet_checkpoint import CheckpointError

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


def head_pos_embed_rows(tensor: Tensor, shape: tuple[int, ...], layout: Layout) -> Tensor:
    """Released Co-Deformable-DETR: ``head_pos_embed`` is an (heads, 1) table, row ``h`` added to every
    channel of head h's positional queries, as codetr's ``positive_queries.head_embed``; its rows follow
    the order of model.co.aux_heads."""
    heads = len(layout.checkpoint_heads)
    if tensor.shape != (heads, 1) or shape != (heads, 1):
        raise CheckpointError(f"head_pos_embed.weight is {tuple(tensor.shape)}; expected ({heads}, 1), one row per "
                              f"auxiliary head of the checkpoint, for a model with {shape[0]}")
    out = torch.empty(shape, dtype=tensor.dtype, device=tensor.device)
    out[[layout.positive_index(i) for i in range(heads)]] = tensor
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
# tensors with codetr.models.backbones.vit.convert_vit_state_dict (which checks and drops the RoPE tables).
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
         transform=head_pos_embed_rows),
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
    # the Co-Deformable-DETR mask config's FCN mask head in the RoI head (same names inside it)
    Rule(r"^roi_head\.(?P<k>\d+)\.mask_head\.(?P<rest>(?:convs\.\d+\.conv|upsample|conv_logits)\.(?:weight|bias))$",
         _aux("rcnn", "roi.mask_head.{rest}"), "aux"),
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


# Co-DINO-Inst's mask branch (projects/models/co_detr.py mask_head / mask_iou_head; the RoI extractors
# have no weights): codetr keeps the released names under mask_branch., but for the LN2d norms of the
# ConvModules, which mmcv names norm_layer (its infer_abbr knows no abbreviation for LN2d) and codetr norm.
MASK_BRANCH_MMDET2 = [
    Rule(r"^(mask_head\.(?:instance|semantic)_convs\.\d+|mask_iou_head\.convs\.\d+)\.norm_layer\.(weight|bias)$",
         r"mask_branch.\1.norm.\2"),
    Rule(r"^mask_head\.(.+)$", r"mask_branch.mask_head.\1"),
    Rule(r"^mask_iou_head\.(.+)$", r"mask_branch.mask_iou_head.\1"),
]


BACKBONE_TABLES = {"resnet": RESNET, "swin_v1": SWIN_V1, "swin_mmdet": SWIN_MMDET, "vit": VIT}


NECK_TABLES = {"channel_mapper": CHANNEL_MAPPER, "sfp": SFP}


DETECTOR_TABLES = {
    "co_deformable_detr": TRANSFORMER_LAYERS + DEFORMABLE_DETR_MMDET2 + CO_AUX_MMDET + CO_DEFORMABLE_AUX_MMDET2
    + AUX_HEADS_MMDET,
    "co_dino": TRANSFORMER_LAYERS + DINO_MMDET + CO_AUX_MMDET + AUX_HEADS_MMDET + MASK_BRANCH_MMDET2,
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

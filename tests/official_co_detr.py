"""Parameter names and shapes of the released Co-Deformable-DETR models, written down from their
definitions (Sense-X/Co-DETR, mmdet 2.25 / mmcv 1.5), and independent reference computations of
the released Swin backbone. mmdet cannot be installed here; these stand in for it.

The lists follow the modules' registration order: ``CoDETR`` holds ``backbone``, ``neck``,
``query_head`` (``CoDeformDETRHead``: ``transformer``, ``downsample``, ``cls_branches``,
``reg_branches``, ``query_embedding``), ``rpn_head``, ``roi_head.<k>`` and ``bbox_head.<k>``.
``tests/fixtures/official/*_mmdet2.txt`` are these lists for the released configs (``write_lists`` writes
them; a test checks they are current); the mmdetection 3.x reference list there was produced by
mmdetection itself and checks the Co-DINO list exactly.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

DATA = Path(__file__).parent / "fixtures" / "official"
Shape = tuple[int, ...]


def batch_norm(prefix: str, channels: int) -> list[tuple[str, Shape]]:
    return [(f"{prefix}.{p}", (channels,)) for p in ("weight", "bias", "running_mean", "running_var")] + \
        [(f"{prefix}.num_batches_tracked", ())]


def linear(prefix: str, out_features: int, in_features: int, bias: bool = True) -> list[tuple[str, Shape]]:
    return [(f"{prefix}.weight", (out_features, in_features))] + ([(f"{prefix}.bias", (out_features,))] if bias else [])


def norm(prefix: str, channels: int) -> list[tuple[str, Shape]]:
    return [(f"{prefix}.weight", (channels,)), (f"{prefix}.bias", (channels,))]


def conv(prefix: str, out_channels: int, in_channels: int, kernel: int, bias: bool = True) -> list[tuple[str, Shape]]:
    return [(f"{prefix}.weight", (out_channels, in_channels, kernel, kernel))] + \
        ([(f"{prefix}.bias", (out_channels,))] if bias else [])


def resnet(depth: int) -> list[tuple[str, Shape]]:
    """mmdet ``ResNet(depth, num_stages=4, style='pytorch')``: torchvision's names, BN buffers included."""
    blocks = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[depth]
    expansion = 1 if depth < 50 else 4
    names = conv("backbone.conv1", 64, 3, 7, bias=False) + batch_norm("backbone.bn1", 64)
    inplanes = 64
    for stage, count in enumerate(blocks):
        planes = 64 * 2**stage
        for b in range(count):
            p = f"backbone.layer{stage + 1}.{b}"
            if expansion == 1:  # BasicBlock
                names += conv(f"{p}.conv1", planes, inplanes, 3, bias=False) + batch_norm(f"{p}.bn1", planes)
                names += conv(f"{p}.conv2", planes, planes, 3, bias=False) + batch_norm(f"{p}.bn2", planes)
            else:  # Bottleneck
                names += conv(f"{p}.conv1", planes, inplanes, 1, bias=False) + batch_norm(f"{p}.bn1", planes)
                names += conv(f"{p}.conv2", planes, planes, 3, bias=False) + batch_norm(f"{p}.bn2", planes)
                names += conv(f"{p}.conv3", planes * 4, planes, 1, bias=False) + batch_norm(f"{p}.bn3", planes * 4)
            if b == 0 and (stage > 0 or inplanes != planes * expansion):
                names += conv(f"{p}.downsample.0", planes * expansion, inplanes, 1, bias=False)
                names += batch_norm(f"{p}.downsample.1", planes * expansion)
            inplanes = planes * expansion
    return names


def swin_v1(embed_dim: int, depths: tuple[int, ...], heads: tuple[int, ...], window: int,
            out_indices: tuple[int, ...]) -> list[tuple[str, Shape]]:
    """Sense-X ``SwinTransformerV1`` (ape=False, patch_norm=True): BasicLayer ``layers.s`` = blocks +
    PatchMerging ``downsample`` (all but the last), output norms ``norm{i}``."""
    names = conv("backbone.patch_embed.proj", embed_dim, 3, 4) + norm("backbone.patch_embed.norm", embed_dim)
    for s, (depth, h) in enumerate(zip(depths, heads)):
        dim = embed_dim * 2**s
        for b in range(depth):
            p = f"backbone.layers.{s}.blocks.{b}"
            names += norm(f"{p}.norm1", dim)
            names += [(f"{p}.attn.relative_position_bias_table", ((2 * window - 1) ** 2, h)),
                      (f"{p}.attn.relative_position_index", (window * window, window * window))]
            names += linear(f"{p}.attn.qkv", 3 * dim, dim) + linear(f"{p}.attn.proj", dim, dim)
            names += norm(f"{p}.norm2", dim) + linear(f"{p}.mlp.fc1", 4 * dim, dim) + linear(f"{p}.mlp.fc2", dim, 4 * dim)
        if s < len(depths) - 1:
            names += linear(f"backbone.layers.{s}.downsample.reduction", 2 * dim, 4 * dim, bias=False)
            names += norm(f"backbone.layers.{s}.downsample.norm", 4 * dim)
    for i in out_indices:
        names += norm(f"backbone.norm{i}", embed_dim * 2**i)
    return names


def swin_mmdet(embed_dim: int, depths: tuple[int, ...], heads: tuple[int, ...], window: int,
               out_indices: tuple[int, ...]) -> list[tuple[str, Shape]]:
    """mmdet ``SwinTransformer`` (2.x and 3.x): ``patch_embed.projection``, SwinBlockSequence
    ``stages.s`` = SwinBlock ``blocks`` (ShiftWindowMSA ``attn.w_msa``, FFN ``ffn.layers``) +
    PatchMerging ``downsample`` (norm, then reduction), output norms ``norm{i}``."""
    names = conv("backbone.patch_embed.projection", embed_dim, 3, 4) + norm("backbone.patch_embed.norm", embed_dim)
    for s, (depth, h) in enumerate(zip(depths, heads)):
        dim = embed_dim * 2**s
        for b in range(depth):
            p = f"backbone.stages.{s}.blocks.{b}"
            names += norm(f"{p}.norm1", dim)
            names += [(f"{p}.attn.w_msa.relative_position_bias_table", ((2 * window - 1) ** 2, h)),
                      (f"{p}.attn.w_msa.relative_position_index", (window * window, window * window))]
            names += linear(f"{p}.attn.w_msa.qkv", 3 * dim, dim) + linear(f"{p}.attn.w_msa.proj", dim, dim)
            names += norm(f"{p}.norm2", dim) + linear(f"{p}.ffn.layers.0.0", 4 * dim, dim)
            names += linear(f"{p}.ffn.layers.1", dim, 4 * dim)
        if s < len(depths) - 1:
            names += norm(f"backbone.stages.{s}.downsample.norm", 4 * dim)
            names += linear(f"backbone.stages.{s}.downsample.reduction", 2 * dim, 4 * dim, bias=False)
    for i in out_indices:
        names += norm(f"backbone.norm{i}", embed_dim * 2**i)
    return names


def vit(window_size: int, global_every: int, rope_glb_tokens: int | None = None, embed_dim: int = 1024, depth: int = 24,
        heads: int = 16, hidden: int = 2730, pretrain_grid: int = 32) -> list[tuple[str, Shape]]:
    """Sense-X ``ViT`` (mmdet/models/backbones/vit.py, EVA-02 style): ``pos_embed`` with a class-token slot,
    ``patch_embed.proj``, the RoPE buffers (``rope_win``; ``rope_glb`` with ``use_lsj``, then shared by the
    global blocks), blocks (q/k/v without bias + ``q_bias`` / ``v_bias``, SwiGLU ``w1``/``w2``/``ffn_ln``/``w3``),
    ``out_norm``. Window blocks: all but every ``global_every``-th."""
    head_dim = embed_dim // heads
    names = [("backbone.pos_embed", (1, 1 + pretrain_grid**2, embed_dim))] + conv("backbone.patch_embed.proj", embed_dim, 3, 16)
    rope_win = [(f"backbone.rope_win.freqs_{f}", (window_size**2, head_dim)) for f in ("cos", "sin")]
    rope_glb = [(f"backbone.rope_glb.freqs_{f}", (rope_glb_tokens, head_dim)) for f in ("cos", "sin")] if rope_glb_tokens else []
    names += rope_win + rope_glb
    for i in range(depth):
        p = f"backbone.blocks.{i}"
        names += norm(f"{p}.norm1", embed_dim) + [(f"{p}.attn.q_bias", (embed_dim,)), (f"{p}.attn.v_bias", (embed_dim,))]
        names += [(f"{p}.attn.{x}_proj.weight", (embed_dim, embed_dim)) for x in "qkv"]
        rope = rope_win if i % global_every != global_every - 1 else rope_glb
        names += [(name.replace("backbone.rope_win", f"{p}.attn.rope").replace("backbone.rope_glb", f"{p}.attn.rope"), shape)
                  for name, shape in rope]
        names += linear(f"{p}.attn.proj", embed_dim, embed_dim) + norm(f"{p}.norm2", embed_dim)
        names += linear(f"{p}.mlp.w1", hidden, embed_dim) + linear(f"{p}.mlp.w2", hidden, embed_dim)
        names += norm(f"{p}.mlp.ffn_ln", hidden) + linear(f"{p}.mlp.w3", embed_dim, hidden)
    return names + norm("backbone.out_norm", embed_dim)


def sfp(c: int = 1024, d: int = 256) -> list[tuple[str, Shape]]:
    """Sense-X ``SFP`` (mmdet/models/necks/sfp.py, use_p2): per level a Sequential of upsampling / pooling,
    bias-free convs and LayerNorm2d (weight, bias) at the released indexes."""
    def conv_ln(prefix: str, i: int, out: int, inp: int, k: int) -> list[tuple[str, Shape]]:
        return conv(f"{prefix}.{i}", out, inp, k, bias=False) + norm(f"{prefix}.{i + 1}", out)

    def tail(prefix: str, i: int, inp: int) -> list[tuple[str, Shape]]:
        return conv_ln(prefix, i, d, inp, 1) + conv_ln(prefix, i + 3, d, d, 3)

    return (conv_ln("neck.p2", 1, c // 2, c, 3) + conv_ln("neck.p2", 5, c // 4, c // 2, 3) + tail("neck.p2", 8, c // 4)
            + conv_ln("neck.p3", 1, c // 2, c, 3) + tail("neck.p3", 4, c // 2) + tail("neck.p4", 0, c)
            + tail("neck.p5", 1, c) + conv_ln("neck.p6", 1, c, c, 3) + tail("neck.p6", 4, c))


def msda(prefix: str, d: int, heads: int, levels: int, points: int) -> list[tuple[str, Shape]]:
    """mmcv ``MultiScaleDeformableAttention``."""
    return (linear(f"{prefix}.sampling_offsets", heads * levels * points * 2, d)
            + linear(f"{prefix}.attention_weights", heads * levels * points, d)
            + linear(f"{prefix}.value_proj", d, d) + linear(f"{prefix}.output_proj", d, d))


def ffn(prefix: str, d: int, hidden: int) -> list[tuple[str, Shape]]:
    """mmcv ``FFN``: layers = Sequential(Sequential(Linear, ReLU, Dropout), Linear, Dropout)."""
    return linear(f"{prefix}.layers.0.0", hidden, d) + linear(f"{prefix}.layers.1", d, hidden)


def channel_mapper(neck_in: list[int], d: int, levels: int) -> list[tuple[str, Shape]]:
    """mmdet ``ChannelMapper``: ConvModule (conv without bias, gn) per input, 3x3 stride-2 extra levels."""
    names = []
    for i, c in enumerate(neck_in):
        names += conv(f"neck.convs.{i}.conv", d, c, 1, bias=False) + norm(f"neck.convs.{i}.gn", d)
    for j in range(levels - len(neck_in)):
        names += conv(f"neck.extra_convs.{j}.conv", d, neck_in[-1] if j == 0 else d, 3, bias=False)
        names += norm(f"neck.extra_convs.{j}.gn", d)
    return names


def transformer_layers(d: int, ffn_dim: int, enc_layers: int, dec_layers: int, heads: int, points: int,
                       levels: int) -> tuple[list[tuple[str, Shape]], list[tuple[str, Shape]]]:
    """Encoder and decoder layers (mmcv BaseTransformerLayer / DetrTransformerDecoderLayer)."""
    t = "query_head.transformer"
    encoder, decoder = [], []
    for n in range(enc_layers):
        p = f"{t}.encoder.layers.{n}"
        encoder += msda(f"{p}.attentions.0", d, heads, levels, points) + ffn(f"{p}.ffns.0", d, ffn_dim)
        encoder += norm(f"{p}.norms.0", d) + norm(f"{p}.norms.1", d)
    for n in range(dec_layers):
        p = f"{t}.decoder.layers.{n}"
        decoder += [(f"{p}.attentions.0.attn.in_proj_weight", (3 * d, d)), (f"{p}.attentions.0.attn.in_proj_bias", (3 * d,))]
        decoder += linear(f"{p}.attentions.0.attn.out_proj", d, d)
        decoder += msda(f"{p}.attentions.1", d, heads, levels, points) + ffn(f"{p}.ffns.0", d, ffn_dim)
        decoder += norm(f"{p}.norms.0", d) + norm(f"{p}.norms.1", d) + norm(f"{p}.norms.2", d)
    return encoder, decoder


def branches(num_classes: int, d: int, dec_layers: int) -> list[tuple[str, Shape]]:
    """``cls_branches`` and ``reg_branches`` (Linear-ReLU-Linear-ReLU-Linear), one per decoder layer + 1."""
    names = []
    for i in range(dec_layers + 1):
        names += linear(f"query_head.cls_branches.{i}", num_classes, d)
    for i in range(dec_layers + 1):
        names += linear(f"query_head.reg_branches.{i}.0", d, d) + linear(f"query_head.reg_branches.{i}.2", d, d)
        names += linear(f"query_head.reg_branches.{i}.4", 4, d)
    return names


def aux_heads(num_classes: int, d: int, levels: int, atss_convs: int, roi_fc: int, roi_convs: int = 0, roi_fcs: int = 2,
              roi_agnostic: bool = False, roi_mask: bool = False) -> list[tuple[str, Shape]]:
    """RPN (9 anchors), one ConvFCBBoxHead RoI head (default Shared2FCBBoxHead: 0 convs, 2 FCs, class-specific
    deltas; fc_cls / fc_reg are registered first by BBoxHead), with ``roi_mask`` followed by its FCNMaskHead
    (4 ConvModules with bias, a 2x2 deconv ``upsample``, ``conv_logits``), one ATSS head (a scale per level of
    the auxiliary pyramid: the encoder levels + 1)."""
    names = conv("rpn_head.rpn_conv", d, d, 3) + conv("rpn_head.rpn_cls", 9, d, 1) + conv("rpn_head.rpn_reg", 36, d, 1)
    r = "roi_head.0.bbox_head"
    names += linear(f"{r}.fc_cls", num_classes + 1, roi_fc) + linear(f"{r}.fc_reg", 4 * (1 if roi_agnostic else num_classes), roi_fc)
    for j in range(roi_convs):  # ConvModule: conv (no bias before a norm), gn
        names += conv(f"{r}.shared_convs.{j}.conv", d, d, 3, bias=False) + norm(f"{r}.shared_convs.{j}.gn", d)
    for j in range(roi_fcs):
        names += linear(f"{r}.shared_fcs.{j}", roi_fc, d * 7 * 7 if j == 0 else roi_fc)
    if roi_mask:
        for j in range(4):
            names += conv(f"roi_head.0.mask_head.convs.{j}.conv", d, d, 3)
        names += [("roi_head.0.mask_head.upsample.weight", (d, d, 2, 2)), ("roi_head.0.mask_head.upsample.bias", (d,))]
        names += conv("roi_head.0.mask_head.conv_logits", num_classes, d, 1)
    for tower in ("cls", "reg"):
        for j in range(atss_convs):
            names += conv(f"bbox_head.0.{tower}_convs.{j}.conv", d, d, 3, bias=False)
            names += norm(f"bbox_head.0.{tower}_convs.{j}.gn", d)
    names += conv("bbox_head.0.atss_cls", num_classes, d, 3) + conv("bbox_head.0.atss_reg", 4, d, 3)
    names += conv("bbox_head.0.atss_centerness", 1, d, 3)
    return names + [(f"bbox_head.0.scales.{level}.scale", ()) for level in range(levels + 1)]


def co_deformable_detr(backbone: list[tuple[str, Shape]], neck_in: list[int], num_classes: int = 80,
                       num_queries: int = 300, d: int = 256, ffn_dim: int = 2048, enc_layers: int = 6,
                       dec_layers: int = 6, heads: int = 8, points: int = 4, levels: int = 4,
                       atss_convs: int = 1, roi_fc: int = 1024, roi_mask: bool = False) -> list[tuple[str, Shape]]:
    """``CoDETR`` as configured by ``co_deformable_detr_*_coco.py``: CoDeformDETRHead with two-stage,
    box refinement, mixed selection and 2 co-heads (positive-query layers with content features and
    the (2, 1) ``head_pos_embed``), RPN + RoI head (``roi_mask``: with the mask config's FCN mask head) and ATSS."""
    t = "query_head.transformer"
    encoder, decoder = transformer_layers(d, ffn_dim, enc_layers, dec_layers, heads, points, levels)
    names = list(backbone) + channel_mapper(neck_in, d, levels) + [(f"{t}.level_embeds", (levels, d))] + encoder + decoder
    names += linear(f"{t}.enc_output", d, d) + norm(f"{t}.enc_output_norm", d)
    names += linear(f"{t}.pos_trans", 2 * d, 2 * d) + norm(f"{t}.pos_trans_norm", 2 * d)
    names += [(f"{t}.head_pos_embed.weight", (2, 1))]  # nn.Embedding(num_co_heads, 1, ...)
    names += [entry for i in range(2) for entry in linear(f"{t}.aux_pos_trans.{i}", 2 * d, 2 * d)]
    names += [entry for i in range(2) for entry in norm(f"{t}.aux_pos_trans_norm.{i}", 2 * d)]
    names += [entry for i in range(2) for entry in linear(f"{t}.pos_feats_trans.{i}", d, d)]
    names += [entry for i in range(2) for entry in norm(f"{t}.pos_feats_norm.{i}", d)]
    names += conv("query_head.downsample.0", d, d, 3) + norm("query_head.downsample.1", d)
    names += branches(num_classes, d, dec_layers) + [("query_head.query_embedding.weight", (num_queries, d))]
    return names + aux_heads(num_classes, d, levels, atss_convs, roi_fc, roi_mask=roi_mask)


def mask_branch(num_classes: int, d: int = 256, instance_convs: int = 1, semantic_convs: int = 2, stages: int = 3,
                iou_convs: int = 2, iou_fc: int = 1024, roi_size: int = 14) -> list[tuple[str, Shape]]:
    """Co-DINO-Inst's ``mask_head`` (``SimpleRefineMaskHead``, LN2d ConvModules: conv without bias, then the norm,
    which mmcv names ``norm_layer``: its ``infer_abbr`` finds none of bn / gn / ln / in in the class name ``LN2d``;
    stages of ``SimpleSFMStage`` with ``MultiBranchFusionAvg``, plain-conv ConvModules with bias; the last
    stage's logits class-agnostic) and ``mask_iou_head`` (``MaskIoUHead``, LN2d convs, one FC), as the ViT-L
    ``*_instance`` configs build them; the RoI extractors hold no weights."""
    names: list[tuple[str, Shape]] = []
    for branch, count in (("instance", instance_convs), ("semantic", semantic_convs)):
        for i in range(count):
            names += conv(f"mask_head.{branch}_convs.{i}.conv", d, d, 3, bias=False) + norm(f"mask_head.{branch}_convs.{i}.norm_layer", d)
    widths = [d // 2**i for i in range(stages + 1)]
    for i in range(stages):
        c, p = widths[i], f"mask_head.stages.{i}"
        names += conv(f"{p}.semantic_transform_in", c, d, 1) + conv(f"{p}.fuse_conv.0", c, 2 * c + 1, 1)
        for j in (1, 2, 3):
            names += conv(f"{p}.fuse_conv.1.dilation_conv_{j}.conv", c, c, 3)
        names += conv(f"{p}.fuse_conv.1.merge_conv.conv", c, c, 1) + conv(f"{p}.fuse_transform_out", c // 2 - 1, c, 1)
    for i, c in enumerate(widths):
        names += conv(f"mask_head.stage_instance_logits.{i}", 1 if i == stages else num_classes, c, 1)
    for i in range(iou_convs):
        names += conv(f"mask_iou_head.convs.{i}.conv", d, d + 1 if i == 0 else d, 3, bias=False)
        names += norm(f"mask_iou_head.convs.{i}.norm_layer", d)
    names += linear("mask_iou_head.fcs.0", iou_fc, d * (roi_size // 2) ** 2) + linear("mask_iou_head.fc_mask_iou", num_classes, iou_fc)
    return names


def co_dino(backbone: list[tuple[str, Shape]], neck_in: list[int], num_classes: int = 80, num_queries: int = 900,
            d: int = 256, ffn_dim: int = 2048, enc_layers: int = 6, dec_layers: int = 6, heads: int = 8,
            points: int = 4, levels: int = 5, atss_convs: int = 1, roi_fc: int = 1024,
            mmdet3: bool = False, neck: list[tuple[str, Shape]] | None = None,
            masks: list[tuple[str, Shape]] | None = None, **roi: int | bool) -> list[tuple[str, Shape]]:
    """``CoDETR`` as configured by ``co_dino_5scale_*``: CoDINOHead + CoDinoTransformer with the DINO
    decoder (``ref_point_head``, final ``norm``), learned ``query_embed``, positive-query layers
    without content features (``aux_pos_trans`` 2d -> d), the denoising ``label_embedding`` (in
    ``query_head.dn_generator`` in the mmdetection 3.x port), RPN + RoI head (``roi``: aux_heads' RoI
    arguments) and ATSS. ``neck``: the neck's list (default: the ChannelMapper of ``neck_in``). ``masks``: the
    mask branch's list (:func:`mask_branch`), registered after the query head and before the RPN head."""
    t = "query_head.transformer"
    encoder, decoder = transformer_layers(d, ffn_dim, enc_layers, dec_layers, heads, points, levels)
    neck = channel_mapper(neck_in, d, levels) if neck is None else neck
    names = list(backbone) + neck + [(f"{t}.level_embeds", (levels, d))] + encoder + decoder
    names += linear(f"{t}.decoder.ref_point_head.0", d, 2 * d) + linear(f"{t}.decoder.ref_point_head.2", d, d)
    names += norm(f"{t}.decoder.norm", d)
    names += linear(f"{t}.enc_output", d, d) + norm(f"{t}.enc_output_norm", d) + [(f"{t}.query_embed.weight", (num_queries, d))]
    names += [entry for i in range(2) for entry in linear(f"{t}.aux_pos_trans.{i}", d, 2 * d)]
    names += [entry for i in range(2) for entry in norm(f"{t}.aux_pos_trans_norm.{i}", d)]
    names += branches(num_classes, d, dec_layers)
    names += conv("query_head.downsample.0", d, d, 3) + norm("query_head.downsample.1", d)
    names += [(f"query_head.{'dn_generator.' if mmdet3 else ''}label_embedding.weight", (num_classes, d))]
    return names + (masks or []) + aux_heads(num_classes, d, levels, atss_convs, roi_fc, **roi)


# The released Co-Deformable-DETR configs: (backbone names, neck input channels, queries).
SWIN_ARCH = {  # embed_dim, depths, heads, window of the released Swin configs
    "swin_tiny": (96, (2, 2, 6, 2), (3, 6, 12, 24), 7),
    "swin_small": (96, (2, 2, 18, 2), (3, 6, 12, 24), 7),
    "swin_base": (128, (2, 2, 18, 2), (4, 8, 16, 32), 12),
    "swin_large": (192, (2, 2, 18, 2), (6, 12, 24, 48), 12),
}


def released_configs() -> dict[str, list[tuple[str, Shape]]]:
    """Official key/shape list of every released Co-Deformable-DETR architecture (1x and 3x share one)
    and of Co-DINO R50 and Swin-L (stages 0-3; DETR and LSJ, every schedule) (Sense-X names)."""
    lists = {"co_deformable_detr_r50": co_deformable_detr(resnet(50), [512, 1024, 2048]),
             "co_deformable_detr_mask_r50": co_deformable_detr(resnet(50), [512, 1024, 2048], roi_mask=True)}
    for name, (dim, depths, heads, window) in SWIN_ARCH.items():
        backbone = swin_v1(dim, depths, heads, window, (1, 2, 3))
        lists[f"co_deformable_detr_{name}"] = co_deformable_detr(backbone, [dim * 2, dim * 4, dim * 8])
    dim, depths, heads, window = SWIN_ARCH["swin_large"]
    lists["co_deformable_detr_swin_large_900q"] = co_deformable_detr(
        swin_v1(dim, depths, heads, window, (1, 2, 3)), [dim * 2, dim * 4, dim * 8], num_queries=900)
    lists["co_dino_5scale_r50"] = co_dino(resnet(50), [256, 512, 1024, 2048])
    lists["co_dino_5scale_swin_large"] = co_dino(swin_v1(dim, depths, heads, window, (0, 1, 2, 3)), [dim, dim * 2, dim * 4, dim * 8])
    # Co-DINO ViT-L (projects/configs/co_dino_vit): COCO with the ConvFC RoI head; LVIS (use_lsj: the global
    # RoPE table of the 1536 / 16 = 96 x 96 grid) with the Shared2FC head and 1203 classes.
    lists["co_dino_5scale_vit_large_coco"] = co_dino(vit(24, 4), [], num_queries=1500, neck=sfp(), roi_convs=4, roi_fcs=1,
                                                     roi_agnostic=True)
    lists["co_dino_5scale_lsj_vit_large_lvis"] = co_dino(vit(16, 3, rope_glb_tokens=96 * 96), [], num_classes=1203, neck=sfp())
    # Co-DINO-Inst ViT-L (the *_instance configs): the same with the mask branch
    lists["co_dino_5scale_vit_large_coco_instance"] = co_dino(vit(24, 4), [], num_queries=1500, neck=sfp(), roi_convs=4,
                                                              roi_fcs=1, roi_agnostic=True, masks=mask_branch(80))
    lists["co_dino_5scale_lsj_vit_large_lvis_instance"] = co_dino(vit(16, 3, rope_glb_tokens=96 * 96), [], num_classes=1203,
                                                                  neck=sfp(), masks=mask_branch(1203))
    return lists


# The state_dict mmdetection 3.x builds for Co-DINO R50 (co_dino_5scale_r50_lsj_8xb2_1x_coco with 3
# classes), listed by running it: the ground truth the lists above are checked against.
MMDET3_REFERENCE = DATA / "co_dino_5scale_r50_lsj_3classes_mmdet3_reference.txt"


def format_list(names: list[tuple[str, Shape]]) -> str:
    return "".join(f"{name} ({', '.join(map(str, shape))}{',' if len(shape) == 1 else ''})\n" for name, shape in names)


def read_list(path: Path) -> list[tuple[str, Shape]]:
    """``name (d0, d1, ...)`` per line, as in the shared reference list."""
    out = []
    for line in path.read_text().splitlines():
        name, shape = line.rsplit(" (", 1)
        out.append((name, tuple(int(v) for v in shape.rstrip(")").split(",") if v.strip())))
    return out


def write_lists() -> None:
    DATA.mkdir(parents=True, exist_ok=True)
    for name, names in released_configs().items():
        (DATA / f"{name}_mmdet2.txt").write_text(format_list(names))


# --------------------------------------------------------------------------- random weights


def relative_index_v1(window: int) -> Tensor:
    """The released SwinV1 ``relative_position_index``: for tokens i, j of a window (row-major),
    (dy + window - 1) * (2 * window - 1) + (dx + window - 1) with (dy, dx) = position_i - position_j."""
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    return (ys[:, None] - ys[None, :] + window - 1) * (2 * window - 1) + (xs[:, None] - xs[None, :] + window - 1)


def relative_index_mmdet(window: int) -> Tensor:
    """mmdet's construction of the same index (WindowMSA): a stepped sequence plus its transpose,
    flipped along the second axis."""
    seq = (torch.arange(0, (2 * window - 1) * window, 2 * window - 1)[:, None] + torch.arange(window)[None]).reshape(1, -1)
    return (seq + seq.T).flip(1)


def random_state(names: list[tuple[str, Shape]], seed: int = 0, meta: bool = False) -> dict[str, Tensor]:
    """Tensors of the listed names and shapes: random weights (batch-norm variances positive,
    relative-position indices as released), or meta tensors (names and shapes only)."""
    if meta:
        return {name: torch.empty(shape, device="meta") for name, shape in names}
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in names:
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(0)
        elif name.endswith("relative_position_index"):
            state[name] = relative_index_v1(round(shape[0] ** 0.5))
        elif name.endswith("running_var"):
            state[name] = torch.rand(shape, generator=g) + 0.5
        elif name.endswith(".scale") or len(shape) == 1 and name.endswith("weight") and re.search(r"norm|gn|bn|downsample\.1", name):
            state[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)  # scales, batch / group / layer norm weights
        else:
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
            state[name] = torch.randn(shape, generator=g) / math.sqrt(fan_in) * (0.5 if len(shape) > 1 else 0.05)
    return state


# ------------------------------------------------------------ the released Swin, computed naively


def merge_concat(x: Tensor) -> Tensor:
    """SwinV1 PatchMerging order: x (B, H, W, C), H and W even -> (B, H/2, W/2, 4C) =
    [x(2i, 2j), x(2i+1, 2j), x(2i, 2j+1), x(2i+1, 2j+1)] concatenated."""
    return torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)


def merge_unfold(x: Tensor) -> Tensor:
    """mmdet PatchMerging order: nn.Unfold(2, stride 2) on (B, C, H, W): channel-major, (c, dy, dx)."""
    b, h, w, _ = x.shape
    cols = F.unfold(x.permute(0, 3, 1, 2), kernel_size=2, stride=2)  # (B, 4C, L)
    return cols.transpose(1, 2).reshape(b, h // 2, w // 2, -1)


def window_attention(x: Tensor, state: dict[str, Tensor], p: str, heads: int, window: int, shift: int) -> Tensor:
    """Released shifted-window attention of one block on x (H, W, C), one window at a time."""
    h, w, c = x.shape
    x = F.pad(x, (0, 0, 0, (-w) % window, 0, (-h) % window))
    hp, wp = x.shape[:2]
    region = torch.zeros(hp, wp, dtype=torch.long)
    if shift:
        x = torch.roll(x, (-shift, -shift), (0, 1))
        rows = torch.tensor([0 if r < hp - window else 1 if r < hp - shift else 2 for r in range(hp)])
        cols = torch.tensor([0 if r < wp - window else 1 if r < wp - shift else 2 for r in range(wp)])
        region = rows[:, None] * 3 + cols[None, :]
    table = state[f"{p}.relative_position_bias_table"]
    out = torch.zeros_like(x)
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    bias = table[(ys[:, None] - ys[None] + window - 1) * (2 * window - 1) + xs[:, None] - xs[None] + window - 1]  # (N, N, heads)
    for top in range(0, hp, window):
        for left in range(0, wp, window):
            tokens = x[top:top + window, left:left + window].reshape(-1, c)
            labels = region[top:top + window, left:left + window].reshape(-1)
            qkv = tokens @ state[f"{p}.qkv.weight"].T + state[f"{p}.qkv.bias"]
            q, k, v = qkv.split(c, -1)
            d = c // heads
            heads_out = []
            for head in range(heads):
                qh, kh, vh = (t[:, head * d:(head + 1) * d] for t in (q, k, v))
                logits = (qh * d**-0.5) @ kh.T + bias[:, :, head]
                logits = logits - 100.0 * (labels[:, None] != labels[None, :]).float()
                heads_out.append(logits.softmax(-1) @ vh)
            result = torch.cat(heads_out, -1) @ state[f"{p}.proj.weight"].T + state[f"{p}.proj.bias"]
            out[top:top + window, left:left + window] = result.reshape(window, window, c)
    if shift:
        out = torch.roll(out, (shift, shift), (0, 1))
    return out[:h, :w]


def swin_v1_forward(state: dict[str, Tensor], image: Tensor, depths: tuple[int, ...], heads: tuple[int, ...],
                    window: int, out_indices: tuple[int, ...]) -> list[Tensor]:
    """The released SwinTransformerV1 forward (eval mode) on one image (3, H, W) with official-named
    ``backbone.*`` weights, written out step by step. Returns (C_i, H_i, W_i) per out index."""
    s = {k.removeprefix("backbone."): v for k, v in state.items()}
    h, w = image.shape[-2:]
    x = F.pad(image, (0, (-w) % 4, 0, (-h) % 4))
    x = F.conv2d(x[None], s["patch_embed.proj.weight"], s["patch_embed.proj.bias"], stride=4)[0].permute(1, 2, 0)
    x = F.layer_norm(x, x.shape[-1:], s["patch_embed.norm.weight"], s["patch_embed.norm.bias"])
    outs = []
    for stage, depth in enumerate(depths):
        for b in range(depth):
            p = f"layers.{stage}.blocks.{b}"
            y = F.layer_norm(x, x.shape[-1:], s[f"{p}.norm1.weight"], s[f"{p}.norm1.bias"])
            x = x + window_attention(y, s, f"{p}.attn", heads[stage], window, window // 2 if b % 2 else 0)
            y = F.layer_norm(x, x.shape[-1:], s[f"{p}.norm2.weight"], s[f"{p}.norm2.bias"])
            y = F.gelu(y @ s[f"{p}.mlp.fc1.weight"].T + s[f"{p}.mlp.fc1.bias"])
            x = x + y @ s[f"{p}.mlp.fc2.weight"].T + s[f"{p}.mlp.fc2.bias"]
        if stage in out_indices:
            o = F.layer_norm(x, x.shape[-1:], s[f"norm{stage}.weight"], s[f"norm{stage}.bias"])
            outs.append(o.permute(2, 0, 1))
        if stage < len(depths) - 1:
            x = F.pad(x, (0, 0, 0, x.shape[1] % 2, 0, x.shape[0] % 2))
            x = merge_concat(x[None])[0]
            x = F.layer_norm(x, x.shape[-1:], s[f"layers.{stage}.downsample.norm.weight"],
                             s[f"layers.{stage}.downsample.norm.bias"])
            x = x @ s[f"layers.{stage}.downsample.reduction.weight"].T
    return outs


if __name__ == "__main__":
    write_lists()

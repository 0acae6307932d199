"""The released Co-DINO-Inst mask branch written out as plain functions over a state dict with the
released key names (mmdet/models/roi_heads/mask_heads/refine_mask_head.py ``SimpleRefineMaskHead``,
maskiou_head.py ``MaskIoUHead``, losses/cross_entropy_loss.py ``BARCrossEntropyLoss`` and
``generate_block_target``, projects/models/co_detr.py ``simple_test_mask``, mmdet's
``BitmapMasks.crop`` / ``crop_and_resize`` and ``_do_paste_mask``), op by op, with mmcv's pieces
spelt out: ``ConvModule`` (conv, then the norm, then ReLU; no conv bias with a norm), ``LN2d`` (eps 1e-5, which
mmcv's ``build_norm_layer`` sets),
``RoIAlign(aligned=True, sampling_ratio=0)`` (torchvision's aligned roi_align), nn.Upsample bilinear.
The reference of tests/models/test_mask_branch.py (the released source needs mmcv; nothing of it is
vendored: these are the formulas, as tests/models/test_vit.py does for the ViT)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align

Weights = dict[str, Tensor]


def ln2d(x: Tensor, sd: Weights, p: str, eps: float = 1e-5) -> Tensor:
    u = x.mean(1, keepdim=True)
    s = (x - u).pow(2).mean(1, keepdim=True)
    return sd[p + "weight"][:, None, None] * ((x - u) / torch.sqrt(s + eps)) + sd[p + "bias"][:, None, None]


def conv_module(x: Tensor, sd: Weights, p: str, padding: int = 0, dilation: int = 1, stride: int = 1,
                norm: bool = False, act: bool = True) -> Tensor:
    x = F.conv2d(x, sd[p + "conv.weight"], sd.get(p + "conv.bias"), stride, padding, dilation)
    if norm:
        x = ln2d(x, sd, p + "norm.")
    return F.relu(x) if act else x


def conv(x: Tensor, sd: Weights, p: str) -> Tensor:
    return F.conv2d(x, sd[p + "weight"], sd[p + "bias"])


def fusion_avg(x: Tensor, sd: Weights, p: str) -> Tensor:
    f1 = conv_module(x, sd, p + "dilation_conv_1.", padding=1, dilation=1)
    f2 = conv_module(x, sd, p + "dilation_conv_2.", padding=3, dilation=3)
    f3 = conv_module(x, sd, p + "dilation_conv_3.", padding=5, dilation=5)
    f4 = F.avg_pool2d(x, x.shape[-1])
    return conv_module(f1 + f2 + f3 + f4, sd, p + "merge_conv.", act=False)


def sfm_stage(sd: Weights, p: str, feats: Tensor, logits: Tensor, semantic: Tensor, rois: Tensor, size: int,
              stride: int, upsample: bool) -> Tensor:
    semantic = F.relu(conv(semantic, sd, p + "semantic_transform_in."))
    ins_semantic = roi_align(semantic, rois, (size, size), 1.0 / stride, 0, aligned=True)
    fused = torch.cat([feats, ins_semantic, logits.sigmoid()], 1)
    fused = F.relu(conv(fused, sd, p + "fuse_conv.0."))
    fused = F.relu(fusion_avg(fused, sd, p + "fuse_conv.1."))
    fused = F.relu(conv(fused, sd, p + "fuse_transform_out."))
    fused = torch.cat([fused, logits.sigmoid()], 1)
    return F.interpolate(fused, scale_factor=2, mode="bilinear") if upsample else fused


def refine_mask_head(sd: Weights, feats: Tensor, semantic: Tensor, rois: Tensor, labels: Tensor,
                     num_instance_convs: int, num_semantic_convs: int, sizes: list[int], classes: list[int],
                     stride: int) -> list[Tensor]:
    for i in range(num_instance_convs):
        feats = conv_module(feats, sd, f"instance_convs.{i}.", padding=1, norm=True)
    for i in range(num_semantic_convs):
        semantic = conv_module(semantic, sd, f"semantic_convs.{i}.", padding=1, norm=True)
    preds = []
    rows = torch.arange(len(rois))
    for idx in range(len(sizes) - 1):
        logits = conv(feats, sd, f"stage_instance_logits.{idx}.")[rows, labels][:, None]
        feats = sfm_stage(sd, f"stages.{idx}.", feats, logits, semantic, rois, sizes[idx], stride, idx < len(sizes) - 2)
        preds.append(logits)
    if classes[-1] == 1:
        labels = labels.clamp(max=0)
    last = conv(feats, sd, f"stage_instance_logits.{len(sizes) - 1}.")[rows, labels][:, None]
    preds.append(F.interpolate(last, scale_factor=2, mode="bilinear", align_corners=True))
    return preds


def mask_iou_head(sd: Weights, mask_feat: Tensor, mask_pred: Tensor, num_convs: int, num_fcs: int) -> Tensor:
    x = torch.cat((mask_feat, F.max_pool2d(mask_pred.sigmoid().unsqueeze(1), 2, 2)), 1)
    for i in range(num_convs):
        x = F.relu(conv_module(x, sd, f"convs.{i}.", padding=1, stride=2 if i == num_convs - 1 else 1, norm=True))
    x = x.flatten(1)
    for i in range(num_fcs):
        x = F.relu(F.linear(x, sd[f"fcs.{i}.weight"], sd[f"fcs.{i}.bias"]))
    return F.linear(x, sd["fc_mask_iou.weight"], sd["fc_mask_iou.bias"]).sigmoid()


def block_target(mask_target: Tensor, boundary_width: int) -> Tensor:
    """0 background, 1 boundary, 2 inside: the Laplacian-kernel construction of the release."""
    mask_target = mask_target.float()
    k = 2 * boundary_width + 1
    kernel = -torch.ones(1, 1, k, k)
    kernel[0, 0, boundary_width, boundary_width] = k**2 - 1
    padded = F.pad(mask_target.unsqueeze(1), (boundary_width,) * 4, "constant", 0)
    pos = F.conv2d(padded, kernel).clamp(min=0) / float(k**2)
    pos = (pos > 0.1).float().squeeze(1)
    neg = F.conv2d(1 - padded, kernel).clamp(min=0) / float(k**2)
    neg = (neg > 0.1).float().squeeze(1)
    block = torch.zeros_like(mask_target).long()
    block[(pos + neg) > 0] = 1
    block[(mask_target - pos) > 0] = 2
    return block


def bar_loss(preds: list[Tensor], targets: list[Tensor], weights: list[float], boundary_width: int = 2,
             start_stage: int = 1) -> Tensor:
    losses = []
    for idx in range(len(preds)):
        pred, target = preds[idx].squeeze(1), targets[idx]
        if idx <= start_stage:
            losses.append(F.binary_cross_entropy_with_logits(pred, target, reduction="none").mean())
            pre_pred = pred.sigmoid() >= 0.5
            continue
        region = (block_target(pre_pred.float(), boundary_width) == 1).unsqueeze(1)
        region = region | (block_target(targets[idx - 1].float(), boundary_width) == 1).unsqueeze(1)
        region = F.interpolate(region.float(), pred.shape[-2:], mode="bilinear", align_corners=True)
        region = (region >= 0.5).squeeze(1)
        loss = F.binary_cross_entropy_with_logits(pred, target, reduction="none")
        losses.append(loss[region].sum() / region.sum().clamp(min=1).float())
        edge = (block_target(pre_pred.float(), 1) == 1)
        edge = F.interpolate(edge.unsqueeze(1).float(), pred.shape[-2:], mode="bilinear", align_corners=True) >= 0.5
        pre_pred = F.interpolate(preds[idx - 1], pred.shape[-2:], mode="bilinear", align_corners=True)
        pre_pred[edge] = preds[idx][edge]
        pre_pred = pre_pred.squeeze(1).sigmoid() >= 0.5
    return sum(w * loss for w, loss in zip(weights, losses))


def refine_at_test(preds: list[Tensor]) -> Tensor:
    """``simple_test_mask``'s in-place merge of stages 1.. (the list's tensors are modified)."""
    preds = [p.clone() for p in preds[1:]]
    for idx in range(len(preds) - 1):
        binary = preds[idx].squeeze(1).sigmoid() >= 0.5
        keep = (block_target(binary, boundary_width=1) != 1).unsqueeze(1)
        keep = F.interpolate(keep.float(), preds[idx + 1].shape[-2:], mode="bilinear", align_corners=True) >= 0.5
        coarse = F.interpolate(preds[idx], preds[idx + 1].shape[-2:], mode="bilinear", align_corners=True)
        preds[idx + 1][keep] = coarse[keep]
    return preds[-1]


def area_ratio(boxes: Tensor, gt_index: Tensor, masks: np.ndarray) -> Tensor:
    """``MaskIoUHead._get_area_ratio`` with ``BitmapMasks.crop``: numpy slicing of each box's crop."""
    out = []
    areas = masks.sum((1, 2))
    height, width = masks.shape[1:]
    for box, g in zip(boxes.numpy().astype(np.int32), gt_index.numpy()):
        box = box.copy()
        box[0::2] = np.clip(box[0::2], 0, width)
        box[1::2] = np.clip(box[1::2], 0, height)
        x1, y1, x2, y2 = box
        w, h = max(x2 - x1, 1), max(y2 - y1, 1)
        out.append(masks[g, y1:y1 + h, x1:x1 + w].sum() / (areas[g] + 1e-7))
    return torch.tensor(np.array(out), dtype=torch.float32)


def paste(masks: Tensor, boxes: Tensor, img_h: int, img_w: int) -> Tensor:
    """``_do_paste_mask`` without skip_empty: masks (N, 1, S, S) probabilities -> (N, img_h, img_w)."""
    x0, y0, x1, y1 = torch.split(boxes, 1, dim=1)
    img_y = torch.arange(0, img_h).float() + 0.5
    img_x = torch.arange(0, img_w).float() + 0.5
    img_y = (img_y - y0) / (y1 - y0) * 2 - 1
    img_x = (img_x - x0) / (x1 - x0) * 2 - 1
    img_x[torch.isinf(img_x)] = 0
    img_y[torch.isinf(img_y)] = 0
    n = masks.shape[0]
    gx = img_x[:, None, :].expand(n, img_y.size(1), img_x.size(1))
    gy = img_y[:, :, None].expand(n, img_y.size(1), img_x.size(1))
    return F.grid_sample(masks.float(), torch.stack([gx, gy], dim=3), align_corners=False)[:, 0]


def fcn_mask_head(sd: Weights, x: Tensor, num_convs: int = 4) -> Tensor:
    """``FCNMaskHead.forward``: ConvModules (conv with bias, ReLU), deconv ``upsample`` + ReLU, ``conv_logits``."""
    for i in range(num_convs):
        x = conv_module(x, sd, f"convs.{i}.", padding=1)
    x = F.relu(F.conv_transpose2d(x, sd["upsample.weight"], sd["upsample.bias"], stride=2))
    return conv(x, sd, "conv_logits.")


def mask_cross_entropy(pred: Tensor, target: Tensor, label: Tensor) -> Tensor:
    """mmdet's ``mask_cross_entropy`` (mean over the RoIs' pixels of their class's logits)."""
    inds = torch.arange(0, pred.size()[0], dtype=torch.long)
    return F.binary_cross_entropy_with_logits(pred[inds, label].squeeze(1), target, reduction="mean")[None]

"""The mask branch of Co-DINO-Inst, composed with a base detector inside ``CoDETR``.

Training (the release's ``CoDETR.forward_train`` with a ``mask_head``): the final decoder layer's
top ``train_rois`` (query, class) pairs, detached, are the candidate RoIs of each image; a max-IoU
assigner (IoU >= 0.5, no low-quality matches) and a random sampler (``roi_samples``, 25% positives,
ground-truth boxes added) pick the positives, which learn their assigned object's mask: RoI features
(RoIAlign 14x14 on the encoder level of each box) and the finest encoder map go through the
RefineMask head (boundary-aware loss), and the stage-1 logits with the RoI features through the mask
IoU head (MSE on the IoU of the binarised mask with the object's whole mask, positives of IoU > 0).

Inference (``simple_test_mask``): the final detections are the RoIs, with their predicted labels;
the stages from the second on are merged (:func:`~codetr.models.mask.boundary.refine_stages`), the
sigmoid pasted into the image as stored (the boxes mapped there, as the release pastes into
``ori_shape``) and binarised; a mask's score is its box score times the predicted IoU of its class
(``Detections.mask_scores``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from codetr.config import ModelConfig
from codetr.errors import UserError
from codetr.models.assigners import MaxIoUAssigner, RandomSampler
from codetr.models.aux.roi import multilevel_roi_align, rois_of
from codetr.models.mask.boundary import boundary_aware_loss, refine_stages
from codetr.models.mask.mask_iou import MaskIoUHead, area_ratios, mask_iou_targets
from codetr.models.mask.paste import crop_masks, paste_into_image
from codetr.models.mask.refine_head import RefineMaskHead
from codetr.structures import Detections, Target

# RoIs per mask-head call at inference (the release's interval, against memory overflow).
PREDICT_CHUNK = 150


class MaskBranch(nn.Module):
    """RoI mask head and mask IoU head on the encoder levels (``strides``: the encoder's level strides;
    the finest level is also the semantic map). ``loss_scale``: the auxiliary heads' ``dec_layers *
    lambda2``, which multiplies both loss weights as in the released config."""

    float32_methods = ("forward_train",)

    def __init__(self, cfg: ModelConfig, strides: list[int], loss_scale: float) -> None:
        super().__init__()
        m = cfg.mask
        self.cfg, self.strides, self.loss_scale = m, list(strides), loss_scale
        stage_classes = [cfg.num_classes] * len(m.stage_sizes)
        if m.class_agnostic_last:
            stage_classes[-1] = 1
        self.mask_head = RefineMaskHead(stage_classes, cfg.transformer.d_model, m.instance_convs, m.semantic_convs,
                                        tuple(m.stage_sizes), strides[0], tuple(m.dilations))
        self.mask_iou_head = MaskIoUHead(cfg.num_classes, cfg.transformer.d_model, m.stage_sizes[0], m.iou_convs, m.iou_fcs,
                                         m.iou_fc_dim) if m.mask_iou else None
        self.assigner = MaxIoUAssigner(0.5, 0.5, 0.5, match_low_quality=False)
        self.sampler = RandomSampler(m.roi_samples, 0.25, add_gt_as_proposals=True)

    def forward(self, maps: list[Tensor], rois: Tensor, labels: Tensor) -> tuple[list[Tensor], Tensor]:
        """maps: the encoder levels (B, C, H_l, W_l); rois (R, 5) (image index, xyxy pixels); labels (R,).
        Returns the stages' mask logits (R, 1, s, s) and the RoI features (R, C, s0, s0)."""
        feats = multilevel_roi_align(maps, self.strides, rois, self.cfg.finest_scale, self.cfg.stage_sizes[0])
        return self.mask_head(feats, maps[0], rois, labels), feats

    def forward_train(self, maps: list[Tensor], candidates: list[Tensor], targets: list[Target]) -> dict[str, Tensor]:
        """Losses ``mask.loss_mask`` (and ``mask.loss_mask_iou``) from candidate boxes (K_i, 4) xyxy
        pixels per image and targets with ``masks`` (N_i, h, w) in the frame of their boxes."""
        boxes, gt_index, labels, image = [], [], [], []
        for i, (cand, target) in enumerate(zip(candidates, targets)):
            if target.masks is None:
                raise UserError("model.mask is on but the training data has no instance masks (a target without "
                                "masks): train it on annotations with segmentations")
            sample = self.sampler(cand.detach(), self.assigner(cand.detach(), target.boxes), target.boxes)
            pos = sample.gt >= 0
            boxes.append(sample.boxes[pos])
            gt_index.append(sample.gt[pos])
            labels.append(target.labels[sample.gt[pos]])
            image.append(torch.full_like(sample.gt[pos], i))
        rois = rois_of(boxes)
        stage_logits, feats = self(maps, rois, torch.cat(labels))
        if not len(rois):  # every parameter still in the graph (distributed training needs it)
            zero = sum(logits.sum() * 0 for logits in stage_logits)
            losses = {"mask.loss_mask": zero}
            if self.mask_iou_head is not None:
                losses["mask.loss_mask_iou"] = zero + self.mask_iou_head(feats, stage_logits[1][:, 0]).sum() * 0
            return losses
        stage_targets = [torch.cat([crop_masks(t.masks, b, g, size) for t, b, g in zip(targets, boxes, gt_index)])
                         for size in self.cfg.stage_sizes]
        m = self.cfg
        loss_mask = boundary_aware_loss(stage_logits, stage_targets, m.stage_loss_weights, m.boundary_width)
        losses = {"mask.loss_mask": loss_mask * m.loss_weight * self.loss_scale}
        if self.mask_iou_head is not None:
            pos_labels = torch.cat(labels)
            iou_pred = self.mask_iou_head(feats, stage_logits[1][:, 0])[torch.arange(len(rois)), pos_labels]
            ratios = torch.cat([area_ratios(b, g, t.masks) for t, b, g in zip(targets, boxes, gt_index)])
            iou_target = mask_iou_targets(stage_logits[1][:, 0], stage_targets[1], ratios, m.threshold)
            keep = iou_target > 0
            loss_iou = ((iou_pred[keep] - iou_target[keep]) ** 2).mean() if keep.any() else iou_pred.sum() * 0
            losses["mask.loss_mask_iou"] = loss_iou * m.iou_loss_weight * self.loss_scale
        return losses

    @torch.inference_mode()
    def predict(self, maps: list[Tensor], image_sizes: Tensor, detections: list[Detections],
                targets: list[Target]) -> list[Detections]:
        """The detections (boxes xyxy pixels of each unpadded input image) with ``masks`` (K, H, W) bool in
        the image as stored (``Target.orig_size``, :func:`~codetr.models.mask.paste.paste_into_image`) and,
        with the mask IoU head, ``mask_scores`` (K,)."""
        out = []
        for i, (det, target) in enumerate(zip(detections, targets, strict=True)):
            input_size = tuple(int(v) for v in image_sizes[i])
            height, width = target.orig_size if min(target.orig_size) > 0 else input_size
            masks = torch.zeros((len(det.boxes), height, width), dtype=torch.bool, device=det.boxes.device)
            mask_scores = det.scores.clone()
            image_maps = [level[i:i + 1] for level in maps]
            for start in range(0, len(det.boxes), PREDICT_CHUNK):
                boxes, labels = det.boxes[start:start + PREDICT_CHUNK], det.labels[start:start + PREDICT_CHUNK]
                probs, iou = self.mask_probs(image_maps, boxes, labels)
                masks[start:start + PREDICT_CHUNK] = paste_into_image(probs, boxes, input_size, target,
                                                                      self.cfg.threshold)
                if iou is not None:
                    mask_scores[start:start + PREDICT_CHUNK] = iou * det.scores[start:start + PREDICT_CHUNK]
            out.append(Detections(det.boxes, det.scores, det.labels, masks,
                                  mask_scores if self.mask_iou_head is not None else None))
        return out

    def predict_tensors(self, maps: list[Tensor], boxes: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Tensor-only masks of a batch's detections (what the ONNX export runs): maps (B, C, H_l, W_l),
        boxes (B, K, 4) xyxy pixels of the input, labels (B, K) -> the merged mask probabilities (B, K, S, S)
        and the predicted IoU of each box's class (B, K) (ones without the mask IoU head)."""
        batch, k = boxes.shape[:2]
        index = torch.arange(batch, device=boxes.device, dtype=boxes.dtype).repeat_interleave(k)
        rois = torch.cat([index[:, None], boxes.reshape(-1, 4)], 1)
        flat = labels.reshape(-1)
        stage_logits, feats = self(maps, rois, flat)
        probs = refine_stages(stage_logits[1:])[:, 0].sigmoid()
        if self.mask_iou_head is None:
            iou = torch.ones_like(flat, dtype=probs.dtype)
        else:
            iou = self.mask_iou_head(feats, stage_logits[1][:, 0]).gather(1, flat[:, None])[:, 0]
        return probs.reshape(batch, k, *probs.shape[-2:]), iou.reshape(batch, k)

    def mask_probs(self, maps: list[Tensor], boxes: Tensor, labels: Tensor) -> tuple[Tensor, Tensor | None]:
        """One image's maps (1, C, H_l, W_l), boxes (K, 4) xyxy pixels and labels (K,) -> the merged mask
        probabilities (K, S, S) of the last stage and the predicted IoU of each box's class (K,) or None."""
        rois = rois_of([boxes])
        stage_logits, feats = self(maps, rois, labels)
        probs = refine_stages(stage_logits[1:])[:, 0].sigmoid()
        if self.mask_iou_head is None:
            return probs, None
        iou = self.mask_iou_head(feats, stage_logits[1][:, 0])[torch.arange(len(boxes)), labels]
        return probs, iou

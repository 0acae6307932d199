"""Pure-PyTorch stand-in for mmcv 1.x's compiled ``mmcv._ext``, installed as ``mmcv/_ext.py`` in the
reference environment by ``bench/release_reference/setup_env.py`` (it is never imported by codetr).

mmcv's ops modules ask ``mmcv._ext`` for a list of functions at import time; every name resolves here.
The ones a CPU training step of the released Co-DINO / Co-Deformable-DETR calls are implemented
(``nms`` for the RPN proposals and ``batched_nms``, ``roi_align_forward`` / ``roi_align_backward`` for
the RoI head's ``RoIAlign``, ``softnms`` for inference); any other raises when called. Multi-scale
deformable attention needs nothing: mmcv runs its PyTorch version on CPU tensors.
"""

from __future__ import annotations

import torch
from torchvision.ops import nms as tv_nms
from torchvision.ops import roi_align as tv_roi_align


def nms(boxes, scores, iou_threshold, offset=0):
    """Indices kept by greedy NMS (IoU > threshold suppresses), best score first. boxes (N, 4) xyxy;
    ``offset`` 1 adds one to widths and heights, as mmcv's kernel."""
    if offset:
        boxes = torch.cat([boxes[:, :2], boxes[:, 2:] + offset], 1)
    return tv_nms(boxes.float(), scores.float(), float(iou_threshold))


def softnms(boxes, scores, dets, iou_threshold, sigma, min_score, method, offset):
    """mmcv's CPU Soft-NMS, step by step: take the first best score at or after position i (swapping it
    there), decay every later box by its IoU with it, overwrite a box below ``min_score`` with the last one.
    Fills ``dets`` (N, 5) with the taken boxes and scores; returns the kept input indices."""
    x1, y1, x2, y2 = (boxes[:, k].clone() for k in range(4))
    score = scores.clone()
    area = (x2 - x1 + offset) * (y2 - y1 + offset)
    index = torch.arange(len(score))
    columns = (x1, y1, x2, y2, score, area, index)
    n, i = len(score), 0
    while i < n:
        best = i + int(torch.argmax(score[i:n]))  # first maximum, as the kernel's strict comparison
        for column in columns:
            column[i], column[best] = column[best].clone(), column[i].clone()
        dets[i] = torch.stack([x1[i], y1[i], x2[i], y2[i], score[i]])
        pos = i + 1
        while pos < n:
            w = (torch.minimum(x2[i], x2[pos]) - torch.maximum(x1[i], x1[pos]) + offset).clamp(min=0)
            h = (torch.minimum(y2[i], y2[pos]) - torch.maximum(y1[i], y1[pos]) + offset).clamp(min=0)
            inter = w * h
            overlap = inter / (area[i] + area[pos] - inter)
            if method == 2:
                weight = torch.exp(-(overlap * overlap) / sigma)
            elif overlap >= iou_threshold:
                weight = 1 - overlap if method == 1 else torch.zeros_like(overlap)
            else:
                weight = torch.ones_like(overlap)
            score[pos] = score[pos] * weight
            if score[pos] < min_score:
                for column in columns:
                    column[pos] = column[n - 1].clone()
                n -= 1
                continue
            pos += 1
        i += 1
    return index[:n]


def _roi_align(features, rois, aligned_height, aligned_width, spatial_scale, sampling_ratio, aligned):
    return tv_roi_align(features, rois, (aligned_height, aligned_width), spatial_scale, sampling_ratio, aligned)


def roi_align_forward(input, rois, output, argmax_y, argmax_x, aligned_height=7, aligned_width=7,
                      spatial_scale=1.0, sampling_ratio=0, pool_mode=1, aligned=True):
    """Average RoIAlign of ``input`` (B, C, H, W) over ``rois`` (K, 5) (batch index, xyxy) into ``output``."""
    if pool_mode != 1:
        raise NotImplementedError("the RoIAlign stand-in implements pool_mode 'avg' only")
    output.copy_(_roi_align(input, rois, aligned_height, aligned_width, spatial_scale, sampling_ratio, aligned))


def roi_align_backward(grad_output, rois, argmax_y, argmax_x, grad_input, aligned_height=7, aligned_width=7,
                       spatial_scale=1.0, sampling_ratio=0, pool_mode=1, aligned=True):
    """The gradient of :func:`roi_align_forward` with respect to its input, into ``grad_input`` (the op is
    linear in its input, so the gradient is taken at zero)."""
    with torch.enable_grad():
        probe = torch.zeros_like(grad_input, requires_grad=True)
        out = _roi_align(probe, rois, aligned_height, aligned_width, spatial_scale, sampling_ratio, aligned)
        (grad,) = torch.autograd.grad(out, probe, grad_output)
    grad_input.copy_(grad)


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)

    def missing(*args, **kwargs):
        raise NotImplementedError(f"mmcv._ext.{name} has no pure-PyTorch stand-in (codetr reference environment)")

    return missing

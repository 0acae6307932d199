"""Record the released Co-DINO-Inst mask branch (Sense-X/Co-DETR: ``SimpleRefineMaskHead``, ``MaskIoUHead``,
``BARCrossEntropyLoss``, the ``SingleRoIExtractor``, ``CoDETR._mask_forward_train`` and ``simple_test_mask``)
and the Co-Deformable-DETR mask config's ``FCNMaskHead`` path (``CoStandardRoIHead._mask_forward_train``) on
fixed weights and inputs, for tests/models/test_mask_release_parity.py. Runs inside the reference
environment that ``setup_env.py`` makes (not by CI); see docs/segmentation.md, "Parity with the release".

    ~/.cache/codetr-reference/venv/bin/python bench/release_reference/record_mask.py \\
        --release ~/.cache/codetr-reference/co-detr

The modules are built by the release from its configs (``co_dino_5scale_vit_large_coco_instance.py``,
``co_deformable_detr_mask_r50_1x_coco.py``) at the small sizes of tests/release_mask_inputs.py, weights
from :func:`release_parity.release_tensor` by their names in the release's detector. The release's own
methods run: ``CoDETR``'s are called on a module holding just the mask branch's parts. Writes
tests/data/release_parity/mask_refine.{json,pt} and mask_fcn.{json,pt}: losses, digests of the forward
outputs and of every gradient (parameters and input feature maps), the small outputs in full, and at test
time the pasted masks (bit-packed) and mask scores of each detection.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
REFINE_CONFIG = "projects/configs/co_dino_vit/co_dino_5scale_vit_large_coco_instance.py"
FCN_CONFIG = "projects/configs/co_deformable_detr/co_deformable_detr_mask_r50_1x_coco.py"


def load_weights(module: torch.nn.Module, prefix: str = "") -> None:
    """Every state-dict entry from ``release_tensor`` of its name in the release's detector."""
    from release_parity import release_tensor

    module.load_state_dict({k: release_tensor(prefix + k, tuple(v.shape)) for k, v in module.state_dict().items()})


def gradient_digests(module: torch.nn.Module, maps: list[torch.Tensor], prefix: str = "") -> dict[str, list[float]]:
    """The digest of each parameter's gradient (probe by its release name) and of each input level's."""
    from release_parity import digest, release_probe

    out = {prefix + k: digest(p.grad, release_probe(prefix + k, tuple(p.shape)))
           for k, p in module.named_parameters() if p.grad is not None}
    out.update({f"maps.{i}": digest(m.grad, release_probe(f"maps.{i}", tuple(m.shape))) for i, m in enumerate(maps)})
    return out


def output_digest(name: str, value: torch.Tensor) -> list[float]:
    from release_parity import digest, release_probe

    return digest(value.detach(), release_probe(f"output:{name}", tuple(value.shape)))


def gt_bitmaps(masks: torch.Tensor, canvas: tuple[int, int]):
    """The release's ``BitmapMasks`` of one image: its masks padded to the batch canvas, as its Pad does."""
    from mmdet.core import BitmapMasks

    h, w = masks.shape[-2:]
    padded = F.pad(masks, (0, canvas[1] - w, 0, canvas[0] - h)).numpy().astype(np.uint8)
    return BitmapMasks(padded, *canvas)


def sample(assigner, sampler, candidates, boxes, labels):
    """The release's assignment and sampling of one image's candidate RoIs (K, 5)."""
    return sampler.sample(assigner.assign(candidates, boxes, None, labels), candidates, boxes, labels)


def metas(inputs: dict, canvas: tuple[int, int]) -> list[dict]:
    return [{"img_shape": (h, w, 3), "ori_shape": (h, w, 3), "pad_shape": (*canvas, 3),
             "batch_input_shape": canvas, "scale_factor": np.ones(4, dtype=np.float32)} for h, w in inputs["sizes"]]


def build_refine_branch(release: Path):
    """A module holding the released instance config's mask RoI extractor, mask head and mask IoU head (at
    the parity sizes), its assigner and sampler, with ``CoDETR``'s mask methods."""
    from mmcv import Config
    from mmdet.core import build_assigner, build_sampler
    from mmdet.models import build_head, build_roi_extractor
    from projects.models.co_detr import CoDETR

    from release_mask_inputs import CHANNELS, IOU_FC, NUM_CLASSES

    cfg = Config.fromfile(str(release / REFINE_CONFIG)).model
    cfg.mask_roi_extractor.out_channels = CHANNELS
    cfg.mask_head.update(conv_in_channels_instance=CHANNELS, conv_in_channels_semantic=CHANNELS,
                         conv_out_channels_instance=CHANNELS, conv_out_channels_semantic=CHANNELS,
                         stage_num_classes=[NUM_CLASSES] * 3 + [1])
    cfg.mask_iou_head.update(in_channels=CHANNELS, conv_out_channels=CHANNELS, fc_out_channels=IOU_FC,
                             num_classes=NUM_CLASSES)

    class ReleaseMaskBranch(torch.nn.Module):
        _mask_forward = CoDETR._mask_forward
        _mask_forward_train = CoDETR._mask_forward_train
        simple_test_mask = CoDETR.simple_test_mask

        def __init__(self):
            super().__init__()
            self.mask_roi_extractor = build_roi_extractor(cfg.mask_roi_extractor)
            self.mask_head = build_head(cfg.mask_head)
            self.mask_iou_head = build_head(cfg.mask_iou_head)
            # CoDETR's train_cfg / test_cfg index 1: the mask branch's (index 0 is the query head's)
            self.rcnn_train_cfg, self.rcnn_test_cfg = cfg.train_cfg[1], cfg.test_cfg[1]
            self.bbox_assigner = build_assigner(self.rcnn_train_cfg.assigner)
            self.bbox_sampler = build_sampler(self.rcnn_train_cfg.sampler, context=self)

    branch = ReleaseMaskBranch()
    load_weights(branch)
    return branch


def capture(branch, captured: dict) -> None:
    """Keeps what ``_mask_forward`` returns (cloned: ``simple_test_mask`` merges the stages in place), the
    mask IoU head's predictions and targets, and what ``get_seg_masks`` is given."""
    forward, iou_forward, iou_targets = branch._mask_forward, branch.mask_iou_head.forward, branch.mask_iou_head.get_targets
    seg_masks = branch.mask_head.get_seg_masks

    def mask_forward(x, rois, labels):
        out = forward(x, rois, labels)
        captured.setdefault("forward", []).append({"rois": rois.detach().clone(), "labels": labels.clone(),
                                                   "stages": [p.detach().clone() for p in out["stage_instance_preds"]]})
        return out

    def iou_head(*args):
        out = iou_forward(*args)
        captured.setdefault("iou_pred", []).append(out.detach().clone())
        return out

    def targets(*args):
        out = iou_targets(*args)
        captured["iou_targets"] = out.detach().clone()
        return out

    def get_seg_masks(mask_pred, det_bboxes, *args):
        captured.setdefault("merged", []).append(mask_pred.detach().clone())
        return seg_masks(mask_pred, det_bboxes, *args)

    branch._mask_forward, branch.mask_iou_head.forward, branch.mask_iou_head.get_targets = mask_forward, iou_head, targets
    branch.mask_head.get_seg_masks = get_seg_masks


def record_refine_train(branch) -> tuple[dict, dict]:
    from release_mask_inputs import CANVAS, train_inputs

    inputs = train_inputs()
    maps = [m.clone().requires_grad_(True) for m in inputs["maps"]]
    torch.manual_seed(0)  # the sampler's negatives (unused by the mask branch)
    results = [sample(branch.bbox_assigner, branch.bbox_sampler, c, b, label)
               for c, b, label in zip(inputs["candidates"], inputs["boxes"], inputs["labels"])]
    gt_masks = [gt_bitmaps(m, CANVAS) for m in inputs["masks"]]
    captured: dict = {}
    capture(branch, captured)
    out = branch._mask_forward_train(maps, results, gt_masks, metas(inputs, CANVAS))
    losses = {**out["loss_mask"], **out["loss_mask_iou"]}
    sum(losses.values()).backward()
    [forward] = captured["forward"]
    stages = forward["stages"]
    summary = {"state_dict": {k: list(v.shape) for k, v in branch.state_dict().items()},
               "losses": {k: float(v) for k, v in losses.items()},
               "gradients": gradient_digests(branch, maps),
               "outputs": {f"stage{i}": output_digest(f"stage{i}", p) for i, p in enumerate(stages)},
               "num_rois": len(forward["rois"])}
    tensors = {"rois": forward["rois"], "roi_labels": forward["labels"], "stage0": stages[0],
               "iou_pred": captured["iou_pred"][0], "iou_targets": captured["iou_targets"],
               "pos_assigned_gt": torch.cat([r.pos_assigned_gt_inds for r in results])}
    return summary, tensors


def record_refine_test(branch) -> tuple[dict, dict]:
    """``simple_test_mask`` (rescale=True: the detections' boxes in the original image, pasted there) of
    each test image, one at a time (the release's configs test one image per GPU)."""
    from release_mask_inputs import NUM_CLASSES, inference_inputs

    summary, tensors = {}, {}
    for i, image in enumerate(inference_inputs()):
        (h, w), (oh, ow), scale = image["input_size"], image["orig_size"], image["scale"]
        meta = {"img_shape": (h, w, 3), "ori_shape": (oh, ow, 3), "pad_shape": (h, w, 3),
                "scale_factor": np.full(4, scale, dtype=np.float32)}
        det = torch.cat([image["boxes"] / torch.tensor(scale, dtype=torch.float32), image["scores"][:, None]], 1)
        captured: dict = {}
        capture(branch, captured)
        with torch.no_grad():
            [(segms, scores)] = branch.simple_test_mask(image["maps"], [meta], det[None], image["labels"][None],
                                                        rescale=True)
        # the release groups its results by class: back to the detections' order
        taken = [0] * NUM_CLASSES
        masks, mask_scores = [], []
        for label in image["labels"].tolist():
            masks.append(segms[label][taken[label]])
            mask_scores.append(float(scores[label][taken[label]]))
            taken[label] += 1
        masks = np.stack(masks).astype(bool)
        [forward] = captured["forward"]
        summary[f"test{i}"] = {"mask_pixels": masks.reshape(len(masks), -1).sum(1).tolist(),
                               "outputs": {f"stage{k}": output_digest(f"test{i}.stage{k}", p)
                                           for k, p in enumerate(forward["stages"])} |
                                          {"merged": output_digest(f"test{i}.merged", captured["merged"][0])}}
        tensors[f"test{i}.masks"] = torch.from_numpy(np.packbits(masks, axis=-1))
        tensors[f"test{i}.mask_scores"] = torch.tensor(mask_scores)
        tensors[f"test{i}.iou_pred"] = captured["iou_pred"][0]
    return summary, tensors


def record_fcn(release: Path) -> tuple[dict, dict]:
    """The Co-Deformable-DETR mask config's RoI head (``CoStandardRoIHead``) at the parity sizes: its
    ``_mask_forward_train`` on the positives of the same candidates."""
    from mmcv import Config
    from mmdet.models import build_head

    from release_mask_inputs import CANVAS, CHANNELS, FCN_STRIDES, NUM_CLASSES, feature_maps, train_inputs

    cfg = Config.fromfile(str(release / FCN_CONFIG)).model
    head_cfg = cfg.roi_head[0]
    head_cfg.bbox_roi_extractor.out_channels = head_cfg.mask_roi_extractor.out_channels = CHANNELS
    head_cfg.bbox_head.update(in_channels=CHANNELS, fc_out_channels=64, num_classes=NUM_CLASSES)
    head_cfg.mask_head.update(in_channels=CHANNELS, conv_out_channels=CHANNELS, num_classes=NUM_CLASSES)
    # CoDETR's train_cfg index 1 is the RPN and RoI head's (index 0 the query head's)
    head_cfg.update(train_cfg=cfg.train_cfg[1].rcnn, test_cfg=cfg.test_cfg[1].rcnn)
    head = build_head(head_cfg)
    load_weights(head, "roi_head.0.")
    inputs = train_inputs()
    maps = [m.requires_grad_(True) for m in feature_maps(len(inputs["sizes"]), *CANVAS, seed=33, strides=FCN_STRIDES)]
    torch.manual_seed(0)
    results = [sample(head.bbox_assigner, head.bbox_sampler, c, b, label)
               for c, b, label in zip(inputs["candidates"], inputs["boxes"], inputs["labels"])]
    gt_masks = [gt_bitmaps(m, CANVAS) for m in inputs["masks"]]
    out = head._mask_forward_train(maps, results, None, gt_masks, metas(inputs, CANVAS))
    loss = out["loss_mask"]["loss_mask"]
    loss.backward()
    summary = {"state_dict": {f"roi_head.0.{k}": list(v.shape) for k, v in head.state_dict().items()},
               "losses": {"loss_mask": float(loss)}, "gradients": gradient_digests(head, maps, "roi_head.0."),
               "outputs": {"mask_pred": output_digest("fcn.mask_pred", out["mask_pred"])}}
    rois = torch.cat([torch.cat([torch.full((len(r.pos_bboxes), 1), float(i)), r.pos_bboxes], 1)
                      for i, r in enumerate(results)])
    tensors = {"rois": rois, "mask_targets": out["mask_targets"].detach().bool(),
               "pos_assigned_gt": torch.cat([r.pos_assigned_gt_inds for r in results])}
    return summary, tensors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--release", type=Path, default=Path.home() / ".cache/codetr-reference/co-detr",
                        help="the Sense-X/Co-DETR sources (setup_env.py puts them here)")
    parser.add_argument("--out", type=Path, default=REPO / "tests/data/release_parity")
    args = parser.parse_args()
    release = args.release.resolve()
    sys.path[:0] = [str(release), str(REPO / "tests")]
    import mmcv

    import projects.models  # noqa: F401  (registers the Co-DETR modules and LN2d)

    versions = {"torch": torch.__version__, "mmcv": mmcv.__version__}
    branch = build_refine_branch(release)
    train, train_tensors = record_refine_train(branch)
    test, test_tensors = record_refine_test(build_refine_branch(release))
    fcn, fcn_tensors = record_fcn(release)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, summary, tensors, config in (("mask_refine", {"train": train, **test}, {**train_tensors, **test_tensors},
                                            REFINE_CONFIG), ("mask_fcn", fcn, fcn_tensors, FCN_CONFIG)):
        summary = {"config": config, **versions, **summary}
        (args.out / f"{name}.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
        torch.save(tensors, args.out / f"{name}.pt")
    print(f"mask_refine: losses {train['losses']}, {train['num_rois']} RoIs; mask_fcn: losses {fcn['losses']} "
          f"-> {args.out}")


if __name__ == "__main__":
    main()

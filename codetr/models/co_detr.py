"""Collaborative hybrid assignments training (Co-DETR) around any base DETR detector.

Training step (the paper's Fig. 3, as released), for a base detector ``detector``
(Deformable-DETR or DINO; or the single-scale Conditional DETR and DAB-DETR, for which the paper
builds the pyramid from the one encoder map, Sec. 3.2):

1. the base detector's own forward and one-to-one losses (``detector.detr_loss``), which also
   give the encoder output;
2. the encoder memory becomes a feature pyramid (plus one stride-2 level) for the auxiliary
   one-to-many heads (Faster R-CNN, ATSS; repeats allowed), whose losses, scaled by
   ``dec_layers * lambda2``, flow back into the encoder and backbone;
3. each auxiliary head's assigned boxes become a group of customized positive queries that run
   through the shared decoder once per head, with the base detector's losses (times
   ``lambda1``) against the auxiliary assignment.

At inference only the base detector runs (or one auxiliary head, with ``eval_head``), and its
weights keep the base detector's names: a Co- model's weights are the plain model's plus
``adapter.*``, ``aux_heads.*`` and ``positive_queries.*``, so either loads into the other.

With a mask branch (``model.mask``, :class:`~codetr.models.mask.branch.MaskBranch`; Co-DINO-Inst) the
training step also learns instance masks on RoIs from the detached final predictions, and inference
adds the masks of the final detections; its weights (``mask_branch.*``) are kept for inference.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from codetr.config import ModelConfig
from codetr.models.base import BASE, MASK_BRANCH, TRAINING_ONLY, AuxHead, BaseDetector
from codetr.models.deformable_detr import EncoderOutput
from codetr.models.mask.branch import MaskBranch
from codetr.models.necks.channel_mapper import PyramidAdapter, SingleScaleAdapter, memory_to_maps
from codetr.models.positive_queries import select_positive_queries
from codetr.structures import Batch, Detections


def head_tags(names: list[str]) -> list[str]:
    """A name per auxiliary head for its loss keys: its type, plus its index when repeated."""
    return [name if names.count(name) == 1 else f"{name}{i}" for i, name in enumerate(names)]


class CoDETR(nn.Module):
    """A base DETR detector with auxiliary one-to-many heads and customized positive queries.

    detector: the base detector (:class:`~codetr.models.base.BaseDetector`). aux_heads: one
    :class:`~codetr.models.base.AuxHead` per name of ``cfg.co.aux_heads``, in that order, built on
    the pyramid of :meth:`aux_strides` (:func:`codetr.models.build.build_aux_head`). queries: the
    positive-query embedding (``forward(head, reference, feats) -> (query, query_pos or None)``), or
    None to train the auxiliary heads without positive queries. mask_branch: the instance-mask branch
    on the encoder levels, or None (a box-only model: no ``mask_branch.*`` weights, no masks).
    """

    def __init__(self, detector: BaseDetector, cfg: ModelConfig, aux_heads: Sequence[AuxHead],
                 queries: nn.Module | None, mask_branch: MaskBranch | None = None) -> None:
        super().__init__()
        co = cfg.co
        if not co.aux_heads:
            raise ValueError("Co-DETR needs at least one auxiliary head in model.co.aux_heads")
        if len(aux_heads) != len(co.aux_heads):
            raise ValueError(f"{len(aux_heads)} auxiliary heads for model.co.aux_heads={co.aux_heads}")
        if co.eval_head != "detr" and co.eval_head not in co.aux_heads:
            raise ValueError(f"model.co.eval_head={co.eval_head!r} is not among model.co.aux_heads={co.aux_heads}")
        if co.eval_head != "detr" and co.aux_heads.count(co.eval_head) > 1:
            raise ValueError(f"model.co.eval_head={co.eval_head!r} is ambiguous: model.co.aux_heads={co.aux_heads} "
                             "lists it more than once")
        self.cfg, self.co = cfg, co
        self.detector = detector
        # one encoder level (Conditional DETR, DAB-DETR): a pyramid made from it; else the levels plus one
        single = len(detector.level_strides) == 1
        self.adapter = (SingleScaleAdapter if single else PyramidAdapter)(cfg.transformer.d_model)
        self.aux_heads = nn.ModuleList(aux_heads)
        self.tags = head_tags(co.aux_heads)
        self.positive_queries = queries
        self.mask_branch = mask_branch  # None: a box-only model, whose state-dict keys stay those without it
        # The base detector's weights keep their own names (no "detector." prefix) in state dicts.
        self.register_state_dict_post_hook(_drop_base_prefix)
        self.register_load_state_dict_pre_hook(_add_base_prefix)
        self.register_load_state_dict_post_hook(_report_without_base_prefix)

    @staticmethod
    def aux_strides(detector: BaseDetector) -> list[int]:
        """The strides of the auxiliary heads' pyramid: the encoder levels', plus one level at twice the
        last; for a single-scale encoder, the single-scale adapter's (s/4 ... 4s)."""
        strides = detector.level_strides
        if len(strides) == 1:
            return SingleScaleAdapter.strides(strides[0])
        return strides + [strides[-1] * 2]

    @staticmethod
    def aux_loss_scale(cfg: ModelConfig) -> float:
        """The weight of the auxiliary heads' losses: ``dec_layers * lambda2``."""
        return cfg.transformer.dec_layers * cfg.co.lambda2

    def inference_state_dict(self) -> dict[str, Tensor]:
        """The base detector's inference weights (plus the evaluated auxiliary head, if not "detr")."""
        state = self.detector.inference_state_dict()
        if self.co.eval_head != "detr":
            index = self.co.aux_heads.index(self.co.eval_head)
            state.update({k: v for k, v in self.state_dict().items() if k.startswith(("adapter.", f"aux_heads.{index}."))})
        if self.mask_branch is not None:
            state.update({k: v for k, v in self.state_dict().items() if k.startswith(MASK_BRANCH)})
        return state

    def aux_pyramid(self, enc: EncoderOutput) -> list[Tensor]:
        """Encoder memory as per-level maps (B, d, H_l, W_l) plus one stride-2 level (single-scale: the
        adapter's five levels)."""
        return self.adapter(enc.memory, enc.spatial_shapes)

    def loss(self, batch: Batch) -> dict[str, Tensor]:
        losses, enc, out = self.detector.detr_loss(batch)
        pyramid = self.aux_pyramid(enc)
        if self.mask_branch is not None:
            with torch.no_grad():  # the release's RoIs: the top-k final predictions, detached
                candidates = self.detector.postprocess(out.logits[-1].detach(), out.boxes[-1].detach(),
                                                       batch.image_sizes, top_k=self.cfg.mask.train_rois or self.cfg.max_detections)[0]
            losses.update(self.mask_branch.forward_train(pyramid[:-1], list(candidates), batch.targets))
        for index, (tag, head) in enumerate(zip(self.tags, self.aux_heads, strict=True)):
            head_losses, positive_sets = head.forward_train(pyramid, batch.image_sizes, batch.targets)
            if tag != self.co.aux_heads[index]:  # a repeated type: "atss.loss_cls" -> "atss1.loss_cls"
                head_losses = {k.replace(".", f"{index}.", 1): v for k, v in head_losses.items()}
            losses.update(head_losses)
            if self.positive_queries is None:
                continue
            group = select_positive_queries(
                positive_sets, batch.image_sizes, self.cfg.num_classes,
                max_queries=self.co.max_pos_queries, min_queries=self.co.min_pos_queries,
                zero_padding=self.co.zero_padding,
            )
            query, query_pos = self.positive_queries(index, group.reference, group.feats)
            mask = group.self_attn_mask
            if mask is not None:  # (B, G, G) -> (B * heads, G, G)
                mask = mask.repeat_interleave(self.cfg.transformer.n_heads, dim=0)
            aux_out = self.detector.decode(enc, query, query_pos, group.reference, self_attn_mask=mask)
            aux_losses = self.detector.criterion.assigned_loss(
                aux_out.logits, aux_out.boxes, group.labels, group.target_boxes,
                group.label_weights, group.box_weights, suffix=f"_pos_{tag}",
            )
            losses.update({k: v * self.co.lambda1 for k, v in aux_losses.items()})
        return losses

    def predict_tensors(self, images: Tensor, masks: Tensor, image_sizes: Tensor) -> tuple[Tensor, ...]:
        """The base detector's tensor-only inference (what the ONNX export runs): boxes, scores, labels (see
        ``BaseDetector.predict_tensors``); with the mask branch also the mask probabilities (B, K, S, S) of each
        of those boxes in its box and their predicted IoU (B, K) (:meth:`MaskBranch.predict_tensors`)."""
        if self.mask_branch is None:
            return self.detector.predict_tensors(images, masks, image_sizes)
        out, enc = self.detector(images, masks)
        # the same top-k twice: boxes in the frame asked for, and in the input's for the RoIs
        boxes, scores, labels = self.detector.postprocess(out.logits[-1], out.boxes[-1], image_sizes)
        input_sizes = torch.stack([(~masks[:, :, 0]).sum(1), (~masks[:, 0, :]).sum(1)], 1)
        rois = self.detector.postprocess(out.logits[-1], out.boxes[-1], input_sizes)[0]
        probs, iou = self.mask_branch.predict_tensors(memory_to_maps(enc.memory, enc.spatial_shapes), rois, labels)
        return boxes, scores, labels, probs, iou

    @torch.inference_mode()
    def predict(self, batch: Batch) -> list[Detections]:
        if self.co.eval_head == "detr" and self.mask_branch is not None:
            detections, enc = self.detector.detect(batch)
            return self.mask_branch.predict(memory_to_maps(enc.memory, enc.spatial_shapes), batch.image_sizes,
                                            detections, batch.targets)
        if self.co.eval_head == "detr":
            return self.detector.predict(batch)
        head = self.aux_heads[self.co.aux_heads.index(self.co.eval_head)]
        enc = self.detector.encode_images(batch.images, batch.masks)
        return head.predict(self.aux_pyramid(enc), batch.image_sizes)


def _drop_base_prefix(module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    for key in [k for k in state if k.startswith(prefix + BASE)]:
        state[prefix + key[len(prefix + BASE):]] = state.pop(key)


def _add_base_prefix(module: nn.Module, state: dict[str, Any], prefix: str, *args: Any) -> None:
    for key in [k for k in state if k.startswith(prefix) and not k.startswith(prefix + BASE)]:
        if not key[len(prefix):].startswith((*TRAINING_ONLY, MASK_BRANCH)):
            state[prefix + BASE + key[len(prefix):]] = state.pop(key)


def _report_without_base_prefix(module: nn.Module, incompatible: Any) -> None:
    for keys in (incompatible.missing_keys, incompatible.unexpected_keys):
        keys[:] = [k.replace(BASE, "", 1) if k.startswith(BASE) else k for k in keys]

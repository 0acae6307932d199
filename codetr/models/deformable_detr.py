"""Deformable-DETR as configured in Co-DETR: two-stage, iterative box refinement, mixed query
selection and look-forward-twice, each a switch in ``TransformerConfig``.

The transformer pass is split into named steps so variants (Co-DETR's positive queries,
DINO) override or reuse one step:

    extract_features -> encode -> select_queries -> decode
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert

from codetr.config import ModelConfig
from codetr.models.activation_checkpoint import maybe_checkpoint
from codetr.models.backbones.build import build_backbone
from codetr.models.losses.detr_loss import DetrCriterion
from codetr.models.necks.channel_mapper import build_neck
from codetr.models.transformer.decoder import DeformableDecoderLayer
from codetr.models.transformer.encoder import DeformableEncoder, check_with_cp
from codetr.models.transformer.mlp import mlp
from codetr.models.transformer.position import proposal_pos_embed, sine_position_embedding
from codetr.ops.boxes import inverse_sigmoid
from codetr.structures import Batch, Detections, DetrOutput


@dataclass
class EncoderOutput:
    """The encoder's memory and what the decoder needs to attend to it.

    memory:         (B, S, d) encoded tokens of all levels, flattened row-major level by level.
    spatial_shapes: (H_l, W_l) of each level.
    valid_ratios:   (B, levels, 2) valid (unpadded) fraction of each level, as (w, h).
    padding_mask:   (B, S) bool, True on padding tokens.
    """

    memory: Tensor
    spatial_shapes: list[tuple[int, int]]
    valid_ratios: Tensor
    padding_mask: Tensor


@dataclass
class QuerySet:
    """Decoder queries. query, query_pos (B, Q, d) (query_pos None when the decoder builds it from
    the reference, as DINO's); reference (B, Q, 4) cxcywh or (B, Q, 2) xy, normalised.
    enc_logits (B, S, C) / enc_boxes (B, S, 4) are the two-stage proposals (DINO: the selected
    top-k), if any."""

    query: Tensor
    query_pos: Tensor | None
    reference: Tensor
    enc_logits: Tensor | None = None
    enc_boxes: Tensor | None = None


def box_branch(d_model: int) -> nn.Sequential:
    """Linear-ReLU-Linear-ReLU-Linear(4): box deltas in logit space."""
    return mlp(d_model, d_model, 4, 3)


def refine(delta: Tensor, reference: Tensor) -> Tensor:
    """Box from deltas (B, Q, 4) relative to a reference (B, Q, 4 cxcywh, or 2 xy), both normalised."""
    if reference.shape[-1] == 4:
        return (delta + inverse_sigmoid(reference)).sigmoid()
    return torch.cat([delta[..., :2] + inverse_sigmoid(reference), delta[..., 2:]], -1).sigmoid()


def level_masks(masks: Tensor, feats: list[Tensor]) -> list[Tensor]:
    """Padding mask (B, H, W) resized (nearest) to each feature map (B, C, H_l, W_l)."""
    return [F.interpolate(masks[None].float(), size=f.shape[-2:])[0].bool() for f in feats]


def valid_ratio(mask: Tensor) -> Tensor:
    """(B, H, W) padding mask -> (B, 2) fraction of valid columns and rows, as (w, h)."""
    _, h, w = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1).float() / h
    valid_w = (~mask[:, 0, :]).sum(1).float() / w
    return torch.stack([valid_w, valid_h], -1)


class DeformableDETR(nn.Module):
    """Backbone + channel mapper + deformable encoder/decoder + class/box branches + loss."""

    class_layers = ("class_branches",)  # follow the number of classes (codetr.models.base)

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        t = cfg.transformer
        if t.two_stage and not t.box_refine:
            raise ValueError("model.transformer.two_stage needs model.transformer.box_refine")
        self.backbone = build_backbone(cfg.backbone)
        self.neck = build_neck(cfg, self.backbone.out_channels)
        self.level_embed = nn.Parameter(torch.empty(t.num_feature_levels, t.d_model))
        self.encoder = DeformableEncoder(t.enc_layers, t.d_model, t.ffn_dim, t.num_feature_levels, t.n_heads,
                                         t.n_points, t.dropout, t.enc_with_cp)
        check_with_cp("dec", t.dec_with_cp)
        self.decoder_layers = nn.ModuleList(
            DeformableDecoderLayer(t.d_model, t.ffn_dim, t.num_feature_levels, t.n_heads, t.n_points, t.dropout)
            for _ in range(t.dec_layers))
        # One class/box branch per decoder layer (+1 for the two-stage proposals); shared when
        # there is no box refinement.
        num_branches = t.dec_layers + (1 if t.two_stage else 0)
        cls, box = nn.Linear(t.d_model, cfg.num_classes), box_branch(t.d_model)
        copies = (lambda m: [copy.deepcopy(m) for _ in range(num_branches)]) if t.box_refine else \
            (lambda m: [m] * num_branches)
        self.class_branches = nn.ModuleList(copies(cls))
        self.box_branches = nn.ModuleList(copies(box))
        self.build_query_parts()
        self.criterion = DetrCriterion(cfg.num_classes, cfg.loss, class_agnostic_proposals=True)
        self.reset_parameters()

    def build_query_parts(self) -> None:
        """The layers that make the initial decoder queries: the two-stage proposal head (with the
        learned content of mixed selection), or learned queries with 2-d references."""
        t = self.cfg.transformer
        if t.two_stage:
            self.enc_output = nn.Linear(t.d_model, t.d_model)
            self.enc_output_norm = nn.LayerNorm(t.d_model)
            self.pos_trans = nn.Linear(2 * t.d_model, 2 * t.d_model)
            self.pos_trans_norm = nn.LayerNorm(2 * t.d_model)
            if t.mixed_selection:
                self.query_embedding = nn.Embedding(t.num_queries, t.d_model)
        else:
            self.query_embedding = nn.Embedding(t.num_queries, 2 * t.d_model)
            self.reference_points = nn.Linear(t.d_model, 2)

    def transformer_parts(self) -> list[nn.Module]:
        """The modules of the official ``transformer`` (xavier-initialised weight matrices)."""
        parts: list[nn.Module] = [self.encoder, self.decoder_layers]
        if self.cfg.transformer.two_stage:
            return parts + [self.enc_output, self.pos_trans]
        return parts + [self.reference_points]

    def reset_parameters(self) -> None:
        """Official init: xavier for the transformer, deformable-attention init, focal prior for
        the class bias, zero last box layer (w/h bias -2 without two-stage)."""
        t = self.cfg.transformer
        for part in self.transformer_parts():
            for p in part.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        if not t.two_stage:
            nn.init.zeros_(self.reference_points.bias)
        for m in self.modules():
            if hasattr(m, "sampling_offsets"):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)
        prior_bias = -math.log((1 - 0.01) / 0.01)
        for cls in self.class_branches:
            nn.init.constant_(cls.bias, prior_bias)
        for box in self.box_branches:
            nn.init.zeros_(box[-1].weight)
            nn.init.zeros_(box[-1].bias)
        if not t.two_stage:
            nn.init.constant_(self.box_branches[0][-1].bias[2:], -2.0)

    @property
    def level_strides(self) -> list[int]:
        """Stride of each encoder level: the first neck map's (the simple feature pyramid's p2: 4; else
        the first backbone map's), doubling level by level."""
        first = 4 if self.cfg.neck == "sfp" else 4 * 2 ** self.cfg.backbone.out_indices[0]
        return [first * 2**i for i in range(self.cfg.transformer.num_feature_levels)]

    # ---- the transformer pass, step by step ----------------------------------------------

    def extract_features(self, images: Tensor, masks: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """images (B, 3, H, W), masks (B, H, W) True on padding -> neck maps (B, d, H_l, W_l)
        and their padding masks (B, H_l, W_l)."""
        feats = self.neck(self.backbone(images))
        return feats, level_masks(masks, feats)

    def encode(self, feats: list[Tensor], masks: list[Tensor]) -> EncoderOutput:
        """Flatten the levels, add sine + level position embeddings, run the encoder."""
        t = self.cfg.transformer
        pos = [sine_position_embedding(m, t.d_model // 2, t.pos_temperature, t.pos_offset).flatten(2).transpose(1, 2)
               + self.level_embed[i] for i, m in enumerate(masks)]
        src = torch.cat([f.flatten(2).transpose(1, 2) for f in feats], 1)
        padding_mask = torch.cat([m.flatten(1) for m in masks], 1)
        spatial_shapes = [(f.shape[-2], f.shape[-1]) for f in feats]
        valid_ratios = torch.stack([valid_ratio(m) for m in masks], 1)
        memory = self.encoder(src, torch.cat(pos, 1), spatial_shapes, valid_ratios, padding_mask)
        return EncoderOutput(memory, spatial_shapes, valid_ratios, padding_mask)

    def encoder_proposals(self, enc: EncoderOutput) -> tuple[Tensor, Tensor]:
        """Two-stage: one proposal per valid token (its pixel centre, size 0.05 * 2^level).

        Returns the transformed memory (B, S, d) and proposal logits (B, S, 4) (inverse
        sigmoid of cxcywh; +inf for padding and proposals too close to the border)."""
        batch = enc.memory.shape[0]
        proposals, start = [], 0
        for level, (h, w) in enumerate(enc.spatial_shapes):
            mask = enc.padding_mask[:, start:start + h * w].view(batch, h, w)
            start += h * w
            valid_h, valid_w = (~mask[:, :, 0]).sum(1), (~mask[:, 0, :]).sum(1)
            ys, xs = torch.meshgrid(torch.arange(h, dtype=enc.memory.dtype, device=mask.device),
                                    torch.arange(w, dtype=enc.memory.dtype, device=mask.device), indexing="ij")
            grid = torch.stack([xs, ys], -1)[None] + 0.5
            grid = grid / torch.stack([valid_w, valid_h], -1).view(batch, 1, 1, 2)
            wh = torch.full_like(grid, 0.05 * 2.0**level)
            proposals.append(torch.cat([grid, wh], -1).view(batch, -1, 4))
        proposals = torch.cat(proposals, 1)
        valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
        logits = torch.log(proposals / (1 - proposals))
        invalid = enc.padding_mask.unsqueeze(-1) | ~valid
        logits = logits.masked_fill(invalid, float("inf"))
        memory = enc.memory.masked_fill(invalid, 0.0)
        return self.enc_output_norm(self.enc_output(memory)), logits

    def select_queries(self, enc: EncoderOutput) -> QuerySet:
        """Initial decoder queries: the top-k encoder proposals (two-stage; content from the
        learned query embedding with mixed selection) or learned queries with 2-d references."""
        t = self.cfg.transformer
        batch, d = enc.memory.shape[0], t.d_model
        if not t.two_stage:
            query_pos, query = self.query_embedding.weight.split(d, dim=1)
            query_pos = query_pos.unsqueeze(0).expand(batch, -1, -1)
            query = query.unsqueeze(0).expand(batch, -1, -1)
            return QuerySet(query, query_pos, self.reference_points(query_pos).sigmoid())
        memory, proposals = self.encoder_proposals(enc)
        enc_logits = self.class_branches[-1](memory)
        enc_coords = self.box_branches[-1](memory) + proposals
        k = min(t.num_queries, enc_logits.shape[1])
        top = torch.topk(enc_logits[..., 0], k, dim=1)[1]
        top_coords = torch.gather(enc_coords, 1, top.unsqueeze(-1).expand(-1, -1, 4)).detach()
        pos_query = self.pos_trans_norm(self.pos_trans(proposal_pos_embed(top_coords, d // 2)))
        query_pos, query = pos_query.split(d, dim=-1)
        if t.mixed_selection:
            query = self.query_embedding.weight[:k].unsqueeze(0).expand(batch, -1, -1)
        return QuerySet(query, query_pos, top_coords.sigmoid(), enc_logits, enc_coords.sigmoid())

    def decode(self, enc: EncoderOutput, query: Tensor, query_pos: Tensor | None, reference: Tensor,
               self_attn_mask: Tensor | None = None) -> DetrOutput:
        """Run the decoder from the given queries; predictions of every layer.

        query, query_pos (B, Q, d); reference (B, Q, 4) cxcywh or (B, Q, 2) xy, normalised;
        self_attn_mask (Q, Q) or (B * heads, Q, Q), True = blocked. With box refinement each
        layer refines the previous layer's boxes (detached for sampling; with look-forward-twice
        the next layer's prediction still back-propagates into this one).
        """
        if query_pos is None:
            raise ValueError("Deformable-DETR's decoder needs the query position")
        t = self.cfg.transformer
        ratios4 = torch.cat([enc.valid_ratios, enc.valid_ratios], -1)
        sample_ref = head_ref = reference
        hidden = query
        logits, boxes = [], []
        for i, layer in enumerate(self.decoder_layers):
            ratios = ratios4 if sample_ref.shape[-1] == 4 else enc.valid_ratios
            hidden = maybe_checkpoint(layer, hidden, query_pos, sample_ref[:, :, None] * ratios[:, None], enc.memory,
                                      enc.spatial_shapes, enc.padding_mask, self_attn_mask, enabled=i < t.dec_with_cp)
            delta = self.box_branches[i](hidden)
            logits.append(self.class_branches[i](hidden))
            boxes.append(refine(delta, head_ref))
            if t.box_refine:
                new_ref = refine(delta, sample_ref)
                sample_ref = new_ref.detach()
                head_ref = new_ref if t.look_forward_twice else sample_ref
        return DetrOutput(torch.stack(logits), torch.stack(boxes))

    def encode_images(self, images: Tensor, masks: Tensor) -> EncoderOutput:
        """images (B, 3, H, W), masks (B, H, W) True on padding -> the encoder output."""
        return self.encode(*self.extract_features(images, masks))

    def forward(self, images: Tensor, masks: Tensor) -> tuple[DetrOutput, EncoderOutput]:
        """images (B, 3, H, W), masks (B, H, W) True on padding -> predictions of every decoder
        layer (with the two-stage proposals) and the encoder output."""
        enc = self.encode_images(images, masks)
        queries = self.select_queries(enc)
        out = self.decode(enc, queries.query, queries.query_pos, queries.reference)
        out.enc_logits, out.enc_boxes = queries.enc_logits, queries.enc_boxes
        return out, enc

    # ---- the detector API -------------------------------------------------------------------

    def detr_loss(self, batch: Batch) -> tuple[dict[str, Tensor], EncoderOutput, DetrOutput]:
        """The one-to-one losses of a training batch, the encoder output and the decoder's predictions
        (for Co-DETR's auxiliary heads and mask branch)."""
        out, enc = self(batch.images, batch.masks)
        return self.criterion(out, batch.targets, batch.image_sizes), enc, out

    def loss(self, batch: Batch) -> dict[str, Tensor]:
        """Weighted loss terms of a training batch; the total is their sum."""
        return self.detr_loss(batch)[0]

    @torch.inference_mode()
    def predict(self, batch: Batch) -> list[Detections]:
        """Top ``max_detections`` (query, class) pairs by sigmoid score, no NMS; boxes xyxy in
        pixels of each unpadded input image, clipped to it."""
        return self.detect(batch)[0]

    def detect(self, batch: Batch) -> tuple[list[Detections], EncoderOutput]:
        """:meth:`predict`'s detections per image, and the encoder output they came from."""
        out, enc = self(batch.images, batch.masks)
        boxes, scores, labels = self.postprocess(out.logits[-1], out.boxes[-1], batch.image_sizes)
        return [self.finish(Detections(*per_image)) for per_image in zip(boxes, scores, labels)], enc

    def finish(self, det: Detections) -> Detections:
        """The last inference step on one image's top-k, outside the exported graph: none here."""
        return det

    def predict_tensors(self, images: Tensor, masks: Tensor, image_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Inference with tensors in and out (what ``predict`` and the ONNX export run).

        images (B, 3, H, W) normalised, masks (B, H, W) True on padding, image_sizes (B, 2) (h, w)
        of the frame the boxes are returned in (the unpadded input image, or the original image:
        the boxes are normalised until scaled by it). Returns :meth:`postprocess`'s tensors.
        """
        out, _ = self(images, masks)
        return self.postprocess(out.logits[-1], out.boxes[-1], image_sizes)

    def postprocess(self, logits: Tensor, boxes: Tensor, image_sizes: Tensor,
                    top_k: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Top-k over the sigmoid scores of every (query, class) pair, as tensor ops only.

        logits (B, Q, C), boxes (B, Q, 4) cxcywh normalised, image_sizes (B, 2) (h, w).
        Returns boxes (B, K, 4) xyxy in pixels of image_sizes, clipped to them; scores (B, K)
        descending; labels (B, K) int64; K = min(top_k or max_detections, Q * C).
        """
        num_classes = logits.shape[-1]
        scores = logits.sigmoid().flatten(1)
        k = min(top_k or self.cfg.max_detections, scores.shape[1])
        top_scores, top = scores.topk(k, dim=1)
        query, label = top // num_classes, top % num_classes
        xyxy = box_convert(torch.gather(boxes, 1, query.unsqueeze(-1).expand(-1, -1, 4)), "cxcywh", "xyxy")
        h, w = image_sizes[:, 0:1].to(xyxy), image_sizes[:, 1:2].to(xyxy)
        scale = torch.stack([w, h, w, h], -1)  # (B, 1, 4)
        return (xyxy * scale).clamp(min=0).minimum(scale), top_scores, label

    def inference_state_dict(self) -> dict[str, Tensor]:
        """Everything is needed at inference."""
        return self.state_dict()

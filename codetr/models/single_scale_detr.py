"""What Conditional DETR and DAB-DETR share: single-scale DETRs on the backbone's last map.

Backbone (one map, C5) -> 1x1 input projection -> sine positions -> standard multi-head attention
encoder -> a decoder of conditional layers (``codetr.models.transformer.conditional``) -> class and
box branches shared by every decoder layer (on the decoder's final LayerNorm) -> focal loss with
Hungarian matching on every layer. The detectors differ in their queries and their decoder pass
(``select_queries``, ``decode``): ``ConditionalDETR`` (codetr.models.conditional_detr) and
``DABDETR`` (codetr.models.dab_detr).

The detector API (``detr_loss``, ``predict``, ``detect``, ``predict_tensors``, ``postprocess``: top-k over
(query, class) sigmoid scores, no NMS) is Deformable-DETR's, one definition for both families.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor, nn

from codetr.config import ModelConfig
from codetr.models.backbones.build import build_backbone
from codetr.models.deformable_detr import DeformableDETR, EncoderOutput, box_branch, level_masks, valid_ratio
from codetr.models.losses.detr_loss import DetrCriterion
from codetr.models.transformer.conditional import ConditionalDecoderLayer, DetrEncoder
from codetr.models.transformer.mlp import mlp
from codetr.models.transformer.position import sine_position_embedding
from codetr.structures import DetrOutput


class SingleScaleDETR(nn.Module):
    """Backbone + input projection + encoder + conditional decoder layers + shared class/box branches + loss.

    Subclasses set ``activation`` (the FFNs') and ``scale_encoder_positions``, and define
    ``build_query_parts()`` (their query layers), ``select_queries(enc) -> QuerySet`` and
    ``decode(enc, query, query_pos, reference, self_attn_mask) -> DetrOutput`` (the contract's).
    """

    class_layers = ("class_branches",)  # follow the number of classes (codetr.models.base)
    activation: ClassVar[type[nn.Module]] = nn.ReLU
    scale_encoder_positions: ClassVar[bool] = False

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        t = cfg.transformer
        if len(cfg.backbone.out_indices) != 1 or t.num_feature_levels != 1:
            raise ValueError(f"model.arch={cfg.arch} is single-scale: it needs one backbone map "
                             f"(model.backbone.out_indices, got {cfg.backbone.out_indices}) and "
                             f"model.transformer.num_feature_levels=1 (got {t.num_feature_levels})")
        if t.enc_with_cp or t.dec_with_cp:
            raise ValueError(f"model.arch={cfg.arch} has no activation checkpointing (model.transformer.enc_with_cp, "
                             "dec_with_cp must be 0)")
        self.backbone = build_backbone(cfg.backbone)
        self.input_proj = nn.Conv2d(self.backbone.out_channels[-1], t.d_model, kernel_size=1)
        self.encoder = DetrEncoder(t.enc_layers, t.d_model, t.ffn_dim, t.n_heads, t.dropout, self.activation,
                                   self.scale_encoder_positions)
        self.decoder_layers = nn.ModuleList(
            ConditionalDecoderLayer(t.d_model, t.ffn_dim, t.n_heads, t.dropout, self.activation(), first=i == 0)
            for i in range(t.dec_layers))
        self.decoder_norm = nn.LayerNorm(t.d_model)
        # the spatial query's transformation T = FFN(content) in layers after the first
        self.query_scale = mlp(t.d_model, t.d_model, t.d_model, 2)
        # one class and one box branch, shared by the decoder layers (lists of one: the names of every
        # base detector's branches)
        self.class_branches = nn.ModuleList([nn.Linear(t.d_model, cfg.num_classes)])
        self.box_branches = nn.ModuleList([box_branch(t.d_model)])
        self.build_query_parts()
        self.criterion = DetrCriterion(cfg.num_classes, cfg.loss, class_agnostic_proposals=True)
        self.reset_parameters()

    def transformer_parts(self) -> list[nn.Module]:
        """The modules of the reference implementations' ``transformer`` (xavier-initialised weight matrices)."""
        return [self.encoder, self.decoder_layers, self.query_scale]

    def reset_parameters(self) -> None:
        """Reference init: xavier for the transformer's matrices, focal prior 0.01 for the class
        bias, zero last box layer; input projection and query embedding keep PyTorch's defaults."""
        for part in self.transformer_parts():
            for p in part.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        nn.init.constant_(self.class_branches[0].bias, -math.log((1 - 0.01) / 0.01))
        nn.init.zeros_(self.box_branches[0][-1].weight)
        nn.init.zeros_(self.box_branches[0][-1].bias)

    @property
    def level_strides(self) -> list[int]:
        """The stride of the one encoder level (the backbone map's: 32 for C5)."""
        return [4 * 2 ** self.cfg.backbone.out_indices[0]]

    # ---- the transformer pass ---------------------------------------------------------------

    def position(self, padding_mask: Tensor, shape: tuple[int, int]) -> Tensor:
        """Sine positions (B, S, d) of the map of ``shape`` (h, w) from its flat padding mask (B, S)."""
        t = self.cfg.transformer
        mask = padding_mask.view(-1, *shape)
        return sine_position_embedding(mask, t.d_model // 2, t.pos_temperature, t.pos_offset).flatten(2).transpose(1, 2)

    def encode_images(self, images: Tensor, masks: Tensor) -> EncoderOutput:
        """images (B, 3, H, W), masks (B, H, W) True on padding -> the encoder output (one level)."""
        feat = self.input_proj(self.backbone(images)[-1])
        mask = level_masks(masks, [feat])[0]
        shape = (feat.shape[-2], feat.shape[-1])
        padding_mask = mask.flatten(1)
        memory = self.encoder(feat.flatten(2).transpose(1, 2), self.position(padding_mask, shape), padding_mask)
        return EncoderOutput(memory, [shape], valid_ratio(mask)[:, None], padding_mask)

    def forward(self, images: Tensor, masks: Tensor) -> tuple[DetrOutput, EncoderOutput]:
        """images (B, 3, H, W), masks (B, H, W) True on padding -> predictions of every decoder layer
        and the encoder output."""
        enc = self.encode_images(images, masks)
        queries = self.select_queries(enc)
        return self.decode(enc, queries.query, queries.query_pos, queries.reference), enc

    def decoder_inputs(self, enc: EncoderOutput) -> tuple[Tensor, Tensor]:
        """The memory (B, S, d) and its sine positions (B, S, d), the keys of the cross-attention."""
        return enc.memory, self.position(enc.padding_mask, enc.spatial_shapes[0])

    # ---- the detector API (Deformable-DETR's) -------------------------------------------------

    detr_loss = DeformableDETR.detr_loss
    loss = DeformableDETR.loss
    predict = DeformableDETR.predict
    detect = DeformableDETR.detect
    finish = DeformableDETR.finish
    predict_tensors = DeformableDETR.predict_tensors
    postprocess = DeformableDETR.postprocess
    inference_state_dict = DeformableDETR.inference_state_dict


def zeros_query(batch: int, num_queries: int, d_model: int, like: Tensor) -> Tensor:
    """The initial content queries (B, Q, d): zeros, as in both reference implementations."""
    return torch.zeros(batch, num_queries, d_model, dtype=like.dtype, device=like.device)

"""The model contract: what :class:`~codetr.models.co_detr.CoDETR` needs from a base detector and
from an auxiliary head, and the per-model facts the training and loading code asks for.

Two protocols (structural: no base class to inherit):

- :class:`BaseDetector`, the one-to-one DETR detector inside ``CoDETR`` (``DeformableDETR``, ``DINO``);
- :class:`AuxHead`, a one-to-many auxiliary head on the encoder's feature pyramid (ATSS, Faster R-CNN).

Facts a module declares about itself, as class attributes, read through the functions below:

- ``float32_methods``: names of its methods that run in float32 under mixed precision
  (:func:`float32_regions`; wrapped by :func:`codetr.training.amp.keep_float32`);
- ``class_layers``: names of its submodules whose tensors follow the number of classes, which
  ``--init`` re-initialises when fine-tuning on another class count (:func:`class_dependent_tensors`).

And facts of the detector family, as names: the prefixes of the parts ``CoDETR`` adds for training
only (:data:`TRAINING_ONLY`), the tensors that tell the class count and repeat counts when weights
do not fit (:data:`CLASS_COUNT_TENSOR`, :data:`REPEATED_MODULES`), and the layer numbering of a ViT backbone for layer-wise learning-rate
decay (:func:`layer_id`).
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import chain
from typing import TYPE_CHECKING, ClassVar, Protocol

from torch import Tensor, nn

from codetr.structures import Batch, Detections, DetrOutput, Target

if TYPE_CHECKING:
    from codetr.models.aux.base import PositiveSet
    from codetr.models.deformable_detr import EncoderOutput
    from codetr.models.losses.detr_loss import DetrCriterion

# State-dict prefixes of the parts CoDETR adds for training only: the pyramid adapter, the auxiliary
# heads and the positive-query embeddings. A plain detector skips them in a weights file.
TRAINING_ONLY = ("adapter.", "aux_heads.", "positive_queries.")
# The prefix of CoDETR's mask branch (``model.mask``): needed at inference, but a fine-tuning (``--init``)
# from box-only weights starts it afresh.
MASK_BRANCH = "mask_branch."
# The prefix of the base detector's modules inside CoDETR (its state dict drops it).
BASE = "detector."
# A ViT backbone's blocks, by parameter name relative to the base detector.
BACKBONE_BLOCKS = "backbone.blocks."
BACKBONE_EMBEDDINGS = ("backbone.cls_token", "backbone.mask_token", "backbone.pos_embed")
# The tensor whose first dimension is the number of classes, in every base detector.
CLASS_COUNT_TENSOR = "class_branches.0.bias"
# Repeated modules (state-dict name prefix before the index) and the config key that sets how many there are.
REPEATED_MODULES = {"decoder_layers": "model.transformer.dec_layers", "encoder.layers": "model.transformer.enc_layers",
                    "neck.convs": "model.transformer.num_feature_levels", "aux_heads": "model.co.aux_heads"}


class BaseDetector(Protocol):
    """A one-to-one DETR detector, as ``CoDETR`` runs it (boxes: ``reference`` and outputs in
    cxcywh normalised by the unpadded image size; detections xyxy in pixels of the input).

    ``level_strides``: the stride of each encoder level; ``criterion``: its DETR losses, whose
    ``assigned_loss`` trains the positive queries with a fixed assignment.
    """

    level_strides: list[int]
    criterion: DetrCriterion

    def detr_loss(self, batch: Batch) -> tuple[dict[str, Tensor], EncoderOutput, DetrOutput]:
        """The one-to-one losses, the encoder output and the decoder's predictions they came from."""

    def encode_images(self, images: Tensor, masks: Tensor) -> EncoderOutput:
        """Backbone, neck and encoder: memory (B, S, C) with its levels' shapes and padding."""

    def decode(self, enc: EncoderOutput, query: Tensor, query_pos: Tensor | None, reference: Tensor,
               self_attn_mask: Tensor | None = None) -> DetrOutput:
        """The decoder on queries (B, Q, C) from reference boxes (B, Q, 4) or points (B, Q, 2)."""

    def predict(self, batch: Batch) -> list[Detections]:
        """Eval-mode detections per image."""

    def detect(self, batch: Batch) -> tuple[list[Detections], EncoderOutput]:
        """``predict``'s detections, and the encoder output they came from (for the mask branch)."""

    def postprocess(self, logits: Tensor, boxes: Tensor, image_sizes: Tensor,
                    top_k: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Top-k (query, class) pairs of logits (B, Q, C) and boxes (B, Q, 4) cxcywh normalised:
        boxes (B, K, 4) xyxy in pixels of ``image_sizes``, scores (B, K), labels (B, K)."""

    def predict_tensors(self, images: Tensor, masks: Tensor, image_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Tensor-only inference: boxes (B, K, 4) xyxy in pixels of ``image_sizes``, scores (B, K), labels (B, K)."""

    def inference_state_dict(self) -> dict[str, Tensor]:
        """The weights needed at inference."""


class AuxHead(Protocol):
    """A one-to-many auxiliary head of ``CoDETR`` on the pyramid ``feats``: a list of (B, C, H_l, W_l)
    maps (the encoder levels and one extra stride-2 level); ``image_sizes`` (B, 2) hw of the unpadded
    images; targets' boxes xyxy in pixels. Its loss keys start with its type (``atss.loss_cls``)."""

    float32_methods: ClassVar[tuple[str, ...]]
    class_layers: ClassVar[tuple[str, ...]]

    def forward_train(self, feats: list[Tensor], image_sizes: Tensor,
                      targets: list[Target]) -> tuple[dict[str, Tensor], list[PositiveSet]]:
        """Weighted losses, and per image what the head assigned (the positive queries' source)."""

    def predict(self, feats: list[Tensor], image_sizes: Tensor) -> list[Detections]:
        """Detections per image, boxes xyxy in pixels of the input (``model.co.eval_head``)."""


def float32_regions(model: nn.Module) -> Iterator[tuple[nn.Module, tuple[str, ...]]]:
    """Every submodule of ``model`` that declares ``float32_methods``, with those method names."""
    for module in model.modules():
        methods = getattr(module, "float32_methods", ())
        if methods:
            yield module, tuple(methods)


def class_dependent_tensors(model: nn.Module) -> set[str]:
    """State-dict names of the tensors of the submodules that modules of ``model`` list in their
    ``class_layers`` (the names as ``model.state_dict()`` gives them)."""
    name_of = {id(t): k for k, t in model.state_dict(keep_vars=True).items()}
    names = set()
    for module in model.modules():
        for layer in getattr(module, "class_layers", ()):
            part = module.get_submodule(layer)
            names |= {name_of[id(t)] for t in chain(part.parameters(), part.buffers()) if id(t) in name_of}
    return names


def base_detector_name(name: str) -> str:
    """A parameter name relative to the base detector (``CoDETR``'s ``detector.`` prefix removed)."""
    return name.removeprefix(BASE)


def layer_id(name: str, num_layers: int) -> int:
    """The layer id of base-detector parameter ``name`` for layer-wise learning-rate decay, as the
    released ``get_layer_id_for_vit``: 0 for the patch and position embeddings (and class / mask
    tokens), ``i + 1`` for ``backbone.blocks.{i}``, ``num_layers + 1`` for everything else."""
    if name in BACKBONE_EMBEDDINGS or name.startswith("backbone.patch_embed"):
        return 0
    if name.startswith(BACKBONE_BLOCKS):
        return int(name.split(".")[2]) + 1
    return num_layers + 1

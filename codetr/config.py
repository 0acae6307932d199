"""Typed configuration: nested dataclasses (the model, the data, the training), with their defaults.

Reading, checking and writing them (YAML files, ``base:`` files, dotted ``key=value`` overrides):
:mod:`codetr.config_parsing`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TTAConfig:
    """Test-time augmentation (``codetr eval --tta``, ``Detector.predict(..., tta=True)``), as
    mmdetection 3.x's generic ``DetTTAModel``: the image runs once per (scale, flip) view, every
    view's detections are mapped back to the original image and merged class-wise."""

    # Test scales: the shorter side for data.augment "detr" (data.max_size still caps the longer
    # side), the canvas side for "lsj". Empty: the config's own (data.test_scale / data.lsj_size).
    scales: list[int] = field(default_factory=list)
    flip: bool = True  # also run every scale horizontally flipped
    # "nms" (mmdet's default TTA merge), "soft_nms" (linear Soft-NMS, mmcv's defaults) or "wbf"
    # (weighted box fusion of the ensemble-boxes package: pip install ensemble-boxes).
    merge: str = "nms"
    iou: float = 0.5  # IoU threshold of the merge
    # Detections scoring below it are left out of every view before the merge (ensemble-boxes'
    # skip_box_thr). Weighted box fusion averages the scores of a cluster, so DETR's many
    # low-scoring near-duplicates dilute the score of a well-found object: raise it for "wbf".
    min_score: float = 0.0
    max_detections: int | None = None  # kept per image after the merge; None: model.max_detections


@dataclass
class DataConfig:
    """COCO-format data: image folders and instances JSON files."""

    train_images: str = "data/synth/train"
    train_annotations: str = "data/synth/annotations/instances_train.json"
    val_images: str = "data/synth/val"
    val_annotations: str = "data/synth/annotations/instances_val.json"
    # Built-in synthetic dataset: generated at the paths above when they are missing.
    synthetic: bool = False
    synthetic_train: int = 64
    synthetic_val: int = 16
    synthetic_size: int = 256
    synthetic_seed: int = 0
    # Augmentation: "detr" (the fields below) or "lsj" (large-scale jitter on a square canvas of side
    # lsj_size padded with 114, as the released Co-DINO LSJ configs; the canvas is the model's image).
    augment: str = "detr"
    lsj_size: int = 1024
    lsj_scale_range: list[float] = field(default_factory=lambda: [0.1, 2.0])
    # Instance masks: decode each annotation's "segmentation" (polygons or RLE) into Target.masks and
    # move them with every transform; false: box-only data (segmentations never read).
    with_masks: bool = False
    # LSJ only, needs with_masks: the released copy-paste (objects of a second LSJ-augmented image
    # pasted over each training image with their masks, as mmdet's CopyPaste(max_num_pasted=100)).
    copy_paste: bool = False
    # DETR augmentation: random flip; multi-scale resize of the shorter side (max_size caps the
    # longer side), or resize + random crop + multi-scale resize.
    train_scales: list[int] = field(default_factory=lambda: list(range(480, 801, 32)))
    max_size: int = 1333
    crop_resize_scales: list[int] = field(default_factory=lambda: [400, 500, 600])
    crop_max_size: int = 4200  # cap of the longer side in the crop branch's first resize (as released)
    crop_size: list[int] = field(default_factory=lambda: [384, 600])
    test_scale: int = 800
    # Resize arithmetic (DETR multi-scale and test resize, LSJ resize): "torchvision" (v2.Resize /
    # RandomShortestSize: sizes floored, antialiased bilinear; LSJ: mmcv's sizes, bilinear without
    # antialiasing) or "mmcv" (the released mmcv 1.x Resize and Normalize: sizes by mmcv.rescale_size,
    # uint8 pixels identical to cv2.resize INTER_LINEAR, normalisation in 0-255 as mmcv.imnormalize).
    resize: str = "torchvision"
    batch_size: int = 2  # training images per process and step
    # Training batches of landscape (width / height > 1) or of other images only, as mmdet's group
    # sampler; false: batches of any images.
    group_by_aspect_ratio: bool = True
    # Evaluation images per forward. 1, as released: in a padded batch an image's detections would
    # depend on the size of its batch partners (zero padding at the convolutions' borders).
    eval_batch_size: int = 1
    # Batches are padded to a multiple of this (the released ViT-L configs: 32, so the patch grid
    # covers the whole image; the ResNet / Swin ones: 1).
    pad_size_divisor: int = 1
    num_workers: int = 2
    # Box metrics: "coco"; "lvis" (APr / APc / APf, at most 300 detections per image, federated
    # rules: negative and not-exhaustive categories per image); "auto": "lvis" when every category
    # of the validation annotations has a "frequency" field, else "coco".
    eval_style: str = "auto"
    tta: TTAConfig = field(default_factory=TTAConfig)
    # A training set without any usable box (no annotations, all crowd) is an error unless this is
    # true (background-only training); a validation set always needs boxes.
    allow_empty: bool = False
    # Images with more pixels are refused (Pillow's decompression-bomb limit, 2 x
    # PIL.Image.MAX_IMAGE_PIXELS); raise it for trusted large images, null: no limit.
    max_image_pixels: int | None = 178956970


@dataclass
class BackboneConfig:
    # resnet18/34/50/101 (torchvision) or a timm Swin: swin_{tiny,small}_patch4_window7_224,
    # swin_{base,large}_patch4_window12_384 (as released; window7_224 variants of base/large too);
    # or vit_large: the EVA-02-style ViT-L of the released Co-DINO ViT-L (use with model.neck: sfp).
    name: str = "resnet50"
    # None: random init; "torchvision": torchvision's ImageNet V1 ResNet weights (= mmdet's
    # torchvision://resnet50 of the released configs); "torchvision_v2": its IMAGENET1K_V2 weights
    # (ResNet-50/101); "timm": timm's pretrained Swin weights; or a file path.
    weights: str | None = None
    # ResNet: -1 none, 0 the stem, k the stem and layer1..layerk. Swin: -1 none, 0 the patch
    # embedding, k also the first k stages (mmdet's convention; the released Swin configs use -1).
    frozen_stages: int = 1
    # ResNet only: "frozen_bn" for pretrained weights (their batch-norm statistics, fixed);
    # "group_norm" (32 groups, trained) for a backbone trained from scratch, which frozen
    # identity batch norm would leave without any normalisation.
    norm: str = "frozen_bn"
    # Stages returned (0 = stride 4 ... 3 = stride 32; ResNet layer1..layer4 / C2-C5):
    # Deformable-DETR uses 1-3, DINO 0-3.
    out_indices: list[int] = field(default_factory=lambda: [1, 2, 3])
    # Swin only: stochastic depth, rising linearly over the blocks to this rate (released: 0.2-0.6).
    drop_path_rate: float = 0.0
    # Activation checkpointing of every residual / Swin block (less memory, slower backward).
    with_cp: bool = False
    # Swin: architecture overrides for timm.create_model (embed_dim, depths, num_heads, ...);
    # ViT: overrides of the ViT constructor (embed_dim, depth, num_heads, pretrain_img_size) for a tiny model.
    timm_args: dict[str, Any] = field(default_factory=dict)
    # ViT only: window attention in window_size x window_size windows, every global_every-th block global
    # (released COCO 24 / 4, LVIS 16 / 3). drop_path_rate and with_cp (activation checkpointing) apply too.
    window_size: int = 24
    global_every: int = 4


@dataclass
class TransformerConfig:
    d_model: int = 256
    n_heads: int = 8
    n_points: int = 4
    num_feature_levels: int = 4
    enc_layers: int = 6
    dec_layers: int = 6
    ffn_dim: int = 2048
    dropout: float = 0.0
    num_queries: int = 300
    two_stage: bool = True
    box_refine: bool = True
    mixed_selection: bool = True
    look_forward_twice: bool = True
    # Sine position encoding of the feature maps: Deformable-DETR 10000 and -0.5, DINO 20 and 0.
    pos_temperature: float = 10000.0
    pos_offset: float = -0.5
    # Activation checkpointing of the first enc_with_cp encoder / dec_with_cp decoder layers (all when
    # more; less memory, slower backward, same numbers): the released encoder ``with_cp`` (Co-DINO R50
    # 4, Swin-L / ViT-L 6, 9-layer encoder 9); the release checkpoints no decoder layer.
    enc_with_cp: int = 0
    dec_with_cp: int = 0


@dataclass
class LossConfig:
    """DETR set-prediction loss; the Hungarian matcher uses the same weights as costs (the
    classification cost is ``cls_cost`` when set)."""

    cls_weight: float = 2.0
    l1_weight: float = 5.0
    giou_weight: float = 2.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    # "focal" (Deformable-DETR) or "quality_focal" (DINO / Co-DINO: the target of a positive is
    # the IoU of its predicted box with the ground truth, beta below).
    cls_loss: str = "focal"
    qfl_beta: float = 2.0
    cls_cost: float | None = None  # matcher classification cost; None: cls_weight


@dataclass
class DinoConfig:
    """DINO's contrastive denoising and inference (used when ``model.arch`` is "dino")."""

    num_dn_queries: int = 100  # denoising queries per batch, split into dynamic groups
    label_noise: float = 0.5
    box_noise: float = 1.0
    # Inference as released: top ``num_queries`` (query, class) pairs, class-wise Soft-NMS,
    # keep ``max_detections``. Off: top ``max_detections`` without NMS.
    soft_nms: bool = True
    soft_nms_iou: float = 0.8
    # (query, class) pairs entering Soft-NMS. None: num_queries, as released (Sense-X); the
    # mmdetection 3.x port takes its max_per_img first (set this to max_detections to match it)
    soft_nms_candidates: int | None = None


@dataclass
class CoConfig:
    """Collaborative hybrid assignment training (training only)."""

    # Auxiliary one-to-many heads, in order; any of "rcnn", "atss", repeats allowed (each its own
    # weights and positive-query layers, as the paper's 2x / 6x ATSS ablations). Empty: plain DETR.
    aux_heads: list[str] = field(default_factory=list)
    positive_queries: bool = True
    lambda1: float = 1.0  # weight of the positive-query decoder losses
    lambda2: float = 2.0  # weight of the auxiliary-head losses (times the decoder layers)
    max_pos_queries: int = 300
    min_pos_queries: int = 9
    zero_padding: bool = False  # pad groups with masked zero boxes instead of random negatives
    eval_head: str = "detr"  # detr | atss | rcnn
    # Sizes of the auxiliary heads (official values; the tiny configs scale them down).
    atss_stacked_convs: int = 1
    rpn_pre_nms: int = 4000  # proposals kept per level before NMS, in training
    rpn_proposals: int = 1000  # proposals per image after NMS
    roi_samples: int = 512  # sampled RoIs per image
    roi_fc_dim: int = 1024
    # RoI box head (mmdet ConvFCBBoxHead): roi_convs shared 3x3 convs (GroupNorm(32), ReLU) then roi_fcs
    # shared FCs; released Shared2FCBBoxHead 0 / 2, class-specific deltas with stds 0.1, 0.1, 0.2, 0.2;
    # Co-DINO ViT-L (COCO) 4 / 1, class-agnostic, stds 0.05, 0.05, 0.1, 0.1.
    roi_convs: int = 0
    roi_fcs: int = 2
    roi_class_agnostic: bool = False
    roi_target_stds: list[float] = field(default_factory=lambda: [0.1, 0.1, 0.2, 0.2])
    # RoI level of a box: floor(log2(sqrt(area) / roi_finest_scale)) over the encoder levels;
    # official 112 with strides 8-64 (Co-Deformable-DETR), 56 with strides 4-64 (Co-DINO).
    roi_finest_scale: float = 112.0
    # Mask R-CNN's FCN mask head inside the RoI head, trained on its positive samples (training only; the
    # released co_deformable_detr_mask_r50_1x_coco). Needs instance masks in the data.
    roi_mask: bool = False


@dataclass
class MaskConfig:
    """The instance-mask branch of Co-DINO-Inst (``model.mask.enabled``; needs ``model.co.aux_heads``):
    a RefineMask-style head and a mask IoU head on RoIs of the encoder levels, trained on the detached
    final DETR predictions assigned to the ground truth, as released. The branches are
    ``model.transformer.d_model`` wide (each stage halves the instance one). Defaults: the released
    co_dino_5scale_vit_large_coco_instance config."""

    enabled: bool = False
    instance_convs: int = 1
    semantic_convs: int = 2
    # Supervised mask sizes of the stages, each twice the one before (the first is the RoIAlign size).
    stage_sizes: list[int] = field(default_factory=lambda: [14, 28, 56, 112])
    class_agnostic_last: bool = True  # the last stage's logits for every class at once (released: yes)
    dilations: list[int] = field(default_factory=lambda: [1, 3, 5])
    # RoI level of a box: floor(log2(sqrt(area) / finest_scale)) over the encoder levels (released 56).
    finest_scale: float = 56.0
    # Training RoIs: the top train_rois (query, class) pairs of the last decoder layer (denoising queries
    # included, as released), max-IoU assigned (IoU >= 0.5) and sampled (roi_samples, 25% positives,
    # ground-truth boxes added); the positives learn masks.
    train_rois: int | None = None  # None: model.max_detections (the release takes the query head's max_per_img)
    roi_samples: int = 512
    # Loss weights, times dec_layers * lambda2 like the auxiliary heads (released 1.33 and 0.5).
    loss_weight: float = 1.33
    stage_loss_weights: list[float] = field(default_factory=lambda: [0.5, 0.75, 0.75, 1.0])
    boundary_width: int = 2
    mask_iou: bool = True  # the mask IoU head; at inference a mask's score is box score x predicted IoU
    iou_loss_weight: float = 0.5
    iou_convs: int = 2
    iou_fcs: int = 1
    iou_fc_dim: int = 1024
    threshold: float = 0.5  # binarisation of the mask probabilities (and of the IoU targets' masks)


@dataclass
class ModelConfig:
    arch: str = "deformable_detr"  # deformable_detr | dino | conditional_detr | dab_detr (single-scale)
    num_classes: int = 80
    max_detections: int = 100
    # Bias in the channel mapper's convolutions: none as released; transformers' Deformable-DETR
    # input projections have one (set by its converter).
    neck_bias: bool = False
    # "channel_mapper" (1x1 conv + GN per backbone map, extra stride-2 levels; ResNet / Swin) or "sfp"
    # (simple feature pyramid p2-p6 at strides 4-64 from a ViT's single stride-16 map; 5 feature levels).
    neck: str = "channel_mapper"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    co: CoConfig = field(default_factory=CoConfig)
    dino: DinoConfig = field(default_factory=DinoConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)


@dataclass
class LayerDecayConfig:
    """Layer-wise learning-rate decay of a ViT backbone, as the released LayerDecayOptimizerConstructor
    (ViT-L: rate 0.8 over 24 layers): block i trains at lr * rate ** (num_layers - i), the patch and
    position embeddings at lr * rate ** (num_layers + 1), the rest of the detector at lr; no weight
    decay for 1-d parameters and biases. Replaces ``lr_mult`` when on."""

    rate: float | None = None  # None: off
    num_layers: int = 24  # the number of ViT blocks


@dataclass
class TrainConfig:
    epochs: int = 12
    lr: float = 2e-4
    weight_decay: float = 1e-4
    # Learning-rate multipliers by parameter-name substring (first match wins).
    lr_mult: dict[str, float] = field(
        default_factory=lambda: {"backbone": 0.1, "sampling_offsets": 0.1, "reference_points": 0.1}
    )
    grad_clip: float | None = 0.1  # max L2 norm of the gradients; 0 or null: off
    lr_steps: list[int] = field(default_factory=lambda: [11])  # epochs where lr is x0.1
    max_iters: int | None = None  # stop after this many iterations in all (tiny runs)
    eval_every: int = 1  # epochs
    seed: int = 42
    device: str = "auto"
    log_every: int = 10
    # Start from these weights (.safetensors, e.g. converted official weights, or a codetr
    # checkpoint): every tensor loads except the class-dependent layers when the number of
    # classes differs (those keep their fresh initialisation). The backbone's ImageNet weights
    # are then not loaded.
    init: str | None = None
    # Linear warm-up, as mmcv's warmup="linear" (released ViT-L config: 500 iterations, ratio 0.01):
    # before iteration i < warmup_iters (0-based) the learning rate is multiplied by
    # 1 - (1 - i / warmup_iters) * (1 - warmup_ratio). 0: off.
    warmup_iters: int = 0
    warmup_ratio: float = 0.1
    layer_decay: LayerDecayConfig = field(default_factory=LayerDecayConfig)
    # Exponential moving average of the weights, as mmdet's ExpMomentumEMAHook (released ViT-L COCO
    # config: momentum 1e-4, total_iter 2000, interval 1): after step i (0-based), every ema_interval
    # steps, average = (1 - m) * average + m * weights, m = (1 - ema_momentum) * exp(-(1 + i) /
    # ema_total_iter) + ema_momentum. When on, evaluation and model.safetensors use the average.
    ema: bool = False
    ema_momentum: float = 1e-4
    ema_total_iter: int = 2000
    ema_interval: int = 1
    # Mixed precision: "bf16" (CPU or GPU), "fp16" (GPU; with gradient scaling) or null (float32).
    # torch.autocast over the training forward; the deformable attention, the matching, the losses and
    # the auxiliary heads' training step stay in float32 (codetr/training/amp.py). Evaluation runs in float32.
    amp: str | None = None
    # Gradient accumulation: an iteration (optimizer step) runs `accumulate` micro-batches of
    # data.batch_size images per process; epochs, lr_steps, warmup_iters, max_iters, log_every and
    # the EMA count iterations, as with a batch `accumulate` times larger.
    accumulate: int = 1
    # TensorBoard event files in <out>/tensorboard (needs the tensorboard package): loss terms,
    # learning rate and images/s every log_every iterations; after each evaluation the COCO metrics
    # and the first tensorboard_images validation images with their detections drawn.
    tensorboard: bool = False
    tensorboard_images: int = 4
    # Also write last.pt every checkpoint_every iterations (besides every epoch end); 0: epoch ends only.
    # A resume from such a mid-epoch checkpoint continues exactly as the uninterrupted run.
    checkpoint_every: int = 0
    # A step whose loss or gradient is not finite stops the run (the last checkpoint stays good);
    # N > 0 skips up to N such steps (each logged, the weights unchanged) before stopping.
    # Single-process training only (under torchrun a bad step stops the run).
    skip_nonfinite: int = 0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

"""Backbones: torchvision ResNets with frozen batch norm, timm Swin Transformers run as the
released detection backbone, and the plain EVA-02-style ViT of Co-DINO ViT-L (``codetr.models.vit``,
one stride-16 map). ResNet and Swin return the stages in ``out_indices``; each has ``out_channels``
(one per returned map).

ImageNet weights (``model.backbone.weights``):

- ``None``: random initialisation;
- ``"torchvision"`` (ResNet): torchvision's ImageNet **V1** weights (``IMAGENET1K_V1``, ResNet-50
  76.1% top-1), the file mmdet's ``torchvision://resnet50`` names, as in the released configs;
- ``"torchvision_v2"`` (ResNet-50/101): torchvision's newer ``IMAGENET1K_V2`` weights (80.9%);
- ``"timm"`` (Swin): timm's default pretrained weights for the model name;
- a file path: a state_dict in the library's own names (torchvision ResNet; Swin in timm names
  or the original Swin release's names, e.g. ``swin_large_patch4_window12_384_22k.pth``).

Downloads go through torchvision / timm (their caches); without network they fail with an error
naming the file to fetch by hand.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

from codetr.config import BackboneConfig
from codetr.models.activation_checkpoint import maybe_checkpoint

RESNETS = {"resnet18": 1, "resnet34": 1, "resnet50": 4, "resnet101": 4}  # name -> block expansion
# timm Swin names used by the released configs (window 7 at 224 px pretraining, window 12 at 384 px).
SWINS = ("swin_tiny_patch4_window7_224", "swin_small_patch4_window7_224", "swin_base_patch4_window7_224",
         "swin_base_patch4_window12_384", "swin_large_patch4_window7_224", "swin_large_patch4_window12_384")


class FrozenBatchNorm(FrozenBatchNorm2d):
    """torchvision's FrozenBatchNorm2d (same buffers, same numbers) with one intermediate fewer:
    ``x * scale`` then an in-place ``+ bias``, instead of two fresh tensors. x (B, C, H, W)."""

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        bias = self.bias - self.running_mean * scale
        return (x * scale.view(1, -1, 1, 1)).add_(bias.view(1, -1, 1, 1))


NORMS = {"frozen_bn": FrozenBatchNorm, "group_norm": lambda channels: nn.GroupNorm(32, channels)}
TORCHVISION_WEIGHTS = {"torchvision": "IMAGENET1K_V1", "torchvision_v2": "IMAGENET1K_V2"}
# Plain ViTs (codetr.models.vit, built from timm parts): name -> architecture (released Co-DINO ViT-L:
# 16x16 patches, 24 blocks of 1024 channels and 16 heads, position embedding of a 512 px pretraining).
VITS = {"vit_large": dict(embed_dim=1024, depth=24, num_heads=16, pretrain_img_size=512)}


def load_weights_file(path: str | Path) -> dict[str, Tensor]:
    """A state_dict from a .safetensors file or a torch checkpoint (loaded with weights_only);
    a ``state_dict`` / ``model`` entry of a checkpoint is unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state


def _offline_hint(what: str, url: str, err: Exception) -> RuntimeError:
    return RuntimeError(
        f"could not download {what} from {url} ({type(err).__name__}: {err}). Without network, download the file "
        "on another machine and set model.backbone.weights to its path (or model.backbone.weights=null for a "
        "random initialisation)")


def _check_out_indices(out_indices: tuple[int, ...]) -> None:
    if not out_indices or sorted(set(out_indices)) != list(out_indices) or not set(out_indices) <= {0, 1, 2, 3}:
        raise ValueError(f"backbone out_indices must be increasing stage indices in 0..3, got {list(out_indices)}")


# ------------------------------------------------------------------------------------ ResNet


def torchvision_resnet(name: str, weights: str | None, norm_layer: Any) -> nn.Module:
    """torchvision's ResNet ``name`` with ImageNet weights ``"torchvision"`` (V1) / ``"torchvision_v2"``
    (downloaded by torchvision), a state_dict file, or None (random)."""
    net = getattr(torchvision.models, name)(weights=None, norm_layer=norm_layer)
    if weights is None:
        return net
    if weights in TORCHVISION_WEIGHTS:
        enum = torchvision.models.get_model_weights(name)
        tag = TORCHVISION_WEIGHTS[weights]
        if not hasattr(enum, tag):
            raise ValueError(f"torchvision has no {tag} weights for {name}; model.backbone.weights=torchvision "
                             "gives its ImageNet V1 weights")
        entry = getattr(enum, tag)
        try:
            state = entry.get_state_dict(progress=False)
        except OSError as err:
            raise _offline_hint(f"torchvision's ImageNet weights {name} {tag}", entry.url, err) from err
        source = f"torchvision {name} {tag}"
    else:
        state, source = load_weights_file(weights), str(weights)
    state = {k: v for k, v in state.items() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise ValueError(f"{source} is not a torchvision {name} state_dict: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
    return net


class ResNetBackbone(nn.Module):
    """ResNet stem and stages with torchvision's parameter names; returns the outputs of the
    stages in ``out_indices`` (0 = layer1 / C2 at stride 4, ..., 3 = layer4 / C5 at stride 32).

    weights: see the module docstring. ``frozen_stages``: -1 trains everything, 0 freezes the
    stem, k freezes the stem and layer1..layerk. ``norm``: "frozen_bn" (batch norm with fixed
    statistics, for pretrained weights) or "group_norm" (GroupNorm(32), trained: for a backbone
    trained from scratch; frozen batch norm at its initial identity would leave it unnormalised:
    in the tiny configs its C5 activations grew to a std of 600-4400 in 8 epochs). ``with_cp``:
    activation checkpointing of every residual block (mmdet's ``with_cp``).
    """

    def __init__(self, name: str = "resnet50", weights: str | None = None, frozen_stages: int = 1,
                 norm: str = "frozen_bn", out_indices: tuple[int, ...] = (1, 2, 3), with_cp: bool = False) -> None:
        super().__init__()
        _check_out_indices(out_indices)
        if name not in RESNETS:
            raise ValueError(f"unknown backbone {name!r}; choose from {list(RESNETS) + list(SWINS) + list(VITS)}")
        if norm not in NORMS:
            raise ValueError(f"unknown backbone norm {norm!r}; choose from {list(NORMS)}")
        net = torchvision_resnet(name, weights, NORMS[norm])
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.out_indices = list(out_indices)
        self.out_channels = [64 * 2**i * RESNETS[name] for i in self.out_indices]
        self.with_cp = with_cp
        frozen = [] if frozen_stages < 0 else [self.conv1, *[getattr(self, f"layer{i}") for i in range(1, frozen_stages + 1)]]
        for module in frozen:
            module.requires_grad_(False)

    def forward(self, images: Tensor) -> list[Tensor]:
        """images (B, 3, H, W) -> the maps of ``out_indices``, C_{i+2} of shape (B, c, H / 2^(i+2), W / 2^(i+2))."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        outs = []
        for i, layer in enumerate((self.layer1, self.layer2, self.layer3, self.layer4)):
            if i > self.out_indices[-1]:
                break
            for block in layer:
                x = maybe_checkpoint(block, x, enabled=self.with_cp)
            if i in self.out_indices:
                outs.append(x)
        return outs


# -------------------------------------------------------------------------------------- Swin


def swin_block(block: nn.Module, x: Tensor) -> Tensor:
    """One timm ``SwinTransformerBlock`` in the released order of operations. x (B, H, W, C) -> same.

    As released (Swin's detection code, mmdet's ``ShiftWindowMSA``), the normalised map is first
    zero-padded to a multiple of the window, then shifted, and the shift mask labels regions of
    the padded map; timm's own block shifts first and pads afterwards, which differs whenever H or
    W is not a multiple of the window (e.g. 200 x 334 at stride 4 for an 800 x 1333 image).
    """
    from timm.models.swin_transformer import window_partition, window_reverse

    _, h, w, c = x.shape
    win_h, win_w = block.window_size
    shift_h, shift_w = block.shift_size
    shortcut = x
    x = F.pad(block.norm1(x), (0, 0, 0, (-w) % win_w, 0, (-h) % win_h))
    padded_h, padded_w = x.shape[1:3]
    mask = None
    if shift_h or shift_w:
        x = torch.roll(x, shifts=(-shift_h, -shift_w), dims=(1, 2))
        mask = block.get_attn_mask(x)  # (windows, win_h * win_w, win_h * win_w), 0 or -100
    windows = block.attn(window_partition(x, (win_h, win_w)).view(-1, win_h * win_w, c), mask=mask)
    x = window_reverse(windows.view(-1, win_h, win_w, c), (win_h, win_w), padded_h, padded_w)
    if shift_h or shift_w:
        x = torch.roll(x, shifts=(shift_h, shift_w), dims=(1, 2))
    x = shortcut + block.drop_path1(x[:, :h, :w])
    return x + block.drop_path2(block.mlp(block.norm2(x)))


def load_swin_file(model: nn.Module, path: str | Path) -> None:
    """Load ImageNet weights into a timm SwinTransformer from a file in timm names or in the original
    Swin release's names (converted by timm's ``checkpoint_filter_fn``); only the classifier and the
    final norm may be absent."""
    from timm.models.swin_transformer import checkpoint_filter_fn

    state = checkpoint_filter_fn(load_weights_file(path), model)
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(("head.", "norm."))]
    if missing or unexpected:
        raise ValueError(f"{path} does not fit {model.default_cfg.get('architecture', 'the Swin model')}: missing "
                         f"{missing[:8]}{'...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}")


class SwinBackbone(nn.Module):
    """Swin Transformer from timm (its modules and parameter names), run as the released detection
    backbone (Sense-X/Co-DETR ``SwinTransformerV1``, mmdet ``SwinTransformer``).

    Returns the stages in ``out_indices`` (0..3 at strides 4, 8, 16, 32; channels embed_dim * 2^i),
    each through its own LayerNorm ``norm{i}``. The image is zero-padded to a multiple of the patch
    size, every block pads to a multiple of the window before shifting (:func:`swin_block`), and the
    window keeps its size on small maps. timm's stage i starts with the patch merging that the
    released code puts at the end of stage i - 1.

    frozen_stages: -1 trains everything, 0 freezes the patch embedding, k also freezes the first k
    stages with the patch merging after each and their output norms (mmdet's convention; such
    parts stay in eval mode). drop_path_rate: stochastic depth, rising linearly over the blocks to
    this value. with_cp: activation checkpointing of every block. timm_args: architecture overrides
    passed to ``timm.create_model`` (e.g. embed_dim, depths, num_heads for a tiny test model).
    """

    def __init__(self, name: str = "swin_tiny_patch4_window7_224", weights: str | None = None, frozen_stages: int = -1,
                 out_indices: tuple[int, ...] = (1, 2, 3), drop_path_rate: float = 0.0, with_cp: bool = False,
                 timm_args: dict[str, Any] | None = None) -> None:
        super().__init__()
        import timm

        _check_out_indices(out_indices)
        if name not in SWINS:
            raise ValueError(f"unknown backbone {name!r}; choose from {list(RESNETS) + list(SWINS) + list(VITS)}")
        if weights == "timm" and timm_args:
            raise ValueError(f"model.backbone.timm_args {timm_args} change the architecture; timm's pretrained {name} "
                             "weights do not fit it")
        kwargs = dict(num_classes=0, strict_img_size=False, always_partition=True, drop_path_rate=drop_path_rate,
                      **(timm_args or {}))
        try:
            model = timm.create_model(name, pretrained=weights == "timm", **kwargs)
        except OSError as err:
            cfg = timm.models.get_pretrained_cfg(name)
            raise _offline_hint(f"timm's pretrained {name} ({cfg.hf_hub_id or cfg.url})", cfg.url or cfg.hf_hub_id,
                                err) from err
        if weights not in (None, "timm"):
            load_swin_file(model, weights)
        self.patch_embed, self.layers = model.patch_embed, model.layers
        self.out_indices = list(out_indices)
        dims = [stage.blocks[0].norm1.normalized_shape[0] for stage in self.layers]
        self.out_channels = [dims[i] for i in self.out_indices]
        for i in self.out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(dims[i]))
        self.with_cp = with_cp
        frozen: list[nn.Module] = [] if frozen_stages < 0 else [self.patch_embed]
        for i in range(min(frozen_stages, len(self.layers))):
            frozen.append(self.layers[i].blocks)
            if i + 1 < len(self.layers):
                frozen.append(self.layers[i + 1].downsample)
            if i in self.out_indices:
                frozen.append(getattr(self, f"norm{i}"))
        self._frozen = frozen
        for module in frozen:
            module.requires_grad_(False)

    def train(self, mode: bool = True) -> SwinBackbone:
        super().train(mode)
        for module in self._frozen:
            module.eval()
        return self

    def forward(self, images: Tensor) -> list[Tensor]:
        """images (B, 3, H, W) -> the maps of ``out_indices``, stage i of shape
        (B, out_channels, ceil(H / 2^(i+2)), ceil(W / 2^(i+2)))."""
        patch_h, patch_w = self.patch_embed.patch_size
        h, w = images.shape[-2:]
        x = self.patch_embed(F.pad(images, (0, (-w) % patch_w, 0, (-h) % patch_h)))  # (B, H/4, W/4, C)
        outs = []
        for i, stage in enumerate(self.layers):
            if i > self.out_indices[-1]:
                break
            x = stage.downsample(x)
            for block in stage.blocks:
                x = maybe_checkpoint(swin_block, block, x, enabled=self.with_cp)
            if i in self.out_indices:
                outs.append(getattr(self, f"norm{i}")(x).permute(0, 3, 1, 2).contiguous())
        return outs


def build_vit(cfg: BackboneConfig) -> nn.Module:
    """The plain ViT of ``cfg.name`` (architecture overridable by ``timm_args``), window blocks of
    ``window_size`` with every ``global_every``-th block global; one map at stride 16. Its weights come
    with the detector's (``codetr convert mmdet``, ``train.init``): the released configs start from a
    detection checkpoint, not from ImageNet weights."""
    from codetr.models.vit import ViT, interleaved_window_blocks

    if cfg.weights is not None:
        raise ValueError(f"model.backbone.weights={cfg.weights!r}: {cfg.name} loads its weights with the detector's "
                         "(codetr convert mmdet, then train.init or --weights); set model.backbone.weights=null")
    unknown = set(cfg.timm_args) - set(VITS[cfg.name])
    if unknown:
        raise ValueError(f"model.backbone.timm_args {sorted(unknown)} are not ViT arguments; choose from {sorted(VITS[cfg.name])}")
    arch = VITS[cfg.name] | cfg.timm_args
    return ViT(**arch, window_size=cfg.window_size, window_block_indexes=interleaved_window_blocks(arch["depth"], cfg.global_every),
               drop_path_rate=cfg.drop_path_rate, use_act_checkpoint=cfg.with_cp)


def build_backbone(cfg: BackboneConfig) -> nn.Module:
    """The backbone of a config; it has ``out_channels`` (one per returned map)."""
    if cfg.name in VITS:
        return build_vit(cfg)
    if cfg.name in SWINS:
        return SwinBackbone(cfg.name, cfg.weights, cfg.frozen_stages, tuple(cfg.out_indices), cfg.drop_path_rate,
                            cfg.with_cp, cfg.timm_args)
    if cfg.timm_args:
        raise ValueError(f"model.backbone.timm_args apply to timm (Swin) backbones, not {cfg.name}")
    return ResNetBackbone(cfg.name, cfg.weights, cfg.frozen_stages, cfg.norm, tuple(cfg.out_indices), cfg.with_cp)

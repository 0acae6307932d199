"""Backbones: torchvision ResNets with frozen batch norm, returning the chosen stages (C2-C5)."""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

from codetr.config import BackboneConfig

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")
NORMS = {"frozen_bn": FrozenBatchNorm2d, "group_norm": lambda channels: nn.GroupNorm(32, channels)}


def load_weights_file(path: str | Path) -> dict[str, Tensor]:
    """A state_dict from a .safetensors file or a torch checkpoint (loaded with weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state


class ResNetBackbone(nn.Module):
    """ResNet stem and stages with torchvision's parameter names; returns the outputs of the
    stages in ``out_indices`` (0 = layer1 / C2 at stride 4, ..., 3 = layer4 / C5 at stride 32).

    weights: None (random), "torchvision" (ImageNet weights, downloaded by torchvision), or a
    file holding a torchvision-named ResNet state_dict. ``frozen_stages``: -1 trains everything,
    0 freezes the stem, k freezes the stem and layer1..layerk. ``norm``: "frozen_bn" (batch norm
    with fixed statistics, for pretrained weights) or "group_norm" (GroupNorm(32), trained: for a
    backbone trained from scratch; frozen batch norm at its initial identity would leave it
    unnormalised: in the tiny configs its C5 activations grew to a std of 600-4400 in 8 epochs).
    """

    def __init__(self, name: str = "resnet50", weights: str | None = None, frozen_stages: int = 1,
                 norm: str = "frozen_bn", out_indices: tuple[int, ...] = (1, 2, 3)) -> None:
        super().__init__()
        if not out_indices or sorted(set(out_indices)) != list(out_indices) or not set(out_indices) <= {0, 1, 2, 3}:
            raise ValueError(f"backbone out_indices must be increasing stage indices in 0..3, got {list(out_indices)}")
        if name not in RESNETS:
            raise ValueError(f"unknown backbone {name!r}; choose from {RESNETS}")
        if norm not in NORMS:
            raise ValueError(f"unknown backbone norm {norm!r}; choose from {list(NORMS)}")
        net = getattr(torchvision.models, name)(weights="DEFAULT" if weights == "torchvision" else None,
                                                 norm_layer=NORMS[norm])
        if weights not in (None, "torchvision"):
            state = {k: v for k, v in load_weights_file(weights).items() if not k.startswith("fc.")}
            net.load_state_dict(state, strict=False)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        expansion = 4 if name in ("resnet50", "resnet101") else 1
        self.out_indices = list(out_indices)
        self.out_channels = [64 * 2**i * expansion for i in self.out_indices]
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
            x = layer(x)
            if i in self.out_indices:
                outs.append(x)
        return outs


def build_backbone(cfg: BackboneConfig) -> nn.Module:
    """The backbone of a config; it has ``out_channels`` (one per returned map)."""
    return ResNetBackbone(cfg.name, cfg.weights, cfg.frozen_stages, cfg.norm, tuple(cfg.out_indices))

"""torchvision ResNets with frozen batch norm (or group norm), returning the stages in ``out_indices``;
and reading a backbone's ImageNet weights (:func:`read_backbone_file`, :func:`offline_hint`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

from codetr.models.activation_checkpoint import maybe_checkpoint

RESNETS = {"resnet18": 1, "resnet34": 1, "resnet50": 4, "resnet101": 4}  # name -> block expansion


class FrozenBatchNorm(FrozenBatchNorm2d):
    """torchvision's FrozenBatchNorm2d (same buffers, same numbers) with one intermediate fewer:
    ``x * scale`` then an in-place ``+ bias``, instead of two fresh tensors. x (B, C, H, W)."""

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        bias = self.bias - self.running_mean * scale
        return (x * scale.view(1, -1, 1, 1)).add_(bias.view(1, -1, 1, 1))


NORMS = {"frozen_bn": FrozenBatchNorm, "group_norm": lambda channels: nn.GroupNorm(32, channels)}
TORCHVISION_WEIGHTS = {"torchvision": "IMAGENET1K_V1", "torchvision_v2": "IMAGENET1K_V2"}


def read_backbone_file(path: str | Path) -> dict[str, Tensor]:
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


def offline_hint(what: str, url: str, err: Exception) -> RuntimeError:
    return RuntimeError(
        f"could not download {what} from {url} ({type(err).__name__}: {err}). Without network, download the file "
        "on another machine and set model.backbone.weights to its path (or model.backbone.weights=null for a "
        "random initialisation)")


def check_out_indices(out_indices: tuple[int, ...]) -> None:
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
            raise offline_hint(f"torchvision's ImageNet weights {name} {tag}", entry.url, err) from err
        source = f"torchvision {name} {tag}"
    else:
        state, source = read_backbone_file(weights), str(weights)
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
        check_out_indices(out_indices)
        if name not in RESNETS:
            raise ValueError(f"unknown backbone {name!r}; choose from {list(RESNETS)}")
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



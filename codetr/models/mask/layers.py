"""Small convolution blocks of the released mask heads, named as mmcv names them (``conv``, and ``norm``
for the norm, which mmcv calls ``norm_layer`` when it is the release's ``LN2d``: the converter renames it)."""

from __future__ import annotations

import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import Tensor, nn


class ConvBlock(nn.Module):
    """mmcv's ``ConvModule``: conv (bias only without a norm), optional LayerNorm2d, optional ReLU.
    Conv weights kaiming-normal (fan_out, relu) as mmcv initialises them. The norm is the release's ``LN2d``
    as its ConvModules build it, eps 1e-5 (``LN2d`` defaults to 1e-6, but mmcv's ``build_norm_layer`` sets
    1e-5 when the config names none, and the released mask heads' ``norm_cfg=dict(type='LN2d')`` names none)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 dilation: int = 1, norm: bool = False, relu: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, bias=not norm)
        self.norm = LayerNorm2d(out_channels, eps=1e-5) if norm else None
        self.relu = relu
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        if self.conv.bias is not None:
            nn.init.zeros_(self.conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x)
        return F.relu(x) if self.relu else x


def conv1x1(in_channels: int, out_channels: int) -> nn.Conv2d:
    """A 1x1 conv with bias, kaiming-normal (fan_out, relu) weights and zero bias."""
    conv = nn.Conv2d(in_channels, out_channels, 1)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    nn.init.zeros_(conv.bias)
    return conv

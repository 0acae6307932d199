"""Simple feature pyramid of the released Co-DINO ViT-L (Sense-X/Co-DETR ``mmdet/models/necks/sfp.py``):
five maps at strides 4-64 from the ViT's single stride-16 map."""

from __future__ import annotations

from timm.layers import LayerNorm2d
from torch import Tensor, nn


def conv_ln(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, act: bool = True) -> list[nn.Module]:
    """Bias-free conv, channel LayerNorm (eps 1e-6), then GELU unless ``act`` is False."""
    layers = [nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
              LayerNorm2d(out_channels, eps=1e-6)]
    return layers + [nn.GELU()] if act else layers


class SimpleFeaturePyramid(nn.Module):
    """p2-p6 from one map of C = ``in_channels`` channels at stride s (s = 16 for the ViT):

    - p2 (s/4): 2x nearest upsampling + 3x3 conv to C/2, again to C/4;
    - p3 (s/2): 2x nearest upsampling + 3x3 conv to C/2;
    - p4 (s): the map itself;
    - p5 (2s): 3x3 stride-2 max pooling;
    - p6 (4s): max pooling, then a 3x3 stride-2 conv keeping C channels;

    each then a 1x1 conv to ``out_channels`` and a 3x3 conv; every conv is followed by a LayerNorm2d
    and all but the last of each level by a GELU. As released: nearest upsampling + conv (no
    transposed convolutions), p2 only with ``use_p2``, xavier-uniform conv weights. Module indexes
    within each ``p{k}`` Sequential are the released ones, so checkpoint keys load unchanged.
    ``out_channels`` (attribute): one entry per returned map.
    """

    def __init__(self, in_channels: int = 1024, out_channels: int = 256, use_p2: bool = True) -> None:
        super().__init__()
        c, out = in_channels, out_channels
        if c % 4:
            raise ValueError(f"SimpleFeaturePyramid in_channels {c} must be divisible by 4")

        def tail(channels: int) -> list[nn.Module]:
            return conv_ln(channels, out, 1) + conv_ln(out, out, 3, act=False)

        def up() -> nn.Module:
            return nn.Upsample(scale_factor=2.0, mode="nearest")

        def pool() -> nn.Module:
            return nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        if use_p2:
            self.p2 = nn.Sequential(up(), *conv_ln(c, c // 2, 3), up(), *conv_ln(c // 2, c // 4, 3), *tail(c // 4))
        self.p3 = nn.Sequential(up(), *conv_ln(c, c // 2, 3), *tail(c // 2))
        self.p4 = nn.Sequential(*tail(c))
        self.p5 = nn.Sequential(pool(), *tail(c))
        self.p6 = nn.Sequential(pool(), *conv_ln(c, c, 3, stride=2), *tail(c))
        self.levels = (["p2"] if use_p2 else []) + ["p3", "p4", "p5", "p6"]
        self.out_channels = [out] * len(self.levels)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_uniform_(module.weight)

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        """feats: [(B, C, H, W)] -> [p2 (B, out, 4H, 4W), p3 (2H, 2W), p4 (H, W), p5 (ceil(H/2), ceil(W/2)),
        p6 (ceil(H/4), ceil(W/4))] (p2 only with use_p2)."""
        if len(feats) != 1:
            raise ValueError(f"SimpleFeaturePyramid takes the backbone's single map, got {len(feats)} maps")
        return [getattr(self, name)(feats[0]) for name in self.levels]

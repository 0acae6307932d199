"""timm Swin Transformers run as the released detection backbone (stages in ``out_indices``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from codetr.models.activation_checkpoint import maybe_checkpoint
from codetr.models.backbones.resnet import check_out_indices, offline_hint, read_backbone_file

# timm Swin names used by the released configs (window 7 at 224 px pretraining, window 12 at 384 px).
SWINS = ("swin_tiny_patch4_window7_224", "swin_small_patch4_window7_224", "swin_base_patch4_window7_224",
         "swin_base_patch4_window12_384", "swin_large_patch4_window7_224", "swin_large_patch4_window12_384")


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

    state = checkpoint_filter_fn(read_backbone_file(path), model)
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

        check_out_indices(out_indices)
        if name not in SWINS:
            raise ValueError(f"unknown backbone {name!r}; choose from {list(SWINS)}")
        if weights == "timm" and timm_args:
            raise ValueError(f"model.backbone.timm_args {timm_args} change the architecture; timm's pretrained {name} "
                             "weights do not fit it")
        kwargs = dict(num_classes=0, strict_img_size=False, always_partition=True, drop_path_rate=drop_path_rate,
                      **(timm_args or {}))
        try:
            model = timm.create_model(name, pretrained=weights == "timm", **kwargs)
        except OSError as err:
            cfg = timm.models.get_pretrained_cfg(name)
            raise offline_hint(f"timm's pretrained {name} ({cfg.hf_hub_id or cfg.url})", cfg.url or cfg.hf_hub_id,
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

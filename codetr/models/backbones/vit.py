"""EVA-02-style plain ViT: the backbone of the released Co-DINO ViT-L (Sense-X/Co-DETR
``mmdet/models/backbones/vit.py``), assembled from timm's EVA parts.

timm's ``Eva`` model is not the released network as a whole (it has no window attention), but
its attention (``EvaAttention``: q/k/v projections without a k bias, 2-d RoPE
on q and k), its sub-normed SwiGLU MLP and its rotary tables are the released ones; the window
partition, the interpolated absolute position embedding and the output norm are ours.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import DropPath, PatchEmbed, SwiGLU, build_rotary_pos_embed
from timm.models.eva import EvaAttention
from torch import Tensor, nn

from codetr.config import BackboneConfig
from codetr.models.activation_checkpoint import maybe_checkpoint


def rope_table(grid: tuple[int, int], head_dim: int, ref_grid: int, device: torch.device | None = None) -> Tensor:
    """The 2-d rotary table of a (H, W) token grid: (H*W, 2 * head_dim), [sin | cos], tokens row-major.

    Channel pair (2j, 2j+1) of a head is rotated by the angle pos * 10000^(-j' / (head_dim / 4)),
    where pos is the row (pairs j < head_dim / 4, j' = j) or the column (the other pairs,
    j' = j - head_dim / 4), rescaled as EVA-02 does to the pretraining grid: row * ref_grid / H.
    """
    sin, cos = build_rotary_pos_embed(list(grid), dim=head_dim, in_pixels=False, ref_feat_shape=[ref_grid, ref_grid], device=device)
    return torch.cat([sin, cos], dim=-1)


def window_partition(x: Tensor, window_size: int) -> tuple[Tensor, tuple[int, int]]:
    """(B, H, W, C) -> (B * num_windows, window_size, window_size, C), windows row-major per image,
    after zero padding at the bottom and right to multiples of window_size; also the padded (Hp, Wp)."""
    b, h, w, c = x.shape
    pad_h, pad_w = -h % window_size, -w % window_size
    x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // window_size, window_size, wp // window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, c), (hp, wp)


def window_unpartition(windows: Tensor, window_size: int, padded_hw: tuple[int, int], hw: tuple[int, int]) -> Tensor:
    """Inverse of ``window_partition``: (B * num_windows, ws, ws, C) -> (B, H, W, C) without the padding."""
    (hp, wp), (h, w) = padded_hw, hw
    b = windows.shape[0] // ((hp // window_size) * (wp // window_size))
    x = windows.view(b, hp // window_size, wp // window_size, window_size, window_size, -1)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)[:, :h, :w]


class ViTBlock(nn.Module):
    """Pre-norm block: attention over the whole grid or within windows, then the SwiGLU MLP whose
    hidden activations are layer-normed (EVA-02's sub-LN, released ``ffn_ln``).

    In a window block the normed tokens are cut into window_size x window_size windows; the zero
    tokens padding the last windows take part in the attention (as released: no mask)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, window_size: int = 0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = EvaAttention(dim, num_heads=num_heads, qkv_bias=True, qkv_fused=False, num_prefix_tokens=0,
                                 norm_layer=None, scale_norm=False)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = SwiGLU(dim, int(dim * mlp_ratio), norm_layer=partial(nn.LayerNorm, eps=1e-6))

    def forward(self, x: Tensor, rope: Tensor) -> Tensor:
        """x (B, H, W, C); rope: ``rope_table`` of the attended grid (the window, or (H, W)) -> (B, H, W, C)."""
        b, h, w, c = x.shape
        y = self.norm1(x)
        if self.window_size:
            y, padded_hw = window_partition(y, self.window_size)
        grid = y.shape[1:3]
        y = self.attn(y.flatten(1, 2), rope=rope).view(-1, *grid, c)
        if self.window_size:
            y = window_unpartition(y, self.window_size, padded_hw, (h, w))
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ViT(nn.Module):
    """Plain ViT as released for Co-DINO ViT-L: 16x16 patches, an absolute position embedding
    learnt at ``pretrain_img_size`` (with an unused class-token slot, as in the checkpoint)
    bicubically resized to the input grid, blocks with 2-d RoPE (global blocks: the input grid
    rescaled to ``rope_ref_grid``; window blocks: the window rescaled likewise), and a final
    LayerNorm. Drop-path rates rise linearly from 0 to ``drop_path_rate`` over the blocks.

    The RoPE tables are computed per input. The released code does so for global blocks in the
    COCO config; its LVIS config (``use_lsj=True``) precomputes the global table for its fixed
    1536 x 1536 input, which is the same table at that size (and fails at any other).

    ``use_act_checkpoint`` recomputes each block's activations in the backward pass (the released
    fairscale ``checkpoint_wrapper``). ``out_channels``: [embed_dim], one map at stride patch_size.
    """

    def __init__(self, embed_dim: int = 1024, depth: int = 24, num_heads: int = 16, patch_size: int = 16,
                 mlp_ratio: float = 4 * 2 / 3, window_size: int = 24, window_block_indexes: Sequence[int] = (),
                 pretrain_img_size: int = 512, rope_ref_grid: int = 16, drop_path_rate: float = 0.0,
                 use_act_checkpoint: bool = False, in_chans: int = 3) -> None:
        super().__init__()
        if embed_dim % num_heads or (embed_dim // num_heads) % 4:
            raise ValueError(f"ViT embed_dim {embed_dim} must split into {num_heads} heads of a size divisible by 4 (2-d RoPE)")
        if window_block_indexes and window_size <= 0:
            raise ValueError(f"ViT window_block_indexes {list(window_block_indexes)} need a positive window_size, got {window_size}")
        self.head_dim = embed_dim // num_heads
        self.window_size = window_size
        self.window_block_indexes = sorted(i for i in set(window_block_indexes) if i < depth)
        self.rope_ref_grid = rope_ref_grid
        self.use_act_checkpoint = use_act_checkpoint
        self.out_channels = [embed_dim]
        self.patch_embed = PatchEmbed(img_size=None, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                                      flatten=False, output_fmt="NHWC", strict_img_size=False)
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (pretrain_img_size // patch_size) ** 2, embed_dim))
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(
            ViTBlock(embed_dim, num_heads, mlp_ratio, window_size if i in self.window_block_indexes else 0, rates[i])
            for i in range(depth))
        self.out_norm = nn.LayerNorm(embed_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """As released: truncated-normal (std 0.02) linear weights and position embedding, zero
        biases, unit LayerNorms; the patch projection keeps PyTorch's default."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def abs_pos_embed(self, grid: tuple[int, int]) -> Tensor:
        """The position embedding without its class-token slot, bicubically resized (align_corners
        False, no antialiasing) to the (H, W) token grid: (1, H, W, C)."""
        pos = self.pos_embed[:, 1:]
        size = int(pos.shape[1] ** 0.5)
        pos = pos.reshape(1, size, size, -1)
        if (size, size) == tuple(grid):
            return pos
        return F.interpolate(pos.permute(0, 3, 1, 2), size=grid, mode="bicubic", align_corners=False).permute(0, 2, 3, 1)

    def forward(self, images: Tensor) -> list[Tensor]:
        """images (B, 3, H, W) -> [(B, embed_dim, H // patch_size, W // patch_size)]."""
        x = self.patch_embed(images)
        grid = (x.shape[1], x.shape[2])
        x = x + self.abs_pos_embed(grid)
        global_rope = rope_table(grid, self.head_dim, self.rope_ref_grid, x.device)
        window_rope = (rope_table((self.window_size, self.window_size), self.head_dim, self.rope_ref_grid, x.device)
                       if self.window_block_indexes else None)
        for block in self.blocks:
            rope = window_rope if block.window_size else global_rope
            x = maybe_checkpoint(block, x, rope, enabled=self.use_act_checkpoint)
        return [self.out_norm(x).permute(0, 3, 1, 2).contiguous()]


def interleaved_window_blocks(depth: int, global_every: int) -> list[int]:
    """Indexes of the window blocks when every ``global_every``-th block (the last of each group)
    attends globally: released COCO ViT-L (global_every=4) 0-2, 4-6, ...; LVIS (3) 0-1, 3-4, ..."""
    return [i for i in range(depth) if i % global_every != global_every - 1]


def vit_large(window_size: int = 24, global_every: int = 4, drop_path_rate: float = 0.4,
              use_act_checkpoint: bool = True) -> ViT:
    """Co-DINO's ViT-L (304M parameters): embed 1024, depth 24, 16 heads, position embedding of a
    512 pretraining size. Defaults: the released COCO config; LVIS: window_size=16, global_every=3,
    drop_path_rate=0.3."""
    return ViT(embed_dim=1024, depth=24, num_heads=16, window_size=window_size,
               window_block_indexes=interleaved_window_blocks(24, global_every), pretrain_img_size=512,
               drop_path_rate=drop_path_rate, use_act_checkpoint=use_act_checkpoint)


RENAMES = {"attn.q_bias": "attn.q_proj.bias", "attn.v_bias": "attn.v_proj.bias", "mlp.w1.": "mlp.fc1_g.",
           "mlp.w2.": "mlp.fc1_x.", "mlp.ffn_ln.": "mlp.norm.", "mlp.w3.": "mlp.fc2."}


def convert_vit_state_dict(released: Mapping[str, Tensor], window_size: int, window_block_indexes: Sequence[int]) -> dict[str, Tensor]:
    """The released ViT's state_dict (keys without the ``backbone.`` prefix) -> this ``ViT``'s.

    Renames q_bias / v_bias to the projections' biases and the SwiGLU's w1 (gate), w2, ffn_ln, w3
    to timm's fc1_g, fc1_x, norm, fc2; every other key keeps its name. The RoPE tables
    (``rope_win.*``, ``rope_glb.*``, ``blocks.{i}.attn.rope.*``: buffers we recompute) are dropped,
    after checking that they describe the windows of ``window_size`` / ``window_block_indexes``:
    those settings change no parameter shape, so COCO weights (24x24 windows, every 4th block
    global) would otherwise load silently into an LVIS-configured ViT (16x16, every 3rd).
    """
    _check_rope_tables(released, window_size, set(window_block_indexes))
    converted = {}
    for key, value in released.items():
        if key.startswith(("rope_win.", "rope_glb.")) or ".attn.rope." in key:
            continue
        for old, new in RENAMES.items():
            key = key.replace(old, new)
        converted[key] = value
    return converted


def _check_rope_tables(released: Mapping[str, Tensor], window_size: int, window_blocks: set[int]) -> None:
    """Released tables are (tokens, head_dim): rope_win and the window blocks' have window_size^2
    tokens; global blocks have none, or (released use_lsj=True) the shared rope_glb table."""
    tokens = {key: value.shape[0] for key, value in released.items() if key.endswith(".freqs_cos")}
    if not tokens:
        return
    depth = len({key.split(".")[1] for key in released if key.startswith("blocks.") and key.endswith(".norm1.weight")})
    expected = {"rope_win.freqs_cos": window_size**2}
    for i in range(depth):
        expected[f"blocks.{i}.attn.rope.freqs_cos"] = window_size**2 if i in window_blocks else tokens.get("rope_glb.freqs_cos")
    def describe(n: int | None) -> str:
        return "no RoPE table" if n is None else f"a RoPE table of {n} tokens"

    for key in [*expected, *sorted(set(tokens) - set(expected) - {"rope_glb.freqs_cos"})]:
        if tokens.get(key) != expected.get(key):
            raise ValueError(f"ViT state_dict entry {key!r}: the checkpoint has {describe(tokens.get(key))} where this ViT "
                             f"(window_size={window_size}, window blocks {sorted(window_blocks)}) expects "
                             f"{describe(expected.get(key))}: the checkpoint belongs to another config")


# Plain ViTs (the ViT above, built from timm parts): name -> architecture (released Co-DINO ViT-L:
# 16x16 patches, 24 blocks of 1024 channels and 16 heads, position embedding of a 512 px pretraining).
VITS = {"vit_large": dict(embed_dim=1024, depth=24, num_heads=16, pretrain_img_size=512)}


def build_vit(cfg: BackboneConfig) -> nn.Module:
    """The plain ViT of ``cfg.name`` (architecture overridable by ``timm_args``), window blocks of
    ``window_size`` with every ``global_every``-th block global; one map at stride 16. Its weights come
    with the detector's (``codetr convert mmdet``, ``train.init``): the released configs start from a
    detection checkpoint, not from ImageNet weights."""
    if cfg.weights is not None:
        raise ValueError(f"model.backbone.weights={cfg.weights!r}: {cfg.name} loads its weights with the detector's "
                         "(codetr convert mmdet, then train.init or --weights); set model.backbone.weights=null")
    unknown = set(cfg.timm_args) - set(VITS[cfg.name])
    if unknown:
        raise ValueError(f"model.backbone.timm_args {sorted(unknown)} are not ViT arguments; choose from {sorted(VITS[cfg.name])}")
    arch = VITS[cfg.name] | cfg.timm_args
    return ViT(**arch, window_size=cfg.window_size, window_block_indexes=interleaved_window_blocks(arch["depth"], cfg.global_every),
               drop_path_rate=cfg.drop_path_rate, use_act_checkpoint=cfg.with_cp)

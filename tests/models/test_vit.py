"""EVA-02-style ViT backbone and simple feature pyramid of the released Co-DINO ViT-L."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from timm.layers import apply_rot_embed_cat
from timm.models.eva import Eva
from torch import Tensor, nn

from codetr.models.necks.sfp import SimpleFeaturePyramid
from codetr.models.backbones.vit import (ViT, ViTBlock, convert_vit_state_dict, interleaved_window_blocks, rope_table, vit_large,
                                         window_partition, window_unpartition)

DATA = Path(__file__).parents[1] / "fixtures"
pytestmark = pytest.mark.usefixtures("one_thread")


def rope_angles(grid: tuple[int, int], head_dim: int, ref_grid: int) -> Tensor:
    """Angle of each channel pair of each token, (H*W, head_dim / 2), by the released formula written
    out: pair j < head_dim/4 turns with the row, the others with the column, at frequency
    10000^(-j'/(head_dim/4)), the position rescaled to the pretraining grid (pos * ref_grid / size)."""
    h, w = grid
    quarter = head_dim // 4
    angles = torch.zeros(h * w, head_dim // 2, dtype=torch.float64)
    for n in range(h * w):
        row, col = divmod(n, w)
        for j in range(head_dim // 2):
            pos = row * ref_grid / h if j < quarter else col * ref_grid / w
            angles[n, j] = pos * 10000.0 ** (-(j % quarter) / quarter)
    return angles


def rotate_pairs(x: Tensor, angles: Tensor) -> Tensor:
    """Rotate channels (2j, 2j+1) of x (..., N, D) by angles (N, D/2)."""
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)


def test_rope_table_rotates_each_channel_pair_by_its_position_angle() -> None:
    for grid, ref in [((5, 7), 16), ((4, 4), 16), ((3, 3), 8)]:
        x = torch.randn(2, 3, grid[0] * grid[1], 32, dtype=torch.float64)
        ours = apply_rot_embed_cat(x, rope_table(grid, 32, ref).double())
        # the table is computed in float32 (as released): angles up to ~16 rad carry ~1e-6 error
        torch.testing.assert_close(ours, rotate_pairs(x, rope_angles(grid, 32, ref)), rtol=0, atol=1e-5)


def test_window_partition_round_trip_and_layout() -> None:
    x = torch.randn(2, 7, 10, 5)
    windows, padded = window_partition(x, 3)
    assert padded == (9, 12) and windows.shape == (2 * 3 * 4, 3, 3, 5)
    padded_x = F.pad(x, (0, 0, 0, 2, 0, 2))
    for b in range(2):
        for r in range(3):
            for c in range(4):
                assert torch.equal(windows[b * 12 + r * 4 + c], padded_x[b, 3 * r:3 * r + 3, 3 * c:3 * c + 3])
    assert torch.equal(window_unpartition(windows, 3, padded, (7, 10)), x)


def test_window_attention_equals_global_attention_in_each_window() -> None:
    torch.manual_seed(0)
    block = ViTBlock(dim=32, num_heads=2, mlp_ratio=8 / 3, window_size=3).eval()
    x = torch.randn(2, 5, 7, 32)
    rope = rope_table((3, 3), 16, 16)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # non-zero norm biases: padding must come after norm1
        ours = block(x, rope)
        # naive: zero-pad the normed tokens to 6 x 9, attend globally inside each 3 x 3 crop
        y = F.pad(block.norm1(x), (0, 0, 0, 2, 0, 1))
        attended = torch.zeros_like(y)
        for r in range(0, 6, 3):
            for c in range(0, 9, 3):
                crop = y[:, r:r + 3, c:c + 3]
                attended[:, r:r + 3, c:c + 3] = block.attn(crop.reshape(2, 9, 32), rope=rope).reshape(2, 3, 3, 32)
        naive = x + attended[:, :5, :7]
        naive = naive + block.mlp(block.norm2(naive))
    torch.testing.assert_close(ours, naive, rtol=0, atol=1e-5)


TINY = dict(dim=64, depth=4, heads=2, hidden=int(64 * 8 / 3), pretrain_grid=4, window_size=3, window_blocks=[0, 1, 3])


def released_tiny_state_dict(seed: int = 0) -> dict[str, Tensor]:
    """Random weights under the released ViT's key names (mmdet/models/backbones/vit.py), with its RoPE buffers."""
    g = torch.Generator().manual_seed(seed)
    dim, hidden, ws = TINY["dim"], TINY["hidden"], TINY["window_size"]

    def rand(*shape: int, scale: float = 0.1, mean: float = 0.0) -> Tensor:
        return torch.randn(*shape, generator=g) * scale + mean

    table = rope_angles((ws, ws), dim // TINY["heads"], 16).repeat_interleave(2, -1).float()
    sd = {"pos_embed": rand(1, 1 + TINY["pretrain_grid"] ** 2, dim), "patch_embed.proj.weight": rand(dim, 3, 16, 16, scale=0.02),
          "patch_embed.proj.bias": rand(dim), "rope_win.freqs_cos": table.cos(), "rope_win.freqs_sin": table.sin()}
    for i in range(TINY["depth"]):
        p = f"blocks.{i}."
        sd |= {p + "norm1.weight": rand(dim, mean=1.0), p + "norm1.bias": rand(dim),
               p + "attn.q_bias": rand(dim), p + "attn.v_bias": rand(dim),
               p + "attn.q_proj.weight": rand(dim, dim), p + "attn.k_proj.weight": rand(dim, dim), p + "attn.v_proj.weight": rand(dim, dim),
               p + "attn.proj.weight": rand(dim, dim), p + "attn.proj.bias": rand(dim), p + "norm2.weight": rand(dim, mean=1.0),
               p + "norm2.bias": rand(dim), p + "mlp.w1.weight": rand(hidden, dim), p + "mlp.w1.bias": rand(hidden),
               p + "mlp.w2.weight": rand(hidden, dim), p + "mlp.w2.bias": rand(hidden), p + "mlp.ffn_ln.weight": rand(hidden, mean=1.0),
               p + "mlp.ffn_ln.bias": rand(hidden), p + "mlp.w3.weight": rand(dim, hidden), p + "mlp.w3.bias": rand(dim)}
        if i in TINY["window_blocks"]:
            sd |= {p + "attn.rope.freqs_cos": sd["rope_win.freqs_cos"], p + "attn.rope.freqs_sin": sd["rope_win.freqs_sin"]}
    return sd | {"out_norm.weight": rand(dim, mean=1.0), "out_norm.bias": rand(dim)}


def released_attention(y: Tensor, sd: dict[str, Tensor], p: str) -> Tensor:
    """Released ``Attention`` on a (B, h, w, C) grid: q with q_bias, k without bias, v with v_bias,
    RoPE of the (h, w) grid on q and k, softmax(q k^T / sqrt(d)) v, output projection."""
    b, h, w, c = y.shape
    heads = TINY["heads"]
    t = y.reshape(b, h * w, c)
    q = F.linear(t, sd[p + "attn.q_proj.weight"], sd[p + "attn.q_bias"])
    k = F.linear(t, sd[p + "attn.k_proj.weight"])
    v = F.linear(t, sd[p + "attn.v_proj.weight"], sd[p + "attn.v_bias"])
    q, k, v = (z.reshape(b, h * w, heads, -1).transpose(1, 2) for z in (q, k, v))
    angles = rope_angles((h, w), c // heads, 16)
    q, k = rotate_pairs(q, angles), rotate_pairs(k, angles)
    attn = (q @ k.transpose(-2, -1) / math.sqrt(c // heads)).softmax(-1)
    out = (attn @ v).transpose(1, 2).reshape(b, h * w, c)
    return F.linear(out, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"]).reshape(b, h, w, c)


def released_forward(sd: dict[str, Tensor], images: Tensor) -> Tensor:
    """The released ViT written out with functional ops and explicit loops over windows."""
    x = F.conv2d(images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=16).permute(0, 2, 3, 1)
    b, h, w, c = x.shape
    g, ws = TINY["pretrain_grid"], TINY["window_size"]
    pos = sd["pos_embed"][:, 1:].reshape(1, g, g, c).permute(0, 3, 1, 2)
    x = x + F.interpolate(pos, size=(h, w), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    for i in range(TINY["depth"]):
        p = f"blocks.{i}."
        y = F.layer_norm(x, (c,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-6)
        if i in TINY["window_blocks"]:
            y = F.pad(y, (0, 0, 0, -w % ws, 0, -h % ws))
            out = torch.zeros_like(y)
            for r in range(0, y.shape[1], ws):
                for col in range(0, y.shape[2], ws):
                    out[:, r:r + ws, col:col + ws] = released_attention(y[:, r:r + ws, col:col + ws], sd, p)
            y = out[:, :h, :w]
        else:
            y = released_attention(y, sd, p)
        x = x + y
        y = F.layer_norm(x, (c,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-6)
        gate = F.silu(F.linear(y, sd[p + "mlp.w1.weight"], sd[p + "mlp.w1.bias"]))
        hidden = gate * F.linear(y, sd[p + "mlp.w2.weight"], sd[p + "mlp.w2.bias"])
        hidden = F.layer_norm(hidden, (hidden.shape[-1],), sd[p + "mlp.ffn_ln.weight"], sd[p + "mlp.ffn_ln.bias"], eps=1e-6)
        x = x + F.linear(hidden, sd[p + "mlp.w3.weight"], sd[p + "mlp.w3.bias"])
    return F.layer_norm(x, (c,), sd["out_norm.weight"], sd["out_norm.bias"], eps=1e-5).permute(0, 3, 1, 2)


def tiny_vit(**overrides) -> ViT:
    kwargs = dict(embed_dim=TINY["dim"], depth=TINY["depth"], num_heads=TINY["heads"], window_size=TINY["window_size"],
                  window_block_indexes=TINY["window_blocks"], pretrain_img_size=16 * TINY["pretrain_grid"])
    return ViT(**(kwargs | overrides))


def test_vit_with_converted_weights_matches_the_released_formulas() -> None:
    """Padded windows (5x7 grid, 3x3 windows), a global block, position embedding resized 4x4 -> 5x7."""
    sd = released_tiny_state_dict()
    model = tiny_vit().eval()
    model.load_state_dict(convert_vit_state_dict(sd, TINY["window_size"], TINY["window_blocks"]), strict=True)
    images = torch.randn(2, 3, 80, 112)
    with torch.no_grad():
        (ours,) = model(images)
        reference = released_forward(sd, images)
    assert ours.shape == (2, TINY["dim"], 5, 7)
    # float32 with fused vs explicit softmax attention and float32 RoPE tables: ~1e-5 on outputs of size ~1
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-4)


def test_global_blocks_equal_timm_eva() -> None:
    """Without window blocks the network is timm's EVA (no class token, RoPE rescaled to a 16x16
    reference grid, sub-normed SwiGLU, q/v biases): same weights, same outputs."""
    torch.manual_seed(0)
    ours = ViT(embed_dim=64, depth=2, num_heads=2, window_size=0, pretrain_img_size=64).eval()
    eva = Eva(img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=2, qkv_fused=False, mlp_ratio=4 * 2 / 3,
              swiglu_mlp=True, scale_mlp=True, use_rot_pos_emb=True, ref_feat_shape=(16, 16), class_token=False,
              norm_layer=partial(nn.LayerNorm, eps=1e-6), num_classes=0, use_fc_norm=False).eval()
    eva.norm = nn.LayerNorm(64)  # the released out_norm keeps LayerNorm's default eps
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    state = ours.state_dict()
    state["pos_embed"] = state["pos_embed"][:, 1:]  # ours keeps the released class-token slot
    state["norm.weight"], state["norm.bias"] = state.pop("out_norm.weight"), state.pop("out_norm.bias")
    eva.load_state_dict(state, strict=True)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        (a,) = ours(images)
        b = eva.forward_features(images).reshape(2, 4, 4, 64).permute(0, 3, 1, 2)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_sfp_strides_channels_and_layer_order() -> None:
    torch.manual_seed(0)
    sfp = SimpleFeaturePyramid(in_channels=64, out_channels=32).eval()
    x = torch.randn(2, 64, 5, 7)  # stride 16 of an 80 x 112 image
    with torch.no_grad():
        for p in sfp.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        outs = sfp([x])
    assert sfp.out_channels == [32] * 5
    assert [tuple(o.shape) for o in outs] == [(2, 32, 20, 28), (2, 32, 10, 14), (2, 32, 5, 7), (2, 32, 3, 4), (2, 32, 2, 2)]
    assert [80 // o.shape[-2] for o in outs[:3]] == [4, 8, 16]  # p5 and p6 round up: ceil(5/2) = 3, ceil(5/4) = 2
    # the released Sequentials, op by op (mmdet/necks/sfp.py: channels-first LayerNorm written out)
    sd = sfp.state_dict()
    ops = {"p2": "up c ln g up c ln g c ln g c ln", "p3": "up c ln g c ln g c ln", "p4": "c ln g c ln",
           "p5": "pool c ln g c ln", "p6": "pool c ln g c ln g c ln"}
    for level, out in zip(ops, outs):
        y = x
        for i, op in enumerate(ops[level].split()):
            if op == "up":
                y = F.interpolate(y, scale_factor=2.0, mode="nearest")
            elif op == "pool":
                y = F.max_pool2d(y, 3, stride=2, padding=1)
            elif op == "g":
                y = F.gelu(y)
            elif op == "c":
                weight = sd[f"{level}.{i}.weight"]
                stride = 2 if level == "p6" and i == 1 else 1
                y = F.conv2d(y, weight, stride=stride, padding=weight.shape[-1] // 2)
            else:
                u = y.mean(1, keepdim=True)
                y = (y - u) / torch.sqrt((y - u).pow(2).mean(1, keepdim=True) + 1e-6)
                y = sd[f"{level}.{i}.weight"][:, None, None] * y + sd[f"{level}.{i}.bias"][:, None, None]
        torch.testing.assert_close(out, y, rtol=0, atol=1e-5)
    assert len(SimpleFeaturePyramid(64, 32, use_p2=False)([x])) == 4
    with pytest.raises(ValueError, match="single map"):
        sfp([x, x])


def read_released_keys(name: str) -> dict[str, tuple[int, ...]]:
    keys = {}
    for line in (DATA / name).read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape = line.split()
            keys[key] = tuple(int(s) for s in shape.split(","))
    return keys


@pytest.mark.parametrize("name, window_size, global_every", [("co_dino_vit_large_backbone_keys.txt", 24, 4),
                                                             ("co_dino_vit_large_lvis_backbone_keys.txt", 16, 3)])
def test_vit_large_converts_the_released_keys_one_to_one(name: str, window_size: int, global_every: int) -> None:
    released = read_released_keys(name)
    with torch.device("meta"):
        vit, sfp = vit_large(window_size, global_every), SimpleFeaturePyramid(1024, 256)
    # 24 blocks of 12,599,976 (q/k/v 3 * 1024^2, q/v biases, proj, SwiGLU 1024 -> 2 * 2730 -> 1024 with
    # its 2730 LayerNorm, two LayerNorms) + patch embedding 787,456 + position embedding 1025 * 1024 + out_norm
    assert sum(p.numel() for p in vit.parameters()) == 304_238_528
    assert sum(p.numel() for p in sfp.parameters()) == 23_995_904
    backbone = {k.removeprefix("backbone."): torch.empty(s, device="meta") for k, s in released.items() if k.startswith("backbone.")}
    neck = {k.removeprefix("neck."): s for k, s in released.items() if k.startswith("neck.")}
    assert len(backbone) + len(neck) == len(released)
    converted = convert_vit_state_dict(backbone, window_size, interleaved_window_blocks(24, global_every))
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in vit.state_dict().items()}
    assert neck == {k: tuple(v.shape) for k, v in sfp.state_dict().items()}
    dropped = set(backbone) - {k for k in backbone if ".rope." not in k and not k.startswith("rope_")}
    assert len(converted) == len(backbone) - len(dropped) and all(k.endswith(("freqs_cos", "freqs_sin")) for k in dropped)


def test_convert_rejects_a_checkpoint_of_the_other_window_config() -> None:
    coco = {k.removeprefix("backbone."): torch.empty(s, device="meta")
            for k, s in read_released_keys("co_dino_vit_large_backbone_keys.txt").items() if k.startswith("backbone.")}
    with pytest.raises(ValueError, match="rope_win.freqs_cos.*576 tokens.*256 tokens.*another config"):
        convert_vit_state_dict(coco, 16, interleaved_window_blocks(24, 3))
    with pytest.raises(ValueError, match="blocks.2.attn.rope.freqs_cos.*576 tokens.*expects no RoPE table"):
        convert_vit_state_dict(coco, 24, interleaved_window_blocks(24, 3))


def test_released_window_block_patterns() -> None:
    coco = [i for start in range(0, 27, 4) for i in range(start, start + 3)]  # range(0, 3) + range(4, 7) + ... + range(24, 27)
    assert interleaved_window_blocks(24, 4) == [i for i in coco if i < 24]
    assert interleaved_window_blocks(24, 3) == [i for start in range(0, 22, 3) for i in range(start, start + 2)]


def test_vit_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="divisible by 4"):
        ViT(embed_dim=36, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="positive window_size"):
        ViT(embed_dim=32, depth=2, num_heads=2, window_size=0, window_block_indexes=[0])


def test_tiny_vit_and_sfp_forward_backward_with_activation_checkpointing() -> None:
    torch.manual_seed(0)
    vit = ViT(embed_dim=32, depth=3, num_heads=2, window_size=2, window_block_indexes=[0, 1], pretrain_img_size=32,
              drop_path_rate=0.2, use_act_checkpoint=True)
    sfp = SimpleFeaturePyramid(32, 16)
    images = torch.randn(2, 3, 64, 64)
    grads = []
    for checkpointing in (True, False):
        vit.use_act_checkpoint = checkpointing
        vit.zero_grad()
        sfp.zero_grad()
        torch.manual_seed(1)  # the same drop-path draws both times
        outs = sfp(vit(images))
        assert [o.shape[-1] for o in outs] == [16, 8, 4, 2, 1]
        sum((o**2).mean() for o in outs).backward()
        grads.append([p.grad.clone() for p in [*vit.parameters(), *sfp.parameters()]])
    assert all(g.abs().sum() > 0 and torch.isfinite(g).all() for g in grads[0])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)

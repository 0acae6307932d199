"""Backbones: Swin as released (against a step-by-step reimplementation of the released forward),
the official Swin names onto timm's, patch-merging orders, ImageNet weights (V1 / V2, files,
offline errors), frozen stages and activation checkpointing."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from official_co_detr import (
    SWIN_ARCH,
    merge_concat,
    merge_unfold,
    random_state,
    relative_index_mmdet,
    relative_index_v1,
    swin_mmdet,
    swin_v1,
    swin_v1_forward,
)
from timm.models.swin_transformer import PatchMerging, get_relative_position_index

from codetr.config import BackboneConfig
from codetr.convert.mmdet import convert_state_dict
from codetr.convert.mmdet_rules import SWIN_MMDET, SWIN_V1, Layout, unfold_to_concat
from codetr.models.backbones.build import build_backbone
from codetr.models.backbones.resnet import ResNetBackbone
from codetr.models.backbones.swin import SwinBackbone, SWINS

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))  # window 7 from the name
TIMM_NAME = {"swin_tiny": "swin_tiny_patch4_window7_224", "swin_small": "swin_small_patch4_window7_224",
             "swin_base": "swin_base_patch4_window12_384", "swin_large": "swin_large_patch4_window12_384"}


def convert_backbone(source: dict[str, torch.Tensor], rules: list, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    expected = {f"backbone.{k}": tuple(v.shape) for k, v in model.state_dict().items()}
    conversion = convert_state_dict(source, rules, Layout(3, (), ()), expected, keep_aux=False)
    assert conversion.ok, conversion.report()
    return {k.removeprefix("backbone."): v for k, v in conversion.state_dict.items()}


@pytest.mark.parametrize("name", TIMM_NAME.values())
def test_swin_strides_and_channels(name: str) -> None:
    assert name in SWINS
    with torch.device("meta"):
        backbone = SwinBackbone(name, None, -1, (0, 1, 2, 3))
        outs = backbone(torch.empty(2, 3, 100, 130))
    dim = {"tiny": 96, "small": 96, "base": 128, "large": 192}[name.split("_")[1]]
    assert backbone.out_channels == [dim, 2 * dim, 4 * dim, 8 * dim]
    # stride 4 * 2^i, the image padded to a multiple of the patch, odd maps padded before merging
    assert [tuple(o.shape) for o in outs] == [(2, dim, 25, 33), (2, 2 * dim, 13, 17), (2, 4 * dim, 7, 9), (2, 8 * dim, 4, 5)]
    window = int(name.split("window")[1].split("_")[0])
    assert all(block.window_size == (window, window) for stage in backbone.layers for block in stage.blocks)
    with torch.device("meta"):
        assert SwinBackbone(name, None, -1, (1, 2, 3)).out_channels == [2 * dim, 4 * dim, 8 * dim]


@pytest.mark.parametrize("arch", list(SWIN_ARCH))
@pytest.mark.parametrize("naming", ["v1", "mmdet"])
def test_official_swin_names_map_one_to_one_onto_timm(arch: str, naming: str) -> None:
    """Every released parameter lands on exactly one parameter of codetr's (timm's) Swin, with the
    same shape; only the relative-position index buffers are left (codetr recomputes them)."""
    dim, depths, heads, window = SWIN_ARCH[arch]
    names = (swin_v1 if naming == "v1" else swin_mmdet)(dim, depths, heads, window, (0, 1, 2, 3))
    with torch.device("meta"):
        model = SwinBackbone(TIMM_NAME[arch], None, -1, (0, 1, 2, 3))
    expected = {f"backbone.{k}": tuple(v.shape) for k, v in model.state_dict().items()}
    conversion = convert_state_dict(random_state(names, meta=True), SWIN_V1 if naming == "v1" else SWIN_MMDET,
                                    Layout(4, (), ()), expected, keep_aux=False)
    assert conversion.ok, conversion.report()
    assert len(conversion.state_dict) == len(expected) == len(names) - len(conversion.derived)
    assert all(len(sources) == 1 for sources in conversion.sources.values())
    assert conversion.derived and all(k.endswith("relative_position_index") for k in conversion.derived)


@pytest.mark.parametrize("window", [7, 12])
def test_relative_position_index_is_the_same_in_all_three(window: int) -> None:
    expected = get_relative_position_index(window, window)
    assert torch.equal(relative_index_v1(window), expected)
    assert torch.equal(relative_index_mmdet(window), expected)


def test_patch_merging_permutation_against_both_merge_orders() -> None:
    torch.manual_seed(0)
    channels = 5
    x = torch.randn(2, 6, 8, channels)
    norm_w, norm_b = torch.randn(4 * channels), torch.randn(4 * channels)
    reduction = torch.randn(2 * channels, 4 * channels)

    def released(features: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.layer_norm(features, (4 * channels,), norm_w, norm_b) @ reduction.T

    merge = PatchMerging(channels)
    with torch.no_grad():  # the release's SwinV1 order is timm's order: same weights
        merge.norm.weight.copy_(norm_w), merge.norm.bias.copy_(norm_b), merge.reduction.weight.copy_(reduction)
    torch.testing.assert_close(merge(x), released(merge_concat(x)))
    mmdet_output = released(merge_unfold(x))  # mmdet's nn.Unfold order, same weights: other outputs
    assert not torch.allclose(merge(x), mmdet_output, atol=1e-3)
    with torch.no_grad():
        merge.norm.weight.copy_(unfold_to_concat(norm_w, norm_w.shape))
        merge.norm.bias.copy_(unfold_to_concat(norm_b, norm_b.shape))
        merge.reduction.weight.copy_(unfold_to_concat(reduction, reduction.shape))
    torch.testing.assert_close(merge(x), mmdet_output)


def to_mmdet_names(v1: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same released weights under mmdet's Swin names, patch-merging features in nn.Unfold order
    (the order found by merging a map of distinct values both ways)."""
    channels_of = {}
    out = {}
    for name, value in v1.items():
        new = (name.replace("patch_embed.proj.", "patch_embed.projection.").replace("backbone.layers.", "backbone.stages.")
               .replace(".attn.", ".attn.w_msa.").replace(".mlp.fc1.", ".ffn.layers.0.0.").replace(".mlp.fc2.", ".ffn.layers.1."))
        if ".downsample." in name:
            channels_of[new] = value.shape[-1] // 4
        out[new] = value
    for name, channels in channels_of.items():
        ids = torch.arange(4 * channels, dtype=torch.float32).view(1, 2, 2, channels)
        concat, unfold = merge_concat(ids)[0, 0, 0], merge_unfold(ids)[0, 0, 0]
        position_in_concat = {int(v): i for i, v in enumerate(concat)}
        order = torch.tensor([position_in_concat[int(v)] for v in unfold])  # unfold position -> concat position
        out[name] = out[name].index_select(-1, order)
    return out


@pytest.mark.parametrize("naming", ["v1", "mmdet"])
def test_converted_swin_gives_the_released_features(naming: str) -> None:
    """Random released weights (SwinV1 names, or mmdet names with Unfold-order merging), converted,
    give the features of the released forward written out step by step, on a map whose sides are
    multiples of neither the window nor 2 at every stage."""
    depths, heads, window = TINY["depths"], TINY["num_heads"], 7
    v1 = random_state(swin_v1(16, depths, heads, window, (0, 1, 2, 3)), seed=1)
    image = torch.randn(3, 61, 90)
    reference = swin_v1_forward(v1, image, depths, heads, window, (0, 1, 2, 3))
    backbone = SwinBackbone("swin_tiny_patch4_window7_224", None, -1, (0, 1, 2, 3), timm_args=TINY).eval()
    source = v1 if naming == "v1" else to_mmdet_names(v1)
    backbone.load_state_dict(convert_backbone(source, SWIN_V1 if naming == "v1" else SWIN_MMDET, backbone))
    with torch.no_grad():
        outs = backbone(image[None])
    assert [o.shape[-2:] for o in outs] == [r.shape[-2:] for r in reference]
    for out, ref in zip(outs, reference):
        torch.testing.assert_close(out[0], ref, atol=2e-4, rtol=1e-4)


def test_swin_frozen_stages_stay_frozen_and_in_eval_mode() -> None:
    backbone = SwinBackbone("swin_tiny_patch4_window7_224", None, 1, (0, 1, 2, 3), drop_path_rate=0.2, timm_args=TINY)
    frozen = [backbone.patch_embed, backbone.layers[0].blocks, backbone.layers[1].downsample, backbone.norm0]
    trained = [backbone.layers[1].blocks, backbone.layers[2], backbone.norm1]
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    assert all(p.requires_grad for m in trained for p in m.parameters())
    backbone.train()
    assert not any(m.training for m in backbone.layers[0].blocks.modules())  # drop path off there
    assert backbone.layers[1].blocks[1].drop_path1.training
    assert all(p.requires_grad for p in SwinBackbone("swin_tiny_patch4_window7_224", None, -1, timm_args=TINY).parameters())


@pytest.mark.parametrize("kind", ["resnet", "swin"])
def test_activation_checkpointing_recomputes_and_keeps_gradients(kind: str) -> None:
    def build(with_cp: bool) -> torch.nn.Module:
        torch.manual_seed(0)
        if kind == "resnet":
            return ResNetBackbone("resnet18", None, -1, "group_norm", (1, 2, 3), with_cp=with_cp)
        return SwinBackbone("swin_tiny_patch4_window7_224", None, -1, (1, 2, 3), with_cp=with_cp, timm_args=TINY)

    images = torch.randn(1, 3, 64, 72)
    grads, calls = [], []
    for with_cp in (False, True):
        model = build(with_cp)
        block = model.layer2[0] if kind == "resnet" else model.layers[1].blocks[0].attn
        count = [0]
        block.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
        sum(o.square().mean() for o in model(images)).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        calls.append(count[0])
    assert calls == [1, 2]  # recomputed in the backward pass
    for plain, checkpointed in zip(*grads):
        torch.testing.assert_close(plain, checkpointed)


def fake_download(monkeypatch: pytest.MonkeyPatch, state: dict[str, torch.Tensor] | None) -> list[str]:
    """torchvision's downloads return ``state`` (or fail as offline) and record the URLs asked for."""
    urls: list[str] = []

    def download(url: str, *args: object, **kwargs: object) -> dict[str, torch.Tensor]:
        urls.append(url)
        if state is None:
            raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
        return state

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", download)
    return urls


def test_torchvision_weights_are_imagenet_v1_unless_v2_is_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    published = torchvision.models.resnet18().state_dict()
    urls = fake_download(monkeypatch, published)
    backbone = ResNetBackbone("resnet18", "torchvision", -1)
    assert urls == [torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url]
    torch.testing.assert_close(backbone.layer3[1].conv2.weight, published["layer3.1.conv2.weight"])
    with pytest.raises(ValueError, match="no IMAGENET1K_V2 weights for resnet18"):
        ResNetBackbone("resnet18", "torchvision_v2", -1)
    urls = fake_download(monkeypatch, torchvision.models.resnet50().state_dict())
    ResNetBackbone("resnet50", "torchvision", 1)
    ResNetBackbone("resnet50", "torchvision_v2", 1)
    assert [u.rsplit("/", 1)[1] for u in urls] == [torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[1],
                                                   torchvision.models.ResNet50_Weights.IMAGENET1K_V2.url.rsplit("/", 1)[1]]


def test_offline_download_errors_say_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_download(monkeypatch, None)
    with pytest.raises(RuntimeError, match="could not download torchvision's ImageNet weights resnet18 IMAGENET1K_V1") as err:
        build_backbone(BackboneConfig(name="resnet18", weights="torchvision"))
    assert "model.backbone.weights to its path" in str(err.value)

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    import timm.models._builder as builder

    monkeypatch.setattr(builder, "load_state_dict_from_hf", offline)
    monkeypatch.setattr(builder, "load_state_dict_from_url", offline)
    monkeypatch.setattr(builder, "download_cached_file", offline)
    with pytest.raises(RuntimeError, match="could not download timm's pretrained swin_tiny_patch4_window7_224") as err:
        build_backbone(BackboneConfig(name="swin_tiny_patch4_window7_224", weights="timm", frozen_stages=-1))
    assert "model.backbone.weights to its path" in str(err.value)


def test_weights_from_files(tmp_path: Path) -> None:
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18().state_dict()
    torch.save(resnet, tmp_path / "r18.pth")
    backbone = ResNetBackbone("resnet18", str(tmp_path / "r18.pth"), -1)
    torch.testing.assert_close(backbone.conv1.weight, resnet["conv1.weight"])
    torch.save({k: v for k, v in resnet.items() if not k.startswith("layer4")}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"not a torchvision resnet18 state_dict: missing \['layer4"):
        ResNetBackbone("resnet18", str(tmp_path / "partial.pth"), -1)

    # A Swin file in the original release's names (stage-end patch merging, classifier, final norm).
    timm_model = timm.create_model("swin_tiny_patch4_window7_224", num_classes=10, **TINY)
    original = {}
    for name, value in timm_model.state_dict().items():
        if ".downsample." in name:
            stage = int(name.split(".")[1])
            name = name.replace(f"layers.{stage}.", f"layers.{stage - 1}.")
        original[name.replace("head.fc.", "head.")] = value
    torch.save({"model": original}, tmp_path / "swin_original.pth")
    backbone = SwinBackbone("swin_tiny_patch4_window7_224", str(tmp_path / "swin_original.pth"), -1, timm_args=TINY)
    for name, value in backbone.state_dict().items():
        if not name.startswith("norm"):
            torch.testing.assert_close(value, timm_model.state_dict()[name], msg=name)
    with pytest.raises(ValueError, match="does not fit"):
        SwinBackbone("swin_tiny_patch4_window7_224", str(tmp_path / "swin_original.pth"), -1,
                     timm_args=dict(TINY, depths=(2, 2, 4, 2)))

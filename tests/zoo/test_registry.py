"""The model-zoo registry: one row per published checkpoint, each naming a packaged config of its
architecture that builds, a well-formed source (mmdetection's file names carry their hash prefix), no
hash without its provenance, and the README's table saying the same."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch

from codetr.config_parsing import CONFIG_DIR, load_config
from codetr.inference.loading import without_backbone_weights
from codetr.zoo import RELEASES, find_release, get_release, is_repo_id
from codetr.zoo.registry import CO_DEFORMABLE_DRIVE, CO_DINO_DRIVE

README = Path(__file__).resolve().parents[2] / "README.md"
ARCH = {"Co-DINO": "dino", "Co-Deformable-DETR": "deformable_detr"}
BACKBONE = {"R50": "resnet50", "Swin-T": "swin_tiny_patch4_window7_224", "Swin-S": "swin_small_patch4_window7_224",
            "Swin-B": "swin_base_patch4_window12_384", "Swin-L": "swin_large_patch4_window12_384", "ViT-L": "vit_large"}


def test_names_are_unique_packaged_configs() -> None:
    names = [r.name for r in RELEASES]
    assert len(names) == len(set(names))
    assert all(r.config == r.name and (CONFIG_DIR / f"{r.name}.yaml").is_file() for r in RELEASES)
    assert all(find_release(name) is get_release(name) for name in names)


@pytest.mark.parametrize("release", RELEASES, ids=lambda r: r.name)
def test_row_describes_its_config(release: object) -> None:
    cfg = load_config(release.config)
    assert cfg.model.arch == ARCH[release.model]
    assert cfg.model.backbone.name == BACKBONE[release.backbone]
    assert cfg.model.num_classes == (1203 if "LVIS" in release.data else 80)
    assert ("LVIS" in release.metric) == ("LVIS" in release.data)
    if release.name != "co_dino_5scale_lsj_swin_large_3x_lvis":  # its released config keeps the 12-epoch schedule
        assert cfg.train.epochs == release.epochs


@pytest.mark.slow
def test_every_row_builds() -> None:
    """Each distinct architecture of the rows, full size, on the meta device."""
    from codetr.models.build import build_model

    built = set()
    for release in RELEASES:
        model = without_backbone_weights(load_config(release.config).model)
        if repr(model) not in built:
            with torch.device("meta"):
                assert len(build_model(model).inference_state_dict()) > 100, release.name
            built.add(repr(model))


@pytest.mark.parametrize("release", RELEASES, ids=lambda r: r.name)
def test_sources_are_well_formed(release: object) -> None:
    assert (release.sha256 is None) == (release.sha256_source is None)
    if release.sha256 is not None:
        assert re.fullmatch(r"[0-9a-f]{64}", release.sha256)
    if release.url is not None:
        url = urlparse(release.url)
        assert (url.scheme, url.netloc) == ("https", "download.openmmlab.com") and url.path.endswith(".pth")
        assert re.fullmatch(r"[0-9a-f]{8}", release.hash_prefix)  # checked when no full hash is known
        assert release.sha256 is None or release.sha256.startswith(release.hash_prefix)
        assert release.filename == url.path.rsplit("/", 1)[-1]
    elif release.hub is not None:
        repo, filename = release.hub
        assert is_repo_id(repo) and repo.startswith("zongzhuofan/co-detr-vit-large-") and filename.endswith(".pth")
        assert release.download_url == f"https://huggingface.co/{repo}/resolve/main/{filename}"
    else:
        assert (CO_DEFORMABLE_DRIVE if release.model == "Co-Deformable-DETR" else CO_DINO_DRIVE) in release.manual
        assert f"`{release.name}.pth`" in release.manual
        assert f"codetr weights get {release.name} --file" in release.manual


def test_hub_rows_follow_hf_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9/")
    assert get_release("co_dino_5scale_vit_large_coco").download_url == (
        "http://127.0.0.1:9/zongzhuofan/co-detr-vit-large-coco/resolve/main/pytorch_model.pth")


def test_readme_table_is_the_registry() -> None:
    section = README.read_text().split("## Model zoo\n")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    source = {"download": "url", "Hugging Face": "hub", "by hand": "manual"}
    assert len(rows) == len(RELEASES)
    for line, release in zip(rows, RELEASES):
        name, model, backbone, epochs, data, ap, file = [cell.strip() for cell in line.strip("|").split("|")]
        assert name == f"`{release.name}`"
        assert (model, backbone, int(epochs), data.replace("→", "->")) == (release.model, release.backbone,
                                                                          release.epochs, release.data)
        assert ap == ("-" if release.ap is None else f"{release.ap:.1f}")
        assert getattr(release, source[file]) is not None
    assert 'Detector.from_pretrained("co_dino_5scale_lsj_r50_1x_coco")' in section
    assert get_release("co_dino_5scale_lsj_r50_1x_coco").url is not None  # the README's example downloads directly

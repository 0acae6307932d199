"""The Hugging Face Hub in codetr's format: ``Detector.push_to_hub`` uploads what ``save_pretrained``
writes plus a model card (only the network upload is replaced, by a stand-in that keeps the uploaded
files); the test lays those files out as huggingface_hub's cache does, and ``from_pretrained("user/repo")``
loads them through huggingface_hub offline (``HF_HUB_OFFLINE``), giving the same detections."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from codetr import Detector
from codetr.errors import UserError

huggingface_hub = pytest.importorskip("huggingface_hub")
hub_constants = pytest.importorskip("huggingface_hub.constants")
pytestmark = pytest.mark.usefixtures("one_thread")
REPO = "someone/tiny-co-dino"


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty huggingface_hub cache, offline (constants are read at import, hence patched)."""
    cache = tmp_path / "hf"
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return cache


def publish_to_cache(uploaded: Path, cache: Path, repo_id: str, commit: str = "0" * 40) -> None:
    """What huggingface_hub leaves after downloading ``repo_id``'s files: refs/main names the commit,
    snapshots/<commit>/ holds the files."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(uploaded, repo / "snapshots" / commit)


def test_push_to_hub_then_from_pretrained_round_trip(tmp_path: Path, hub_cache: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    uploaded = tmp_path / "uploaded"
    calls = []

    def create_repo(self: object, repo_id: str, **kwargs: object) -> str:
        calls.append(("create_repo", repo_id, kwargs.get("private")))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self: object, *, repo_id: str, folder_path: Path, allow_patterns: list[str], **kwargs: object) -> None:
        calls.append(("upload_folder", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))
        uploaded.mkdir()
        for name in allow_patterns:
            shutil.copy(Path(folder_path) / name, uploaded / name)

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    torch.manual_seed(0)
    det = Detector("co_dino_tiny", device="cpu")
    assert det.push_to_hub(REPO, metrics={"AP": 12.5}, private=True) == f"https://huggingface.co/{REPO}"
    assert calls == [("create_repo", REPO, True),
                     ("upload_folder", REPO, ["README.md", "config.yaml", "model.safetensors"])]

    card = (uploaded / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: codetr\n") and f'Detector.from_pretrained("{REPO}")' in card
    assert "| AP | 12.5 |" in card and "0: class_0, 1: class_1" in card
    config = card.split("```yaml\n")[1].split("```")[0]
    assert yaml.safe_load(config)["model"]["arch"] == "dino"

    with pytest.raises(UserError, match=f"config.yaml of {REPO} is not in the Hugging Face cache"):
        Detector.from_pretrained(REPO)  # offline, nothing cached yet
    publish_to_cache(uploaded, hub_cache, REPO)
    loaded = Detector.from_pretrained(REPO, device="cpu")
    assert loaded.cfg == det.cfg and loaded.class_names == det.class_names
    image = torch.randint(0, 256, (3, 64, 80), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    ours, theirs = loaded.predict(image, 0.0)[0], det.predict(image, 0.0)[0]
    torch.testing.assert_close(ours.boxes, theirs.boxes)
    torch.testing.assert_close(ours.scores, theirs.scores)


def test_a_hub_repository_without_codetr_files_is_one_line(tmp_path: Path, hub_cache: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.yaml").write_text("model: {}\n")
    publish_to_cache(other, hub_cache, "someone/other")
    with pytest.raises(UserError, match="model.safetensors of someone/other is not in the Hugging Face cache"):
        Detector.from_pretrained("someone/other")

"""``Detector.from_pretrained(NAME)`` and ``codetr weights get``: a tiny Co-DINO checkpoint in the
mmdetection 3.x release's format (released names, random weights) served by a loopback HTTP server is
downloaded, checked, converted and cached; the next call does not touch the server; a wrong hash, a
404, a cut connection, no network and a full disk each end in one line and leave no model behind; an
interrupted download resumes with an HTTP Range request."""

from __future__ import annotations

import hashlib
import io
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from loopback import LoopbackServer
from official_co_detr import co_dino, random_state, resnet
from synthetic_config import synthetic_data

from codetr import Detector
from codetr.cli import main
from codetr.convert.mmdet import convert_mmdet_file
from codetr.errors import UserError
from codetr.inference.loading import load_model
from codetr.zoo import Release, cache_root, is_cached, registry

pytestmark = pytest.mark.usefixtures("one_thread")
CLASSES = ["circle", "square", "triangle", "star", "ring", "cross"]
NAME = "tiny_co_dino_zoo"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """A tiny Co-DINO config (ResNet-18, 64-d transformer) and a checkpoint for it as mmdetection 3.x
    publishes them: ``{"meta", "state_dict"}`` with the released names, the class names in the metadata."""
    root = tmp_path_factory.mktemp("zoo")
    cfg = {"base": "co_dino_tiny", "data": synthetic_data(root / "synth"),
           "model": {"backbone": {"name": "resnet18", "weights": None, "norm": "frozen_bn", "frozen_stages": 1}}}
    config = root / "tiny_co_dino.yaml"
    config.write_text(yaml.safe_dump(cfg))
    names = co_dino(resnet(18), [64, 128, 256, 512], mmdet3=True, num_classes=6, num_queries=100, d=64, ffn_dim=256,
                    enc_layers=2, dec_layers=3, heads=4, roi_fc=256)
    buffer = io.BytesIO()
    torch.save({"meta": {"dataset_meta": {"classes": tuple(CLASSES)}, "epoch": 12},
                "state_dict": random_state(names, seed=11)}, buffer)
    return config, buffer.getvalue()


@pytest.fixture
def server() -> Iterator[LoopbackServer]:
    with LoopbackServer() as server:
        yield server


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CODETR_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def serve(server: LoopbackServer, monkeypatch: pytest.MonkeyPatch, tiny: tuple[Path, bytes], file_name: str | None = None,
          sha256: str | None = None) -> Release:
    """Put the checkpoint on the server as mmdetection names its files (the SHA-256's first 8 hex digits in
    the name) and register it under NAME."""
    config, data = tiny
    file_name = file_name or f"tiny_co_dino-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    server.served.files[f"/codetr/{file_name}"] = data
    release = Release(NAME, str(config), "Co-DINO", "R18", 12, "synthetic", None, url=f"{server.url}/codetr/{file_name}",
                      sha256=sha256)
    monkeypatch.setitem(registry.BY_NAME, NAME, release)
    return release


def cache_files(cache: Path) -> list[str]:
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file()) if cache.exists() else []


def image() -> torch.Tensor:
    return torch.randint(0, 256, (3, 64, 80), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_from_pretrained_downloads_checks_converts_caches_and_then_needs_no_server(
        server: LoopbackServer, monkeypatch: pytest.MonkeyPatch, tiny: tuple[Path, bytes], cache: Path, tmp_path: Path) -> None:
    serve(server, monkeypatch, tiny)
    det = Detector.from_pretrained(NAME, device="cpu")
    assert len(server.served.requests) == 1 and server.served.requests[0][1] is None
    assert cache_files(cache) == [f"models/{NAME}/config.yaml", f"models/{NAME}/model.safetensors"]  # no .pth, no .part
    assert det.class_names == CLASSES and det.category_ids == [1, 2, 3, 4, 5, 6]  # from the checkpoint's metadata

    # the same as converting the file by hand and loading the result
    by_hand = tmp_path / "official.pth"
    by_hand.write_bytes(tiny[1])
    convert_mmdet_file(by_hand, tiny[0], tmp_path / "converted.safetensors")
    reference = load_model(tmp_path / "converted.safetensors").detect(image())
    ours = det.predict(image(), score_thr=0.0)[0]
    torch.testing.assert_close(ours.boxes, reference.boxes)
    torch.testing.assert_close(ours.scores, reference.scores)

    again = Detector.from_pretrained(NAME, device="cpu")
    assert len(server.served.requests) == 1  # from the cache
    assert Detector.from_pretrained(cache / "models" / NAME / "model.safetensors", "cpu").class_names == CLASSES
    server.httpd.shutdown()  # offline
    offline = Detector.from_pretrained(NAME, device="cpu").predict(image(), score_thr=0.0)[0]
    torch.testing.assert_close(offline.scores, again.predict(image(), score_thr=0.0)[0].scores)


def test_wrong_hash_deletes_the_download(server: LoopbackServer, monkeypatch: pytest.MonkeyPatch,
                                         tiny: tuple[Path, bytes], cache: Path) -> None:
    serve(server, monkeypatch, tiny, sha256="0" * 64)
    with pytest.raises(UserError, match=r"SHA-256 [0-9a-f]{64} is not the expected 0{64}; the file was deleted"):
        Detector.from_pretrained(NAME, device="cpu")
    assert cache_files(cache) == [] and not is_cached(NAME)
    serve(server, monkeypatch, tiny, file_name="tiny_co_dino-deadbeef.pth")  # mmdetection's prefix in the name
    with pytest.raises(UserError, match=r"is not the expected deadbeef\.\.\."):
        Detector.from_pretrained(NAME, device="cpu")
    assert cache_files(cache) == []


def test_missing_file_and_no_network_are_one_line(server: LoopbackServer, monkeypatch: pytest.MonkeyPatch,
                                                  tiny: tuple[Path, bytes], cache: Path) -> None:
    release = serve(server, monkeypatch, tiny)
    monkeypatch.setitem(registry.BY_NAME, NAME, Release(**{**vars(release), "url": release.url + ".moved"}))
    with pytest.raises(UserError, match=r"HTTP 404 Not Found \(the file moved or was removed") as err:
        Detector.from_pretrained(NAME, device="cpu")
    assert "\n" not in str(err.value) and cache_files(cache) == []
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setitem(registry.BY_NAME, NAME, Release(**{**vars(release), "url": f"http://127.0.0.1:{port}/x-0.pth"}))
    with pytest.raises(UserError, match=r"cannot reach http://127\.0\.0\.1:\d+/x-0\.pth \(.*refused\): no network\?"):
        Detector.from_pretrained(NAME, device="cpu")
    assert cache_files(cache) == []


def test_cut_connection_keeps_the_part_and_the_next_call_resumes(
        server: LoopbackServer, monkeypatch: pytest.MonkeyPatch, tiny: tuple[Path, bytes], cache: Path) -> None:
    data = tiny[1]
    release = serve(server, monkeypatch, tiny, sha256=hashlib.sha256(data).hexdigest())
    cut = len(data) // 3
    server.served.cut_after = cut
    with pytest.raises(UserError, match=rf"was interrupted \(the connection closed after {cut} of {len(data)} bytes\); "
                                        rf"the {cut} bytes received are kept in .*\.part, and running the same command "
                                        "again resumes"):
        Detector.from_pretrained(NAME, device="cpu")
    assert cache_files(cache) == [f"downloads/{release.filename}.part"]  # the documented resumable part, no model
    assert main(["weights", "get", NAME]) == 0
    assert server.served.requests[-1][1] == f"bytes={cut}-" and server.served.sent == len(data)  # only the rest
    assert cache_files(cache) == [f"models/{NAME}/config.yaml", f"models/{NAME}/model.safetensors"]


def test_a_server_ignoring_the_range_restarts_the_file(server: LoopbackServer, monkeypatch: pytest.MonkeyPatch,
                                                       tiny: tuple[Path, bytes], cache: Path) -> None:
    data = tiny[1]
    release = serve(server, monkeypatch, tiny, sha256=hashlib.sha256(data).hexdigest())
    part = cache / "downloads" / f"{release.filename}.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"junk" * 100)  # not the file's start: only a full restart gives the right hash
    server.served.ignore_range = True
    assert main(["weights", "get", NAME]) == 0
    assert server.served.requests == [(f"/codetr/{release.filename}", "bytes=400-")] and is_cached(NAME)


def test_full_disk_is_one_line_and_leaves_no_part(server: LoopbackServer, monkeypatch: pytest.MonkeyPatch,
                                                  tiny: tuple[Path, bytes], cache: Path) -> None:
    release = serve(server, monkeypatch, tiny)
    part = cache / "downloads" / f"{release.filename}.part"
    part.parent.mkdir(parents=True)
    part.symlink_to("/dev/full")  # every write there fails with ENOSPC, as on a full disk
    with pytest.raises(UserError, match=r"^no space left on the device of .*downloads while downloading .*; the partial "
                                        "file was deleted"):
        Detector.from_pretrained(NAME, device="cpu")
    assert cache_files(cache) == [] and not part.is_symlink()


def test_a_checkpoint_that_does_not_convert_leaves_nothing(server: LoopbackServer, monkeypatch: pytest.MonkeyPatch,
                                                           tiny: tuple[Path, bytes], cache: Path) -> None:
    release = serve(server, monkeypatch, tiny)
    monkeypatch.setitem(registry.BY_NAME, NAME, Release(**{**vars(release), "config": "co_deformable_detr_tiny"}))
    with pytest.raises(UserError, match=f"{NAME}: the checkpoint does not convert for config co_deformable_detr_tiny"):
        Detector.from_pretrained(NAME, device="cpu")
    assert cache_files(cache) == []  # neither the download nor a model


def test_weights_get_converts_a_file_downloaded_by_hand(tiny: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config, data = tiny
    monkeypatch.setitem(registry.BY_NAME, NAME, Release(NAME, str(config), "Co-DINO", "R18", 12, "synthetic", None,
                                                        manual="only in a Google Drive folder",
                                                        sha256=hashlib.sha256(data).hexdigest()))
    assert main(["weights", "get", NAME]) == 2
    assert f"{NAME} has no direct download: only in a Google Drive folder" in capsys.readouterr().err
    local = tmp_path / "by_hand.pth"
    local.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit off
    assert main(["weights", "get", NAME, "--file", str(local)]) == 2
    assert "its SHA-256 is not the published" in capsys.readouterr().err and local.is_file()  # the user's file stays
    local.write_bytes(data)
    assert main(["weights", "get", NAME, "--file", str(local)]) == 0
    assert capsys.readouterr().out == f"{cache / 'models' / NAME}\n"  # the folder alone, for $(codetr weights get)
    assert local.is_file() and Detector.from_pretrained(NAME, device="cpu").class_names == CLASSES


def test_cache_folder_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CODETR_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "codetr"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "codetr"


def test_unknown_name_suggests_the_closest() -> None:
    with pytest.raises(UserError, match="did you mean co_dino_5scale_lsj_r50_1x_coco"):
        Detector.from_pretrained("co_dino_5scale_lsj_r50_1x_cocoo")


def test_weights_list_marks_what_is_cached(cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = cache / "models" / "co_dino_5scale_lsj_r50_1x_coco"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"")
    (folder / "config.yaml").write_text("")
    assert main(["weights", "list"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()}
    assert rows["co_dino_5scale_lsj_r50_1x_coco"][-2:] == ["download", "yes"]
    assert rows["co_dino_5scale_lsj_r50_1x_coco"][1:4] == ["R50", "COCO", "52.0"]
    assert rows["co_dino_5scale_vit_large_coco"][-2:] == ["hub", "no"]
    assert rows["co_deformable_detr_r50_1x_coco"][-3:] == ["by", "hand", "no"]

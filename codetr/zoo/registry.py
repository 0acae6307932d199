"""The model zoo: every published Co-DETR checkpoint that a packaged config describes, where its file
lives, how to check it and the AP its publisher reports.

Sources (read 2026-12): the Sense-X/Co-DETR README (Google Drive folders for the ResNet and Swin
models, the authors' Hugging Face page ``zongzhuofan`` for ViT-L) and the mmdetection 3.x port's
``projects/CO-DETR`` README (its download server: Co-DINO R50 retrained by mmdetection, and files it
converted from the release, marked * there). A file name on that server ends in the first 8 hex
digits of the file's SHA-256 (``-69a72d67.pth``), checked as ``torch.hub`` checks them when no full
hash is known. No hash here is guessed: ``sha256`` is None where none was found, and says where it came
from otherwise.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass

from codetr.errors import UserError

MMDET3 = "https://download.openmmlab.com/mmdetection/v3.0/codetr"
CO_DINO_DRIVE = "https://drive.google.com/drive/folders/1nAXOkzqrEgz-YnXxIEs4d5j9li_kmrnv"
CO_DEFORMABLE_DRIVE = "https://drive.google.com/drive/folders/1asWoZ3SuM6APTL9D-QUF_YW9mjULNdh9"
HF_ENDPOINT = "https://huggingface.co"
# torch.hub's convention: "<name>-<first hex digits of the SHA-256>.<ext>"
HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.[a-z]+$")


@dataclass(frozen=True)
class Release:
    """One published checkpoint.

    ``name``: what ``Detector.from_pretrained`` and ``codetr weights get`` take (the packaged config's
    name for the zoo's rows); ``config``: the codetr config it converts for (a packaged name or a YAML
    file). Exactly one of ``url`` (a direct download), ``hub`` (Hugging Face repo id and file name) and
    ``manual`` (how to get the file by hand, where only a Google Drive folder exists) is set.
    ``sha256`` / ``size`` (bytes): None where not known. ``ap``: the publisher's box AP for this file
    (``metric`` says on what), None where none is published.
    """

    name: str
    config: str
    model: str
    backbone: str
    epochs: int
    data: str
    ap: float | None
    metric: str = "COCO val2017 box AP"
    url: str | None = None
    hub: tuple[str, str] | None = None
    manual: str | None = None
    sha256: str | None = None
    sha256_source: str | None = None
    size: int | None = None
    publisher: str = "Sense-X/Co-DETR"
    note: str = ""

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.url, self.hub, self.manual)) != 1:
            raise ValueError(f"release {self.name}: exactly one of url, hub and manual")

    @property
    def download_url(self) -> str | None:
        """The file's URL (a Hugging Face file through ``HF_ENDPOINT`` when set); None for a manual row."""
        if self.hub is not None:
            repo, filename = self.hub
            return f"{os.environ.get('HF_ENDPOINT', HF_ENDPOINT).rstrip('/')}/{repo}/resolve/main/{filename}"
        return self.url

    @property
    def filename(self) -> str:
        """The downloaded file's name in the cache's download folder."""
        if self.hub is not None:
            return f"{self.name}-{self.hub[1]}"
        return self.url.rsplit("/", 1)[-1] if self.url else f"{self.name}.pth"

    @property
    def hash_prefix(self) -> str | None:
        """The SHA-256 prefix in the file name on mmdetection's download server, else None."""
        match = HASH_IN_NAME.search(self.url or "")
        return match.group(1) if match else None


def _drive(name: str, folder: str) -> str:
    return (f"only in the Google Drive folder {folder} ; download `{name}.pth` from it (the release names its files "
            f"after their config), then: codetr weights get {name} --file PATH/{name}.pth")


def _co_deformable(name: str, backbone: str, epochs: int, ap: float) -> Release:
    return Release(name, name, "Co-Deformable-DETR", backbone, epochs, "COCO", ap, manual=_drive(name, CO_DEFORMABLE_DRIVE))


def _co_dino_drive(name: str, backbone: str, epochs: int, data: str, ap: float | None, metric: str = "COCO val2017 box AP",
                   note: str = "") -> Release:
    return Release(name, name, "Co-DINO", backbone, epochs, data, ap, metric, manual=_drive(name, CO_DINO_DRIVE), note=note)


def _mmdet3(name: str, file: str, backbone: str, epochs: int, ap: float, data: str = "COCO", note: str = "",
            sha256: str | None = None, sha256_source: str | None = None) -> Release:
    return Release(name, name, "Co-DINO", backbone, epochs, data, ap, url=f"{MMDET3}/{file}", sha256=sha256,
                   sha256_source=sha256_source, publisher="mmdetection 3.x (projects/CO-DETR)",
                   note=note or "converted by mmdetection from the Sense-X release (* in its README)")


LVIS = "LVIS v1 val box AP"
RELEASES: tuple[Release, ...] = (
    _co_deformable("co_deformable_detr_r50_1x_coco", "R50", 12, 49.5),
    _co_deformable("co_deformable_detr_swin_tiny_1x_coco", "Swin-T", 12, 51.7),
    _co_deformable("co_deformable_detr_swin_tiny_3x_coco", "Swin-T", 36, 54.1),
    _co_deformable("co_deformable_detr_swin_small_1x_coco", "Swin-S", 12, 53.4),
    _co_deformable("co_deformable_detr_swin_small_3x_coco", "Swin-S", 36, 55.3),
    _co_deformable("co_deformable_detr_swin_base_1x_coco", "Swin-B", 12, 55.5),
    _co_deformable("co_deformable_detr_swin_base_3x_coco", "Swin-B", 36, 57.5),
    _co_deformable("co_deformable_detr_swin_large_1x_coco", "Swin-L", 12, 56.9),
    _co_deformable("co_deformable_detr_swin_large_900q_3x_coco", "Swin-L", 36, 58.5),
    _mmdet3("co_dino_5scale_r50_1x_coco", "co_dino_5scale_r50_1x_coco-7481f903.pth", "R50", 12, 52.1),
    _mmdet3("co_dino_5scale_lsj_r50_1x_coco",
            "co_dino_5scale_r50_lsj_8xb2_1x_coco/co_dino_5scale_r50_lsj_8xb2_1x_coco-69a72d67.pth", "R50", 12, 52.0,
            note="retrained by mmdetection 3.x (52.0; the Sense-X file, 52.1, is in its Google Drive folder)"),
    _mmdet3("co_dino_5scale_lsj_r50_3x_coco", "co_dino_5scale_lsj_r50_3x_coco-fe5a6829.pth", "R50", 36, 54.8),
    _co_dino_drive("co_dino_5scale_9encoder_lsj_r50_1x_coco", "R50", 12, "COCO", 52.6),
    _co_dino_drive("co_dino_5scale_9encoder_lsj_r50_3x_coco", "R50", 36, "COCO", 55.4),
    _mmdet3("co_dino_5scale_swin_large_1x_coco", "co_dino_5scale_swin_large_1x_coco-27c13da4.pth", "Swin-L", 12, 58.9),
    _co_dino_drive("co_dino_5scale_swin_large_2x_coco", "Swin-L", 24, "COCO", 59.8,
                   note="listed in the README but not published (Sense-X/Co-DETR issue #184)"),
    _mmdet3("co_dino_5scale_swin_large_3x_coco", "co_dino_5scale_swin_large_3x_coco-d7a6d8af.pth", "Swin-L", 36, 60.0),
    _mmdet3("co_dino_5scale_lsj_swin_large_1x_coco", "co_dino_5scale_lsj_swin_large_1x_coco-3af73af2.pth", "Swin-L", 12,
            59.3),
    _co_dino_drive("co_dino_5scale_lsj_swin_large_2x_coco", "Swin-L", 24, "COCO", 60.4,
                   note="listed in the README but not published (Sense-X/Co-DETR issue #184)"),
    _co_dino_drive("co_dino_5scale_lsj_swin_large_3x_coco", "Swin-L", 36, "COCO", 60.7,
                   note="mmdetection's README links its LSJ 3x row to the LSJ 1x file (-3af73af2), so only the Drive "
                        "file is this model"),
    _mmdet3("co_dino_5scale_swin_large_16e_o365tococo", "co_dino_5scale_swin_large_16e_o365tococo-614254c9.pth", "Swin-L",
            16, 64.1, data="Objects365 -> COCO",
            sha256="614254c94b57acbff6a4448f7aa5d6315f8483b115438796e2606ce7a62712fe",
            sha256_source="a third-party download script (public GitHub code); its first 8 digits agree with the "
                          "server's file name"),
    _co_dino_drive("co_dino_5scale_lsj_swin_large_3x_lvis", "Swin-L", 36, "LVIS", 56.9, LVIS),
    _co_dino_drive("co_dino_5scale_lsj_swin_large_16e_o365tolvis", "Swin-L", 16, "Objects365 -> LVIS", 64.5, LVIS),
    Release("co_dino_5scale_vit_large_coco", "co_dino_5scale_vit_large_coco", "Co-DINO", "ViT-L", 12,
            "Objects365 -> COCO", 65.9, hub=("zongzhuofan/co-detr-vit-large-coco", "pytorch_model.pth"),
            sha256="733d2ccde180a55151a68a6cab7c9f42b117d24d38d6197b37caf3189243256c", size=2_934_763_233,
            sha256_source="a third-party download script (public GitHub code), not checked against the file here",
            publisher="the authors' Hugging Face page"),
    Release("co_dino_5scale_lsj_vit_large_lvis", "co_dino_5scale_lsj_vit_large_lvis", "Co-DINO", "ViT-L", 16,
            "Objects365 -> LVIS", 68.0, LVIS, hub=("zongzhuofan/co-detr-vit-large-lvis", "pytorch_model.pth"),
            publisher="the authors' Hugging Face page"),
)
BY_NAME = {release.name: release for release in RELEASES}


def find_release(name: str) -> Release | None:
    """The release called ``name``, or None."""
    return BY_NAME.get(name)


def get_release(name: str) -> Release:
    """The release called ``name``; a UserError listing the closest names otherwise."""
    release = find_release(name)
    if release is None:
        close = difflib.get_close_matches(name, list(BY_NAME), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; `codetr weights list` lists them"
        raise UserError(f"{name!r} is neither a folder, a model-zoo name nor a Hugging Face repository id{hint}")
    return release

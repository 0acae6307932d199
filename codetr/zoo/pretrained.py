"""Published checkpoints made ready to load: downloaded (:mod:`codetr.zoo.download`), checked,
converted with ``codetr convert mmdet`` and cached, so that the next call needs no network.

The cache folder is ``$CODETR_CACHE``, else ``$XDG_CACHE_HOME/codetr``, else ``~/.cache/codetr``:

    models/NAME/model.safetensors, config.yaml   a converted model (what Detector.from_pretrained loads)
    downloads/FILE.part                          an interrupted download, resumed by the next call

A model is cached once both files of its folder exist (each written atomically); the downloaded
checkpoint is deleted once converted.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from pathlib import Path

from safetensors import safe_open

from codetr.errors import UserError
from codetr.files import CONFIG_NAME, WEIGHTS_NAME, atomic_write_text
from codetr.zoo.download import download, sha256_of
from codetr.zoo.hub import download_from_hub, is_repo_id
from codetr.zoo.registry import Release, get_release

CACHE_ENV = "CODETR_CACHE"


def cache_root() -> Path:
    """``$CODETR_CACHE``, else ``$XDG_CACHE_HOME/codetr``, else ``~/.cache/codetr``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "codetr"


def model_folder(name: str) -> Path:
    """Where the converted model ``name`` is cached."""
    return cache_root() / "models" / name


def is_cached(name: str) -> bool:
    folder = model_folder(name)
    return (folder / WEIGHTS_NAME).is_file() and (folder / CONFIG_NAME).is_file()


def pretrained_folder(name_or_path: str | Path) -> Path:
    """The folder of ``Detector.from_pretrained(name_or_path)``: an existing path as it is, a model-zoo
    name's cache folder (:func:`fetch_pretrained`), or a Hub repository's snapshot (``user/name``)."""
    text = str(name_or_path)
    if Path(text).exists():
        return Path(text)
    if is_repo_id(text):  # zoo names have no "/"
        return download_from_hub(text)
    return fetch_pretrained(text)  # a UserError naming the closest zoo names when it is none


def fetch_pretrained(name: str | Release, file: str | Path | None = None, force: bool = False,
                     progress: bool = True) -> Path:
    """The cache folder of the converted model-zoo model ``name`` (``model.safetensors`` and
    ``config.yaml``), downloading, checking and converting its checkpoint first unless cached.

    ``file``: a checkpoint downloaded by hand (the rows only on Google Drive), checked against the
    known hash when there is one and converted; ``force``: convert again even when cached.
    """
    release = get_release(name) if isinstance(name, str) else name
    folder = model_folder(release.name)
    if file is None and not force and is_cached(release.name):
        return folder
    if file is not None:
        checkpoint = Path(file)
        if not checkpoint.is_file():
            raise UserError(f"--file {checkpoint}: no such file")
        _check_hash(checkpoint, release)
    elif release.manual is not None:
        raise UserError(f"{release.name} has no direct download: {release.manual}")
    else:
        checkpoint = download(release.download_url, cache_root() / "downloads" / release.filename, release.sha256,
                              None if release.sha256 else release.hash_prefix, progress)
    try:
        _convert(checkpoint, release, folder)
    finally:
        if file is None:
            checkpoint.unlink(missing_ok=True)
    return folder


def _check_hash(checkpoint: Path, release: Release) -> None:
    """A hand-downloaded file must have the release's known SHA-256 (or its prefix); it is never deleted."""
    expected = release.sha256 or release.hash_prefix
    if expected and not sha256_of(checkpoint).startswith(expected.lower()):
        raise UserError(f"--file {checkpoint}: its SHA-256 is not the published {release.name} file's ({expected}...): "
                        "another or a damaged file")


def _convert(checkpoint: Path, release: Release, folder: Path) -> None:
    """``codetr convert mmdet`` into ``folder``, then ``config.yaml`` (the config the converter stored in
    the weights, with the checkpoint's class count)."""
    from codetr.convert.mmdet import convert_mmdet_file
    from codetr.convert.mmdet_checkpoint import CheckpointError

    weights = folder / WEIGHTS_NAME
    (folder / CONFIG_NAME).unlink(missing_ok=True)  # the folder counts as cached only once both files are new
    try:
        with contextlib.redirect_stdout(sys.stderr):  # the converter's report; stdout: `codetr weights get`'s folder
            convert_mmdet_file(checkpoint, release.config, weights)
        with safe_open(str(weights), framework="pt") as f:
            atomic_write_text(folder / CONFIG_NAME, f.metadata()["config"])
    except BaseException as err:
        weights.unlink(missing_ok=True)  # no half-made model left in the cache
        if isinstance(err, CheckpointError):
            raise UserError(f"{release.name}: the checkpoint does not convert for config {release.config}: {err}") from err
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            raise UserError(f"no space left on the device of {folder} while writing the converted {release.name}; "
                            f"free some space (or set {CACHE_ENV} to another disk) and run again") from err
        raise

"""Downloading one file over HTTP(S) with the standard library: a progress bar, resuming an
interrupted download, and a SHA-256 check before the file is used.

The bytes go to ``<file>.part`` next to the destination. An interrupted transfer (a cut connection,
a timeout, Ctrl-C) keeps the ``.part``, so that the next call asks the server only for the rest (an
HTTP Range request); a file whose hash does not match, and the ``.part`` of a download that filled
the disk, are deleted. Every failure is a one-line UserError.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import os
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from codetr.errors import UserError

CHUNK = 1 << 20
TIMEOUT_S = 60


def part_path(dest: Path) -> Path:
    """Where the bytes of ``dest`` are collected until the download is complete and checked."""
    return dest.with_name(dest.name + ".part")


def download(url: str, dest: str | Path, sha256: str | None = None, hash_prefix: str | None = None,
             progress: bool = True) -> Path:
    """Download ``url`` to ``dest`` (resuming ``dest.part`` left by an interrupted call) and check its
    SHA-256 against ``sha256``, or its first hex digits against ``hash_prefix``. Returns ``dest``."""
    dest = Path(dest)
    part = part_path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        total = _fetch(url, part, progress)
    except (OSError, http.client.HTTPException) as err:
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            part.unlink(missing_ok=True)
            raise UserError(f"no space left on the device of {dest.parent} while downloading {url}; the partial file "
                            "was deleted: free some space (or set CODETR_CACHE to another disk) and run again") from err
        raise _interrupted(url, part, err) from err
    received = part.stat().st_size
    if total is not None and received < total:
        raise _interrupted(url, part, f"the connection closed after {received} of {total} bytes")
    actual = sha256_of(part)
    if (sha256 and actual != sha256.lower()) or (hash_prefix and not actual.startswith(hash_prefix.lower())):
        part.unlink()
        raise UserError(f"{url}: SHA-256 {actual} is not the expected {sha256 or hash_prefix + '...'}; the file was "
                        "deleted (corrupted in transit or replaced on the server: run again, report it if it persists)")
    os.replace(part, dest)
    return dest


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch(url: str, part: Path, progress: bool) -> int | None:
    """Append the rest of the file to ``part`` (all of it when the server ignores the range); returns the
    file's total size when the server says it, else None."""
    offset = part.stat().st_size if part.is_file() else 0
    headers = {"User-Agent": "codetr"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:  # nothing after the end: the .part already holds the whole file
            return None
        hint = " (the file moved or was removed; docs/weights.md says how to get it by hand)" if err.code == 404 else ""
        raise UserError(f"{url}: HTTP {err.code} {err.reason}{hint}") from None
    except urllib.error.URLError as err:
        raise UserError(f"cannot reach {url} ({err.reason}): no network? A model fetched before loads from the "
                        "cache without it") from None
    with response:
        if offset and response.status != 206:  # the server sent the whole file
            offset = 0
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else None
        with part.open("ab" if offset else "wb") as f, tqdm(total=total, initial=offset, unit="B", unit_scale=True,
                                                             unit_divisor=1024, desc=part.name.removesuffix(".part"),
                                                             disable=not progress, leave=False) as bar:
            while chunk := response.read(CHUNK):
                f.write(chunk)
                bar.update(len(chunk))
    return total


def _interrupted(url: str, part: Path, why: object) -> UserError:
    have = part.stat().st_size if part.is_file() else 0
    return UserError(f"the download of {url} was interrupted ({str(why) or type(why).__name__}); the {have} bytes received "
                     f"are kept in {part}, and running the same command again resumes from there")

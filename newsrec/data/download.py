"""Downloading the official MIND zips (standard library ``urllib`` only).

Each file is fetched into ``<name>.part`` (resumed with an HTTP Range request when a partial file
is there), checked against the announced size, its sha256 computed and compared with a known
checksum when one is available, tested as a zip, then renamed into place; ``<name>.sha256`` is
written beside it in ``sha256sum`` format.

Known checksums come from, in order: ``<name>.sha256`` already in the destination folder (e.g.
kept from an earlier download or placed by the user), the ``expected_sha256`` argument, and the
server's ETag when it is a sha256 (the Hugging Face hub sends one for large files).
"""
from __future__ import annotations

import hashlib
import os
import re
import socket
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from newsrec.errors import NewsrecError
from newsrec.utils.io import atomic_file
from newsrec.utils.progress import progress

DEFAULT_BASE_URL = "https://huggingface.co/datasets/yjw1029/MIND/resolve/main"
BASE_URL_ENV = "NEWSREC_MIND_BASE_URL"
MIND_FILES: dict[str, tuple[str, ...]] = {
    "small": ("MINDsmall_train.zip", "MINDsmall_dev.zip"),
    "large": ("MINDlarge_train.zip", "MINDlarge_dev.zip", "MINDlarge_test.zip"),
}
CHUNK_BYTES = 1 << 20
TIMEOUT_SECONDS = 30.0
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class DownloadError(NewsrecError):
    """A download failed: unreachable host, missing file, short transfer or checksum mismatch."""


@dataclass(frozen=True)
class Downloaded:
    path: Path
    sha256: str
    size: int
    resumed_from: int  # bytes already on disk when this run started (0 = fresh download)
    already_present: bool  # the complete, verified file was there; nothing was fetched


def base_url_default() -> str:
    """``$NEWSREC_MIND_BASE_URL`` if set, else the official host."""
    return os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL


def download_mind(size: str, *, dest: str | Path, base_url: str | None = None,
                  expected_sha256: Mapping[str, str] | None = None) -> list[Downloaded]:
    """Download MIND ``size`` ("small" | "large") into ``dest``; returns one entry per zip."""
    if size not in MIND_FILES:
        raise DownloadError(f"unknown MIND size {size!r}; expected one of {', '.join(MIND_FILES)}")
    base = (base_url or base_url_default()).rstrip("/")
    expected = dict(expected_sha256 or {})
    return [download_file(f"{base}/{name}", Path(dest) / name, expected_sha256=expected.get(name))
            for name in MIND_FILES[size]]


def download_file(url: str, path: str | Path, *, expected_sha256: str | None = None,
                  timeout: float = TIMEOUT_SECONDS) -> Downloaded:
    """Fetch ``url`` to ``path`` with resume, size and checksum checks, zip test and atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sidecar = path.with_name(path.name + ".sha256")
    part = path.with_name(path.name + ".part")
    known = _read_sidecar(sidecar) or (expected_sha256.lower() if expected_sha256 else None)

    if path.is_file():
        digest = _sha256(path)
        if (known is None or digest == known) and _is_valid_zip(path):
            if not sidecar.is_file():
                _write_sidecar(sidecar, digest, path.name)
            return Downloaded(path, digest, path.stat().st_size, resumed_from=0, already_present=True)

    offset = part.stat().st_size if part.is_file() else 0
    response, total, offset = _open(url, offset, timeout)
    etag = _etag_sha256(response)
    if known is None:
        known = etag
    resumed_from = offset
    with response, open(part, "ab" if offset else "wb") as out, \
            progress(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                     desc=path.name) as bar:
        while True:
            try:
                block = response.read(CHUNK_BYTES)
            except (OSError, socket.timeout) as exc:
                raise DownloadError(f"{url}: connection lost after {offset:,} bytes ({exc}); run the "
                                    f"same command again to resume") from None
            if not block:
                break
            out.write(block)
            offset += len(block)
            bar.update(len(block))
    if total is not None and offset != total:
        raise DownloadError(f"{url}: received {offset:,} of {total:,} bytes; run the same command again "
                            f"to resume")
    digest = _sha256(part)
    if known is not None and digest != known:
        part.unlink(missing_ok=True)
        raise DownloadError(f"{path.name}: sha256 {digest} does not match the expected {known}; the "
                            f"download was removed, run again to fetch it afresh")
    if not _is_valid_zip(part):
        part.unlink(missing_ok=True)
        raise DownloadError(f"{path.name}: the downloaded file is not a valid zip (is {url} right?); "
                            f"it was removed")
    os.replace(part, path)
    _write_sidecar(sidecar, digest, path.name)
    return Downloaded(path, digest, offset, resumed_from=resumed_from, already_present=False)


def _open(url: str, offset: int, timeout: float):
    """Open ``url`` (from ``offset`` when > 0). Returns (response, total size or None, offset),
    restarting from 0 when the server ignores or refuses the range."""
    request = urllib.request.Request(url, headers={"User-Agent": "newsrec"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # partial file is not a prefix the server can continue
            exc.close()
            return _open(url, 0, timeout)
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}; check the URL or --base-url "
                            f"(or ${BASE_URL_ENV})") from None
    except (urllib.error.URLError, socket.timeout, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DownloadError(f"cannot reach {url} ({reason}); check the network connection, or set "
                            f"--base-url / ${BASE_URL_ENV} to a reachable mirror") from None
    length = response.headers.get("Content-Length")
    if offset and response.status == 206:
        content_range = response.headers.get("Content-Range", "")
        match = re.search(r"/(\d+)$", content_range)
        total = int(match.group(1)) if match else (offset + int(length) if length else None)
        return response, total, offset
    # 200: the whole file from the start (a server without Range support)
    return response, (int(length) if length else None), 0


def _etag_sha256(response) -> str | None:
    for header in ("X-Linked-Etag", "ETag"):
        value = (response.headers.get(header) or "").strip().strip('"').removeprefix("W/").strip('"')
        if _SHA256_RE.match(value.lower()):
            return value.lower()
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_valid_zip(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.testzip() is None
    except (zipfile.BadZipFile, OSError, EOFError):
        return False


def _read_sidecar(sidecar: Path) -> str | None:
    if not sidecar.is_file():
        return None
    first = sidecar.read_text(encoding="utf-8").split()
    if not first or not _SHA256_RE.match(first[0].lower()):
        raise DownloadError(f"{sidecar}: expected a sha256 checksum ('<64 hex digits>  <file name>'); "
                            f"fix or delete it")
    return first[0].lower()


def _write_sidecar(sidecar: Path, digest: str, name: str) -> None:
    with atomic_file(sidecar, "w") as fh:
        fh.write(f"{digest}  {name}\n")

"""Atomic outputs: write to a temporary sibling, rename when complete. Nothing is half-written."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp/mkdtemp create private (0600/0700) entries; outputs get the usual permissions instead.
_UMASK = _current_umask()
_FILE_MODE = 0o666 & ~_UMASK
_DIR_MODE = 0o777 & ~_UMASK


@contextlib.contextmanager
def atomic_dir(out: str | Path, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it replaces ``out`` in one rename.

    On an exception the temporary folder is removed and ``out`` is left as it was.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, _DIR_MODE)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        if not overwrite:
            shutil.rmtree(tmp, ignore_errors=True)
            raise FileExistsError(out)
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary sibling of ``path`` for writing; rename it over ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, _FILE_MODE)
    try:
        with open(tmp, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_path(path: str | Path) -> contextlib.AbstractContextManager[Path]:
    """Yield a temporary path for a writer that takes a file name (e.g. ``np.save``, parquet)."""

    @contextlib.contextmanager
    def _cm() -> Iterator[Path]:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{p.name}.tmp-", dir=p.parent, suffix=p.suffix)
        os.close(fd)
        tmp = Path(tmp_name)
        os.chmod(tmp, _FILE_MODE)
        try:
            yield tmp
            os.replace(tmp, p)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    return _cm()


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_file(path, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=False, default=str)
        fh.write("\n")


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def read_manifest(root: str | Path, manifest: str, *, version: int, what: str, remedy: str,
                  required: tuple[str, ...] = ()) -> tuple[Path, dict[str, Any]]:
    """Open the manifest of an artifact folder and check it: present, a JSON object, of schema
    ``version``, with every file of ``required`` beside it. ``what`` names the kind of folder
    ("dataset artifact", "index folder", ...), ``remedy`` the command that makes a good one.

    Returns (manifest path, manifest); raises ArtifactError naming the file otherwise.
    """
    from newsrec.errors import ArtifactError

    root = Path(root)
    path = root / manifest
    if not path.is_file():
        article = "an" if what[:1] in "aeiou" else "a"
        raise ArtifactError(f"{root}: not {article} {what} (no {manifest}); {remedy}")
    try:
        data = read_json(path)
    except ValueError as exc:
        raise ArtifactError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{path}: expected a JSON object")
    found = data.get("schema_version")
    if found != version:
        raise ArtifactError(f"{path}: {what} schema version {found!r}, this newsrec reads {version}; {remedy}")
    for name in required:
        if not (root / name).is_file():
            raise ArtifactError(f"{root}: incomplete {what}, {name} is missing; {remedy}")
    return path, data


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()

"""Stage bookkeeping for the end-to-end pipelines: skip a stage whose inputs and settings are
unchanged, time it, and track it as a nested MLflow run under one parent run.

A stage's *key* is a hash of its settings and of its inputs' fingerprints. The key is stored in a
marker beside the stage's output; on the next run the stage is skipped when the marker's key
matches and the output still exists (``force`` redoes every stage).
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from newsrec.utils.io import read_json, sha256_file, write_json

MARKER_SUFFIX = ".stage.json"


@dataclass
class StageResult:
    name: str
    output: Path
    skipped: bool
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)


def fingerprint(path: Path) -> str:
    """A content fingerprint: a stage marker's key, a manifest's hash, or a file's sha256."""
    path = Path(path)
    marker = _marker_path(path)
    if marker.is_file():
        return read_json(marker)["key"]
    if path.is_dir():
        h = hashlib.sha256()
        for name in ("manifest.json", "model.json"):
            if (path / name).is_file():
                h.update(sha256_file(path / name).encode())
        return h.hexdigest()
    if path.is_file():
        return sha256_file(path)
    return "missing"


def _marker_path(output: Path) -> Path:
    return output.parent / f".{output.name}{MARKER_SUFFIX}"


class StageRunner:
    """Runs stages in order, skipping the unchanged ones. ``track`` wraps each executed stage
    (e.g. in a nested MLflow run); it receives the stage name and returns a context manager."""

    def __init__(self, *, force: bool = False,
                 track: Callable[[str], Any] | None = None,
                 echo: Callable[[str], None] = print) -> None:
        self.force = force
        self.track = track
        self.echo = echo
        self.results: list[StageResult] = []

    def run(self, name: str, *, output: Path, inputs: list[Path], settings: dict[str, Any],
            fn: Callable[[], dict[str, Any] | None], tracked: bool = True) -> StageResult:
        """Run ``fn`` unless the marker beside ``output`` holds the same key. ``tracked=False``
        for stages that open their own tracking run (training, evaluation)."""
        output = Path(output)
        key = hashlib.sha256(json.dumps(
            {"stage": name, "settings": settings, "inputs": [fingerprint(p) for p in inputs]},
            sort_keys=True, default=str).encode()).hexdigest()
        marker = _marker_path(output)
        if not self.force and output.exists() and marker.is_file():
            saved = read_json(marker)
            if saved.get("key") == key:
                result = StageResult(name, output, True, 0.0, saved.get("info", {}))
                self.echo(f"[{name}] unchanged, skipped ({output})")
                self.results.append(result)
                return result
        self.echo(f"[{name}] running ...")
        start = time.perf_counter()
        if self.track is not None and tracked:
            with self.track(name):
                info = fn() or {}
        else:
            info = fn() or {}
        seconds = time.perf_counter() - start
        write_json(marker, {"key": key, "stage": name, "seconds": seconds, "info": info})
        self.echo(f"[{name}] done in {seconds:.1f} s")
        result = StageResult(name, output, False, seconds, info)
        self.results.append(result)
        return result

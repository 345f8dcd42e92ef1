"""Errors users see as one clear line (the CLI prints them without a traceback)."""
from __future__ import annotations

from pathlib import Path


class NewsrecError(Exception):
    """Base for every error that is the user's to fix (bad input, bad config, missing artifact)."""


class ConfigError(NewsrecError):
    """A setting is unknown, of the wrong type or out of range."""


class DataError(NewsrecError):
    """Input data is malformed. Names the file and, where there is one, the line."""

    def __init__(self, path: str | Path, message: str, line: int | None = None) -> None:
        self.path = str(path)
        self.line = line
        self.reason = message
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")


class ArtifactError(NewsrecError):
    """An artifact (dataset, model, index) is missing, incomplete or of another schema version."""

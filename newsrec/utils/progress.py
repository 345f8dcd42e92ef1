"""Progress bars for every long step (tqdm on stderr; quiet when NEWSREC_PROGRESS=0)."""
from __future__ import annotations

import os
from typing import Any, Iterable

from tqdm.auto import tqdm


def progress(iterable: Iterable[Any] | None = None, **kwargs: Any) -> tqdm:
    """A tqdm bar with the project's defaults: stderr, dynamic width, off when disabled."""
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("leave", False)
    kwargs.setdefault("mininterval", 0.5)
    if os.environ.get("NEWSREC_PROGRESS", "1") == "0":
        kwargs["disable"] = True
    return tqdm(iterable, **kwargs)

"""``NewsInputs``: everything the news encoder reads about a batch of news, as tensors.

One structure for every caller: training batches, evaluation, batch scoring, the index and fresh news
at serve time all gather it by news index (``newsrec.data.features.NewsFeatures.gather``) and hand it
to ``NewsRecommender.encode_news``. Which fields are set depends on the model's inputs
(``model.text_encoder``, ``model.use_entities``); the encoder refuses a batch missing one it needs.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
from torch import Tensor

_INTEGER_FIELDS = ("category", "subcategory", "title_tokens", "entities")


@dataclass
class NewsInputs:
    """A batch of B news (T = title words, L = PLM tokens, H = PLM width, E = entities per news).

    ``category``/``subcategory``: int64 [B] (0 = unknown). ``title_tokens``: int64 [B, T] word ids
    (0 = pad, 1 = unknown). ``text_states``: float [B, L, H] a pretrained language model's token
    states, with ``text_mask`` bool [B, L] (True = real token). ``entities``: int64 [B, E] entity ids
    (0 = none).
    """

    category: Tensor
    subcategory: Tensor
    title_tokens: Tensor | None = None
    text_states: Tensor | None = None
    text_mask: Tensor | None = None
    entities: Tensor | None = None

    def __len__(self) -> int:
        return int(self.category.shape[0])

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> "NewsInputs":
        return dataclasses.replace(self, **{
            f.name: (None if getattr(self, f.name) is None
                     else getattr(self, f.name).to(device, non_blocking=non_blocking))
            for f in dataclasses.fields(self)})

    def select(self, rows: Tensor) -> "NewsInputs":
        """The news at ``rows`` (int64 [n]), in that order."""
        return dataclasses.replace(self, **{
            f.name: (None if getattr(self, f.name) is None else getattr(self, f.name)[rows])
            for f in dataclasses.fields(self)})

    @classmethod
    def cat(cls, parts: "list[NewsInputs]") -> "NewsInputs":
        """The news of ``parts`` one after another (PLM states right-padded to the widest part)."""
        fields: dict[str, Tensor | None] = {}
        for f in dataclasses.fields(cls):
            values = [getattr(p, f.name) for p in parts]
            if all(v is None for v in values):
                fields[f.name] = None
                continue
            if any(v is None for v in values):
                raise ValueError(f"NewsInputs.cat: field {f.name} is set in some parts only")
            if f.name in ("text_states", "text_mask"):
                width = max(int(v.shape[1]) for v in values)
                values = [torch.nn.functional.pad(v, (0, 0, 0, width - v.shape[1]) if v.ndim == 3
                                                  else (0, width - v.shape[1])) for v in values]
            fields[f.name] = torch.cat(values)
        return cls(**fields)

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], device: torch.device | str | None = None
                    ) -> "NewsInputs":
        """Numpy arrays keyed by field name (ids cast to int64, states kept in their dtype)."""
        tensors = {}
        for name, value in arrays.items():
            array = np.ascontiguousarray(value)
            if name in _INTEGER_FIELDS:
                array = array.astype(np.int64, copy=False)
            tensor = torch.from_numpy(array)
            tensors[name] = tensor.to(device) if device is not None else tensor
        return cls(**tensors)

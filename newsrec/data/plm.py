"""Pretrained language model (PLM) token states of news titles: the one module importing transformers.

A frozen backbone's token states do not change during training, so they are computed once per news,
batched and sorted by length, and cached beside the dataset artifact as fp16 arrays read through a
memory map::

    <dataset>/plm_states/<key>/states.npy    float16 [n_news + 1, plm_max_len, H] (row 0 = padding news)
                               lengths.npy   int32 [n_news + 1] tokens per title (0 for the padding news)
                               meta.json     model name, fingerprint, layer, max_len, dim, dataset manifest sha256

``key`` hashes the backbone's fingerprint (sha256 of its weights and of its tokenizer's vocabulary
and settings), the layer the states come from, ``plm_max_len`` and the dataset manifest, so a model,
tokenizer or dataset change gets its own cache and training, evaluation, scoring, indexing and
serving never run the backbone again for the same news. With ``plm_finetune_layers = k`` the cache
holds the states *below* the top k layers; those k layers are copied into the news encoder
(``TextBackbone.top_layers``) and trained with it.

transformers is an optional dependency (``pip install -e .[plm]``); everything else runs without it.
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from newsrec.errors import ArtifactError, ConfigError
from newsrec.utils.io import atomic_dir, read_json, sha256_file, write_json
from newsrec.utils.progress import progress

CACHE_DIR = "plm_states"
STATES_FILE = "states.npy"
LENGTHS_FILE = "lengths.npy"
META_FILE = "meta.json"


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ConfigError("model.text_encoder=plm needs the transformers package; install it with "
                          "`pip install -e .[plm]`") from None
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return transformers


def transformers_available() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def _layer_list(model: nn.Module) -> nn.ModuleList | None:
    """The transformer blocks of a BERT-style encoder (``encoder.layer``), or None."""
    encoder = getattr(model, "encoder", None)
    layers = getattr(encoder, "layer", None)
    return layers if isinstance(layers, nn.ModuleList) else None


def _fingerprint(model: nn.Module, tokenizer: Any) -> str:
    """sha256 of the weights (names, shapes, bytes) and of the tokenizer's vocabulary and settings."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tuple(data.shape)}:{data.dtype}".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    digest.update(type(tokenizer).__name__.encode())
    digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(repr(getattr(tokenizer, "do_lower_case", None)).encode())
    return digest.hexdigest()


class TopLayers(nn.Module):
    """The top k blocks of a BERT-style backbone, trained inside the news encoder.

    ``states [B, L, H]`` (the cached states below these blocks), ``mask [B, L]`` bool → ``[B, L, H]``.
    """

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, states: Tensor, mask: Tensor) -> Tensor:
        bias = torch.zeros(mask.shape, dtype=states.dtype, device=states.device)
        bias = bias.masked_fill(~mask, torch.finfo(states.dtype).min)[:, None, None, :]  # (B, 1, 1, L)
        for layer in self.layers:
            out = layer(states, attention_mask=bias)
            states = out[0] if isinstance(out, tuple) else out
        return states


class TextBackbone:
    """A Hugging Face model and tokenizer loaded from ``name`` (a folder or a hub id), in eval mode.

    With ``finetune_layers = k`` the top k blocks are split off (``top_layers``) and ``states`` returns
    the hidden states below them. ``fingerprint`` identifies the full backbone and its tokenizer.
    """

    def __init__(self, name: str, *, max_len: int, finetune_layers: int = 0) -> None:
        tf = _transformers()
        try:
            self.tokenizer = tf.AutoTokenizer.from_pretrained(name)
            model = tf.AutoModel.from_pretrained(name)
        except (OSError, ValueError, KeyError) as exc:
            raise ArtifactError(f"{name}: cannot load a Hugging Face model and tokenizer "
                                f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                                f"expected a model folder (config.json, weights, tokenizer files) or a hub "
                                f"id available offline") from None
        model.eval()
        self.name = name
        self.max_len = max_len
        self.fingerprint = _fingerprint(model, self.tokenizer)
        self.dim = int(model.config.hidden_size)
        layers = _layer_list(model)
        n_layers = len(layers) if layers is not None else 0
        self._top: list[nn.Module] = []
        if finetune_layers:
            if layers is None:
                raise ConfigError(f"model.plm_finetune_layers={finetune_layers}: {name} is not a BERT-style "
                                  f"encoder (no encoder.layer list); use model.plm_finetune_layers=0")
            if finetune_layers > n_layers:
                raise ConfigError(f"model.plm_finetune_layers={finetune_layers}: {name} has only "
                                  f"{n_layers} layers")
            self._top = [copy.deepcopy(layer) for layer in layers[n_layers - finetune_layers:]]
            del layers[n_layers - finetune_layers:]
            model.config.num_hidden_layers = n_layers - finetune_layers
        self.total_layers = n_layers
        self.layer = n_layers - finetune_layers  # the cached states are the output of this block
        self.model = model

    def top_layers(self) -> TopLayers | None:
        """A fresh copy of the split-off top blocks (None when the backbone is frozen whole)."""
        return TopLayers([copy.deepcopy(layer) for layer in self._top]) if self._top else None

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        encoded = self.tokenizer(list(texts), truncation=True, max_length=self.max_len, padding=False)
        return [list(ids) for ids in encoded["input_ids"]]

    @torch.inference_mode()
    def states_into(self, texts: Sequence[str], out: np.ndarray, lengths: np.ndarray, *, batch_size: int = 64,
                    show_progress: bool = True) -> None:
        """Write the token states of ``texts`` into ``out`` float16 [n, max_len, H] (zeros past each
        text's tokens) and their token counts into ``lengths`` int32 [n]. Texts are run in batches of
        similar length, so little is padded."""
        ids = self.tokenize(texts)
        n = len(ids)
        counts = np.array([len(x) for x in ids], dtype=np.int32)
        lengths[:] = counts
        order = np.argsort(counts, kind="stable")
        pad = self.tokenizer.pad_token_id or 0
        bar = progress(range(0, n, batch_size), desc="PLM states", unit="batch",
                       disable=None if show_progress else True)
        for start in bar:
            rows = order[start:start + batch_size]
            width = int(counts[rows].max()) if len(rows) else 0
            if width == 0:
                continue
            input_ids = np.full((len(rows), width), pad, dtype=np.int64)
            mask = np.zeros((len(rows), width), dtype=np.int64)
            for i, r in enumerate(rows):
                input_ids[i, :counts[r]] = ids[r]
                mask[i, :counts[r]] = 1
            hidden = self.model(input_ids=torch.from_numpy(input_ids),
                                attention_mask=torch.from_numpy(mask)).last_hidden_state  # (b, w, H)
            hidden = hidden * torch.from_numpy(mask).unsqueeze(-1).to(hidden.dtype)
            block = hidden.to(torch.float16).numpy()
            out[rows, :width] = block
            if width < out.shape[1]:
                out[rows, width:] = 0

    def states(self, texts: Sequence[str], *, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """(float16 [n, max_len, H], int32 [n]) for a few texts (fresh news), in memory."""
        out = np.zeros((len(texts), self.max_len, self.dim), dtype=np.float16)
        lengths = np.zeros(len(texts), dtype=np.int32)
        self.states_into(texts, out, lengths, batch_size=batch_size, show_progress=False)
        return out, lengths


@dataclass
class TextStates:
    """Cached token states of every news of a dataset (see the module docstring)."""

    states: np.ndarray  # float16 [n_news + 1, max_len, H] (memory-mapped)
    lengths: np.ndarray  # int32 [n_news + 1]
    fingerprint: str
    dim: int
    layer: int
    path: Path


def cache_key(fingerprint: str, *, layer: int, max_len: int, dataset_manifest_sha256: str) -> str:
    text = f"{fingerprint}|layer={layer}|max_len={max_len}|dataset={dataset_manifest_sha256}"
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _open_cache(path: Path, n_rows: int) -> TextStates:
    meta = read_json(path / META_FILE)
    states = np.load(path / STATES_FILE, mmap_mode="r")
    lengths = np.load(path / LENGTHS_FILE)
    if states.shape[0] != n_rows or lengths.shape != (n_rows,) or states.dtype != np.float16:
        raise ArtifactError(f"{path}: cached PLM states of shape {states.shape} {states.dtype} do not fit "
                            f"{n_rows - 1} news; delete the folder to compute them again")
    return TextStates(states=states, lengths=lengths, fingerprint=meta["fingerprint"], dim=int(meta["dim"]),
                      layer=int(meta["layer"]), path=path)


def cached_states(dataset_root: str | Path, titles: Sequence[str], *, name: str, max_len: int,
                  finetune_layers: int = 0, batch_size: int = 64, fingerprint: str | None = None,
                  backbone: TextBackbone | None = None, show_progress: bool = True) -> TextStates:
    """The token states of ``titles`` (``titles[i]`` = news_idx i + 1), computed once and cached.

    ``fingerprint``: the backbone a trained model was built with; its cache is used without loading
    the backbone, and a backbone at ``name`` with other weights or tokenizer is refused.
    """
    root = Path(dataset_root)
    manifest_sha = sha256_file(root / "manifest.json")
    n_rows = len(titles) + 1
    if fingerprint is not None and backbone is None:
        layer = _cached_layer(root, fingerprint, max_len=max_len, manifest_sha=manifest_sha,
                              finetune_layers=finetune_layers)
        if layer is not None:
            return _open_cache(root / CACHE_DIR / cache_key(fingerprint, layer=layer, max_len=max_len,
                                                            dataset_manifest_sha256=manifest_sha), n_rows)
    if backbone is None:
        backbone = TextBackbone(name, max_len=max_len, finetune_layers=finetune_layers)
    if fingerprint is not None and backbone.fingerprint != fingerprint:
        raise ArtifactError(f"{name}: this model or tokenizer differs from the one the news encoder was "
                            f"trained with (fingerprint {backbone.fingerprint[:12]}… vs {fingerprint[:12]}…); "
                            f"point model.plm_name at the original weights or retrain")
    key = cache_key(backbone.fingerprint, layer=backbone.layer, max_len=max_len,
                    dataset_manifest_sha256=manifest_sha)
    path = root / CACHE_DIR / key
    if (path / META_FILE).is_file():
        return _open_cache(path, n_rows)
    with atomic_dir(path) as tmp:
        states = np.lib.format.open_memmap(tmp / STATES_FILE, mode="w+", dtype=np.float16,
                                           shape=(n_rows, max_len, backbone.dim))
        lengths = np.zeros(n_rows, dtype=np.int32)
        states[0] = 0
        backbone.states_into(titles, states[1:], lengths[1:], batch_size=batch_size,
                             show_progress=show_progress)
        states.flush()
        del states
        np.save(tmp / LENGTHS_FILE, lengths)
        write_json(tmp / META_FILE, {"name": name, "fingerprint": backbone.fingerprint, "layer": backbone.layer,
                                     "total_layers": backbone.total_layers, "max_len": max_len, "dim": backbone.dim, "n_news": n_rows - 1,
                                     "dataset_manifest_sha256": manifest_sha})
    return _open_cache(path, n_rows)


def _cached_layer(root: Path, fingerprint: str, *, max_len: int, manifest_sha: str,
                  finetune_layers: int) -> int | None:
    """The layer of an existing cache for this backbone, dataset and length (None if there is none)."""
    folder = root / CACHE_DIR
    if not folder.is_dir():
        return None
    for meta_path in sorted(folder.glob(f"*/{META_FILE}")):
        meta = read_json(meta_path)
        if (meta.get("fingerprint") == fingerprint and meta.get("max_len") == max_len
                and meta.get("dataset_manifest_sha256") == manifest_sha):
            if int(meta["total_layers"]) - int(meta["layer"]) == finetune_layers:
                return int(meta["layer"])
    return None

"""What the news encoder reads about each news, gathered by news index: the one path from a dataset
artifact (or a fresh news at serve time) to ``newsrec.models.inputs.NewsInputs``.

``news_features(dataset, config)`` opens the arrays the model's settings call for:

* ``category``/``subcategory`` int64 [n_news + 1] — always;
* ``title_tokens`` int32 [n_news + 1, title_len] — ``model.text_encoder=words``, or
  ``model.title_match_dim`` (the title match reads the title's words whatever the text encoder);
* ``text_states`` float16 [n_news + 1, plm_max_len, H] with ``text_lengths`` — ``text_encoder=plm``
  (computed once and cached beside the dataset, ``newsrec.data.plm``);
* ``entities`` int32 [n_news + 1, max_entities] — ``model.use_entities``: ids into
  ``entity_vectors.npy`` when the dataset has MIND's entity embeddings, else into a vocabulary of
  the entities of the train split's news (learned embeddings; an entity training never saw is 0).

``gather(rows)`` returns numpy arrays keyed by ``NewsInputs`` field; ``fresh(...)`` the same for a
news given by its text (same tokeniser, same backbone). Training batches, evaluation, scoring, the
index and the service all go through these two.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import polars as pl

from newsrec.config import Config, ModelConfig
from newsrec.data import schema
from newsrec.data.schema import UNK
from newsrec.errors import ArtifactError
from newsrec.utils.io import read_json


@dataclass
class EntityTable:
    """Entity vocabulary: ``ids[i]`` = WikidataId of entity i (0 = none); ``vectors`` float32
    [len(ids), dim] when pretrained (MIND's entity_embedding.vec), else None (learned)."""

    ids: list[str]
    vectors: np.ndarray | None

    @property
    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.ids).encode()).hexdigest()


def entity_table(dataset: Any) -> EntityTable:
    """The dataset's entity vectors if ingested, else the entities of the train split's news titles
    (sorted; entities of dev/test news only are not in it: nothing would train their embeddings)."""
    vectors_path = dataset.root / schema.ENTITY_VECTORS
    if vectors_path.is_file() and (dataset.root / schema.ENTITIES).is_file():
        ids = read_json(dataset.root / schema.ENTITIES)["ids"]
        vectors = np.load(vectors_path).astype(np.float32, copy=False)
        if vectors.shape[0] != len(ids):
            raise ArtifactError(f"{vectors_path}: {vectors.shape[0]} rows for {len(ids)} entity ids")
        return EntityTable(ids=list(ids), vectors=vectors)
    news = dataset.news
    train_news = news.filter(pl.col("splits").list.contains("train"))
    learned = sorted(set(train_news["title_entities"].explode().drop_nulls().to_list()) - {""})
    return EntityTable(ids=["", *learned], vectors=None)


def entity_matrix(entity_lists: pl.Series, table: EntityTable, *, max_entities: int) -> np.ndarray:
    """list[str] WikidataIds [n] → int32 [n, max_entities]: known entities in title order, 0-padded."""
    n = len(entity_lists)
    out = np.zeros((n, max_entities), dtype=np.int32)
    if n == 0 or len(table.ids) <= 1:
        return out
    frame = (pl.DataFrame({"ids": entity_lists.cast(pl.List(pl.String))}).with_row_index("row")
             .explode("ids").drop_nulls("ids"))
    frame = frame.with_columns(index=pl.col("ids").replace_strict(
        table.ids[1:], np.arange(1, len(table.ids), dtype=np.int32), default=0, return_dtype=pl.Int32))
    frame = frame.filter(pl.col("index") > 0).with_columns(pos=pl.int_range(pl.len()).over("row"))
    frame = frame.filter(pl.col("pos") < max_entities)
    out[frame["row"].to_numpy(), frame["pos"].to_numpy()] = frame["index"].to_numpy()
    return out


@dataclass
class NewsFeatures:
    """Per-news model inputs indexed by news_idx (row 0 = the padding news). See the module docstring."""

    category: np.ndarray
    subcategory: np.ndarray
    title_tokens: np.ndarray | None = None
    text_states: np.ndarray | None = None
    text_lengths: np.ndarray | None = None
    entities: np.ndarray | None = None
    # what fresh news need: the vocabulary and tokenisation of ingest, the PLM, the entity table
    vocab: list[str] | None = None
    lowercase: bool = True
    plm: dict[str, Any] = field(default_factory=dict)
    entity_table: EntityTable | None = None
    _backbone: Any = None

    @property
    def n_rows(self) -> int:
        return int(self.category.shape[0])

    def gather(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The inputs of news ``rows`` (news_idx), keyed by ``NewsInputs`` field. PLM states are cut
        to the longest title among ``rows``."""
        rows = np.asarray(rows, dtype=np.int64)
        out: dict[str, np.ndarray] = {"category": self.category[rows], "subcategory": self.subcategory[rows]}
        if self.title_tokens is not None:
            out["title_tokens"] = self.title_tokens[rows]
        if self.text_states is not None:
            lengths = self.text_lengths[rows]
            width = max(int(lengths.max()) if len(rows) else 0, 1)
            order = np.argsort(rows, kind="stable")  # memory-mapped reads in file order
            states = np.empty((len(rows), width, self.text_states.shape[2]), dtype=np.float16)
            states[order] = self.text_states[rows[order], :width]
            out["text_states"] = states
            out["text_mask"] = np.arange(width)[None, :] < lengths[:, None]
        if self.entities is not None:
            out["entities"] = self.entities[rows]
        return out

    def fresh(self, titles: Sequence[str], category: Sequence[int], subcategory: Sequence[int],
              entity_ids: Sequence[Sequence[str]] | None = None) -> dict[str, np.ndarray]:
        """The inputs of news given by their text (serve-time fresh news), keyed as ``gather``."""
        out: dict[str, np.ndarray] = {"category": np.asarray(category, dtype=np.int64),
                                      "subcategory": np.asarray(subcategory, dtype=np.int64)}
        if self.title_tokens is not None:
            from newsrec.data.tokenize import encode_tokens, tokenize

            words = tokenize(pl.Series(list(titles), dtype=pl.String), lowercase=self.lowercase)
            out["title_tokens"] = encode_tokens(words, self.vocab or [], length=self.title_tokens.shape[1])
        if self.text_states is not None:
            states, lengths = self.backbone().states(list(titles), batch_size=self.plm["batch_size"])
            width = max(int(lengths.max()) if len(lengths) else 0, 1)
            out["text_states"] = states[:, :width]
            out["text_mask"] = np.arange(width)[None, :] < lengths[:, None]
        if self.entities is not None:
            lists = pl.Series([list(e) for e in (entity_ids or [[] for _ in titles])], dtype=pl.List(pl.String))
            out["entities"] = entity_matrix(lists, self.entity_table, max_entities=self.entities.shape[1])
        return out

    def backbone(self) -> Any:
        """The PLM that computed ``text_states`` (loaded on first use; checked to be the same one)."""
        if self._backbone is None:
            from newsrec.data.plm import TextBackbone

            backbone = TextBackbone(self.plm["name"], max_len=self.plm["max_len"],
                                    finetune_layers=self.plm["finetune_layers"])
            if backbone.fingerprint != self.plm["fingerprint"]:
                raise ArtifactError(f"{self.plm['name']}: differs from the model the cached states were "
                                    f"computed with; point model.plm_name at the original weights")
            self._backbone = backbone
        return self._backbone

    @property
    def plm_fingerprint(self) -> str | None:
        return self.plm.get("fingerprint")


def news_features(dataset: Any, config: Config | ModelConfig, *, plm_fingerprint: str | None = None,
                  backbone: Any = None, lowercase: bool | None = None, show_progress: bool = True) -> NewsFeatures:
    """Open (and for a PLM, compute once) the inputs the model settings call for over ``dataset``.

    ``config``: the whole config or its ``model`` section (then ``lowercase``, ingest's
    ``data.lowercase``, tokenises fresh titles; default true). ``plm_fingerprint``: the backbone a
    trained model was built with (its cache is used as is); ``backbone``: an already loaded
    ``TextBackbone`` to compute missing states with.
    """
    mc = config.model if isinstance(config, Config) else config
    if lowercase is None:
        lowercase = config.data.lowercase if isinstance(config, Config) else True
    category, subcategory = dataset.news_categories
    features = NewsFeatures(category=category, subcategory=subcategory, lowercase=lowercase)
    if mc.text_encoder == "words" or mc.title_match_dim:
        features.title_tokens = dataset.title_tokens
        features.vocab = dataset.vocab
    if mc.text_encoder == "plm":
        from newsrec.data.plm import cached_states

        titles = _titles_by_index(dataset)
        cached = cached_states(dataset.root, titles, name=mc.plm_name, max_len=mc.plm_max_len,
                               finetune_layers=mc.plm_finetune_layers, batch_size=mc.plm_batch_size,
                               fingerprint=plm_fingerprint, backbone=backbone, show_progress=show_progress)
        features.text_states, features.text_lengths = cached.states, cached.lengths
        features.plm = {"name": mc.plm_name, "max_len": mc.plm_max_len, "finetune_layers": mc.plm_finetune_layers,
                        "batch_size": mc.plm_batch_size, "fingerprint": cached.fingerprint, "dim": cached.dim}
        features._backbone = backbone
    if mc.use_entities:
        table = _entity_table_cached(dataset)
        features.entity_table = table
        features.entities = _entities_cached(dataset, mc.max_entities)
    return features


def category_base_rates(dataset: Any) -> tuple[np.ndarray, np.ndarray]:
    """float64 [n_categories], [n_subcategories]: each category's (subcategory's) share of the
    clicks in the train split's histories (one per impression showing the history); without any
    history click, of the train split's showings; uniform without either. History is not a label:
    these are known for every split at ingest."""
    category, subcategory = dataset.news_categories
    news = dataset.news
    idx = news["news_idx"].to_numpy().astype(np.int64)
    weight = np.zeros(dataset.n_news + 1, dtype=np.float64)
    weight[idx] = news["train_history_clicks"].fill_null(0).to_numpy()
    if weight.sum() <= 0:
        weight[idx] = news["train_impressions"].fill_null(0).to_numpy()
    n_cat = max(len(dataset.categories.get("category", [])), int(category.max()) + 1)
    n_sub = max(len(dataset.categories.get("subcategory", [])), int(subcategory.max()) + 1)
    return _base_rates(category, weight, n_cat), _base_rates(subcategory, weight, n_sub)


def _base_rates(keys: np.ndarray, weights: np.ndarray, n_keys: int) -> np.ndarray:
    total = float(weights.sum())
    if total <= 0:
        return np.full(n_keys, 1.0 / max(n_keys, 1))
    return np.bincount(keys, weights=weights, minlength=n_keys) / total


def _titles_by_index(dataset: Any) -> list[str]:
    """Titles in news_idx order (index 0 = news_idx 1)."""
    news = dataset.news.sort("news_idx")
    idx = news["news_idx"].to_numpy()
    if not np.array_equal(idx, np.arange(1, dataset.n_news + 1)):
        raise ArtifactError(f"{dataset.root / schema.NEWS}: news_idx is not 1..{dataset.n_news}")
    return news["title"].fill_null("").to_list()


def _entity_table_cached(dataset: Any) -> EntityTable:
    return _memo(dataset, "entity_table", lambda: entity_table(dataset))


def _entities_cached(dataset: Any, max_entities: int) -> np.ndarray:
    def build() -> np.ndarray:
        news = dataset.news
        out = np.zeros((dataset.n_news + 1, max_entities), dtype=np.int32)
        out[news["news_idx"].to_numpy()] = entity_matrix(news["title_entities"], _entity_table_cached(dataset),
                                                         max_entities=max_entities)
        return out
    return _memo(dataset, f"entities_{max_entities}", build)


def _memo(dataset: Any, key: str, build: Any) -> Any:
    """Per-dataset-object memo (a dataset artifact is read-only once opened)."""
    store = dataset.__dict__.setdefault("_feature_memo", {})
    if key not in store:
        store[key] = build()
    return store[key]


def title_tfidf(title_tokens: np.ndarray, vocab_size: int) -> tuple[Any, np.ndarray]:
    """(L2-normalised TF-IDF matrix, scipy CSR ``[n, vocab_size]`` of the titles ``[n, T]`` with a
    known word; idf float64 ``[vocab_size]``). Term counts × smoothed idf ``log((1 + n) / (1 + df)) + 1``
    (scikit-learn's); ``<pad>`` and ``<unk>`` weigh 0. Titles are not labels: every split's news count."""
    from scipy import sparse

    tokens = np.asarray(title_tokens, dtype=np.int64)
    tokens = tokens[(tokens > UNK).any(axis=1)]
    pairs = np.unique(np.arange(len(tokens), dtype=np.int64)[:, None] * vocab_size + tokens)
    df = np.bincount(pairs % vocab_size, minlength=vocab_size).astype(np.float64)
    idf = np.log((1.0 + len(tokens)) / (1.0 + df)) + 1.0
    idf[[0, UNK]] = 0.0
    rows = np.repeat(np.arange(len(tokens)), tokens.shape[1])
    matrix = sparse.csr_matrix((idf[tokens.ravel()], (rows, tokens.ravel())), shape=(len(tokens), vocab_size))
    matrix.sum_duplicates()
    norms = np.sqrt(np.asarray(matrix.multiply(matrix).sum(axis=1)).ravel())
    matrix = sparse.diags(1.0 / np.maximum(norms, 1e-12)) @ matrix
    return matrix.tocsr(), idf


def title_match_vectors(title_tokens: np.ndarray, vocab_size: int, dim: int, *, seed: int = 0) -> np.ndarray:
    """float32 ``[vocab_size, dim]``: each word's idf times its row of the top ``dim`` right singular
    vectors of the titles' TF-IDF matrix (``title_tfidf``; truncated SVD, seeded), so that a title's
    summed rows are its TF-IDF row's LSA projection. Fewer components than ``dim`` when the titles
    or the vocabulary cannot hold that many; the rest are zero columns."""
    from sklearn.decomposition import TruncatedSVD

    matrix, idf = title_tfidf(title_tokens, vocab_size)
    out = np.zeros((vocab_size, dim), dtype=np.float32)
    k = min(dim, matrix.shape[0] - 1, vocab_size - 1)
    if k < 1:
        return out
    components = TruncatedSVD(n_components=k, random_state=seed).fit(matrix).components_  # (k, vocab)
    out[:, :k] = (idf[:, None] * components.T).astype(np.float32)
    return out

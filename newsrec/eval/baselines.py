"""Hand-made baselines, scored from the dataset artifact alone: no text model, no GPU, seconds.

Every learned model is reported beside these; one that loses to them is a bug.

- ``popularity``: the candidate's click-through in the training log, shrunk toward the mean
  (``newsrec.data.popularity.shrunk_ctr``); news never shown in training get the mean.
- ``heuristic``: the category/subcategory share-lift of the user's history::

      log((share_cat + a) / (base_cat + a)) + log((share_sub + a) / (base_sub + a))

  where ``share_cat`` is the fraction of the history's clicks in the candidate's category and
  ``base_cat`` the fraction of all clicks in the training log's histories in that category (likewise
  subcategory), ``a = baseline.share_smoothing``. A user with an empty history scores 0 everywhere;
  ties keep the candidates' order (the metrics' stable tie-break).
- ``title-match``: the content-based score: the mean cosine between the candidate's title and the
  history's titles, each title its TF-IDF row projected on the top ``baseline.title_match_dim``
  latent dimensions of all the dataset's titles (LSA; ``newsrec.data.features.title_match_vectors``,
  the same projection the model's ``model.title_match_dim`` block reads). An empty history scores 0.
- ``logreg``: a logistic regression over :data:`LOGREG_FEATURES` (standardised), fitted on the
  training log's candidates with features computed exactly as for scoring and without label
  leakage: a train impression's click-through feature counts only train impressions strictly
  before its time; dev and test use the whole training log.

Everything is vectorised over the CSR arrays of ``DatasetArtifact.impressions``: one sort of
(impression, key) pairs per feature, then a ``searchsorted`` per candidate.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from newsrec.config import BaselineConfig
from newsrec.data.artifact import DatasetArtifact, Impressions, _take_csr
from newsrec.data.features import category_base_rates, title_match_vectors
from newsrec.data.popularity import PrefixCounts, news_counts_from_artifact, shrunk_ctr
from newsrec.errors import ConfigError, NewsrecError
from newsrec.eval import metrics as M

if TYPE_CHECKING:  # the stages import these lazily: evaluate.py brings torch with it
    from newsrec.eval.evaluate import EvaluationResult
    from newsrec.eval.submission import SubmitResult

BASELINES = ("heuristic", "logreg", "popularity", "title-match")
DISPLAY_NAMES = {  # rows of comparison tables
    "logreg": "Logistic regression (history features)",
    "heuristic": "Category share-lift",
    "popularity": "Popularity (train CTR)",
    "title-match": "Title match (TF-IDF/LSA cosine)",
}
LOGREG_FEATURES = ("category_share", "subcategory_share", "category_lift", "subcategory_lift",
                   "entity_overlap", "ctr_logit", "log_history_len")


def _check_name(name: str) -> None:
    if name not in BASELINES:
        raise ConfigError(f"unknown baseline '{name}' (valid: {', '.join(BASELINES)})")


# ---------------------------------------------------------------------------------------------
# per-news tables


@dataclass(frozen=True)
class NewsTables:
    """What the baselines know of each news, indexed by news_idx (row 0 = padding news).

    category, subcategory: int64 [n_news + 1]; base_category float64 [n_categories],
    base_subcategory float64 [n_subcategories]: share of the training log's history clicks in each;
    entity_values int64 / entity_offsets int64 [n_news + 2]: CSR of each news' distinct entities
    (title and abstract), as integer ids.
    """

    category: np.ndarray
    subcategory: np.ndarray
    base_category: np.ndarray
    base_subcategory: np.ndarray
    entity_values: np.ndarray
    entity_offsets: np.ndarray
    n_entities: int


def news_tables(dataset: DatasetArtifact) -> NewsTables:
    """Category, base rates and entities of every news of ``dataset``.

    Base rates: ``newsrec.data.features.category_base_rates``."""
    category, subcategory = dataset.news_categories
    base_category, base_subcategory = category_base_rates(dataset)
    news = dataset.news
    idx = news["news_idx"].to_numpy().astype(np.int64)

    entities = news.select(
        pl.col("news_idx"),
        pl.concat_list(pl.col("title_entities").fill_null([]), pl.col("abstract_entities").fill_null([]))
        .list.unique(maintain_order=True).alias("entities"))
    lengths = np.zeros(dataset.n_news + 1, dtype=np.int64)
    lengths[idx] = entities["entities"].list.len().to_numpy()
    flat = entities.sort("news_idx")["entities"].explode().drop_nulls().to_numpy().astype(str)
    uniques, codes = np.unique(flat, return_inverse=True)
    offsets = np.zeros(dataset.n_news + 2, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return NewsTables(category=category, subcategory=subcategory,
                      base_category=base_category, base_subcategory=base_subcategory,
                      entity_values=np.asarray(codes, dtype=np.int64), entity_offsets=offsets,
                      n_entities=len(uniques))


# ---------------------------------------------------------------------------------------------
# features


def _impression_of(offsets: np.ndarray) -> np.ndarray:
    """int64 [offsets[-1]]: which impression each flat entry belongs to."""
    return np.repeat(np.arange(len(offsets) - 1, dtype=np.int64), np.diff(offsets))


def _history_matches(impressions: Impressions, history_keys: np.ndarray, candidate_keys: np.ndarray,
                     n_keys: int) -> np.ndarray:
    """int64 [M]: for each candidate, how many entries of its impression's history carry the
    candidate's key (``history_keys`` aligned with ``impressions.history``, ``candidate_keys``
    with ``impressions.candidates``, both in 0..n_keys-1)."""
    history = np.sort(_impression_of(impressions.history_offsets) * n_keys + history_keys)
    wanted = _impression_of(impressions.candidate_offsets) * n_keys + candidate_keys
    return np.searchsorted(history, wanted, side="right") - np.searchsorted(history, wanted, side="left")


def _entity_overlap(impressions: Impressions, tables: NewsTables) -> np.ndarray:
    """float64 [M]: fraction of a candidate's entities found among its impression's history
    entities (0 for a candidate without entities)."""
    n_ent = max(tables.n_entities, 1)
    hist_ent, hist_off = _take_csr(tables.entity_values, tables.entity_offsets,
                                   impressions.history.astype(np.int64))
    hist_imp = _impression_of(impressions.history_offsets)[_impression_of(hist_off)]
    known = np.sort(hist_imp * n_ent + hist_ent)  # np.unique is 50x slower than a sort here
    known = known[np.concatenate([[True], known[1:] != known[:-1]])] if len(known) else known
    cand_ent, cand_off = _take_csr(tables.entity_values, tables.entity_offsets,
                                   impressions.candidates.astype(np.int64))
    cand_of_entity = _impression_of(cand_off)
    wanted = _impression_of(impressions.candidate_offsets)[cand_of_entity] * n_ent + cand_ent
    pos = np.minimum(np.searchsorted(known, wanted), max(len(known) - 1, 0))
    found = (known[pos] == wanted) if len(known) else np.zeros(len(wanted), dtype=bool)
    matched = np.bincount(cand_of_entity, weights=found.astype(np.float64),
                          minlength=len(impressions.candidates)).astype(np.float64)
    n_own = np.diff(cand_off).astype(np.float64)
    return np.divide(matched, n_own, out=np.zeros_like(matched), where=n_own > 0)


def share_features(impressions: Impressions, tables: NewsTables, *, smoothing: float) -> dict[str, np.ndarray]:
    """float64 [M] each: category/subcategory share of the history and its lift over the base
    rate, ``log((share + a) / (base + a))``; lifts are 0 where the history is empty."""
    lengths = impressions.history_lengths.astype(np.float64)
    length_of_candidate = np.repeat(lengths, impressions.candidate_counts)
    empty = length_of_candidate == 0
    out: dict[str, np.ndarray] = {}
    history = impressions.history.astype(np.int64)
    candidates = impressions.candidates.astype(np.int64)
    for name, key, base in (("category", tables.category, tables.base_category),
                            ("subcategory", tables.subcategory, tables.base_subcategory)):
        matches = _history_matches(impressions, key[history], key[candidates], len(base))
        share = matches / np.maximum(length_of_candidate, 1.0)
        lift = np.log((share + smoothing) / (base[key[candidates]] + smoothing))
        out[f"{name}_share"] = share
        out[f"{name}_lift"] = np.where(empty, 0.0, lift)
    return out


def candidate_ctr(dataset: DatasetArtifact, impressions: Impressions, *, prior: float) -> np.ndarray:
    """float64 [M]: shrunk click-through of each candidate from labelled train impressions strictly
    before the impression's time. For train impressions that is a prefix of the log
    (``PrefixCounts``: the impression's own label never counts); dev and test come after the whole
    training log, so they use all of it."""
    if impressions.split == "train":
        prefix = _train_prefix(dataset)
        clicks, shown = prefix.for_candidates(impressions)
        return shrunk_ctr(clicks, shown, prior=prior, mean_ctr=prefix.mean_ctr)
    return news_counts_from_artifact(dataset).ctr(impressions.candidates, prior=prior)


def _train_prefix(dataset: DatasetArtifact) -> PrefixCounts:
    train = dataset.impressions("train")
    if not train.has_labels:
        raise NewsrecError(f"{dataset.root}: the train split has no labels; the baselines need clicks")
    return PrefixCounts(train)


def logreg_features(dataset: DatasetArtifact, impressions: Impressions, config: BaselineConfig, *,
                    tables: NewsTables | None = None) -> np.ndarray:
    """float64 [M, len(LOGREG_FEATURES)] aligned with ``impressions.candidates``."""
    tables = tables or news_tables(dataset)
    columns = share_features(impressions, tables, smoothing=config.share_smoothing)
    columns["entity_overlap"] = _entity_overlap(impressions, tables)
    ctr = np.clip(candidate_ctr(dataset, impressions, prior=config.popularity_prior), 1e-6, 1 - 1e-6)
    columns["ctr_logit"] = np.log(ctr) - np.log1p(-ctr)
    columns["log_history_len"] = np.repeat(np.log1p(impressions.history_lengths.astype(np.float64)),
                                           impressions.candidate_counts)
    return np.stack([columns[name] for name in LOGREG_FEATURES], axis=1)


# ---------------------------------------------------------------------------------------------
# the logistic regression


@dataclass(frozen=True)
class LogregModel:
    """A fitted logistic regression on standardised features; plain numbers, saved as JSON.

    score(x) = ((x - mean) / scale) · coef + intercept (the log-odds of a click)."""

    features: tuple[str, ...]
    mean: np.ndarray  # float64 [F]
    scale: np.ndarray  # float64 [F]
    coef: np.ndarray  # float64 [F]
    intercept: float
    train_rows: int

    def decision(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.scale) @ self.coef + self.intercept

    def to_json(self) -> dict[str, Any]:
        return {"features": list(self.features), "mean": self.mean.tolist(), "scale": self.scale.tolist(),
                "coef": self.coef.tolist(), "intercept": self.intercept, "train_rows": self.train_rows}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "LogregModel":
        return cls(features=tuple(data["features"]), mean=np.asarray(data["mean"], dtype=np.float64),
                   scale=np.asarray(data["scale"], dtype=np.float64),
                   coef=np.asarray(data["coef"], dtype=np.float64), intercept=float(data["intercept"]),
                   train_rows=int(data["train_rows"]))


def fit_logreg(dataset: DatasetArtifact, config: BaselineConfig, *, tables: NewsTables | None = None
               ) -> LogregModel:
    """Fit on the training log's candidates, features as :func:`logreg_features` computes them for
    train impressions. Above ``baseline.logreg_max_rows`` candidates, a seeded sample of whole
    impressions holding about that many is used (its click-through features still count the whole
    log before each impression)."""
    from sklearn.linear_model import LogisticRegression

    train = dataset.impressions("train")
    if not train.has_labels:
        raise NewsrecError(f"{dataset.root}: the train split has no labels; logreg is fitted on them")
    if len(train.candidates) > config.logreg_max_rows:
        order = np.random.default_rng(config.seed).permutation(len(train))
        keep = int(np.searchsorted(np.cumsum(train.candidate_counts[order]), config.logreg_max_rows)) + 1
        train = train.select(np.sort(order[:keep]))
    y = train.labels.astype(np.int64)
    if len(y) == 0 or y.min() == y.max():
        raise NewsrecError(f"{dataset.root}: the train labels are all {int(y[0]) if len(y) else '-'}; "
                           f"logreg needs clicks and non-clicks")
    x = logreg_features(dataset, train, config, tables=tables)
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale == 0] = 1.0
    model = LogisticRegression(C=config.logreg_c, max_iter=1000, random_state=config.seed)
    model.fit((x - mean) / scale, y)
    return LogregModel(features=LOGREG_FEATURES, mean=mean, scale=scale, coef=model.coef_[0].astype(np.float64),
                       intercept=float(model.intercept_[0]), train_rows=len(y))


# ---------------------------------------------------------------------------------------------
# scores


def title_match_scores(dataset: DatasetArtifact, impressions: Impressions, *, dim: int,
                       chunk: int = 262_144) -> np.ndarray:
    """float64 [M]: per candidate, its title's LSA block (unit rows, ``title_match_vectors`` summed
    over the title's words) dotted with the mean block of its impression's whole history; 0 for an
    empty history or a title without a known word."""
    tokens = np.asarray(dataset.title_tokens)
    blocks = title_match_vectors(tokens, dataset.vocab_size, dim)[tokens].sum(axis=1)  # (n_news + 1, dim)
    norms = np.linalg.norm(blocks, axis=1, keepdims=True)
    blocks = np.divide(blocks, norms, out=np.zeros_like(blocks), where=norms > 1e-6)
    lengths = impressions.history_lengths
    profiles = np.zeros((len(impressions), dim), dtype=np.float64)
    has = np.flatnonzero(lengths > 0)
    if len(has):
        sums = np.add.reduceat(blocks[impressions.history].astype(np.float64), impressions.history_offsets[has], axis=0)
        profiles[has] = sums / lengths[has, None]
    of = _impression_of(impressions.candidate_offsets)
    out = np.empty(len(impressions.candidates), dtype=np.float64)
    for s in range(0, len(out), chunk):
        out[s:s + chunk] = np.einsum("md,md->m", blocks[impressions.candidates[s:s + chunk]], profiles[of[s:s + chunk]])
    return out


@dataclass
class BaselineScores:
    scores: np.ndarray  # float32 [M] aligned with the split's candidates
    details: dict[str, Any]  # what the baseline is (fitted coefficients for logreg)
    fit_seconds: float
    score_seconds: float


def baseline_scores(name: str, dataset: DatasetArtifact, impressions: Impressions,
                    config: BaselineConfig | None = None) -> BaselineScores:
    """Scores of baseline ``name`` for every candidate of ``impressions`` (any split of ``dataset``,
    labelled or not)."""
    _check_name(name)
    config = config or BaselineConfig()
    details: dict[str, Any] = {"name": name, "config": _config_dict(config, name)}
    start = time.perf_counter()
    fit_seconds = 0.0
    if name == "popularity":
        scores = candidate_ctr(dataset, impressions, prior=config.popularity_prior)
    elif name == "heuristic":
        shares = share_features(impressions, news_tables(dataset), smoothing=config.share_smoothing)
        scores = shares["category_lift"] + shares["subcategory_lift"]
    elif name == "title-match":
        scores = title_match_scores(dataset, impressions, dim=config.title_match_dim)
    else:
        tables = news_tables(dataset)
        model = fit_logreg(dataset, config, tables=tables)
        fit_seconds = time.perf_counter() - start
        details["model"] = model.to_json()
        scores = model.decision(logreg_features(dataset, impressions, config, tables=tables))
    return BaselineScores(scores=scores.astype(np.float32), details=details, fit_seconds=fit_seconds,
                          score_seconds=time.perf_counter() - start - fit_seconds)


def _config_dict(config: BaselineConfig, name: str) -> dict[str, Any]:
    """The settings a baseline honours (and only those)."""
    used = {"popularity": ("popularity_prior",), "heuristic": ("share_smoothing",),
            "title-match": ("title_match_dim",),
            "logreg": ("share_smoothing", "popularity_prior", "logreg_c", "logreg_max_rows", "seed")}[name]
    return {k: getattr(config, k) for k in used}


# ---------------------------------------------------------------------------------------------
# the stages: `newsrec evaluate --baseline`, `newsrec submit --baseline`


def evaluate_baseline(name: str, data_dir: str | Path, *, split: str = "dev", out: str | Path | None = None,
                      config: BaselineConfig | None = None) -> EvaluationResult:
    """``newsrec evaluate --baseline NAME``: the same metrics, breakdowns and metrics.json as a
    model's evaluation (the split must be labelled)."""
    from newsrec.eval.evaluate import EvaluationResult, breakdowns, json_safe, labelled_split, seen_news_mask
    from newsrec.utils.io import write_json

    _check_name(name)
    dataset = DatasetArtifact(data_dir)
    impressions = labelled_split(dataset, split)
    scored = baseline_scores(name, dataset, impressions, config)
    start = time.perf_counter()
    metrics: dict[str, Any] = M.compute_metrics(impressions.labels, scored.scores, impressions.candidate_offsets)
    metrics["breakdown"] = breakdowns(impressions, scored.scores, seen=seen_news_mask(dataset))
    metrics.update({
        "split": split, "model": None, "reranker": None, "baseline": scored.details,
        "data": str(dataset.root), "candidates": int(len(scored.scores)),
        "timing": {"fit_seconds": scored.fit_seconds, "score_seconds": scored.score_seconds,
                   "metrics_seconds": time.perf_counter() - start},
    })
    out_path = Path(out) if out is not None else None
    if out_path is not None:
        write_json(out_path, json_safe(metrics))
    return EvaluationResult(metrics=metrics, scores=scored.scores, out=out_path)


def submit_baseline(name: str, data_dir: str | Path, *, out: str | Path, split: str = "test",
                    config: BaselineConfig | None = None) -> SubmitResult:
    """``newsrec submit --baseline NAME``: rank every impression line of ``split``'s behaviors file
    by the baseline and write the leaderboard file (validated, atomic)."""
    from newsrec.eval.submission import submit_listing

    dataset = DatasetArtifact(data_dir)
    return submit_listing(dataset, split, out=out,
                          score=lambda impressions: baseline_scores(name, dataset, impressions, config).scores)
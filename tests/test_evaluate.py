"""Fast evaluation path: equals the full model per impression; the evaluate stage end to end."""
from __future__ import annotations

import datetime
import json

import numpy as np
import polars as pl
import pytest
import torch
from torch import nn

from newsrec.config import Config, config_from_dict
from newsrec.data import schema
from newsrec.data.artifact import DatasetArtifact
from newsrec.inference.histories import Histories
from newsrec.inference.scoring import encode_all_news, score_impressions, score_impressions_slow
from newsrec.eval.metrics import compute_metrics
from newsrec.models.inputs import NewsInputs
from newsrec.utils.io import write_json

TITLE_LEN = 6
VOCAB = 40


def make_artifact(root, *, n_news=60, n_impressions={"train": 40, "dev": 30, "test": 20}, seed=0,
                  max_history=70):
    """A small dataset artifact written by hand following ``newsrec.data.schema``.

    Users repeat (so histories dedupe), some histories are empty, some longer than 50 clicks; test
    is unlabelled; news 51..60 never appear in train (cold-start candidates).
    """
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    tokens = np.zeros((n_news + 1, TITLE_LEN), dtype=np.int32)
    for i in range(1, n_news + 1):
        length = rng.integers(1, TITLE_LEN + 1)
        tokens[i, :length] = rng.integers(2, VOCAB, size=length)
    np.save(root / schema.TITLE_TOKENS, tokens)
    write_json(root / schema.VOCAB, {"words": ["<pad>", "<unk>"] + [f"w{i}" for i in range(2, VOCAB)]})
    write_json(root / schema.CATEGORIES, {"category": ["<unk>", "news", "sports"],
                                          "subcategory": ["<unk>", "a", "b", "c"]})
    warm = n_news - 10
    users = [f"U{u}" for u in range(12)]
    user_history = {u: rng.integers(1, warm + 1, size=rng.choice([0, 3, 12, max_history])).astype(np.int32)
                    for u in users}
    rows = {}
    impression_id = 1
    train_imps = np.zeros(n_news + 1, np.int32)
    for split, n in n_impressions.items():
        recs = []
        for _ in range(n):
            user = users[rng.integers(len(users))]
            pool = np.arange(1, (warm if split == "train" else n_news) + 1)
            candidates = rng.choice(pool, size=rng.integers(2, 12), replace=False).astype(np.int32)
            labels = (rng.random(len(candidates)) < 0.3).astype(np.int8)
            labels[rng.integers(len(labels))] = 1
            if split == "train":
                train_imps[candidates] += 1
            recs.append({"impression_id": impression_id, "user_id": user,
                         "time": datetime.datetime(2019, 11, 15, 8) + datetime.timedelta(minutes=impression_id),
                         "history": user_history[user].tolist(), "candidates": candidates.tolist(),
                         "labels": None if split == "test" else labels.tolist()})
            impression_id += 1
        rows[split] = recs
        frame = pl.DataFrame(recs, schema=schema.BEHAVIORS_SCHEMA)
        frame.write_parquet(root / schema.behaviors_file(split))
        # the raw behaviors.tsv these rows stand for, and ingest's listing of its lines
        raw = root / "raw" / split
        raw.mkdir(parents=True, exist_ok=True)
        (raw / "behaviors.tsv").write_text("".join(
            f"{r['impression_id']}\t{r['user_id']}\t11/15/2019 8:00:00 AM\t"
            f"{' '.join(f'N{h}' for h in r['history'])}\t"
            + " ".join(f"N{c}" if r["labels"] is None else f"N{c}-{lab}"
                       for c, lab in zip(r["candidates"], r["labels"] or r["candidates"])) + "\n"
            for r in recs))
        pl.DataFrame({"line_no": np.arange(1, n + 1), "impression_id": [str(r["impression_id"]) for r in recs],
                      "row": np.arange(n), "candidates": [r["candidates"] for r in recs]},
                     schema=schema.LISTING_SCHEMA).write_parquet(root / schema.listing_file(split))
    idx = np.arange(1, n_news + 1)
    news = pl.DataFrame({
        "news_idx": idx.astype(np.int32), "news_id": [f"N{i}" for i in idx],
        "category": ["news"] * n_news, "subcategory": ["a"] * n_news,
        "category_idx": (1 + idx % 2).astype(np.int32), "subcategory_idx": (1 + idx % 3).astype(np.int32),
        "title": [f"title {i}" for i in idx], "abstract": [""] * n_news, "url": [""] * n_news,
        "title_entities": [[] for _ in idx], "title_entity_confidence": [[] for _ in idx],
        "abstract_entities": [[] for _ in idx], "abstract_entity_confidence": [[] for _ in idx],
        "splits": [["train"] for _ in idx], "train_impressions": train_imps[1:],
        "train_clicks": np.zeros(n_news, np.int32),
        "train_history_clicks": np.zeros(n_news, np.int32),
        "first_seen": [None] * n_news,
    }, schema=schema.NEWS_SCHEMA)
    news.write_parquet(root / schema.NEWS)
    sources = {split: {"path": str(root / "raw" / split),
                       "files": {"behaviors.tsv": {"path": str(root / "raw" / split / "behaviors.tsv")}}}
               for split in n_impressions}
    write_json(root / schema.MANIFEST, {"schema_version": schema.SCHEMA_VERSION, "name": "handmade",
                                        "sources": sources})
    return DatasetArtifact(root)


class BagOfWordsRecommender(nn.Module):
    """A test double with the model's interface: mean word embedding + category → news vector;
    attention-free masked mean of the history → user vector (learned vector when empty)."""

    def __init__(self, dim=8, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.news_dim = dim
        self.words = nn.Embedding(VOCAB, dim, padding_idx=0)
        self.category = nn.Embedding(3, dim)
        self.proj = nn.Linear(dim, dim)
        self.empty = nn.Parameter(torch.randn(dim))
        self.dropout = nn.Dropout(0.5)  # must be off during evaluation

    def encode_news(self, news):
        title_tokens, category = news.title_tokens, news.category
        mask = (title_tokens != 0).float().unsqueeze(-1)
        vec = (self.words(title_tokens) * mask).sum(1) / mask.sum(1).clamp(min=1)
        if category is not None:
            vec = vec + self.category(category)
        return self.dropout(vec)

    def encode_user(self, history_vectors, history_mask):
        mask = history_mask.float().unsqueeze(-1)
        user = torch.tanh(self.proj((history_vectors * mask).sum(1) / mask.sum(1).clamp(min=1)))
        return torch.where(history_mask.any(1, keepdim=True), user, self.empty)

    def score(self, user_vectors, candidate_vectors):
        return torch.bmm(candidate_vectors, user_vectors.unsqueeze(-1)).squeeze(-1)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return make_artifact(tmp_path_factory.mktemp("data") / "tiny")


def tiny_config(**model):
    return config_from_dict({"model": {"embedding_dim": 16, "hidden_size": 16, "num_heads": 2,
                                       "pooling_hidden": 8, **model},
                             "data": {"history_len": 50, "title_len": TITLE_LEN},
                             "tracking": {"enabled": False}})


def _real_model(artifact, **model_options):
    from newsrec.inference.model_io import build_model
    torch.manual_seed(0)
    return build_model(tiny_config(**model_options), artifact)


def test_encode_all_news_row0_zero_and_matches_direct_encoding(artifact):
    model = BagOfWordsRecommender()
    model.train()  # the fast path must switch dropout off itself ...
    vectors = encode_all_news(model, artifact, batch_size=7, show_progress=False)
    assert model.training  # ... and restore the mode after
    assert vectors.shape == (artifact.n_news + 1, 8)
    assert torch.all(vectors[0] == 0)
    model.eval()
    tokens = torch.from_numpy(artifact.title_tokens[[5, 17]].astype(np.int64))
    cat = torch.from_numpy(artifact.news_categories[0][[5, 17]])
    with torch.no_grad():
        news = NewsInputs(category=cat, subcategory=torch.zeros_like(cat), title_tokens=tokens)
        torch.testing.assert_close(vectors[[5, 17]], model.encode_news(news))


def test_distinct_histories_dedupe_and_keep_most_recent(artifact):
    imps = artifact.impressions("dev")
    hist, of_impression = Histories.of_impressions(imps).distinct(5)
    assert len(hist) == len({imps.history_of(i, 5).tobytes() for i in range(len(imps))})
    for i in range(len(imps)):
        j = of_impression[i]
        np.testing.assert_array_equal(hist.values[hist.offsets[j]:hist.offsets[j + 1]], imps.history_of(i, 5))
    long_rows = [i for i in range(len(imps)) if imps.history_lengths[i] > 5]
    assert long_rows, "fixture must hold histories longer than history_len"
    i = long_rows[0]
    np.testing.assert_array_equal(imps.history_of(i, 5), imps.history[imps.history_offsets[i + 1] - 5:
                                                                      imps.history_offsets[i + 1]])


@pytest.mark.parametrize("model_kind", ["double", "fastformer", "mhsa"])
def test_fast_path_equals_full_model_per_impression(artifact, model_kind):
    model = BagOfWordsRecommender() if model_kind == "double" else _real_model(
        artifact, encoder=model_kind, position_embeddings=True)
    imps = artifact.impressions("dev")
    fast = score_impressions(model, artifact, imps, history_len=50, batch_size=4, show_progress=False)
    assert fast.dtype == np.float32 and fast.shape == imps.candidates.shape
    slow = score_impressions_slow(model, artifact, imps, np.arange(len(imps)), history_len=50)
    np.testing.assert_allclose(fast, slow, rtol=1e-5, atol=1e-5)
    assert np.std(fast) > 0  # not a constant


def test_precomputed_news_vectors_are_reused(artifact):
    model = BagOfWordsRecommender()
    imps = artifact.impressions("dev")
    vectors = encode_all_news(model, artifact, show_progress=False)
    a = score_impressions(model, artifact, imps, history_len=50, news_vectors=vectors, show_progress=False)
    b = score_impressions(model, artifact, imps, history_len=50, show_progress=False)
    np.testing.assert_array_equal(a, b)
    # a manual dot product as the independent check
    user_row = 3
    hist = imps.history_of(user_row, 50)
    cands = imps.candidates_of(user_row)
    with torch.no_grad():
        model.eval()
        user = model.encode_user(vectors[torch.from_numpy(hist.astype(np.int64))][None],
                                 torch.ones(1, len(hist), dtype=torch.bool)) if len(hist) else model.empty[None]
        want = (vectors[torch.from_numpy(cands.astype(np.int64))] @ user[0]).numpy()
    s = imps.candidate_offsets[user_row]
    np.testing.assert_allclose(a[s:s + len(cands)], want, rtol=1e-5, atol=1e-6)


def test_metrics_of_fast_scores(artifact):
    model = BagOfWordsRecommender()
    imps = artifact.impressions("dev")
    scores = score_impressions(model, artifact, imps, history_len=50, show_progress=False)
    m = compute_metrics(imps.labels, scores, imps.candidate_offsets)
    assert m["impressions"] == len(imps)
    assert 0.0 <= m["auc"] <= 1.0


# ---- the stages through the CLI, on the hand-made artifact and a tiny saved model
@pytest.fixture(scope="module")
def model_dir(artifact, tmp_path_factory):
    from newsrec.inference.model_io import save_model
    out = tmp_path_factory.mktemp("models") / "m"
    save_model(out, _real_model(artifact), tiny_config(), dataset=artifact)
    return out


def test_evaluate_cli_writes_metrics_json_and_table(artifact, model_dir, tmp_path):
    from click.testing import CliRunner

    from newsrec.cli import main
    from newsrec.inference.model_io import load_model

    out = tmp_path / "metrics.json"
    result = CliRunner().invoke(main, ["evaluate", "--model", str(model_dir), "--data", str(artifact.root),
                                       "--out", str(out), "--check-slow", "5", "--no-mlflow"])
    assert result.exit_code == 0, result.output
    assert "history 50-199" in result.output and "unseen news" in result.output
    assert "fast path == full model on 5 impressions" in result.output
    text = out.read_text()
    assert "NaN" not in text  # strict JSON: undefined metrics are null
    metrics = json.loads(text)
    for key in ("auc", "mrr", "ndcg@5", "ndcg@10"):
        assert isinstance(metrics[key], float)
    assert metrics["impressions"] == 30 and isinstance(metrics["impressions"], int)
    # independent recomputation from the slow path on every impression
    loaded = load_model(model_dir)
    imps = artifact.impressions("dev")
    slow = score_impressions_slow(loaded.model, artifact, imps, np.arange(len(imps)), history_len=50)
    want = compute_metrics(imps.labels, slow, imps.candidate_offsets)
    assert metrics["auc"] == pytest.approx(want["auc"], abs=1e-6)
    assert metrics["ndcg@10"] == pytest.approx(want["ndcg@10"], abs=1e-6)
    # breakdowns partition the impressions; unseen = news 51..60 (never in train)
    assert sum(b["impressions"] for b in metrics["breakdown"]["history"].values()) == 30
    cands = metrics["breakdown"]["candidates"]
    assert cands["unseen"]["candidates"] == int((imps.candidates > 50).sum())
    assert cands["seen"]["candidates"] + cands["unseen"]["candidates"] == len(imps.candidates)


def test_evaluate_refuses_unlabelled_split(artifact, model_dir):
    from click.testing import CliRunner

    from newsrec.cli import main
    result = CliRunner().invoke(main, ["evaluate", "--model", str(model_dir), "--data", str(artifact.root),
                                       "--split", "test", "--no-mlflow"])
    assert result.exit_code == 1
    assert "split 'test' has no labels" in result.output


@pytest.mark.parametrize("split", ["test", "dev"])
def test_submit_cli_writes_a_valid_zip_and_checks_it(artifact, model_dir, tmp_path, split):
    from click.testing import CliRunner

    from newsrec.cli import main
    out = tmp_path / "prediction.zip"
    runner = CliRunner()
    result = runner.invoke(main, ["submit", "--model", str(model_dir), "--data", str(artifact.root),
                                  "--split", split, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert ("local metrics" in result.output) == (split == "dev")
    check = runner.invoke(main, ["submit", "--check", str(out), "--data", str(artifact.root), "--split", split])
    assert check.exit_code == 0, check.output
    assert "valid (" in check.output
    # a file for the other split fails with a line number
    other = "dev" if split == "test" else "test"
    bad = runner.invoke(main, ["submit", "--check", str(out), "--data", str(artifact.root), "--split", other])
    assert bad.exit_code == 1 and "prediction.txt:1:" in bad.output

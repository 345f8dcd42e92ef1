"""A tiny dataset artifact whose answer is known, written straight to the artifact contract.

Each user likes one category; every title carries its category's words (plus shared noise words);
a user's clicks — in the history and in impressions — are news of their category. A model that
reads titles and histories ranks the liked category first (dev AUC near 1).
"""
from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import polars as pl

from newsrec.data import schema


def write_known_answer_artifact(root: Path, *, n_categories: int = 4, news_per_category: int = 30,
                                users_per_category: int = 12, impressions_per_user: int = 4,
                                title_len: int = 8, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    words_per_category = 6
    noise_words = 10
    vocab = [schema.PAD_WORD, schema.UNK_WORD]
    vocab += [f"cat{c}w{w}" for c in range(n_categories) for w in range(words_per_category)]
    vocab += [f"noise{w}" for w in range(noise_words)]
    noise_base = 2 + n_categories * words_per_category

    n_news = n_categories * news_per_category
    news_cat = np.repeat(np.arange(n_categories), news_per_category)  # news_idx - 1 → category
    tokens = np.zeros((n_news + 1, title_len), dtype=np.int32)
    for i in range(n_news):
        length = int(rng.integers(4, title_len + 1))
        n_topic = max(2, length // 2)
        topic = 2 + news_cat[i] * words_per_category + rng.integers(0, words_per_category, size=n_topic)
        noise = noise_base + rng.integers(0, noise_words, size=length - n_topic)
        words = np.concatenate([topic, noise])
        rng.shuffle(words)
        tokens[i + 1, :length] = words
    np.save(root / schema.TITLE_TOKENS, tokens)

    categories = {"category": ["<unk>"] + [f"c{c}" for c in range(n_categories)],
                  "subcategory": ["<unk>"] + [f"s{c}" for c in range(n_categories)]}
    (root / schema.VOCAB).write_text(json.dumps({"words": vocab}))
    (root / schema.CATEGORIES).write_text(json.dumps(categories))
    news_ids = [f"N{i}" for i in range(1, n_news + 1)]
    first = dt.datetime(2019, 11, 9)
    news = pl.DataFrame({
        "news_idx": np.arange(1, n_news + 1, dtype=np.int32),
        "news_id": news_ids,
        "category": [f"c{c}" for c in news_cat],
        "subcategory": [f"s{c}" for c in news_cat],
        "category_idx": (news_cat + 1).astype(np.int32),
        "subcategory_idx": (news_cat + 1).astype(np.int32),
        "title": [" ".join(vocab[t] for t in row if t) for row in tokens[1:]],
        "abstract": [""] * n_news,
        "url": [""] * n_news,
        "title_entities": [[] for _ in range(n_news)],
        "title_entity_confidence": [[] for _ in range(n_news)],
        "abstract_entities": [[] for _ in range(n_news)],
        "abstract_entity_confidence": [[] for _ in range(n_news)],
        "splits": [["train", "dev"] for _ in range(n_news)],
        "train_impressions": np.zeros(n_news, dtype=np.int32),
        "train_clicks": np.zeros(n_news, dtype=np.int32),
        "train_history_clicks": np.zeros(n_news, dtype=np.int32),
        "first_seen": [first] * n_news,
    }, schema=schema.NEWS_SCHEMA)
    news.write_parquet(root / schema.NEWS)

    def of_category(c: int, k: int) -> list[int]:
        return (c * news_per_category + 1 + rng.choice(news_per_category, size=k, replace=False)).tolist()

    def behaviors(split: str, id_start: int) -> pl.DataFrame:
        rows = []
        for c in range(n_categories):
            for u in range(users_per_category):
                history = of_category(c, int(rng.integers(0, 7)))
                for _ in range(impressions_per_user):
                    clicks = of_category(c, int(rng.integers(1, 3)))
                    others = [o for o in range(n_categories) if o != c]
                    negatives = []
                    for _ in range(int(rng.integers(2, 8))):
                        negatives += of_category(int(rng.choice(others)), 1)
                    candidates = clicks + negatives
                    labels = [1] * len(clicks) + [0] * len(negatives)
                    perm = rng.permutation(len(candidates))
                    rows.append((f"U{c}_{u}", history, [candidates[p] for p in perm], [labels[p] for p in perm]))
        return pl.DataFrame({
            "impression_id": np.arange(id_start, id_start + len(rows), dtype=np.int64),
            "user_id": [r[0] for r in rows],
            "time": [first + dt.timedelta(minutes=i) for i in range(len(rows))],
            "history": [r[1] for r in rows],
            "candidates": [r[2] for r in rows],
            "labels": [r[3] for r in rows],
        }, schema=schema.BEHAVIORS_SCHEMA)

    train = behaviors("train", 1)
    train.write_parquet(root / schema.behaviors_file("train"))
    behaviors("dev", 100_000).write_parquet(root / schema.behaviors_file("dev"))
    manifest = {"schema_version": schema.SCHEMA_VERSION, "name": "known-answer", "n_news": n_news,
                "vocab_size": len(vocab), "title_len": title_len,
                "rows": {"train": len(train)}}
    (root / schema.MANIFEST).write_text(json.dumps(manifest))
    return root

"""Synthetic MIND-format data from a generative model with known click probabilities.

``generate(out_dir, size=..., seed=...)`` writes ``MINDsynth_{train,dev,test}.zip`` (each holding
``news.tsv``, ``behaviors.tsv``, ``entity_embedding.vec`` and ``relation_embedding.vec`` in MIND's
exact format; test without labels) and ``ground_truth/`` (true click probabilities, labels of every
split, user interests, news latents, the oracle's metrics).

The world
---------
* A taxonomy: categories → subcategories → fine topics. Every level owns a word list; titles and
  abstracts mix topic, subcategory and category words with shared words, so the text carries the
  topic (as in MIND, where the title is the main signal). Entities belong to topics too.
* News: ``n_old_news`` published before the first impression day (the pool user histories come
  from) and ``news_per_day`` published on each of days 1..7. Popularity is Zipf-like within each
  publishing day; it drives both exposure (how often a news is shown) and click-through.
* Users: sparse interests — 1..3 categories, 1..3 subcategories within each, 1..2 topics within each
  subcategory, each with a positive weight. A user's history (fixed for every impression, as in MIND)
  is drawn from that interest model over the old pool, sorted oldest first; its length is
  long-tailed (``sample_history_lengths``).
* Impressions: train on days 1..5, dev on day 6, test on day 7. Candidates are drawn by exposure from
  news published during the previous two days and the same day before the impression time, so dev
  and test hold news never seen in train (cold start). Sizes are long-tailed, mean ~37, 2..300.

The click model (per candidate)::

    z     = bias + affinity(user, news) + popularity_scale * q(news) + freshness_scale * exp(-age_h / 24)
    click = z + eta + logistic > 0,   eta ~ N(0, noise_std)  (hidden from the oracle)

with ``affinity`` the sum of the user's weights for the news' category, subcategory and topic. The
bias is calibrated so that ~4% of candidates are clicked; an impression where no draw clicks gets
its highest draw clicked. The oracle scores a candidate by its true click probability
``sigmoid(z / sqrt(1 + pi * noise_std^2 / 8))`` (the logistic–normal integral), which is what
``ground_truth/`` holds and what ``oracle_metrics.json`` is computed from.

Worlds and real text
--------------------
``world=`` picks knobs of ``newsrec.data.worlds`` (exposure mode, cold test period, interest mix
including entity and latent text-topic interests, drift between the history and impression
periods); the default world is the model above, byte for byte. ``news_path=`` takes the news from a
real MIND news.tsv (``RealNewsWorld``) and scales the sizes to it.

History-only limit
------------------
Beside the oracle, ``ground_truth/`` reports what a score that sees only the user's history reaches
(``_history_only``): the posterior over the user's interests given the history, by importance
sampling over draws of the interest prior, scored alone and with the news' true popularity and
freshness terms (``HISTORY_ONLY_METHOD`` says exactly what is approximated).
"""
from __future__ import annotations

import functools
import io
import json
import math
import zipfile
from dataclasses import asdict, dataclass, field, replace
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from newsrec.data.worlds import RealNews, World, read_real_news, resolve_world, text_topics
from newsrec.errors import NewsrecError
from newsrec.utils.io import atomic_dir, atomic_path, write_json
from newsrec.utils.progress import progress

SPLIT_DAYS = {"train": (1, 2, 3, 4, 5), "dev": (6,), "test": (7,)}
FIRST_DAY = date(2019, 11, 9)  # day 1; day 0 is the day before
SECONDS_PER_DAY = 86_400
ZIP_TIMESTAMP = (2019, 11, 20, 0, 0, 0)  # fixed so that the same seed gives byte-identical zips
ENTITY_DIM = 100
_USER_BLOCK = 50_000  # users whose histories are drawn together
ZIP_LEVEL = 1  # deflate level: text this size compresses ~4x faster than at 6 for ~15% more bytes

CATEGORY_NAMES = (
    "news", "sports", "finance", "lifestyle", "health", "foodanddrink", "travel", "weather",
    "autos", "entertainment", "music", "movies", "tv", "video", "kids", "northamerica",
)
SHARED_WORDS = (
    "the", "a", "of", "to", "in", "for", "on", "with", "at", "by", "from", "and", "is", "are",
    "after", "over", "new", "how", "why", "what", "this", "that", "his", "her", "their", "says",
    "will", "about", "more", "than", "first", "just", "here", "could", "may", "best", "now",
    "people", "year", "time", "day", "week", "two", "one", "back", "after", "out", "up", "get",
)
ENTITY_TYPES = ("P", "O", "G", "C", "U", "J", "F")
_SYLLABLES = tuple(c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou"))
# hour-of-day weights of impressions (more in the morning and evening, few at night)
_HOUR_WEIGHTS = np.array([1, 0.6, 0.4, 0.3, 0.4, 0.8, 1.6, 2.6, 3.2, 3.2, 3.0, 2.9,
                          2.9, 2.8, 2.8, 2.8, 2.9, 3.0, 3.2, 3.3, 3.2, 2.8, 2.2, 1.5])


@dataclass(frozen=True)
class SynthSize:
    """How big the generated world is."""

    name: str
    n_users: int
    n_old_news: int  # published before day 1: the pool user histories are drawn from
    news_per_day: int  # published on each of days 1..7
    train_impressions: int
    dev_impressions: int
    test_impressions: int
    n_categories: int = 16
    subcategories_per_category: tuple[int, int] = (3, 10)  # inclusive range
    topics_per_subcategory: int = 4
    max_history: int = 3000
    max_candidates: int = 300  # per impression
    chunk_impressions: int = 50_000  # impressions generated and written per step (bounds memory)

    def impressions(self, split: str) -> int:
        return {"train": self.train_impressions, "dev": self.dev_impressions,
                "test": self.test_impressions}[split]


SIZES: dict[str, SynthSize] = {
    "tiny": SynthSize("tiny", n_users=300, n_old_news=200, news_per_day=60, train_impressions=2000,
                      dev_impressions=600, test_impressions=600, n_categories=8,
                      subcategories_per_category=(2, 4), topics_per_subcategory=3, max_candidates=100),
    "demo": SynthSize("demo", n_users=8_000, n_old_news=5_000, news_per_day=700, train_impressions=12_000,
                      dev_impressions=4_000, test_impressions=4_000),
    "small": SynthSize("small", n_users=50_000, n_old_news=25_000, news_per_day=3_500,
                       train_impressions=150_000, dev_impressions=73_000, test_impressions=73_000),
    "medium": SynthSize("medium", n_users=200_000, n_old_news=40_000, news_per_day=6_000,
                        train_impressions=600_000, dev_impressions=120_000, test_impressions=120_000),
    "large": SynthSize("large", n_users=700_000, n_old_news=55_000, news_per_day=6_500,
                       train_impressions=2_200_000, dev_impressions=365_000, test_impressions=365_000),
}


@dataclass(frozen=True)
class ClickModel:
    """Coefficients of the click logit (see the module docstring)."""

    # Personal interest dominates, as in MIND (where personalised models beat popularity by far):
    # at demo size the affinity term alone ranks dev at AUC 0.70, popularity + freshness alone 0.57,
    # everything 0.75.
    category_scale: float = 1.6  # mean weight of an interest category
    subcategory_scale: float = 1.9
    topic_scale: float = 2.4
    popularity_scale: float = 0.25  # per standard deviation of log popularity
    freshness_scale: float = 0.5
    noise_std: float = 1.0  # per (user, news) logit noise the oracle cannot see
    click_rate: float = 0.04  # target share of clicked candidates, forced clicks included
    zipf_exponent: float = 0.9
    exposure_decay: tuple[float, float, float] = (1.0, 1.0, 0.6)  # weight by age in days 0, 1, 2
    impression_size_median: float = 26.0
    impression_size_sigma: float = 0.85
    history_median: float = 20.0
    history_sigma: float = 1.45
    empty_history_share: float = 0.02


# ---------------------------------------------------------------------------------------------
# samplers


def sample_history_lengths(rng: np.random.Generator, n: int, *, model: ClickModel = ClickModel(),
                           max_len: int = 3000) -> np.ndarray:
    """History lengths int64 [n]: log-normal (median ~20, p99 ≥ 500), a few empty, capped at max_len."""
    lengths = np.floor(rng.lognormal(math.log(model.history_median), model.history_sigma, n))
    lengths = np.clip(lengths, 1, max_len).astype(np.int64)
    lengths[rng.random(n) < model.empty_history_share] = 0
    return lengths


def sample_impression_sizes(rng: np.random.Generator, n: int, *, model: ClickModel = ClickModel(),
                            max_size: int = 300) -> np.ndarray:
    """Candidates per impression int64 [n]: log-normal, mean ~37, clipped to 2..max_size."""
    sizes = np.rint(rng.lognormal(math.log(model.impression_size_median), model.impression_size_sigma, n))
    return np.clip(sizes, 2, max_size).astype(np.int64)


class _WeightedGroups:
    """Draw, for each requested group, one of its items with probability ∝ the item's weight."""

    def __init__(self, group_of_item: np.ndarray, item_weights: np.ndarray, n_groups: int) -> None:
        order = np.argsort(group_of_item, kind="stable")
        self.items = order
        self.cum = np.concatenate([[0.0], np.cumsum(item_weights[order], dtype=np.float64)])
        counts = np.bincount(group_of_item, minlength=n_groups)
        self.offsets = np.concatenate([[0], np.cumsum(counts)])

    def nonempty(self, groups: np.ndarray) -> np.ndarray:
        return self.offsets[groups + 1] > self.offsets[groups]

    def draw(self, groups: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
        """Item index [len(groups)]; every group must be non-empty."""
        start, end = self.offsets[groups], self.offsets[groups + 1]
        lo, hi = self.cum[start], self.cum[end]
        pos = np.searchsorted(self.cum, lo + uniforms * (hi - lo), side="right") - 1
        return self.items[np.clip(pos, start, end - 1)]


def _dedupe_first(owner: np.ndarray, item: np.ndarray, n_items: int) -> np.ndarray:
    """Mask keeping the first occurrence of each (owner, item) pair, in the given order."""
    key = owner.astype(np.int64) * n_items + item
    order = np.argsort(key, kind="stable")
    sorted_key = key[order]
    first = np.ones(len(key), dtype=bool)
    first[1:] = sorted_key[1:] != sorted_key[:-1]
    keep = np.empty(len(key), dtype=bool)
    keep[order] = first
    return keep


def _rank_within(owner: np.ndarray, n_owners: int) -> np.ndarray:
    """0-based position of each element within its owner's run (owner sorted ascending)."""
    starts = np.searchsorted(owner, np.arange(n_owners))
    return np.arange(len(owner)) - starts[owner]


def _fill_unique(targets: np.ndarray, draw: Any, n_items: int, *, rounds: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """(owner, item) pairs sorted by owner, in draw order, no repeats, at most ``targets[owner]`` each.

    ``draw(owner) -> (item, valid)`` draws one item per requested owner, with replacement; invalid
    draws are dropped. Owners still short after a round draw again (popular items repeat often);
    each round re-sorts only the pairs of owners still short.
    """
    n = len(targets)
    done_owner, done_item = [], []
    done_count = np.zeros(n, np.int64)
    owner = np.empty(0, np.int64)
    item = np.empty(0, np.int64)
    need = targets.copy()
    for round_index in range(rounds):
        extra = np.where(need > 0, np.ceil(need * 1.3).astype(np.int64) + 6, 0)
        new_owner = np.repeat(np.arange(n), extra)
        new_item, valid = draw(new_owner)
        owner = np.concatenate([owner, new_owner[valid]])
        item = np.concatenate([item, new_item[valid]])
        if round_index:
            order = np.argsort(owner, kind="stable")  # earlier rounds first within an owner
            owner, item = owner[order], item[order]
        keep = _dedupe_first(owner, item, n_items)
        owner, item = owner[keep], item[keep]
        keep = _rank_within(owner, n) < targets[owner]
        owner, item = owner[keep], item[keep]
        need = targets - done_count - np.bincount(owner, minlength=n)
        short = need[owner] > 0
        if round_index == rounds - 1 or not short.any():
            done_owner.append(owner)
            done_item.append(item)
            break
        done_owner.append(owner[~short])
        done_item.append(item[~short])
        done_count += np.bincount(owner[~short], minlength=n)
        owner, item = owner[short], item[short]
    owner, item = np.concatenate(done_owner), np.concatenate(done_item)
    order = np.argsort(owner, kind="stable")
    return owner[order], item[order]


# ---------------------------------------------------------------------------------------------
# the world: taxonomy, words, news, users


def _pseudo_words(rng: np.random.Generator, n: int, taken: set[str]) -> list[str]:
    words: list[str] = []
    while len(words) < n:
        n_syl = rng.integers(2, 4)
        word = "".join(_SYLLABLES[i] for i in rng.integers(0, len(_SYLLABLES), n_syl))
        if word not in taken:
            taken.add(word)
            words.append(word)
    return words


@dataclass
class _World:
    size: SynthSize
    model: ClickModel
    category_names: list[str]
    subcategory_names: list[str]
    subcategory_category: np.ndarray  # int64 [S]
    topic_subcategory: np.ndarray  # int64 [T]
    news_topic: np.ndarray  # int64 [N]
    news_subcategory: np.ndarray
    news_category: np.ndarray
    news_day: np.ndarray  # publish day (<= 0 for the old pool)
    news_time: np.ndarray  # publish time, seconds since day 0 00:00 (float64)
    news_exposure: np.ndarray  # Zipf weight within the publishing day
    news_popularity: np.ndarray  # standardised log exposure: the click-through latent
    news_ids: np.ndarray  # object [N] "N12345"
    news_rows: list[str] = field(default_factory=list)  # news.tsv lines without newline
    news_entities: list[list[int]] = field(default_factory=list)
    entity_ids: list[str] = field(default_factory=list)
    entity_vectors: np.ndarray | None = None
    user_ids: np.ndarray | None = None
    user_group: np.ndarray | None = None  # 0 returning, 1 new in dev, 2 new in test
    user_activity: np.ndarray | None = None
    interest_user: np.ndarray | None = None  # int64 [E] sorted by key
    interest_item: np.ndarray | None = None  # combined id: cat | K + sub | K + S + topic
    interest_weight: np.ndarray | None = None
    history_offsets: np.ndarray | None = None
    history_news: np.ndarray | None = None
    history_text: pl.Series | None = None
    bias: float = 0.0  # calibrated logit bias (click rate ~ model.click_rate)
    knobs: World = field(default_factory=World)
    topic_names: list[str] = field(default_factory=list)
    news_text_topic: np.ndarray | None = None  # int64 [N] latent text topic (worlds that use them)
    n_text_topics: int = 0
    history_weight: np.ndarray | None = None  # float64 [N] weight of a news within a history draw
    impression_interests: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # (user, item, weight)

    @functools.cached_property
    def entity_csr(self) -> tuple[np.ndarray, np.ndarray]:
        """(offsets int64 [N + 1], entity int64 [nnz]): the entities each news mentions."""
        counts = np.array([len(e) for e in self.news_entities], dtype=np.int64)
        flat = np.fromiter((e for es in self.news_entities for e in es), dtype=np.int64, count=int(counts.sum()))
        return np.concatenate([[0], np.cumsum(counts)]), flat

    @property
    def level_offsets(self) -> tuple[int, int, int, int, int]:
        """First combined interest id of category, subcategory, topic, entity, text-topic interests."""
        n_cat, n_sub, n_top = len(self.category_names), len(self.subcategory_names), len(self.topic_subcategory)
        return 0, n_cat, n_cat + n_sub, n_cat + n_sub + n_top, n_cat + n_sub + n_top + len(self.entity_ids)

    def news_items(self, news: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(owner, item): every combined interest id each news carries (owner indexes ``news``)."""
        off = self.level_offsets
        n = len(news)
        owners = [np.arange(n)] * 3
        items = [off[0] + self.news_category[news], off[1] + self.news_subcategory[news],
                 off[2] + self.news_topic[news]]
        if self.knobs.uses_entities:
            offsets, flat = self.entity_csr
            counts = offsets[news + 1] - offsets[news]
            owner = np.repeat(np.arange(n), counts)
            owners.append(owner)
            items.append(off[3] + flat[np.repeat(offsets[news], counts) + _rank_within(owner, n)])
        if self.knobs.uses_text_topics:
            owners.append(np.arange(n))
            items.append(off[4] + self.news_text_topic[news])
        return np.concatenate(owners), np.concatenate(items)

    @functools.cached_property
    def news_id_text(self) -> pl.Series:
        return pl.Series(self.news_ids, dtype=pl.String)

    @property
    def n_interest_items(self) -> int:
        return self.level_offsets[4] + self.n_text_topics

    def affinity(self, users: np.ndarray, news: np.ndarray) -> np.ndarray:
        """Sum of the user's impression-period interest weights on the news' category, subcategory,
        topic (and, in worlds that use them, its entities and text topic)."""
        i_user, i_item, i_weight = self.impression_interests or (self.interest_user, self.interest_item,
                                                                 self.interest_weight)
        keys = i_user * self.n_interest_items + i_item
        n_cat, n_sub = len(self.category_names), len(self.subcategory_names)
        total = np.zeros(len(users), dtype=np.float64)
        for item in (self.news_category[news], n_cat + self.news_subcategory[news],
                     n_cat + n_sub + self.news_topic[news]):
            query = users.astype(np.int64) * self.n_interest_items + item
            pos = np.minimum(np.searchsorted(keys, query), len(keys) - 1)
            total += np.where(keys[pos] == query, i_weight[pos], 0.0)
        if self.knobs.uses_entities or self.knobs.uses_text_topics:
            owner, item = self.news_items(news)
            extra = owner >= 0
            extra[: 3 * len(news)] = False
            owner, item = owner[extra], item[extra]
            query = users[owner].astype(np.int64) * self.n_interest_items + item
            pos = np.minimum(np.searchsorted(keys, query), len(keys) - 1)
            total += np.bincount(owner, np.where(keys[pos] == query, i_weight[pos], 0.0), minlength=len(news))
        return total


def _build_taxonomy(rng: np.random.Generator, size: SynthSize) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    categories = list(CATEGORY_NAMES[: size.n_categories])
    lo, hi = size.subcategories_per_category
    n_subs = rng.integers(lo, hi + 1, len(categories))
    subcategory_category = np.repeat(np.arange(len(categories)), n_subs)
    taken: set[str] = set(SHARED_WORDS)
    stems = _pseudo_words(rng, len(subcategory_category), taken)
    subcategories = [f"{categories[c]}{stem}" for c, stem in zip(subcategory_category, stems)]
    topic_subcategory = np.repeat(np.arange(len(subcategories)), size.topics_per_subcategory)
    return categories, subcategories, subcategory_category, topic_subcategory


def _build_news(rng: np.random.Generator, size: SynthSize, model: ClickModel, categories: list[str],
                subcategory_category: np.ndarray, topic_subcategory: np.ndarray) -> dict[str, np.ndarray]:
    n_news = size.n_old_news + 7 * size.news_per_day
    day = np.concatenate([rng.integers(-13, 1, size.n_old_news),
                          np.repeat(np.arange(1, 8), size.news_per_day)])
    time = day * SECONDS_PER_DAY + rng.random(n_news) * SECONDS_PER_DAY
    category_share = rng.dirichlet(np.full(len(categories), 2.0))
    category = rng.choice(len(categories), n_news, p=category_share)
    # a subcategory of the category, then a topic of the subcategory, uniformly
    sub_groups = _WeightedGroups(subcategory_category, np.ones(len(subcategory_category)), len(categories))
    subcategory = sub_groups.draw(category, rng.random(n_news))
    topic_groups = _WeightedGroups(topic_subcategory, np.ones(len(topic_subcategory)), len(subcategory_category))
    topic = topic_groups.draw(subcategory, rng.random(n_news))
    exposure, popularity = _zipf_popularity(rng, day, model)
    ids = rng.choice(np.arange(1, 3 * n_news + 1), n_news, replace=False)
    return {"day": day, "time": time, "category": category, "subcategory": subcategory,
            "topic": topic, "exposure": exposure, "popularity": popularity,
            "ids": np.array([f"N{i}" for i in ids], dtype=object)}


def _zipf_popularity(rng: np.random.Generator, day: np.ndarray, model: ClickModel) -> tuple[np.ndarray, np.ndarray]:
    """(exposure, popularity): Zipf-like weights within each publishing day (the old pool counts as one
    day) and their standardised log, the click-through latent."""
    exposure = np.empty(len(day))
    pool_of = np.where(day <= 0, 0, day)
    for pool in np.unique(pool_of):
        members = np.flatnonzero(pool_of == pool)
        ranks = rng.permutation(len(members)) + 1
        exposure[members] = ranks.astype(np.float64) ** -model.zipf_exponent
    log_exposure = np.log(exposure)
    return exposure, (log_exposure - log_exposure.mean()) / log_exposure.std()


class _Text:
    """Titles, abstracts and entities of news, from the topic/subcategory/category word lists."""

    def __init__(self, rng: np.random.Generator, n_categories: int, n_subcategories: int, n_topics: int) -> None:
        taken = set(SHARED_WORDS)
        extra_shared = _pseudo_words(rng, 250, taken)
        self.shared = list(dict.fromkeys(SHARED_WORDS)) + extra_shared
        zipf = 1.0 / np.arange(1, len(self.shared) + 1) ** 0.8
        self.shared_p = zipf / zipf.sum()
        self.category_words = [_pseudo_words(rng, 12, taken) for _ in range(n_categories)]
        self.subcategory_words = [_pseudo_words(rng, 12, taken) for _ in range(n_subcategories)]
        self.topic_words = [_pseudo_words(rng, 8, taken) for _ in range(n_topics)]
        # two entities per topic; their embeddings sit near a topic centroid
        self.entity_topic = np.repeat(np.arange(n_topics), 2)
        names = _pseudo_words(rng, 2 * len(self.entity_topic), taken)
        self.entity_label = [f"{a.capitalize()} {b.capitalize()}" for a, b in zip(names[0::2], names[1::2])]
        q_numbers = rng.choice(np.arange(100, 10 * len(self.entity_topic) + 100_000), len(self.entity_topic),
                               replace=False)
        self.entity_id = [f"Q{q}" for q in q_numbers]
        self.entity_type = [ENTITY_TYPES[i] for i in rng.integers(0, len(ENTITY_TYPES), len(self.entity_topic))]
        centroids = rng.normal(0, 0.08, (n_topics, ENTITY_DIM))
        self.entity_vectors = centroids[self.entity_topic] + rng.normal(0, 0.03, (len(self.entity_topic), ENTITY_DIM))
        self.topic_entities = _WeightedGroups(self.entity_topic, np.ones(len(self.entity_topic)), n_topics)

        # one word table: shared | category lists | subcategory lists | topic lists (fixed list sizes)
        self.words = np.array(self.shared + [w for ws in (self.category_words + self.subcategory_words
                                                          + self.topic_words) for w in ws], dtype=object)
        self.category_start = len(self.shared) + 12 * np.arange(n_categories)
        self.subcategory_start = len(self.shared) + 12 * n_categories + 12 * np.arange(n_subcategories)
        self.topic_start = len(self.shared) + 12 * (n_categories + n_subcategories) + 8 * np.arange(n_topics)
        self.text_topic_start: np.ndarray | None = None
        self._taken = taken

    def add_text_topics(self, rng: np.random.Generator, n_text_topics: int) -> None:
        """Word lists (10 words each) of latent text topics that cut across the taxonomy."""
        words = _pseudo_words(rng, 10 * n_text_topics, self._taken)
        self.text_topic_start = len(self.words) + 10 * np.arange(n_text_topics)
        self.words = np.concatenate([self.words, np.array(words, dtype=object)])

    def token_matrix(self, rng: np.random.Generator, max_words: int, topic: np.ndarray, subcategory: np.ndarray,
                     category: np.ndarray, shares: tuple[float, float, float]) -> np.ndarray:
        """Word ids int64 [n, max_words]: each from the news' topic, subcategory, category or shared list."""
        n = len(topic)
        source = rng.choice(4, (n, max_words), p=[*shares, 1.0 - sum(shares)])
        pick = rng.random((n, max_words))
        shared = rng.choice(len(self.shared), (n, max_words), p=self.shared_p)
        topical = np.stack([self.topic_start[topic], self.subcategory_start[subcategory],
                            self.category_start[category]], axis=1)  # (n, 3)
        list_size = np.array([8, 12, 12])
        level = np.minimum(source, 2)
        from_list = np.take_along_axis(topical, level, axis=1) + (pick * list_size[level]).astype(np.int64)
        return np.where(source == 3, shared, from_list)

    def with_text_topics(self, rng: np.random.Generator, tokens: np.ndarray, text_topic: np.ndarray,
                         share: float) -> np.ndarray:
        """``tokens`` with a ``share`` of the words replaced by words of the news' text topic."""
        replace = rng.random(tokens.shape) < share
        words = self.text_topic_start[text_topic][:, None] + rng.integers(0, 10, tokens.shape)
        return np.where(replace, words, tokens)

    def entity_json(self, entity: int | None, text: str) -> str:
        if entity is None:
            return "[]"
        label = self.entity_label[entity]
        return json.dumps([{"Label": label, "Type": self.entity_type[entity], "WikidataId": self.entity_id[entity],
                            "Confidence": 1.0 if entity % 3 else 0.998, "OccurrenceOffsets": [text.index(label)],
                            "SurfaceForms": [label]}])


def _compose(words: list[str], entity_label: str | None, entity_at: float, quote: bool, quote_at: float,
             quote_len: int) -> str:
    """A sentence from words, with the entity's surface form inserted and maybe a quoted span."""
    if entity_label is not None:
        words.insert(int(entity_at * (len(words) + 1)), entity_label)
    if quote and len(words) > 4:
        start = int(quote_at * (len(words) - 2))
        words[start] = '"' + words[start]
        words[min(start + quote_len, len(words)) - 1] += '"'
    sentence = " ".join(words)
    return sentence[:1].upper() + sentence[1:]


def _texts(rng: np.random.Generator, world: _World, text: _Text, *, mean_words: float, min_words: int,
           max_words: int, shares: tuple[float, float, float], entity_share: float, quote_share: float,
           empty_share: float, text_rng: np.random.Generator | None = None,
           text_share: float = 0.0, entity_override: np.ndarray | None = None) -> tuple[list[str], list[int | None]]:
    """One text per news (titles or abstracts) and the entity it mentions (or None)."""
    n = len(world.news_ids)
    lengths = np.clip(rng.poisson(mean_words, n), min_words, max_words)
    tokens = text.token_matrix(rng, max_words, world.news_topic, world.news_subcategory, world.news_category,
                               shares)
    if text_rng is not None:
        tokens = text.with_text_topics(text_rng, tokens, world.news_text_topic, text_share)
    has_entity = rng.random(n) < entity_share
    entity = text.topic_entities.draw(world.news_topic, rng.random(n))
    if entity_override is not None:
        entity = entity_override
    entity_at, quote_at = rng.random(n), rng.random(n)
    quote = rng.random(n) < quote_share
    quote_len = rng.integers(2, 4, n)
    empty = rng.random(n) < empty_share
    out, mentioned = [], []
    for i in range(n):
        if empty[i]:
            out.append("")
            mentioned.append(None)
            continue
        label = text.entity_label[entity[i]] if has_entity[i] else None
        out.append(_compose(list(text.words[tokens[i, : lengths[i]]]), label, entity_at[i], quote[i], quote_at[i],
                            int(quote_len[i])))
        mentioned.append(int(entity[i]) if has_entity[i] else None)
    return out, mentioned


def _news_rows(rng: np.random.Generator, world: _World, text: _Text,
               text_rng: np.random.Generator | None = None,
               entity_rng: np.random.Generator | None = None) -> tuple[list[str], list[list[int]]]:
    """news.tsv lines (8 columns, no newline) and the entity ids each news mentions. With ``text_rng``,
    a share of the words come from the news' latent text topic; with ``entity_rng``, title entities are
    drawn across the taxonomy with Zipf-like frequencies (a few entities in many news, as in MIND)."""
    title_override = None
    if entity_rng is not None:
        n_entities = len(text.entity_id)
        zipf = 1.0 / (entity_rng.permutation(n_entities) + 1.0)
        title_override = entity_rng.choice(n_entities, len(world.news_ids), p=zipf / zipf.sum())
    titles, title_entity = _texts(rng, world, text, mean_words=10.5, min_words=4, max_words=24,
                                  shares=(0.3, 0.2, 0.1), entity_share=0.4, quote_share=0.12, empty_share=0.0,
                                  text_rng=text_rng, text_share=0.35, entity_override=title_override)
    abstracts, abstract_entity = _texts(rng, world, text, mean_words=24, min_words=6, max_words=60,
                                        shares=(0.15, 0.12, 0.08), entity_share=0.5, quote_share=0.05,
                                        empty_share=0.08, text_rng=text_rng, text_share=0.3)
    url_codes = rng.integers(36 ** 5, 36 ** 6, len(titles))
    rows, entities = [], []
    for i in range(len(titles)):
        cat, sub = world.news_category[i], world.news_subcategory[i]
        url = f"https://assets.msn.com/labs/mind/AA{np.base_repr(int(url_codes[i]), 36)}.html"
        rows.append("\t".join((world.news_ids[i], world.category_names[cat], world.subcategory_names[sub],
                               titles[i], abstracts[i], url, text.entity_json(title_entity[i], titles[i]),
                               text.entity_json(abstract_entity[i], abstracts[i]))))
        entities.append(sorted({e for e in (title_entity[i], abstract_entity[i]) if e is not None}))
    return rows, entities


def _build_users(rng: np.random.Generator, world: _World, extra_rng: np.random.Generator | None = None) -> None:
    size, model = world.size, world.model
    n_users = size.n_users
    ids = rng.choice(np.arange(1, 3 * n_users + 1), n_users, replace=False)
    world.user_ids = np.array([f"U{i}" for i in ids], dtype=object)
    world.user_group = rng.choice(3, n_users, p=[0.8, 0.1, 0.1]).astype(np.int8)
    world.user_activity = rng.lognormal(0.0, 1.0, n_users)
    user, item, weight = _draw_interests(rng, world, n_users, extra_rng)
    world.interest_user, world.interest_item, world.interest_weight = user, item, weight


def _draw_interests(rng: np.random.Generator, world: _World, n_users: int,
                    extra_rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sparse interests of ``n_users`` users from the prior: (user, combined item, weight), sorted by
    (user, item). Entity and text-topic interests (worlds that use them) come from ``extra_rng``."""
    model, knobs = world.model, world.knobs
    n_cat, n_sub = len(world.category_names), len(world.subcategory_names)
    # categories: 1..3 per user, without replacement, favouring popular categories (Gumbel top-k)
    category_share = np.bincount(world.news_category, minlength=n_cat) + 1.0
    n_chosen = 1 + rng.binomial(2, 0.3, n_users)
    keys = np.log(category_share / category_share.sum())[None, :] + rng.gumbel(size=(n_users, n_cat))
    rank = np.argsort(np.argsort(-keys, axis=1), axis=1)
    cat_user, cat_item = np.nonzero(rank < n_chosen[:, None])
    # subcategories: 1..3 per chosen category; topics: 1..2 per chosen subcategory (duplicates merged)
    sub_groups = _WeightedGroups(world.subcategory_category, np.ones(n_sub), n_cat)
    sub_user, sub_item = _pick_children(rng, cat_user, cat_item, sub_groups, (0.5, 0.35, 0.15), n_sub)
    n_topics = len(world.topic_subcategory)
    topic_groups = _WeightedGroups(world.topic_subcategory, np.ones(n_topics), n_sub)
    top_user, top_item = _pick_children(rng, sub_user, sub_item, topic_groups, (0.6, 0.4), n_topics)
    user = np.concatenate([cat_user, sub_user, top_user]).astype(np.int64)
    item = np.concatenate([cat_item, n_cat + sub_item, n_cat + n_sub + top_item]).astype(np.int64)
    c_scale, s_scale, t_scale = (np.array([model.category_scale, model.subcategory_scale, model.topic_scale])
                                 * np.array(knobs.level_scale))
    scale = np.concatenate([np.full(len(cat_user), c_scale), np.full(len(sub_user), s_scale),
                            np.full(len(top_user), t_scale)])
    weight = scale * rng.gamma(2.0, 0.5, len(user))
    if knobs.uses_entities or knobs.uses_text_topics:
        extra_rng = extra_rng if extra_rng is not None else rng
        off = world.level_offsets
        parts = [(user, item, weight)]
        if knobs.uses_entities:  # 2..6 entities, favouring often-mentioned ones
            mentions = np.bincount(world.entity_csr[1], minlength=len(world.entity_ids)) + 0.5
            parts.append(_top_k_interests(extra_rng, mentions, 2 + extra_rng.binomial(4, 0.4, n_users),
                                          off[3], knobs.entity_scale))
        if knobs.uses_text_topics:  # 1..3 text topics, favouring common ones
            share = np.bincount(world.news_text_topic, minlength=world.n_text_topics) + 1.0
            parts.append(_top_k_interests(extra_rng, share, 1 + extra_rng.binomial(2, 0.3, n_users),
                                          off[4], knobs.text_topic_scale))
        user, item, weight = (np.concatenate(x) for x in zip(*parts))
    order = np.argsort(user * world.n_interest_items + item, kind="stable")
    return user[order], item[order], weight[order]


def _top_k_interests(rng: np.random.Generator, frequency: np.ndarray, k: np.ndarray, offset: int,
                     scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """k[u] distinct items per user, favouring frequent ones (Gumbel top-k), gamma weights of mean scale."""
    n_users, n_items = len(k), len(frequency)
    keys = np.log(frequency / frequency.sum())[None, :] + rng.gumbel(size=(n_users, n_items))
    top = np.argsort(-keys, axis=1)[:, : max(1, min(int(k.max()), n_items))]
    chosen = np.arange(top.shape[1])[None, :] < k[:, None]
    user, rank = np.nonzero(chosen)
    return user.astype(np.int64), (offset + top[user, rank]).astype(np.int64), scale * rng.gamma(2.0, 0.5, len(user))


def _merge_interests(a: tuple[np.ndarray, ...], b: tuple[np.ndarray, ...], share_b: float,
                     n_items: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(1 - share_b) * a + share_b * b as one sparse interest set sorted by (user, item)."""
    keys = np.concatenate([a[0] * n_items + a[1], b[0] * n_items + b[1]])
    weights = np.concatenate([(1.0 - share_b) * a[2], share_b * b[2]])
    unique, inverse = np.unique(keys, return_inverse=True)
    return unique // n_items, unique % n_items, np.bincount(inverse, weights)


def _pick_children(rng: np.random.Generator, parent_user: np.ndarray, parent_item: np.ndarray,
                   children: _WeightedGroups, count_p: tuple[float, ...], n_children: int) -> tuple[np.ndarray, np.ndarray]:
    counts = rng.choice(len(count_p), len(parent_user), p=count_p) + 1
    owner = np.repeat(np.arange(len(parent_user)), counts)
    child = children.draw(parent_item[owner], rng.random(len(owner)))
    user = parent_user[owner]
    keep = _dedupe_first(user, child, n_children)
    return user[keep], child[keep]


def _build_histories(rng: np.random.Generator, world: _World) -> None:
    """Each user's clicks before day 1, drawn from their interests over the old pool, oldest first."""
    size, model = world.size, world.model
    old = np.flatnonzero(world.news_day <= 0)
    lengths = sample_history_lengths(rng, size.n_users, model=model, max_len=min(size.max_history, len(old)))
    level_offset = world.level_offsets
    level_of_item = np.searchsorted(np.array(level_offset), world.interest_item, side="right") - 1
    weight = world.history_weight[old]
    mix = world.knobs.mix()
    levels = [level for level in (0, 1, 2, 3, 4) if level < 3 or (len(mix) > 4 and mix[level + 1] > 0)]  # 3: entity, 4: text
    level_news, level_pair_news, level_interest = {}, {}, {}
    for level in levels:
        group, pair_news, n_groups = _history_groups(world, old, level)
        level_news[level] = _WeightedGroups(group, weight[pair_news], n_groups)
        level_pair_news[level] = pair_news
        rows = np.flatnonzero(level_of_item == level)
        level_interest[level] = (rows, _WeightedGroups(world.interest_user[rows], world.interest_weight[rows],
                                                       size.n_users))
    global_news = _WeightedGroups(np.zeros(len(old), dtype=np.int64), weight, 1)
    source_of_level = {0: 0, 1: 1, 2: 2, 3: 4, 4: 5}  # history_mix index (3 is "anything popular")

    def draw(owner: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # mixture over the world's history_mix: the user's interests at each level, or anything popular
        source = rng.choice(len(mix), len(owner), p=mix)
        picked = global_news.draw(np.zeros(len(owner), dtype=np.int64), rng.random(len(owner)))
        for level in levels:
            rows, interests = level_interest[level]
            sel = np.flatnonzero(source == source_of_level[level])
            sel = sel[interests.nonempty(owner[sel])]
            entry = rows[interests.draw(owner[sel], rng.random(len(sel)))]
            group = world.interest_item[entry] - level_offset[level]
            has_news = level_news[level].nonempty(group)
            sel, group = sel[has_news], group[has_news]
            picked[sel] = level_pair_news[level][level_news[level].draw(group, rng.random(len(sel)))]
        return picked, np.ones(len(owner), dtype=bool)

    counts, blocks, texts = [], [], []
    for start in range(0, size.n_users, _USER_BLOCK):  # blocks of users bound the memory
        stop = min(start + _USER_BLOCK, size.n_users)
        owner, picked = _fill_unique(lengths[start:stop], lambda o: draw(o + start), len(old))
        news = old[picked]
        order = np.lexsort((world.news_time[news], owner))  # per user, oldest first
        owner, news = owner[order], news[order].astype(np.int32)
        block_counts = np.bincount(owner, minlength=stop - start)
        texts.append(_join_ids(world, news, np.concatenate([[0], np.cumsum(block_counts)]), None))
        counts.append(block_counts)
        blocks.append(news)
    world.history_offsets = np.concatenate([[0], np.cumsum(np.concatenate(counts))])
    world.history_news = np.concatenate(blocks)
    world.history_text = pl.concat(texts, rechunk=True)


def _history_groups(world: _World, old: np.ndarray, level: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(group, news, n_groups): (interest group, position in ``old``) pairs of a level; a news is in
    one category, subcategory, topic and text topic, and in the group of every entity it mentions."""
    if level == 3:
        offsets, flat = world.entity_csr
        counts = offsets[old + 1] - offsets[old]
        pair_news = np.repeat(np.arange(len(old)), counts)
        group = flat[np.repeat(offsets[old], counts) + _rank_within(pair_news, len(old))]
        return group, pair_news, len(world.entity_ids)
    group, n_groups = {0: (world.news_category, len(world.category_names)),
                       1: (world.news_subcategory, len(world.subcategory_names)),
                       2: (world.news_topic, len(world.topic_subcategory)),
                       4: (world.news_text_topic, world.n_text_topics)}[level]
    return group[old], np.arange(len(old)), n_groups


def _join_ids(world: _World, news: np.ndarray, offsets: np.ndarray, labels: np.ndarray | None) -> pl.Series:
    """One space-joined string per CSR row: ``N1 N2`` or ``N1-1 N2-0`` when labels are given."""
    tokens = world.news_id_text.gather(news)
    if labels is not None:
        tokens = tokens + pl.Series(np.where(labels, "-1", "-0"), dtype=pl.String)
    return _csr_lists(tokens, offsets).list.join(" ")


def _csr_lists(values: pl.Series, offsets: np.ndarray) -> pl.Series:
    """A list Series whose row i holds ``values[offsets[i]:offsets[i + 1]]``."""
    offsets = np.ascontiguousarray(offsets, dtype=np.int64)
    arrow_offsets = pa.Array.from_buffers(pa.int64(), len(offsets), [None, pa.py_buffer(offsets)])
    arrow_values = values.to_arrow()
    if arrow_values.type == pa.string():
        arrow_values = arrow_values.cast(pa.large_string())
    return pl.Series(pa.LargeListArray.from_arrays(arrow_offsets, arrow_values))


def _build_world(size: SynthSize, model: ClickModel, seed: int, knobs: World = World(),
                 real: RealNewsWorld | None = None) -> _World:
    if real is not None:
        world = real.world(size, model, knobs, seed)
    else:
        rng = np.random.default_rng([seed, 1])
        categories, subcategories, subcategory_category, topic_subcategory = _build_taxonomy(rng, size)
        news = _build_news(rng, size, model, categories, subcategory_category, topic_subcategory)
        world = _World(size=size, model=model, category_names=categories, subcategory_names=subcategories,
                       subcategory_category=subcategory_category, topic_subcategory=topic_subcategory,
                       news_topic=news["topic"], news_subcategory=news["subcategory"],
                       news_category=news["category"], news_day=news["day"], news_time=news["time"],
                       news_exposure=news["exposure"], news_popularity=news["popularity"], news_ids=news["ids"],
                       knobs=knobs, topic_names=[f"{subcategories[s]}/{i % size.topics_per_subcategory}"
                                                 for i, s in enumerate(topic_subcategory)])
    _apply_exposure(world)
    with progress(total=3, desc="synth world", unit="step") as bar:
        if real is None:
            text = _Text(np.random.default_rng([seed, 2]), len(world.category_names), len(world.subcategory_names),
                         len(world.topic_subcategory))
            text_rng = None
            if knobs.uses_text_topics:  # latent text topics across the taxonomy, carried by their own words
                topic_rng = np.random.default_rng([seed, 24])
                world.n_text_topics = max(6, len(world.category_names))
                world.news_text_topic = topic_rng.integers(0, world.n_text_topics, len(world.news_ids))
                text.add_text_topics(topic_rng, world.n_text_topics)
                text_rng = np.random.default_rng([seed, 25])
            entity_rng = np.random.default_rng([seed, 27]) if knobs.uses_entities else None
            world.news_rows, world.news_entities = _news_rows(np.random.default_rng([seed, 3]), world, text,
                                                              text_rng, entity_rng)
            world.entity_ids, world.entity_vectors = text.entity_id, text.entity_vectors
        bar.update()
        _build_users(np.random.default_rng([seed, 4]), world, np.random.default_rng([seed, 22]))
        if knobs.drift > 0:  # impression-period interests: part of the weight moves to fresh interests
            fresh = _draw_interests(np.random.default_rng([seed, 23]), world, size.n_users,
                                    np.random.default_rng([seed, 26]))
            world.impression_interests = _merge_interests(
                (world.interest_user, world.interest_item, world.interest_weight), fresh, knobs.drift,
                world.n_interest_items)
        bar.update()
        _build_histories(np.random.default_rng([seed, 5]), world)
        bar.update()
    return world


def _apply_exposure(world: _World) -> None:
    """Showing weights and history-draw weights of the world's exposure mode."""
    if world.knobs.exposure == "uniform":
        world.news_exposure = np.ones(len(world.news_ids))
        world.history_weight = np.exp(world.model.popularity_scale * world.news_popularity)
    else:
        world.history_weight = world.news_exposure


@dataclass
class RealNewsWorld:
    """News of a real news.tsv placed in time: publication days, popularity, text topics, entities."""

    news: RealNews
    old_share: float = 0.4  # share of the news published before day 1 (the history pool)

    def size_for(self, spec: SynthSize) -> SynthSize:
        """``spec`` scaled to the news available: users in proportion to the news, impressions by the
        square root of that ratio (fewer news are shown more often), never above ``spec``."""
        n = len(self.news.ids)
        ratio = min(1.0, n / (spec.n_old_news + 7 * spec.news_per_day))
        n_old = int(round(self.old_share * n))
        return replace(spec, name=f"{spec.name}-news{n}", n_users=max(200, int(round(spec.n_users * ratio))),
                       n_old_news=n_old, news_per_day=(n - n_old) // 7,
                       train_impressions=max(500, int(round(spec.train_impressions * ratio ** 0.5))),
                       dev_impressions=max(200, int(round(spec.dev_impressions * ratio ** 0.5))),
                       test_impressions=max(200, int(round(spec.test_impressions * ratio ** 0.5))))

    def world(self, size: SynthSize, model: ClickModel, knobs: World, seed: int) -> _World:
        news = self.news
        n = len(news.ids)
        rng = np.random.default_rng([seed, 11])
        day = np.empty(n, dtype=np.int64)
        order = rng.permutation(n)
        n_old = size.n_old_news
        day[order[:n_old]] = rng.integers(-13, 1, n_old)
        day[order[n_old:]] = np.arange(n - n_old) % 7 + 1
        time = day * SECONDS_PER_DAY + rng.random(n) * SECONDS_PER_DAY
        exposure, popularity = _zipf_popularity(rng, day, model)
        categories, category = np.unique(np.array(news.category, dtype=object).astype(str), return_inverse=True)
        pairs = np.array([f"{c}\t{s}" for c, s in zip(news.category, news.subcategory)])
        sub_keys, subcategory = np.unique(pairs, return_inverse=True)
        subcategory_category = np.searchsorted(categories, [k.split("\t")[0] for k in sub_keys])
        text_topic, n_text_topics = text_topics(news.text, seed)
        topic_keys, topic = np.unique(subcategory * n_text_topics + text_topic, return_inverse=True)
        entity_ids = sorted({e for es in news.entities for e in es})
        entity_index = {e: i for i, e in enumerate(entity_ids)}
        world = _World(size=size, model=model, category_names=[str(c) for c in categories],
                       subcategory_names=[k.split("\t")[1] for k in sub_keys],
                       subcategory_category=subcategory_category.astype(np.int64),
                       topic_subcategory=(topic_keys // n_text_topics).astype(np.int64),
                       news_topic=topic.astype(np.int64), news_subcategory=subcategory.astype(np.int64),
                       news_category=category.astype(np.int64), news_day=day, news_time=time,
                       news_exposure=exposure, news_popularity=popularity,
                       news_ids=np.array(news.ids, dtype=object), knobs=knobs,
                       topic_names=[f"{sub_keys[k // n_text_topics].split(chr(9))[1]}/text{k % n_text_topics}"
                                    for k in topic_keys],
                       news_text_topic=text_topic, n_text_topics=n_text_topics)
        world.news_rows = list(news.rows)
        world.news_entities = [[entity_index[e] for e in es] for es in news.entities]
        world.entity_ids = entity_ids
        # random vectors: the real entity embeddings are not part of news.tsv
        world.entity_vectors = rng.normal(0, 0.08, (len(entity_ids), ENTITY_DIM))
        return world


# ---------------------------------------------------------------------------------------------
# impressions and clicks


@dataclass
class _Chunk:
    """A block of impressions in CSR form: impression i owns candidates ``[offsets[i], offsets[i+1])``."""

    user: np.ndarray  # int64 [n]
    time: np.ndarray  # int64 [n] seconds since day 0 00:00
    offsets: np.ndarray  # int64 [n + 1]
    news: np.ndarray  # int64 [m] candidate news, in the shown (random) order
    base_logit: np.ndarray  # float64 [m] visible logit without the bias
    hidden_noise: np.ndarray  # float64 [m] eta + logistic draw: what the oracle cannot see
    rest: np.ndarray  # float64 [m] popularity + freshness terms of base_logit (all but the affinity)

    def clicks(self, bias: float) -> np.ndarray:
        """Clicked bool [m]; an impression with no positive draw gets its highest draw clicked."""
        draw = self.base_logit + bias + self.hidden_noise
        clicked = draw > 0
        starts = self.offsets[:-1]
        any_click = np.logical_or.reduceat(clicked, starts)
        best = np.maximum.reduceat(draw, starts)
        owner = np.repeat(np.arange(len(starts)), np.diff(self.offsets))
        forced = ~any_click[owner] & (draw == best[owner])
        return clicked | forced


class _Impressions:
    """Draws impressions of a split: who, when, which candidates, and their click logits."""

    def __init__(self, world: _World) -> None:
        self.world = world
        knobs = world.knobs
        decay = world.model.exposure_decay if knobs.exposure == "popularity" else (1.0,) * len(world.model.exposure_decay)
        first_cold_day = min(SPLIT_DAYS["dev"])
        pool, members, weights = [], [], []
        for day in range(1, 8):
            for age, factor in enumerate(decay):
                if knobs.cold_test and day >= first_cold_day and day - age < first_cold_day:
                    continue  # cold-test: dev/test show only news published after the training days
                news = np.flatnonzero(world.news_day == day - age)
                pool.append(np.full(len(news), day))
                members.append(news)
                weights.append(world.news_exposure[news] * factor)
        self.pool_news = np.concatenate(members)
        self.pools = _WeightedGroups(np.concatenate(pool), np.concatenate(weights), 8)
        # candidates per impression on each day: at most half of that day's pool
        pool_sizes = np.bincount(np.concatenate(pool), minlength=8)
        self.max_size = np.clip(pool_sizes // 2, 2, world.size.max_candidates)
        self.users = _WeightedGroups(world.user_group.astype(np.int64), world.user_activity, 3)
        self.hour_p = _HOUR_WEIGHTS / _HOUR_WEIGHTS.sum()

    def _candidates(self, day: np.ndarray, time: np.ndarray, sizes: np.ndarray,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(impression, news) pairs: drawn by exposure, published before the impression, no repeats."""

        def draw(owner: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            news = self.pool_news[self.pools.draw(day[owner], rng.random(len(owner)))]
            return news, self.world.news_time[news] <= time[owner]

        return _fill_unique(sizes, draw, len(self.world.news_ids))

    def user_groups(self, split: str) -> np.ndarray:
        """Share of impressions from returning users and from users new in dev / new in test."""
        return {"train": np.array([1.0, 0.0, 0.0]), "dev": np.array([0.85, 0.15, 0.0]),
                "test": np.array([0.72, 0.06, 0.22])}[split]

    def draw(self, split: str, n: int, rng: np.random.Generator) -> _Chunk:
        world, model = self.world, self.world.model
        group = rng.choice(3, n, p=self.user_groups(split))
        user = self.users.draw(group, rng.random(n))
        day = rng.choice(np.array(SPLIT_DAYS[split]), n)
        seconds = rng.choice(24, n, p=self.hour_p) * 3600 + rng.integers(0, 3600, n)
        time = day.astype(np.int64) * SECONDS_PER_DAY + seconds
        sizes = np.minimum(sample_impression_sizes(rng, n, model=model, max_size=world.size.max_candidates),
                           self.max_size[day])
        owner, news = self._candidates(day, time, sizes, rng)
        counts = np.bincount(owner, minlength=n)
        ok = counts >= 2  # rare: an early-morning impression whose pool ran short
        if not ok.all():
            keep_news = ok[owner]
            owner, news = np.cumsum(ok)[owner[keep_news]] - 1, news[keep_news]
            user, time, counts = user[ok], time[ok], counts[ok]
        offsets = np.concatenate([[0], np.cumsum(counts)])
        age_hours = (time[owner] - world.news_time[news]) / 3600.0
        popularity_term = model.popularity_scale * world.news_popularity[news]
        freshness_term = model.freshness_scale * np.exp(-age_hours / 24.0)
        base = world.affinity(user[owner], news) + popularity_term + freshness_term
        rest = popularity_term + freshness_term
        noise = rng.normal(0.0, model.noise_std, len(news)) + rng.logistic(0.0, 1.0, len(news))
        return _Chunk(user=user, time=time, offsets=offsets, news=news, base_logit=base, hidden_noise=noise,
                      rest=rest)


def oracle_probability(logit: np.ndarray, noise_std: float) -> np.ndarray:
    """P(click) given the visible logit, integrating the hidden normal noise (probit approximation)."""
    return 1.0 / (1.0 + np.exp(-logit / math.sqrt(1.0 + math.pi * noise_std ** 2 / 8.0)))


def _calibrate_bias(impressions: _Impressions, seed: int, target_rate: float, n_pilot: int) -> float:
    """The logit bias whose click rate (forced clicks included) on a pilot sample is ``target_rate``."""
    pilot = impressions.draw("train", n_pilot, np.random.default_rng([seed, 6]))
    lo, hi = -20.0, 5.0
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if pilot.clicks(mid).mean() > target_rate:
            hi = mid
        else:
            lo = mid
    return 0.5 * (lo + hi)


# ---------------------------------------------------------------------------------------------
# writing


def _time_tables() -> tuple[pl.Series, pl.Series]:
    """MIND time text: date per day index 0..8 and ``h:mm:ss AM`` per second of the day."""
    dates = [FIRST_DAY + timedelta(days=d - 1) for d in range(9)]
    date_text = pl.Series([f"{d.month}/{d.day}/{d.year}" for d in dates], dtype=pl.String)
    hours = pl.Series([f"{h % 12 or 12}:" for h in range(24)], dtype=pl.String)
    minutes_seconds = pl.Series([f"{s // 60:02d}:{s % 60:02d}" for s in range(3600)], dtype=pl.String)
    halves = pl.Series([" AM", " PM"], dtype=pl.String)
    second = np.arange(SECONDS_PER_DAY)
    clock = hours.gather(second // 3600) + minutes_seconds.gather(second % 3600) + halves.gather(second // 43_200)
    return date_text, clock


def _zip_member(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=ZIP_TIMESTAMP)
    info.compress_type = zipfile.ZIP_DEFLATED
    # the level attribute is `_compresslevel` before Python 3.13, `compress_level` after
    setattr(info, "compress_level" if hasattr(info, "compress_level") else "_compresslevel", ZIP_LEVEL)
    info.external_attr = 0o100644 << 16  # a regular file, rw-r--r--
    return info


@dataclass
class _TruthChunk:
    """What the ground truth keeps of a dev/test chunk (compact dtypes)."""

    user: np.ndarray  # int32 [n]
    counts: np.ndarray  # int32 [n] candidates per impression
    news: np.ndarray  # int32 [m]
    label: np.ndarray  # int8 [m]
    probability: np.ndarray  # float32 [m]
    rest: np.ndarray  # float32 [m] popularity + freshness terms of the logit


@dataclass
class _SplitResult:
    impressions: int = 0
    candidates: int = 0
    clicks: int = 0
    impression_ids: list[np.ndarray] = field(default_factory=list)
    chunks: list[_TruthChunk] = field(default_factory=list)  # kept for dev/test only
    shown_news: np.ndarray | None = None  # bool [N] news among this split's candidates
    referenced_news: np.ndarray | None = None  # bool [N] news in this split's news.tsv


def _write_split(out_dir: Path, split: str, world: _World, impressions: _Impressions, bias: float, seed: int,
                 time_text: tuple[pl.Series, pl.Series], bar: Any) -> _SplitResult:
    size = world.size
    n_total = size.impressions(split)
    labelled = split != "test"
    result = _SplitResult(shown_news=np.zeros(len(world.news_ids), bool),
                          referenced_news=np.zeros(len(world.news_ids), bool))
    users_seen = np.zeros(size.n_users, bool)
    date_text, clock_text = time_text
    user_text = pl.Series(world.user_ids, dtype=pl.String)
    split_code = {"train": 0, "dev": 1, "test": 2}[split]
    with atomic_path(out_dir / f"MINDsynth_{split}.zip") as tmp:
        with zipfile.ZipFile(tmp, "w", allowZip64=True) as archive:
            with archive.open(_zip_member("behaviors.tsv"), "w", force_zip64=n_total > 1_000_000) as fh:
                for chunk_index, start in enumerate(range(0, n_total, size.chunk_impressions)):
                    n = min(size.chunk_impressions, n_total - start)
                    chunk = impressions.draw(split, n, np.random.default_rng([seed, 7, split_code, chunk_index]))
                    clicked = chunk.clicks(bias)
                    first_id = result.impressions + 1
                    ids = np.arange(first_id, first_id + len(chunk.user), dtype=np.int64)
                    day, second = chunk.time // SECONDS_PER_DAY, chunk.time % SECONDS_PER_DAY
                    frame = pl.DataFrame({
                        "impression_id": ids,
                        "user_id": user_text.gather(chunk.user),
                        "time": date_text.gather(day) + " " + clock_text.gather(second),
                        "history": world.history_text.gather(chunk.user),
                        "impressions": _join_ids(world, chunk.news, chunk.offsets, clicked if labelled else None),
                    })
                    buffer = io.BytesIO()
                    frame.write_csv(buffer, include_header=False, separator="\t", quote_style="never",
                                    line_terminator="\n")
                    fh.write(buffer.getvalue())
                    result.impressions += len(ids)
                    result.candidates += len(chunk.news)
                    result.clicks += int(clicked.sum())
                    result.shown_news[chunk.news] = True
                    users_seen[chunk.user] = True
                    if split != "train":
                        result.impression_ids.append(ids)
                        result.chunks.append(_TruthChunk(
                            user=chunk.user.astype(np.int32), counts=np.diff(chunk.offsets).astype(np.int32),
                            news=chunk.news.astype(np.int32), label=clicked.astype(np.int8),
                            probability=oracle_probability(chunk.base_logit + bias, world.model.noise_std)
                            .astype(np.float32), rest=chunk.rest.astype(np.float32)))
                    bar.update(n)
            history_owner_seen = np.repeat(users_seen, np.diff(world.history_offsets))
            result.referenced_news[world.history_news[history_owner_seen]] = True
            result.referenced_news |= result.shown_news
            listed = np.flatnonzero(result.referenced_news)
            archive.writestr(_zip_member("news.tsv"), "".join(world.news_rows[i] + "\n" for i in listed))
            entities = sorted({e for i in listed for e in world.news_entities[i]})
            archive.writestr(_zip_member("entity_embedding.vec"), "".join(
                world.entity_ids[e] + "\t" + "\t".join(f"{v:.6f}" for v in world.entity_vectors[e]) + "\n"
                for e in entities))
            archive.writestr(_zip_member("relation_embedding.vec"), _relation_vectors(seed))
    return result


HISTORY_BANK = 2000  # prior draws of the importance sampler of the history-only limit
HISTORY_TOP = 64  # draws kept per user (the heaviest; the weight left out is reported)
HISTORY_ONLY_METHOD = (
    "self-normalised importance sampling over {bank} draws of the interest prior: each draw weighted by "
    "the likelihood of the user's history under the world's history-draw mixture (draws with replacement, "
    "the generator's without-replacement dedupe ignored), the {top} heaviest draws per user kept; "
    "history_only scores a candidate by the posterior "
    "mean of P(click | interests) without the popularity and freshness terms, history_only_popularity by "
    "the posterior mean with the news' true popularity and freshness terms; with few effective draws the "
    "numbers sit below the exact Bayes limit")


def _history_only(world: _World, splits: dict[str, dict[str, np.ndarray]], seed: int,
                  n_bank: int = HISTORY_BANK) -> dict[str, Any]:
    """Metrics of scores that see only the history (see ``HISTORY_ONLY_METHOD``), per split."""
    from scipy import sparse

    from newsrec.eval.metrics import compute_metrics

    n_items = world.n_interest_items

    def bank(rng_a: int, rng_b: int) -> np.ndarray:
        user, item, weight = _draw_interests(np.random.default_rng([seed, rng_a]), world, n_bank,
                                             np.random.default_rng([seed, rng_b]))
        dense = np.zeros((n_bank, n_items))
        np.add.at(dense, (user, item), weight)
        return dense

    history_w = bank(30, 31)
    impression_w = history_w
    if world.knobs.drift > 0:
        impression_w = (1.0 - world.knobs.drift) * history_w + world.knobs.drift * bank(32, 33)

    # P[m, j]: probability that one history draw of a user with interests m picks old news j
    old = np.flatnonzero(world.news_day <= 0)
    hw = world.history_weight[old]
    mix = np.zeros(6)
    mix[: len(world.knobs.mix())] = world.knobs.mix()
    global_p = hw / hw.sum()
    prob = np.zeros((n_bank, len(old)))
    fallback = np.full(n_bank, mix[3])  # "anything popular", and every draw that finds no interest
    off = world.level_offsets
    for level, source in ((0, 0), (1, 1), (2, 2), (3, 4), (4, 5)):
        if mix[source] == 0:
            continue
        group, pair_news, n_groups = _history_groups(world, old, level)
        if n_groups == 0:
            fallback += mix[source]
            continue
        level_w = history_w[:, off[level]: off[level] + n_groups]
        total = level_w.sum(axis=1)
        normalised = level_w / np.where(total > 0, total, 1.0)[:, None]
        group_sum = np.bincount(group, hw[pair_news], minlength=n_groups)
        fallback += mix[source] * ((total <= 0) + normalised[:, group_sum == 0].sum(axis=1))
        within = sparse.csr_matrix((hw[pair_news] / group_sum[group], (group, pair_news)), shape=(n_groups, len(old)))
        prob += mix[source] * np.asarray((within.T @ normalised.T).T)
    prob += fallback[:, None] * global_p[None, :]
    log_prob = np.log(np.maximum(prob, 1e-300)).astype(np.float32)
    del prob

    # log-likelihood of each user's history under each draw: (users x old news counts) @ log P^T
    users = np.unique(np.concatenate([a["user"] for a in splits.values()]).astype(np.int64))
    lo, hi = world.history_offsets[users], world.history_offsets[users + 1]
    lengths = hi - lo
    owner = np.repeat(np.arange(len(users)), lengths)
    positions = np.searchsorted(old, world.history_news[np.repeat(lo, lengths) + _rank_within(owner, len(users))])
    counts = sparse.csr_matrix((np.ones(len(owner), np.float32), (owner, positions)), shape=(len(users), len(old)))
    log_lik = np.asarray(counts @ log_prob.T, dtype=np.float64)  # [users, bank]
    weights = np.exp(log_lik - log_lik.max(axis=1, keepdims=True))
    weights /= weights.sum(axis=1, keepdims=True)
    ess = 1.0 / (weights ** 2).sum(axis=1)
    top = min(HISTORY_TOP, n_bank)
    top_draw = np.argpartition(-weights, top - 1, axis=1)[:, :top]
    top_weight = np.take_along_axis(weights, top_draw, axis=1)
    left_out = 1.0 - top_weight.sum(axis=1)
    top_weight /= top_weight.sum(axis=1, keepdims=True)

    out: dict[str, Any] = {"history_only": {}, "history_only_popularity": {}}
    noise = world.model.noise_std
    for split, arrays in splits.items():
        news, inverse = np.unique(arrays["news"].astype(np.int64), return_inverse=True)
        owner, item = world.news_items(news)
        membership = sparse.csr_matrix((np.ones(len(owner)), (item, owner)), shape=(n_items, len(news)))
        affinity = np.asarray((membership.T @ impression_w.T).T)  # [bank, news]
        user_row = np.searchsorted(users, arrays["user"].astype(np.int64))
        candidate_user = np.repeat(user_row, np.diff(arrays["offsets"]))
        alone = np.empty(len(inverse))
        with_popularity = np.empty(len(inverse))
        for start in range(0, len(inverse), 20_000):
            sl = slice(start, start + 20_000)
            logit = affinity[top_draw[candidate_user[sl]], inverse[sl, None]] + world.bias  # [c, top]
            w = top_weight[candidate_user[sl]]
            alone[sl] = (w * oracle_probability(logit, noise)).sum(axis=1)
            with_popularity[sl] = (w * oracle_probability(logit + arrays["rest"][sl, None], noise)).sum(axis=1)
        out["history_only"][split] = compute_metrics(arrays["label"], alone, arrays["offsets"])
        out["history_only_popularity"][split] = compute_metrics(arrays["label"], with_popularity, arrays["offsets"])
    out["history_only_method"] = HISTORY_ONLY_METHOD.format(bank=n_bank, top=top)
    out["history_only_effective_draws"] = {"mean": float(ess.mean()), "median": float(np.median(ess)),
                                           "mean_weight_left_out": float(left_out.mean()),
                                           "max_weight_left_out": float(left_out.max())}
    return out


def _relation_vectors(seed: int) -> str:
    rng = np.random.default_rng([seed, 8])
    relations = ("P31", "P279", "P17", "P131", "P106", "P27", "P54", "P641", "P136", "P495", "P361", "P150")
    vectors = rng.normal(0, 0.08, (len(relations), ENTITY_DIM))
    return "".join(r + "\t" + "\t".join(f"{v:.6f}" for v in vec) + "\n" for r, vec in zip(relations, vectors))


def _truth_frame(world: _World, result: _SplitResult) -> tuple[pl.DataFrame, dict[str, np.ndarray]]:
    chunks = result.chunks
    arrays = {
        "offsets": np.concatenate([[0], np.cumsum(np.concatenate([c.counts for c in chunks]), dtype=np.int64)]),
        "news": np.concatenate([c.news for c in chunks]),
        "probability": np.concatenate([c.probability for c in chunks]),
        "label": np.concatenate([c.label for c in chunks]),
        "user": np.concatenate([c.user for c in chunks]),
        "rest": np.concatenate([c.rest for c in chunks]),
    }
    offsets_all = arrays["offsets"]
    frame = pl.DataFrame({
        "impression_id": np.concatenate(result.impression_ids),
        "user_id": pl.Series(world.user_ids, dtype=pl.String).gather(arrays["user"]),
        "candidates": _csr_lists(world.news_id_text.gather(arrays["news"]), offsets_all),
        "probability": _csr_lists(pl.Series(arrays["probability"]), offsets_all),
        "label": _csr_lists(pl.Series(arrays["label"]), offsets_all),
    })
    return frame, arrays


def _users_frame(world: _World) -> pl.DataFrame:
    names = np.array(world.category_names + world.subcategory_names + world.topic_names + list(world.entity_ids)
                     + [f"text{k}" for k in range(world.n_text_topics)], dtype=object)
    level_names = np.array(["category", "subcategory", "topic", "entity", "text_topic"])

    def per_user(user: np.ndarray, item: np.ndarray, weight: np.ndarray, prefix: str) -> pl.DataFrame:
        level = level_names[np.searchsorted(np.array(world.level_offsets), item, side="right") - 1]
        interests = pl.DataFrame({"user": user, "level": level, "interest": names[item].astype(str),
                                  "weight": weight.astype(np.float32)})
        return interests.group_by("user", maintain_order=True).agg(
            pl.col("level").alias(f"{prefix}interest_level"), pl.col("interest").alias(f"{prefix}interest"),
            pl.col("weight").alias(f"{prefix}interest_weight"))
    users = pl.DataFrame({
        "user": np.arange(world.size.n_users),
        "user_id": world.user_ids.astype(str),
        "kind": np.array(["returning", "new_in_dev", "new_in_test"])[world.user_group],
        "activity": world.user_activity.astype(np.float32),
        "history_len": np.diff(world.history_offsets).astype(np.int32),
    })
    users = users.join(per_user(world.interest_user, world.interest_item, world.interest_weight, ""),
                       on="user", how="left")
    if world.impression_interests is not None:  # drift: the interests behind impression-period clicks
        users = users.join(per_user(*world.impression_interests, "impression_"), on="user", how="left")
    return users.sort("user").drop("user")


def _news_frame(world: _World, splits: dict[str, _SplitResult]) -> pl.DataFrame:
    day_zero = np.datetime64(FIRST_DAY - timedelta(days=1), "us")
    return pl.DataFrame({
        "news_id": world.news_ids.astype(str),
        "category": np.array(world.category_names, dtype=object)[world.news_category].astype(str),
        "subcategory": np.array(world.subcategory_names, dtype=object)[world.news_subcategory].astype(str),
        "topic": world.news_topic.astype(np.int32),
        "publish_time": day_zero + (world.news_time * 1e6).astype("timedelta64[us]"),
        "popularity": world.news_popularity.astype(np.float32),
        "exposure_weight": world.news_exposure.astype(np.float32),
        **{f"in_{split}": result.referenced_news for split, result in splits.items()},
        **({"text_topic": world.news_text_topic.astype(np.int32)} if world.news_text_topic is not None else {}),
    })


_GROUND_TRUTH_README = """Ground truth of a generated MIND-format data set (newsrec synth).

{split}_truth.parquet   one row per {split} impression, in file order: impression_id, user_id,
                        candidates (as listed), probability (true click probability of each
                        candidate, hidden noise integrated out), label (the sampled click; for test
                        these are the labels the test zip leaves out, to score a submission locally)
users.parquet           user_id, kind (returning / new_in_dev / new_in_test), activity, history_len,
                        interest_level / interest / interest_weight (the sparse interests)
news.parquet            news_id, category, subcategory, topic, publish_time, popularity (the
                        click-through latent), exposure_weight, in_<split> (listed in that news.tsv)
oracle_metrics.json     AUC / MRR / nDCG@5 / nDCG@10 of ranking by the true probability, dev and test
history_only_metrics.json  the same metrics of scores that see only the user's history (a posterior
                        over the interests given the history; method and effective draws inside),
                        alone (history_only) and with the news' true popularity and freshness
                        terms (history_only_popularity)
summary.json            sizes, click rates, history lengths, cold-start shares, the click model, the
                        world's knobs, oracle and history-only metrics
users.parquet (drift)   also impression_interest_*: the interests behind impression-period clicks
news.parquet (text)     also text_topic: the latent text topic of worlds that have them
"""


def resolve_size(size: str | SynthSize) -> SynthSize:
    """A named size (tiny, small, medium, large) or a custom ``SynthSize``."""
    if isinstance(size, SynthSize):
        return size
    if size not in SIZES:
        raise NewsrecError(f"synth: unknown size {size!r} (valid: {', '.join(SIZES)})")
    return SIZES[size]


def generate(out_dir: str | Path, *, size: str | SynthSize = "small", seed: int = 0, world: str | World = "default",
             news_path: str | Path | None = None, model: ClickModel = ClickModel(),
             history_bank: int = HISTORY_BANK) -> dict[str, Any]:
    """Write ``MINDsynth_{train,dev,test}.zip`` and ``ground_truth/`` into ``out_dir``.

    ``world`` names a world of ``newsrec.data.worlds`` (or several joined by ``+``); ``news_path`` (a
    MIND news.tsv, a folder or a zip) simulates users over real news instead of generated ones, the
    sizes scaled to the news available (``RealNewsWorld.size_for``).

    Returns a summary: counts per split, click rates, history-length quantiles, cold-start shares,
    ``oracle`` = {"dev": metrics, "test": metrics} (``newsrec.eval.metrics.compute_metrics`` of the
    true probabilities) and ``history_only`` / ``history_only_popularity`` (the same metrics for
    scores that see only the history, see ``HISTORY_ONLY_METHOD``). The same seed gives
    byte-identical zips.
    """
    from newsrec.eval.metrics import compute_metrics

    spec = resolve_size(size)
    knobs = resolve_world(world)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise NewsrecError(f"synth: seed={seed!r} must be a non-negative integer")
    real = None
    if news_path is not None:
        real = RealNewsWorld(read_real_news(news_path))
        spec = real.size_for(spec)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    world = _build_world(spec, model, seed, knobs, real)
    impressions = _Impressions(world)
    world.bias = _calibrate_bias(impressions, seed, model.click_rate, min(spec.train_impressions, 20_000))
    time_text = _time_tables()
    results: dict[str, _SplitResult] = {}
    total = sum(spec.impressions(s) for s in SPLIT_DAYS)
    with progress(total=total, desc="synth impressions", unit="imp") as bar:
        for split in SPLIT_DAYS:
            bar.set_postfix_str(split)
            results[split] = _write_split(out_dir, split, world, impressions, world.bias, seed, time_text, bar)

    train_news = results["train"].referenced_news
    oracle: dict[str, dict[str, Any]] = {}
    summary_splits: dict[str, dict[str, Any]] = {}
    truth_arrays: dict[str, dict[str, np.ndarray]] = {}
    with atomic_dir(out_dir / "ground_truth") as truth_dir:
        for split, result in results.items():
            info = {"impressions": result.impressions, "candidates": result.candidates,
                    "clicks": result.clicks, "click_rate": result.clicks / max(result.candidates, 1),
                    "mean_candidates": result.candidates / max(result.impressions, 1),
                    "news_listed": int(result.referenced_news.sum())}
            if split != "train":
                frame, arrays = _truth_frame(world, result)
                frame.write_parquet(truth_dir / f"{split}_truth.parquet")
                oracle[split] = compute_metrics(arrays["label"], arrays["probability"], arrays["offsets"])
                truth_arrays[split] = arrays
                cold = ~train_news[arrays["news"]]
                info["cold_candidate_share"] = float(cold.mean())
                info["cold_news"] = int(np.unique(arrays["news"][cold]).size)
                info["new_user_share"] = float(np.mean(world.user_group[arrays["user"]] > 0))
            summary_splits[split] = info
        limits = _history_only(world, truth_arrays, seed, history_bank)
        _users_frame(world).write_parquet(truth_dir / "users.parquet")
        _news_frame(world, results).write_parquet(truth_dir / "news.parquet")
        history_lengths = np.diff(world.history_offsets)
        summary = {
            "size": spec.name, "seed": seed, "world": knobs.name, "out_dir": str(out_dir),
            "news_source": real.news.label if real is not None else None,
            "zips": {split: str(out_dir / f"MINDsynth_{split}.zip") for split in SPLIT_DAYS},
            "ground_truth": str(out_dir / "ground_truth"),
            "users": spec.n_users, "news": len(world.news_ids),
            "categories": len(world.category_names), "subcategories": len(world.subcategory_names),
            "topics": len(world.topic_subcategory),
            "history_len": {"median": float(np.median(history_lengths)),
                            "p99": float(np.percentile(history_lengths, 99)),
                            "max": int(history_lengths.max()),
                            "empty_share": float(np.mean(history_lengths == 0))},
            "splits": summary_splits,
            "oracle": oracle,
            **limits,
            "click_model": {**asdict(model), "bias": world.bias},
            "world_knobs": asdict(knobs),
            "size_spec": asdict(spec),
        }
        write_json(truth_dir / "oracle_metrics.json", {**oracle, "click_model": summary["click_model"]})
        write_json(truth_dir / "history_only_metrics.json", limits)
        write_json(truth_dir / "summary.json", summary)
        (truth_dir / "README.txt").write_text(_GROUND_TRUTH_README.replace("{split}", "<split>"), encoding="utf-8")
    return summary

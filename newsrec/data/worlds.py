"""Worlds of the synthetic generator: what drives clicks and what drives showing.

A world is a small frozen set of knobs on top of ``ClickModel`` (``newsrec.data.synth``); worlds
compose with ``+`` (``cold-test+uniform-exposure``) when they set different knobs.

===================  ==========================================  ==========================================
world                what drives clicks                          what drives showing
===================  ==========================================  ==========================================
default              category/subcategory/topic interests,       exposure weight = Zipf popularity; the
                     popularity, freshness                       last three days' news
cold-test            as default                                  dev/test show only news published after
                                                                 the training period (days 6-7)
uniform-exposure     as default (popularity moves clicks only)   uniform over the day's pool
entity-interest      interests in entities (WikidataIds) weigh   as default
                     most; taxonomy interests a third; title
                     entities Zipf-frequent across categories
drift                as default, but impression-period           as default
                     interests are (1-d) history-period
                     interests + d fresh ones (d = 0.6)
text-topics          latent text topics (words of title and      as default
                     abstract) weigh most; category and
                     subcategory a fifth, so a cold news is
                     placed by its text
===================  ==========================================  ==========================================

User histories are drawn from the history-period interests with the world's ``history_mix``
(category, subcategory, topic, anything popular, entity, text topic). In ``uniform-exposure`` the
history draw is tilted by the click-through term ``exp(popularity_scale * popularity)`` instead of
the exposure weight.

Real text (``read_real_news``): a MIND news.tsv (file, folder or zip) gives the news, their ids,
text, categories, subcategories and entities; its latent text topics come from NMF over TF-IDF of
title + abstract (seeded), its fine topics are the (subcategory, text topic) pairs.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np

from newsrec.data import mind
from newsrec.errors import DataError, NewsrecError

# history_mix order: category, subcategory, topic, anything popular, entity, text topic
_DEFAULT_MIX = (0.15, 0.25, 0.4, 0.2, 0.0, 0.0)


@dataclass(frozen=True)
class World:
    """Knobs of a world (see the module docstring)."""

    name: str = "default"
    exposure: str = "popularity"  # "popularity": shown ∝ Zipf exposure; "uniform": uniform over the pool
    cold_test: bool = False  # dev/test candidates only from news published after the training days
    level_scale: tuple[float, float, float] = (1.0, 1.0, 1.0)  # × category/subcategory/topic scales
    entity_scale: float = 0.0  # mean weight of an entity interest (0: users follow no entities)
    text_topic_scale: float = 0.0  # mean weight of a text-topic interest (0: none)
    history_mix: tuple[float, ...] = _DEFAULT_MIX
    drift: float = 0.0  # share of impression-period interest weight that is new

    @property
    def uses_entities(self) -> bool:
        return self.entity_scale > 0

    @property
    def uses_text_topics(self) -> bool:
        return self.text_topic_scale > 0

    def mix(self) -> np.ndarray:
        """History-draw source probabilities; the last two only when a world uses them."""
        mix = np.array(self.history_mix, dtype=np.float64)
        return mix if mix[4:].any() else mix[:4]


WORLDS: dict[str, World] = {
    "default": World(),
    "cold-test": World("cold-test", cold_test=True),
    "uniform-exposure": World("uniform-exposure", exposure="uniform"),
    "entity-interest": World("entity-interest", level_scale=(0.33, 0.33, 0.33), entity_scale=3.0,
                             history_mix=(0.05, 0.05, 0.1, 0.2, 0.6, 0.0)),
    "drift": World("drift", drift=0.6),
    "text-topics": World("text-topics", level_scale=(0.2, 0.2, 0.5), text_topic_scale=3.0,
                         history_mix=(0.03, 0.03, 0.09, 0.2, 0.0, 0.65)),
}


def resolve_world(world: str | World) -> World:
    """A world by name, or several joined by ``+`` whose knobs do not conflict."""
    if isinstance(world, World):
        return world
    names = [part.strip() for part in str(world).split("+")]
    unknown = [n for n in names if n not in WORLDS]
    if unknown:
        raise NewsrecError(f"synth: unknown world {unknown[0]!r} (valid: {', '.join(WORLDS)}; "
                           f"combine with '+')")
    base = World()
    merged: dict[str, object] = {}
    for name in names:
        for f in fields(World):
            if f.name == "name":
                continue
            value = getattr(WORLDS[name], f.name)
            if value != getattr(base, f.name):
                if f.name in merged and merged[f.name] != value:
                    raise NewsrecError(f"synth: worlds {world!r} conflict on {f.name}")
                merged[f.name] = value
    return replace(base, name="+".join(names) if names != ["default"] else "default", **merged)


# ---------------------------------------------------------------------------------------------
# real text


@dataclass
class RealNews:
    """News of a real MIND news.tsv, in file order."""

    label: str
    ids: list[str]
    category: list[str]
    subcategory: list[str]
    text: list[str]  # title + " " + abstract
    rows: list[str]  # the news.tsv lines as read (BOM and CR removed)
    entities: list[list[str]]  # WikidataIds of title and abstract entities, first occurrence order


def _news_source(path: str | Path) -> mind.SourceFile:
    path = Path(path)
    if not path.exists():
        raise DataError(path, "not found; expected a MIND news.tsv, a folder holding one, or a MIND zip")
    if path.is_file() and not zipfile.is_zipfile(path):
        return mind.SourceFile(path.parent, None, path.name)
    if path.is_dir():
        hits = sorted(p for p in path.rglob(mind.NEWS_FILE) if len(p.relative_to(path).parts) <= 2)
        if len(hits) != 1:
            raise DataError(path, f"holds {len(hits)} news.tsv files at its root or in one subfolder; expected one")
        return mind.SourceFile(hits[0].parent, None, hits[0].name)
    with zipfile.ZipFile(path) as archive:
        hits = sorted(n for n in archive.namelist() if n.rsplit("/", 1)[-1] == mind.NEWS_FILE
                      and n.count("/") <= 1 and not n.startswith("__MACOSX"))
    if len(hits) != 1:
        raise DataError(path, f"holds {len(hits)} news.tsv files at its root or in one subfolder; expected one")
    return mind.SourceFile(path, hits[0], mind.NEWS_FILE)


def read_real_news(path: str | Path, *, min_news: int = 50) -> RealNews:
    """Read a MIND news.tsv with the project's reader (bad rows fail with file and line)."""
    source = _news_source(path)
    table = mind.read_news(source)
    frame = table.frame
    if frame.height < min_news:
        raise DataError(source.label, f"holds {frame.height} news; a world needs at least {min_news}")
    lines = mind.read_lines(source).frame
    text_by_line = dict(zip(lines["line_no"].to_list(), lines["text"].to_list()))
    rows = [text_by_line[n] for n in frame["line_no"].to_list()]
    entities = [list(dict.fromkeys((t or []) + (a or [])))
                for t, a in zip(frame["title_entities"].to_list(), frame["abstract_entities"].to_list())]
    titles = frame["title"].fill_null("").to_list()
    abstracts = frame["abstract"].fill_null("").to_list()
    return RealNews(label=source.label, ids=frame["news_id"].to_list(), category=frame["category"].to_list(),
                    subcategory=frame["subcategory"].to_list(),
                    text=[f"{t} {a}".strip() for t, a in zip(titles, abstracts)], rows=rows, entities=entities)


def text_topics(texts: list[str], seed: int, n_topics: int | None = None) -> tuple[np.ndarray, int]:
    """(topic int64 [n], number of topics): argmax of NMF over TF-IDF of the texts, seeded.

    ``n_topics`` defaults to one per ~100 news, 2..20. A text with no usable words gets topic 0.
    """
    from sklearn.decomposition import NMF
    from sklearn.feature_extraction.text import TfidfVectorizer

    n_topics = n_topics or int(np.clip(len(texts) // 100, 2, 20))
    try:
        matrix = TfidfVectorizer(stop_words="english", min_df=2, max_df=0.5, sublinear_tf=True).fit_transform(texts)
    except ValueError:  # too few texts for min_df/max_df to leave any word
        matrix = TfidfVectorizer(sublinear_tf=True).fit_transform(texts)
    n_topics = max(1, min(n_topics, matrix.shape[1] - 1, matrix.shape[0] - 1))
    weights = NMF(n_components=n_topics, init="nndsvda", random_state=seed, max_iter=1000).fit_transform(matrix)
    return weights.argmax(axis=1).astype(np.int64), n_topics

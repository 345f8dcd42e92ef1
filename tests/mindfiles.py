"""Writes MIND-format files for tests, byte for byte as the official data set lays them out.

news.tsv: ``NewsID \\t Category \\t SubCategory \\t Title \\t Abstract \\t URL \\t TitleEntities \\t
AbstractEntities``; behaviors.tsv: ``ImpressionID \\t UserID \\t Time \\t History \\t Impressions``
with times as ``11/15/2019 8:55:22 AM`` and candidates ``N1-1`` (labelled) or ``N1`` (test);
entity_embedding.vec: ``Q42 \\t v1 \\t ... \\t vD \\t`` (MIND's lines end with a tab).
"""
from __future__ import annotations

import datetime as dt
import json
import zipfile
from pathlib import Path
from typing import Iterable, Sequence

BASE_TIME = dt.datetime(2019, 11, 15, 8, 55, 22)


def entity_json(entities: Iterable[tuple[str, float]]) -> str:
    """[(WikidataId, confidence)] → MIND's JSON list with all six fields."""
    return json.dumps([{"Label": f"Label {wid}", "Type": "P", "WikidataId": wid, "Confidence": conf,
                        "OccurrenceOffsets": [0], "SurfaceForms": [f"surface {wid}"]}
                       for wid, conf in entities])


def news_row(news_id: str, *, category: str = "news", subcategory: str = "newsus",
             title: str | None = None, abstract: str = "",
             title_entities: Sequence[tuple[str, float]] = (),
             abstract_entities: Sequence[tuple[str, float]] = ()) -> str:
    title = f'Title of {news_id} with "quotes"' if title is None else title
    return "\t".join([news_id, category, subcategory, title, abstract,
                      f"https://assets.msn.com/labs/mind/{news_id}.html",
                      entity_json(title_entities) if title_entities else "[]",
                      entity_json(abstract_entities) if abstract_entities else "[]"])


def format_time(when: dt.datetime) -> str:
    """MIND's time format: month/day/year, 12-hour clock without a leading zero, AM/PM."""
    hour = when.hour % 12 or 12
    return f"{when.month}/{when.day}/{when.year} {hour}:{when.minute:02d}:{when.second:02d} " \
           f"{'AM' if when.hour < 12 else 'PM'}"


def behaviors_row(impression_id: int | str, user_id: str, history: Sequence[str],
                  candidates: Sequence[tuple[str, int]] | Sequence[str], *,
                  when: dt.datetime | str = BASE_TIME) -> str:
    """candidates: [(news_id, label)] for a labelled split, [news_id] for the test split."""
    tokens = [c if isinstance(c, str) else f"{c[0]}-{c[1]}" for c in candidates]
    time_text = when if isinstance(when, str) else format_time(when)
    return "\t".join([str(impression_id), user_id, time_text, " ".join(history), " ".join(tokens)])


def entity_row(wikidata_id: str, vector: Sequence[float]) -> str:
    return wikidata_id + "\t" + "\t".join(f"{v:.6f}" for v in vector) + "\t"


def write_split(dest: str | Path, *, news: Sequence[str], behaviors: Sequence[str],
                entities: Sequence[str] | None = None, as_zip: bool = False, subfolder: str | None = None,
                bom: bool = False, crlf: bool = False, final_newline: bool = True,
                raw_behaviors: bytes | None = None, raw_news: bytes | None = None) -> Path:
    """Write one split. ``dest`` is the folder (or, with ``as_zip``, the zip file) to create;
    ``subfolder`` puts the files one level down, as the official zips do. ``raw_*`` replace a
    file's bytes entirely (for malformed inputs)."""
    dest = Path(dest)
    eol = "\r\n" if crlf else "\n"

    def encode(rows: Sequence[str]) -> bytes:
        text = eol.join(rows) + (eol if final_newline and rows else "")
        return (b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8")

    files = {"news.tsv": raw_news if raw_news is not None else encode(news),
             "behaviors.tsv": raw_behaviors if raw_behaviors is not None else encode(behaviors)}
    if entities is not None:
        files["entity_embedding.vec"] = encode(entities)
    prefix = f"{subfolder}/" if subfolder else ""
    if as_zip:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for name, data in files.items():
                zf.writestr(prefix + name, data)
    else:
        folder = dest / subfolder if subfolder else dest
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (folder / name).write_bytes(data)
    return dest


def standard_corpus(root: str | Path, *, as_zip: bool = False, **kwargs) -> dict[str, Path]:
    """A small, fully known corpus: train (N1..N6), dev (N4..N8, N4 redefined), test (N7..N9,
    unlabelled). Returns {"train": path, "dev": path, "test": path}."""
    root = Path(root)
    train_news = [news_row("N1", title="Stocks rise, markets cheer!", category="finance",
                           subcategory="markets", title_entities=[("Q1", 0.9)]),
                  news_row("N2", title='The "big" game tonight', category="sports", subcategory="nfl"),
                  news_row("N3", title="Stocks fall", category="finance", subcategory="markets",
                           abstract="Markets fell sharply.", abstract_entities=[("Q2", 0.5), ("Q1", 1.0)]),
                  news_row("N4", title="Weather: rain again", category="weather", subcategory="local"),
                  news_row("N5", title="Game recap", category="sports", subcategory="nba"),
                  news_row("N6", title="Cooking with rain water", category="food", subcategory="recipes")]
    dev_news = [news_row("N4", title="A redefinition that must be ignored", category="other"),
                news_row("N5", title="Game recap", category="sports", subcategory="nba"),
                news_row("N7", title="Brand new zyzzyva story", category="science", subcategory="space"),
                news_row("N8", title="Stocks rise again", category="finance", subcategory="markets")]
    test_news = [news_row("N7", title="Brand new zyzzyva story", category="science", subcategory="space"),
                 news_row("N9", title="Unseen words only", category="lifestyle", subcategory="travel")]
    t0 = BASE_TIME
    train_behaviors = [
        behaviors_row(1, "U1", ["N1", "N2"], [("N3", 1), ("N4", 0), ("N5", 0)], when=t0),
        behaviors_row(2, "U2", [], [("N1", 0), ("N2", 1)], when=t0 + dt.timedelta(hours=5)),
        behaviors_row(3, "U1", ["N1", "N2", "N3"], [("N6", 0), ("N5", 1), ("N3", 1)],
                      when=t0 - dt.timedelta(hours=1)),
    ]
    dev_behaviors = [
        behaviors_row(10, "U1", ["N1", "N2", "N3", "N5"], [("N7", 1), ("N8", 0)],
                      when=t0 + dt.timedelta(days=1, hours=6)),
        behaviors_row(11, "U3", [], [("N4", 0), ("N8", 1), ("N5", 0)], when=t0 + dt.timedelta(days=1)),
    ]
    test_behaviors = [
        behaviors_row(20, "U4", ["N7"], ["N9", "N7"], when=t0 + dt.timedelta(days=2)),
        behaviors_row(21, "U1", ["N1", "N5"], ["N9"], when=t0 + dt.timedelta(days=2, hours=13)),
    ]
    entities = [entity_row("Q1", [0.1, 0.2, 0.3]), entity_row("Q2", [-1.0, 0.0, 1.5])]
    ext = ".zip" if as_zip else ""
    return {
        "train": write_split(root / f"train{ext}", news=train_news, behaviors=train_behaviors,
                             entities=entities, as_zip=as_zip, **kwargs),
        "dev": write_split(root / f"dev{ext}", news=dev_news, behaviors=dev_behaviors, as_zip=as_zip,
                           **kwargs),
        "test": write_split(root / f"test{ext}", news=test_news, behaviors=test_behaviors, as_zip=as_zip,
                            **kwargs),
    }

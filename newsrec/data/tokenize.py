"""Title tokeniser and vocabulary, vectorised with polars.

Words are runs of word characters; the punctuation marks ``. , ! ? ; |`` are tokens of their own
(the tokenisation of the NRMS/MIND reference code). The vocabulary is built once, on the train
split's titles, and shared by dev and test: dev/test words unseen in train map to ``<unk>``.

Only titles feed the vocabulary. The model encodes titles alone, so abstract words would add
embedding rows that are never looked up (MIND abstracts hold several times more distinct words than
titles), inflating the embedding matrix and any GloVe file alignment for no gain.
"""
from __future__ import annotations

import numpy as np
import polars as pl

from newsrec.data.schema import PAD, PAD_WORD, UNK, UNK_WORD

TOKEN_PATTERN = r"[\w]+|[.,!?;|]"


def tokenize(texts: pl.Series, *, lowercase: bool) -> pl.Series:
    """Texts [n] → list[str] [n] of tokens (null text → empty list)."""
    texts = texts.fill_null("")
    if lowercase:
        texts = texts.str.to_lowercase()
    return texts.str.extract_all(TOKEN_PATTERN).fill_null([])


def build_vocabulary(token_lists: pl.Series, *, min_word_count: int, max_vocab: int) -> list[str]:
    """Words of ``token_lists`` seen at least ``min_word_count`` times, most frequent first (ties
    broken alphabetically, so the result is deterministic). ``max_vocab`` > 0 keeps only that many
    words besides ``<pad>`` (index 0) and ``<unk>`` (index 1)."""
    counts = (pl.DataFrame({"word": token_lists.explode()}).drop_nulls()
              .group_by("word").len(name="count")
              .filter(pl.col("count") >= min_word_count)
              .filter(~pl.col("word").is_in([PAD_WORD, UNK_WORD]))
              .sort(["count", "word"], descending=[True, False]))
    if max_vocab > 0:
        counts = counts.head(max_vocab)
    return [PAD_WORD, UNK_WORD, *counts["word"].to_list()]


def encode_tokens(token_lists: pl.Series, vocab: list[str], *, length: int) -> np.ndarray:
    """list[str] [n] → int32 [n, length]: the first ``length`` tokens as vocabulary indices,
    ``UNK`` for unknown words, right-padded with ``PAD``."""
    n = len(token_lists)
    out = np.full((n, length), PAD, dtype=np.int32)
    if n == 0:
        return out
    frame = pl.DataFrame({"tokens": token_lists}).with_row_index("row").explode("tokens").drop_nulls("tokens")
    frame = frame.with_columns(pos=pl.int_range(pl.len()).over("row")).filter(pl.col("pos") < length)
    ids = frame["tokens"].replace_strict(vocab, np.arange(len(vocab), dtype=np.int32), default=UNK,
                                         return_dtype=pl.Int32)
    out[frame["row"].to_numpy(), frame["pos"].to_numpy()] = ids.to_numpy()
    return out

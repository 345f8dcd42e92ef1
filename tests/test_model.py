"""Encoders, NewsRecommender and model save/load on tiny odd-sized configs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from newsrec.config import Config, ModelConfig, config_from_dict
from newsrec.data import schema
from newsrec.data.artifact import DatasetArtifact
from newsrec.errors import ArtifactError
from newsrec.models.inputs import NewsInputs
from newsrec.inference.model_io import MANIFEST_FILE, WEIGHTS_FILE, build_model, check_compatible, load_model, save_model
from newsrec.models.recommender import NewsRecommender

VOCAB, N_CAT, N_SUB, TITLE_LEN, EMB, HIDDEN, HEADS = 41, 4, 6, 7, 10, 12, 3


def _cfg(**kw: object) -> ModelConfig:
    # the deep path alone unless a test asks for the category-lift block (tested on its own below)
    base = dict(embedding_dim=EMB, hidden_size=HIDDEN, num_heads=HEADS, pooling_hidden=5, dropout=0.0,
                category_lift=False)
    base.update(kw)
    return ModelConfig(**base)  # type: ignore[arg-type]


def _model(**kw: object) -> NewsRecommender:
    torch.manual_seed(0)
    max_history = int(kw.pop("max_history", 50))  # type: ignore[call-overload]
    return NewsRecommender(_cfg(**kw), vocab_size=VOCAB, n_categories=N_CAT, n_subcategories=N_SUB,
                           max_history=max_history).eval()


def _titles(batch: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(2, VOCAB, (batch, TITLE_LEN), generator=g)
    lengths = torch.tensor([7, 3, 1, 5, 0][:batch])
    tokens[torch.arange(TITLE_LEN)[None, :] >= lengths[:, None]] = 0
    return tokens


def _history(batch: int = 4, n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    vectors = torch.randn(batch, n, HIDDEN, generator=g)
    lengths = torch.tensor([6, 2, 0, 4][:batch])
    mask = torch.arange(n)[None, :] < lengths[:, None]
    vectors[~mask] = 0
    return vectors, mask


@pytest.mark.parametrize("encoder", ["fastformer", "mhsa"])
def test_shapes_and_finiteness(encoder: str) -> None:
    model = _model(encoder=encoder)
    titles = _titles()
    cat, sub = torch.tensor([0, 1, 2, 3, 1]), torch.tensor([0, 5, 4, 3, 1])
    news = model.encode_news(titles, cat, sub)
    assert news.shape == (5, HIDDEN) and model.news_dim == HIDDEN
    assert torch.isfinite(news).all()  # row 4 is a title of only padding
    hist, mask = _history()
    users = model.encode_user(hist, mask)
    assert users.shape == (4, HIDDEN) and torch.isfinite(users).all()
    cands = torch.randn(4, 9, HIDDEN)
    scores = model.score(users, cands)
    assert scores.shape == (4, 9)
    torch.testing.assert_close(scores, torch.einsum("bd,bcd->bc", users, cands))


def test_category_lift_block_shapes_masks_and_empty_history() -> None:
    torch.manual_seed(0)
    base_cat = np.array([0.0, 0.5, 0.3, 0.2])
    base_sub = np.array([0.0, 0.1, 0.2, 0.3, 0.2, 0.2])
    model = NewsRecommender(_cfg(category_lift=True), vocab_size=VOCAB, n_categories=N_CAT,
                            n_subcategories=N_SUB, max_history=8, category_base=base_cat,
                            subcategory_base=base_sub).eval()
    assert model.news_dim == HIDDEN + N_CAT + N_SUB
    cat, sub = torch.tensor([0, 1, 2, 3, 1]), torch.tensor([0, 5, 4, 3, 1])
    news = model.encode_news(_titles(), cat, sub)
    assert news.shape == (5, model.news_dim)
    torch.testing.assert_close(news[:, HIDDEN:HIDDEN + N_CAT], torch.nn.functional.one_hot(cat, N_CAT).float())
    torch.testing.assert_close(news[:, HIDDEN + N_CAT:], torch.nn.functional.one_hot(sub, N_SUB).float())
    # histories of news 1, 2, 1 / nothing; junk beyond the mask changes nothing
    hist = torch.stack([news[[1, 2, 1, 4]], news[[3, 3, 3, 3]]])
    mask = torch.tensor([[True, True, True, False], [False] * 4])
    users = model.encode_user(hist, mask)
    assert users.shape == (2, model.news_dim)
    torch.testing.assert_close(users, model.encode_user(hist[:, :3], mask[:, :3]), rtol=0, atol=1e-6)
    a = model.cfg.category_lift_smoothing
    expected_cat = np.log((np.array([0, 2, 1, 0]) / 3 + a) / (base_cat + a))
    expected_cat[0] = 0.0  # the unknown category carries nothing
    torch.testing.assert_close(users[0, HIDDEN:HIDDEN + N_CAT], torch.tensor(expected_cat, dtype=torch.float32))
    assert torch.count_nonzero(users[1, HIDDEN:]) == 0  # an empty history: no lift
    with pytest.raises(ValueError, match="base rates"):
        NewsRecommender(_cfg(category_lift=True), vocab_size=VOCAB, n_categories=N_CAT, n_subcategories=N_SUB,
                        category_base=np.ones(N_CAT + 1), subcategory_base=base_sub)


@pytest.mark.parametrize("encoder", ["fastformer", "mhsa"])
@pytest.mark.parametrize("position_embeddings", [False, True])
def test_encode_user_invariant_to_right_padding(encoder: str, position_embeddings: bool) -> None:
    model = _model(encoder=encoder, position_embeddings=position_embeddings, max_history=8)
    hist, mask = _history()
    longer = torch.cat([hist, torch.randn(4, 5, HIDDEN)], dim=1)  # junk in the padding
    longer_mask = torch.cat([mask, torch.zeros(4, 5, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(model.encode_user(longer, longer_mask), model.encode_user(hist, mask),
                               rtol=0, atol=1e-6)


def test_empty_history_gives_learned_vector() -> None:
    model = _model()
    hist, mask = _history()
    users = model.encode_user(hist, mask)
    torch.testing.assert_close(users[2], model.user_encoder.empty_history.detach())
    assert not torch.allclose(users[0], users[2])


def test_position_embeddings_follow_recency() -> None:
    model = _model(position_embeddings=True, max_history=5)
    seen: list[torch.Tensor] = []
    model.user_encoder.stack.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    hist, mask = _history(n=6)
    model.encode_user(hist, mask)
    table = model.user_encoder.position_embedding.weight.detach()
    added = seen[0] - hist
    lengths = mask.sum(1).tolist()
    for b, length in enumerate(lengths):
        for i in range(length):
            recency = min(length - 1 - i, 4)  # 0 = most recent; clamped at max_history - 1
            torch.testing.assert_close(added[b, i], table[recency])


def test_news_encoder_padding_and_categories() -> None:
    model = _model()
    titles = _titles()
    wider = torch.cat([titles, torch.zeros(5, 4, dtype=torch.long)], dim=1)
    torch.testing.assert_close(model.encode_news(wider), model.encode_news(titles), rtol=0, atol=1e-6)
    cat, sub = torch.tensor([0, 1, 2, 3, 1]), torch.tensor([0, 5, 4, 3, 1])
    with_cat = model.encode_news(titles, cat, sub)
    no_cat = model.encode_news(titles)  # None = the "<unk>" category 0
    enc = model.news_encoder
    torch.testing.assert_close(with_cat - no_cat,
                               enc.category_embedding(cat) + enc.subcategory_embedding(sub)
                               - enc.category_embedding.weight[0] - enc.subcategory_embedding.weight[0])
    plain = _model(use_category=False)
    assert plain.news_encoder.category_embedding is None
    assert model.n_params() - plain.n_params() == (N_CAT + N_SUB) * HIDDEN


def test_user_num_layers_and_mhsa_same_code_path() -> None:
    one, three = _model(num_layers=1), _model(num_layers=1, user_num_layers=3)
    assert len(three.user_encoder.stack.order) == 3 and len(three.news_encoder.stack.order) == 1
    per_layer = sum(p.numel() for p in one.user_encoder.stack.parameters())
    assert three.n_params() - one.n_params() == 2 * per_layer
    mhsa = _model(encoder="mhsa")
    assert type(mhsa.news_encoder) is type(one.news_encoder)
    assert mhsa.user_encoder.stack.kind == "mhsa" and one.user_encoder.stack.kind == "fastformer"


def test_init_std_and_zero_bias() -> None:
    model = NewsRecommender(_cfg(init_std=0.05, hidden_size=240, num_heads=8), vocab_size=3000,
                            n_categories=N_CAT, n_subcategories=N_SUB)
    emb = model.news_encoder.word_embedding.weight.detach()
    assert torch.all(emb[0] == 0)
    assert abs(emb[1:].std().item() - 0.05) < 0.003
    q = model.news_encoder.stack.layers[0].attention.query
    assert torch.all(q.bias == 0) and abs(q.weight.std().item() - 0.05) < 0.005


def test_glove_init_copies_vectors_and_checks_shape() -> None:
    vectors = np.random.default_rng(0).normal(size=(VOCAB, EMB)).astype(np.float32)
    model = NewsRecommender(_cfg(freeze_embeddings=True), vocab_size=VOCAB, n_categories=N_CAT,
                            n_subcategories=N_SUB, word_vectors=vectors)
    weight = model.news_encoder.word_embedding.weight
    expected = vectors.copy()
    expected[1] = 0  # <unk> never trains without word dropout: zero, not a random vector
    np.testing.assert_array_equal(weight.detach().numpy(), expected)
    assert not weight.requires_grad
    with_dropout = NewsRecommender(_cfg(word_dropout=0.1), vocab_size=VOCAB, n_categories=N_CAT,
                                   n_subcategories=N_SUB, word_vectors=vectors)
    np.testing.assert_array_equal(with_dropout.news_encoder.word_embedding.weight.detach().numpy()[1], vectors[1])
    assert model.n_params(trainable_only=True) == model.n_params() - VOCAB * EMB
    with pytest.raises(ArtifactError, match="embedding_dim"):
        NewsRecommender(_cfg(), vocab_size=VOCAB, n_categories=N_CAT, n_subcategories=N_SUB,
                        word_vectors=vectors[:, :8])


# ---------------------------------------------------------------------------------------------
# save / load


def _write_dataset(root: Path, *, vocab: list[str] | None = None, with_vectors: bool = True) -> DatasetArtifact:
    root.mkdir(parents=True, exist_ok=True)
    vocab = vocab or [schema.PAD_WORD, schema.UNK_WORD] + [f"w{i}" for i in range(VOCAB - 2)]
    (root / schema.VOCAB).write_text(json.dumps({"words": vocab}))
    cats = {"category": ["<unk>"] + [f"c{i}" for i in range(N_CAT - 1)],
            "subcategory": ["<unk>"] + [f"s{i}" for i in range(N_SUB - 1)]}
    (root / schema.CATEGORIES).write_text(json.dumps(cats))
    tokens = np.zeros((4, TITLE_LEN), dtype=np.int32)
    tokens[1:, :3] = [[2, 3, 4], [5, 6, 0], [7, 0, 0]]
    np.save(root / schema.TITLE_TOKENS, tokens)
    pl.DataFrame(schema=schema.NEWS_SCHEMA).write_parquet(root / schema.NEWS)
    if with_vectors:
        rng = np.random.default_rng(1)
        np.save(root / schema.WORD_VECTORS, rng.normal(size=(len(vocab), EMB)).astype(np.float32))
    (root / schema.MANIFEST).write_text(json.dumps({"schema_version": schema.SCHEMA_VERSION}))
    return DatasetArtifact(root)


def _config(**model: object) -> Config:
    base: dict[str, object] = dict(embedding_dim=EMB, hidden_size=HIDDEN, num_heads=HEADS, pooling_hidden=5,
                                   position_embeddings=True, share_layers=True, num_layers=2)
    base.update(model)
    return config_from_dict({"model": base, "data": {"title_len": TITLE_LEN, "history_len": 9}})


def _outputs(model: NewsRecommender) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        news = model.encode_news(_titles(), torch.tensor([0, 1, 2, 3, 1]), torch.tensor([0, 5, 4, 3, 1]))
        _, mask = _history()
        hist = news[torch.tensor([[1, 2, 3, 1, 4, 0], [3, 1, 0, 0, 0, 0], [0] * 6, [2, 2, 4, 1, 0, 0]])]
        return news, model.encode_user(hist, mask)


@pytest.mark.parametrize("encoder,interests", [("fastformer", 1), ("mhsa", 1), ("fastformer", 4)])
def test_save_load_round_trip(tmp_path: Path, encoder: str, interests: int) -> None:
    dataset = _write_dataset(tmp_path / "data")
    config = _config(encoder=encoder, user_interests=interests)
    torch.manual_seed(0)
    model = build_model(config, dataset).eval()
    np.testing.assert_array_equal(model.news_encoder.word_embedding.weight.detach().numpy()[2:],
                                  dataset.word_vectors[2:])
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "checkpoint.keep").write_text("untouched")
    save_model(tmp_path / "model", model, config, dataset=dataset, extra={"auc": 0.7, "run_id": "abc"})
    loaded = load_model(tmp_path / "model")
    assert not loaded.model.training
    assert loaded.config == config
    assert loaded.manifest["extra"] == {"auc": 0.7, "run_id": "abc"}
    assert loaded.manifest["vocab_size"] == VOCAB and loaded.manifest["title_len"] == TITLE_LEN
    assert loaded.manifest["n_categories"] == N_CAT and loaded.manifest["n_subcategories"] == N_SUB
    assert loaded.manifest["n_params"] == model.n_params()
    assert (tmp_path / "model" / "checkpoint.keep").read_text() == "untouched"
    for a, b in zip(_outputs(model), _outputs(loaded.model)):
        assert torch.equal(a, b)
    assert _outputs(loaded.model)[1].shape == (4, model.news_dim + (interests - 1) * HIDDEN)
    check_compatible(loaded.manifest, dataset)


def test_load_refuses_bad_folders(tmp_path: Path) -> None:
    dataset = _write_dataset(tmp_path / "data", with_vectors=False)
    config = _config()
    model = build_model(config, dataset)
    out = tmp_path / "model"
    save_model(out, model, config, dataset=dataset)

    manifest = json.loads((out / MANIFEST_FILE).read_text())
    manifest["schema_version"] = 999
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="schema version 999"):
        load_model(out)

    save_model(out, model, config, dataset=dataset)
    raw = bytearray((out / WEIGHTS_FILE).read_bytes())
    raw[-1] ^= 0xFF
    (out / WEIGHTS_FILE).write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="sha256"):
        load_model(out)

    (out / WEIGHTS_FILE).unlink()
    with pytest.raises(ArtifactError, match="model.safetensors is missing"):
        load_model(out)
    with pytest.raises(ArtifactError, match="not found"):
        load_model(tmp_path / "nowhere")


def test_check_compatible_detects_other_vocabulary(tmp_path: Path) -> None:
    dataset = _write_dataset(tmp_path / "a")
    config = _config()
    save_model(tmp_path / "model", build_model(config, dataset), config, dataset=dataset)
    manifest = load_model(tmp_path / "model").manifest
    other_words = [schema.PAD_WORD, schema.UNK_WORD] + [f"x{i}" for i in range(VOCAB - 2)]
    other = _write_dataset(tmp_path / "b", vocab=other_words)
    with pytest.raises(ArtifactError, match="vocab_sha256"):
        check_compatible(manifest, other)


def test_build_model_rejects_mismatched_word_vectors(tmp_path: Path) -> None:
    dataset = _write_dataset(tmp_path / "data")
    with pytest.raises(ArtifactError, match="embedding_dim"):
        build_model(_config(embedding_dim=EMB + 2), dataset)


# ---------------------------------------------------------------------------------------------
# word dropout, entities and view combination


def _news(titles: torch.Tensor, entities: torch.Tensor | None = None) -> NewsInputs:
    b = titles.shape[0]
    return NewsInputs(category=torch.arange(b) % N_CAT, subcategory=torch.arange(b) % N_SUB, title_tokens=titles,
                      entities=entities)


def test_word_dropout_replaces_words_by_unk_only_while_training() -> None:
    model = _model(word_dropout=0.5)
    seen: list[torch.Tensor] = []
    model.news_encoder.word_embedding.register_forward_hook(lambda m, args, out: seen.append(args[0].clone()))
    titles = _titles()
    model.train()
    model.encode_news(titles)
    dropped = seen[-1]
    real = titles != 0
    assert torch.all(dropped[~real] == 0)  # padding stays padding
    assert torch.all((dropped[real] == titles[real]) | (dropped[real] == 1))
    assert 0.2 < (dropped[real] == 1).float().mean().item() < 0.8
    model.eval()
    model.encode_news(titles)
    assert torch.equal(seen[-1], titles)


ENTITIES = torch.tensor([[3, 5, 0], [0, 0, 0], [2, 0, 0], [7, 7, 1], [0, 0, 0]])


@pytest.mark.parametrize("views", ["sum", "attention"])
def test_entities_are_a_view_padding_invariant(views: str) -> None:
    torch.manual_seed(0)
    model = NewsRecommender(_cfg(use_entities=True, entity_dim=6, news_views=views), vocab_size=VOCAB,
                            n_categories=N_CAT, n_subcategories=N_SUB, n_entities=9).eval()
    titles = _titles()
    with torch.no_grad():
        base = model.encode_news(_news(titles, ENTITIES))
        wider = model.encode_news(_news(titles, torch.cat([ENTITIES, torch.zeros(5, 2, dtype=torch.long)], 1)))
        torch.testing.assert_close(wider, base, rtol=0, atol=1e-6)
        other = model.encode_news(_news(titles, torch.tensor([[4, 0, 0], [0, 0, 0], [2, 0, 0], [7, 7, 1], [0, 0, 0]])))
        assert not torch.allclose(other[0], base[0]) and torch.allclose(other[1:], base[1:])
        enc = model.news_encoder
        text = enc._title(_news(titles))
        cat = enc.category_embedding(torch.arange(5) % N_CAT)
        sub = enc.subcategory_embedding(torch.arange(5) % N_SUB)
        if views == "sum":  # a news without entities: title + categories, nothing else
            torch.testing.assert_close(base[1], text[1] + cat[1] + sub[1])
        else:  # view attention over the views present: a convex combination of them
            stacked = torch.stack([text[1], cat[1], sub[1]])
            weights = torch.softmax(enc.view_pooling.score(torch.tanh(enc.view_pooling.proj(stacked))), dim=0)
            torch.testing.assert_close(base[1], (weights * stacked).sum(0))
    with pytest.raises(ArtifactError, match="title entities"):
        model.encode_news(_news(titles))


def test_pretrained_entity_vectors_are_loaded_frozen() -> None:
    vectors = np.random.default_rng(1).normal(size=(9, 6)).astype(np.float32)
    model = NewsRecommender(_cfg(use_entities=True), vocab_size=VOCAB, n_categories=N_CAT, n_subcategories=N_SUB,
                            n_entities=9, entity_vectors=vectors)
    weight = model.news_encoder.entity_embedding.weight
    np.testing.assert_array_equal(weight.detach().numpy()[1:], vectors[1:])
    assert not weight[0].any() and not weight.requires_grad
    assert model.news_encoder.entity_projection.weight.requires_grad


# ---------------------------------------------------------------------------------------------
# the title-match block (model.title_match_dim)


def _numpy_tfidf(titles: np.ndarray) -> np.ndarray:
    """Plain numpy: L2-normalised term-count × smoothed-idf rows [n, VOCAB] of the titles with a
    known word (ids > 1)."""
    titles = titles[(titles > 1).any(axis=1)]
    counts = np.zeros((len(titles), VOCAB))
    for i, title in enumerate(titles):
        for word in title[title > 1]:
            counts[i, word] += 1
    df = (counts > 0).sum(axis=0)
    idf = np.log((1 + len(titles)) / (1 + df)) + 1
    idf[:2] = 0
    rows = counts * idf
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def _match_titles() -> np.ndarray:
    g = np.random.default_rng(5)
    titles = g.integers(2, 12, size=(30, TITLE_LEN))  # a small vocabulary: words recur
    titles[g.random(titles.shape) < 0.3] = 0
    titles[3] = 0  # a title of padding only
    titles[4, :2] = 1  # unknown words weigh nothing
    return titles


def test_title_tfidf_matches_scikit_learn() -> None:
    from sklearn.feature_extraction.text import TfidfVectorizer

    from newsrec.data.features import title_tfidf

    titles = _match_titles()
    matrix, idf = title_tfidf(titles, VOCAB)
    docs = [[str(w) for w in t if w > 1] for t in titles if (t > 1).any()]
    fitted = TfidfVectorizer(analyzer=lambda words: words, smooth_idf=True).fit(docs)
    for word, column in fitted.vocabulary_.items():
        assert idf[int(word)] == pytest.approx(fitted.idf_[column])
    assert idf[0] == 0 and idf[1] == 0  # <pad>, <unk>
    np.testing.assert_allclose(matrix.toarray(), _numpy_tfidf(titles), atol=1e-12)


def _history_of(model: NewsRecommender, titles: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        news = model.encode_news(torch.from_numpy(titles[:6]))
    return news[torch.tensor([[0, 1, 5, 2]])], torch.tensor([[True, True, True, False]])


def test_title_match_block_is_the_weighted_lsa_cosine() -> None:
    """The news block is the title's TF-IDF row projected on the top right singular vectors of all
    titles' TF-IDF matrix (numpy's exact SVD here), normalised; the wide dot product is
    weight / spread × the mean cosine with the history's blocks, and an untrained block (weight 0)
    scores exactly as the model without it."""
    from newsrec.data.features import title_match_vectors

    titles, k = _match_titles(), 6
    vectors = title_match_vectors(titles, VOCAB, k)
    assert vectors.shape == (VOCAB, k)
    few = title_match_vectors(titles[:3], VOCAB, k)  # three titles hold two components, the rest are zero
    assert np.count_nonzero(few[:, :2]) > 0 and np.count_nonzero(few[:, 2:]) == 0
    torch.manual_seed(0)
    model = NewsRecommender(_cfg(title_match_dim=k, category_lift=True), vocab_size=VOCAB, n_categories=N_CAT,
                            n_subcategories=N_SUB, max_history=8, title_match_vectors=vectors).eval()
    start = HIDDEN + N_CAT + N_SUB
    assert model.news_dim == start + k
    tokens = torch.from_numpy(titles[:6])
    untrained = model.score(model.encode_user(*_history_of(model, titles)), model.encode_news(torch.from_numpy(titles[:6]))[None])
    torch.manual_seed(0)
    without = NewsRecommender(_cfg(category_lift=True), vocab_size=VOCAB, n_categories=N_CAT,
                              n_subcategories=N_SUB, max_history=8).eval()
    torch.testing.assert_close(untrained, without.score(without.encode_user(*_history_of(without, titles)),
                                                        without.encode_news(torch.from_numpy(titles[:6]))[None]))
    with torch.no_grad():
        model.title_match.weight.fill_(0.7 / model.title_match.WEIGHT_GAIN)
        model.title_match.spread.fill_(0.2)
        news = model.encode_news(tokens, torch.zeros(6, dtype=torch.long), torch.zeros(6, dtype=torch.long))
        hist = torch.stack([news[[0, 1, 5, 2]], news[[2, 2, 2, 2]]])
        mask = torch.tensor([[True, True, True, False], [False] * 4])
        users = model.encode_user(hist, mask)
    tfidf = _numpy_tfidf(titles)
    _, _, vt = np.linalg.svd(tfidf, full_matrices=False)
    kept = [i for i in range(6) if (titles[i] > 1).any()]
    assert kept == [0, 1, 2, 4, 5]  # tfidf has rows for titles with a known word only: its rows 0..4
    projected = tfidf[:5] @ vt[:k].T
    projected /= np.linalg.norm(projected, axis=1, keepdims=True)
    block = news[:, start:].numpy()[kept]
    np.testing.assert_allclose(block @ block.T, projected @ projected.T, atol=1e-4)  # same subspace, signs aside
    assert torch.count_nonzero(news[3, start:]) == 0  # a title of padding only
    wide = (users[:, start:] @ news[:, start:].T).numpy()  # (2 users, 6 news)
    cosines = news[:, start:].numpy() @ news[:, start:].numpy().T
    np.testing.assert_allclose(wide[0], 0.7 / 0.2 * cosines[[0, 1, 5]].mean(axis=0), atol=1e-5)
    assert np.count_nonzero(wide[1]) == 0  # an empty history: no match


def test_title_match_spread_is_the_centred_cosine_std_and_survives_save_load(tmp_path: Path) -> None:
    from newsrec.data.features import title_match_vectors
    from newsrec.models.recommender import TitleMatch

    dataset = _write_dataset(tmp_path / "data")
    tokens = np.asarray(dataset.title_tokens)
    match = TitleMatch(VOCAB, 2, word_vectors=title_match_vectors(tokens, VOCAB, 2))
    history, candidates = [np.array([1, 2]), np.array([], dtype=np.int64), np.array([3])], \
        [np.array([1, 2, 3]), np.array([1, 2]), np.array([1, 2])]
    match.set_spread(tokens, history, candidates)
    with torch.no_grad():
        blocks = match.news_block(torch.from_numpy(tokens.astype(np.int64))).numpy()
    centred = []
    for clicks, shown in ((history[0], candidates[0]), (history[2], candidates[2])):  # the empty history is skipped
        scores = blocks[shown] @ blocks[clicks].mean(axis=0)
        centred.append(scores - scores.mean())
    assert float(match.spread) == pytest.approx(np.concatenate(centred).std(ddof=1), rel=1e-5)

    config = _config(title_match_dim=2)
    model = build_model(config, dataset).eval()
    assert torch.count_nonzero(model.title_match.word_vectors) > 0
    with torch.no_grad():
        model.title_match.spread.fill_(0.05)
        model.title_match.weight.fill_(0.13)
    save_model(tmp_path / "model", model, config, dataset=dataset)
    loaded = load_model(tmp_path / "model").model
    assert float(loaded.title_match.spread) == pytest.approx(0.05)
    torch.testing.assert_close(loaded.title_match.word_vectors, model.title_match.word_vectors)
    for a, b in zip(_outputs(model), _outputs(loaded)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("encoder", ["fastformer", "mhsa"])
def test_large_batches_are_encoded_in_length_sorted_calls_like_one_news_at_a_time(encoder: str) -> None:
    from newsrec.models.encoders import LENGTH_CHUNK

    model = _model(encoder=encoder).train()  # dropout 0: training mode is deterministic
    n = LENGTH_CHUNK * 2 + 37
    g = torch.Generator().manual_seed(5)
    titles = torch.randint(2, VOCAB, (n, TITLE_LEN), generator=g)
    lengths = torch.randint(0, TITLE_LEN + 1, (n,), generator=g)
    titles[torch.arange(TITLE_LEN)[None, :] >= lengths[:, None]] = 0
    cat, sub = torch.arange(n) % N_CAT, torch.arange(n) % N_SUB
    weights = torch.randn(n, generator=g)
    together = model.encode_news(titles, cat, sub)
    (together.sum(dim=1) * weights).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    alone = torch.cat([model.encode_news(titles[i:i + 1], cat[i:i + 1], sub[i:i + 1]) for i in range(n)])
    (alone.sum(dim=1) * weights).sum().backward()
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        if name in grads:
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_dropout_keeps_each_element_with_probability_one_minus_p_and_rescales() -> None:
    from newsrec.models.attention import Dropout

    torch.manual_seed(0)
    drop = Dropout(0.2)
    x = torch.full((200_000,), 3.0, requires_grad=True)
    y = drop(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.8) < 0.005  # ~9 standard deviations
    torch.testing.assert_close(y[kept], torch.full((int(kept.sum()),), 3.0 / 0.8))
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / 0.8)
    assert drop(x).ne(y).any()  # a fresh mask per call
    assert drop.eval()(x) is x and Dropout(0.0).train()(x) is x
    with pytest.raises(ValueError):
        Dropout(1.0)


@pytest.mark.parametrize("encoder", ["fastformer", "mhsa"])
@torch.no_grad()
def test_interest_vectors_are_poly_attention_and_score_by_their_maximum(encoder: str) -> None:
    from newsrec.models.attention import AdditivePooling

    k = 3
    model = _model(encoder=encoder, user_interests=k, category_lift=True)
    one = _model(encoder=encoder, category_lift=True)
    assert one.user_dim == one.news_dim and model.news_dim == one.news_dim
    assert model.user_dim == model.news_dim + (k - 1) * HIDDEN
    with torch.no_grad():  # weights far from the near-uniform attention of initialisation
        for p in model.parameters():
            p.mul_(20.0)
        model.user_encoder.empty_history.normal_()
        model.category_lift.weight.fill_(0.7)
    titles = _titles()
    cat, sub = torch.tensor([0, 1, 2, 3, 1]), torch.tensor([0, 5, 4, 3, 1])
    news = model.encode_news(titles, cat, sub)  # (5, D)
    history = news[torch.tensor([[1, 2, 3, 0, 0, 0], [4, 4, 1, 2, 3, 0], [0, 0, 0, 0, 0, 0]])]
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    users = model.encode_user(history, mask)  # (3, U)
    assert users.shape == (3, model.user_dim)
    # each interest is a one-query additive pooling over the same layer outputs, with its own query
    pooled = model.user_encoder.pooling
    contextual = model.user_encoder.stack(history[..., :HIDDEN], mask)
    for i in range(k):
        single = AdditivePooling(HIDDEN, 5)
        single.proj.load_state_dict(pooled.proj.state_dict())
        single.score.weight.data = pooled.score.weight.data[i:i + 1].clone()
        single.score.bias.data = pooled.score.bias.data[i:i + 1].clone()
        expect = single(contextual, mask)
        torch.testing.assert_close(users[:2, i * HIDDEN:(i + 1) * HIDDEN], expect[:2])
        torch.testing.assert_close(users[2, i * HIDDEN:(i + 1) * HIDDEN], model.user_encoder.empty_history)
    # the interests differ, and the wide blocks follow the K deep parts once
    assert not torch.allclose(users[0, :HIDDEN], users[0, HIDDEN:2 * HIDDEN])
    wide = model.category_lift.user_block(history[..., HIDDEN:], mask)
    torch.testing.assert_close(users[:, k * HIDDEN:], wide)
    # score = the best of the K plain dot products; score_pool = score of every pair
    scores = model.score(users, news.unsqueeze(0).expand(3, -1, -1))  # (3, 5)
    for b in range(3):
        for c in range(5):
            dots = [float(torch.dot(torch.cat([users[b, i * HIDDEN:(i + 1) * HIDDEN], users[b, k * HIDDEN:]]),
                                    news[c])) for i in range(k)]
            assert float(scores[b, c]) == pytest.approx(max(dots), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(model.score_pool(users, news), scores)
    # the disagreement penalty: the mean cosine of two distinct interests (1 for the empty history)
    interests = [torch.nn.functional.normalize(users[:, i * HIDDEN:(i + 1) * HIDDEN], dim=-1) for i in range(k)]
    pairs = [(interests[i] * interests[j]).sum(-1) for i in range(k) for j in range(k) if i != j]
    torch.testing.assert_close(model.interest_overlap(users), torch.stack(pairs).mean(0))
    assert float(model.interest_overlap(users)[2]) == pytest.approx(1.0)
    assert not one.interest_overlap(users[:, :one.user_dim]).any()
    torch.testing.assert_close(one.score_pool(users[:, :one.user_dim], news),
                               one.score(users[:, :one.user_dim], news.unsqueeze(0).expand(3, -1, -1)))


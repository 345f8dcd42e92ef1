"""The PLM news encoder on a tiny random BERT written locally: token states computed once and cached
(equal to running the backbone directly), keyed by the backbone's identity; fine-tuned top blocks
equal the backbone's own; a model over cached states learns a known answer, saves, loads and scores
the same by the fast and the full path; fresh news go through the same backbone."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from newsrec.config import config_from_dict  # noqa: E402
from newsrec.data import plm  # noqa: E402
from newsrec.data.artifact import open_dataset  # noqa: E402
from newsrec.data.features import news_features  # noqa: E402
from newsrec.errors import ArtifactError, ConfigError  # noqa: E402
from newsrec.inference.scoring import encode_all_news, score_impressions, score_impressions_slow  # noqa: E402
from newsrec.models.inputs import NewsInputs  # noqa: E402
from newsrec.inference.model_io import build_model, load_model, save_model  # noqa: E402
from newsrec.train import fit  # noqa: E402
from tests.plm_fixtures import write_tiny_bert  # noqa: E402
from tests.train_fixtures import write_known_answer_artifact  # noqa: E402


def _words(dataset) -> list[str]:
    return sorted({w for title in dataset.news["title"].to_list() for w in title.split()})


@pytest.fixture(scope="module")
def known(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("plm")
    data = write_known_answer_artifact(root / "data")
    bert = write_tiny_bert(root / "bert", _words(open_dataset(data)))
    return data, bert


def _config(bert: Path, **model):
    opts = {"text_encoder": "plm", "plm_name": str(bert), "plm_max_len": 12, "plm_batch_size": 7,
            "hidden_size": 16, "num_heads": 4, "pooling_hidden": 16, "use_category": False, "dropout": 0.0}
    opts.update(model)
    return config_from_dict({"data": {"title_len": 8, "history_len": 6}, "model": opts,
                             "train": {"epochs": 4, "batch_size": 16, "lr": 0.01, "warmup_steps": 4,
                                       "early_stopping_patience": 0, "num_threads": 1},
                             "tracking": {"enabled": False}})


def test_states_are_the_backbones_and_computed_once(known, monkeypatch):
    from transformers import AutoModel, AutoTokenizer

    data, bert = known
    dataset = open_dataset(data)
    features = news_features(dataset, _config(bert), show_progress=False)
    states, lengths = features.text_states, features.text_lengths
    assert states.dtype == np.float16 and states.shape == (dataset.n_news + 1, 12, 24)
    assert not states[0].any() and lengths[0] == 0
    # independent: the backbone run on one title at a time
    tokenizer, model = AutoTokenizer.from_pretrained(bert), AutoModel.from_pretrained(bert).eval()
    titles = dict(zip(dataset.news["news_idx"].to_list(), dataset.news["title"].to_list()))
    for idx in (1, 7, dataset.n_news):
        enc = tokenizer(titles[idx], return_tensors="pt", truncation=True, max_length=12)
        with torch.no_grad():
            direct = model(**enc).last_hidden_state[0].numpy()
        n = direct.shape[0]
        assert lengths[idx] == n
        np.testing.assert_allclose(states[idx, :n].astype(np.float32), direct, atol=2e-3, rtol=2e-3)
        assert not states[idx, n:].any()
    # a second open uses the cache: the backbone is never loaded again for the same news
    monkeypatch.setattr(plm.TextBackbone, "__init__", lambda *a, **k: pytest.fail("backbone loaded again"))
    again = news_features(dataset, _config(bert), plm_fingerprint=features.plm_fingerprint)
    np.testing.assert_array_equal(np.asarray(again.text_states), np.asarray(states))
    # gather cuts the states to the longest title of the rows, with the mask
    rows = np.array([3, 1, 3])
    got = again.gather(rows)
    width = int(lengths[rows].max())
    assert got["text_states"].shape == (3, width, 24)
    np.testing.assert_array_equal(got["text_mask"], np.arange(width)[None, :] < lengths[rows][:, None])


def test_cache_is_keyed_by_the_backbone(known, tmp_path):
    data, bert = known
    dataset = open_dataset(data)
    first = news_features(dataset, _config(bert), show_progress=False)
    other = write_tiny_bert(tmp_path / "other", _words(dataset), seed=1)
    second = news_features(dataset, _config(other), show_progress=False)
    assert second.plm_fingerprint != first.plm_fingerprint
    assert not np.array_equal(np.asarray(second.text_states[1]), np.asarray(first.text_states[1]))
    # a model trained with the first backbone refuses states from another one
    fresh_copy = tmp_path / "copy"
    shutil.copytree(data, fresh_copy, ignore=shutil.ignore_patterns(plm.CACHE_DIR))
    with pytest.raises(ArtifactError, match="differs from the one the news encoder was trained with"):
        plm.cached_states(fresh_copy, ["a title"], name=str(other), max_len=12, fingerprint=first.plm_fingerprint)


def test_top_layers_equal_the_backbones_own(known):
    from transformers import AutoModel

    _, bert = known
    backbone = plm.TextBackbone(str(bert), max_len=12, finetune_layers=2)
    full = AutoModel.from_pretrained(bert).eval()
    texts = ["cat0w1 noise2 cat0w3", "noise1", "cat1w0 cat1w2 noise4 noise5 cat1w1"]
    below, lengths = backbone.states(texts)
    width = int(lengths.max())
    mask = torch.from_numpy(np.arange(width)[None, :] < lengths[:, None])
    top = backbone.top_layers().eval()
    with torch.no_grad():
        out = top(torch.from_numpy(below[:, :width].astype(np.float32)), mask)
        enc = backbone.tokenizer(texts, padding=True, return_tensors="pt")
        expected = full(**enc).last_hidden_state
    assert backbone.layer == 1 and backbone.total_layers == 3
    torch.testing.assert_close(out[mask], expected[mask], atol=5e-3, rtol=5e-3)


def test_plm_model_learns_a_known_answer_and_round_trips(known, tmp_path):
    data, bert = known
    result = fit(_config(bert), data_dir=data, out_dir=tmp_path / "model")
    # the titles alone carry the answer (no category view); a random backbone's states make it a
    # slower read than word embeddings (0.76 at 4 epochs when measured), far above chance
    assert result.metrics["auc"] >= 0.7, result.history
    loaded = load_model(tmp_path / "model")
    assert loaded.manifest["plm"]["fingerprint"] == loaded.model.plm_fingerprint
    dataset = open_dataset(data)
    dev = dataset.impressions("dev")
    fast = score_impressions(loaded.model, dataset, dev, history_len=6, batch_size=5, show_progress=False)
    rows = np.array([0, 3, 11])
    slow = score_impressions_slow(loaded.model, dataset, dev, rows, history_len=6)
    picked = np.concatenate([np.arange(dev.candidate_offsets[i], dev.candidate_offsets[i + 1]) for i in rows])
    np.testing.assert_allclose(fast[picked], slow, atol=1e-5, rtol=1e-5)


def _one_epoch(known, out: Path, **model):
    """(dataset, loaded model, its vectors of every news) after one epoch with these model settings."""
    data, bert = known
    config = _config(bert, **model)
    config.train.epochs = 1
    fit(config, data_dir=data, out_dir=out)
    dataset = open_dataset(data)
    loaded = load_model(out)
    return dataset, loaded, encode_all_news(loaded.model, dataset, batch_size=4, show_progress=False)


def _assert_fresh_news_encodes_alike(dataset, loaded, vectors, idx: int = 9) -> None:
    """A fresh news with a known news' title and category: same inputs, same vector."""
    features = news_features(dataset, loaded.config, plm_fingerprint=loaded.model.plm_fingerprint)
    title = dataset.news.filter(dataset.news["news_idx"] == idx)["title"][0]
    cat, sub = (int(a[idx]) for a in dataset.news_categories)
    with torch.no_grad():
        fresh = loaded.model.encode_news(NewsInputs.from_arrays(features.fresh([title], [cat], [sub])))
    torch.testing.assert_close(fresh[0], vectors[idx], atol=2e-3, rtol=2e-3)


def test_fine_tuned_top_layer_trains_saves_and_encodes_fresh_news_alike(known, tmp_path):
    dataset, loaded, vectors = _one_epoch(known, tmp_path / "model", plm_finetune_layers=1)
    original = plm.TextBackbone(str(known[1]), max_len=12, finetune_layers=1).top_layers()
    trained = loaded.model.news_encoder.plm_layers
    moved = [not torch.equal(a, b) for a, b in zip(original.state_dict().values(), trained.state_dict().values())]
    assert any(moved)  # the top block is trained, not frozen
    _assert_fresh_news_encodes_alike(dataset, loaded, vectors)  # same backbone, same vector


def test_title_match_reads_the_words_beside_the_plm_and_fresh_news_alike(known, tmp_path):
    from newsrec.data.features import title_match_vectors

    dataset, loaded, vectors = _one_epoch(known, tmp_path / "model", title_match_dim=4)
    assert loaded.model.news_dim == 16 + loaded.model.category_lift.width + 4
    # the last block is the title's normalised LSA row, as a words model's would be
    tokens = np.asarray(dataset.title_tokens)
    lsa = title_match_vectors(tokens, dataset.vocab_size, 4)[tokens].sum(axis=1)
    lsa /= np.maximum(np.linalg.norm(lsa, axis=1, keepdims=True), 1e-12)
    np.testing.assert_allclose(vectors[1:, -4:].numpy(), lsa[1:], atol=1e-5)
    _assert_fresh_news_encodes_alike(dataset, loaded, vectors)  # the PLM states and the title words alike


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="needs model.plm_name"):
        config_from_dict({"model": {"text_encoder": "plm"}})
    with pytest.raises(ConfigError, match="apply to model.text_encoder=plm only"):
        config_from_dict({"model": {"plm_finetune_layers": 2}})
    with pytest.raises(ConfigError, match="apply to model.text_encoder=words only"):
        config_from_dict({"model": {"text_encoder": "plm", "plm_name": "x", "word_dropout": 0.1}})


def test_unloadable_backbone_is_one_clear_error(known, tmp_path):
    data, _ = known
    with pytest.raises(ArtifactError, match="cannot load a Hugging Face model"):
        build_model(_config(tmp_path / "nothing-here"), open_dataset(data))


def test_save_refuses_nothing_and_load_checks_the_backbone(known, tmp_path):
    data, bert = known
    dataset = open_dataset(data)
    config = _config(bert, plm_finetune_layers=1)
    model = build_model(config, dataset)
    save_model(tmp_path / "m", model, config, dataset=dataset)
    other = write_tiny_bert(tmp_path / "other", _words(dataset), seed=5)
    (tmp_path / "m" / "config.yaml").write_text(
        (tmp_path / "m" / "config.yaml").read_text().replace(str(bert), str(other)))
    with pytest.raises(ArtifactError, match="differs from the PLM the model"):
        load_model(tmp_path / "m")

"""Training: learns a known answer, resumes exactly (epoch and mid-epoch), keeps the best epoch."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from newsrec.config import config_from_dict
from newsrec.errors import ArtifactError, ConfigError
from newsrec.models.inputs import NewsInputs
from newsrec.train import fit
from newsrec.train.checkpoint import load_checkpoint
from newsrec.train.loop import NRMSObjective, lr_multiplier
from tests.train_fixtures import write_known_answer_artifact

SMALL_MODEL = {"hidden_size": 32, "num_heads": 4, "embedding_dim": 32, "pooling_hidden": 32}


def _config(**train):
    opts = {"epochs": 2, "batch_size": 16, "lr": 0.003, "warmup_steps": 4, "num_workers": 1,
            "early_stopping_patience": 0, "eval_batch_size": 256,
            "num_threads": 1}
    opts.update(train)
    return config_from_dict({"data": {"title_len": 8, "history_len": 6}, "model": dict(SMALL_MODEL),
                             "train": opts, "tracking": {"enabled": False}})


@pytest.fixture(scope="module")
def known(tmp_path_factory) -> Path:
    return write_known_answer_artifact(tmp_path_factory.mktemp("known") / "data")


@pytest.fixture(scope="module")
def known_no_dev(tmp_path_factory) -> Path:
    root = write_known_answer_artifact(tmp_path_factory.mktemp("known_nodev") / "data", seed=1)
    (root / "behaviors-dev.parquet").unlink()
    return root


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def _assert_same_weights(a: Path, b: Path, tol: float = 1e-6) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.allclose(wa[name], wb[name], atol=tol, rtol=0), name


def test_learns_a_known_answer_to_high_dev_auc(known, tmp_path):
    result = fit(_config(epochs=3), data_dir=known, out_dir=tmp_path / "model")
    assert result.finished and result.best_epoch >= 0
    assert result.metrics["auc"] >= 0.9, result.history
    assert len(result.history) == 3
    # the saved model carries the best epoch's metrics
    import json
    manifest = json.loads((tmp_path / "model" / "model.json").read_text())
    assert manifest["extra"]["metrics"]["auc"] == pytest.approx(result.metrics["auc"])
    assert manifest["extra"]["best_epoch"] == result.best_epoch


def test_resume_after_an_epoch_equals_straight_training(known_no_dev, tmp_path):
    cfg = _config(epochs=2)
    straight = fit(cfg, data_dir=known_no_dev, out_dir=tmp_path / "straight")
    steps_per_epoch = straight.global_step // 2
    first = fit(cfg, data_dir=known_no_dev, out_dir=tmp_path / "resumed", stop_after_steps=steps_per_epoch)
    assert not first.finished and not (tmp_path / "resumed" / "model.safetensors").exists()
    state = load_checkpoint(tmp_path / "resumed" / "checkpoints")["state"]
    assert (state.epoch, state.batch_in_epoch, state.global_step) == (1, 0, steps_per_epoch)
    resumed = fit(cfg, data_dir=known_no_dev, out_dir=tmp_path / "resumed", resume=True)
    assert resumed.finished and resumed.global_step == straight.global_step
    _assert_same_weights(tmp_path / "straight", tmp_path / "resumed")
    # and the weights really moved: a different seed gives different weights
    other = fit(_config(epochs=2, seed=3), data_dir=known_no_dev, out_dir=tmp_path / "other")
    with pytest.raises(AssertionError):
        _assert_same_weights(tmp_path / "straight", other.model_dir)


def test_resume_from_a_mid_epoch_step_checkpoint(known, tmp_path):
    cfg = _config(epochs=2, checkpoint_every_steps=5)
    straight = fit(cfg, data_dir=known, out_dir=tmp_path / "straight")
    fit(cfg, data_dir=known, out_dir=tmp_path / "resumed", stop_after_steps=7)
    state = load_checkpoint(tmp_path / "resumed" / "checkpoints")["state"]
    assert state.epoch == 0 and state.batch_in_epoch == 7
    resumed = fit(cfg, data_dir=known, out_dir=tmp_path / "resumed", resume=True)
    _assert_same_weights(tmp_path / "straight", tmp_path / "resumed")
    assert resumed.metrics["auc"] == pytest.approx(straight.metrics["auc"], abs=1e-9)
    assert [h["epoch"] for h in resumed.history] == [0, 1]


def test_resume_refuses_changed_model_settings_and_missing_checkpoint(known_no_dev, tmp_path):
    with pytest.raises(ArtifactError, match="no checkpoint"):
        fit(_config(), data_dir=known_no_dev, out_dir=tmp_path / "m", resume=True)
    fit(_config(), data_dir=known_no_dev, out_dir=tmp_path / "m", stop_after_steps=2)
    changed = config_from_dict({"data": {"title_len": 8, "history_len": 6},
                                "model": {**SMALL_MODEL, "hidden_size": 64},
                                "train": {"batch_size": 16}, "tracking": {"enabled": False}})
    with pytest.raises(ConfigError, match="model.hidden_size"):
        fit(changed, data_dir=known_no_dev, out_dir=tmp_path / "m", resume=True)


def test_training_is_deterministic_on_cpu(known_no_dev, tmp_path):
    cfg = _config(epochs=1, max_steps=6)
    fit(cfg, data_dir=known_no_dev, out_dir=tmp_path / "a")
    fit(cfg, data_dir=known_no_dev, out_dir=tmp_path / "b")
    _assert_same_weights(tmp_path / "a", tmp_path / "b", tol=0.0)


def test_objective_masks_padding_candidates_and_matches_manual_softmax():
    class DotModel(torch.nn.Module):
        def encode_news(self, news):
            return news.title_tokens.float()

        def encode_user(self, vectors, mask):
            return (vectors * mask.unsqueeze(-1)).sum(1)

        def score(self, user, candidates):
            return torch.bmm(candidates, user.unsqueeze(-1)).squeeze(-1)

    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(-3, 4, (5, 3), generator=gen)  # 5 unique news, D = 3
    history_slots = torch.tensor([[1, 2, 0], [3, 0, 0]])
    history_mask = history_slots > 0
    candidate_slots = torch.tensor([[4, 5, 0], [1, 2, 3]])
    candidate_mask = torch.tensor([[True, True, False], [True, True, True]])
    news = NewsInputs(category=torch.zeros(5, dtype=torch.long), subcategory=torch.zeros(5, dtype=torch.long),
                      title_tokens=tokens)
    loss = NRMSObjective(DotModel())(news, history_slots, history_mask, candidate_slots, candidate_mask)
    table = torch.cat([torch.zeros(1, 3), tokens.float()])
    expected = 0.0
    for b in range(2):
        user = table[history_slots[b][history_mask[b]]].sum(0)
        logits = table[candidate_slots[b][candidate_mask[b]]] @ user
        expected += -(logits[0] - torch.logsumexp(logits, 0))
    assert torch.allclose(loss, expected)

    class TwoInterests(DotModel):  # the user's interests: its click sum and its last click
        def encode_user(self, vectors, mask):
            last = vectors[torch.arange(len(vectors)), mask.sum(1) - 1]
            return torch.cat([super().encode_user(vectors, mask), last], dim=-1)

        def score(self, users, candidates):
            return torch.maximum(super().score(users[:, :3], candidates), super().score(users[:, 3:], candidates))

        def interest_overlap(self, users):
            return torch.nn.functional.cosine_similarity(users[:, :3], users[:, 3:], dim=-1)

    model = TwoInterests()
    args = (news, history_slots, history_mask, candidate_slots, candidate_mask)
    plain = NRMSObjective(model)(*args)
    penalised = NRMSObjective(model, interest_disagreement=0.3)(*args)
    users = model.encode_user(table[history_slots], history_mask)
    assert float(model.interest_overlap(users).abs().sum()) > 0.1
    assert torch.allclose(penalised, plain + 0.3 * model.interest_overlap(users).sum())


def test_lr_schedule_warms_up_then_decays_to_zero():
    values = [lr_multiplier(s, warmup_steps=4, total_steps=12) for s in range(13)]
    assert values[:4] == [0.25, 0.5, 0.75, 1.0]
    assert values[4] == 1.0 and values[12] == 0.0
    assert np.all(np.diff(values[4:]) < 0)

"""The typed config: YAML fills it, overrides adjust it, bad keys and values fail clearly."""
from __future__ import annotations

import dataclasses

import pytest

from newsrec.config import Config, config_from_yaml_text, load_config
from newsrec.errors import ConfigError


def test_defaults_come_from_the_dataclasses():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.model.encoder == "fastformer"


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 7\n  lr: 0.001\nmodel:\n  encoder: mhsa\n")
    cfg = load_config(path, ["train.epochs=3", "model.num_heads=8", "train.bf16=true"])
    assert cfg.train.epochs == 3  # override wins over the file
    assert cfg.train.lr == pytest.approx(0.001)
    assert cfg.model.encoder == "mhsa"
    assert cfg.model.num_heads == 8
    assert cfg.train.bf16 is True
    assert cfg.data == Config().data  # untouched sections keep defaults


def test_unknown_key_lists_valid_ones():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.epoch=2"])
    msg = str(err.value)
    assert "train.epoch" in msg and "epochs" in msg and "batch_size" in msg


def test_unknown_section_and_bad_form(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("trian:\n  epochs: 2\n")
    with pytest.raises(ConfigError, match="unknown section 'trian'"):
        load_config(path)
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["epochs=2"])


def test_all_errors_reported_at_once():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.epoch=2", "model.hidden=3"])
    assert "train.epoch" in str(err.value) and "model.hidden" in str(err.value)


@pytest.mark.parametrize("override, fragment", [
    ("train.epochs=two", "expected an integer"),
    ("train.bf16=maybe", "expected true or false"),
    ("train.epochs=0", "must be > 0"),
    ("model.encoder=lstm", "expected one of fastformer, mhsa"),
    ("model.hidden_size=250", "divisible"),
    ("train.device=tpu", "expected one of"),
    ("model.dropout=1.5", "[0, 1)"),
    ("model.user_interests=0", "must be > 0"),
    ("model.interest_disagreement=0.5", "applies to model.user_interests > 1"),
])
def test_bad_values(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert fragment in str(err.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_yaml_round_trip():
    cfg = load_config(None, ["train.epochs=5", "model.encoder=mhsa"])
    assert config_from_yaml_text(cfg.to_yaml()) == cfg
    flat = cfg.flat()
    assert flat["train.epochs"] == 5
    assert len(flat) == sum(len(dataclasses.fields(f.type if isinstance(f.type, type) else
                                                   getattr(cfg, f.name)))
                            for f in dataclasses.fields(cfg))


def test_shipped_configs_load():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert configs, "configs/ is empty"
    for path in configs:
        if path.name == "plm.yaml":  # names no model: the user gives one
            with pytest.raises(ConfigError, match="needs model.plm_name"):
                load_config(path)
            assert load_config(path, ["model.plm_name=some/model"]).model.text_encoder == "plm"
            continue
        load_config(path)


def test_renamed_key_is_translated_in_saved_configs_and_named_in_user_configs(tmp_path):
    from newsrec.config import config_from_yaml_text, load_config

    saved = config_from_yaml_text("rerank:\n  refit_first_stage: false\n")
    assert saved.rerank.first_stage == "retriever"
    assert config_from_yaml_text("rerank:\n  refit_first_stage: true\n").rerank.first_stage == "refit"
    with pytest.raises(ConfigError, match="rerank.refit_first_stage was renamed rerank.first_stage"):
        load_config(None, ["rerank.refit_first_stage=true"])
    with pytest.raises(ConfigError, match="rerank.first_stage='sometimes'"):
        load_config(None, ["rerank.first_stage=sometimes"])

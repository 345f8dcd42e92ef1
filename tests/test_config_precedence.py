"""Config precedence: what a dataset artifact or a saved model fixes is refused when set otherwise,
taken from the artifact when left at its default, and recorded as used."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from newsrec.cli import main
from newsrec.config import (Config, apply_dataset, apply_saved_model, config_from_dict, load_config,
                            saved_model_config)
from newsrec.data.ingest import ingest
from newsrec.errors import ConfigError
from tests.mindfiles import standard_corpus

MANIFEST = {"title_len": 30, "options": {"title_len": 30, "lowercase": True, "min_word_count": 1,
                                         "max_vocab": 0, "on_bad_rows": "error", "missing_news": "error"}}
TINY = ["-o", "model.embedding_dim=8", "-o", "model.hidden_size=8", "-o", "model.num_heads=2",
        "-o", "model.pooling_hidden=4", "-o", "train.max_steps=1", "-o", "train.epochs=1",
        "-o", "tracking.enabled=false", "-o", "train.num_workers=0"]


def test_dataset_fixes_ingest_options():
    assert apply_dataset(Config(), MANIFEST, artifact="D").data.title_len == 30
    shorter = {**MANIFEST, "title_len": 12, "options": {**MANIFEST["options"], "title_len": 12}}
    assert apply_dataset(Config(), shorter, artifact="D").data.title_len == 12  # default: the artifact's
    same = config_from_dict({"data": {"title_len": 12}})
    assert apply_dataset(same, shorter, artifact="D").data.title_len == 12
    with pytest.raises(ConfigError, match=r"data.title_len=1: the dataset D was ingested with title_len=30"):
        apply_dataset(config_from_dict({"data": {"title_len": 1}}), MANIFEST, artifact="D")
    with pytest.raises(ConfigError, match=r"data.lowercase=False: the dataset D was ingested with lowercase=True"):
        apply_dataset(config_from_dict({"data": {"lowercase": False}}), MANIFEST, artifact="D")
    # settings the dataset does not fix pass through
    free = config_from_dict({"data": {"history_len": 7}, "train": {"epochs": 9}})
    out = apply_dataset(free, MANIFEST, artifact="D")
    assert (out.data.history_len, out.train.epochs) == (7, 9)
    assert apply_dataset(free, {}, artifact="D") == free  # an artifact without recorded options


def test_saved_model_fixes_model_and_data_and_takes_serving_settings():
    saved = config_from_dict({"data": {"title_len": 16, "history_len": 20},
                              "model": {"hidden_size": 64, "num_heads": 4}, "train": {"epochs": 1}})
    given = config_from_dict({"serve": {"max_k": 50, "port": 9000}, "index": {"ivf_nprobe": 8}})
    out = apply_saved_model(given, saved, artifact="M")
    assert (out.serve.max_k, out.serve.port, out.index.ivf_nprobe) == (50, 9000, 8)
    assert (out.data.title_len, out.model.hidden_size, out.train.epochs) == (16, 64, 1)
    # the same values as the model's, or defaults, are not errors
    apply_saved_model(config_from_dict({"model": {"hidden_size": 64}, "train": {"epochs": 1}}), saved,
                      artifact="M")
    with pytest.raises(ConfigError, match=r"data.title_len=5: the model M was trained with 16, which it fixes"):
        apply_saved_model(config_from_dict({"data": {"title_len": 5}}), saved, artifact="M")
    with pytest.raises(ConfigError, match=r"model.hidden_size=32: the model M was trained with 64"):
        apply_saved_model(config_from_dict({"model": {"hidden_size": 32, "num_heads": 4}}), saved,
                          artifact="M")
    with pytest.raises(ConfigError, match=r"train.epochs=7: not used here"):
        apply_saved_model(config_from_dict({"train": {"epochs": 7}}), saved, artifact="M")


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    root = tmp_path_factory.mktemp("prec")
    paths = standard_corpus(root / "raw")
    ingest(Config(), train=paths["train"], dev=paths["dev"], out_dir=root / "data")  # title_len 30
    return root


def test_train_refuses_a_title_len_the_dataset_does_not_have(ingested):
    runner = CliRunner()
    data = str(ingested / "data")
    r = runner.invoke(main, ["train", "--data", data, "--out", str(ingested / "m1"), *TINY,
                             "-o", "data.title_len=1"])
    assert r.exit_code == 1
    assert r.output.strip().splitlines()[-1] == (
        f"error: data.title_len=1: the dataset {data} was ingested with title_len=30, which it fixes; "
        f"drop the setting, or ingest again with -o data.title_len=1")
    demo = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    r = runner.invoke(main, ["train", "--data", data, "--out", str(ingested / "m2"), "-c", str(demo), *TINY])
    assert r.exit_code == 1 and "data.title_len=16: the dataset" in r.output
    assert not (ingested / "m1").exists() and not (ingested / "m2" / "config.yaml").exists()


def test_saved_config_records_what_was_used_and_serving_refuses_fixed_keys(ingested):
    runner = CliRunner()
    out = ingested / "m3"
    r = runner.invoke(main, ["train", "--data", str(ingested / "data"), "--out", str(out), *TINY])
    assert r.exit_code == 0, r.output
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["data"]["title_len"] == 30 and saved["model"]["hidden_size"] == 8
    config = saved_model_config(None, ["serve.max_k=70"], out)
    assert config.serve.max_k == 70 and config.model.hidden_size == 8
    with pytest.raises(ConfigError, match="data.title_len=12: the model"):
        saved_model_config(None, ["data.title_len=12"], out)
    r = runner.invoke(main, ["serve", "--model", str(out), "--index", str(ingested / "no-index"),
                             "-o", "model.hidden_size=16"])
    assert r.exit_code == 1 and "model.hidden_size=16: the model" in r.output
    assert load_config(None, ["serve.max_k=70"]).model.hidden_size != 8  # the defaults, for contrast


def test_bf16_only_where_it_pays(ingested, caplog):
    import torch

    from newsrec.train.distributed import bf16_pays, cpu_has_amx

    assert cpu_has_amx("flags : fpu avx2 amx_bf16 amx_tile") and not cpu_has_amx("flags : fpu avx2 avx512f")
    assert bf16_pays(torch.device("cpu"), amx=True) == (True, "")
    pays, why = bf16_pays(torch.device("cpu"), amx=False)
    assert not pays and why.startswith("train.bf16 off: this CPU has no AMX")
    if bf16_pays(torch.device("cpu"))[0]:
        pytest.skip("this CPU has AMX: bf16 stays on")
    out = ingested / "m-bf16"
    with caplog.at_level("WARNING", logger="newsrec.train"):
        r = CliRunner().invoke(main, ["train", "--data", str(ingested / "data"), "--out", str(out), *TINY,
                                      "-o", "train.bf16=true"])
    assert r.exit_code == 0, r.output
    assert any("train.bf16 off: this CPU has no AMX" in m for m in caplog.messages)
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["bf16"] is False  # what was used

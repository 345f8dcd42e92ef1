"""torchrun with 2 CPU processes (gloo) trains the same weights as one process on the same global batch."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from newsrec.config import config_from_dict
from newsrec.train import fit
from newsrec.train.distributed import DistContext, broadcast, setup
from tests.train_fixtures import write_known_answer_artifact

OVERRIDES = {"data.title_len": 8, "data.history_len": 6, "model.hidden_size": 32, "model.num_heads": 4,
             "model.embedding_dim": 32, "model.pooling_hidden": 32, "model.dropout": 0.0,
             "train.batch_size": 16, "train.lr": 0.003, "train.warmup_steps": 2, "train.max_steps": 5,
             "train.num_threads": 1, "train.eval_batch_size": 256, "tracking.enabled": "false",
             # the known answer is the category: with the category-lift block fitting it, the news
             # encoder's gradients shrink to where Adam turns rounding noise into steps (as for the
             # score bias below); the deep path's parity is what this test checks
             "model.category_lift": "false"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_train(data: Path, out: Path, overrides: dict) -> subprocess.CompletedProcess:
    """``newsrec train`` under torchrun with 2 CPU processes (gloo); it must succeed."""
    args = [a for k, v in overrides.items() for a in ("-o", f"{k}={v}")]
    env = dict(os.environ, NEWSREC_PROGRESS="0", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "newsrec", "train", "--data", str(data), "--out", str(out), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def single_process_config(overrides: dict) -> dict:
    """The same ``section.key`` overrides as a raw config dict for ``fit`` in this process."""
    raw: dict = {}
    for k, v in overrides.items():
        section, key = k.split(".")
        raw.setdefault(section, {})[key] = {"false": False, "true": True}.get(v, v) if isinstance(v, str) else v
    return raw


def test_two_process_torchrun_matches_single_process(tmp_path):
    data = write_known_answer_artifact(tmp_path / "data")
    proc = torchrun_train(data, tmp_path / "ddp", OVERRIDES)
    assert proc.stdout.count("model:") == 1  # only rank 0 reports and saves
    assert "dev (best epoch 1)" in proc.stdout

    raw = single_process_config(OVERRIDES)
    single = fit(config_from_dict(raw), data_dir=data, out_dir=tmp_path / "single")
    assert single.global_step == 5

    ddp = load_file(str(tmp_path / "ddp" / "model.safetensors"))
    one = load_file(str(tmp_path / "single" / "model.safetensors"))
    init = fit(config_from_dict({**raw, "train": {**raw["train"], "max_steps": 1, "lr": 1e-12}}),
               data_dir=data, out_dir=tmp_path / "init")
    moved = load_file(str(init.model_dir / "model.safetensors"))
    assert ddp.keys() == one.keys()
    for name in one:
        if name.endswith("score.bias"):
            # a bias added to every score before a softmax: its exact gradient is 0, so Adam turns
            # rounding noise into full-size steps; it never changes any output
            continue
        assert torch.allclose(ddp[name], one[name], atol=1e-5, rtol=0), name
    # training changed the weights well beyond that tolerance (the comparison is not vacuous)
    assert max((one[n] - moved[n]).abs().max().item() for n in one) > 1e-3


def test_single_process_context_without_torchrun(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    ctx = setup("cpu")
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.distributed) == (0, 1, True, False)
    assert broadcast({"stop": True}, DistContext(0, 1, 0, torch.device("cpu"))) == {"stop": True}

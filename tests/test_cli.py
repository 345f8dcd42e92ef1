"""The CLI contract of DESIGN.md: every command exists with --help; usage errors are one clear line."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from newsrec.cli import main

CONTRACT = [
    ["download"], ["synth"], ["ingest"], ["train"], ["evaluate"], ["submit"], ["score"], ["index"],
    ["recommend"], ["serve"], ["pipeline", "run"],
]


@pytest.mark.parametrize("command", CONTRACT, ids=lambda c: " ".join(c))
def test_every_contract_command_has_help(command):
    result = CliRunner().invoke(main, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def test_rerank_stage_needs_a_retriever(tmp_path):
    result = CliRunner().invoke(main, ["train", "--stage", "rerank", "--data", str(tmp_path),
                                       "--out", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert "--retriever" in result.output


def test_retriever_only_with_rerank_stage(tmp_path):
    result = CliRunner().invoke(main, ["train", "--retriever", str(tmp_path), "--data", str(tmp_path),
                                       "--out", str(tmp_path / "m")])
    assert result.exit_code == 2
    assert "only with --stage rerank" in result.output


def test_user_errors_are_one_line_without_traceback(tmp_path):
    result = CliRunner().invoke(main, ["train", "--data", str(tmp_path), "--out", str(tmp_path / "m"),
                                       "-o", "train.epoch=2"])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert "train.epoch" in result.output and "epochs" in result.output
    result = CliRunner().invoke(main, ["evaluate", "--model", str(tmp_path / "none"), "--data", str(tmp_path)])
    assert result.exit_code == 1 and "Traceback" not in result.output

"""Stage skipping: unchanged inputs and settings skip; a changed input, setting or --force reruns."""
from __future__ import annotations

from pipelines.core import StageRunner


def _stage(runner, tmp_path, calls, *, setting=1):
    src = tmp_path / "input.txt"
    out = tmp_path / "out"

    def work():
        calls.append(1)
        out.mkdir(exist_ok=True)
        (out / "result.txt").write_text(src.read_text() + str(setting))
        return {"setting": setting}

    return runner.run("double", output=out, inputs=[src], settings={"setting": setting}, fn=work)


def test_skips_unchanged_and_reruns_on_change(tmp_path):
    (tmp_path / "input.txt").write_text("a")
    calls: list[int] = []
    quiet = dict(echo=lambda _m: None)
    first = _stage(StageRunner(**quiet), tmp_path, calls)
    assert not first.skipped and len(calls) == 1
    second = _stage(StageRunner(**quiet), tmp_path, calls)
    assert second.skipped and len(calls) == 1 and second.info == {"setting": 1}
    _stage(StageRunner(**quiet), tmp_path, calls, setting=2)  # settings changed
    assert len(calls) == 2
    (tmp_path / "input.txt").write_text("b")  # input changed
    _stage(StageRunner(**quiet), tmp_path, calls, setting=2)
    assert len(calls) == 3
    _stage(StageRunner(force=True, **quiet), tmp_path, calls, setting=2)
    assert len(calls) == 4
    assert (tmp_path / "out" / "result.txt").read_text() == "b2"


def test_missing_output_reruns(tmp_path):
    import shutil

    (tmp_path / "input.txt").write_text("a")
    calls: list[int] = []
    _stage(StageRunner(echo=lambda _m: None), tmp_path, calls)
    shutil.rmtree(tmp_path / "out")
    _stage(StageRunner(echo=lambda _m: None), tmp_path, calls)
    assert len(calls) == 2


def test_downstream_sees_upstream_change(tmp_path):
    """A stage's fingerprint is its marker key, so a rerun upstream invalidates downstream."""
    (tmp_path / "input.txt").write_text("a")
    calls: list[int] = []
    quiet = dict(echo=lambda _m: None)
    down_calls: list[int] = []

    def downstream(runner):
        out2 = tmp_path / "out2"

        def work():
            down_calls.append(1)
            out2.mkdir(exist_ok=True)

        runner.run("down", output=out2, inputs=[tmp_path / "out"], settings={}, fn=work)

    r = StageRunner(**quiet)
    _stage(r, tmp_path, calls)
    downstream(r)
    r = StageRunner(**quiet)
    _stage(r, tmp_path, calls)
    downstream(r)
    assert down_calls == [1]
    r = StageRunner(**quiet)
    _stage(r, tmp_path, calls, setting=3)
    downstream(r)
    assert down_calls == [1, 1]

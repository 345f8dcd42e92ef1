"""The layer rule, read from the source: every newsrec module (and the pipelines) imports only from
its own layer or below — config/errors/utils; data; models; inference; train, eval, serve; cli,
pipelines — models import nothing of data, and eval never imports train. Imports under
``if TYPE_CHECKING:`` are annotations, not dependencies, and are not counted."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {
    "newsrec.config": 0, "newsrec.errors": 0, "newsrec.utils": 0, "newsrec": 0,
    "newsrec.data": 1,
    "newsrec.models": 2,
    "newsrec.inference": 3,
    "newsrec.train": 4, "newsrec.eval": 4, "newsrec.serve": 4,
    "newsrec.cli": 5, "newsrec.__main__": 5, "pipelines": 5,
}
# Cross-cutting helpers every layer may import (DESIGN: "device choice, tracking ... sit where every
# caller may import them"); they live in train today.
CROSS_CUTTING = {"newsrec.train.tracking", "newsrec.train.distributed"}
# Known, named exceptions (module, imported module): the generator scores its oracle with the
# official metrics, pure functions on arrays that live in eval.
ALLOWED = {("newsrec.data.synth", "newsrec.eval.metrics")}


def _package_of(module: str) -> str:
    """The longest LAYERS key that is ``module`` or a package holding it."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        name = ".".join(parts[:n])
        if name in LAYERS:
            return name
    raise AssertionError(f"{module}: in no layer; add it to LAYERS")


def _modules() -> list[tuple[str, Path]]:
    files = sorted((ROOT / "newsrec").rglob("*.py")) + sorted((ROOT / "pipelines").rglob("*.py"))
    out = []
    for path in files:
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append((".".join(parts), path))
    return out


def _runtime_imports(module: str, path: Path) -> list[tuple[str, int]]:
    """(imported newsrec/pipelines module, line) of every import not under ``if TYPE_CHECKING``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    found = []
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")
                base = base if is_package else base[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            submodules = [f"{target}.{alias.name}" for alias in node.names
                          if _is_module(f"{target}.{alias.name}")]
            # "from package import module" imports that module; "from module import name", the module
            found += [(name, node.lineno) for name in submodules] if submodules else [(target, node.lineno)]
    return [(name, line) for name, line in found if name.split(".")[0] in ("newsrec", "pipelines")]


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def test_every_module_imports_only_from_its_layer_or_below():
    wrong = []
    for module, path in _modules():
        mine = _package_of(module)
        for imported, line in _runtime_imports(module, path):
            theirs = _package_of(imported)
            if (module, imported) in ALLOWED or imported in CROSS_CUTTING:
                continue
            if LAYERS[theirs] > LAYERS[mine]:
                wrong.append(f"{path.relative_to(ROOT)}:{line}: {mine} (layer {LAYERS[mine]}) imports "
                             f"{imported} (layer {LAYERS[theirs]})")
            if mine == "newsrec.eval" and theirs == "newsrec.train":
                wrong.append(f"{path.relative_to(ROOT)}:{line}: eval imports {imported} (train)")
    assert not wrong, "\n".join(wrong)


def test_models_import_nothing_of_data_and_inference_sits_between():
    for module, path in _modules():
        if _package_of(module) == "newsrec.models":
            imported = {_package_of(name) for name, _ in _runtime_imports(module, path)}
            assert not imported & {"newsrec.data", "newsrec.inference", "newsrec.train", "newsrec.eval",
                                   "newsrec.serve", "newsrec.cli"}, (module, imported)
    inference = [m for m, _ in _modules() if _package_of(m) == "newsrec.inference"]
    assert {"newsrec.inference.features", "newsrec.inference.rerank", "newsrec.inference.histories",
            "newsrec.inference.scoring", "newsrec.inference.pyfunc"} <= set(inference)


def test_the_checker_sees_a_violation(tmp_path):
    """The parser finds function-level imports and ignores TYPE_CHECKING blocks (else the rule
    above could pass whatever the code does)."""
    path = tmp_path / "m.py"
    path.write_text("from typing import TYPE_CHECKING\n"
                    "if TYPE_CHECKING:\n    from newsrec.data.artifact import DatasetArtifact\n"
                    "def f():\n    from newsrec.serve import service\n")
    names = [n for n, _ in _runtime_imports("newsrec.models.m", path)]
    assert names == ["newsrec.serve.service"]
    assert not any(n.startswith("newsrec.data") for n in names)


# The training step batches its own tensors (news of a batch encoded with gradients); everything
# else that turns news or histories into vectors goes through newsrec.inference.
TRAINING_STEP = {"newsrec.train.loop", "newsrec.train.batching"}


def _encoder_calls(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return [(node.func.attr, node.lineno) for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("encode_news", "encode_user")]


def test_only_the_inference_layer_encodes_news_and_users():
    wrong = []
    for module, path in _modules():
        if _package_of(module) in ("newsrec.models", "newsrec.inference") or module in TRAINING_STEP:
            continue
        wrong += [f"{path.relative_to(ROOT)}:{line}: calls {name} (use newsrec.inference.scoring)"
                  for name, line in _encoder_calls(path)]
    assert not wrong, "\n".join(wrong)
    assert _encoder_calls(ROOT / "newsrec" / "inference" / "scoring.py")  # the checker sees a call

"""Dev quality on a `newsrec synth --size small` artifact: Fastformer vs MHSA (same budget) vs
the hand-made baselines (logreg, share-lift heuristic, popularity) vs the oracle.

    python benchmarks/quality.py --data DATASET_DIR --truth SYNTH_DIR/ground_truth
                                 [--config configs/demo.yaml] [--baseline configs/nrms_mhsa.yaml]
                                 [-o key=value ...]

Fastformer trains with ``--config`` (the demo default), MHSA with ``--baseline`` (identical except
``model.encoder``), both with the same overrides; the hand-made baselines are
``newsrec.eval.baselines`` with default settings (popularity: train click-through shrunk toward the
mean); the oracle is the generator's true click probability (ground_truth/oracle_metrics.json).
Targets: Fastformer ≥ MHSA − 0.005, ≥ popularity + 0.05 and ≥ every hand-made baseline in dev AUC; the gap to the oracle is reported.
Writes docs/benchmarks/quality.{json,png}.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import format_table, save_figure, use_agg_backend, write_results  # noqa: E402

from newsrec.config import load_config  # noqa: E402
from newsrec.eval.baselines import evaluate_baseline  # noqa: E402
from newsrec.train import fit  # noqa: E402

METRICS = ("auc", "mrr", "ndcg@5", "ndcg@10")
REPO = Path(__file__).resolve().parent.parent


def baseline_metrics(name: str, data_dir: Path) -> dict[str, Any]:
    """Dev metrics of a hand-made baseline (``newsrec.eval.baselines``, default settings)."""
    return evaluate_baseline(name, data_dir, split="dev").metrics


def train_one(config_path: Path, overrides: list[str], data_dir: Path, out_dir: Path) -> dict[str, Any]:
    config = load_config(config_path, [*overrides, "tracking.enabled=false"])
    started = time.perf_counter()
    result = fit(config, data_dir=data_dir, out_dir=out_dir)
    seconds = time.perf_counter() - started
    return {**{k: result.metrics[k] for k in METRICS}, "train_s": seconds, "epochs": result.epochs_trained,
            "samples_s": result.train_samples_per_second, "history": result.history}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="dataset artifact of synth --size small")
    parser.add_argument("--truth", type=Path, required=True, help="the synth output's ground_truth/ folder")
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml")
    parser.add_argument("--baseline", type=Path, default=REPO / "configs" / "nrms_mhsa.yaml")
    parser.add_argument("-o", "--override", dest="overrides", action="append", default=[])
    parser.add_argument("--skip-mhsa", action="store_true")
    parser.add_argument("--keep", type=Path, default=None,
                        help="write the trained models here (fastformer/, mhsa/) instead of a temporary folder")
    args = parser.parse_args()

    rows: dict[str, dict[str, Any]] = {}
    oracle = json.loads((args.truth / "oracle_metrics.json").read_text())
    rows["oracle"] = {k: float(oracle["dev"][k]) for k in METRICS}
    for name in ("logreg", "heuristic", "popularity"):
        rows[name] = {k: float(baseline_metrics(name, args.data)[k]) for k in METRICS}
    with tempfile.TemporaryDirectory(prefix="newsrec-quality-") as tmp:
        out = args.keep or Path(tmp)
        rows["fastformer"] = train_one(args.config, args.overrides, args.data, out / "fastformer")
        if not args.skip_mhsa:
            rows["mhsa"] = train_one(args.baseline, args.overrides, args.data, out / "mhsa")

    table = [{"model": name, **{k: r.get(k) for k in METRICS}, "train_s": r.get("train_s"),
              "samples_s": r.get("samples_s")} for name, r in rows.items()]
    print(format_table(table))
    ff = rows["fastformer"]["auc"]
    checks = {
        "fastformer_minus_popularity": ff - rows["popularity"]["auc"],
        "fastformer_minus_best_handmade": ff - max(rows[b]["auc"] for b in ("logreg", "heuristic", "popularity")),
        "fastformer_minus_mhsa": ff - rows["mhsa"]["auc"] if "mhsa" in rows else None,
        "oracle_minus_fastformer": rows["oracle"]["auc"] - ff,
    }
    print(f"\nFastformer − popularity AUC {checks['fastformer_minus_popularity']:+.4f} (target ≥ +0.05)")
    print(f"Fastformer − best hand-made {checks['fastformer_minus_best_handmade']:+.4f} (target ≥ 0)")
    if checks["fastformer_minus_mhsa"] is not None:
        print(f"Fastformer − MHSA AUC       {checks['fastformer_minus_mhsa']:+.4f} (target ≥ −0.005)")
    print(f"oracle − Fastformer AUC     {checks['oracle_minus_fastformer']:+.4f}")
    write_results("quality", {"rows": rows, "checks": checks, "config": args.config.name,
                              "overrides": args.overrides})
    use_agg_backend()
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.4))
    names = list(rows)
    for i, metric in enumerate(METRICS):
        ax.bar([j + i * 0.2 for j in range(len(names))], [rows[n][metric] for n in names], 0.2, label=metric)
    ax.set_xticks([j + 0.3 for j in range(len(names))], names)
    ax.set_title("Dev metrics on synth small")
    ax.legend(ncol=4, fontsize=8)
    save_figure(fig, "quality")


if __name__ == "__main__":
    main()

"""Two-stage (first stage + re-ranker) vs the first stage alone on a `newsrec synth --size small` dev split.

    python benchmarks/serve_quality.py --data DATASET_DIR --model MODEL_DIR
                                       [--reranker RERANKER_DIR] [--train-out DIR]
                                       [--dev-impressions N] [--retrieved-impressions N]
                                       [--retrieve-k 200] [-c configs/demo.yaml] [-o key=value ...]

Without ``--reranker`` a re-ranker is trained first (``fit_reranker`` with the config and overrides)
into ``--train-out``. Then, on dev (optionally a seeded sample of ``--dev-impressions``):

- the impressions' own candidates: AUC, MRR, nDCG@5, nDCG@10 of both stages, overall and on cold
  candidates only (news unseen in train; each impression restricted to them);
- retrieved candidates (a sample of ``--retrieved-impressions``): the first stage retrieves its top
  ``--retrieve-k`` news available at the impression's time; a retrieved news counts as relevant when
  the impression shows it clicked; both stages rank that same list.

Target: AUC lift ≥ 0.01 with nDCG@10 not lower, overall and on cold candidates; nDCG@10 over
retrieved candidates higher. Writes docs/benchmarks/serve_quality.{json,png}.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import format_table, save_figure, use_agg_backend, write_results  # noqa: E402

from newsrec.config import load_config  # noqa: E402
from newsrec.data.artifact import open_dataset  # noqa: E402
from newsrec.data.popularity import unseen_in_train  # noqa: E402
from newsrec.inference.model_io import load_model  # noqa: E402
from newsrec.inference.features import EventLog  # noqa: E402
from newsrec.inference.rerank import load_reranker  # noqa: E402
from newsrec.inference.scoring import score_impressions  # noqa: E402
from newsrec.train.rerank import compare_on_impressions, evaluate_retrieved, fit_reranker  # noqa: E402

METRICS = ("auc", "mrr", "ndcg@5", "ndcg@10")


def _rows(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for name, values in results.items():
        if name == "recall":
            continue
        rows.append({"setting": name, **{m: round(100 * values[m], 2) for m in METRICS},
                     "impressions": values.get("auc_impressions", values.get("impressions"))})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--model", required=True, type=Path, help="first-stage MODEL_DIR")
    parser.add_argument("--reranker", type=Path, default=None, help="RERANKER_DIR (trained when absent)")
    parser.add_argument("--train-out", type=Path, default=Path("data/models/reranker"))
    parser.add_argument("--dev-impressions", type=int, default=0, help="0 = the whole dev split")
    parser.add_argument("--retrieved-impressions", type=int, default=2000)
    parser.add_argument("--retrieve-k", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("-c", "--config", type=Path, default=None)
    parser.add_argument("-o", "--override", action="append", default=[])
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    payload: dict[str, Any] = {"data": args.data.name, "model": args.model.name}
    reranker_dir = args.reranker
    if reranker_dir is None:
        config = load_config(args.config, args.override)
        started = time.perf_counter()
        fit = fit_reranker(config, retriever_dir=args.model, data_dir=args.data, out_dir=args.train_out)
        payload["train_seconds"] = round(time.perf_counter() - started, 1)
        payload["train_samples"] = fit.train_samples
        reranker_dir = args.train_out
    payload["reranker"] = Path(reranker_dir).name

    dataset = open_dataset(args.data)
    retriever = load_model(args.model)
    reranker = load_reranker(reranker_dir, retriever_dir=args.model)
    payload["rerank_config"] = reranker.config.to_dict()["rerank"]
    payload["guard"] = reranker.manifest.get("guard")
    rng = np.random.default_rng(args.seed)
    dev_all = dataset.impressions("dev")
    dev = dev_all
    if args.dev_impressions and args.dev_impressions < len(dev_all):
        dev = dev_all.select(np.sort(rng.choice(len(dev_all), args.dev_impressions, replace=False)))

    started = time.perf_counter()
    vectors = torch.from_numpy(reranker.tables.vectors)
    first = score_impressions(retriever.model, None, dev, history_len=retriever.config.data.history_len,
                              batch_size=512, news_vectors=vectors, show_progress=False)
    first_seconds = time.perf_counter() - started
    started = time.perf_counter()
    log = EventLog.of_dataset(dataset)
    two = reranker.score_impressions(dev, retrieval_scores=first, log=log)
    rerank_seconds = time.perf_counter() - started
    cold = unseen_in_train(dataset)[dev.candidates]
    on_candidates = compare_on_impressions(dev.labels, dev.candidate_offsets, first, two, cold)
    payload["impressions_candidates"] = on_candidates
    payload["cold_candidate_share"] = float(cold.mean())
    payload["seconds"] = {"first_stage": round(first_seconds, 1), "rerank": round(rerank_seconds, 1),
                          "candidates": int(len(dev.candidates))}

    n_ret = min(args.retrieved_impressions, len(dev_all))
    retrieved_rows = np.sort(rng.choice(len(dev_all), n_ret, replace=False))
    retrieved = evaluate_retrieved(retriever, reranker, dev_all.select(retrieved_rows),
                                   retrieve_k=args.retrieve_k, log=log)
    payload["retrieved"] = retrieved

    print(f"dev: {len(dev)} impressions, {len(dev.candidates)} candidates "
          f"({100 * cold.mean():.1f}% cold); re-ranking took {rerank_seconds:.1f} s")
    print("\nimpressions' own candidates (x100)")
    print(format_table(_rows(on_candidates)))
    rec = retrieved["recall"]
    print(f"\nretrieved candidates: top {rec['retrieve_k']} of the pool for {n_ret} dev impressions "
          f"(clicks retrieved: {rec['clicks_retrieved']}/{rec['clicks']} = {100 * rec['recall']:.1f}%)")
    print(format_table(_rows({k: v for k, v in retrieved.items() if k != "recall"})))
    lift = {
        "auc": on_candidates["two_stage"]["auc"] - on_candidates["first_stage"]["auc"],
        "ndcg@10": on_candidates["two_stage"]["ndcg@10"] - on_candidates["first_stage"]["ndcg@10"],
        "cold_auc": on_candidates["two_stage_cold"]["auc"] - on_candidates["first_stage_cold"]["auc"],
        "cold_ndcg@10": on_candidates["two_stage_cold"]["ndcg@10"] - on_candidates["first_stage_cold"]["ndcg@10"],
        "retrieved_ndcg@10": retrieved["two_stage"]["ndcg@10"] - retrieved["first_stage"]["ndcg@10"],
    }
    payload["lift"] = lift
    met = (lift["auc"] >= 0.01 and lift["ndcg@10"] >= 0 and lift["cold_auc"] >= 0.01
           and lift["cold_ndcg@10"] >= 0 and lift["retrieved_ndcg@10"] > 0)
    payload["target_met"] = bool(met)
    print("\nlift (two stage - first stage): " + ", ".join(f"{k} {v:+.4f}" for k, v in lift.items()))
    print(f"target (AUC +0.01, nDCG@10 not lower, overall and cold; retrieved nDCG@10 higher): "
          f"{'met' if met else 'NOT met'}")
    if args.no_write:
        return
    print(f"\nwrote {write_results('serve_quality', payload)}")
    use_agg_backend()
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (title, first_key, two_key, source) in zip(axes, [
            ("impressions' candidates", "first_stage", "two_stage", on_candidates),
            ("cold candidates", "first_stage_cold", "two_stage_cold", on_candidates),
            (f"retrieved top {rec['retrieve_k']}", "first_stage", "two_stage", retrieved)]):
        x = np.arange(len(METRICS))
        ax.bar(x - 0.2, [100 * source[first_key][m] for m in METRICS], 0.4, label="first stage")
        ax.bar(x + 0.2, [100 * source[two_key][m] for m in METRICS], 0.4, label="two stage")
        ax.set_xticks(x, METRICS)
        ax.set_title(title)
    axes[0].legend()
    fig.suptitle("Two-stage vs first stage on synth small dev")
    print(f"wrote {save_figure(fig, 'serve_quality')}")


if __name__ == "__main__":
    main()

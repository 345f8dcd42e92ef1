"""Training throughput at MIND shapes (batch 32, title 30, history 50, npratio 4) on this machine.

Variants measured in one run on the same Zipf-like batches (so deduplication is measured honestly):

    naive          one encoder call over all B·(history + 1 + npratio) titles of a batch, fp32
    dedup          each unique news of the batch encoded once (what `newsrec train` does), fp32
    dedup+bf16     + bf16 autocast, unique count padded to train.bucket_size (stable shapes)
    dedup+bf16+frozen  + frozen word embeddings (model.freeze_embeddings)
    dedup+frozen   frozen word embeddings in fp32

Each is reported in training samples/s, as a ratio to naive, and as a fraction of the machine's
measured matrix-multiply rate (FLOPs of one step counted by torch's FLOP counter). Then Fastformer vs
MHSA training samples/s at history 50, 200 and 1,000, each without and with the news-vector cache
(``train.news_cache_refresh_steps``, ``--cache-refresh``; both refresh modes): the three models of an
encoder train side by side, one step of each in turn, so that a shared machine's drifting speed hits
them alike, and the cached ones are timed after ``--cache-refresh`` + 2 untimed steps over fresh
batches, so the cache is in its steady state (the share of the history's distinct news re-encoded per
step is reported beside).

Last, dev AUC with and without the cache: Fastformer (configs/demo.yaml) and MHSA
(configs/nrms_mhsa.yaml) trained on generated worlds (``--auc-worlds``, ``--auc-size``), each run
capped at ``--auc-max-steps`` optimizer steps to keep the section within ~15 minutes on 2 cores.
Prints tables; writes docs/benchmarks/train_speed.{json,png}.

    python benchmarks/train_speed.py [--threads 2] [--steps 10] [--quick] [--cache-refresh 20]
                                     [--auc-worlds default,cold-test] [--auc-size demo]
                                     [--auc-max-steps 120] [--skip-auc] [--work DIR]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import format_table, machine_info, matmul_ceiling, save_figure, use_agg_backend, write_results  # noqa: E402

from newsrec.config import config_from_dict  # noqa: E402
from newsrec.data.artifact import Impressions  # noqa: E402
from newsrec.data.features import NewsFeatures  # noqa: E402
from newsrec.models.recommender import NewsRecommender  # noqa: E402
from newsrec.train.batching import Batch, BatchBuilder  # noqa: E402
from newsrec.train.loop import CachedHistory, NRMSObjective, _train_step, build_optimizer  # noqa: E402
from newsrec.train.news_cache import NewsVectorCache  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
VOCAB = 30_000
N_NEWS = 50_000
TITLE_LEN = 30
BATCH = 32
NPRATIO = 4


def zipf_impressions(*, n_impressions: int, history_len: int, seed: int = 0) -> Impressions:
    """Impressions whose histories and candidates follow Zipf-like news popularity (a ≈ 1.1), as in
    MIND where about half the titles of a training batch are repeats."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, N_NEWS + 1) ** 1.1
    weights /= weights.sum()
    popular = rng.permutation(N_NEWS) + 1

    def draw(k: int) -> np.ndarray:
        return popular[rng.choice(N_NEWS, size=k, p=weights)].astype(np.int32)

    hist = draw(n_impressions * history_len)
    hist_off = np.arange(0, n_impressions * history_len + 1, history_len, dtype=np.int64)
    n_cand = 20
    cand = draw(n_impressions * n_cand)
    labels = np.zeros(n_impressions * n_cand, dtype=np.int8)
    labels[::n_cand] = 1
    cand_off = np.arange(0, n_impressions * n_cand + 1, n_cand, dtype=np.int64)
    return Impressions("train", np.arange(n_impressions, dtype=np.int64),
                       np.array(["u"] * n_impressions, dtype=object),
                       np.zeros(n_impressions, dtype="datetime64[us]"), hist, hist_off, cand, cand_off, labels)


def titles(seed: int = 1) -> np.ndarray:
    """int32 [N_NEWS + 1, TITLE_LEN]: lengths ~ MIND's (mean ~11.5 words), padded to 30."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(2, VOCAB, size=(N_NEWS + 1, TITLE_LEN), dtype=np.int32)
    lengths = np.clip(rng.poisson(11.5, size=N_NEWS + 1), 3, TITLE_LEN)
    tokens[np.arange(TITLE_LEN)[None, :] >= lengths[:, None]] = 0
    tokens[0] = 0
    return tokens


def make_model(encoder: str, *, freeze: bool = False, history_len: int = 50) -> NewsRecommender:
    cfg = config_from_dict({"model": {"encoder": encoder, "freeze_embeddings": freeze, "dropout": 0.2}})
    torch.manual_seed(0)
    return NewsRecommender(cfg.model, vocab_size=VOCAB, n_categories=20, n_subcategories=200,
                           max_history=history_len)


def build_batches(impressions: Impressions, tokens: np.ndarray, *, history_len: int, bucket: int | None,
                  n: int, split_history: bool = False) -> tuple[list[Batch], float]:
    cat = np.arange(N_NEWS + 1) % 20
    sub = np.arange(N_NEWS + 1) % 200
    builder = BatchBuilder(impressions, title_tokens=tokens, category=cat, subcategory=sub,
                           batch_size=BATCH, npratio=NPRATIO, history_len=history_len, seed=0,
                           bucket_size=bucket, split_history=split_history)
    started = time.perf_counter()
    batches = [builder.build(0, b) for b in range(n)]
    return batches, (time.perf_counter() - started) / n


def dedup_step(objective: NRMSObjective, optimizer: torch.optim.Optimizer, batch: Batch, *, bf16: bool) -> None:
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = objective(batch.news, batch.history_slots, batch.history_mask, batch.candidate_slots,
                         batch.candidate_mask)
    (loss / batch.size).backward()
    torch.nn.utils.clip_grad_norm_(objective.parameters(), 1.0)
    optimizer.step()


def cached_step(objective: NRMSObjective, optimizer: torch.optim.Optimizer, history: CachedHistory,
                batch: Batch, step: int, *, bf16: bool) -> None:
    """One ``newsrec train`` step with the news-vector cache (``_train_step``): history vectors read
    from it (the due ones re-encoded: before the step without gradient, or with ``history.grad``
    inside it with gradients), the candidates encoded with gradients."""
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    _train_step(objective, objective.model, optimizer, scheduler, batch,
                autocast=torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), device=torch.device("cpu"),
                grad_clip=1.0, world_size=1, history=history, step=step)


class CachedRun:
    """A model trained with the news-vector cache (``grad``: the due news re-encoded inside the step)."""

    def __init__(self, encoder: str, tokens: np.ndarray, *, history_len: int, refresh: int, bf16: bool,
                 grad: bool) -> None:
        model = make_model(encoder, history_len=history_len)
        self.objective = NRMSObjective(model)
        self.optimizer = build_optimizer(model, config_from_dict({}))
        features = NewsFeatures(category=np.arange(N_NEWS + 1) % 20, subcategory=np.arange(N_NEWS + 1) % 200,
                                title_tokens=tokens)
        self.cache = NewsVectorCache(N_NEWS + 1, model.news_dim, refresh_steps=refresh)
        self.history = CachedHistory(model, self.cache, features,
                                     autocast=torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16),
                                     device=torch.device("cpu"), bucket_size=64 if bf16 else None, grad=grad)
        self.bf16 = bf16

    def step(self, batch: Batch, step: int) -> None:
        cached_step(self.objective, self.optimizer, self.history, batch, step, bf16=self.bf16)


def measure_interleaved(encoder: str, plain: list[Batch], split: list[Batch], tokens: np.ndarray, *,
                        history_len: int, refresh: int, steps: int, bf16: bool) -> dict[str, float]:
    """Median seconds per step of three models trained side by side (no cache; cache; cache with the
    grad refresh), one step of each in turn, so that a shared machine's drifting speed hits all three
    alike; the cached ones first run ``refresh + 2`` untimed steps (steady state). Also the share of
    the history's distinct news the cache re-encodes per timed step."""
    warm = refresh + 2
    if len(split) < warm + steps or len(plain) < steps + 2:
        raise ValueError(f"{len(split)} cache batches / {len(plain)} plain batches for {warm} warm-up and "
                         f"{steps} timed steps")
    model = make_model(encoder, history_len=history_len)
    objective = NRMSObjective(model)
    optimizer = build_optimizer(model, config_from_dict({}))
    runs = {"cache": CachedRun(encoder, tokens, history_len=history_len, refresh=refresh, bf16=bf16, grad=False),
            "cache_grad": CachedRun(encoder, tokens, history_len=history_len, refresh=refresh, bf16=bf16, grad=True)}
    for step in range(warm):
        for run in runs.values():
            run.step(split[step], step)
    for batch in plain[:2]:
        dedup_step(objective, optimizer, batch, bf16=bf16)
    for run in runs.values():
        run.cache.reset_counters()
    times: dict[str, list[float]] = {"plain": [], "cache": [], "cache_grad": []}
    for i in range(steps):
        t0 = time.perf_counter()
        dedup_step(objective, optimizer, plain[2 + i], bf16=bf16)
        times["plain"].append(time.perf_counter() - t0)
        for name, run in runs.items():
            t0 = time.perf_counter()
            run.step(split[warm + i], warm + i)
            times[name].append(time.perf_counter() - t0)
    refreshed, read = runs["cache"].cache.reset_counters()
    return {**{name: float(np.median(t)) for name, t in times.items()}, "refresh_share": refreshed / max(read, 1)}


def naive_step(model: NewsRecommender, optimizer: torch.optim.Optimizer, batch: Batch, tokens: torch.Tensor) -> None:
    """Every title slot of the batch encoded, repeats and padding included, in one call."""
    optimizer.zero_grad(set_to_none=True)
    b, h = batch.history.shape
    news = torch.cat([batch.history, batch.candidates], dim=1).reshape(-1)  # (B·(H+C),)
    vectors = model.encode_news(tokens[news], news % 20, news % 200).view(b, h + batch.candidates.shape[1], -1)
    user = model.encode_user(vectors[:, :h], batch.history_mask)
    logits = model.score(user, vectors[:, h:]).masked_fill(~batch.candidate_mask, float("-inf"))
    loss = torch.nn.functional.cross_entropy(logits, torch.zeros(b, dtype=torch.long))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()


def measure(step: Any, batches: list[Batch], *, steps: int) -> tuple[float, float]:
    """(median seconds per step, step FLOPs) over ``steps`` steps after 2 warm-up steps."""
    step(batches[0])
    step(batches[1 % len(batches)])
    with FlopCounterMode(display=False) as counter:
        step(batches[0])
    flops = counter.get_total_flops()
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        step(batches[(i + 2) % len(batches)])
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), float(flops)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="fewer steps; history 50 only")
    parser.add_argument("--cache-refresh", type=int, default=20,
                        help="train.news_cache_refresh_steps of the cache rows (SpeedyRec's max_step_in_cache)")
    parser.add_argument("--auc-worlds", default="default,cold-test")
    parser.add_argument("--auc-size", default="demo")
    parser.add_argument("--auc-max-steps", type=int, default=120, help="optimizer steps of each AUC run (0 = the configs' epochs)")
    parser.add_argument("--skip-auc", action="store_true", help="speed only")
    parser.add_argument("--work", type=Path, default=None, help="folder for the AUC worlds (default: a temporary one)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steps = 6 if args.quick else args.steps

    print(f"machine: {machine_info()['cpu']}, {args.threads} threads, torch {torch.__version__}")
    fp32_ceiling = matmul_ceiling(torch.float32)
    bf16_ceiling = matmul_ceiling(torch.bfloat16)
    print(f"matmul ceiling: fp32 {fp32_ceiling:.0f} GFLOP/s, bf16 {bf16_ceiling:.0f} GFLOP/s")
    tokens_np = titles()
    tokens = torch.from_numpy(tokens_np.astype(np.int64))
    impressions = zipf_impressions(n_impressions=2_000, history_len=50)
    n_batches = steps + 3
    plain, build_s = build_batches(impressions, tokens_np, history_len=50, bucket=None, n=n_batches)
    bucketed, _ = build_batches(impressions, tokens_np, history_len=50, bucket=64, n=n_batches)
    slots = BATCH * (50 + 1 + NPRATIO)
    unique_share = float(np.mean([b.n_unique for b in plain])) / slots
    print(f"batch: {slots} title slots, {unique_share:.0%} unique news; batch build {build_s * 1e3:.1f} ms "
          f"(background thread)")

    rows: list[dict[str, Any]] = []

    def record(name: str, seconds: float, flops: float, ceiling: float) -> None:
        rows.append({"variant": name, "samples_s": BATCH / seconds, "ms_step": seconds * 1e3,
                     "gflop_s": flops / seconds / 1e9, "of_matmul_peak": flops / seconds / 1e9 / ceiling})

    model = make_model("fastformer")
    opt = build_optimizer(model, config_from_dict({}))
    record("naive", *measure(lambda b: naive_step(model, opt, b, tokens), plain, steps=max(2, steps // 2)),
           fp32_ceiling)
    for name, bf16, freeze, batches in (("dedup", False, False, plain), ("dedup+bf16", True, False, bucketed),
                                        ("dedup+bf16+frozen", True, True, bucketed),
                                        ("dedup+frozen", False, True, plain)):
        model = make_model("fastformer", freeze=freeze)
        objective = NRMSObjective(model)
        opt = build_optimizer(model, config_from_dict({}))
        record(name, *measure(lambda b: dedup_step(objective, opt, b, bf16=bf16), batches, steps=steps),
               bf16_ceiling if bf16 else fp32_ceiling)
    naive_rate = rows[0]["samples_s"]
    for r in rows:
        r["vs_naive"] = r["samples_s"] / naive_rate
    print("\nTraining step at MIND shapes (Fastformer, hidden 256, 16 heads, 300-d words)")
    print(format_table(rows, ["variant", "samples_s", "vs_naive", "ms_step", "gflop_s", "of_matmul_peak"]))
    # the history comparison runs in whichever precision trains faster on this machine (bf16 only
    # pays with bf16 matrix units: AMX or a GPU)
    fast_bf16 = rows[2]["samples_s"] > rows[1]["samples_s"]
    precision = "bf16" if fast_bf16 else "fp32"

    scaling: list[dict[str, Any]] = []
    refresh = args.cache_refresh
    lengths = (50,) if args.quick else (50, 200, 1000)
    for history_len in lengths:
        n_batches = refresh + 2 + steps
        imps = zipf_impressions(n_impressions=BATCH * n_batches, history_len=history_len, seed=2)
        bucket = 64 if fast_bf16 else None
        plain_batches, _ = build_batches(imps, tokens_np, history_len=history_len, bucket=bucket, n=steps + 2)
        split_batches, _ = build_batches(imps, tokens_np, history_len=history_len, bucket=bucket, n=n_batches,
                                         split_history=True)
        row: dict[str, Any] = {"history_len": history_len,
                               "unique_history_news": float(np.mean([len(b.history_news) for b in split_batches])),
                               "unique_candidate_news": float(np.mean([b.n_unique for b in split_batches]))}
        for encoder in ("fastformer", "mhsa"):
            seconds = measure_interleaved(encoder, plain_batches, split_batches, tokens_np, history_len=history_len,
                                          refresh=refresh, steps=max(2, steps // 2) if history_len >= 1000 else steps,
                                          bf16=fast_bf16)
            row[f"{encoder}_samples_s"] = BATCH / seconds["plain"]
            row[f"{encoder}_cache_refresh_share"] = seconds["refresh_share"]
            for name in ("cache", "cache_grad"):
                row[f"{encoder}_{name}_samples_s"] = BATCH / seconds[name]
                row[f"{encoder}_{name}_speedup"] = seconds["plain"] / seconds[name]
        row["ratio"] = row["fastformer_samples_s"] / row["mhsa_samples_s"]
        row["cache_ratio"] = row["fastformer_cache_samples_s"] / row["mhsa_cache_samples_s"]
        row["cache_grad_ratio"] = row["fastformer_cache_grad_samples_s"] / row["mhsa_cache_grad_samples_s"]
        scaling.append(row)
        print(f"  history {history_len}: done", flush=True)
    print(f"\nFastformer vs MHSA, training samples/s (dedup, {precision}), without and with the news-vector "
          f"cache (refresh every {refresh} steps; ratio = Fastformer / MHSA)")
    print(format_table(scaling, ["history_len", "fastformer_samples_s", "fastformer_cache_samples_s",
                                 "fastformer_cache_speedup", "mhsa_samples_s", "mhsa_cache_samples_s",
                                 "mhsa_cache_speedup", "ratio", "cache_ratio"]))
    print(f"\nThe same with the due news re-encoded inside the step with gradients "
          f"(train.news_cache_refresh_grad; speedup against no cache)")
    print(format_table(scaling, ["history_len", "fastformer_cache_grad_samples_s", "fastformer_cache_grad_speedup",
                                 "mhsa_cache_grad_samples_s", "mhsa_cache_grad_speedup", "cache_grad_ratio"]))
    print(format_table(scaling, ["history_len", "unique_history_news", "unique_candidate_news",
                                 "fastformer_cache_refresh_share", "mhsa_cache_refresh_share"]))

    quality = [] if args.skip_auc else cache_quality(args, refresh=refresh)

    write_results("train_speed", {"variants": rows, "history_scaling": scaling, "unique_share": unique_share,
                                  "batch_build_ms": build_s * 1e3, "matmul_gflops": {"fp32": fp32_ceiling,
                                                                                     "bf16": bf16_ceiling},
                                  "history_scaling_precision": precision, "threads": args.threads,
                                  "news_cache": {"refresh_steps": refresh, "warmup_steps": refresh + 2,
                                                 "timed_steps": steps, "dev_auc": quality,
                                                 "auc_worlds": args.auc_worlds, "auc_size": args.auc_size,
                                                 "auc_max_steps": args.auc_max_steps},
                                  "shapes": {"batch": BATCH, "title_len": TITLE_LEN, "history_len": 50,
                                             "npratio": NPRATIO}})
    use_agg_backend()
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].barh([r["variant"] for r in rows], [r["samples_s"] for r in rows], color="#4477aa")
    axes[0].set_xlabel("training samples/s")
    axes[0].set_title("Step at MIND shapes (B=32, T=30, H=50, np=4)")
    for i, r in enumerate(rows):
        axes[0].text(r["samples_s"], i, f" {r['vs_naive']:.1f}×", va="center")
    labels = [str(r["history_len"]) for r in scaling]
    x = np.arange(len(scaling))
    for offset, key, label in ((-0.3, "fastformer_samples_s", "Fastformer"), (-0.1, "mhsa_samples_s", "MHSA"),
                               (0.1, "fastformer_cache_samples_s", "Fastformer + cache"),
                               (0.3, "mhsa_cache_samples_s", "MHSA + cache")):
        axes[1].bar(x + offset, [r[key] for r in scaling], 0.2, label=label)
    axes[1].set_xticks(x, labels)
    axes[1].set_yscale("log")
    axes[1].set_xlabel("history length")
    axes[1].set_ylabel("training samples/s (log)")
    axes[1].set_title(f"news-vector cache: refresh every {refresh} steps")
    axes[1].legend(fontsize=8)
    save_figure(fig, "train_speed")


def cache_quality(args: argparse.Namespace, *, refresh: int) -> list[dict[str, Any]]:
    """Dev AUC and end-to-end training samples/s of Fastformer and MHSA without and with the cache,
    on each of ``args.auc_worlds`` (generated at ``args.auc_size``, seed 0, ingested once)."""
    import tempfile

    from newsrec.config import load_config
    from newsrec.data.ingest import ingest
    from newsrec.data.synth import generate
    from newsrec.train import fit

    configs = {"Fastformer": REPO / "configs" / "demo.yaml", "MHSA": REPO / "configs" / "nrms_mhsa.yaml"}
    work = args.work or Path(tempfile.mkdtemp(prefix="train-cache-"))
    rows = []
    for world in args.auc_worlds.split(","):
        synth_dir, data_dir = work / world / "synth", work / world / "dataset"
        generate(synth_dir, size=args.auc_size, seed=0, world=world)
        base = ["tracking.enabled=false", f"train.num_threads={args.threads}"]
        ingest(load_config(configs["Fastformer"], base), train=synth_dir / "MINDsynth_train.zip",
               dev=synth_dir / "MINDsynth_dev.zip", out_dir=data_dir)
        for name, path in configs.items():
            row: dict[str, Any] = {"world": world, "model": name}
            for label, k in (("off", 0), ("cache", refresh)):
                overrides = [*base, f"train.news_cache_refresh_steps={k}"]
                if args.auc_max_steps:
                    overrides.append(f"train.max_steps={args.auc_max_steps}")
                t0 = time.perf_counter()
                result = fit(load_config(path, overrides), data_dir=data_dir, out_dir=work / world / f"{name}-{label}")
                row[f"auc_{label}"] = float(result.metrics["auc"])
                row[f"samples_s_{label}"] = result.train_samples_per_second
                row[f"seconds_{label}"] = time.perf_counter() - t0
                row["steps"] = result.global_step
            row["auc_delta"] = row["auc_cache"] - row["auc_off"]
            row["speedup"] = row["samples_s_cache"] / row["samples_s_off"]
            rows.append(row)
            print(f"  {world} {name}: dev AUC {row['auc_off']:.4f} → {row['auc_cache']:.4f} with the cache", flush=True)
    print(f"\nDev AUC without / with the news-vector cache (refresh every {refresh} steps; "
          f"{args.auc_size} worlds, seed 0, {args.auc_max_steps or 'all'} steps each)")
    print(format_table(rows, ["world", "model", "steps", "auc_off", "auc_cache", "auc_delta", "samples_s_off",
                              "samples_s_cache", "speedup"]))
    return rows


if __name__ == "__main__":
    main()

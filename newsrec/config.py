"""Typed configuration: the one source of truth for every setting.

YAML files only fill these dataclasses in; the CLI only adds ``-o section.key=value`` overrides.
Unknown keys are rejected with the list of valid ones; values are type-checked and validated in
``__post_init__`` so that a bad setting fails before any work starts.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from newsrec.errors import ConfigError


@dataclass
class DataConfig:
    """How raw MIND text becomes model input."""

    title_len: int = 30  # words kept per title (ingest writes title_tokens with this width)
    history_len: int = 50  # most recent clicks fed to the user encoder
    lowercase: bool = True
    min_word_count: int = 1  # words seen fewer times in train titles map to <unk>
    max_vocab: int = 0  # 0 = no cap; else keep the most frequent words
    on_bad_rows: str = "error"  # ingest: "error" stops at the first bad line; "skip" drops and counts
    missing_news: str = "error"  # ingest: ids absent from news.tsv: "error" or "drop" (and count)

    def __post_init__(self) -> None:
        _positive(self, "title_len", "history_len", "min_word_count")
        _non_negative(self, "max_vocab")
        _choice(self, "on_bad_rows", ("error", "skip"))
        _choice(self, "missing_news", ("error", "drop"))


@dataclass
class ModelConfig:
    """The NRMS-style model: news encoder + user encoder, score = dot(user, news)."""

    encoder: str = "fastformer"  # "fastformer" | "mhsa" (the NRMS baseline): same path, other layer
    embedding_dim: int = 300  # word embeddings (GloVe is 300-d)
    hidden_size: int = 256  # width of the Fastformer / MHSA layers and of news and user vectors
    num_heads: int = 16
    num_layers: int = 1  # layers in each encoder
    user_num_layers: int = 0  # 0 = same as num_layers
    share_layers: bool = False  # share parameters across layers (the paper's option)
    value_from_query: bool = True  # official code: value = query (no separate value projection)
    layer_norm: bool = False  # authors found news recommendation better without it
    feed_forward: bool = False
    position_embeddings: bool = False  # for the user encoder over the history
    # vectors per user: K > 1 pools the history K ways (MINER's poly attention), one vector per
    # interest, and a candidate scores the best of its K dot products, so retrieval stays K
    # inner-product searches merged by maximum (docs/decisions.md: why the maximum); 1 = one user
    # vector, the published NRMS/Fastformer architecture
    user_interests: int = 1
    # with user_interests > 1: weight of the mean pairwise cosine of a user's interest vectors, added
    # to the training loss per sample (MINER's disagreement regularisation), so that the K poolings
    # do not stay the one near-uniform pooling they start as
    interest_disagreement: float = 0.0
    use_category: bool = True  # add category/subcategory embeddings to the news vector
    pooling_hidden: int = 200  # additive-attention pooling hidden size
    dropout: float = 0.2
    freeze_embeddings: bool = False
    init_std: float = 0.02
    # what the news encoder reads (newsrec.data.features gathers it; docs/decisions.md: measurements)
    text_encoder: str = "words"  # "words": title word embeddings | "plm": a pretrained language model
    word_dropout: float = 0.0  # words: share of title words replaced by <unk> while training
    plm_name: str = ""  # plm: a Hugging Face model folder or hub id (AutoModel + AutoTokenizer)
    plm_max_len: int = 32  # plm: tokens kept per title
    plm_finetune_layers: int = 0  # plm: top layers trained with the model (0 = frozen, states cached)
    plm_batch_size: int = 64  # plm: titles per backbone call when computing the cached states
    use_entities: bool = False  # title entities as a view (entity_vectors.npy if ingested, else learned)
    max_entities: int = 5  # entities read per title
    entity_dim: int = 100  # width of learned entity embeddings (ingested vectors keep theirs)
    news_views: str = "sum"  # combine title/category/entity vectors: "sum" | "attention" (NAML)
    # a wide part in the dot product: the user side holds the history's category and subcategory
    # log-lift over their base rates, the news side its one-hot category and subcategory, each block
    # under a learned weight (docs/decisions.md: why, and what it costs in vector width); false =
    # the published NRMS/Fastformer architecture
    category_lift: bool = True
    category_lift_smoothing: float = 0.01  # a in log((share + a) / (base + a))
    # a second wide part: the news side holds its title's TF-IDF vector projected on this many
    # latent dimensions (LSA of all the dataset's titles), the user side the mean of its clicks'
    # blocks under a learned weight, so the dot product holds a learned multiple of the classic
    # content-based score (docs/decisions.md: why); it reads the title's words with either text
    # encoder (beside the PLM's states with text_encoder=plm); 0 = off
    title_match_dim: int = 0

    def __post_init__(self) -> None:
        _choice(self, "encoder", ("fastformer", "mhsa"))
        _choice(self, "text_encoder", ("words", "plm"))
        _choice(self, "news_views", ("sum", "attention"))
        _positive(self, "embedding_dim", "hidden_size", "num_heads", "num_layers", "pooling_hidden", "user_interests",
                  "plm_max_len", "plm_batch_size", "max_entities", "entity_dim")
        _non_negative(self, "user_num_layers", "plm_finetune_layers", "title_match_dim")
        if not self.category_lift_smoothing > 0:
            raise ConfigError(f"model.category_lift_smoothing={self.category_lift_smoothing} must be > 0")
        if self.interest_disagreement < 0:
            raise ConfigError(f"model.interest_disagreement={self.interest_disagreement} must be >= 0")
        if self.interest_disagreement and self.user_interests == 1:
            raise ConfigError("model.interest_disagreement applies to model.user_interests > 1; "
                              "set model.user_interests or unset it")
        if not 0.0 <= self.word_dropout < 1.0:
            raise ConfigError(f"model.word_dropout={self.word_dropout} must be in [0, 1)")
        if self.text_encoder == "plm":
            if not self.plm_name:
                raise ConfigError("model.text_encoder=plm needs model.plm_name (a Hugging Face model "
                                  "folder or hub id), e.g. -o model.plm_name=PATH")
            if self.word_dropout or self.freeze_embeddings:
                raise ConfigError("model.word_dropout and model.freeze_embeddings apply to "
                                  "model.text_encoder=words only; unset them with text_encoder=plm")
        elif self.plm_name or self.plm_finetune_layers:
            raise ConfigError("model.plm_name and model.plm_finetune_layers apply to "
                              "model.text_encoder=plm only; set model.text_encoder=plm or unset them")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model.hidden_size={self.hidden_size} must be divisible by "
                f"model.num_heads={self.num_heads}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout={self.dropout} must be in [0, 1)")


@dataclass
class TrainConfig:
    """First-stage training (NRMS objective) and its bookkeeping."""

    epochs: int = 3
    max_steps: int = 0  # 0 = no limit; else stop after this many optimizer steps
    batch_size: int = 32  # impressions' clicks per step (global batch under torchrun)
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 100
    grad_clip: float = 1.0
    npratio: int = 4  # non-clicks drawn per click, afresh each epoch
    seed: int = 42
    device: str = "cpu"  # "cpu" | "cuda" | "auto"
    bf16: bool = False  # bf16 autocast for matrix products
    num_workers: int = 1  # batch-building threads off the main thread (0 = inline)
    log_every_steps: int = 50
    checkpoint_every_steps: int = 0  # 0 = only at the end of each epoch
    early_stopping_patience: int = 2  # epochs without held-out AUC gain before stopping
    eval_batch_size: int = 1024
    dev_max_impressions: int = 0  # 0 = whole dev split for the per-epoch report (never selects)
    fit_splits: str = "train"  # comma-separated labelled splits whose union is the fit log, e.g. "train,dev"
    holdout_fraction: float = 0.1  # latest share (by time) of the fit log held out to pick the best
    #                                epoch and early-stop; 0 = no selection, the last epoch is kept
    bucket_size: int = 64  # pad the unique-news count of a batch up to a multiple of this
    num_threads: int = 0  # torch intra-op threads (0 = every core of this process's share of the
    #                       machine; the batch-building threads are light)
    news_cache_refresh_steps: int = 0  # 0 = off: every news of a batch is encoded with gradients.
    #   k > 0: history news read their vectors from a cache of detached news vectors; a cached vector
    #   serves the k steps from the one that computed it (k = 1: fresh every step) and is then
    #   re-encoded (eval mode, no gradient). Candidate news are always encoded with gradients.
    news_cache_refresh_grad: bool = False  # with the cache: re-encode the due history news inside the
    #   step, in train mode and with gradients (SpeedyRec's way), so the history side trains the news
    #   encoder too; slower per step (docs/decisions.md, "News-vector cache")

    def __post_init__(self) -> None:
        _positive(self, "epochs", "batch_size", "npratio", "log_every_steps", "eval_batch_size",
                  "bucket_size")
        _non_negative(self, "max_steps", "warmup_steps", "num_workers", "checkpoint_every_steps",
                      "early_stopping_patience", "dev_max_impressions", "num_threads",
                      "news_cache_refresh_steps")
        _choice(self, "device", ("cpu", "cuda", "auto"))
        if self.news_cache_refresh_grad and not self.news_cache_refresh_steps:
            raise ConfigError("train.news_cache_refresh_grad applies to the news-vector cache only; "
                              "set train.news_cache_refresh_steps > 0 or unset it")
        if self.lr <= 0:
            raise ConfigError(f"train.lr={self.lr} must be > 0")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ConfigError(f"train.holdout_fraction={self.holdout_fraction} must be in [0, 1) "
                              f"(0 = no held-out selection)")
        names = self.fit_split_names
        unknown = [n for n in names if n not in ("train", "dev", "test")]
        if not names or unknown or len(set(names)) != len(names):
            raise ConfigError(f"train.fit_splits={self.fit_splits!r}: expected distinct split names "
                              f"(train, dev, test) separated by commas, e.g. train,dev")

    @property
    def fit_split_names(self) -> list[str]:
        """``fit_splits`` as a list, in the order given."""
        return [n.strip() for n in self.fit_splits.split(",") if n.strip()]


RERANK_USE = ("auto", "always", "never")  # rerank.use: follow the guard, or force either stage
FIRST_STAGE_SOURCES = ("auto", "retriever", "refit")  # rerank.first_stage


@dataclass
class RerankConfig:
    """Second stage: candidate-aware Fastformer re-ranker with popularity/freshness/retrieval signals."""

    hidden_size: int = 64  # re-ranker width d (its inputs are the frozen first-stage news vectors)
    num_heads: int = 4
    num_layers: int = 1
    dropout: float = 0.1
    history_len: int = 0  # most recent clicks read per candidate; 0 = data.history_len
    popularity_prior: float = 20.0  # pseudo-impressions shrinking click-through toward the mean
    npratio: int = 4  # impression non-clicks drawn per click, afresh each epoch
    hard_negatives: int = 0  # retrieved never-shown news added per training sample as negatives
    #                          (0: impression negatives only; see docs/decisions.md, "Hard negatives")
    hard_negative_pool: int = 50  # hard negatives are drawn from the first stage's top this-many
    max_train_impressions: int = 0  # 0 = every impression of the re-ranker's slice; else its most recent this-many
    train_fraction: float = 0.1  # the latest share of the train log the re-ranker learns from (by time);
    #                              0.1 = the retriever's own held-out slice at train.holdout_fraction=0.1
    guard_fraction: float = 0.3  # the latest share of that slice held out: epoch selection and the guard
    first_stage: str = "auto"  # where the slice's out-of-sample first-stage scores come from: "retriever"
    #                            (it never trained on the slice: the slice is later than its training
    #                            rows), "refit" (a first stage with the retriever's config fit on the log
    #                            before the slice), "auto" (retriever where that holds, else refit)
    # the two-stage model wins its guard when its AUC gain (cross-fitted, paired per impression) is
    # guard_auc_z standard errors above guard_auc_margin, and its nDCG@10 gain is not guard_ndcg_z
    # standard errors below -guard_ndcg_tolerance (not surely worse)
    guard_auc_margin: float = 0.0
    guard_auc_z: float = 0.0  # 0: the gain's estimate decides (positive expected gain)
    guard_ndcg_tolerance: float = 0.002
    guard_ndcg_z: float = 1.645  # one-sided 95%
    use: str = "auto"  # where a re-ranker is given: "auto" (only if it won its guard) | "always" | "never"
    epochs: int = 20  # at most; the epoch with the best guard AUC is kept
    patience: int = 3  # stop after this many epochs without a better guard AUC (0 = run every epoch)
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    seed: int = 42
    eval_batch_size: int = 128  # impressions per re-ranking batch when scoring a split

    def __post_init__(self) -> None:
        _positive(self, "hidden_size", "num_heads", "num_layers", "epochs", "batch_size", "npratio",
                  "hard_negative_pool", "eval_batch_size")
        _non_negative(self, "hard_negatives", "popularity_prior", "history_len", "max_train_impressions")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"rerank.hidden_size={self.hidden_size} must be divisible by "
                              f"rerank.num_heads={self.num_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"rerank.dropout={self.dropout} must be in [0, 1)")
        if self.lr <= 0:
            raise ConfigError(f"rerank.lr={self.lr} must be > 0")
        for name in ("train_fraction", "guard_fraction"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ConfigError(f"rerank.{name}={getattr(self, name)} must be in (0, 1)")
        _non_negative(self, "guard_ndcg_tolerance", "guard_auc_z", "guard_ndcg_z", "patience")
        _choice(self, "use", RERANK_USE)
        _choice(self, "first_stage", FIRST_STAGE_SOURCES)


@dataclass
class BaselineConfig:
    """Hand-made baselines scored from the dataset artifact alone (``newsrec evaluate --baseline``)."""

    share_smoothing: float = 0.01  # a in log((share + a) / (base + a)): shares below ~a count as absent
    popularity_prior: float = 20.0  # pseudo-impressions shrinking a news' train click-through to the mean
    logreg_c: float = 1.0  # inverse L2 strength of the logistic regression (standardised features)
    logreg_max_rows: int = 1_000_000  # train candidates the regression is fitted on (seeded sample of
    #                                   impressions above; 0.5M and 2M gave the same coefficients to 0.01)
    seed: int = 42
    title_match_dim: int = 128  # title-match: latent dimensions of the titles' TF-IDF (LSA)

    def __post_init__(self) -> None:
        _non_negative(self, "popularity_prior")
        _positive(self, "share_smoothing", "logreg_c", "logreg_max_rows", "title_match_dim")


@dataclass
class IndexConfig:
    """FAISS inner-product index over news vectors.

    Approximate kinds (hnsw, ivf, ivfsq, ivfpq) search an L2 index over the news vectors extended by one
    coordinate sqrt(M² − ‖x‖²) (M = the largest norm at build time): nearest in L2 there is largest
    inner product here. Search parameters are recorded in the index manifest at build time."""

    kind: str = "auto"  # "auto" | "flat" | "hnsw" | "ivf" | "ivfsq" | "ivfpq"
    flat_max: int = 200_000  # auto: exact search up to this many news, ann_kind above
    ann_kind: str = "ivfsq"  # the approximate kind auto picks above flat_max: "ivf" | "ivfsq" | "hnsw" | "ivfpq"
    device: str = "auto"  # "auto" (a GPU when faiss-gpu sees one) | "cpu" | "cuda"
    hnsw_m: int = 32  # graph neighbours per node
    hnsw_ef_search: int = 256  # search beam; raised to the number of rows asked for when larger
    hnsw_ef_construction: int = 100
    ivf_nlist: int = 0  # 0 = 4*sqrt(n)
    ivf_nprobe: int = 64  # inverted lists visited per query
    ivf_train_size: int = 100_000  # vectors sampled to train the coarse quantiser (and PQ)
    pq_m: int = 32  # sub-quantisers of IVF-PQ (the extended vector is zero-padded to a multiple)
    pq_k_factor: int = 8  # IVF-PQ proposes k * pq_k_factor rows, re-scored exactly, to return k
    sq_k_factor: int = 2  # IVF-SQ (8-bit codes) proposes k * sq_k_factor rows, re-scored exactly
    search_threads: int = 0  # faiss threads of an online search (< 16 queries); 0 = every core
    # (the service searches one batch at a time; with serve.batch_max=1, searches run side by side: use 1)
    build_threads: int = 0  # faiss threads while building; 0 = every core
    encode_batch_size: int = 1024  # news titles per encoder call when building
    seed: int = 42

    def __post_init__(self) -> None:
        _choice(self, "kind", ("auto", "flat", "hnsw", "ivf", "ivfsq", "ivfpq"))
        _choice(self, "ann_kind", ("hnsw", "ivf", "ivfsq", "ivfpq"))
        _choice(self, "device", ("auto", "cpu", "cuda"))
        _positive(self, "flat_max", "hnsw_m", "hnsw_ef_search", "hnsw_ef_construction",
                  "ivf_nprobe", "ivf_train_size", "pq_m", "pq_k_factor", "sq_k_factor",
                  "encode_batch_size")
        _non_negative(self, "ivf_nlist", "build_threads", "search_threads")


@dataclass
class ServeConfig:
    """Online recommendation service (``newsrec recommend`` and ``newsrec serve``)."""

    retrieve_k: int = 200  # candidates retrieved from the index before re-ranking
    default_k: int = 10  # items returned when a request gives no k
    max_k: int = 100  # largest k a request may ask for
    max_history: int = 2000  # most news ids a request's history may hold
    max_body_bytes: int = 1_000_000  # larger request bodies are refused with 413
    max_title_chars: int = 1000  # longest title POST /news accepts
    ignore_unknown_history: bool = False  # true: drop unknown history ids instead of answering 422
    latency_window: int = 10_000  # recent requests kept for the latency percentiles
    torch_threads: int = 1  # intra-op threads of the model calls: concurrent requests share the cores
    batch_max: int = 8  # most concurrent requests run as one batched model call; 1 = each on its own
    max_fresh_news: int = 100_000  # fresh news kept (POST /news); beyond it the oldest are evicted
    admin_token: str = ""  # bearer token the write endpoints require ("" = $NEWSREC_ADMIN_TOKEN, else none)
    allow_open_writes: bool = False  # serve on a non-loopback host without an admin token anyway
    host: str = "127.0.0.1"
    port: int = 8000

    def __post_init__(self) -> None:
        _positive(self, "retrieve_k", "default_k", "max_k", "max_history", "max_body_bytes",
                  "max_title_chars", "latency_window", "torch_threads", "batch_max", "port",
                  "max_fresh_news")
        if self.default_k > self.max_k:
            raise ConfigError(f"serve.default_k={self.default_k} must be <= serve.max_k={self.max_k}")


@dataclass
class TrackingConfig:
    """MLflow experiment tracking."""

    tracking_uri: str = ""  # "" = $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working folder
    experiment: str = "newsrec"
    register_name: str = ""  # "" = do not register the model
    enabled: bool = True


@dataclass
class PipelineConfig:
    """End-to-end pipeline (``newsrec pipeline run CONFIG``): where data comes from, what runs."""

    name: str = "demo"  # outputs go to <root>/<name>/
    root: str = "data/runs"
    source: str = "synth"  # "synth" | "mind-small" | "mind-large" | "folder"
    synth_size: str = "small"  # for source=synth: tiny | demo | small | medium | large
    synth_seed: int = 0
    raw_dir: str = ""  # source=folder: folder holding the train/dev/test zips or folders
    baselines: bool = True  # also train the MHSA baseline and score popularity for comparison
    rerank: bool = True  # train and evaluate the second stage
    top_k: int = 100  # batch scoring: news per user
    submit_split: str = "test"

    def __post_init__(self) -> None:
        _choice(self, "source", ("synth", "mind-small", "mind-large", "folder"))
        _positive(self, "top_k")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    rerank: RerankConfig = field(default_factory=RerankConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """``{"section.key": value}`` — the form logged as MLflow params."""
        return {f"{s}.{k}": v for s, sec in self.to_dict().items() for k, v in sec.items()}

    def to_yaml(self) -> str:
        """The config as saved beside outputs; the admin token (a secret, read by `serve` from
        its command) is never written."""
        raw = self.to_dict()
        raw["serve"]["admin_token"] = ""
        return yaml.safe_dump(raw, sort_keys=False)


# ---------------------------------------------------------------------------------------------
# loading


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Defaults <- YAML file (if any) <- ``section.key=value`` overrides, validated as a whole."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}".splitlines()[0]) from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, got {type(loaded).__name__}")
        raw = loaded
    return config_from_dict(raw, overrides=overrides, source=str(path) if path else "config")


# keys of earlier releases: (section, old name) -> (new name, the old value as the new key's value).
# Saved configs (beside models) are translated; a user's config or override naming one is refused.
RENAMED_KEYS: dict[tuple[str, str], tuple[str, Any]] = {
    ("rerank", "refit_first_stage"): ("first_stage", lambda refit: "refit" if refit else "retriever"),
}


def config_from_dict(raw: dict[str, Any], overrides: Iterable[str] = (), source: str = "config",
                     translate_renamed: bool = False) -> Config:
    merged: dict[str, dict[str, Any]] = {}
    errors: list[str] = []
    sections = {f.name: f.type for f in dataclasses.fields(Config)}
    for section, values in raw.items():
        if section not in sections:
            errors.append(f"{source}: unknown section '{section}' (valid: {', '.join(sections)})")
            continue
        if values is None:
            continue
        if not isinstance(values, dict):
            errors.append(f"{source}: section '{section}' must be a mapping")
            continue
        merged.setdefault(section, {}).update(values)
    for item in overrides:
        key, sep, text = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot:
            errors.append(f"override '{item}': expected section.key=value (e.g. train.epochs=2)")
            continue
        if section not in sections:
            errors.append(f"override '{item}': unknown section '{section}' (valid: {', '.join(sections)})")
            continue
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        merged.setdefault(section, {})[name] = value
    for (section, old), (new, translate) in RENAMED_KEYS.items():
        if old not in merged.get(section, {}):
            continue
        if translate_renamed:
            merged[section].setdefault(new, translate(merged[section].pop(old)))
        else:
            errors.append(f"{source}: {section}.{old} was renamed {section}.{new} (see its comment in "
                          f"newsrec/config.py)")
    built: dict[str, Any] = {}
    for section, values in merged.items():
        try:
            built[section] = _build_section(_section_class(section), section, values)
        except ConfigError as exc:
            errors.append(str(exc))
    if errors:
        raise ConfigError("; ".join(errors))
    return Config(**built)


def config_from_yaml_text(text: str) -> Config:
    return config_from_dict(yaml.safe_load(text) or {}, source="saved config", translate_renamed=True)


def _section_class(section: str) -> type:
    hints = typing.get_type_hints(Config)
    return hints[section]


def _build_section(cls: type, section: str, values: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in values if k not in hints]
    if unknown:
        raise ConfigError(
            f"unknown key{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(f'{section}.{k}' for k in unknown)} (valid: {', '.join(valid)})"
        )
    typed = {k: _coerce(f"{section}.{k}", hints[k], v) for k, v in values.items()}
    return cls(**typed)


def _coerce(name: str, typ: Any, value: Any) -> Any:
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}={value!r}: expected true or false")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{name}={value!r}: expected an integer")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{name}={value!r}: expected a number")
    if typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{name}={value!r}: expected a string")
    return value


def _positive(obj: Any, *names: str) -> None:
    for n in names:
        if getattr(obj, n) <= 0:
            raise ConfigError(f"{_section_name(obj)}.{n}={getattr(obj, n)} must be > 0")


def _non_negative(obj: Any, *names: str) -> None:
    for n in names:
        if getattr(obj, n) < 0:
            raise ConfigError(f"{_section_name(obj)}.{n}={getattr(obj, n)} must be >= 0")


def _choice(obj: Any, name: str, choices: tuple[str, ...]) -> None:
    if getattr(obj, name) not in choices:
        raise ConfigError(
            f"{_section_name(obj)}.{name}={getattr(obj, name)!r}: expected one of {', '.join(choices)}"
        )


def _section_name(obj: Any) -> str:
    return type(obj).__name__.removesuffix("Config").lower()


# ---------------------------------------------------------------------------------------------
# precedence: what an artifact fixes and what a command may override
#
# A dataset artifact fixes the ingest options its titles and vocabulary were built with. A saved
# model fixes its architecture and the data shapes it was trained on (every model.* and data.*
# key). A command may set what it runs with: serving and recommending take serve.* and index.*
# (search-time settings) from the command; everything else comes from the saved model. A setting
# merely left at its default takes the artifact's value; a setting given with another value than
# the artifact's is refused in one line naming the artifact, never silently ignored. The result is
# the config that is actually used (and saved beside every output).

DATASET_FIXED = ("data.title_len", "data.lowercase", "data.min_word_count", "data.max_vocab",
                 "data.on_bad_rows", "data.missing_news")
MODEL_FIXED_SECTIONS = ("data", "model")
SERVING_SECTIONS = ("serve", "index")
# single settings of other sections that a serving command may give too (whether to re-rank)
SERVING_KEYS = ("rerank.use",)


def _with_values(config: Config, values: dict[str, Any]) -> Config:
    """A copy of ``config`` with ``{"section.key": value}`` replaced (validated again)."""
    raw = config.to_dict()
    for key, value in values.items():
        section, _, name = key.partition(".")
        raw[section][name] = value
    return config_from_dict(raw)


def apply_dataset(config: Config, manifest: dict[str, Any], *, artifact: str) -> Config:
    """``config`` with the settings a dataset artifact fixes (``DATASET_FIXED``) taken from its
    manifest (``options``: the data section it was ingested with). ConfigError naming the artifact
    when one of them was set to another value than the artifact's."""
    recorded = dict(manifest.get("options") or {})
    if "title_len" in manifest:
        recorded["title_len"] = manifest["title_len"]
    defaults = Config().flat()
    given = config.flat()
    take: dict[str, Any] = {}
    for key in DATASET_FIXED:
        name = key.split(".", 1)[1]
        if name not in recorded or recorded[name] == given[key]:
            continue
        if given[key] != defaults[key]:
            raise ConfigError(
                f"{key}={given[key]!r}: the dataset {artifact} was ingested with {name}="
                f"{recorded[name]!r}, which it fixes; drop the setting, or ingest again with "
                f"-o {key}={given[key]}")
        take[key] = recorded[name]
    return _with_values(config, take) if take else config


def apply_saved_model(given: Config, saved: Config, *, artifact: str,
                      command_sections: tuple[str, ...] = SERVING_SECTIONS) -> Config:
    """The config a command runs a saved model with: ``saved`` (what the model at ``artifact`` was
    trained with), with ``command_sections`` taken from ``given``. Any other setting of ``given``
    left at its default is ignored; one given with another value than the model's is refused (a
    saved model fixes model.* and data.*; other sections are not read by the command)."""
    defaults = Config().flat()
    mine = given.flat()
    theirs = saved.flat()
    for key, value in mine.items():
        section = key.split(".", 1)[0]
        if section in command_sections or key in SERVING_KEYS or value == defaults[key] or value == theirs[key]:
            continue
        if section in MODEL_FIXED_SECTIONS:
            raise ConfigError(f"{key}={value!r}: the model {artifact} was trained with {theirs[key]!r}, "
                              f"which it fixes ({', '.join(s + '.*' for s in MODEL_FIXED_SECTIONS)}); "
                              f"drop the setting, or train a model with it")
        raise ConfigError(f"{key}={value!r}: not used here (this command takes "
                          f"{', '.join(s + '.*' for s in command_sections)}; other settings come from "
                          f"the model {artifact})")
    return _with_values(saved, {k: v for k, v in mine.items()
                                if k.split(".", 1)[0] in command_sections or k in SERVING_KEYS})


def saved_model_config(config_path: str | Path | None, overrides: Iterable[str], model_dir: str | Path,
                       *, config_file: str = "config.yaml") -> Config:
    """``-c FILE`` and ``-o`` overrides resolved against the model saved in ``model_dir``
    (``apply_saved_model``): the config `newsrec index`, `recommend` and `serve` run with."""
    saved_path = Path(model_dir) / config_file
    given = load_config(config_path, overrides)
    if not saved_path.is_file():
        return given
    saved = config_from_dict(yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {},
                             source=str(saved_path), translate_renamed=True)
    return apply_saved_model(given, saved, artifact=str(model_dir))

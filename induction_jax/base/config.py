"""Typed, frozen run configuration: YAML files with `base:` inheritance plus dotted overrides.

OmegaConf does the typed merging (unknown keys, wrong types); `validate` adds the cross-field rules. Every user
mistake surfaces as a `ConfigError` whose message is one line naming the file and the key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONFIG_FILE = "config.yaml"  # the resolved config in a run directory, which the trainer writes last
MAX_VOCAB = 65_536  # tokens are stored as uint16
POSITIONS = ("shortformer", "learned", "rotary", "none")
COPYING_MEASURES = ("ov", "evaluator")  # eval.copying_measure: heads.ov_copying or heads.copying
POS_TABLES = ("learned", "sinusoidal")
DTYPES = ("float32", "bfloat16")
ATTENTION = ("fused", "explicit")  # model.attention (induction_jax/model/attention.py)
ATTENTION_KERNELS = ("auto", "blocked", "dot_product", "splash")  # model.attention_kernel (attention.kernel_for)
SPLASH_TILE = 128  # the splash kernel's blocks are multiples of this, so the context must be too
REMAT = ("none", "block", "dots")  # model.remat: recompute nothing, each whole block, or all but its matmuls


class UserError(ValueError):
    """A mistake in what the user gave (file, key, value, directory); commands print its one-line message."""


class ConfigError(UserError):
    """A user mistake in a config file or override; the message is a single line."""


def first_line(e: BaseException, *, with_type: bool = False, limit: int = 200) -> str:
    """An exception's message cut to its first line (and `limit` characters), for one-line errors; the exception
    type's name when the message is empty, or in front of it with `with_type`."""
    lines = str(e).strip().splitlines()
    line = lines[0].strip() if lines else ""
    if len(line) > limit:
        line = line[:limit] + "..."
    if not line:
        return type(e).__name__
    return f"{type(e).__name__}: {line}" if with_type else line


@dataclass(frozen=True)
class ModelConfig:
    n_layers: int = 2
    d_model: int = 256
    n_heads: int = 8
    d_mlp: int = 0  # 0 = attention-only
    positions: str = "shortformer"
    pos_table: str = "learned"  # shortformer table: learned (the paper) or fixed sinusoidal
    smeared_key: bool = False
    smear_init: float = 0.5  # sigma(alpha) at init; 0.5 mixes each key half with its predecessor
    context: int = 256
    vocab_size: int = 4096
    local_heads: int = 0  # per layer, the last `local_heads` heads are local (windowed)
    local_window: int = 256
    layer_norm: bool = True
    ln_eps: float = 1e-5
    init_std: float = 0.02
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype
    head_dim: int = 0  # 0 = d_model // n_heads; larger gives each head's OV circuit more rank than d_model allows
    # The training loss's attention: fused (no T x T patterns kept; induction_jax/model/attention.py) or explicit.
    # Everything that reads patterns (analysis, ablations, captures, probes) runs the explicit path either way.
    attention: str = "fused"
    # The fused path's kernel: auto (splash on TPU, jax.nn.dot_product_attention on GPU, blocked elsewhere) or one
    # of them by name.
    attention_kernel: str = "auto"
    # Query block of the blocked kernel (causal blocks skip the keys after them); the splash kernel takes the
    # largest multiple of 128 that divides the context and is at most this, clipped to 128..512, as its tile.
    attention_block: int = 128
    remat: str = "none"
    loss_chunk: int = 0  # positions unembedded at a time in the training loss (0 = all); bounds the logits' memory

    @property
    def d_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads


@dataclass(frozen=True)
class WeightedSource:
    """A `data.sources` entry of a weighted mixture, written `{path: ..., weight: ...}`."""
    path: str
    weight: float  # > 0; the loader draws this source's share of windows as weight / sum of weights


@dataclass(frozen=True)
class DataConfig:
    # Each entry a path (str): one corpus, the sources' documents concatenated. Or every entry a WeightedSource:
    # a mixture, each source's windows drawn in proportion to its weight (data/dataset.py, MixtureLoader).
    # Typed Any because OmegaConf has no str-or-mapping union; `build` normalises the entries.
    sources: tuple[Any, ...] = ("python-stdlib",)
    site_packages: bool = False  # with python-stdlib: also the interpreter's site-packages
    text_field: str = "text"  # the field (JSONL) or column (parquet, arrow, HF datasets) holding the text
    tokenizer: str = ""  # path to an existing tokenizer.json; empty = train one; required for pre-tokenized sources
    tokenizer_sample_bytes: int = 256 << 20  # the trained tokenizer sees at most this much train text
    workers: int = 0  # processes that read and tokenize while preparing; 0 = one per CPU core
    eval_fraction: float = 0.03  # share of files held out (chosen by a hash of the path)
    eval_examples: int = 10_000
    eval_length: int = 512
    seed: int = 0  # data order; all models of a family share it
    eval_seed: int = 0  # the eval set and the head evaluators' random draws: fixed across data orders
    cache_dir: str = ""  # empty = $INDUCTION_JAX_CACHE or ~/.cache/induction_jax

    @property
    def source_paths(self) -> tuple[str, ...]:
        """Every source's path, weighted or not."""
        return tuple(s.path if isinstance(s, WeightedSource) else s for s in self.sources)

    @property
    def source_weights(self) -> tuple[float, ...] | None:
        """The mixture's weights, in source order; None for an unweighted corpus."""
        if self.sources and isinstance(self.sources[0], WeightedSource):
            return tuple(s.weight for s in self.sources)
        return None


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 8  # global sequences per step
    lr: float = 1e-3
    seed: int = 0  # parameter init
    warmup_steps: int = 100
    warmup_tokens: int = 0  # when > 0, overrides warmup_steps
    decay: str = "constant"  # constant | cosine
    min_lr_ratio: float = 0.1  # cosine floor / cooldown end as a fraction of lr
    cooldown_steps: int = 0  # constant decay only: linear fall to min_lr_ratio * lr over the last N steps
    b1: float = 0.9
    b2: float = 0.95
    weight_decay: float = 0.01
    weight_decay_step: int = 0  # when > 0, weight decay becomes weight_decay_after from this step
    weight_decay_after: float = 0.0
    grad_clip: float = 1.0
    resume_every: int = 200
    log_every: int = 1
    probe_every: int = 100  # live ICL / prefix-matching probes; 0 = off
    probe_examples: int = 32


@dataclass(frozen=True)
class AdaptiveConfig:
    """Extra snapshots while the live probe moves fast (training/adaptive.py); off while `every` is 0."""
    every: int = 0  # while dense, a snapshot at every multiple of this step
    icl_rate: float = 0.0  # |change of the probe's ICL score| per million tokens (nats) that densifies; 0 = unwatched
    prefix_rate: float = 0.0  # |change of the probe's max prefix matching| per million tokens; 0 = unwatched
    window: int = 3  # a rate is measured between the first and the last of this many consecutive probes
    settle: int = 2  # consecutive probes below every threshold that end a dense stretch
    budget: int = 100  # at most this many snapshots beyond the base schedule, over the whole run


@dataclass(frozen=True)
class SnapshotsConfig:
    every: int = 0
    until: int = 0  # 0 = no limit
    powers_of_two: tuple[int, ...] = ()  # [a, b] -> steps 2^a .. 2^b
    steps: tuple[int, ...] = ()
    adaptive: AdaptiveConfig = field(default_factory=AdaptiveConfig)


@dataclass(frozen=True)
class MeshConfig:
    data: int = 1
    fsdp: int = -1  # -1 = all remaining devices
    tensor: int = 1


@dataclass(frozen=True)
class EvalConfig:
    batch_size: int = 32
    icl_early: int = 50  # token indices at context 512; scaled by context/512 for shorter windows
    icl_late: int = 500
    icl_window: int = 10  # +-positions averaged in live probes and plots
    draws: int = 10  # random draws per head evaluator
    prefix_tokens: int = 25
    repeats: int = 4
    exclude_common: float = 0.05  # fraction of the vocabulary excluded at each end of the frequency ranking
    prefix_threshold: float = 0.4
    copying_threshold: float = 0.0
    copying_measure: str = "ov"  # classifies induction heads: ov (OV-circuit eigenvalues) or evaluator


PLACEMENTS = ("auto", "replicated", "sharded")  # analysis.placement


@dataclass(frozen=True)
class AnalysisConfig:
    """How analyze/ablate place a snapshot (analysis/placement.py); read from the run's config, overridable on the
    command line. Training ignores it."""
    dtype: str = "float32"  # parameters as restored and the forward passes' compute dtype: float32 or bfloat16
    # auto: replicated on every device where the parameters fit one, else sharded over the mesh.* mesh with the
    # training's parameter shardings.
    placement: str = "auto"
    fit_fraction: float = 0.25  # auto: the share of one device's memory the replicated parameters may take


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    snapshots: SnapshotsConfig = field(default_factory=SnapshotsConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)


def _read_chain(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[str, dict]]:
    """The YAML file and its `base:` ancestors (relative to each file), base-most first, as (path, dict)."""
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory, not a config file; name a YAML file in it")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: base: forms a cycle")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({first_line(e)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    base = raw.pop("base", None)
    parents = _read_chain(path.parent / base, seen + (path.resolve(),)) if base else []
    return parents + [(str(path), raw)]


def _one_line(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None)
    msg = first_line(e)
    return f"{key}: {msg}" if key else msg


def build(layers: Sequence[tuple[str, dict]] = (), overrides: Sequence[str] = ()) -> Config:
    """Merges (source, dict) layers and dotted `key=value` overrides onto the defaults; validates."""
    merged = OmegaConf.structured(Config)
    # Frozen dataclasses make every node read-only (OmegaConf 2.3 marks each section itself, not just the root).
    OmegaConf.set_readonly(merged, False)
    for section in merged:
        OmegaConf.set_readonly(merged[section], False)
    for source, data in layers:
        try:
            merged = OmegaConf.merge(merged, OmegaConf.create(data))
        except OmegaConfBaseException as e:
            raise ConfigError(f"{source}: {_one_line(e)}") from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"command line: override {item!r} is not of the form section.key=value")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as e:
            raise ConfigError(f"command line: {_one_line(e)}") from None
        except yaml.YAMLError as e:  # from_dotlist parses each value as YAML and lets the parser's errors out
            why = getattr(e, "problem", None) or first_line(e)
            raise ConfigError(f"command line: {item!r}: the value is not valid YAML ({why})") from None
    source = layers[-1][0] if layers else "<defaults>"
    if overrides:
        source += " + command line"
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{source}: {_one_line(e)}") from None
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, sources=_sources(cfg.data.sources, source)))
    validate(cfg, source)
    return cfg


def _sources(entries: Sequence[Any], source: str) -> tuple[str | WeightedSource, ...]:
    """`data.sources` as plain paths (str) or, when the entries carry weights, WeightedSource entries; a malformed
    entry, a weight that is not a number > 0, or a list mixing weighted and unweighted entries is a ConfigError."""

    def fail(key: str, why: str):
        raise ConfigError(f"{source}: {key}: {why}")

    out: list[str | WeightedSource] = []
    for i, entry in enumerate(entries):
        key = f"data.sources[{i}]"
        if isinstance(entry, WeightedSource):  # a config built from a Config (e.g. config.yaml's round trip)
            entry = dataclasses.asdict(entry)
        if not isinstance(entry, dict):
            if entry is None or isinstance(entry, (list, tuple)):
                fail(key, f"{entry!r} is neither a path nor a {{path: ..., weight: ...}} mapping")
            out.append(str(entry))
            continue
        unknown = sorted(set(entry) - {"path", "weight"})
        if unknown:
            fail(key, f"unknown key {unknown[0]!r}; a weighted source is {{path: ..., weight: ...}}")
        path, weight = entry.get("path"), entry.get("weight")
        if not isinstance(path, str) or not path:
            fail(f"{key}.path", "missing; a weighted source is {path: ..., weight: ...}" if path is None
                 else f"{path!r} is not a path")
        if weight is None:
            fail(f"{key}.weight", f"missing for {path!r}; give every source a weight, or none")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            fail(f"{key}.weight", f"{weight!r} is not a number")
        if not 0 < weight < float("inf"):  # also NaN
            fail(f"{key}.weight", f"must be > 0, got {weight!r}")
        out.append(WeightedSource(path, float(weight)))
    weighted = [isinstance(e, WeightedSource) for e in out]
    if any(weighted) and not all(weighted):
        plain = weighted.index(False)
        fail(f"data.sources[{plain}].weight", f"missing for {out[plain]!r} while data.sources[{weighted.index(True)}] "
             "has one; give every source a weight, or none")
    if any(weighted):
        seen: dict[str, int] = {}
        for i, e in enumerate(out):
            if e.path in seen:
                fail(f"data.sources[{i}].path", f"{e.path!r} is also data.sources[{seen[e.path]}]; a mixture names "
                     "each source once")
            seen[e.path] = i
    return tuple(out)


def resolve_path(path: str | Path) -> Path:
    """A config path as given, or else relative to the project checkout (so `configs/...` works anywhere)."""
    path = Path(path)
    if not path.exists() and not path.is_absolute():
        shipped = Path(__file__).resolve().parents[2] / path  # induction_jax/base/config.py -> the checkout
        if shipped.exists():
            return shipped
    return path


def load(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Loads a YAML config (or the defaults when path is None) and applies dotted overrides."""
    return build(_read_chain(resolve_path(path)) if path is not None else [], overrides)


def from_dict(data: dict, source: str = "<dict>") -> Config:
    return build([(source, data)])


def validate(cfg: Config, source: str = "<config>") -> None:
    m, t = cfg.model, cfg.train

    def fail(key: str, why: str):
        raise ConfigError(f"{source}: {key}: {why}")

    for key, val in [("model.n_layers", m.n_layers), ("model.d_model", m.d_model), ("model.n_heads", m.n_heads),
                     ("model.context", m.context), ("model.vocab_size", m.vocab_size),
                     ("train.batch_size", t.batch_size), ("train.steps", t.steps)]:
        if val < 1:
            fail(key, f"must be >= 1, got {val}")
    if m.head_dim < 0:
        fail("model.head_dim", f"{m.head_dim} is negative (0 means d_model // n_heads)")
    if not m.head_dim and m.d_model % m.n_heads:
        fail("model.d_model", f"{m.d_model} is not divisible by model.n_heads={m.n_heads} (or set model.head_dim)")
    if m.vocab_size > MAX_VOCAB:
        fail("model.vocab_size", f"{m.vocab_size} exceeds {MAX_VOCAB} (tokens are stored as uint16)")
    if m.positions not in POSITIONS:
        fail("model.positions", f"{m.positions!r} is not one of {', '.join(POSITIONS)}")
    if m.attention not in ATTENTION:
        fail("model.attention", f"{m.attention!r} is not one of {', '.join(ATTENTION)}")
    if m.attention_kernel not in ATTENTION_KERNELS:
        fail("model.attention_kernel", f"{m.attention_kernel!r} is not one of {', '.join(ATTENTION_KERNELS)}")
    if m.attention_kernel == "splash" and m.context % SPLASH_TILE:
        fail("model.attention_kernel", f"splash needs model.context divisible by {SPLASH_TILE}, got {m.context}")
    if m.remat not in REMAT:
        fail("model.remat", f"{m.remat!r} is not one of {', '.join(REMAT)}")
    if m.loss_chunk < 0:
        fail("model.loss_chunk", f"{m.loss_chunk} must be >= 0")
    if m.attention_block < 1:
        fail("model.attention_block", f"{m.attention_block} must be >= 1")
    if m.pos_table not in POS_TABLES:
        fail("model.pos_table", f"{m.pos_table!r} is not one of {', '.join(POS_TABLES)}")
    for key, val in [("model.dtype", m.dtype), ("model.param_dtype", m.param_dtype)]:
        if val not in DTYPES:
            fail(key, f"{val!r} is not one of {', '.join(DTYPES)}")
    if m.d_mlp < 0:
        fail("model.d_mlp", f"must be >= 0, got {m.d_mlp}")
    if not 0 <= m.local_heads <= m.n_heads:
        fail("model.local_heads", f"{m.local_heads} is not between 0 and model.n_heads={m.n_heads}")
    if m.local_heads and not 1 <= m.local_window <= m.context:
        fail("model.local_window", f"{m.local_window} must be between 1 and model.context={m.context}")
    if m.smeared_key:
        if m.positions == "rotary":
            fail("model.smeared_key", "cannot be combined with rotary positions (it would mix keys rotated "
                 "to different positions)")
        if not 0.0 < m.smear_init < 1.0:
            fail("model.smear_init", f"{m.smear_init} must be strictly between 0 and 1 (it is sigma(alpha))")
    if m.positions == "rotary" and m.d_head % 2:
        fail("model.n_heads", f"rotary positions need an even d_head, got {m.d_head}")
    if cfg.analysis.dtype not in DTYPES:
        fail("analysis.dtype", f"{cfg.analysis.dtype!r} is not one of {', '.join(DTYPES)}")
    if cfg.analysis.placement not in PLACEMENTS:
        fail("analysis.placement", f"{cfg.analysis.placement!r} is not one of {', '.join(PLACEMENTS)}")
    if not 0 < cfg.analysis.fit_fraction <= 1:
        fail("analysis.fit_fraction", f"{cfg.analysis.fit_fraction} must be in (0, 1]")
    if cfg.eval.copying_measure not in COPYING_MEASURES:
        fail("eval.copying_measure", f"{cfg.eval.copying_measure!r} is not one of {', '.join(COPYING_MEASURES)}")
    if t.decay not in ("constant", "cosine"):
        fail("train.decay", f"{t.decay!r} is not one of constant, cosine")
    if t.cooldown_steps < 0 or t.cooldown_steps > t.steps:
        fail("train.cooldown_steps", f"{t.cooldown_steps} must be between 0 and train.steps ({t.steps})")
    if t.cooldown_steps and t.decay != "constant":
        fail("train.cooldown_steps", f"applies to the constant schedule, not to decay={t.decay!r}")
    if not t.lr > 0:  # also NaN
        fail("train.lr", f"must be > 0, got {t.lr}")
    if t.resume_every < 1:
        fail("train.resume_every", f"must be >= 1, got {t.resume_every}")
    if t.log_every < 1:
        fail("train.log_every", f"must be >= 1, got {t.log_every}")
    if t.probe_every < 0:
        fail("train.probe_every", f"must be >= 0 (0 = no probes), got {t.probe_every}")
    if t.probe_every and t.probe_examples < 1:
        fail("train.probe_examples", f"must be >= 1 while probes are on (train.probe_every={t.probe_every}), "
             f"got {t.probe_examples}")
    snap = cfg.snapshots
    for key, val in [("snapshots.every", snap.every), ("snapshots.until", snap.until)]:
        if val < 0:
            fail(key, f"must be >= 0 (0 = off), got {val}")
    negative = [s for s in snap.steps if s < 0]
    if negative:
        fail("snapshots.steps", f"steps must be >= 0, got {negative}")
    beyond = [s for s in snap.steps if s > t.steps]
    if beyond:
        one = len(beyond) == 1
        fail("snapshots.steps", f"{beyond} {'is' if one else 'are'} beyond train.steps={t.steps}, so never taken; "
             f"remove {'it' if one else 'them'} or raise train.steps")
    for key, val in [("data.seed", cfg.data.seed), ("data.eval_seed", cfg.data.eval_seed)]:
        if val < 0:  # numpy's seed sequences take no negative entropy: the first epoch or the eval set would fail
            fail(key, f"must be >= 0, got {val}")
    if not 0 < cfg.data.eval_fraction < 1:
        fail("data.eval_fraction", f"{cfg.data.eval_fraction} must be strictly between 0 and 1")
    if not cfg.data.sources:
        fail("data.sources", "is empty")
    if not all(isinstance(s, (str, WeightedSource)) for s in cfg.data.sources):
        fail("data.sources", "entries must be paths or {path: ..., weight: ...} mappings")
    if cfg.data.source_weights is not None and cfg.data.eval_examples < len(cfg.data.sources):
        fail("data.eval_examples", f"{cfg.data.eval_examples} is fewer than the mixture's {len(cfg.data.sources)} "
             "sources, and its eval set takes windows from each")
    if cfg.data.tokenizer_sample_bytes < 1:
        fail("data.tokenizer_sample_bytes", f"must be >= 1, got {cfg.data.tokenizer_sample_bytes}")
    if cfg.data.workers < 0:
        fail("data.workers", f"must be >= 0 (0 = one per CPU core), got {cfg.data.workers}")
    if cfg.data.eval_length < 2:
        fail("data.eval_length", f"must be >= 2, got {cfg.data.eval_length}")
    need = 1 + cfg.eval.prefix_tokens * cfg.eval.repeats
    if need > m.context:
        fail("eval.prefix_tokens", f"{cfg.eval.prefix_tokens} tokens x eval.repeats={cfg.eval.repeats} + BOS = "
             f"{need} exceeds model.context={m.context}")
    p2 = cfg.snapshots.powers_of_two
    if p2 and (len(p2) != 2 or p2[0] > p2[1] or p2[0] < 0):
        fail("snapshots.powers_of_two", f"{list(p2)} must be [a, b] with 0 <= a <= b")
    _validate_adaptive(cfg, fail)
    for key, val in [("mesh.data", cfg.mesh.data), ("mesh.fsdp", cfg.mesh.fsdp), ("mesh.tensor", cfg.mesh.tensor)]:
        if val == 0 or val < -1:
            fail(key, f"must be a positive size or -1 (fill), got {val}")
    if m.n_heads % max(cfg.mesh.tensor, 1):
        fail("mesh.tensor", f"{cfg.mesh.tensor} does not divide model.n_heads={m.n_heads}")


def _validate_adaptive(cfg: Config, fail) -> None:
    a = cfg.snapshots.adaptive
    if a.every < 0:
        fail("snapshots.adaptive.every", f"must be >= 0 (0 = off), got {a.every}")
    for key, val in [("snapshots.adaptive.icl_rate", a.icl_rate), ("snapshots.adaptive.prefix_rate", a.prefix_rate)]:
        if not 0 <= val < float("inf"):  # also NaN
            fail(key, f"must be a finite rate >= 0 (0 = not watched), got {val}")
    if not a.every:
        return
    if not cfg.train.probe_every:
        fail("snapshots.adaptive.every", "adaptive snapshots follow the live probe; set train.probe_every > 0")
    if not (a.icl_rate or a.prefix_rate):
        fail("snapshots.adaptive.every", "no threshold to watch; set snapshots.adaptive.icl_rate or prefix_rate > 0")
    if a.window < 2:
        fail("snapshots.adaptive.window", f"must be >= 2 (a rate needs two probes), got {a.window}")
    if a.settle < 1:
        fail("snapshots.adaptive.settle", f"must be >= 1, got {a.settle}")
    if a.budget < 1:
        fail("snapshots.adaptive.budget", f"must be >= 1 while adaptive snapshots are on, got {a.budget}")


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def diff(a: Config, b: Config) -> list[str]:
    """Dotted keys whose values differ, as 'key: a -> b'."""
    out = []

    def walk(prefix: str, x: dict, y: dict) -> None:
        for k in x:
            if isinstance(x[k], dict):
                walk(f"{prefix}{k}.", x[k], y[k])
            elif x[k] != y[k]:
                out.append(f"{prefix}{k}: {x[k]!r} -> {y[k]!r}")

    walk("", to_dict(a), to_dict(b))
    return out

"""The eval set a run is scored on, kept in its run directory (eval_set.npz), so that analysing a run needs neither
the data cache nor a tokenizer.

The trainer writes it before config.yaml: the windows every snapshot is scored on [N, L], each window's random
token index [N], the hash the results store is keyed by, the BOS id, and the pool of token ids the randomised head
evaluators draw from (the corpus's tokens between the `eval.exclude_common` most and least common; docs/method.md
§4), and for a weighted mixture each window's source. A run directory without the file (written by an older
version) is refused: re-running the trainer on it writes the file.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..base import atomic
from ..base.config import CONFIG_FILE, Config, UserError, first_line
from . import build
from .dataset import Prepared

FILE = "eval_set.npz"


@dataclass(frozen=True)
class EvalSet:
    tokens_NL: np.ndarray  # int32
    random_index_N: np.ndarray  # int32, in 1..L-1
    eval_hash: str  # build.sha256_eval of the two above
    bos_id: int
    pool_P: np.ndarray  # int32 token ids the head evaluators' random tokens are drawn from
    exclude: float  # the eval.exclude_common that chose the pool
    # A weighted mixture's: each window's source (int32 [N], an index into source_names), drawn per source
    # (data/build.py, mixture_eval_offsets); None and () for an unweighted corpus.
    source_N: np.ndarray | None = None
    source_names: tuple[str, ...] = ()


def from_prepared(prepared: Prepared, exclude: float) -> EvalSet:
    tokens_NL, index_N = prepared.eval_set()
    mix = prepared.mixture
    return EvalSet(tokens_NL, index_N, prepared.eval_hash, prepared.bos_id,
                   np.asarray(prepared.candidate_tokens(exclude), np.int32), float(exclude),
                   prepared.eval_sources(), tuple(mix["sources"]) if mix else ())


def save(run_dir: str | Path, es: EvalSet) -> Path:
    buf = io.BytesIO()
    sources = {} if es.source_N is None else {"source": es.source_N.astype(np.int32),
                                              "source_names": np.array(es.source_names, np.str_)}
    np.savez(buf, tokens=es.tokens_NL.astype(np.uint16), random_index=es.random_index_N.astype(np.int32),
             eval_hash=np.str_(es.eval_hash), bos_id=np.int64(es.bos_id), pool=es.pool_P.astype(np.int32),
             exclude=np.float64(es.exclude), **sources)
    return atomic.write(Path(run_dir) / FILE, buf.getvalue())


def load(run_dir: str | Path) -> EvalSet | None:
    """The run directory's eval set, checked against its hash; None when the directory has none."""
    path = Path(run_dir) / FILE
    if not path.exists():
        return None
    try:
        with np.load(path) as f:
            mixed = "source" in f.files
            es = EvalSet(f["tokens"].astype(np.int32), f["random_index"].astype(np.int32), str(f["eval_hash"]),
                         int(f["bos_id"]), f["pool"].astype(np.int32), float(f["exclude"]),
                         f["source"].astype(np.int32) if mixed else None,
                         tuple(str(n) for n in f["source_names"]) if mixed else ())
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"{path}: unreadable eval set ({first_line(e)}); {_rewrite(run_dir)}") from None
    if build.sha256_eval(es.tokens_NL, es.random_index_N, es.source_N) != es.eval_hash:
        raise UserError(f"{path}: the eval set does not match its hash; {_rewrite(run_dir)}")
    return es


def _rewrite(run_dir: str | Path) -> str:
    run_dir = Path(run_dir)
    return (f"re-run the trainer on the run with this version, which writes it (python -m induction_jax.train "
            f"--config {run_dir / CONFIG_FILE} --run-dir {run_dir}), or retrain")


def for_run(run_dir: str | Path, cfg: Config) -> EvalSet:
    """The run's stored eval set, for `cfg` (the run's config.yaml). A run directory without one was written by
    an earlier version, and one whose token pool is for another `eval.exclude_common` does not match its config:
    both are refused in one line."""
    es = load(run_dir)
    if es is None:
        raise UserError(f"{run_dir}: no {FILE}: a run directory of an earlier version; {_rewrite(run_dir)}")
    if es.exclude != cfg.eval.exclude_common:
        raise UserError(f"{Path(run_dir) / FILE}: holds the token pool of eval.exclude_common={es.exclude:g}, "
                        f"{CONFIG_FILE} has {cfg.eval.exclude_common:g}; {_rewrite(run_dir)}")
    return es

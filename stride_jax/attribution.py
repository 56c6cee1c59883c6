"""An attribution's result and its run directory: this module writes and reads every result file.

:class:`Attribution` holds the scores (``scores[q, i] > 0``: training on example ``i`` lowers query
``q``'s loss) and what produced them. :meth:`Attribution.write` and :meth:`Attribution.load` sit
side by side, so the files below have one owner; the CLI's ``evaluate``, ``counterfactual``,
``select`` and ``report`` read them through :meth:`Attribution.load`.

==================  ==============================================================================
file                contents
==================  ==============================================================================
``scores.npy``      ``[Q, n]`` float32 scores (dense runs)
``scores_topk.npz`` per query the ``k`` largest and most negative scores (:class:`TopScores`;
                    ``scores=topk`` runs, instead of ``scores.npy``)
``ids.json``        ``{"queries": [Q ids], "train": [n ids]}``
``per_query.npz``   ``y [Q, K]`` responses, ``base_loss [Q]``, ``estimator [Q]``, and for
                    regression-decoded runs ``lambda [Q]``, ``intercept [Q]`` and ``cv_r2 [Q]``
                    (the held-out fraction of the responses' variance the chosen fit explains,
                    from its subset cross-validation; absent when no cross-validation ran)
``topk.jsonl``      one line per query: its top proponents and opponents with ids, scores, texts
``tokens.json``     per-token attribution of the first queries (:mod:`stride_jax.apps.tokens`)
``selfinf.json``    ``{"ids": [n], "score": [n]}``: self-influence of every training row
``run_info.json``   what made the run (:func:`write_run_info`): the model's identity (path,
                    parameter count, fingerprint, reader layer), the method and operators, each
                    stage's wall time, and the operator-training loss curve (trained operators)
==================  ==============================================================================

``estimator`` names what produced each query's scores: ``closed_form`` (closed-form operators,
``operators=closed_form``: no subsets, so ``y`` is ``[Q, 0]`` and there is no penalty nor
intercept, and ``lambda``/``intercept`` are absent rather than NaN), or ``lasso`` / ``ridge``
(trained operators decoded by that regression, with its penalty ``lambda`` and ``intercept``),
or for a run of another method (``attribute --method``, :mod:`stride_jax.methods`) that method:
``ekfac``, ``trak``, ... or a mixture ``mix:stride=0.4,ekfac=0.6`` (no ``y``, ``lambda`` or
``intercept``).

``stride-jax score`` writes ``scores.npy`` and ``ids.json`` only, which :meth:`Attribution.load`
reads too (the per-query arrays are then ``None``). The Attributor adds ``attribute.yaml`` and
its stage directories, :mod:`stride_jax.apps.report` ``report.html`` and
:mod:`stride_jax.apps.select` ``selected.jsonl``; :data:`RUN_ARTIFACTS` lists everything a run
directory may hold (``--overwrite`` removes it, :mod:`stride_jax.io.outdir`).

Nothing non-finite is written: :meth:`Attribution.write` checks every array before it writes
any file (:class:`~stride_jax.errors.NonFiniteError`), and :meth:`Attribution.load` refuses
scores holding NaN/inf.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np

from stride_jax.errors import ConfigError, DataError, NonFiniteError
from stride_jax.io.atomic import (atomic_write_text, json_text, load_npy, save_npy, save_npz,
                                  write_json)

__all__ = ["Attribution", "CLOSED_FORM", "CONFIG", "IDS", "METHOD_STAGES", "PER_QUERY", "REPORT",
           "RUN_ARTIFACTS",
           "SCORES", "SCORES_TOPK", "SELECTED", "SELFINF", "SELF_STAMPED", "STAGES", "TOKENS",
           "TOPK", "TopScores", "read_estimators", "read_ids", "topk_texts", "write_ids",
           "write_selfinf", "write_tokens"]

SCORES = "scores.npy"
SCORES_TOPK = "scores_topk.npz"
IDS = "ids.json"
PER_QUERY = "per_query.npz"
TOPK = "topk.jsonl"
TOKENS = "tokens.json"
SELFINF = "selfinf.json"
RUN_INFO = "run_info.json"
# A query whose regression explains less than this fraction of its responses' held-out variance
# is flagged "weak signal" (report, topk.jsonl): its scores are mostly the solver's prior.
WEAK_SIGNAL_R2 = 0.05
REPORT = "report.html"           # stride_jax.apps.report
SELECTED = "selected.jsonl"      # stride_jax.apps.select
CONFIG = "attribute.yaml"        # the Attributor's config
# The Attributor's stage directories, and the CLI's streamed training rows (tokens/).
STAGES = ("design", "operators", "responses", "solve", "selfinf", "tokens")
# The stage directories of the other methods (stride_jax.methods): K-FAC/EK-FAC factors, and
# each method's scores under methods/<method>/.
METHOD_STAGES = ("factors", "methods")
# Everything a run directory may hold: --overwrite removes all of it (stride_jax.io.outdir),
# except the stage directories that check their own stamps (SELF_STAMPED, which replace
# themselves when their arguments differ).
RUN_ARTIFACTS = (SCORES, SCORES_TOPK, TOPK, IDS, PER_QUERY, TOKENS, SELFINF, REPORT, SELECTED,
                 CONFIG, RUN_INFO) + STAGES + METHOD_STAGES
SELF_STAMPED = ("design", "operators", "tokens") + METHOD_STAGES

CLOSED_FORM = "closed_form"      # the estimator of closed-form operators (per_query.npz)

RUN_HINT = ("pass the --out directory of `stride-jax attribute` or `stride-jax score` (it holds "
            "scores.npy or scores_topk.npz, and ids.json), or a directory written by "
            "Attribution.write")


class TopScores(NamedTuple):
    """Sparse scores: per query, the ``k`` largest positive scores (proponents) and the ``k``
    most negative (opponents), best first; index -1 (score 0) pads a query with fewer."""

    pro_index: np.ndarray        # [Q, k] int64
    pro_score: np.ndarray        # [Q, k] float32
    opp_index: np.ndarray        # [Q, k] int64
    opp_score: np.ndarray        # [Q, k] float32

    @classmethod
    def from_dense(cls, w_qn: np.ndarray, k: int) -> "TopScores":
        """Keep the top ``k`` of each row of ``w_qn`` (order: score, then index, as
        :meth:`Attribution.top` on the dense matrix)."""
        w = np.asarray(w_qn, np.float32)
        Q, n = w.shape
        k_eff = min(k, n)
        out = []
        for sign in (1.0, -1.0):
            v = sign * w
            cand = (np.argpartition(-v, k_eff - 1, axis=1)[:, :k_eff] if k_eff < n
                    else np.broadcast_to(np.arange(n), (Q, n)))
            idx = np.full((Q, k), -1, np.int64)
            val = np.zeros((Q, k), np.float32)
            for q in range(Q):
                c = cand[q]
                c = c[np.lexsort((c, -v[q, c]))]
                c = c[v[q, c] > 0]
                idx[q, :c.size], val[q, :c.size] = c, w[q, c]
            out += [idx, val]
        return cls(*out)

    @classmethod
    def empty(cls, num_queries: int, k: int) -> "TopScores":
        """``num_queries`` rows of padding only (a start for streamed top-k merges)."""
        return cls(np.full((num_queries, k), -1, np.int64), np.zeros((num_queries, k), np.float32),
                   np.full((num_queries, k), -1, np.int64), np.zeros((num_queries, k), np.float32))

    @classmethod
    def concat(cls, parts: Sequence["TopScores"]) -> "TopScores":
        return cls(*(np.concatenate(a) for a in zip(*parts)))

    @property
    def num_queries(self) -> int:
        return int(self.pro_index.shape[0])

    def save(self, path: str | Path) -> None:
        save_npz(path, **self._asdict())

    @classmethod
    def load(cls, path: str | Path, *, hint: str = RUN_HINT) -> "TopScores":
        try:
            with np.load(path, allow_pickle=False) as z:
                missing = [f for f in cls._fields if f not in z.files]
                if missing:
                    raise DataError(f"{path} lacks {', '.join(missing)}, so it is not a top-k "
                                    f"scores file; {hint}")
                top = cls(**{f: z[f] for f in cls._fields})
        except (ValueError, OSError, EOFError) as e:
            if isinstance(e, DataError):
                raise
            raise DataError(f"{path} is not a top-k scores file ({e}); {hint}") from None
        shapes = {a.shape for a in top}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise DataError(f"{path} holds arrays of shapes {[a.shape for a in top]}, not four "
                            f"[queries, k] arrays; {hint}")
        _refuse_nonfinite_scores(path, np.concatenate([top.pro_score, top.opp_score], axis=1))
        return top


class Attribution(NamedTuple):
    """Scores and what produced them: the dense matrix ``scores_qn``, or with ``scores=topk``
    only each query's top scores (``top_scores``; ``scores_qn`` is None).

    Read back from a run directory (:meth:`load`), the ids are None when no ``ids.json`` lies
    beside the scores, and the per-query arrays when the run stored none (``stride-jax score``).
    Closed-form runs have no regression: ``y_qk`` is ``[Q, 0]`` and ``lam_q``/``intercept_q``
    are None; ``estimator_q`` says which (module docstring).
    """

    scores_qn: np.ndarray | None  # [Q, n] float32; positive = the example lowers the query's loss
    query_ids: list[str] | None
    train_ids: list[str] | None
    y_qk: np.ndarray | None = None           # [Q, K] responses ([Q, 0]: closed form)
    base_loss_q: np.ndarray | None = None    # [Q] the base model's mean per-token loss
    lam_q: np.ndarray | None = None          # [Q] penalty of each query's fit (None: closed form)
    intercept_q: np.ndarray | None = None    # [Q] (None: closed form)
    top_scores: TopScores | None = None
    estimator_q: np.ndarray | None = None    # str [Q]: 'closed_form', 'lasso', 'ridge' or a
                                             # method of stride_jax.methods ('ekfac', ...)
    cv_r2_q: np.ndarray | None = None        # [Q] held-out R^2 of the chosen fit (None: no
                                             # regression or no cross-validation)

    @property
    def num_queries(self) -> int:
        return int(self.scores_qn.shape[0] if self.scores_qn is not None
                   else self.top_scores.num_queries)

    def top(self, q: int, k: int = 10) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
        """Top ``k`` proponents (largest positive scores) and opponents (most negative) of query q."""
        if self.scores_qn is None:
            t = self.top_scores
            if k > t.pro_index.shape[1]:
                raise ConfigError(f"only the top {t.pro_index.shape[1]} scores per query were "
                                  f"kept (scores=topk); ask for at most that many, or rerun with "
                                  f"a larger topk or scores=dense")
            return ([(int(i), float(s)) for i, s in zip(t.pro_index[q, :k], t.pro_score[q, :k])
                     if i >= 0],
                    [(int(i), float(s)) for i, s in zip(t.opp_index[q, :k], t.opp_score[q, :k])
                     if i >= 0])
        s = self.scores_qn[q]
        order = np.argsort(-s, kind="stable")
        pro = [(int(i), float(s[i])) for i in order[:k] if s[i] > 0]
        opp = [(int(i), float(s[i])) for i in order[::-1][:k] if s[i] < 0]
        return pro, opp

    # -- the run directory ---------------------------------------------------------------------
    def write(self, out_dir: str | Path, *, train_texts: Sequence[str] | None = None,
              query_texts: Sequence[str] | None = None, k: int = 10) -> Path:
        """``scores.npy`` (or ``scores_topk.npz`` when only the top scores were kept),
        ``ids.json``, ``per_query.npz`` and ``topk.jsonl`` (ids, scores and, when given, texts)
        in ``out_dir``; see the module docstring. :meth:`load` reads them back.

        Every array is checked before any file is written: NaN/inf anywhere raises
        :class:`NonFiniteError` and leaves ``out_dir`` untouched."""
        out = Path(out_dir)
        Q = self.num_queries
        qids = self.query_ids if self.query_ids is not None else [str(q) for q in range(Q)]
        n = self.scores_qn.shape[1] if self.scores_qn is not None else None
        tids = self.train_ids if self.train_ids is not None else [str(i) for i in range(n or 0)]
        scores = self.scores_qn if self.scores_qn is not None else np.concatenate(
            [self.top_scores.pro_score, self.top_scores.opp_score], axis=1)
        per_query = {name: np.asarray(a) for name, a in (
            ("y", self.y_qk), ("base_loss", self.base_loss_q), ("lambda", self.lam_q),
            ("intercept", self.intercept_q), ("estimator", self.estimator_q),
            ("cv_r2", self.cv_r2_q)) if a is not None}
        for name, values in (("scores", scores), *per_query.items()):
            _refuse_nonfinite(out, name, values, qids)
        lines = []
        for q, qid in enumerate(qids):
            pro, opp = self.top(q, k)

            def entry(i, s):
                e = {"id": tids[i], "index": i, "score": s}
                if train_texts is not None:
                    e["text"] = train_texts[i]
                return e

            rec: dict[str, Any] = {"query_id": qid}
            if self.base_loss_q is not None:
                rec["base_loss"] = float(self.base_loss_q[q])
            if self.estimator_q is not None:
                rec["estimator"] = str(self.estimator_q[q])
            if self.lam_q is not None:
                rec["lambda"] = float(self.lam_q[q])
            if self.cv_r2_q is not None:
                rec["cv_r2"] = float(self.cv_r2_q[q])
                rec["weak_signal"] = bool(self.cv_r2_q[q] < WEAK_SIGNAL_R2)
            rec["proponents"] = [entry(i, s) for i, s in pro]
            rec["opponents"] = [entry(i, s) for i, s in opp]
            if query_texts is not None:
                rec["query_text"] = query_texts[q]
            lines.append(json_text(rec, what=str(out / TOPK), ensure_ascii=False))
        out.mkdir(parents=True, exist_ok=True)
        # One scores file: load() would read an earlier run's other one first.
        if self.scores_qn is not None:
            save_npy(out / SCORES, np.asarray(self.scores_qn, np.float32))
            (out / SCORES_TOPK).unlink(missing_ok=True)
        else:
            self.top_scores.save(out / SCORES_TOPK)
            (out / SCORES).unlink(missing_ok=True)
        write_ids(out / IDS, qids, tids)
        if per_query:
            save_npz(out / PER_QUERY, **per_query)
        else:   # a per_query.npz of an earlier run would be read back as this run's
            (out / PER_QUERY).unlink(missing_ok=True)
        atomic_write_text(out / TOPK, "\n".join(lines) + "\n")
        return out

    @classmethod
    def load(cls, path: str | Path, *, mmap: bool = False, hint: str = RUN_HINT) -> "Attribution":
        """Read a run directory written by :meth:`write`, ``stride-jax attribute`` or
        ``stride-jax score``: dense (``scores.npy``) or top-k (``scores_topk.npz``) scores.

        Args:
          path: the run directory (its ``ids.json`` is required), or one scores file in it
            (``ids.json`` beside it is read when present).
          mmap: memory-map ``scores.npy`` instead of reading it (large runs).
          hint: what to pass instead, appended to every error (each is one line naming the file).
        """
        path = Path(path)
        if not path.exists():
            if path.suffix in (".npy", ".npz"):
                raise FileNotFoundError(f"no scores file {path}; {hint}")
            raise FileNotFoundError(f"run directory {path} does not exist; {hint}")
        if path.is_dir():
            run = path
            scores_path = next((run / f for f in (SCORES, SCORES_TOPK) if (run / f).is_file()),
                               None)
            if scores_path is None:
                raise FileNotFoundError(f"{run} has no {SCORES}; {hint}")
            if not (run / IDS).is_file():
                raise FileNotFoundError(f"{run} has no {IDS} (the query and training ids); "
                                        f"{hint}")
        else:
            run, scores_path = path.parent, path
        if scores_path.suffix == ".npz":
            top, scores = TopScores.load(scores_path, hint=hint), None
            Q, n = top.num_queries, None
        else:
            top = None
            scores = load_npy(scores_path, what=".npy array of scores", hint=hint,
                              mmap_mode="r" if mmap else None)
            if scores.dtype.kind not in "fiu":
                what = {"U": "text", "S": "bytes", "b": "booleans", "c": "complex numbers",
                        "M": "dates", "m": "time spans"}.get(scores.dtype.kind, "records")
                raise DataError(f"{scores_path} holds {what} (dtype {scores.dtype.str}), not "
                                f"real-valued scores; {hint}")
            if scores.ndim != 2:
                raise DataError(f"{scores_path} holds an array of shape {scores.shape}, not "
                                f"[queries, train] scores; {hint}")
            _refuse_nonfinite_scores(scores_path, scores)
            Q, n = scores.shape
        query_ids = train_ids = None
        if (run / IDS).is_file():
            query_ids, train_ids = read_ids(run / IDS, hint=hint)
            if len(query_ids) != Q or (n is not None and len(train_ids) != n):
                shape = scores.shape if scores is not None else (Q, "k")
                raise DataError(f"{scores_path} has shape {shape} but {run / IDS} lists "
                                f"{len(query_ids)} queries x {len(train_ids)} training examples;"
                                f" the files are from different runs: rerun the attribution")
        per_query: dict[str, np.ndarray] = {}
        if (run / PER_QUERY).is_file():
            try:
                with np.load(run / PER_QUERY, allow_pickle=False) as z:
                    per_query = {f: z[f] for f in z.files}
            except (ValueError, OSError, EOFError) as e:
                raise DataError(f"{run / PER_QUERY} is not a per-query arrays file ({e}); "
                                f"delete it or rerun the attribution") from None
            bad = [f for f, a in per_query.items() if a.ndim < 1 or a.shape[0] != Q]
            if bad:
                raise DataError(f"{run / PER_QUERY}: {', '.join(bad)} not over the {Q} queries "
                                f"of {scores_path}; the files are from different runs: rerun "
                                f"the attribution")
        return cls(scores, query_ids, train_ids, per_query.get("y"), per_query.get("base_loss"),
                   per_query.get("lambda"), per_query.get("intercept"), top,
                   per_query.get("estimator"), per_query.get("cv_r2"))


def _refuse_nonfinite_scores(path: Path, scores: np.ndarray) -> None:
    """A scores file holding NaN/inf is broken (writers refuse them, so something else wrote
    it): :class:`DataError`. Memory-mapped scores are checked a block of rows at a time."""
    if scores.dtype.kind != "f" or scores.size == 0:
        return
    rows = max(1, (1 << 24) // max(1, scores.shape[1]))
    bad = sum(int(scores.shape[1] * len(block) - np.count_nonzero(np.isfinite(block)))
              for block in (scores[i:i + rows] for i in range(0, scores.shape[0], rows)))
    if bad:
        raise DataError(f"{path} holds {bad} NaN/inf score(s) of {scores.size}; the scores are "
                        f"broken: rerun the command that wrote them")


def _refuse_nonfinite(out: Path, name: str, values: np.ndarray, query_ids: Sequence[str]) -> None:
    """Raise :class:`NonFiniteError` when a numeric per-query array (rows = queries) holds
    NaN/inf, naming the first query."""
    values = np.asarray(values)
    if not np.issubdtype(values.dtype, np.number):
        return
    bad = ~np.isfinite(values)
    if bad.any():
        q = int(np.argwhere(bad)[0][0])
        raise NonFiniteError(
            f"refusing to write the scores to {out}: {int(bad.sum())} {name} value(s) are NaN or "
            f"infinite (first: query {query_ids[q]!r}); nothing was written (a computation "
            f"upstream went wrong: rerun with -v for where)")


def read_ids(path: str | Path, *, hint: str = RUN_HINT) -> tuple[list[str], list[str]]:
    """``(query_ids, train_ids)`` of an ``ids.json``."""
    path = Path(path)
    try:
        ids = json.loads(path.read_text(encoding="utf-8"))
        return [str(i) for i in ids["queries"]], [str(i) for i in ids["train"]]
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path} is not an ids file ({type(e).__name__}: {e}); it must be "
                        f'{{"queries": [...], "train": [...]}}: {hint}') from None


def write_ids(path: str | Path, query_ids: Sequence[str], train_ids: Sequence[str]) -> None:
    """``ids.json``: the query and training ids, in score order (ground truths have one too)."""
    write_json(path, {"queries": list(query_ids), "train": list(train_ids)})


def read_estimators(run_dir: str | Path) -> list[str]:
    """What produced a run's scores: the distinct ``estimator`` values of its ``per_query.npz``
    in order of appearance (``closed_form``, ``ridge``, ``ekfac``, a mixture, ...); empty when
    the run stored none (``stride-jax score``) or the file is unreadable (:meth:`Attribution.load`
    reports that)."""
    path = Path(run_dir) / PER_QUERY
    try:
        with np.load(path, allow_pickle=False) as z:
            values = z["estimator"] if "estimator" in z.files else np.array([])
    except (ValueError, OSError, EOFError):
        return []
    return list(dict.fromkeys(str(v) for v in np.asarray(values).reshape(-1)))


def topk_texts(run_dir: str | Path) -> dict[str, str]:
    """Training id -> text, for the examples ``topk.jsonl`` lists with their text (only those
    some query ranked among its top proponents or opponents; empty without the file). Texts
    are a convenience: a damaged line loses only its own texts."""
    texts: dict[str, str] = {}
    path = Path(run_dir) / TOPK
    if not path.is_file():
        return texts
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line) if line.strip() else {}
        except ValueError:
            continue
        if not isinstance(rec, dict):
            continue
        for e in rec.get("proponents", []) + rec.get("opponents", []):
            if isinstance(e, dict) and "text" in e and "id" in e:
                texts.setdefault(str(e["id"]), str(e["text"]))
    return texts


def write_run_info(out_dir: str | Path, info: dict) -> Path:
    """``run_info.json``: what made the run (:meth:`stride_jax.attributor.Attributor.run_info`:
    ``model``, ``method``, ``operators``, ``stage_seconds``, ``history``)."""
    path = Path(out_dir) / RUN_INFO
    write_json(path, info, indent=1)
    return path


def read_run_info(run_dir: str | Path) -> dict | None:
    """``run_info.json`` of a run directory, or None when there is none. A damaged file raises
    :class:`DataError` naming it."""
    path = Path(run_dir) / RUN_INFO
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({type(e).__name__}); delete it (the report "
                        f"then omits the model and stage times) or rerun the attribution") from None
    if not isinstance(info, dict):
        raise DataError(f"{path} must hold a JSON object; delete it or rerun the attribution")
    return info


def write_tokens(out_dir: str | Path, payload: dict) -> Path:
    """``tokens.json``: the payload of :func:`stride_jax.apps.tokens.token_report`."""
    path = Path(out_dir) / TOKENS
    write_json(path, payload, ensure_ascii=False)
    return path


def write_selfinf(out_dir: str | Path, ids: Sequence[str], score_n: np.ndarray) -> Path:
    """``selfinf.json``: every training row's self-influence, in training order."""
    path = Path(out_dir) / SELFINF
    write_json(path, {"ids": list(ids), "score": [float(v) for v in score_n]})
    return path

"""One call from responses to attribution scores: :func:`solve` with a :class:`SolveConfig`.

Estimators (``SolveConfig.estimator``), per query q, intercept b_q unpenalised in both:

* ``lasso``: ``1/2 ||y_q - M w - b_q 1||^2 + lam_q ||w||_1`` (FISTA, :mod:`._fista`), lam_q from
  ``lam`` or chosen by ``lam_rule`` (:mod:`._lambda`). Suits sparse influence.
* ``ridge``: ``1/2 ||y_q - M w - b_q 1||^2 + alpha_q / 2 ||w||^2``, exact, in dual form over
  subsets (:mod:`._ridge`); alpha_q = ``lam`` when given, else chosen by cross-validation over
  the subsets on a grid relative to the mean eigenvalue of the centred subset Gram. Suits dense
  influence.
* ``auto`` (default): both cross-validations on the same folds of subsets (same ``key``); each
  query keeps the estimator with the lower held-out squared error (ties go to the Lasso). With a
  fixed ``lam`` or ``lam_rule='support'`` it is the Lasso. Measured on the faithfulness tasks:
  the digits MLP's influence is sparse (Lasso LDS .35, ridge .19, auto .35), the language
  models' is dense (Lasso .07/.09, ridge .18/.23, auto .17/.22).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Literal, NamedTuple

import jax
import numpy as np

from stride_jax.config import option
from stride_jax.solve._fista import fista
from stride_jax.solve._jaxopt import jaxopt_lasso
from stride_jax.solve._lambda import cross_validate_lambda, select_lambda_support
from stride_jax.solve._ridge import cross_validate_ridge, ridge
from stride_jax.subsets import Design

__all__ = ["SolveConfig", "SolveOutput", "solve"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SolveConfig:
    """Recovery of per-example influence from the response matrix y[query, subset]: a per-query
    Lasso, ridge, or whichever of the two cross-validates better (``estimator``)."""

    estimator: Literal["lasso", "ridge", "auto"] = option(
        "auto", "per-query estimator: 'lasso' (sparse influence), 'ridge' (dense influence; "
                 "exact, closed form) or 'auto' (cross-validate both on the same subset folds, "
                 "keep the lower held-out error per query; with a fixed lam or lam_rule="
                 "'support' it is the Lasso)")
    solver: Literal["fista", "jaxopt"] = option(
        "fista", "Lasso solver: our working-set FISTA, or jaxopt's ProximalGradient (reference)")
    lam: float | None = option(
        None, "penalty for every query (the Lasso's lam, or the ridge's alpha with "
              "estimator='ridge'); null chooses one per query by lam_rule")
    lam_rule: Literal["cv", "support"] = option(
        "cv", "automatic lam: 'cv' (cross-validation over subsets) or 'support' (largest lam "
              "with at least target_support nonzeros)")
    cv_folds: int = option(3, "folds of subsets for lam_rule='cv'")
    cv_patience: int | None = option(
        3, "stop the CV path once every query's error has been worse than its best for this "
           "many grid points; null walks the whole grid")
    target_support: int = option(50, "nonzeros wanted by lam_rule='support'")
    grid_size: int = option(20, "lam values on the geometric grid from lambda_max down")
    min_ratio: float = option(1e-3, "smallest grid lam as a fraction of lambda_max")
    ridge_grid_size: int = option(
        13, "ridge alphas on the geometric CV grid (estimator 'ridge' or 'auto' with lam=null)")
    ridge_ratio_min: float = option(
        1e-3, "smallest ridge alpha as a multiple of the mean eigenvalue of the centred subset "
              "Gram M_c M_c^T")
    ridge_ratio_max: float = option(
        1e3, "largest ridge alpha as a multiple of the mean eigenvalue of the centred subset Gram")
    ridge_refine: bool = option(
        True, "refine each query's cross-validated ridge alpha between its neighbouring grid "
              "points (golden-section search on the CV error), so alpha and the scores move "
              "continuously with the responses instead of jumping a grid step on rounding")
    fit_intercept: bool = option(
        True, "fit an unpenalised per-query intercept (absorbs a shift shared by all operators)")
    max_iter: int = option(2000, "most proximal-gradient iterations per query and solve")
    tol: float = option(
        1e-5, "stopping tolerance: duality gap <= tol * ||y - mean y||^2 for fista; jaxopt's "
              "fixed-point residual for jaxopt")
    query_chunk: int = option(256, "queries solved together (bounds memory)")

    def __post_init__(self) -> None:
        if self.estimator not in ("lasso", "ridge", "auto"):
            raise ValueError(
                f"estimator must be 'lasso', 'ridge' or 'auto', got {self.estimator!r}")
        if self.solver not in ("fista", "jaxopt"):
            raise ValueError(f"solver must be 'fista' or 'jaxopt', got {self.solver!r}")
        if self.lam_rule not in ("cv", "support"):
            raise ValueError(f"lam_rule must be 'cv' or 'support', got {self.lam_rule!r}")
        if self.estimator == "ridge" and self.lam is None and self.lam_rule != "cv":
            raise ValueError(
                f"estimator={self.estimator!r} chooses its penalty by cross-validation and needs "
                f"lam_rule='cv' (got {self.lam_rule!r}); 'support' applies to the Lasso only")
        if self.lam is not None and not (np.isfinite(self.lam) and self.lam > 0):
            raise ValueError(f"lam must be positive (or null for automatic), got {self.lam}")
        for name in ("cv_folds", "target_support", "grid_size", "max_iter", "query_chunk",
                     "ridge_grid_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.cv_folds < 2:
            raise ValueError(f"cv_folds must be >= 2, got {self.cv_folds}")
        if self.cv_patience is not None and self.cv_patience < 1:
            raise ValueError(f"cv_patience must be >= 1 or null, got {self.cv_patience}")
        if not 0 < self.min_ratio <= 1:
            raise ValueError(f"min_ratio must lie in (0, 1], got {self.min_ratio}")
        if not self.tol > 0:
            raise ValueError(f"tol must be positive, got {self.tol}")
        if not (np.isfinite(self.ridge_ratio_min) and np.isfinite(self.ridge_ratio_max)
                and 0 < self.ridge_ratio_min <= self.ridge_ratio_max):
            raise ValueError(
                "need 0 < ridge_ratio_min <= ridge_ratio_max < inf, got "
                f"{self.ridge_ratio_min} and {self.ridge_ratio_max}")


class SolveOutput(NamedTuple):
    """w_qn: float32 [Q, n] attribution scores; intercept_q [Q]; lam_q [Q] the penalty used (the
    Lasso's lam, or the ridge's alpha for a query solved by ridge); info: how it went.

    info always holds ``estimator`` (the config's), ``estimator_q`` (str [Q], 'lasso' or 'ridge'
    per query), ``lam_rule`` ('fixed', 'cv' or 'support'), ``num_iters_q``, ``converged_q``,
    ``objective_q`` (0 iterations, converged and the ridge objective for ridge queries),
    ``select_seconds`` and ``solve_seconds``. Lasso CV adds ``lams_lq``, ``cv_error_lq``,
    ``best_index_q``; ridge CV adds ``ridge_alphas_a``, ``ridge_cv_error_aq``,
    ``ridge_best_index_q``, ``alpha_q`` (the CV choice); both add ``cv_error_lasso_q`` /
    ``cv_error_ridge_q`` (each estimator's best held-out error) and ``lasso_lam_q``;
    ``empty_fallback_q`` marks the queries whose Lasso CV chose the empty solution (lambda_max)
    and were given the ridge (auto) or their best non-empty Lasso point (lasso) instead.
    """

    w_qn: np.ndarray
    intercept_q: np.ndarray
    lam_q: np.ndarray
    info: dict[str, Any]


def solve(design: Design, y_qk: Any, cfg: SolveConfig = SolveConfig(), *,
          key: jax.Array | None = None) -> SolveOutput:
    """Per-query Lasso or ridge of the responses ``y_qk`` [Q, K] on the design (``cfg``).

    ``key`` drives the fold split of cross-validation and is required whenever ``cfg.lam`` is
    null and a penalty (or, with ``estimator='auto'``, the estimator) is chosen by CV. Lasso and
    ridge CV draw the same folds from the same key.
    """
    y = np.asarray(y_qk)
    if y.ndim == 1:
        y = y[None]
    Q = y.shape[0]
    common = dict(fit_intercept=cfg.fit_intercept, max_iter=cfg.max_iter, tol=cfg.tol,
                  query_chunk=cfg.query_chunk)
    est = cfg.estimator
    if est == "auto" and (cfg.lam is not None or cfg.lam_rule == "support"):
        est = "lasso"  # a fixed lam or a support target is a Lasso penalty: nothing to choose
    info: dict[str, Any] = {"solver": cfg.solver, "estimator": est}
    t0 = time.perf_counter()
    use_lasso = est != "ridge"
    use_ridge = est != "lasso"
    lam_q = np.full(Q, np.nan)  # the Lasso's lam where it is used
    alpha_q = np.full(Q, np.nan)  # the ridge's alpha where it is used
    if cfg.lam is not None:
        info["lam_rule"] = "fixed"
        (lam_q if est == "lasso" else alpha_q)[:] = float(cfg.lam)
    elif est == "lasso" and cfg.lam_rule == "support":
        lam_q = select_lambda_support(design, y, cfg.target_support, grid_size=cfg.grid_size,
                                      min_ratio=cfg.min_ratio, solver=cfg.solver, **common)
        info["lam_rule"] = "support"
    else:
        if key is None:
            raise ValueError(f"solve: cross-validation (estimator={est!r}, lam=null) needs "
                             "key=... (it splits subsets into folds); or set cfg.lam")
        info["lam_rule"] = "cv"
        if use_lasso:
            cv = cross_validate_lambda(design, y, folds=cfg.cv_folds, key=key,
                                       grid_size=cfg.grid_size, min_ratio=cfg.min_ratio,
                                       patience=cfg.cv_patience, solver=cfg.solver, **common)
            lam_q = cv.lam_q
            lasso_err = cv.cv_error_lq[cv.best_index_q, np.arange(Q)]
            info.update(lams_lq=cv.lams_lq, cv_error_lq=cv.cv_error_lq,
                        best_index_q=cv.best_index_q, cv_error_lasso_q=lasso_err,
                        lasso_lam_q=cv.lam_q)
        if use_ridge:
            rcv = cross_validate_ridge(design, y, folds=cfg.cv_folds, key=key,
                                       grid_size=cfg.ridge_grid_size,
                                       ratio_min=cfg.ridge_ratio_min,
                                       ratio_max=cfg.ridge_ratio_max,
                                       fit_intercept=cfg.fit_intercept,
                                       query_chunk=cfg.query_chunk, refine=cfg.ridge_refine)
            alpha_q = rcv.alpha_q
            ridge_err = rcv.cv_error_q
            info.update(ridge_alphas_a=rcv.alphas_a, ridge_cv_error_aq=rcv.cv_error_aq,
                        ridge_best_index_q=rcv.best_index_q, cv_error_ridge_q=ridge_err,
                        alpha_q=rcv.alpha_q)
        if est == "auto":  # ties go to the Lasso
            use_ridge_q = info["cv_error_ridge_q"] < info["cv_error_lasso_q"]
    if est != "auto":
        use_ridge_q = np.full(Q, est == "ridge")
    empty_q = np.zeros(Q, bool)
    if info.get("lam_rule") == "cv" and use_lasso:
        # The first grid point is lambda_max, whose solution is exactly zero: a query whose CV
        # picks it would get all-zero scores ("nothing to attribute"), silently. Such a query
        # gets the ridge instead (auto), or the best non-empty point of its path (lasso).
        empty_q = (cv.best_index_q == 0) & ~use_ridge_q
        if empty_q.any():
            if est == "auto":
                use_ridge_q = use_ridge_q | empty_q
                how = "the ridge"
            else:
                err = cv.cv_error_lq.copy()
                err[0] = np.inf
                best = np.argmin(err, axis=0)
                lam_q = np.where(empty_q, cv.lams_lq[best, np.arange(Q)], lam_q)
                how = "the best non-empty point of its Lasso path"
            log.warning("cross-validation chose the empty Lasso solution (all scores zero) for "
                        "%d of %d queries (first: query %d); they use %s instead "
                        "(info['empty_fallback_q'])", int(empty_q.sum()), Q,
                        int(np.flatnonzero(empty_q)[0]), how)
    info["empty_fallback_q"] = empty_q
    t1 = time.perf_counter()

    w_qn = np.empty((Q, design.num_examples), np.float32)
    intercept_q = np.zeros(Q)
    num_iters_q = np.zeros(Q, np.int64)
    converged_q = np.ones(Q, bool)
    objective_q = np.zeros(Q)
    lasso_idx = np.flatnonzero(~use_ridge_q)
    ridge_idx = np.flatnonzero(use_ridge_q)
    if lasso_idx.size:
        solver = fista if cfg.solver == "fista" else jaxopt_lasso
        res = solver(design, y[lasso_idx], lam_q[lasso_idx], **common)
        w_qn[lasso_idx] = res.w_qn
        intercept_q[lasso_idx] = res.intercept_q
        num_iters_q[lasso_idx] = res.num_iters_q
        converged_q[lasso_idx] = res.converged_q
        objective_q[lasso_idx] = res.objective_q
    if ridge_idx.size:
        rr = ridge(design, y[ridge_idx], alpha_q[ridge_idx], fit_intercept=cfg.fit_intercept,
                   query_chunk=cfg.query_chunk)
        w_qn[ridge_idx] = rr.w_qn
        intercept_q[ridge_idx] = rr.intercept_q
        objective_q[ridge_idx] = rr.objective_q
    penalty_q = np.where(use_ridge_q, alpha_q, lam_q)
    info.update(estimator_q=np.where(use_ridge_q, "ridge", "lasso"), num_iters_q=num_iters_q,
                converged_q=converged_q, objective_q=objective_q, select_seconds=t1 - t0,
                solve_seconds=time.perf_counter() - t1)
    return SolveOutput(w_qn, intercept_q, penalty_q, info)

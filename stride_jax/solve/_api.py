"""One call from responses to attribution scores: :func:`solve` with a :class:`SolveConfig`."""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Literal, NamedTuple

import jax
import numpy as np

from stride_jax.config import option
from stride_jax.solve._fista import fista
from stride_jax.solve._jaxopt import jaxopt_lasso
from stride_jax.solve._lambda import cross_validate_lambda, select_lambda_support
from stride_jax.subsets import Design

__all__ = ["SolveConfig", "SolveOutput", "solve"]


@dataclasses.dataclass(frozen=True)
class SolveConfig:
    """Sparse recovery of per-example influence from the response matrix y[query, subset]."""

    solver: Literal["fista", "jaxopt"] = option(
        "fista", "Lasso solver: our working-set FISTA, or jaxopt's ProximalGradient (reference)")
    lam: float | None = option(
        None, "Lasso penalty for every query; null chooses one per query by lam_rule")
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
    fit_intercept: bool = option(
        True, "fit an unpenalised per-query intercept (absorbs a shift shared by all operators)")
    max_iter: int = option(2000, "most proximal-gradient iterations per query and solve")
    tol: float = option(
        1e-5, "stopping tolerance: duality gap <= tol * ||y - mean y||^2 for fista; jaxopt's "
              "fixed-point residual for jaxopt")
    query_chunk: int = option(256, "queries solved together (bounds memory)")

    def __post_init__(self) -> None:
        if self.lam is not None and not (np.isfinite(self.lam) and self.lam > 0):
            raise ValueError(f"lam must be positive (or null for automatic), got {self.lam}")
        for name in ("cv_folds", "target_support", "grid_size", "max_iter", "query_chunk"):
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


class SolveOutput(NamedTuple):
    """w_qn: float32 [Q, n] attribution scores; intercept_q [Q]; lam_q [Q] the penalty used;
    info: how it went (rule, grid and CV errors, iterations, convergence, objective, seconds)."""

    w_qn: np.ndarray
    intercept_q: np.ndarray
    lam_q: np.ndarray
    info: dict[str, Any]


def solve(design: Design, y_qk: Any, cfg: SolveConfig = SolveConfig(), *,
          key: jax.Array | None = None) -> SolveOutput:
    """Per-query Lasso of the responses ``y_qk`` [Q, K] on the design, lam chosen by ``cfg``.

    ``key`` drives the fold split of cross-validation and is required for ``lam_rule='cv'`` when
    ``cfg.lam`` is null.
    """
    y = np.asarray(y_qk)
    if y.ndim == 1:
        y = y[None]
    common = dict(fit_intercept=cfg.fit_intercept, max_iter=cfg.max_iter, tol=cfg.tol,
                  query_chunk=cfg.query_chunk)
    info: dict[str, Any] = {"solver": cfg.solver}
    t0 = time.perf_counter()
    if cfg.lam is not None:
        lam_q = np.full(y.shape[0], float(cfg.lam))
        info["lam_rule"] = "fixed"
    elif cfg.lam_rule == "cv":
        if key is None:
            raise ValueError("solve: lam_rule='cv' needs key=... (it splits subsets into folds); "
                             "or set cfg.lam")
        cv = cross_validate_lambda(design, y, folds=cfg.cv_folds, key=key,
                                   grid_size=cfg.grid_size, min_ratio=cfg.min_ratio,
                                   patience=cfg.cv_patience, solver=cfg.solver, **common)
        lam_q = cv.lam_q
        info.update(lam_rule="cv", lams_lq=cv.lams_lq, cv_error_lq=cv.cv_error_lq,
                    best_index_q=cv.best_index_q)
    else:
        lam_q = select_lambda_support(design, y, cfg.target_support, grid_size=cfg.grid_size,
                                      min_ratio=cfg.min_ratio, solver=cfg.solver, **common)
        info["lam_rule"] = "support"
    t1 = time.perf_counter()
    solver = fista if cfg.solver == "fista" else jaxopt_lasso
    res = solver(design, y, lam_q, **common)
    info.update(num_iters_q=res.num_iters_q, converged_q=res.converged_q,
                objective_q=res.objective_q, select_seconds=t1 - t0,
                solve_seconds=time.perf_counter() - t1)
    return SolveOutput(res.w_qn.astype(np.float32, copy=False), res.intercept_q, lam_q, info)

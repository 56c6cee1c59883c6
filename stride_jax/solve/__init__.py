"""Sparse recovery: per-query Lasso of the responses y[query, subset] on the design M.

    w_q = argmin_w 1/2 ||y_q - M w - b_q 1||^2 + lam_q ||w||_1      (b_q unpenalised, optional)

* :func:`fista` - our solver: FISTA with adaptive restart on the sparse design, batched over
  queries, inside a working-set loop certified by the full duality gap (``_fista.py``);
* :func:`jaxopt_lasso` - the same problem through ``jaxopt.ProximalGradient`` (``_jaxopt.py``);
* lambda: :func:`lambda_max`, warm-started :func:`lasso_path`, :func:`select_lambda_cv`
  (cross-validation over subsets), :func:`select_lambda_support` (``_lambda.py``);
* :func:`ridge` - the ridge alternative, exact in dual form over subsets, and
  :func:`cross_validate_ridge` on the Lasso CV's folds (``_ridge.py``), for dense influence;
* :func:`solve` with a :class:`SolveConfig`: all of the above in one call, the estimator
  ('lasso', 'ridge', or 'auto': per query by cross-validation) included (``_api.py``).

Sparse products share one device layout of the design (``_ops.py``); every kernel is jitted once
per static shape and reused across calls.
"""

from stride_jax.solve._api import SolveConfig, SolveOutput, solve
from stride_jax.solve._fista import LassoResult, fista
from stride_jax.solve._jaxopt import jaxopt_lasso
from stride_jax.solve._lambda import (
    CVResult,
    LassoPath,
    cross_validate_lambda,
    iter_lasso_path,
    lambda_grid,
    lambda_max,
    lasso_path,
    select_lambda_cv,
    select_lambda_support,
)
from stride_jax.solve._ops import lipschitz
from stride_jax.solve._ridge import (
    RidgeCVResult,
    RidgeResult,
    cross_validate_ridge,
    ridge,
    ridge_alpha_grid,
    subset_gram,
)

__all__ = [
    "CVResult",
    "LassoPath",
    "LassoResult",
    "RidgeCVResult",
    "RidgeResult",
    "SolveConfig",
    "SolveOutput",
    "cross_validate_lambda",
    "cross_validate_ridge",
    "fista",
    "iter_lasso_path",
    "jaxopt_lasso",
    "lambda_grid",
    "lambda_max",
    "lasso_path",
    "lipschitz",
    "ridge",
    "ridge_alpha_grid",
    "select_lambda_cv",
    "select_lambda_support",
    "solve",
    "subset_gram",
]

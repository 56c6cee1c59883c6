"""Sparse recovery: FISTA == scikit-learn == jaxopt, planted recovery, lambda rules, invariances."""

from __future__ import annotations

import warnings

import jax
import numpy as np
import pytest

from stride_jax.config import missing_help
from stride_jax.solve import (
    SolveConfig,
    cross_validate_lambda,
    fista,
    jaxopt_lasso,
    lambda_grid,
    lambda_max,
    lasso_path,
    lipschitz,
    select_lambda_support,
    solve,
)
from stride_jax.solve import _fista
from stride_jax.subsets import Design, bernoulli_design, expander_design
from _jaxtrace import traces

sklearn_linear = pytest.importorskip("sklearn.linear_model")


def _planted(design: Design, num_queries: int, k: int, noise: float, shift: float, seed: int):
    rng = np.random.default_rng(seed)
    w_qn = np.zeros((num_queries, design.num_examples))
    for q in range(num_queries):
        idx = rng.choice(design.num_examples, k, replace=False)
        w_qn[q, idx] = rng.choice([-1.0, 1.0], k) * rng.uniform(0.5, 1.5, k)
    y_qk = design.matvec(w_qn) + noise * rng.normal(size=(num_queries, design.num_subsets)) + shift
    return w_qn, y_qk


@pytest.fixture(scope="module")
def small():
    design = expander_design(150, 60, 5, key=jax.random.key(0))
    _, y_qk = _planted(design, 3, 4, 0.1, 0.0, seed=0)
    return design, y_qk


@pytest.fixture(scope="module")
def planted():
    # K divisible by the 3 CV folds: every training fold has the same shape (one compilation)
    design = expander_design(2000, 420, 10, key=jax.random.key(1))
    w_qn, y_qk = _planted(design, 4, 10, 0.05, 0.3, seed=1)
    return design, w_qn, y_qk


def _sklearn(design: Design, y_qk, lam_q, fit_intercept: bool):
    dense = design.to_dense(np.float64)
    K = design.num_subsets
    w, b = [], []
    for y, lam in zip(y_qk, lam_q):
        # scikit-learn minimises 1/(2K) ||y - Mw - b||^2 + alpha ||w||_1: alpha = lam / K
        model = sklearn_linear.Lasso(alpha=lam / K, fit_intercept=fit_intercept, tol=1e-12,
                                     max_iter=200_000)
        model.fit(dense, y)
        w.append(model.coef_)
        b.append(model.intercept_)
    return np.array(w), np.array(b)


@pytest.mark.parametrize("fit_intercept", [True, False])
@pytest.mark.parametrize("working_set", [True, False])
def test_fista_matches_sklearn(small, fit_intercept, working_set):
    design, y_qk = small
    if fit_intercept:
        y_qk = y_qk + 2.0  # a shared shift only the intercept may absorb
    lam_q = 0.1 * lambda_max(design, y_qk, fit_intercept)
    res = fista(design, y_qk, lam_q, fit_intercept=fit_intercept, tol=1e-8, max_iter=5000,
                working_set=working_set)
    w_ref, b_ref = _sklearn(design, y_qk, lam_q, fit_intercept)
    assert np.abs(res.w_qn - w_ref).max() < 1e-4
    np.testing.assert_allclose(res.intercept_q, b_ref, atol=1e-4)
    assert np.all(np.count_nonzero(w_ref, axis=1) > 0)
    # the reported objective is the one scikit-learn minimises (times K)
    r = y_qk - w_ref @ design.to_dense(np.float64).T - b_ref[:, None]
    ref_obj = 0.5 * np.sum(r * r, 1) + lam_q * np.abs(w_ref).sum(1)
    np.testing.assert_allclose(res.objective_q, ref_obj, rtol=1e-5)


def test_fista_matches_sklearn_bernoulli():
    # ~18 subsets per example: exercises the slot loop and the matmul Gram of the working set
    design = bernoulli_design(120, 60, 0.3, key=jax.random.key(2))
    assert design.example_slots().shape[0] > 16
    _, y_qk = _planted(design, 2, 3, 0.1, 1.0, seed=2)
    lam_q = 0.2 * lambda_max(design, y_qk)
    res = fista(design, y_qk, lam_q, tol=1e-8, max_iter=5000)
    w_ref, b_ref = _sklearn(design, y_qk, lam_q, True)
    assert np.abs(res.w_qn - w_ref).max() < 1e-4
    np.testing.assert_allclose(res.intercept_q, b_ref, atol=1e-4)


@pytest.mark.parametrize("fit_intercept", [True, False])
def test_fista_matches_jaxopt(small, fit_intercept):
    design, y_qk = small
    lam_q = 0.1 * lambda_max(design, y_qk, fit_intercept)
    ours = fista(design, y_qk, lam_q, fit_intercept=fit_intercept, tol=1e-8, max_iter=5000)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # the adapter keeps jaxopt's quiet
        ref = jaxopt_lasso(design, y_qk, lam_q, fit_intercept=fit_intercept, tol=1e-8,
                           max_iter=20_000)
    assert np.abs(ours.w_qn - ref.w_qn).max() < 1e-4
    np.testing.assert_allclose(ours.intercept_q, ref.intercept_q, atol=1e-4)
    np.testing.assert_allclose(ours.objective_q, ref.objective_q, rtol=1e-5)
    assert ref.converged_q.all()


def test_lambda_max_gives_zero(small):
    design, y_qk = small
    for fit_intercept in (True, False):
        lmax = lambda_max(design, y_qk, fit_intercept)
        at = fista(design, y_qk, lmax, fit_intercept=fit_intercept)
        assert np.all(at.w_qn == 0) and at.converged_q.all()
        below = fista(design, y_qk, 0.95 * lmax, fit_intercept=fit_intercept)
        assert np.all(np.count_nonzero(below.w_qn, axis=1) > 0)
    # with the intercept, w = 0 leaves the mean of y as intercept
    np.testing.assert_allclose(at.intercept_q, 0.0)
    at = fista(design, y_qk, lambda_max(design, y_qk), fit_intercept=True)
    np.testing.assert_allclose(at.intercept_q, y_qk.mean(1), rtol=1e-12)


def test_intercept_absorbs_shift(small):
    design, y_qk = small
    lam_q = 0.1 * lambda_max(design, y_qk)
    a = fista(design, y_qk, lam_q)
    b = fista(design, y_qk + 5.0, lam_q)
    np.testing.assert_allclose(a.w_qn, b.w_qn, atol=1e-6)
    np.testing.assert_allclose(b.intercept_q - a.intercept_q, 5.0, atol=1e-5)


def test_lipschitz_is_a_tight_upper_bound(small):
    design, _ = small
    dense = design.to_dense(np.float64)
    for fit_intercept in (True, False):
        m = dense - dense.mean(0) if fit_intercept else dense
        top = np.linalg.eigvalsh(m.T @ m)[-1]
        est = lipschitz(design, fit_intercept)
        assert top <= est <= 1.1 * top


def test_planted_recovery(planted):
    design, w_true, y_qk = planted
    lam_q = 0.05 * lambda_max(design, y_qk)
    res = fista(design, y_qk, lam_q)
    assert res.converged_q.all()
    for q in range(w_true.shape[0]):
        support = set(np.flatnonzero(w_true[q]))
        top = set(np.argsort(-np.abs(res.w_qn[q]))[: len(support)])
        assert top == support
        rel = np.linalg.norm(res.w_qn[q] - w_true[q]) / np.linalg.norm(w_true[q])
        assert rel < 0.15, rel


def test_cv_picks_reasonable_lambda(planted):
    design, w_true, y_qk = planted
    lmax = lambda_max(design, y_qk)
    cv = cross_validate_lambda(design, y_qk, folds=3, key=jax.random.key(0), grid_size=8,
                               min_ratio=1e-3, patience=2)
    ratio = cv.lam_q / lmax
    assert np.all((ratio > 1e-3) & (ratio < 0.3)), ratio  # neither end of the grid
    # CV error at the chosen lam is far below that at lambda_max (predicting the mean)
    chosen = cv.cv_error_lq[cv.best_index_q, np.arange(len(ratio))]
    assert np.all(chosen < 0.2 * cv.cv_error_lq[0])
    res = fista(design, y_qk, cv.lam_q)
    rel = np.linalg.norm(res.w_qn - w_true, axis=1) / np.linalg.norm(w_true, axis=1)
    assert np.all(rel < 0.2), rel
    # same key, same folds, same answer
    again = cross_validate_lambda(design, y_qk, folds=3, key=jax.random.key(0), grid_size=8,
                                  min_ratio=1e-3, patience=2)
    np.testing.assert_array_equal(again.lam_q, cv.lam_q)


def test_support_rule(planted):
    design, _, y_qk = planted
    lams = select_lambda_support(design, y_qk, 8, grid_size=15, min_ratio=1e-2)
    grid = lambda_grid(lambda_max(design, y_qk), 15, 1e-2)
    nnz = np.count_nonzero(fista(design, y_qk, lams).w_qn, axis=1)
    assert np.all(nnz >= 8)
    for q, lam in enumerate(lams):  # and the next larger grid lam has fewer
        l = int(np.argmin(np.abs(grid[:, q] - lam)))
        assert l > 0
        bigger = fista(design, y_qk[q:q + 1], grid[l - 1, q])
        assert np.count_nonzero(bigger.w_qn) < 8


def test_path_warm_starts_agree_with_cold(small):
    design, y_qk = small
    path = lasso_path(design, y_qk, grid_size=6, min_ratio=0.01, tol=1e-7)
    assert path.w_lqn.shape == (6, 3, design.num_examples)
    assert np.all(path.w_lqn[0] == 0)
    nnz = np.count_nonzero(path.w_lqn, axis=2)
    assert np.all(nnz[-1] >= nnz[1])
    cold = fista(design, y_qk, path.lams_lq[3], tol=1e-7)
    np.testing.assert_allclose(path.w_lqn[3], cold.w_qn, atol=1e-4)


@pytest.mark.parametrize("working_set", [True, False])
def test_query_chunk_invariance(planted, working_set):
    design, _, y_qk = planted
    y = np.concatenate([y_qk, y_qk[:2] * 0.5])  # 6 queries
    lam_q = np.geomspace(0.3, 0.02, 6) * lambda_max(design, y)
    whole = fista(design, y, lam_q, query_chunk=6, working_set=working_set)
    for chunk in (4,):  # 4 + a padded 2
        part = fista(design, y, lam_q, query_chunk=chunk, working_set=working_set)
        if working_set:  # the working-set size is shared by a batch: equal to solver accuracy
            np.testing.assert_allclose(part.w_qn, whole.w_qn, atol=2e-4)
        else:  # every query iterates on its own: identical up to float reassociation
            np.testing.assert_allclose(part.w_qn, whole.w_qn, atol=1e-6)
            np.testing.assert_array_equal(part.num_iters_q, whole.num_iters_q)
        np.testing.assert_allclose(part.objective_q, whole.objective_q, rtol=1e-5)


def test_no_recompilation(planted):
    design, _, y_qk = planted
    lam_q = 0.05 * lambda_max(design, y_qk)
    fista(design, y_qk, lam_q)
    jaxopt_lasso(design, y_qk, lam_q, max_iter=50)
    # New values of the same shapes: nothing is traced again (JAX's own trace events).
    with traces() as again:
        fista(design, y_qk * 1.1 + 0.2, lam_q * 1.1)
        jaxopt_lasso(design, y_qk * 1.1 + 0.2, lam_q * 1.1, max_iter=50)
    assert not again, dict(again)


def test_single_query_and_w0(small):
    design, y_qk = small
    lam = 0.1 * lambda_max(design, y_qk)
    batch = fista(design, y_qk, lam, tol=1e-7)
    one = fista(design, y_qk[1], lam[1], tol=1e-7)
    np.testing.assert_allclose(one.w_qn[0], batch.w_qn[1], atol=1e-5)
    warm = fista(design, y_qk, lam, tol=1e-7, w0=batch.w_qn)
    np.testing.assert_allclose(warm.w_qn, batch.w_qn, atol=1e-5)
    assert np.all(warm.num_iters_q <= batch.num_iters_q)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(lam=0.0), "lam must be positive"),
        (dict(lam=-1.0), "lam must be positive"),
        (dict(lam=np.ones(2)), "lam must be a scalar or have shape"),
        (dict(y_qk=np.zeros((3, 7))), r"y_qk must have shape \[Q, K=60\]"),
        (dict(y_qk=np.full((3, 60), np.nan)), "NaN"),
        (dict(w0=np.zeros((3, 5))), "w0 must have shape"),
        (dict(query_chunk=0), "query_chunk"),
        (dict(max_iter=0), "max_iter"),
    ],
)
def test_validation(small, kwargs, match):
    design, y_qk = small
    args = dict(y_qk=y_qk, lam=1.0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        fista(design, args.pop("y_qk"), args.pop("lam"), **args)


def test_solve_api(planted):
    design, w_true, y_qk = planted
    out = solve(design, y_qk, SolveConfig(lam=float(0.05 * lambda_max(design, y_qk).min())))
    assert out.w_qn.dtype == np.float32 and out.w_qn.shape == w_true.shape
    assert out.info["lam_rule"] == "fixed" and out.info["converged_q"].all()
    cfg = SolveConfig(lam_rule="support", target_support=10, grid_size=10, min_ratio=0.01)
    out = solve(design, y_qk, cfg)
    assert np.all(np.count_nonzero(out.w_qn, axis=1) >= 10)
    with pytest.raises(ValueError, match="needs key"):
        solve(design, y_qk, SolveConfig())
    out = solve(design, y_qk, SolveConfig(grid_size=6, min_ratio=0.01), key=jax.random.key(0))
    assert out.info["lam_rule"] == "cv" and out.lam_q.shape == (4,)
    assert out.info["cv_error_lq"].shape == (6, 4)
    out = solve(design, y_qk, SolveConfig(lam=float(out.lam_q[0]), solver="jaxopt", tol=1e-6,
                                          max_iter=50))
    assert out.info["solver"] == "jaxopt" and out.w_qn.dtype == np.float32


def test_solve_config_validation():
    assert missing_help(SolveConfig) == []
    with pytest.raises(ValueError, match="lam must be positive"):
        SolveConfig(lam=0.0)
    with pytest.raises(ValueError, match="cv_folds"):
        SolveConfig(cv_folds=1)
    with pytest.raises(ValueError, match="min_ratio"):
        SolveConfig(min_ratio=0.0)


@pytest.mark.parametrize(("n", "p"), [(1000, 64), (1000, 300), (130, 130)])
def test_working_set_selection_is_exact_top_p(n, p):
    rng = np.random.default_rng(n + p)
    g_nq = rng.normal(size=(n, 5)).astype(np.float32)
    w_nq = ((rng.random((n, 5)) < 0.02) * rng.normal(size=(n, 5))).astype(np.float32)
    lam_q = (rng.random(5) + 0.5).astype(np.float32)
    ws = np.asarray(_fista._select(g_nq, w_nq, lam_q, p=p))
    score = np.where(w_nq != 0, np.inf, np.abs(g_nq) / lam_q).T
    for q in range(5):
        assert set(ws[q]) == set(np.argsort(-score[q], kind="stable")[:p])

"""Ridge decoding: exact vs scikit-learn, CV on the Lasso's folds, and solve(estimator='auto')."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from stride_jax.solve import (
    SolveConfig,
    cross_validate_lambda,
    cross_validate_ridge,
    ridge,
    ridge_alpha_grid,
    solve,
    subset_gram,
)
from stride_jax.solve._lambda import _fold_ids
from stride_jax.subsets import expander_design

sklearn_linear = pytest.importorskip("sklearn.linear_model")


@pytest.fixture(scope="module")
def small():
    design = expander_design(150, 60, 5, key=jax.random.key(0))
    rng = np.random.default_rng(0)
    y_qk = design.matvec(rng.normal(size=(3, 150))) + 0.5 * rng.normal(size=(3, 60)) + 2.0
    return design, y_qk


@pytest.fixture(scope="module")
def planted():
    """One design (K divisible by the 3 folds), dense and sparse planted influence (6 queries)."""
    n, K = 600, 300
    design = expander_design(n, K, 10, key=jax.random.key(3))
    rng = np.random.default_rng(5)
    w_dense = rng.normal(size=(6, n))  # prior N(0, 1), noise sd 2: Bayes ridge alpha = 4
    y_dense = design.matvec(w_dense) + 2.0 * rng.normal(size=(6, K)) + 1.0
    w_sparse = np.zeros((6, n))
    for q in range(6):
        idx = rng.choice(n, 5, replace=False)
        w_sparse[q, idx] = rng.choice([-1.0, 1.0], 5) * rng.uniform(1, 2, 5)
    y_sparse = design.matvec(w_sparse) + 0.3 * rng.normal(size=(6, K)) + 1.0
    return design, w_dense, y_dense, w_sparse, y_sparse


def test_subset_gram(small):
    design, _ = small
    dense = design.to_dense(np.float64)
    np.testing.assert_array_equal(subset_gram(design), dense @ dense.T)


@pytest.mark.parametrize("fit_intercept", [True, False])
def test_ridge_matches_sklearn(small, fit_intercept):
    design, y_qk = small
    dense = design.to_dense(np.float64)
    alpha_q = np.array([0.3, 3.0, 30.0])
    res = ridge(design, y_qk, alpha_q, fit_intercept=fit_intercept)
    for q in range(3):
        ref = sklearn_linear.Ridge(alpha=alpha_q[q], fit_intercept=fit_intercept).fit(
            dense, y_qk[q])
        rel = np.linalg.norm(res.w_qn[q] - ref.coef_) / np.linalg.norm(ref.coef_)
        assert rel < 1e-6, rel
        np.testing.assert_allclose(res.intercept_q[q], ref.intercept_, rtol=1e-6, atol=1e-9)
        r = y_qk[q] - dense @ ref.coef_ - ref.intercept_
        obj = 0.5 * r @ r + 0.5 * alpha_q[q] * ref.coef_ @ ref.coef_
        np.testing.assert_allclose(res.objective_q[q], obj, rtol=1e-9)
    np.testing.assert_array_equal(res.alpha_q, alpha_q)
    if not fit_intercept:
        assert np.all(res.intercept_q == 0)


@pytest.mark.parametrize("fit_intercept", [True, False])
def test_ridge_cv_matches_refits_on_the_lasso_folds(small, fit_intercept):
    design, y_qk = small
    dense = design.to_dense(np.float64)
    K = design.num_subsets
    key = jax.random.key(7)
    cv = cross_validate_ridge(design, y_qk, folds=3, key=key, grid_size=5,
                              fit_intercept=fit_intercept, refine=False)
    err = np.zeros_like(cv.cv_error_aq)
    for held in _fold_ids(K, 3, key):  # the Lasso CV's folds for this key
        train = np.setdiff1d(np.arange(K), held)
        for a, alpha in enumerate(cv.alphas_a):
            for q in range(y_qk.shape[0]):
                # the training fold is solved at alpha * K_train / K, as the Lasso CV scales lam
                m = sklearn_linear.Ridge(alpha=alpha * train.size / K,
                                         fit_intercept=fit_intercept).fit(dense[train], y_qk[q, train])
                err[a, q] += np.sum((y_qk[q, held] - m.predict(dense[held])) ** 2) / K
    np.testing.assert_allclose(cv.cv_error_aq, err, rtol=1e-9)
    np.testing.assert_array_equal(cv.best_index_q, np.argmin(err, axis=0))
    np.testing.assert_array_equal(cv.alpha_q, cv.alphas_a[cv.best_index_q])


def _sklearn_cv_error(dense, y_q, key, alpha, fit_intercept=True):
    K = dense.shape[0]
    err = 0.0
    for held in _fold_ids(K, 3, key):
        train = np.setdiff1d(np.arange(K), held)
        m = sklearn_linear.Ridge(alpha=alpha * train.size / K,
                                 fit_intercept=fit_intercept).fit(dense[train], y_q[train])
        err += np.sum((y_q[held] - m.predict(dense[held])) ** 2) / K
    return err


def test_refined_alpha_minimises_the_cv_error(small):
    design, y_qk = small
    dense = design.to_dense(np.float64)
    key = jax.random.key(7)
    grid = cross_validate_ridge(design, y_qk, folds=3, key=key, grid_size=5, refine=False)
    cv = cross_validate_ridge(design, y_qk, folds=3, key=key, grid_size=5)
    np.testing.assert_array_equal(cv.cv_error_aq, grid.cv_error_aq)
    for q in range(y_qk.shape[0]):
        i = grid.best_index_q[q]
        lo, hi = grid.alphas_a[min(i + 1, 4)], grid.alphas_a[max(i - 1, 0)]  # grid descends
        assert lo <= cv.alpha_q[q] <= hi
        # The reported error is the CV error at the refined alpha (refits by scikit-learn) ...
        ref = _sklearn_cv_error(dense, y_qk[q], key, cv.alpha_q[q])
        np.testing.assert_allclose(cv.cv_error_q[q], ref, rtol=1e-9)
        # ... no worse than the grid's best, and a local minimum: nearby alphas do no better.
        assert cv.cv_error_q[q] <= grid.cv_error_aq[i, q] * (1 + 1e-12)
        for f in (0.98, 1.02):
            assert ref <= _sklearn_cv_error(dense, y_qk[q], key, cv.alpha_q[q] * f) * (1 + 1e-9)


def test_refined_alpha_is_continuous_in_the_responses(small):
    """Where the grid argmin jumps between two grid points (their CV errors cross), a change of
    the responses at float-rounding level must not move alpha, or the scores, by a grid step."""
    design, y_qk = small
    key = jax.random.key(7)
    y = y_qk[:1]
    # A grid of two points whose CV errors tie for this query: the two points bracket the
    # continuous minimiser, and a bisection on their error difference finds the tie.
    best = cross_validate_ridge(design, y, folds=3, key=key, grid_size=9).alpha_q[0]
    hi = best * 4.0

    def diff(lo):
        e = cross_validate_ridge(design, y, folds=3, key=key, alphas=[hi, lo], refine=False)
        return e.cv_error_aq[0, 0] - e.cv_error_aq[1, 0]

    a, b = best / 8.0, best   # diff(a) < 0 (hi better), diff(b) > 0 (lo better)
    assert diff(a) < 0 < diff(b)
    for _ in range(60):       # bisection in log alpha down to float resolution: a tie
        m = np.sqrt(a * b)
        a, b = (m, b) if diff(m) < 0 else (a, m)
    eps = 1e-9 * np.abs(y).max()
    rng = np.random.default_rng(1)
    alphas_raw, alphas_ref = [], []
    for _ in range(6):
        yp = y + eps * rng.normal(size=y.shape)
        alphas_raw.append(cross_validate_ridge(design, yp, folds=3, key=key, alphas=[hi, a],
                                               refine=False).alpha_q[0])
        alphas_ref.append(cross_validate_ridge(design, yp, folds=3, key=key, alphas=[hi, a],
                                               ).alpha_q[0])
    # The grid choice flips between the two tied points (a factor of 4 apart) ...
    assert len(set(alphas_raw)) == 2
    # ... the refined one stays put.
    assert np.ptp(np.log(alphas_ref)) < 1e-6


def test_alpha_grid_relative_to_mean_eigenvalue(small):
    design, _ = small
    dense = design.to_dense(np.float64)
    centred = dense - dense.mean(0)
    mean_eig = np.trace(centred @ centred.T) / design.num_subsets
    grid = ridge_alpha_grid(design, grid_size=13, ratio_min=1e-3, ratio_max=1e3)
    np.testing.assert_allclose(grid, np.geomspace(1e3, 1e-3, 13) * mean_eig, rtol=1e-12)


def test_ridge_cv_picks_reasonable_alpha(planted):
    design, w_true, y_qk, _, _ = planted
    cv = cross_validate_ridge(design, y_qk, folds=3, key=jax.random.key(0))
    A = cv.alphas_a.size
    assert np.all((cv.best_index_q > 0) & (cv.best_index_q < A - 1)), cv.best_index_q
    # within a factor of 10 of the Bayes-optimal alpha = noise var / prior var = 4
    assert np.all((cv.alpha_q > 0.4) & (cv.alpha_q < 40)), cv.alpha_q
    q = np.arange(y_qk.shape[0])
    assert np.all(cv.cv_error_aq[cv.best_index_q, q] < 0.9 * cv.cv_error_aq[0])
    # recovery at the chosen alpha is close to the best the grid offers
    rel = np.stack([np.linalg.norm(ridge(design, y_qk, a).w_qn - w_true, axis=1)
                    for a in cv.alphas_a]) / np.linalg.norm(w_true, axis=1)
    assert np.all(rel[cv.best_index_q, q] < 1.1 * rel.min(axis=0))


def _auto(design, y_qk, **kw):
    cfg = SolveConfig(estimator="auto", grid_size=10, **kw)
    return solve(design, y_qk, cfg, key=jax.random.key(0))


def test_auto_picks_ridge_on_dense(planted):
    design, w_true, y_qk, _, _ = planted
    out = _auto(design, y_qk)
    info = out.info
    assert info["estimator"] == "auto" and info["lam_rule"] == "cv"
    assert list(info["estimator_q"]) == ["ridge"] * 6
    assert np.all(info["cv_error_lasso_q"] > 1.05 * info["cv_error_ridge_q"])
    np.testing.assert_array_equal(out.lam_q, info["alpha_q"])  # the penalty used: ridge alpha
    ref = ridge(design, y_qk, info["alpha_q"])
    np.testing.assert_array_equal(out.w_qn, ref.w_qn)
    np.testing.assert_array_equal(out.intercept_q, ref.intercept_q)
    # both CVs are reported, the Lasso's included
    assert info["cv_error_lq"].shape == (10, 6) and info["ridge_cv_error_aq"].shape == (13, 6)
    # the ridge's error is that of its refined alpha, at most the grid's best
    assert np.all(info["cv_error_ridge_q"] <= info["ridge_cv_error_aq"].min(axis=0))
    np.testing.assert_array_equal(info["cv_error_lasso_q"], info["cv_error_lq"].min(axis=0))
    assert info["lasso_lam_q"].shape == (6,) and np.all(info["converged_q"])


def test_auto_picks_lasso_on_sparse(planted):
    design, _, _, w_true, y_qk = planted
    out = _auto(design, y_qk)
    info = out.info
    assert list(info["estimator_q"]) == ["lasso"] * 6
    assert np.all(info["cv_error_lasso_q"] < 0.8 * info["cv_error_ridge_q"])
    np.testing.assert_array_equal(out.lam_q, info["lasso_lam_q"])
    lasso = solve(design, y_qk, SolveConfig(grid_size=10), key=jax.random.key(0))
    np.testing.assert_array_equal(out.w_qn, lasso.w_qn)
    np.testing.assert_array_equal(out.lam_q, lasso.lam_q)
    assert list(lasso.info["estimator_q"]) == ["lasso"] * 6


def test_auto_mixed_batch(planted):
    design, _, y_dense, _, y_sparse = planted
    y = np.concatenate([y_dense[:3], y_sparse[:3]])
    out = _auto(design, y)
    assert list(out.info["estimator_q"]) == ["ridge"] * 3 + ["lasso"] * 3
    assert np.all(out.info["num_iters_q"][:3] == 0) and np.all(out.info["num_iters_q"][3:] > 0)


def test_query_chunk_invariance(planted):
    design, _, y_dense, _, y_sparse = planted
    y = np.concatenate([y_dense[:3], y_sparse[:3]])
    whole = ridge(design, y, 5.0, query_chunk=6)
    part = ridge(design, y, 5.0, query_chunk=4)
    np.testing.assert_allclose(part.w_qn, whole.w_qn, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(part.intercept_q, whole.intercept_q, rtol=1e-10)
    cv6 = cross_validate_ridge(design, y, key=jax.random.key(1), query_chunk=6)
    cv4 = cross_validate_ridge(design, y, key=jax.random.key(1), query_chunk=4)
    np.testing.assert_allclose(cv4.cv_error_aq, cv6.cv_error_aq, rtol=1e-10)
    np.testing.assert_array_equal(cv4.alpha_q, cv6.alpha_q)
    a = _auto(design, y, query_chunk=6)
    b = _auto(design, y, query_chunk=4)
    np.testing.assert_array_equal(a.info["estimator_q"], b.info["estimator_q"])
    np.testing.assert_array_equal(a.lam_q, b.lam_q)
    np.testing.assert_allclose(a.w_qn, b.w_qn, atol=2e-4)


def test_ridge_estimator_in_solve(planted):
    design, _, y_qk, _, _ = planted
    out = solve(design, y_qk, SolveConfig(estimator="ridge", lam=3.0))
    assert out.info["lam_rule"] == "fixed" and list(out.info["estimator_q"]) == ["ridge"] * 6
    np.testing.assert_array_equal(out.lam_q, 3.0)
    np.testing.assert_array_equal(out.w_qn, ridge(design, y_qk, 3.0).w_qn)
    out = solve(design, y_qk, SolveConfig(estimator="ridge"), key=jax.random.key(0))
    cv = cross_validate_ridge(design, y_qk, key=jax.random.key(0))
    np.testing.assert_array_equal(out.lam_q, cv.alpha_q)
    assert "cv_error_lq" not in out.info  # the Lasso CV is not run for estimator='ridge'
    assert out.w_qn.dtype == np.float32 and out.w_qn.shape == y_qk.shape[:1] + (600,)


def test_same_folds_as_lasso_cv(small):
    """Both CVs split by _fold_ids(K, folds, key): with one alpha / one lam, predicting the
    training mean (lam >= lambda_max, alpha huge) gives the same held-out error."""
    design, y_qk = small
    key = jax.random.key(11)
    lasso = cross_validate_lambda(design, y_qk, folds=3, key=key,
                                  lams_lq=np.full((1, 3), 1e12))
    rcv = cross_validate_ridge(design, y_qk, folds=3, key=key, alphas=[1e14])
    np.testing.assert_allclose(rcv.cv_error_aq, lasso.cv_error_lq, rtol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(estimator="elastic"), "estimator must be 'lasso', 'ridge' or 'auto'"),
        (dict(estimator="ridge", lam_rule="support"), "needs lam_rule='cv'"),
        (dict(ridge_grid_size=0), "ridge_grid_size"),
        (dict(ridge_ratio_min=0.0), "ridge_ratio_min"),
        (dict(ridge_ratio_min=10.0, ridge_ratio_max=1.0), "ridge_ratio_min <= ridge_ratio_max"),
        (dict(solver="cd"), "solver must be"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SolveConfig(**kwargs)


def test_auto_with_a_lasso_penalty_is_the_lasso(small):
    design, y_qk = small
    for kw in (dict(lam=1e-3), dict(lam_rule="support", target_support=5)):
        a = solve(design, y_qk, SolveConfig(estimator="auto", **kw), key=jax.random.key(0))
        b = solve(design, y_qk, SolveConfig(estimator="lasso", **kw), key=jax.random.key(0))
        np.testing.assert_array_equal(a.w_qn, b.w_qn)
        assert set(a.info["estimator_q"]) == {"lasso"}


def test_ridge_validation(small):
    design, y_qk = small
    with pytest.raises(ValueError, match="alpha must be positive"):
        ridge(design, y_qk, 0.0)
    with pytest.raises(ValueError, match="alpha must be a scalar or have shape"):
        ridge(design, y_qk, np.ones(2))
    with pytest.raises(ValueError, match=r"y_qk must have shape \[Q, K=60\]"):
        ridge(design, np.zeros((3, 7)), 1.0)
    with pytest.raises(ValueError, match="query_chunk"):
        ridge(design, y_qk, 1.0, query_chunk=0)
    with pytest.raises(ValueError, match="folds"):
        cross_validate_ridge(design, y_qk, folds=1, key=jax.random.key(0))
    with pytest.raises(ValueError, match="alphas must be"):
        cross_validate_ridge(design, y_qk, key=jax.random.key(0), alphas=[1.0, -1.0])
    for est in ("ridge", "auto"):
        with pytest.raises(ValueError, match="needs key"):
            solve(design, y_qk, SolveConfig(estimator=est))


def test_an_empty_lasso_choice_falls_back_and_is_recorded():
    """Responses that are pure noise: the Lasso CV picks lambda_max (w = 0, all scores zero).
    Such a query must not silently get all-zero scores."""
    n, K = 200, 90
    design = expander_design(n, K, 6, key=jax.random.key(4))
    rng = np.random.default_rng(3)
    y = rng.normal(size=(4, K))
    lasso_cv = cross_validate_lambda(design, y, folds=3, key=jax.random.key(0), grid_size=10)
    assert (lasso_cv.best_index_q == 0).any()          # the situation this test is about
    for est in ("auto", "lasso"):
        out = solve(design, y, SolveConfig(estimator=est, grid_size=10), key=jax.random.key(0))
        fell = out.info["empty_fallback_q"]
        assert fell.any()
        assert np.all(np.abs(out.w_qn[fell]).sum(1) > 0), est
        if est == "auto":
            assert set(out.info["estimator_q"][fell]) == {"ridge"}

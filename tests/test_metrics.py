"""Evaluation metrics: Spearman against scipy, LDS on a planted datamodel, validation errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import spearmanr

from stride_jax.eval.metrics import counterfactual_summary, lds, spearman, summarize


def _planted(q: int = 40, n: int = 200, s: int = 150, noise: float = 0.01, seed: int = 0):
    """Losses from an exactly linear datamodel: L_q(S) = -sum_{i in S} w[q, i] + noise."""
    rng = np.random.default_rng(seed)
    true_w = rng.normal(size=(q, n))
    masks = rng.random((s, n)) < 0.5
    losses = -(masks @ true_w.T)
    losses = losses + noise * losses.std() * rng.normal(size=losses.shape)
    return true_w, masks, losses


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_spearman_matches_scipy_with_ties(axis):
    rng = np.random.default_rng(1)
    a = rng.integers(0, 5, (7, 30)).astype(float)  # few distinct values: many ties
    b = rng.normal(size=(7, 30))
    b[:, ::3] = np.round(b[:, ::3])
    got = spearman(a, b, axis=axis)
    ax = axis % 2
    want = [spearmanr(np.take(a, j, 1 - ax), np.take(b, j, 1 - ax)).statistic
            for j in range(a.shape[1 - ax])]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_spearman_constant_is_nan():
    x = np.arange(10.0)
    assert np.isnan(spearman(np.ones(10), x))
    assert np.isnan(spearman(x, np.full(10, 3.0)))
    got = spearman(np.stack([x, np.ones(10)]), np.stack([x, x]))
    assert got[0] == pytest.approx(1.0) and np.isnan(got[1])


def test_lds_planted_datamodel():
    true_w, masks, losses = _planted()
    good = lds(true_w, masks, losses)
    assert good.mean > 0.95 and good.num_queries == 40 and good.num_subsets == 150
    rand = lds(np.random.default_rng(2).normal(size=true_w.shape), masks, losses)
    assert abs(rand.mean) < 0.1
    # Bool and 0/1 masks are the same thing.
    assert lds(true_w, masks.astype(np.int8), losses).mean == pytest.approx(good.mean)


def test_lds_negated_scores_negate():
    true_w, masks, losses = _planted(noise=0.5)
    pos, neg = lds(true_w, masks, losses), lds(-true_w, masks, losses)
    np.testing.assert_allclose(neg.per_query, -pos.per_query, atol=1e-12)
    assert neg.mean == pytest.approx(-pos.mean)


def test_lds_ci_contains_mean_and_narrows():
    widths = []
    for q in (10, 320):
        true_w, masks, losses = _planted(q=q, n=100, s=60, noise=2.0, seed=3)
        r = lds(true_w, masks, losses, bootstrap=500, seed=0)
        assert r.ci_low <= r.mean <= r.ci_high
        widths.append(r.ci_high - r.ci_low)
    assert widths[1] < 0.5 * widths[0]


def test_lds_undefined_queries_and_report():
    true_w, masks, losses = _planted(q=5)
    true_w[2] = 0.0  # constant prediction: no information, counted as 0 (not dropped)
    losses[:, 3] = 1.5  # constant retrained loss: no ground truth, dropped
    r = lds(true_w, masks, losses)
    assert r.per_query[2] == 0.0
    assert np.isnan(r.per_query[3]) and r.num_queries == 4
    assert r.mean == pytest.approx(np.nanmean(r.per_query))
    d = json.loads(json.dumps(r.to_dict()))
    assert d["per_query"][3] is None and d["num_subsets"] == 150
    text = str(r)
    assert text.startswith("LDS ") and "95% CI" in text and "4 queries" in text
    assert "150 subsets" in text


def test_summarize():
    v = np.array([1.0, 2.0, np.nan, 3.0, 4.0])
    s = summarize(v, bootstrap=200, confidence=0.9, seed=0)
    assert s.n == 4 and s.mean == 2.5 and s.std == pytest.approx(np.std([1, 2, 3, 4], ddof=1))
    assert 1.0 <= s.ci_low <= 2.5 <= s.ci_high <= 4.0
    assert summarize(v, bootstrap=200, seed=7) == summarize(v, bootstrap=200, seed=7)
    assert np.isnan(summarize(v, bootstrap=0).ci_low)
    assert summarize([np.nan]).n == 0


@pytest.mark.parametrize("case, match", [
    ("scores_1d", "scores_qn must be 2-D"),
    ("masks_3d", "masks_sn must be 2-D"),
    ("n_mismatch", "disagree on the number of training examples"),
    ("losses_transposed", r"pass losses_sq\.T"),
    ("losses_shape", r"losses_sq must be \[S, Q\]"),
    ("few_subsets", "at least 3 subsets"),
    ("masks_counts", "boolean or 0/1; subsets \\[1\\]"),
    ("scores_nan", "scores_qn has NaN/inf in queries \\[2\\]"),
    ("losses_inf", "losses_sq has NaN/inf in subsets \\[4\\]"),
])
def test_lds_validation(case, match):
    true_w, masks, losses = _planted(q=4, n=10, s=8)
    masks = masks.astype(np.int64)
    if case == "scores_1d":
        true_w = true_w[0]
    elif case == "masks_3d":
        masks = masks[None]
    elif case == "n_mismatch":
        masks = masks[:, :9]
    elif case == "losses_transposed":
        losses = losses.T
    elif case == "losses_shape":
        losses = losses[:, :3]
    elif case == "few_subsets":
        masks, losses = masks[:2], losses[:2]
    elif case == "masks_counts":
        masks[1, 3] = 2
    elif case == "scores_nan":
        true_w[2, 5] = np.nan
    elif case == "losses_inf":
        losses[4, 1] = np.inf
    with pytest.raises(ValueError, match=match):
        lds(true_w, masks, losses)


def test_counterfactual_summary():
    rng = np.random.default_rng(0)
    base = rng.random(50)
    top = base + 0.5 + 0.1 * rng.normal(size=50)
    rand = base[None] + 0.1 + 0.1 * rng.normal(size=(3, 50))
    out = counterfactual_summary(base, top, rand, bootstrap=300)
    assert out["mean_increase_top"] == pytest.approx(float((top - base).mean()))
    assert out["mean_increase_random"] == pytest.approx(float((rand.mean(0) - base).mean()))
    assert out["mean_difference"] == pytest.approx(
        out["mean_increase_top"] - out["mean_increase_random"])
    assert out["difference_ci_low"] <= out["mean_difference"] <= out["difference_ci_high"]
    assert out["fraction_top_greater"] > 0.9 and out["num_queries"] == 50
    json.dumps(out)
    with pytest.raises(ValueError, match="same Q"):
        counterfactual_summary(base, top[:-1], rand)
    with pytest.raises(ValueError, match="loss_removed_top_q has NaN/inf at queries \\[3\\]"):
        counterfactual_summary(base, np.where(np.arange(50) == 3, np.nan, top), rand)

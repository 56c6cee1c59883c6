"""The public Python API (issue 17): what a JAX user embeds. Top-level imports, results that
reopen (``Attribution.load``), one error base, a user's own model and measurement."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from stride_jax.attribution import Attribution, TopScores
from stride_jax.cli import main


def _result(Q=3, n=7, K=5, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(Q, n)).astype(np.float32)
    return Attribution(w, [f"q{q}" for q in range(Q)], [f"t{i}" for i in range(n)],
                       rng.normal(size=(Q, K)).astype(np.float32), rng.random(Q), rng.random(Q),
                       rng.normal(size=Q))


# --------------------------------------------------------------------------- results reopen
def test_attribution_load_reads_back_what_write_wrote(tmp_path):
    res = _result()
    res.write(tmp_path, train_texts=[f"text {i}" for i in range(7)], k=3)
    back = Attribution.load(tmp_path)
    np.testing.assert_array_equal(back.scores_qn, res.scores_qn)
    assert back.query_ids == res.query_ids and back.train_ids == res.train_ids
    for a, b in zip(back[3:7], res[3:7]):
        np.testing.assert_array_equal(a, b)
    assert back.top(1, 3) == res.top(1, 3)
    # The scores file alone (ids.json beside it is read), memory-mapped.
    again = Attribution.load(tmp_path / "scores.npy", mmap=True)
    assert isinstance(again.scores_qn, np.memmap) and again.query_ids == res.query_ids


def test_attribution_load_reads_top_k_runs(tmp_path):
    res = _result()
    sparse = res._replace(scores_qn=None, top_scores=TopScores.from_dense(res.scores_qn, 4))
    sparse.write(tmp_path, k=4)
    assert not (tmp_path / "scores.npy").exists()
    back = Attribution.load(tmp_path)
    assert back.scores_qn is None
    for q in range(3):
        assert back.top(q, 4) == res.top(q, 4)


def test_attribution_load_reads_a_score_command_directory(tmp_path):
    """``stride-jax score`` writes scores.npy and ids.json only: the per-query arrays are None."""
    np.save(tmp_path / "scores.npy", np.ones((2, 3), np.float32))
    (tmp_path / "ids.json").write_text(json.dumps({"queries": ["a", "b"],
                                                   "train": ["x", "y", "z"]}))
    back = Attribution.load(tmp_path)
    assert back.y_qk is None and back.lam_q is None and back.train_ids == ["x", "y", "z"]


@pytest.mark.parametrize("case,phrase", [
    ("no_dir", "does not exist"),
    ("no_scores", "has no scores.npy"),
    ("no_ids", "has no ids.json"),
    ("bad_ids", "is not an ids file"),
    ("ids_mismatch", "the files are from different runs"),
    ("not_npy", "is not a .npy file"),
    ("bad_per_query", "not over the 3 queries"),
])
def test_attribution_load_errors_name_the_file(tmp_path, case, phrase):
    from stride_jax.errors import StrideError
    run = tmp_path / "run"
    _result().write(run)
    if case == "no_dir":
        run = tmp_path / "nope"
    elif case == "no_scores":
        (run / "scores.npy").unlink()
    elif case == "no_ids":
        (run / "ids.json").unlink()
    elif case == "bad_ids":
        (run / "ids.json").write_text("[1, 2]")
    elif case == "ids_mismatch":
        (run / "ids.json").write_text(json.dumps({"queries": ["a"], "train": ["x"]}))
    elif case == "not_npy":
        (run / "scores.npy").write_bytes(b"garbage")
    elif case == "bad_per_query":
        np.savez(run / "per_query.npz", y=np.zeros((2, 5)))
    with pytest.raises((StrideError, FileNotFoundError), match=phrase):
        Attribution.load(run)


# --------------------------------------------------------------------------- one error base
def test_the_cli_reports_our_errors_in_one_line_and_bugs_with_a_traceback(tmp_path, capsys,
                                                                           monkeypatch):
    """``main`` turns a StrideError into ``error: ...`` + exit 2; a bug inside the library
    (a plain KeyError, TypeError or ValueError) keeps its traceback."""
    import stride_jax.apps.select as select
    _result().write(tmp_path)
    assert main(["select", "--run", str(tmp_path), "--k", "99"]) == 2
    assert "error: --k 99 is out of range" in capsys.readouterr().err
    for bug in (KeyError("internal"), TypeError("internal"), ValueError("internal"),
                AssertionError("internal")):
        def broken(*a, _bug=bug, **k):
            raise _bug
        monkeypatch.setattr(select, "select_run", broken)
        with pytest.raises(type(bug)):
            main(["select", "--run", str(tmp_path), "--k", "2"])


def test_every_error_class_is_a_stride_error():
    import stride_jax.errors as errors
    from stride_jax.config import ConfigError
    from stride_jax.data import DataError
    from stride_jax.io.atomic import DiskFullError
    from stride_jax.io.stamps import StaleArtifactError
    from stride_jax.model.hf import HFConfigError, HFWeightsError
    from stride_jax.io.outdir import OutputLockedError, OutputPathError
    from stride_jax.train import NonFiniteOperatorLossError
    for cls in (ConfigError, DataError, DiskFullError, StaleArtifactError, HFConfigError,
                HFWeightsError, NonFiniteOperatorLossError, OutputPathError, OutputLockedError):
        assert issubclass(cls, errors.StrideError) and issubclass(cls, ValueError), cls
    assert issubclass(DiskFullError, OSError)
    assert issubclass(NonFiniteOperatorLossError, FloatingPointError)
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.StrideError), name


# --------------------------------------------------------------------------- data and configs
def test_tokenized_set_from_arrays_applies_the_next_token_shift():
    from stride_jax import TokenizedSet
    ids = np.array([[5, 6, 7, 8, 0], [1, 2, 3, 0, 0]])
    att = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    comp = np.array([[0, 0, 1, 1, 0], [0, 1, 1, 0, 0]])   # prompt, then the scored answer
    rows = TokenizedSet.from_arrays(ids, att, comp, ids=["a", "b"])
    np.testing.assert_array_equal(rows.loss_mask, [[0, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    # Scored positions predict exactly the completion tokens.
    np.testing.assert_array_equal(rows.target_ids()[rows.loss_mask > 0], [7, 8, 2, 3])
    plain = TokenizedSet.from_arrays(ids)
    assert plain.ids == ["0", "1"] and (plain.loss_mask[:, :-1] == 1).all()
    assert (plain.loss_mask[:, -1] == 0).all()
    from stride_jax import DataError
    with pytest.raises(DataError, match="attention_mask has shape"):
        TokenizedSet.from_arrays(ids, att[:, :3])
    with pytest.raises(DataError, match="input_ids must be an integer"):
        TokenizedSet.from_arrays(np.zeros(4, np.int32))


def test_dotted_overrides_from_python():
    from stride_jax import AttributeConfig, ConfigError, load_config, with_overrides
    cfg = with_overrides(AttributeConfig(), "train.epochs=5", "steering.site=final_hidden")
    assert cfg.train.epochs == 5 and cfg.steering.site == "final_hidden"
    assert cfg == load_config(AttributeConfig, None, ["train.epochs=5",
                                                      "steering.site=final_hidden"])
    cfg = with_overrides(cfg, **{"design.per_example": 10, "solve.estimator": "ridge"})
    assert cfg.design.per_example == 10 and cfg.train.epochs == 5
    with pytest.raises(ConfigError, match="did you mean 'train.epochs'"):
        with_overrides(cfg, **{"train.epoch": 3})
    with pytest.raises(ConfigError, match="train.epochs"):
        with_overrides(cfg, **{"train.epochs": "many"})


def test_top_level_exports_are_lazy_and_complete():
    import subprocess
    import sys
    code = ("import sys, stride_jax; assert 'jax' not in sys.modules, 'import stride_jax "
            "imported jax'; from stride_jax import *; import stride_jax as s; "
            "missing = [n for n in s.__all__ if not hasattr(s, n)]; assert not missing, missing")
    subprocess.run([sys.executable, "-c", code], check=True)
    import stride_jax
    from stride_jax.attributor import Attributor
    from stride_jax.model.hf import from_hf
    assert stride_jax.Attributor is Attributor and stride_jax.from_hf is from_hf
    with pytest.raises(AttributeError):
        stride_jax.not_a_name


# --------------------------------------------------------------------------- your own model
EXAMPLES = __import__("pathlib").Path(__file__).resolve().parents[1] / "examples"


def _example(name: str):
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _wrap(model, layer: int = 1, **kw):
    from stride_jax import LMFunctions
    return LMFunctions.from_nnx(
        model, layer=layer, num_layers=3, max_len=16,
        reader=lambda m, ids, mask: m.run(m.embed(ids), 0, layer + 1),
        upper=lambda m, h, ids, mask: m.run(h, layer + 1, 3),
        final_norm=lambda m, h: m.norm(h), head=lambda m, h: m.out(h), **kw)


def _fast():
    """Trained operators (a custom measurement needs them), tiny and fast."""
    from stride_jax import AttributeConfig, with_overrides
    return with_overrides(
        AttributeConfig(), "operators=trained", "design.num_subsets=16", "design.per_example=3", "steering.rank=4",
        "steering.layer=1", "train.epochs=1", "train.subsets_per_step=16",
        "train.rows_per_subset=2", "train.stability_rows=2", "train.tokens_per_row=4",
        "solve.estimator=lasso", "solve.lam=0.001", "token_queries=2", "topk=3")


@pytest.fixture(scope="module")
def nnx_lm():
    from stride_jax import TokenizedSet
    model = _example("own_model").TinyLM(vocab=64, width=32, depth=3, seed=0)
    rng = np.random.default_rng(0)
    train = TokenizedSet.from_arrays(rng.integers(0, 64, (40, 16)))
    comp = np.zeros((3, 16), np.int32)
    comp[0, 4:], comp[1, 10:], comp[2, 1:] = 1, 1, 1        # completions of 12, 6 and 15 tokens
    queries = TokenizedSet.from_arrays(rng.integers(0, 64, (3, 16)), completion_mask=comp,
                                       ids=["qa", "qb", "qc"])
    return model, _wrap(model), train, queries


def test_from_nnx_runs_the_users_model_in_place(nnx_lm):
    import jax.numpy as jnp

    from stride_jax import params_fingerprint
    model, lm, train, _ = nnx_lm
    assert (lm.d_reader, lm.d_final, lm.vocab_size, lm.layer) == (32, 32, 64, 1)
    ids = jnp.asarray(train.input_ids[:2])
    h_reader, h_final = lm.features(lm.params, ids, jnp.ones_like(ids))
    np.testing.assert_allclose(lm.head(lm.params, h_final), model(ids), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lm.upper(lm.params, h_reader, ids, ids), h_final, rtol=1e-6)
    other = _wrap(_example("own_model").TinyLM(vocab=64, width=32, depth=3, seed=1))
    assert lm.with_fingerprint().fingerprint == params_fingerprint(lm.params)
    assert other.with_fingerprint().fingerprint != lm.with_fingerprint().fingerprint


@pytest.mark.parametrize("case,phrase", [
    ("d_reader", "LMFunctions.d_reader=7 but features returns h_reader of shape (1, 16, 32) for a "
                 "[1, 16] batch (expected (1, 16, 7)): set d_reader=32"),
    ("d_final", "LMFunctions.d_final=5 but features returns h_final of shape (1, 16, 32)"),
    ("vocab", "LMFunctions.vocab_size=50 but head returns logits of shape (1, 16, 64)"),
    ("no_upper", "steering.site=residual needs LMFunctions.upper"),
    ("loss_mask", "has loss_mask 1 in its last column"),
])
def test_a_model_that_does_not_fit_is_refused_before_any_work(nnx_lm, tmp_path, case, phrase):
    import dataclasses

    from stride_jax import Attributor, ModelError, StrideError, with_overrides
    _, lm, train, _ = nnx_lm
    cfg = _fast()
    if case == "d_reader":
        lm = dataclasses.replace(lm, d_reader=7)
    elif case == "d_final":
        lm = dataclasses.replace(lm, d_final=5)
    elif case == "vocab":
        lm = dataclasses.replace(lm, vocab_size=50)
    elif case == "no_upper":
        lm = dataclasses.replace(lm, upper=None)
        cfg = with_overrides(cfg, "steering.site=residual")
    elif case == "loss_mask":
        train = dataclasses.replace(train, loss_mask=np.ones_like(train.loss_mask))
    with pytest.raises(StrideError) as e:
        Attributor(lm, train, cfg, workdir=tmp_path / "w", progress=False)
    assert phrase in str(e.value) and "\n" not in str(e.value)
    assert isinstance(e.value, ModelError) or case == "loss_mask"
    assert not (tmp_path / "w").exists()        # nothing was computed or written


# --------------------------------------------------------------------------- your own measurement
@pytest.mark.parametrize("site", ["logits", "final_hidden"])
def test_a_sum_measurement_scales_the_responses_by_the_token_count(nnx_lm, site):
    """Contract check: the response is the measurement of the per-token log-probability changes;
    summing instead of averaging multiplies each query's responses by its scored token count."""
    import jax

    from stride_jax import MeasureInputs, Measurement, sum_logprob_change
    from stride_jax.measure import measure_responses
    _, lm, _, queries = nnx_lm
    k1, k2 = jax.random.split(jax.random.key(0))
    basis = {"w": jax.random.normal(k1, (32, 4)) / 6}
    C = 64 if site == "logits" else 32
    coef = jax.random.normal(k2, (5, 4, C)) * 0.05
    mean = measure_responses(lm, site, basis, coef, queries).y_qk
    total = measure_responses(lm, site, basis, coef, queries, measurement=sum_logprob_change).y_qk
    counts = queries.loss_mask.sum(1)
    assert list(counts) == [12, 6, 15]
    np.testing.assert_allclose(total, mean * counts[:, None], rtol=2e-5, atol=1e-7)
    assert np.abs(mean).min() > 0
    # A function of the steered logits: the change of the last scored token's margin.
    def margin(x: MeasureInputs):
        t = (x.loss_mask_t * jax.numpy.arange(x.loss_mask_t.shape[0])).argmax()
        z = x.base_logp_tv[t] + x.delta_tv[t]
        y = x.targets_t[t]
        return (z[y] - jax.numpy.max(z.at[y].set(-1e9))) - (
            x.base_logp_tv[t, y] - jax.numpy.max(x.base_logp_tv[t].at[y].set(-1e9)))
    got = measure_responses(lm, site, basis, coef, queries,
                            measurement=Measurement(margin, "last-token margin")).y_qk
    assert got.shape == (3, 5) and np.isfinite(got).all() and np.abs(got).max() > 0


def test_a_measurement_needs_a_linear_site(nnx_lm):
    import jax

    from stride_jax import ConfigError, sum_logprob_change
    from stride_jax.measure import measure_responses
    _, lm, _, queries = nnx_lm
    with pytest.raises(ConfigError, match="logits or final_hidden"):
        measure_responses(lm, "residual", {"w": jax.numpy.zeros((32, 4))},
                          jax.numpy.zeros((5, 4, 32)), queries, measurement=sum_logprob_change)


@pytest.fixture(scope="module")
def run(nnx_lm, tmp_path_factory):
    from stride_jax import Attributor
    _, lm, train, queries = nnx_lm
    work = tmp_path_factory.mktemp("api_run")
    att = Attributor(lm, train, _fast(), workdir=work, progress=False)
    return work, att, att.attribute(queries)


def test_attributor_write_writes_everything_the_cli_writes(nnx_lm, run):
    from stride_jax import Attribution
    _, _, train, queries = nnx_lm
    work, att, result = run
    att.write(result, queries, self_influence=True, report=True, title="api")
    for name in ("scores.npy", "ids.json", "per_query.npz", "topk.jsonl", "tokens.json",
                 "selfinf.json", "report.html", "attribute.yaml"):
        assert (work / name).is_file(), name
    back = Attribution.load(work)
    np.testing.assert_array_equal(back.scores_qn, result.scores_qn)
    np.testing.assert_array_equal(back.y_qk, result.y_qk)
    assert back.query_ids == ["qa", "qb", "qc"] and back.train_ids == list(train.ids)
    tokens = json.loads((work / "tokens.json").read_text())
    assert [q["query_id"] for q in tokens["queries"]] == ["qa", "qb"]      # token_queries=2
    info = json.loads((work / "run_info.json").read_text())
    assert info["operators"] == "trained" and info["method"] == "stride"
    assert set(info["stage_seconds"]) == {"operators", "responses", "solve", "tokens", "selfinf"}
    assert all(v >= 0 for v in info["stage_seconds"].values())
    n_params = sum(x.size for x in jax.tree.leaves(att.lm.params))
    assert info["model"]["parameters"] == n_params
    assert info["model"]["fingerprint"] == att.lm.fingerprint and info["model"]["path"] is None
    assert info["history"] == att.history and len(info["history"]) > 0    # the loss curve
    page = (work / "report.html").read_text(encoding="utf-8")
    assert "Operator-training loss" in page and f"{n_params:,}" in page
    assert len(json.loads((work / "selfinf.json").read_text())["score"]) == len(train)


def test_a_custom_measurement_is_stamped_and_reuses_the_operators(nnx_lm, run, tmp_path):
    from stride_jax import Attributor, sum_logprob_change
    _, lm, train, queries = nnx_lm
    work, first, mean = run
    saved = (work / "operators" / "operators.npz").stat().st_mtime_ns
    att = Attributor(lm, train, _fast(), workdir=work, progress=False,
                     measurement=sum_logprob_change)
    total = att.attribute(queries)
    # The operators were reused (not rewritten), their loss curve read back with them.
    assert (work / "operators" / "operators.npz").stat().st_mtime_ns == saved
    assert att.history == first.history and att.history
    np.testing.assert_allclose(total.y_qk, mean.y_qk * queries.loss_mask.sum(1)[:, None],
                               rtol=2e-5, atol=1e-7)
    stamps = [json.loads(p.read_text())["payload"] for p in (work / "responses").glob("*/stamp.json")]
    assert sorted(s.get("measurement", "default") for s in stamps) == ["default",
                                                                       "sum_logprob_change"]
    att.write(total, queries, tmp_path)
    assert (tmp_path / "topk.jsonl").is_file() and not (tmp_path / "tokens.json").exists()


def test_a_trained_run_records_each_querys_estimator_and_penalty(nnx_lm, run):
    work, _, result = run
    assert list(result.estimator_q) == ["lasso"] * 3          # solve.estimator=lasso
    np.testing.assert_allclose(result.lam_q, 0.001)
    back = Attribution.load(work)
    assert list(back.estimator_q) == ["lasso"] * 3
    np.testing.assert_array_equal(back.lam_q, result.lam_q)
    np.testing.assert_array_equal(back.intercept_q, result.intercept_q)
    rec = json.loads((work / "topk.jsonl").read_text().splitlines()[0])
    assert rec["estimator"] == "lasso" and rec["lambda"] == pytest.approx(0.001)


# --------------------------------------------------------------------------- closed-form operators
def test_a_closed_form_run_writes_and_reloads_without_a_penalty(nnx_lm, tmp_path):
    """The default operators have no regression: no responses over subsets (y [Q, 0]), no
    penalty, no intercept. The run directory says so (estimator 'closed_form', no lambda) rather
    than holding NaN, and every file reads back."""
    from stride_jax import AttributeConfig, Attributor, with_overrides
    _, lm, train, queries = nnx_lm
    att = Attributor(lm, train, with_overrides(AttributeConfig(), "token_queries=1", "topk=3"),
                     workdir=tmp_path, progress=False)
    result = att.attribute(queries)
    assert result.y_qk.shape == (3, 0) and result.lam_q is None and result.intercept_q is None
    assert list(result.estimator_q) == ["closed_form"] * 3
    att.write(result, queries, self_influence=True)
    with np.load(tmp_path / "per_query.npz") as z:
        assert sorted(z.files) == ["base_loss", "estimator", "y"]
        assert z["y"].shape == (3, 0) and np.isfinite(z["base_loss"]).all()
    back = Attribution.load(tmp_path)
    np.testing.assert_array_equal(back.scores_qn, result.scores_qn)
    assert back.y_qk.shape == (3, 0) and back.lam_q is None and back.intercept_q is None
    assert list(back.estimator_q) == ["closed_form"] * 3
    for line in (tmp_path / "topk.jsonl").read_text().splitlines():
        rec = json.loads(line)
        assert rec["estimator"] == "closed_form" and "lambda" not in rec
    assert (tmp_path / "tokens.json").is_file() and (tmp_path / "selfinf.json").is_file()
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["operators"] == "closed_form" and info["history"] == []
    assert {"operators", "responses", "solve"} <= set(info["stage_seconds"])
    assert info["model"]["reader"] in ("final hidden state", f"layer {lm.layer}")


def test_held_out_r2_flags_weak_queries_and_survives_the_run_directory(tmp_path):
    """Per query, the chosen fit's held-out R^2 = 1 - CV error / var(y_q): written to
    per_query.npz (absent where no CV ran) and topk.jsonl (with a weak-signal flag below 0.05),
    read back by Attribution.load."""
    from stride_jax import Attribution
    from stride_jax.attributor import _cv_r2
    y = np.array([[0.0, 2.0, 4.0], [1.0, 1.0, 4.0], [0.0, 1.0, 2.0]])
    var = y.var(axis=1)
    info = {"estimator_q": np.array(["ridge", "lasso", "ridge"]),
            "cv_error_ridge_q": np.array([0.5 * var[0], 9.0, 0.99 * var[2]]),
            "cv_error_lasso_q": np.array([9.0, 0.25 * var[1], 9.0])}
    np.testing.assert_allclose(_cv_r2(info, y), [0.5, 0.75, 0.01])
    assert np.isnan(_cv_r2({"estimator_q": info["estimator_q"]}, y)).all()   # lam_rule fixed
    res = _result()._replace(cv_r2_q=np.array([0.5, -0.2, 0.01]))
    res.write(tmp_path / "a")
    back = Attribution.load(tmp_path / "a")
    np.testing.assert_array_equal(back.cv_r2_q, res.cv_r2_q)
    recs = [json.loads(x) for x in (tmp_path / "a" / "topk.jsonl").read_text().splitlines()]
    assert recs[0]["cv_r2"] == 0.5 and recs[0]["weak_signal"] is False
    assert recs[1]["weak_signal"] is True and recs[2]["weak_signal"] is True
    _result().write(tmp_path / "b")          # no cross-validation: nothing claimed
    assert Attribution.load(tmp_path / "b").cv_r2_q is None
    assert "cv_r2" not in (tmp_path / "b" / "topk.jsonl").read_text()


def test_a_custom_measurement_needs_trained_operators(nnx_lm):
    from stride_jax import AttributeConfig, Attributor, ConfigError, sum_logprob_change
    _, lm, train, _ = nnx_lm
    with pytest.raises(ConfigError, match="a custom measurement needs operators=trained"):
        Attributor(lm, train, AttributeConfig(), measurement=sum_logprob_change)


def test_a_nan_penalty_never_reaches_the_run_directory(tmp_path):
    """Every per-query array is checked before any file is written."""
    from stride_jax import NonFiniteError
    res = _result()._replace(lam_q=np.array([0.1, np.nan, 0.2]))
    with pytest.raises(NonFiniteError, match="1 lambda value\\(s\\) are NaN or infinite "
                                             "\\(first: query 'q1'\\)"):
        res.write(tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_rewrite_leaves_no_file_of_the_earlier_result(tmp_path):
    """A top-k result written over a dense one (or a result without per-query arrays over one
    with them) must not be read back together with the earlier files."""
    res = _result()
    res.write(tmp_path)
    sparse = Attribution(None, res.query_ids, res.train_ids,
                         top_scores=TopScores.from_dense(res.scores_qn, 2))
    sparse.write(tmp_path, k=2)
    assert not (tmp_path / "scores.npy").exists() and not (tmp_path / "per_query.npz").exists()
    back = Attribution.load(tmp_path)
    assert back.scores_qn is None and back.lam_q is None and back.top(0, 2) == res.top(0, 2)

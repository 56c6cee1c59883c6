"""The kronfluence peer (benchmarks/peers_kronfluence.py) on a tiny stride-jax model: format and sign.

Skipped unless the `peers` extra is installed (`pip install -c constraints.txt -e .[peers]`).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the kronfluence peer needs the `peers` extra")
pytest.importorskip("kronfluence", reason="the kronfluence peer needs the `peers` extra")

from stride_jax.model import init_model, tiny_llama  # noqa: E402
from stride_jax.model.hf import to_hf  # noqa: E402

N, Q, T = 12, 3, 12
COPIES = (2, 7)  # query j (< len(COPIES)) is an exact copy of training row COPIES[j]


def _peer():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "peers_kronfluence.py"
    spec = importlib.util.spec_from_file_location("peers_kronfluence", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rows(rng, k, vocab):
    lens = rng.integers(T // 2, T + 1, size=k)
    attn = (np.arange(T)[None] < lens[:, None]).astype(np.int32)
    ids = rng.integers(1, vocab, size=(k, T)) * attn  # right padding with 0
    loss = np.zeros_like(attn)
    for r, m in enumerate(lens):
        loss[r, 1:m - 1] = 1  # the first prediction unscored too, like a one-token prompt
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    # One intra-op thread: at this size torch's thread pool only adds contention on a shared CPU.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("peers")
    cfg = tiny_llama(vocab_size=97, hidden_size=32, num_heads=2, num_kv_heads=1, head_dim=16,
                     intermediate_size=64, max_position_embeddings=32)
    hf_dir = to_hf(init_model(cfg, seed=0), tmp / "hf")
    rng = np.random.default_rng(0)
    train, query = _rows(rng, N, cfg.vocab_size), _rows(rng, Q, cfg.vocab_size)
    for j, i in enumerate(COPIES):
        for key in query:
            query[key][j] = train[key][i]
    np.savez(tmp / "rows.npz", **{f"train_{k}": v for k, v in train.items()},
             **{f"query_{k}": v for k, v in query.items()})
    yield tmp, hf_dir, tmp / "rows.npz"
    torch.set_num_threads(threads)


def test_ekfac_cli_format_and_copies(setup):
    tmp, hf_dir, rows = setup
    out = tmp / "ekfac" / "scores.npy"
    assert _peer().main(["--model", str(hf_dir), "--rows", str(rows), "--out", str(out),
                         "--train-batch", "5", "--query-batch", "2", "--threads", "1"]) == 0
    scores = np.load(out)
    assert scores.shape == (Q, N) and scores.dtype == np.float32
    assert np.isfinite(scores).all()
    info = json.loads(out.with_suffix(".json").read_text())
    assert (info["n"], info["Q"], info["strategy"]) == (N, Q, "ekfac")
    assert info["fit_factors_s"] >= 0 and info["scores_s"] >= 0 and info["kronfluence"]
    # A query identical to a training row is that row's strongest proponent: its (preconditioned)
    # gradient aligns with its own, so the score is large and positive in our sign.
    for j, i in enumerate(COPIES):
        assert int(np.argmax(scores[j])) == i, scores[j]
        assert scores[j, i] > 0


def test_identity_matches_autograd_dot_products(setup):
    """strategy=identity is grad(mean query loss) . grad(summed train loss): pins sign and losses."""
    tmp, hf_dir, rows = setup
    peer = _peer()
    scores = peer.ekfac_scores(hf_dir, rows, strategy="identity", train_batch=4, query_batch=2,
                               workdir=tmp / "identity")
    train, query = peer.load_rows(rows)
    model = peer.load_hf_model(hf_dir)
    by_name = dict(model.named_modules())
    params = [p for name in peer._tracked_module_names(model, "blocks")
              for p in by_name[name].parameters()]

    def grad(rows_, i, mean):
        t = {k: torch.from_numpy(v[i:i + 1]) for k, v in rows_.items()}
        logits = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits
        ce = torch.nn.functional.cross_entropy(logits[0, :-1], t["input_ids"][0, 1:],
                                               reduction="none")
        mask = t["loss_mask"][0, :-1].float()
        loss = (ce * mask).sum() / (mask.sum() if mean else 1.0)
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])

    gq = torch.stack([grad(query, q, True) for q in range(Q)])
    gt = torch.stack([grad(train, i, False) for i in range(N)])
    want = (gq @ gt.T).numpy()
    np.testing.assert_allclose(scores, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    # Semantics of the sign: a small SGD step on a training row whose score is clearly positive
    # lowers the query's mean loss.
    q, i = 0, COPIES[0]
    g = gt[i]
    with torch.no_grad():
        def qloss():
            t = {k: torch.from_numpy(v[q:q + 1]) for k, v in query.items()}
            logits = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits
            ce = torch.nn.functional.cross_entropy(logits[0, :-1], t["input_ids"][0, 1:],
                                                   reduction="none")
            mask = t["loss_mask"][0, :-1].float()
            return float((ce * mask).sum() / mask.sum())
        before = qloss()
        offset = 0
        for p in params:
            p -= 1e-3 * g[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        assert qloss() < before and scores[q, i] > 0

"""The scripts in ``examples/`` run, as a user runs them, on tiny sizes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from stride_jax import Attribution

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# The default (closed-form operators) on tiny sizes; one query's per-token attribution.
FAST = ["token_queries=1"]


def _run(*args) -> str:
    proc = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_own_model_example(tmp_path):
    out = _run(EXAMPLES / "own_model.py", "--rows", "48", "--out", tmp_path / "run", *FAST)
    assert "query a: proponents" in out and "query d:" in out
    run = Attribution.load(tmp_path / "run")
    assert run.scores_qn.shape == (4, 48) and np.isfinite(run.scores_qn).all()


def test_hf_model_example(tmp_path):
    from stride_jax.data import Document, shakespeare_plays, write_jsonl
    from stride_jax.model import init_model, tiny_llama, to_hf
    from stride_jax.tokenizer import train_bpe, vocab_size_of
    text = shakespeare_plays(["macbeth"])[0].text
    tok = train_bpe([text], vocab_size=300)
    model = init_model(tiny_llama(vocab_size=vocab_size_of(tok), hidden_size=32, num_heads=2,
                                  num_kv_heads=1, head_dim=16, intermediate_size=64,
                                  max_position_embeddings=32), seed=0)
    to_hf(model, tmp_path / "model", tokenizer=tok)
    lines = [x for x in text.splitlines() if len(x) > 30]
    write_jsonl([Document(id=f"d{i}", text=x) for i, x in enumerate(lines[:40])],
                tmp_path / "train.jsonl")
    write_jsonl([Document(id=f"q{i}", prompt=x[:12], text=x[12:40]) for i, x in
                 enumerate(lines[100:102])], tmp_path / "queries.jsonl")
    out = _run(EXAMPLES / "hf_model.py", tmp_path / "model", tmp_path / "train.jsonl",
               tmp_path / "queries.jsonl", tmp_path / "run", *FAST)
    assert "query q0: top proponent" in out
    for name in ("scores.npy", "topk.jsonl", "tokens.json", "report.html"):
        assert (tmp_path / "run" / name).is_file(), name
    assert Attribution.load(tmp_path / "run").query_ids == ["q0", "q1"]

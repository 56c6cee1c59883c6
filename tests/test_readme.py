"""Every ```python block of README.md runs, so the README and the code cannot drift apart.

Each block runs on its own, in a fresh directory, in a namespace pre-filled by :func:`prelude`
with the placeholders the README uses (a tiny model and data). Files the README names by path
exist at that path in the directory (``path/to/hf_dir`` holds a tiny HF model). To add a snippet
that needs a new placeholder, add it to :func:`prelude` (or a file to :func:`_layout`); the test
ids name the README section, e.g. ``test_readme_snippet[Using the model layer #1]``.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_snippets(text: str) -> list[tuple[str, str]]:
    """``(section #i, code)`` of every fenced ```python block, in order."""
    out, section, count, block = [], "top", {}, None
    for line in text.splitlines():
        if block is not None:
            if line.strip() == "```":
                count[section] = count.get(section, 0) + 1
                out.append((f"{section} #{count[section]}", "\n".join(block) + "\n"))
                block = None
            else:
                block.append(line)
        elif line.startswith("```python"):
            block = []
        elif re.match(r"#{1,4} ", line):
            section = line.lstrip("#").strip()
    assert block is None, "README.md has an unclosed ```python block"
    return out


SNIPPETS = readme_snippets(README.read_text(encoding="utf-8"))


def test_the_readme_has_python_snippets():
    assert len(SNIPPETS) >= 2
    sections = {name.rsplit(" #", 1)[0] for name, _ in SNIPPETS}
    assert {"Using the model layer", "Python API"} <= sections


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Files the snippets read by path: a tiny HF model directory with its tokenizer
    (``path/to/hf_dir``) and a finished run directory (``runs/x``)."""
    import numpy as np

    from stride_jax.attribution import Attribution
    from stride_jax.data import shakespeare_plays
    from stride_jax.model.config import tiny_llama
    from stride_jax.model.hf import to_hf
    from stride_jax.model.transformer import init_model
    from stride_jax.tokenizer import train_bpe, vocab_size_of
    root = tmp_path_factory.mktemp("readme_files")
    tok = train_bpe([shakespeare_plays(["macbeth"])[0].text], vocab_size=300)
    model = init_model(tiny_llama(vocab_size=vocab_size_of(tok), hidden_size=16, num_heads=2,
                                  num_kv_heads=1, head_dim=8, intermediate_size=32, num_layers=2,
                                  max_position_embeddings=32), seed=0)
    to_hf(model, root / "path" / "to" / "hf_dir", tokenizer=tok)
    rng = np.random.default_rng(0)
    Attribution(rng.normal(size=(2, 5)).astype(np.float32), ["q0", "q1"],   # closed form
                [f"t{i}" for i in range(5)], np.zeros((2, 0)), rng.random(2),
                estimator_q=np.full(2, "closed_form")).write(root / "runs" / "x")
    return root


def _layout(files: Path, cwd: Path) -> None:
    shutil.copytree(files, cwd, dirs_exist_ok=True)


def prelude(cwd: Path) -> dict:
    """The placeholders the README's snippets use, all tiny:

    * ``model``: the 2-block stride-jax ``CausalLM`` of ``path/to/hf_dir`` (vocabulary 300);
      ``input_ids`` / ``mask`` / ``delta``: a batch for it and a shift of its final hidden state;
    * ``train_rows`` (64 rows of 16 tokens), ``query_rows`` (3): ``TokenizedSet`` for ``model``;
    * ``config``: a small, fast ``AttributeConfig`` (closed-form operators; its design, train
      and solve settings keep ``operators=trained`` fast too);
    * ``my_nnx_model``: a user's own Flax NNX LM (``examples/own_model.py``'s ``TinyLM``:
      ``embed``, ``run(h, start, stop)`` over 3 blocks, ``norm``, ``out``; vocabulary 64);
      ``train_ids`` (int ``[64, 16]``), ``query_ids`` (``[3, 16]``) and ``answer_mask`` (the
      last 6 tokens of each query) for it.
    """
    import jax.numpy as jnp
    import numpy as np

    from stride_jax import AttributeConfig, with_overrides
    from stride_jax.model.hf import from_hf
    from _tiny import random_rows
    model = from_hf(cwd / "path" / "to" / "hf_dir")
    V = model.config.vocab_size
    rng = np.random.default_rng(0)
    answer_mask = np.zeros((3, 16), np.int32)
    answer_mask[:, -6:] = 1
    return {
        "model": model,
        "input_ids": jnp.asarray(rng.integers(0, V, (2, 16)).astype(np.int32)),
        "mask": jnp.ones((2, 16), jnp.int32),
        "delta": jnp.full((16,), 0.01),
        "train_rows": random_rows(64, 16, V, 1, "t"),
        "query_rows": random_rows(3, 16, V, 2, "q"),
        "config": with_overrides(
            AttributeConfig(), "design.num_subsets=16", "design.per_example=3",
            "steering.rank=4", "train.epochs=1", "train.subsets_per_step=16",
            "solve.estimator=ridge", "token_queries=1"),
        "my_nnx_model": _example("own_model").TinyLM(vocab=64, width=32, depth=3, seed=0),
        "train_ids": rng.integers(0, 64, (64, 16)),
        "query_ids": rng.integers(0, 64, (3, 16)),
        "answer_mask": answer_mask,
    }


def _example(name: str):
    import importlib.util
    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"readme_example_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name,code", SNIPPETS, ids=[n for n, _ in SNIPPETS])
def test_readme_snippet(name, code, files, tmp_path, monkeypatch):
    _layout(files, tmp_path)
    monkeypatch.chdir(tmp_path)
    namespace = prelude(tmp_path)
    exec(compile(code, f"README.md [{name}]", "exec"), namespace)

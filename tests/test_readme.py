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
    assert "Using the model layer" in sections


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Files the snippets read by path: a tiny HF model directory (with its tokenizer)."""
    from stride_jax.model.hf import to_hf
    from stride_jax.model.config import tiny_llama
    from stride_jax.model.transformer import init_model
    root = tmp_path_factory.mktemp("readme_files")
    model = init_model(tiny_llama(vocab_size=64, hidden_size=16, num_heads=2, num_kv_heads=1,
                                  head_dim=8, intermediate_size=32, num_layers=2,
                                  max_position_embeddings=32), seed=0)
    to_hf(model, root / "path" / "to" / "hf_dir")
    return root


def _layout(files: Path, cwd: Path) -> None:
    shutil.copytree(files, cwd, dirs_exist_ok=True)


def prelude(cwd: Path) -> dict:
    """The placeholders the README's snippets use, all tiny:

    ``model`` (a 2-block stride-jax ``CausalLM``, vocabulary 64), ``input_ids`` / ``mask`` /
    ``delta`` (a batch for it and a shift of its final hidden state), ``train_rows`` (64 rows of
    16 tokens) and ``query_rows`` (3), ``input_ids_np`` (NumPy token ids).
    """
    import jax.numpy as jnp
    import numpy as np

    from stride_jax.model.hf import from_hf
    from _tiny import random_rows
    model = from_hf(cwd / "path" / "to" / "hf_dir")
    rng = np.random.default_rng(0)
    input_ids_np = rng.integers(0, 64, (2, 16)).astype(np.int32)
    return {
        "model": model,
        "input_ids": jnp.asarray(input_ids_np),
        "input_ids_np": input_ids_np,
        "mask": jnp.ones((2, 16), jnp.int32),
        "delta": jnp.full((16,), 0.01),
        "train_rows": random_rows(64, 16, 64, 1, "t"),
        "query_rows": random_rows(3, 16, 64, 2, "q"),
    }


@pytest.mark.parametrize("name,code", SNIPPETS, ids=[n for n, _ in SNIPPETS])
def test_readme_snippet(name, code, files, tmp_path, monkeypatch):
    _layout(files, tmp_path)
    monkeypatch.chdir(tmp_path)
    namespace = prelude(tmp_path)
    exec(compile(code, f"README.md [{name}]", "exec"), namespace)

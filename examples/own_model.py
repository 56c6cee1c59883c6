"""Attribute your own Flax NNX language model, wrapped in place by ``LMFunctions.from_nnx``.

    python examples/own_model.py [--rows 256] [--out runs/own_model] [key=value ...]
"""

import argparse

import jax
import numpy as np
from flax import nnx

from stride_jax import AttributeConfig, Attributor, LMFunctions, TokenizedSet, with_overrides


class TinyLM(nnx.Module):
    """Embedding, `depth` residual MLP blocks, a final norm and an unembedding."""

    def __init__(self, vocab: int, width: int, depth: int, seed: int = 0):
        rngs = nnx.Rngs(seed)
        self.embed = nnx.Embed(vocab, width, rngs=rngs)
        self.blocks = nnx.List([nnx.Linear(width, width, rngs=rngs) for _ in range(depth)])
        self.norm = nnx.RMSNorm(width, rngs=rngs)
        self.out = nnx.Linear(width, vocab, rngs=rngs)

    def run(self, h, start, stop):          # blocks start .. stop-1 on the residual stream
        for block in self.blocks[start:stop]:
            h = h + jax.nn.gelu(block(h))
        return h

    def __call__(self, input_ids):
        return self.out(self.norm(self.run(self.embed(input_ids), 0, len(self.blocks))))


def main(rows: int = 256, out: str | None = None, overrides: tuple[str, ...] = ()) -> None:
    model, layer = TinyLM(vocab=64, width=32, depth=3), 1          # operators read block 1
    lm = LMFunctions.from_nnx(
        model, layer=layer, num_layers=3, max_len=16,
        reader=lambda m, ids, mask: m.run(m.embed(ids), 0, layer + 1),
        upper=lambda m, h, ids, mask: m.run(h, layer + 1, 3),
        final_norm=lambda m, h: m.norm(h),
        head=lambda m, h: m.out(h))
    rng = np.random.default_rng(0)                                  # your token rows here
    train = TokenizedSet.from_arrays(rng.integers(0, 64, (rows, 16)))
    queries = TokenizedSet.from_arrays(rng.integers(0, 64, (4, 16)), ids=["a", "b", "c", "d"])
    config = with_overrides(AttributeConfig(), *overrides)         # closed-form operators
    att = Attributor(lm, train, config, workdir=out, progress=False)
    result = att.attribute(queries)                                 # scores [4, rows]
    if out is not None:
        att.write(result, queries)                                  # scores, topk.jsonl, ...
    for q, qid in enumerate(result.query_ids):
        pro, opp = result.top(q, 3)
        print(f"query {qid}: proponents {[i for i, _ in pro]}, opponents {[i for i, _ in opp]}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=256, help="training rows")
    p.add_argument("--out", default=None, help="run directory (default: in memory)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="attribution config")
    a = p.parse_args()
    main(a.rows, a.out, tuple(a.overrides))

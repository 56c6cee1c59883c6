"""Subset designs: which training examples each of the K steering operators is trained on.

The membership matrix M in {0,1}^(K x n) is kept sparse (:class:`Design`: sorted (subset,
example) index pairs plus a CSR pointer) and generated from one key with per-example
(:func:`expander_design`) or per-subset (:func:`bernoulli_design`) randomness, so it does not
depend on chunking or device count. :func:`default_num_subsets` picks K from n and d.
"""

from stride_jax.subsets._design import (
    DENSE_LIMIT,
    Design,
    bernoulli_design,
    default_num_subsets,
    expander_design,
    fill_empty_subsets,
)

__all__ = [
    "DENSE_LIMIT",
    "Design",
    "bernoulli_design",
    "default_num_subsets",
    "expander_design",
    "fill_empty_subsets",
]

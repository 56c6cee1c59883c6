"""Applications built on a finished attribution run, each its own module imported on demand.

* :mod:`stride_jax.apps.tokens`: per-token attribution (``tokens.json``).
* :mod:`stride_jax.apps.selfinf`: self-influence, i.e. memorisation (``selfinf.json``).
* :mod:`stride_jax.apps.report`: ``stride-jax report``, one self-contained HTML page per run.

Nothing is re-exported here so that importing one application does not pull in another's
dependencies (``tokens`` and ``selfinf`` need JAX; ``report`` needs only NumPy and PyYAML).
"""

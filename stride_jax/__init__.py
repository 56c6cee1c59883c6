"""stride-jax: training-data attribution for language models by steering operators (STRIDE)."""

__version__ = "0.1.0"

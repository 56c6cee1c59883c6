"""Counting JAX traces from JAX's own monitoring events, with nothing added to production code."""

from __future__ import annotations

import collections
import contextlib

import jax

TRACE = "/jax/core/compile/jaxpr_trace_duration"


@contextlib.contextmanager
def traces():
    """Counts of jit traces by function name while the block runs."""
    counts: collections.Counter = collections.Counter()

    def listen(event, duration, **kw):
        if event == TRACE:
            counts[kw.get("fun_name", "?")] += 1

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield counts
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)

"""Deterministic, order-independent splits of ids by hashing."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence

from stride_jax.errors import DataError

__all__ = ["split_ids"]


def split_ids(
    ids: Sequence[str],
    fractions: Mapping[str, float],
    *,
    seed: int,
    groups: Sequence[str] | None = None,
) -> dict[str, list[int]]:
    """Split ``ids`` into named parts, e.g. ``{"train": 0.9, "heldout": 0.1}``.

    Each key (the id, or ``groups[i]`` when given, so that e.g. all chunks of one document land in
    the same part) gets the hash ``h(key) = sha256(f"{seed}:{key}")``. The distinct keys, sorted by
    ``(h, key)``, are cut into consecutive runs of sizes ``round(fraction * n_keys)`` in the order
    of ``fractions`` (largest-remainder rounding, so sizes sum to ``n_keys``; a part with a
    positive fraction gets at least one key when there are enough keys). Membership therefore
    depends on the seed and the *set* of keys, never on their order in ``ids``.

    Returns, for each part, the ascending indices into ``ids`` of its members.
    """
    if not fractions:
        raise DataError("fractions is empty; pass e.g. {'train': 0.9, 'heldout': 0.1}")
    names = list(fractions)
    fracs = [float(fractions[k]) for k in names]
    if any(not math.isfinite(f) or f < 0 for f in fracs):
        raise DataError(f"fractions must be finite and non-negative, got {dict(fractions)}")
    if abs(sum(fracs) - 1.0) > 1e-6:
        raise DataError(f"fractions must sum to 1, got {dict(fractions)} (sum {sum(fracs):g})")
    keys = list(ids) if groups is None else list(groups)
    if len(keys) != len(ids):
        raise DataError(f"groups has {len(keys)} entries but ids has {len(ids)}")

    unique = sorted(set(keys), key=lambda k: (_hash(k, seed), k))
    counts = _allocate(len(unique), fracs)
    part_of_key: dict[str, int] = {}
    start = 0
    for p, c in enumerate(counts):
        for k in unique[start : start + c]:
            part_of_key[k] = p
        start += c
    out: dict[str, list[int]] = {name: [] for name in names}
    for i, k in enumerate(keys):
        out[names[part_of_key[k]]].append(i)
    return out


def _hash(key: str, seed: int) -> bytes:
    return hashlib.sha256(f"{seed}:{key}".encode()).digest()


def _allocate(n: int, fracs: list[float]) -> list[int]:
    """Integer sizes summing to ``n``, closest to ``n * fracs`` (largest remainder)."""
    raw = [f * n for f in fracs]
    counts = [math.floor(r) for r in raw]
    # Ties in remainder go to the earlier part, which keeps the result deterministic.
    order = sorted(range(len(fracs)), key=lambda p: (-(raw[p] - counts[p]), p))
    for p in order[: n - sum(counts)]:
        counts[p] += 1
    # An empty heldout set is useless; move one key from the largest part when that is possible.
    for p, f in enumerate(fracs):
        if f > 0 and counts[p] == 0:
            donor = max(range(len(counts)), key=lambda q: counts[q])
            if counts[donor] > 1:
                counts[donor] -= 1
                counts[p] += 1
    return counts

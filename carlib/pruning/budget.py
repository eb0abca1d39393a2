"""How many filters a pruning run keeps or removes: the arithmetic of `n_keep`, `n_remove`
and `keep_fraction`, shared by the greedy loop's callers (pure functions, no checks)."""

from __future__ import annotations


def kept(n_filters: int, n_keep: int | None, keep_fraction: float | None) -> int:
    """Filters a layer of `n_filters` keeps: `n_keep`, else round(keep_fraction x n_filters)."""
    return n_keep if n_keep is not None else round(keep_fraction * n_filters)


def removals(total: int, n_remove: int | None, keep_fraction: float | None) -> int:
    """Filters a network-wide run removes of `total`: `n_remove`, else all but
    round(keep_fraction x total) (`kept`)."""
    return n_remove if n_remove is not None else total - kept(total, None, keep_fraction)

"""Which experts a client is sent, from its mean gate scores (NumPy only: the strategy
imports it, and a ServerApp process need not load PyTorch for it)."""

from __future__ import annotations

import numpy as np


def top_k_experts(scores: np.ndarray, k: int) -> list[int]:
    """Indices of the ``k`` highest scores, best first (ties broken by index)."""
    if not 0 < k <= len(scores):
        raise ValueError(f"top-k must be in [1, {len(scores)}], got {k}.")
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    return [int(i) for i in order[:k]]


def adaptive_experts(scores: np.ndarray, k_max: int, k_min: int, mass: float) -> list[int]:
    """The fewest best-scored experts whose gate mass reaches ``mass``, between ``k_min``
    and ``k_max`` (adaptive dispatch: a client whose data spans three anchor groups gets
    three experts, one that spans two gets two); ``mass <= 0`` is plain top-``k_max``."""
    ranked = top_k_experts(scores, k_max)
    if mass <= 0:
        return ranked
    cumulative = np.cumsum(np.asarray(scores, dtype=np.float64)[ranked])
    needed = int(np.searchsorted(cumulative, mass - 1e-12)) + 1
    return ranked[: min(k_max, max(k_min, needed))]

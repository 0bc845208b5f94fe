"""Per-expert federated averaging and the checks a client's update must pass first."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from flwr.app import Array, ArrayRecord

# Sample counts above this are treated as garbage rather than as a huge client.
MAX_NUM_EXAMPLES = 10**9


def aggregate_moe(current: ArrayRecord, updates: Sequence[tuple[ArrayRecord, float]]) -> ArrayRecord:
    """Average every array over the updates that carry it, weighted by examples.

    The gate is in every update, so it is averaged over all of them; an expert is
    averaged over the clients that trained it this round; an array no update carries
    (an expert nobody trained) keeps its current value.

    Parameters
    ----------
    current : ArrayRecord
        The global gate and experts before this round.
    updates : Sequence[tuple[ArrayRecord, float]]
        Each client's returned arrays (a subset of ``current``'s keys) and its number
        of training examples.

    Returns
    -------
    ArrayRecord
        The new global arrays, with the same keys, shapes and dtypes as ``current``.
    """
    merged: dict[str, Array] = {}
    for key, array in current.items():
        carriers = [(u[key].numpy(), w) for u, w in updates if key in u]
        if not carriers:
            merged[key] = array
            continue
        total = sum(w for _, w in carriers)
        mean = sum(a.astype(np.float64) * (w / total) for a, w in carriers)
        dtype = array.numpy().dtype
        if np.issubdtype(dtype, np.integer):
            mean = np.rint(mean)
        merged[key] = Array(np.asarray(mean, dtype=dtype))
    return ArrayRecord(merged)


def check_update(update: ArrayRecord, sent: ArrayRecord, num_examples: object) -> str:
    """Why a client's update must be rejected, or ``""`` if it is acceptable.

    An update must return exactly the arrays it was sent, with the same shapes and
    dtypes, all finite, and a positive, plausible example count.
    """
    if isinstance(num_examples, bool) or not isinstance(num_examples, (int, float)):
        return f"num-examples is not a number ({num_examples!r})"
    if not 0 < num_examples <= MAX_NUM_EXAMPLES:
        return f"num-examples out of range ({num_examples})"
    missing, extra = set(sent) - set(update), set(update) - set(sent)
    if missing:
        return f"missing arrays {sorted(missing)[:3]}"
    if extra:
        return f"arrays it was not sent {sorted(extra)[:3]}"
    for key, array in update.items():
        expected = sent[key]
        if tuple(array.shape) != tuple(expected.shape) or array.dtype != expected.dtype:
            return f"{key} has shape {array.shape} {array.dtype}, expected {expected.shape} {expected.dtype}"
        values = array.numpy()
        if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
            return f"{key} has NaN or Inf values"
    return ""

"""Which rows prepare keeps, and which become k-shot exemplars: array operations on keys.

Every rule is taken in input order over the 128-bit content and prompt keys the workers
computed, so that the result depends on the inputs alone, never on how they were cut into
units or on which worker finished first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from data_pipeline import split


def select_rows(cfg: Any, spilled: dict[str, Any]) -> tuple[np.ndarray, dict[str, int]]:
    """Which good rows are kept: dedupe, per-source caps, then no prompt in two splits.

    Every rule is taken in input order, so the result does not depend on how the input was
    cut into units or on which worker finished first.
    """
    n = spilled["good"]
    source, codes = spilled["source"], spilled["split"]
    keep = np.ones(n, bool)
    stats = {"good": n, "duplicates": 0, "capped": 0, "overlap": 0}
    if cfg.data.dedupe and n:
        keep[:] = False
        keep[first_occurrences(spilled["ck_hi"], spilled["ck_lo"])] = True
        stats["duplicates"] = int(n - keep.sum())
    test = codes == split.SPLIT_CODES["test"]
    for i, src in enumerate(cfg.data.sources):
        mine = source == i
        if src.max_records is not None:
            over = keep & mine & (np.cumsum(keep & mine) > src.max_records)
            stats["capped"] += int(over.sum())
            keep &= ~over
        if cfg.data.max_test_records is not None:
            mine_test = keep & mine & test
            over = mine_test & (np.cumsum(mine_test) > cfg.data.max_test_records)
            stats["capped"] += int(over.sum())
            keep &= ~over
    # A prompt lands in one split by its hash, but a source pinned to a split can still bring
    # a prompt that another source put elsewhere: test wins over validation over train.
    pk_hi, pk_lo = spilled["pk_hi"], spilled["pk_lo"]
    for later in ("test", "validation"):
        held = keep & (codes == split.SPLIT_CODES[later])
        earlier = keep & (codes < split.SPLIT_CODES[later])
        if held.any() and earlier.any():
            leak = earlier & isin128(pk_hi, pk_lo, pk_hi[held], pk_lo[held])
            stats["overlap"] += int(leak.sum())
            keep &= ~leak
    return keep, stats


def first_occurrences(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """Indices of the first row of each distinct 128-bit key (`hi`, `lo`), in key order.

    A stable lexsort puts equal keys next to each other in row order, so the first of each
    run is its first occurrence (np.unique on a structured array does the same, 20x slower).
    """
    order = np.lexsort((lo, hi))
    h, lo_sorted = hi[order], lo[order]
    new = np.ones(len(order), bool)
    new[1:] = (h[1:] != h[:-1]) | (lo_sorted[1:] != lo_sorted[:-1])
    return order[new]


def isin128(hi: np.ndarray, lo: np.ndarray, held_hi: np.ndarray, held_lo: np.ndarray) -> np.ndarray:
    """Which rows' 128-bit keys (`hi`, `lo`) are among the held ones.

    The high halves narrow it down (np.isin on uint64 is fast; on a structured array it
    sorts 20x slower); the few candidates are then checked whole.
    """
    out = np.zeros(len(hi), bool)
    candidates = np.flatnonzero(np.isin(hi, held_hi))
    if candidates.size:
        held = set(zip(held_hi.tolist(), held_lo.tolist(), strict=True))
        pairs = zip(hi[candidates].tolist(), lo[candidates].tolist(), strict=True)
        out[candidates] = [pair in held for pair in pairs]
    return out


def exemplar_rows(
    ck_hi: np.ndarray, ck_lo: np.ndarray, groups: np.ndarray, n_groups: int, k: int
) -> list[np.ndarray]:
    """Per group, the rows of the `k` lowest distinct content keys, lowest first.

    The keys are hashes of the rendered text, so the choice is a fair sample that depends on
    the content alone (not on file order or the number of workers); a key seen twice (dedupe
    off) is one exemplar.

    Args:
        ck_hi: High 64 bits of each row's content key.
        ck_lo: Low 64 bits.
        groups: Each row's group (task) index in ``[0, n_groups)``.
        n_groups: Number of groups.
        k: Exemplars per group.

    Returns:
        One array of row indices per group, at most ``k`` long.
    """
    order = np.lexsort((ck_lo, ck_hi, groups))
    g, hi, lo = groups[order], ck_hi[order], ck_lo[order]
    new = np.ones(len(order), bool)
    new[1:] = (g[1:] != g[:-1]) | (hi[1:] != hi[:-1]) | (lo[1:] != lo[:-1])
    order, g = order[new], g[new]
    starts = np.searchsorted(g, np.arange(n_groups))
    ends = np.searchsorted(g, np.arange(n_groups), side="right")
    return [order[a : min(b, a + k)] for a, b in zip(starts, ends, strict=True)]


def exemplar_rows_in_slices(
    load: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]],
    n: int,
    n_groups: int,
    k: int,
    slice_rows: int,
) -> list[np.ndarray]:
    """`exemplar_rows` over `n` rows loaded `slice_rows` at a time, in bounded memory.

    Each slice keeps its candidates: a group's k lowest keys overall are among the k lowest of
    the slices that hold them. The candidates are then chosen among in row order, so that of
    equal keys the first occurrence still wins: the result equals `exemplar_rows` on all rows.

    Args:
        load: Row indices -> their (ck_hi, ck_lo, groups).
        n: Number of rows.
        n_groups: Number of groups.
        k: Exemplars per group.
        slice_rows: Rows loaded at a time.

    Returns:
        As `exemplar_rows`.
    """
    candidates = [np.zeros(0, np.int64)]
    for start in range(0, n, slice_rows):
        part = np.arange(start, min(n, start + slice_rows))
        chosen = exemplar_rows(*load(part), n_groups, k)
        candidates.append(part[np.concatenate(chosen)] if chosen else part[:0])
    picks = np.sort(np.concatenate(candidates))
    return [picks[c] for c in exemplar_rows(*load(picks), n_groups, k)]

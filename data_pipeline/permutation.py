"""A keyed bijection of [0, n), evaluated for any set of positions in O(positions).

Training draws each step's rows from it (`training.data.shuffled_rows`, keyed by seed and
epoch) and prepare's weighted mixing its samples (`mix.chosen`, keyed by seed and source):
neither ever builds a permutation of size O(n).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

FEISTEL_ROUNDS = 6


def keyed_permutation(x: np.ndarray, n: int, key: Sequence[int]) -> np.ndarray:
    """A bijection of [0, n) keyed by `key`, evaluated at `x` in O(len(x)) time and memory.

    A Feistel network over the smallest number of bits that covers n (the domain is under
    2 x n): the value is cut into a high and a low half and the rounds alternately XOR one half
    with a keyed hash of the other, each round a bijection. A value that lands outside [0, n)
    is permuted again until it is inside (cycle walking), which keeps a bijection (the walk
    follows the cycle of a permutation, whose start is inside).

    Args:
        x: int values in [0, n).
        n: The size of the permuted range.
        key: The key, integers taken modulo 2**64; each key gives a different permutation.

    Returns:
        int64 images, one per value.
    """
    x = np.asarray(x, np.int64)
    if len(x) and (x.min() < 0 or x.max() >= n):
        raise ValueError(f"values must lie in [0, {n})")
    if n <= 1:
        return x.copy()
    bits = (n - 1).bit_length()
    low_bits = bits // 2
    shift = np.uint64(low_bits)
    high_mask, low_mask = np.uint64((1 << (bits - low_bits)) - 1), np.uint64((1 << low_bits) - 1)
    entropy = [k % (1 << 64) for k in key]
    keys = np.random.SeedSequence(entropy).generate_state(FEISTEL_ROUNDS, np.uint64)

    def permute(v: np.ndarray) -> np.ndarray:
        high, low = v >> shift, v & low_mask
        for r, round_key in enumerate(keys):
            if r % 2 == 0:
                high = high ^ (_mix64(low ^ round_key) & high_mask)
            else:
                low = low ^ (_mix64(high ^ round_key) & low_mask)
        return (high << shift) | low

    out = permute(x.astype(np.uint64))
    outside = np.flatnonzero(out >= np.uint64(n))
    while len(outside):
        out[outside] = permute(out[outside])
        outside = outside[out[outside] >= np.uint64(n)]
    return out.astype(np.int64)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a fast, well-mixed bijection of uint64 (wraps on purpose)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))

"""Weighted mixing of the sources' train examples: how many of each, and which rows.

    data:
      sources:
        - {path: a.jsonl, template: sst2, weight: 3}
        - {path: b.jsonl, template: wmt, weight: 1}
      mix_total: 10000  # optional; default: the sum of the sources' kept train examples

Decided after selection (dedupe, caps and the overlap check have run, so copies are never
deduplicated against each other), on the train split only; validation and test are untouched.
`mix_counts` gives each source its number of train examples from the counts alone, and
`multiplicity` says how many times each of a source's kept train rows is written, from the
row's ordinal among them (0, 1, ... in input order), the seed and the source: whole passes,
then a sample of the remainder chosen by a keyed permutation of the ordinals. Nothing of size
O(rows) is built, so the choice can be applied to the kept rows while they stream to the
writer, and it depends neither on the number of workers nor on how the input was cut.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from data_pipeline.permutation import keyed_permutation

# Part of the permutation's key, so that it is never the one training draws from (seed, epoch).
MIX_TAG = 0x6D6978


def mix_counts(kept: Sequence[int], weights: Sequence[float], total: int | None) -> list[int]:
    """Each source's number of train examples in the mixture.

    Source i gets round(N x w_i / sum(w)) (Python's `round`: halves to even), N being `total`
    when given, else the sum of `kept`. Each is rounded on its own, so the sum may differ from
    N by up to half the number of sources.

    Args:
        kept: Each source's kept train examples (after dedupe, caps and the overlap check).
        weights: Each source's weight; 0 for a source without train examples (pinned to
            validation or test), whose count is then 0.
        total: `data.mix_total`, or None.

    Returns:
        The target count of every source, in order.

    Raises:
        ValueError: The lengths differ, a weight is negative, or every weight is 0.
    """
    if len(kept) != len(weights):
        raise ValueError(f"{len(kept)} counts but {len(weights)} weights")
    if any(w < 0 for w in weights) or not any(w > 0 for w in weights):
        raise ValueError(f"weights must be >= 0 with at least one > 0, got {list(weights)}")
    n = sum(kept) if total is None else total
    weight_sum = sum(weights)
    return [round(n * w / weight_sum) for w in weights]


def multiplicity(
    ordinals: np.ndarray, kept: int, target: int, seed: int, source: int
) -> np.ndarray:
    """How many times each of a source's kept train rows is written into the mixture.

    With q, r = divmod(target, kept), every row is written q times (whole passes) and the r
    rows whose ordinal `chosen` maps below r once more: the sum over all ordinals is exactly
    `target`, a row is written at most once when `target <= kept` (a sample without
    repetition), and the result depends only on (ordinal, kept, target, seed, source).

    Args:
        ordinals: Positions of rows among the source's kept train rows, in [0, kept).
        kept: The source's kept train rows.
        target: Its train examples in the mixture (`mix_counts`).
        seed: `experiment.seed`.
        source: The source's index (each source draws its own sample).

    Returns:
        int64 multiplicities, one per ordinal.

    Raises:
        ValueError: `target > 0` with no kept row to draw from.
    """
    ordinals = np.asarray(ordinals, np.int64)
    if kept == 0:
        if target:
            raise ValueError(f"source {source}: {target} examples wanted from no kept row")
        return np.zeros(len(ordinals), np.int64)
    passes, sampled = divmod(target, kept)
    out = np.full(len(ordinals), passes, np.int64)
    if sampled:
        out += chosen(ordinals, kept, sampled, seed, source)
    return out


def chosen(ordinals: np.ndarray, kept: int, sampled: int, seed: int, source: int) -> np.ndarray:
    """Whether each ordinal is among the `sampled` of [0, kept) drawn for (seed, source): those
    whose image under `keyed_permutation` is below `sampled`, exactly `sampled` of them."""
    return keyed_permutation(ordinals, kept, (MIX_TAG, seed, source)) < sampled

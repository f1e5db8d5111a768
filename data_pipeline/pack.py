"""Pack tokenized examples into rows of at most ``capacity`` tokens.

Examples are placed whole (never split) by best-fit decreasing; each packed row records the
length of every example in it (``seq_lens``) so that training can keep attention and position
ids inside each original example. Rows are not padded here: the collator pads.
"""

from __future__ import annotations

import bisect

import numpy as np

IGNORE_INDEX = -100


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Assign items to bins, longest first, each into the fullest bin it still fits in.

    Deterministic: items of equal length go in index order and, among equally full bins, the
    oldest bin wins. The open bins are kept sorted by remaining room, so each placement is a
    binary search: O(n log n) overall.

    Args:
        lengths: Item sizes (tokens per example).
        capacity: Bin size (the packed row length).

    Returns:
        Bins in the order they were opened, each the ascending list of its item indices.

    Raises:
        ValueError: If an item is empty or longer than ``capacity``.
    """
    if capacity < 1:
        raise ValueError(f"capacity must be positive, got {capacity}")
    for index, length in enumerate(lengths):
        if not 1 <= length <= capacity:
            raise ValueError(f"item {index} has length {length}, outside 1..{capacity}")
    # Longest first, equal lengths in index order: a stable sort of the negated lengths.
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable").tolist()
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (remaining capacity, bin id), kept sorted
    for index in order:
        length = lengths[index]
        # The first entry with remaining >= length (bin id -1 sorts before every real bin).
        slot = bisect.bisect_left(room, (length, -1))
        if slot == len(room):
            bin_id = len(bins)
            bins.append([index])
            remaining = capacity - length
        else:
            remaining, bin_id = room.pop(slot)
            bins[bin_id].append(index)
            remaining -= length
        if remaining > 0:
            bisect.insort(room, (remaining, bin_id))
    return [sorted(items) for items in bins]


def pack_bins(
    labels: np.ndarray, example_lens: np.ndarray, bin_sizes: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Packed rows from examples laid out bin after bin: the one packing implementation.

    The examples' tokens, concatenated in bin order, are the packed rows' tokens as they are;
    only the labels change: the first label of every example is set to ``IGNORE_INDEX``,
    since in a packed row it would otherwise be the target of the previous example's last
    token (``build_example`` already masks it, BOS or prompt, unless an example has neither).

    Args:
        labels: The examples' labels, concatenated in bin order (not modified).
        example_lens: Each example's length, in the same order.
        bin_sizes: How many consecutive examples each packed row holds (each >= 1).

    Returns:
        ``(labels, token_offsets, member_offsets)``: the packed labels, and per row the offsets
        of its tokens (into the concatenated tokens) and of its examples (into
        ``example_lens``, which is each row's ``seq_lens`` once cut at these offsets).
    """
    example_lens = np.asarray(example_lens, np.int64)
    bin_sizes = np.asarray(bin_sizes, np.int64)
    packed = np.array(labels, copy=True)
    starts = np.zeros(len(example_lens), np.int64)
    np.cumsum(example_lens[:-1], out=starts[1:])
    packed[starts] = IGNORE_INDEX
    member_offsets = np.zeros(len(bin_sizes) + 1, np.int64)
    np.cumsum(bin_sizes, out=member_offsets[1:])
    token_offsets = np.zeros(len(bin_sizes) + 1, np.int64)
    if len(bin_sizes):
        np.cumsum(np.add.reduceat(example_lens, member_offsets[:-1]), out=token_offsets[1:])
    return packed, token_offsets, member_offsets


def pack_rows(rows: list[tuple[list[int], list[int]]], capacity: int) -> list[dict[str, list[int]]]:
    """Concatenate examples into packed rows: ``best_fit_decreasing``, then ``pack_bins``.

    The list form of what prepare does over Arrow columns (see ``pack_bins`` for the labels).

    Args:
        rows: ``(input_ids, labels)`` per example.
        capacity: The longest packed row (normally ``max_seq_len``).

    Returns:
        Dicts with ``input_ids``, ``labels`` and ``seq_lens`` (example lengths, in order).

    Raises:
        ValueError: If an example is empty, longer than ``capacity``, or has ids and labels of
            different lengths.
    """
    for index, (ids, example_labels) in enumerate(rows):
        if len(ids) != len(example_labels):
            raise ValueError(f"example {index}: {len(ids)} ids but {len(example_labels)} labels")
    bins = best_fit_decreasing([len(ids) for ids, _ in rows], capacity)
    members = [i for b in bins for i in b]
    example_lens = np.asarray([len(rows[i][0]) for i in members], np.int64)
    flat_ids = np.asarray([t for i in members for t in rows[i][0]], np.int64)
    packed, tokens_at, members_at = pack_bins(
        np.asarray([t for i in members for t in rows[i][1]], np.int64),
        example_lens,
        np.asarray([len(b) for b in bins], np.int64),
    )
    return [
        {
            "input_ids": flat_ids[tokens_at[r] : tokens_at[r + 1]].tolist(),
            "labels": packed[tokens_at[r] : tokens_at[r + 1]].tolist(),
            "seq_lens": example_lens[members_at[r] : members_at[r + 1]].tolist(),
        }
        for r in range(len(bins))
    ]


def packing_efficiency(packed: list[dict[str, list[int]]], capacity: int) -> float:
    """Fraction of the padded batch that holds real tokens: tokens / (rows * capacity).

    Args:
        packed: Output of ``pack_rows``.
        capacity: The row length they are padded to.

    Returns:
        A number in [0, 1]; 0.0 when there are no rows.
    """
    if not packed:
        return 0.0
    return sum(len(row["input_ids"]) for row in packed) / (len(packed) * capacity)


def position_ids_from_seq_lens(seq_lens: list[int]) -> list[int]:
    """Position ids that restart at 0 for every packed example.

    Args:
        seq_lens: Lengths of the examples in one packed row.

    Returns:
        ``0..len1-1, 0..len2-1, ...``
    """
    return [position for length in seq_lens for position in range(length)]

"""Pack tokenized examples into rows of at most ``capacity`` tokens.

Examples are placed whole (never split) by best-fit decreasing; each packed row records the
length of every example in it (``seq_lens``) so that training can keep attention and position
ids inside each original example. Rows are not padded here: the collator pads.
"""

from __future__ import annotations

import heapq

import numpy as np

IGNORE_INDEX = -100


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Assign items to bins, longest first, each into the fullest bin it still fits in.

    Deterministic: items of equal length go in index order and, among equally full bins, the
    oldest bin wins (see `assign_bins`, which this lists by bin).

    Args:
        lengths: Item sizes (tokens per example).
        capacity: Bin size (the packed row length).

    Returns:
        Bins in the order they were opened, each the ascending list of its item indices.

    Raises:
        ValueError: If an item is empty or longer than ``capacity``.
    """
    bin_of = assign_bins(np.asarray(lengths, np.int64), capacity)
    members, sizes = bin_members(bin_of)
    return [m.tolist() for m in np.split(members, np.cumsum(sizes)[:-1])] if len(sizes) else []


def bin_members(bin_of: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The items of every bin, bin after bin, each bin's in index order; and each bin's size."""
    return np.argsort(bin_of, kind="stable"), np.bincount(bin_of)


def assign_bins(lengths: np.ndarray, capacity: int) -> np.ndarray:
    """Best-fit decreasing: each item's bin, bins numbered in the order they open.

    Items go longest first, equal lengths in index order, each into the bin with the least
    room that still fits it (the oldest among equals), or into a new bin. Placing one item at a
    time costs a search per item; here each run of equal lengths is placed a bin at a time,
    which gives the same bins: once an item of length L goes into the bin with the least room
    r >= L, that bin (room r - L) stays the best fit while r - L >= L, since no bin had a room
    in [L, r); and with no bin of room >= L, items fill new bins capacity // L at a time. The
    bins are kept by room: one heap of bin ids per room, and a bitmask of the rooms that have
    bins, whose lowest set bit at or above L is the best fit.

    Args:
        lengths: Item sizes (tokens per example), int64.
        capacity: Bin size (the packed row length).

    Returns:
        The bin of every item (int64).

    Raises:
        ValueError: If an item is empty or longer than ``capacity``.
    """
    if capacity < 1:
        raise ValueError(f"capacity must be positive, got {capacity}")
    n = len(lengths)
    bin_of = np.empty(n, np.int64)
    if not n:
        return bin_of
    bad = np.flatnonzero((lengths < 1) | (lengths > capacity))
    if len(bad):
        raise ValueError(f"item {bad[0]} has length {lengths[bad[0]]}, outside 1..{capacity}")
    # Longest first, equal lengths in index order: a stable sort of the negated lengths.
    order = np.argsort(-lengths, kind="stable")
    ordered = lengths[order]
    cuts = (np.flatnonzero(np.diff(ordered)) + 1).tolist()
    by_room: dict[int, list[int]] = {}  # remaining room -> heap of the ids of its bins
    rooms = 0  # bit r set: some bin has exactly r left
    opened = 0
    for start, stop in zip([0, *cuts], [*cuts, n], strict=True):
        length = int(ordered[start])
        pos = start
        while pos < stop:
            above = rooms >> length
            if above:
                room = length + (above & -above).bit_length() - 1  # the fullest bin that fits
                heap = by_room[room]
                bin_id = heapq.heappop(heap)  # the oldest of those
                if not heap:
                    rooms ^= 1 << room
                take = min(stop - pos, room // length)
                bin_of[order[pos : pos + take]] = bin_id
                pos += take
                left = [(room - take * length, bin_id)]
            else:  # new bins, `per` items each (the last one what remains)
                per = capacity // length
                count = stop - pos
                new = -(-count // per)
                bin_of[order[pos:stop]] = opened + np.arange(count) // per
                last = count - (new - 1) * per
                left = [(capacity - per * length, b) for b in range(opened, opened + new - 1)]
                left.append((capacity - last * length, opened + new - 1))
                opened += new
                pos = stop
            for remaining, bin_id in left:  # bin ids only grow: each push keeps the heap order
                if remaining > 0:
                    heap = by_room.setdefault(remaining, [])
                    if not heap:
                        rooms |= 1 << remaining
                    heapq.heappush(heap, bin_id)
    return bin_of


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

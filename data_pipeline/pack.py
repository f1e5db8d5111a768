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


def pack_rows(rows: list[tuple[list[int], list[int]]], capacity: int) -> list[dict[str, list[int]]]:
    """Concatenate examples into packed rows using ``best_fit_decreasing``.

    The first label of every example is set to ``-100``: in a packed row it would otherwise be
    the target of the previous example's last token. (``build_example`` already masks it, bos
    or prompt, unless an example has neither.)

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
    packed = []
    for members in best_fit_decreasing([len(ids) for ids, _ in rows], capacity):
        input_ids: list[int] = []
        labels: list[int] = []
        seq_lens: list[int] = []
        for index in members:
            ids, example_labels = rows[index]
            input_ids.extend(ids)
            labels.append(IGNORE_INDEX)
            labels.extend(example_labels[1:])
            seq_lens.append(len(ids))
        packed.append({"input_ids": input_ids, "labels": labels, "seq_lens": seq_lens})
    return packed


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

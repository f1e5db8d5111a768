"""Micro-batch tensors for the model: the layout per attention implementation, and the copy to it.

Pure functions (torch and numpy only). A row is `(input_ids, labels, seq_lens)`: int arrays, the
labels -100 on prompt tokens, `seq_lens` the lengths of the examples packed into the row (they sum
to the row's length). Two layouts keep every example's attention inside the example:

- "padded": rows right-padded to the longest, `position_ids` restarting at every example. sdpa
  and eager build a block-diagonal causal mask from those positions for any batch size.
- "padding_free": every row of the micro-batch flattened into one row of shape (1, total), plus
  the cumulative example lengths (`cu_seq_lens_q/k`, `max_length_q/k`) that transformers'
  flash-attention path hands straight to the varlen kernel. No padding is computed at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

IGNORE = -100
Layout = Literal["padded", "padding_free"]
Row = tuple[np.ndarray, np.ndarray, np.ndarray]
Batch = dict[str, torch.Tensor | int]

# The one place the layout is chosen per attention implementation.
# - flash_attention_2/3: padding_free. transformers 5.x infers example boundaries from
#   `position_ids` only when the batch has one row (`_is_packed_sequence`); with more rows the
#   dense causal kernel runs across examples. Flattened rows with explicit `cu_seq_lens_*` take
#   the varlen kernel whatever the micro-batch size, and skip the padding too.
# - sdpa: padded. sdpa has no varlen kernel: transformers turns the flattened row into one dense
#   (total x total) block mask, so attention work grows with the square of the micro-batch's
#   tokens instead of the sum of its rows' squares. Measured on CPU here (forward+backward of 4
#   packed rows of ~250 tokens, medians of 5): padded 158-213 ms vs padding-free 463-621 ms on
#   the stories260K shape, 348-382 vs 568-621 ms at hidden 256 x 4 layers. Both layouts give
#   the same losses under sdpa (tests/unit/test_batch.py).
# - eager: padded, for the same reason (it materialises the dense mask and scores).
LAYOUTS: dict[str, Layout] = {
    "flash_attention_2": "padding_free",
    "flash_attention_3": "padding_free",
    "sdpa": "padded",
    "eager": "padded",
}


def layout_for(attn_implementation: str) -> Layout:
    """The micro-batch layout for a model's attention implementation (see `LAYOUTS`)."""
    try:
        return LAYOUTS[attn_implementation]
    except KeyError:
        raise ValueError(
            f"no batch layout known for attention implementation {attn_implementation!r}; "
            f"known: {sorted(LAYOUTS)}"
        ) from None


def positions(seq_lens: np.ndarray) -> np.ndarray:
    """Position ids restarting at 0 for every example of a packed row."""
    if not len(seq_lens):
        return np.zeros(0, np.int64)
    lens = np.asarray(seq_lens, dtype=np.int64)
    starts = np.repeat(np.cumsum(lens) - lens, lens)
    return np.arange(int(lens.sum()), dtype=np.int64) - starts


def collate(rows: Sequence[Row], pad_id: int, layout: Layout) -> Batch:
    """The model inputs and `labels` of one micro-batch in `layout`.

    Args:
        rows: `(input_ids, labels, seq_lens)` per row, in micro-batch order.
        pad_id: token id of the padding ("padded" only; its labels are -100).
        layout: "padded" or "padding_free" (see the module docstring and `layout_for`).

    Returns:
        `input_ids`, `labels` and `position_ids` (int64, shape (rows, width) or (1, total)); for
        "padding_free" also `cu_seq_lens_q/k` (int32, example starts and the total) and
        `max_length_q/k` (Python ints: the varlen kernel takes them on the host).
    """
    if layout == "padded":
        return _padded(rows, pad_id)
    if layout == "padding_free":
        return _padding_free(rows)
    raise ValueError(f"unknown batch layout {layout!r}; use 'padded' or 'padding_free'")


def _padded(rows: Sequence[Row], pad_id: int) -> Batch:
    """No attention mask is passed to the model: with position ids that restart, transformers
    builds a block-diagonal causal mask, so attention never crosses examples; the padding sits at
    the end of each row, where causal attention from real tokens cannot see it."""
    width = max(len(ids) for ids, _, _ in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    labels = np.full((len(rows), width), IGNORE, dtype=np.int64)
    pos = np.zeros((len(rows), width), dtype=np.int64)
    for j, (row_ids, row_labels, lens) in enumerate(rows):
        n = len(row_ids)
        ids[j, :n] = row_ids
        labels[j, :n] = row_labels
        pos[j, :n] = positions(lens)
        pos[j, n:] = np.arange(width - n)  # padding is its own segment
    return {
        "input_ids": torch.from_numpy(ids),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(pos),
    }


def _padding_free(rows: Sequence[Row]) -> Batch:
    ids = np.concatenate([np.asarray(r[0], dtype=np.int64) for r in rows])
    labels = np.concatenate([np.asarray(r[1], dtype=np.int64) for r in rows])
    lens = np.concatenate([np.asarray(r[2], dtype=np.int64) for r in rows])
    if int(lens.sum()) != len(ids):
        raise ValueError(f"seq_lens sum to {int(lens.sum())}, the rows hold {len(ids)} tokens")
    ends = np.cumsum(lens)
    # The loss predicts labels[t + 1] from token t: an example's first token must never be a
    # target, or it would be predicted from the previous example (prepare already masks it as
    # prompt or BOS; this makes the layout safe on its own).
    labels[ends[:-1]] = IGNORE
    cu = torch.from_numpy(np.concatenate([[0], ends]).astype(np.int32))
    longest = int(lens.max())
    return {
        "input_ids": torch.from_numpy(ids)[None],
        "labels": torch.from_numpy(labels)[None],
        "position_ids": torch.from_numpy(positions(lens))[None],
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": longest,
        "max_length_k": longest,
    }


def to_device(batch: Batch, device: torch.device | str) -> Batch:
    """The batch on `device`: from pinned host memory with non-blocking copies on CUDA, so the
    copy overlaps with work already queued; on CPU the tensors are returned as they are.

    Python ints (`max_length_*`) stay on the host: the varlen kernel reads them there.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return dict(batch)
    return {
        k: v.pin_memory().to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }

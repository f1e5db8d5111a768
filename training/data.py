"""Batches from the prepared Parquet splits: deterministic order, global-batch layout, collation.

Pure functions (torch and pyarrow only). Every rank computes the same permutation from the seed
and the epoch, so the examples of optimizer step `s` are fixed whatever the number of workers:
the global batch is cut into `accumulation x world` micro-batches and rank `r` takes micro-batch
`a * world + r` at accumulation step `a`. Hence 1 worker x accumulation 2 sees exactly what
2 workers x accumulation 1 see, and resuming at step `s` needs nothing but `s`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import torch


@dataclass
class Split:
    """A tokenized split held as lists of int arrays (one entry per row, packed or not)."""

    input_ids: list[np.ndarray]
    labels: list[np.ndarray]
    seq_lens: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.input_ids)

    def loss_tokens(self, idx: list[int] | np.ndarray) -> int:
        """Completion tokens that the loss counts, over the rows `idx` (after the label shift)."""
        return int(sum(int((self.labels[i][1:] != -100).sum()) for i in idx))


def load_split(data_dir: str, manifest: dict, name: str) -> Split:
    files = manifest["splits"][name]["files"]
    ids: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    lens: list[np.ndarray] = []
    for f in files:
        table = pq.read_table(
            os.path.join(data_dir, f), columns=["input_ids", "labels", "seq_lens"]
        )
        ids += [np.asarray(x, dtype=np.int64) for x in table.column("input_ids").to_pylist()]
        labels += [np.asarray(x, dtype=np.int64) for x in table.column("labels").to_pylist()]
        lens += [np.asarray(x, dtype=np.int64) for x in table.column("seq_lens").to_pylist()]
    return Split(ids, labels, lens)


def steps_per_epoch(n_rows: int, global_batch: int) -> int:
    """Full global batches per epoch (the incomplete tail is dropped, as in most trainers)."""
    return n_rows // global_batch


def total_steps(n_rows: int, global_batch: int, epochs: float, max_steps: int | None) -> int:
    if max_steps is not None:
        return max_steps
    return max(1, int(round(epochs * steps_per_epoch(n_rows, global_batch))))


def epoch_order(n_rows: int, seed: int, epoch: int) -> np.ndarray:
    """The row permutation of one epoch: reshuffled per epoch, identical on every rank."""
    return np.random.default_rng([seed, epoch]).permutation(n_rows)


def global_batch_indices(step: int, n_rows: int, global_batch: int, seed: int) -> np.ndarray:
    spe = steps_per_epoch(n_rows, global_batch)
    epoch, within = divmod(step, spe)
    order = epoch_order(n_rows, seed, epoch)
    return order[within * global_batch : (within + 1) * global_batch]


def micro_batch_indices(
    batch: np.ndarray, micro: int, accum_step: int, rank: int, world: int
) -> np.ndarray:
    chunk = accum_step * world + rank
    return batch[chunk * micro : (chunk + 1) * micro]


def collate(split: Split, idx: list[int] | np.ndarray, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `labels` (-100 on padding) and `position_ids` restarting at every
    packed example. No attention mask is passed to the model: with position ids that restart,
    transformers builds a block-diagonal causal mask, so attention never crosses examples; the
    padding sits at the end of each row, where causal attention from real tokens cannot see it.
    """
    rows = [int(i) for i in idx]
    width = max(len(split.input_ids[i]) for i in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    for j, i in enumerate(rows):
        n = len(split.input_ids[i])
        ids[j, :n] = torch.from_numpy(split.input_ids[i])
        labels[j, :n] = torch.from_numpy(split.labels[i])
        pos[j, :n] = torch.from_numpy(positions(split.seq_lens[i]))
        if n < width:  # padding is its own segment
            pos[j, n:] = torch.arange(width - n)
    return {"input_ids": ids, "labels": labels, "position_ids": pos}


def positions(seq_lens: np.ndarray) -> np.ndarray:
    return (
        np.concatenate([np.arange(n) for n in seq_lens]) if len(seq_lens) else np.zeros(0, np.int64)
    )


def token_loss_sum(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over completion tokens, their count, and correct argmaxes.

    The label of the first token of a packed example is always -100 (prompt or BOS), so the
    shift never trains one example to predict the next one.
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    mask = shift_labels != -100
    loss = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )
    correct = ((shift_logits.argmax(-1) == shift_labels) & mask).sum()
    return loss, mask.sum(), correct

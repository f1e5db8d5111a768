"""Batches from the prepared splits: memory-mapped token stores, deterministic order, global-batch
layout (collation: training/batch.py).

Pure functions (numpy only). A rank maps a split's token store (`load_split`), so its memory
depends on the micro-batch, not on the split. Every rank computes the same keyed permutation of
(seed, epoch) for the positions of the step's global batch only, so the examples of optimizer
step `s` are fixed whatever the number of workers:
the global batch is cut into `accumulation x world` micro-batches and rank `r` takes micro-batch
`a * world + r` at accumulation step `a`. Hence 1 worker x accumulation 2 sees exactly what
2 workers x accumulation 1 see, and resuming at step `s` needs nothing but `s`.
"""

from __future__ import annotations

import os

import numpy as np

from data_pipeline.manifest import VERSION as MANIFEST_VERSION
from data_pipeline.permutation import keyed_permutation
from data_pipeline.token_store import TokenStore, local_copy, open_store

# A split as training reads it: `len`, `rows(idx)`, `loss_tokens(idx)` over a memory-mapped
# token store (`from_rows` builds one in memory for tests).
Split = TokenStore


class StaleDataError(RuntimeError):
    """The prepared data predates this code's manifest version; the message says what to do."""

    user_facing = True


def check_manifest(manifest: dict, data_dir: str) -> None:
    """Refuse data prepared for another manifest version, naming the command that fixes it.

    Raises:
        StaleDataError: If the manifest's version is not `MANIFEST_VERSION`.
    """
    version = manifest.get("version")
    if version != MANIFEST_VERSION:
        raise StaleDataError(
            f"the prepared data in {data_dir} has manifest version {version}, but this ift "
            f"trains from version {MANIFEST_VERSION} (memory-mapped token stores); re-run "
            "`ift prepare CONFIG` (or `ift submit CONFIG --stage prepare`) to prepare it again"
        )


def load_split(data_dir: str, manifest: dict, name: str) -> Split:
    """Open split `name` by memory map: O(1) time and memory, whatever the split's size.

    On object storage (`data_dir` a URI such as s3://...) the store is first copied once per
    node to a local cache named by the data fingerprint (`token_store.local_copy`).

    Raises:
        StaleDataError: If the data was prepared for an older manifest version.
    """
    check_manifest(manifest, data_dir)
    path = manifest["splits"][name]["store"]["path"]
    if "://" in data_dir:
        uri = f"{data_dir.rstrip('/')}/{path}"
        return open_store(local_copy(uri, f"{manifest['fingerprint'][:24]}-{name}"))
    return open_store(os.path.join(data_dir, path))


def steps_per_epoch(n_rows: int, global_batch: int) -> int:
    """Full global batches per epoch (the incomplete tail is dropped, as in most trainers)."""
    return n_rows // global_batch


def total_steps(n_rows: int, global_batch: int, epochs: float, max_steps: int | None) -> int:
    if max_steps is not None:
        return max_steps
    return max(1, int(round(epochs * steps_per_epoch(n_rows, global_batch))))


def shuffled_rows(positions: np.ndarray, n_rows: int, seed: int, epoch: int) -> np.ndarray:
    """The rows at `positions` of epoch `epoch`'s order: a bijection of [0, n_rows) keyed by
    (seed, epoch) (`data_pipeline.permutation`). Cost and memory are O(len(positions)), never
    O(n_rows), so each step computes only its own global batch and the step alone fixes it.

    Args:
        positions: int positions in [0, n_rows) within the epoch.
        n_rows: the size of the permuted range.
        seed, epoch: the key; each pair gives a different permutation, the same on every rank.

    Returns:
        int64 row indices, one per position.
    """
    return keyed_permutation(positions, n_rows, (seed, epoch))


def epoch_order(n_rows: int, seed: int, epoch: int) -> np.ndarray:
    """The whole row permutation of one epoch (O(n_rows): for tests and tools, not training)."""
    return shuffled_rows(np.arange(n_rows), n_rows, seed, epoch)


def global_batch_indices(step: int, n_rows: int, global_batch: int, seed: int) -> np.ndarray:
    """The rows of optimizer step `step`: positions `within * global_batch ...` of its epoch."""
    spe = steps_per_epoch(n_rows, global_batch)
    epoch, within = divmod(step, spe)
    positions = np.arange(within * global_batch, (within + 1) * global_batch)
    return shuffled_rows(positions, n_rows, seed, epoch)


def micro_batch_indices(
    batch: np.ndarray, micro: int, accum_step: int, rank: int, world: int
) -> np.ndarray:
    chunk = accum_step * world + rank
    return batch[chunk * micro : (chunk + 1) * micro]

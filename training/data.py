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


FEISTEL_ROUNDS = 6


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a fast, well-mixed bijection of uint64 (wraps on purpose)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def shuffled_rows(positions: np.ndarray, n_rows: int, seed: int, epoch: int) -> np.ndarray:
    """The rows at `positions` of epoch `epoch`'s order: a keyed bijection of [0, n_rows).

    A Feistel network over the smallest number of bits that covers `n_rows` (so the domain is
    under 2 x n_rows), keyed by (seed, epoch): the value is cut into a high and a low half and
    the rounds alternately XOR one half with a keyed hash of the other, each round a bijection.
    Cycle walking: a value that lands outside [0, n_rows) is permuted again until it is inside,
    which keeps a bijection (the walk follows the cycle of a permutation, whose start is
    inside). Cost and memory are O(len(positions)), never O(n_rows), so each step computes
    only its own global batch and the step alone fixes it.

    Args:
        positions: int positions in [0, n_rows) within the epoch.
        n_rows: the size of the permuted range.
        seed, epoch: the key; each pair gives a different permutation, the same on every rank.

    Returns:
        int64 row indices, one per position.
    """
    pos = np.asarray(positions, np.int64)
    if len(pos) and (pos.min() < 0 or pos.max() >= n_rows):
        raise ValueError(f"positions must lie in [0, {n_rows})")
    if n_rows <= 1:
        return pos.copy()
    bits = (n_rows - 1).bit_length()
    low_bits = bits // 2
    shift = np.uint64(low_bits)
    high_mask, low_mask = np.uint64((1 << (bits - low_bits)) - 1), np.uint64((1 << low_bits) - 1)
    keys = np.random.SeedSequence([seed, epoch]).generate_state(FEISTEL_ROUNDS, np.uint64)

    def permute(x: np.ndarray) -> np.ndarray:
        high, low = x >> shift, x & low_mask
        for r, key in enumerate(keys):
            if r % 2 == 0:
                high = high ^ (_mix(low ^ key) & high_mask)
            else:
                low = low ^ (_mix(high ^ key) & low_mask)
        return (high << shift) | low

    out = permute(pos.astype(np.uint64))
    outside = np.flatnonzero(out >= np.uint64(n_rows))
    while len(outside):
        out[outside] = permute(out[outside])
        outside = outside[out[outside] >= np.uint64(n_rows)]
    return out.astype(np.int64)


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

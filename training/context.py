"""The seam between a train worker and Ray Train: rank and world size, the checkpoint to resume
from, and reporting metrics with a checkpoint.

Inside a `TorchTrainer` worker these are Ray Train's own calls. `local_run()` swaps in a
one-process stand-in, for machines without Ray (the GPU check, `benchmarks/gpu.py`): rank 0 of
a world of 1, checkpoints moved into a local folder, the newest complete one resumed from, as
Ray Train resumes a run of the same name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

CHECKPOINT_PREFIX = "step_"


@dataclass
class LocalCheckpoint:
    """A finished checkpoint folder; `as_directory()` as on `ray.train.Checkpoint`."""

    path: str

    @contextlib.contextmanager
    def as_directory(self) -> Iterator[str]:
        yield self.path


@dataclass
class LocalRun:
    """What a one-process run reports: every `report` call's metrics, in order, and its
    checkpoints under `storage`.

    Attributes:
        storage: folder of the checkpoints (`step_*`), the newest resumed from.
        keep: newest checkpoints kept (Ray's `CheckpointConfig.num_to_keep`).
        reports: metrics of each report, oldest first.
    """

    storage: str
    keep: int = 2
    reports: list[dict[str, Any]] = field(default_factory=list)

    def get_world_rank(self) -> int:
        return 0

    def get_world_size(self) -> int:
        return 1

    def latest_checkpoint(self) -> LocalCheckpoint | None:
        names = self._checkpoints()
        return LocalCheckpoint(os.path.join(self.storage, names[-1])) if names else None

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None, dir_name: str) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir is None:
            return
        # Moved, not copied (a rename when storage is on the same filesystem): a ZeRO
        # checkpoint of a 1B model is ~15 GB. Renamed into place last, so a killed run never
        # leaves a folder that looks complete.
        os.makedirs(self.storage, exist_ok=True)
        final = os.path.join(self.storage, dir_name)
        partial = os.path.join(self.storage, f".partial-{dir_name}")
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
        for name in os.listdir(checkpoint_dir):
            shutil.move(os.path.join(checkpoint_dir, name), os.path.join(partial, name))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        for old in self._checkpoints()[: -self.keep]:
            shutil.rmtree(os.path.join(self.storage, old), ignore_errors=True)

    def _checkpoints(self) -> list[str]:
        if not os.path.isdir(self.storage):
            return []
        return sorted(n for n in os.listdir(self.storage) if n.startswith(CHECKPOINT_PREFIX))


_local: LocalRun | None = None


@contextlib.contextmanager
def local_run(storage: str, keep: int = 2) -> Iterator[LocalRun]:
    """Run train workers in this process, without Ray, while the block lasts.

    The caller sets up the single-rank `torch.distributed` process group Ray Train would.
    """
    global _local
    previous, _local = _local, LocalRun(storage, keep)
    try:
        yield _local
    finally:
        _local = previous


def get_context() -> Any:
    """An object with `get_world_rank()` and `get_world_size()`."""
    if _local is not None:
        return _local
    import ray.train

    return ray.train.get_context()


def get_checkpoint() -> Any:
    """The checkpoint to resume from (with `as_directory()`), or None."""
    if _local is not None:
        return _local.latest_checkpoint()
    import ray.train

    return ray.train.get_checkpoint()


def report(
    metrics: dict[str, Any],
    checkpoint_dir: str | None = None,
    dir_name: str | None = None,
    upload_fn: Callable[[Any, str], Any] | None = None,
) -> None:
    """Report metrics and, optionally, the folder this rank saved its checkpoint shard into.

    Args:
        metrics: this step's metrics.
        checkpoint_dir: the folder to keep as the checkpoint (its files move or upload).
        dir_name: the checkpoint's folder name in storage (`step_0000012`).
        upload_fn: Ray's `checkpoint_upload_fn` (a test hook); unused locally.
    """
    if _local is not None:
        name = dir_name or f"{CHECKPOINT_PREFIX}{len(_local.reports):07d}"
        _local.report(metrics, checkpoint_dir, name)
        return
    import ray.train
    from ray.train import Checkpoint

    ray.train.report(
        metrics,
        checkpoint=Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None,
        checkpoint_dir_name=dir_name,
        checkpoint_upload_fn=upload_fn,
    )

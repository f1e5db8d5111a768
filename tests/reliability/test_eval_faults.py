"""Fault injection in the eval job: an eval actor killed with SIGKILL mid-run.

The actor pool must restart the actor and run the lost batches again, so that the predictions
are complete, hold every test record exactly once, and equal those of an undisturbed run (each
batch carries its own seed). Real Ray, real stories260K, nothing mocked.
"""

from __future__ import annotations

import json
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from eval.evaluate import evaluate
from launcher.config import Config, from_dict, resolve_paths
from launcher.pipeline import worker_env
from tests.ray_local import start_local_ray

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "tests" / "assets"
MODEL = ASSETS / "models" / "stories260K"

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Config, dict]]:
    import ray

    from data_pipeline.prepare import prepare

    for k, v in worker_env(use_gpu=False).items():
        os.environ.setdefault(k, v)
    start_local_ray()
    out = tmp_path_factory.mktemp("evalfault")
    cfg = resolve_paths(
        from_dict(
            {
                "experiment": {"name": "evalfault", "output_dir": str(out / "runs"), "seed": 0},
                "model": {"name_or_path": str(MODEL)},
                "data": {
                    "sources": [
                        {
                            "path": str(ASSETS / "data" / "sst2" / "train.tsv"),
                            "template": "sst2",
                            "max_records": 100,
                        }
                    ],
                    "split": {"train": 0.5, "test": 0.5},
                    "max_seq_len": 128,
                    "num_workers": 1,
                },
                # One prompt per batch and no stop string: many batches, each of fixed work,
                # so that most of them are still to run when the actor is killed.
                "eval": {"max_new_tokens": 16, "batch_size": 1, "stop": [], "num_workers": 1},
                "tracking": {"enabled": False},
            }
        )
    )
    manifest = prepare(cfg, log=lambda _: None)
    assert manifest["splits"]["test"]["rows"] >= 30
    yield cfg, manifest
    ray.shutdown()


def generator_pids() -> set[int]:
    """Eval actor processes of this test's own Ray (descendants of this process only)."""
    pids = set()
    for p in psutil.Process().children(recursive=True):
        try:
            if "Generator" in " ".join(p.cmdline()):
                pids.add(p.pid)
        except psutil.Error:
            continue
    return pids


def read(result: dict[str, Any]) -> list[dict[str, Any]]:
    with open(result["predictions"], encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def run(prepared: tuple[Config, dict], out: Path, log: Any) -> dict[str, Any]:
    cfg, manifest = prepared
    cfg = cfg.model_copy(deep=True)
    cfg.experiment.output_dir = str(out)
    return evaluate(cfg, manifest, "base", log=log)


def test_killed_eval_actor_batches_are_retried(prepared, tmp_path: Path) -> None:
    cfg, manifest = prepared
    reference = run(prepared, tmp_path / "clean", lambda _: None)

    killed: list[int] = []

    def kill_on_first_progress(line: str) -> None:
        # "[eval base] k/N batches": some batches are back, more remain. Kill the actor now.
        progress = re.fullmatch(r"\[eval base\] (\d+)/(\d+) batches", line)
        if killed or progress is None:
            return
        if int(progress[1]) < int(progress[2]):
            pids = generator_pids()
            assert len(pids) == 1, pids
            pid = pids.pop()
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    faulty = run(prepared, tmp_path / "faulty", kill_on_first_progress)
    assert len(killed) == 1, "the actor was never killed mid-run"
    # The killed actor had done work, and a replacement actor process did the rest.
    actors = {int(name.rsplit(":", 1)[1]): n for name, n in faulty["actors"].items()}
    assert actors.get(killed[0], 0) >= 1
    assert any(pid != killed[0] and n >= 1 for pid, n in actors.items()), actors
    n_batches = manifest["splits"]["test"]["rows"]  # batch_size 1
    assert sum(actors.values()) == n_batches  # no batch delivered twice, none lost
    rows = read(faulty)
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == manifest["splits"]["test"]["rows"]
    assert rows == read(reference)  # same prompts, same predictions, same order

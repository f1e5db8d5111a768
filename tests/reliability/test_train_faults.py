"""Fault: the whole `ift train` process group is SIGKILLed while a checkpoint is being written.

The real CLI on the real tiny pipeline config (stories260K, ZeRO-2, 2 CPU workers). Ray's own
upload of a checkpoint takes milliseconds here, too short to hit reliably, so the killed run sets
the test hook `IFT_TEST_CHECKPOINT_UPLOAD_DELAY_S` (training/train.py): each rank uploads its
checkpoint file by file with a pause before each file. The kill lands while `step_0000004` is on
storage but incomplete; the rerun must resume from `step_0000002` (the last complete one) and end
on the pinned losses of the uninterrupted run in test_cli_pipeline.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from tests.integration.test_cli_pipeline import PINNED_LOSSES, RTOL, history, runs, tiny_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

UPLOAD_DELAY_S = 3.0


def _kill_group_when(proc: subprocess.Popen, ready, timeout: float) -> None:
    """SIGKILL the process group of `proc` (and any Ray process it started outside that group)
    once `ready()` is true."""
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, "training ended before the kill point"
        assert time.time() < deadline, "kill point never reached"
        time.sleep(0.1)
    tree = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for p in tree:  # Ray daemons may sit in their own session: end exactly those we started
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree, timeout=30)


def test_driver_killed_mid_checkpoint_resumes_from_last_complete(tmp_path: Path) -> None:
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_config(tmp_path)))
    cmd = [sys.executable, "-m", "launcher", "train", str(cfg_path), "train.checkpoint_every=2"]
    ckpts = tmp_path / "runs" / "checkpoints"
    partial = "step_0000004"

    env = {**os.environ, "IFT_TEST_CHECKPOINT_UPLOAD_DELAY_S": str(UPLOAD_DELAY_S)}
    log = (tmp_path / "killed.log").open("w")
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    # Killed once the first file of step 4 is on storage and before the last one is.
    _kill_group_when(proc, lambda: any(ckpts.glob(f"run-*/{partial}/**/*.pt")), timeout=900)
    log.close()

    [run_dir] = list(ckpts.glob("run-*"))
    snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    registered = json.dumps(snapshot)
    assert "step_0000002" in registered and partial not in registered
    # The kill really landed mid-write: the folder is there but lacks files a complete one has.
    complete = {p.relative_to(run_dir / "step_0000002") for p in run_dir.glob("step_0000002/**/*")}
    written = {p.relative_to(run_dir / partial) for p in run_dir.glob(f"{partial}/**/*")}
    assert written < complete, (written, complete)

    t0 = time.time()
    rerun = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    out = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, out[-5000:]
    assert "resumed from step 2" in out, out[-5000:]
    print(f"resumed run took {time.time() - t0:.0f}s")

    # The resumed run logs steps 3..6, equal to the uninterrupted run's pinned losses.
    train_run = runs(tmp_path / "mlflow.db")["train"][-1]
    losses = history(tmp_path / "mlflow.db", train_run, "train/loss")
    assert [s for s, _ in losses] == [3, 4, 5, 6]
    assert [v for _, v in losses] == pytest.approx(PINNED_LOSSES[2:], rel=RTOL)
    assert (tmp_path / "runs" / "model" / "config.json").exists()

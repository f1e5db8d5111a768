"""`ift submit` / `ift jobs` against a real two-node Ray cluster on this machine (`ray start
--head` + `ray start --address`, token authentication on as Ray 2.60 sets it up; the session
fixture `ray_cluster` in conftest.py), with the real pipeline running as the Ray job.
"""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import RayCluster
from tests.integration.test_cli_pipeline import RTOL, history, runs, tiny_config

pytestmark = pytest.mark.integration


def ift(args: list[str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "launcher", *args],
        cwd=cwd,
        text=True,
        capture_output=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        print(proc.stdout[-5000:], proc.stderr[-5000:])
    return proc


def project(tmp_path: Path, raw: dict) -> Path:
    """A project folder (the job's working_dir) holding the config as tiny.yaml."""
    work = tmp_path / "project"
    work.mkdir(exist_ok=True)
    (work / "tiny.yaml").write_text(yaml.safe_dump(raw))
    return work


def submission_id(stdout: str) -> str:
    found = re.search(r"^submitted (\S+) to ", stdout, re.MULTILINE)
    assert found, stdout[-3000:]
    return found.group(1)


def test_submitted_pipeline_trains_on_both_nodes_and_logs_to_mlflow(
    ray_cluster: RayCluster, tmp_path: Path
) -> None:
    """The whole pipeline as one Ray job. Each Ray Train worker asks for 2 CPUs and each node
    has 2, so the two workers can only run one per node, and both write to the shared storage."""
    raw = tiny_config(tmp_path)
    raw["train"].update(max_steps=2, eval_every=0, checkpoint_every=0, cpus_per_worker=2)
    raw["eval"]["models"] = ["finetuned"]
    work = project(tmp_path, raw)
    proc = ift(["submit", "tiny.yaml", "--address", ray_cluster.address], cwd=work)
    assert proc.returncode == 0
    assert "SUCCEEDED" in proc.stdout
    # The job's logs were followed: its console's last line of the train stage.
    assert "[train] 2/2 steps" in proc.stdout
    con = sqlite3.connect(tmp_path / "mlflow.db")
    names = {n for (n,) in con.execute("select name from runs")}
    assert {"tiny-run", "prepare", "train", "eval-finetuned"} <= names

    # Ray's State API keeps dead actors: the job's two train workers, one on each node.
    job_id = submission_id(proc.stdout)
    job = ray_cluster.ray_job_id(job_id)
    workers = [
        a for a in ray_cluster.state("actors", class_name="RayTrainWorker") if a["job_id"] == job
    ]
    assert sorted(a["node_id"] for a in workers) == sorted(
        [ray_cluster.head_node, ray_cluster.worker_node]
    )
    # One checkpoint on the shared path holds both ranks' ZeRO-2 optimizer shards.
    (ckpt,) = (tmp_path / "runs" / "checkpoints").glob("run-*/step_0000002")
    for rank in (0, 1):
        assert list(ckpt.rglob(f"*zero_pp_rank_{rank}_*optim_states.pt")), rank
    assert (tmp_path / "runs" / "model" / "config.json").is_file()

    # The session's cluster also ran other tests' jobs: find this one by its id.
    listed = ift(["jobs", "list", "--address", ray_cluster.address], cwd=work)
    assert listed.returncode == 0 and f"{job_id}\tSUCCEEDED\t" in listed.stdout
    logs = ift(["jobs", "logs", job_id, "--address", ray_cluster.address], cwd=work)
    assert "[train] 2/2 steps" in logs.stdout


def test_stopped_job_resumes_from_its_checkpoint_when_resubmitted(
    ray_cluster: RayCluster, tmp_path: Path
) -> None:
    """`ift jobs stop` mid-training, then the same `ift submit` again: the second train run
    starts after the last checkpoint (the first one's), not at step 1, and finishes."""
    steps = 40
    raw = tiny_config(tmp_path)
    raw["train"].update(max_steps=steps, eval_every=0, checkpoint_every=2)
    raw["eval"]["models"] = []
    work = project(tmp_path, raw)
    address = ray_cluster.address
    submit = ["submit", "tiny.yaml", "--stage", "train", "--address", address]
    first = ift([*submit, "--no-wait"], cwd=work, timeout=120)
    assert first.returncode == 0
    job_id = first.stdout.split()[-1]  # --no-wait prints the id last
    assert job_id == submission_id(first.stdout)

    try:
        # Wait for a checkpoint Ray Train has registered (the snapshot lists the reported ones).
        ckpts = tmp_path / "runs" / "checkpoints"
        deadline = time.monotonic() + 600
        while not list(ckpts.glob("run-*/checkpoint_manager_snapshot.json")):
            status = ray_cluster.get(f"/api/jobs/{job_id}")["status"]
            assert status in ("PENDING", "RUNNING"), f"the job ended {status} before a checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 10 minutes"
            time.sleep(0.5)
        stop = ift(["jobs", "stop", job_id, "--address", address], cwd=work, timeout=180)
    finally:  # never leave a job holding the session cluster's CPUs
        if ray_cluster.get(f"/api/jobs/{job_id}")["status"] in ("PENDING", "RUNNING"):
            ift(["jobs", "stop", job_id, "--address", address], cwd=work, timeout=180)
    assert stop.returncode == 0
    assert f"job {job_id}: STOPPED" in stop.stdout, "the job finished before it was stopped"
    assert ray_cluster.get(f"/api/jobs/{job_id}")["status"] == "STOPPED"
    assert not (tmp_path / "runs" / "model").exists()  # it really stopped mid-training

    second = ift(submit, cwd=work)
    assert second.returncode == 0
    assert "SUCCEEDED" in second.stdout and f"[train] {steps}/{steps} steps" in second.stdout
    resumed = re.search(r"\[train\] resumed from step (\d+)", second.stdout)
    assert resumed, "the resubmitted job started from scratch"
    start = int(resumed.group(1))
    assert 2 <= start < steps and start % 2 == 0  # a checkpoint_every=2 checkpoint

    # MLflow: the stopped run logged a prefix 1..m; the resumed one exactly start+1..steps,
    # with the same losses where the two overlap (resume == uninterrupted).
    db = tmp_path / "mlflow.db"
    stopped_run, resumed_run = runs(db)["train"]
    before = dict(history(db, stopped_run, "train/loss"))
    after = dict(history(db, resumed_run, "train/loss"))
    assert list(before) == list(range(1, len(before) + 1))
    assert list(after) == list(range(start + 1, steps + 1))
    overlap = sorted(set(before) & set(after))
    assert [after[s] for s in overlap] == pytest.approx([before[s] for s in overlap], rel=RTOL)
    assert (tmp_path / "runs" / "model" / "config.json").is_file()


def test_relative_storage_is_refused_before_submission(tmp_path: Path) -> None:
    raw = tiny_config(tmp_path)
    raw["experiment"]["output_dir"] = "runs/x"
    raw["data"]["output_dir"] = "data/x"
    (tmp_path / "rel.yaml").write_text(yaml.safe_dump(raw))
    proc = ift(["submit", "rel.yaml", "--address", "http://127.0.0.1:1"], cwd=tmp_path, timeout=30)
    assert proc.returncode == 2
    assert "experiment.output_dir" in proc.stderr and "shared storage" in proc.stderr
    assert "data.output_dir" in proc.stderr


def test_wrong_token_is_a_clear_error(ray_cluster: RayCluster, tmp_path: Path) -> None:
    bad = tmp_path / "token"
    bad.write_text("not-the-token")
    proc = ift(
        ["jobs", "list", "--address", ray_cluster.address, "--token-file", str(bad)],
        cwd=tmp_path,
        timeout=60,
    )
    assert proc.returncode == 1
    # One paragraph naming the server, the refused token and where it came from.
    assert proc.stderr.startswith("ift jobs: the Ray job server at"), proc.stderr
    assert f"the token from --token-file {bad} was refused" in proc.stderr
    assert "Traceback" not in proc.stderr
    json.dumps(proc.stderr)  # printable, no binary noise


def test_token_file_wins_over_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from launcher.submit import SubmitError, auth_headers, find_token

    given = tmp_path / "token"
    given.write_text("from-file\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert find_token(str(given)) == ("from-file", f"--token-file {given}")
    assert auth_headers(str(given)) == {"Authorization": "Bearer from-file"}
    assert find_token(None) == ("from-env", "RAY_AUTH_TOKEN")
    with pytest.raises(SubmitError, match="no token found"):
        find_token(str(tmp_path / "missing"))

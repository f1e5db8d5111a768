"""`ift submit` / `ift jobs` against a real `ray start --head` cluster on loopback (token
authentication on, as Ray 2.60 sets it up), with the real pipeline running as the Ray job.

The head runs as `ray start --head --block` in its own process group, so tearing it down never
touches another Ray instance on the machine.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.integration.test_cli_pipeline import tiny_config

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory):
    gcs, dash = free_port(), free_port()
    # The job's `python` must be this environment's: put it first on the cluster's PATH.
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = open(tmp_path_factory.mktemp("head") / "head.log", "w")  # noqa: SIM115
    head = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={gcs}",
            f"--dashboard-port={dash}",
            "--dashboard-host=127.0.0.1",
            "--node-ip-address=127.0.0.1",
            "--num-cpus=2",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)  # noqa: S310
            break
        except urllib.error.HTTPError:  # up, and asking for the auth token
            break
        except OSError:
            time.sleep(1)
    else:
        head.kill()
        pytest.fail("the Ray head did not come up")
    yield address
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
    log.close()


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


def test_submitted_pipeline_succeeds_and_logs_to_mlflow(ray_head: str, tmp_path: Path) -> None:
    raw = tiny_config(tmp_path)
    raw["train"].update(max_steps=2, eval_every=0, checkpoint_every=0)
    raw["eval"]["models"] = ["finetuned"]
    work = tmp_path / "project"
    work.mkdir()
    (work / "tiny.yaml").write_text(yaml.safe_dump(raw))
    proc = ift(["submit", "tiny.yaml", "--address", ray_head], cwd=work)
    assert proc.returncode == 0
    assert "SUCCEEDED" in proc.stdout
    assert "[train] step 2/2" in proc.stdout  # the job's logs were followed
    con = sqlite3.connect(tmp_path / "mlflow.db")
    names = {n for (n,) in con.execute("select name from runs")}
    assert {"tiny-run", "prepare", "train", "eval-finetuned"} <= names

    listed = ift(["jobs", "list", "--address", ray_head], cwd=work)
    assert listed.returncode == 0 and "SUCCEEDED" in listed.stdout
    job_id = listed.stdout.split()[0]
    logs = ift(["jobs", "logs", job_id, "--address", ray_head], cwd=work)
    assert "[train] step 2/2" in logs.stdout


def test_relative_storage_is_refused_before_submission(tmp_path: Path) -> None:
    raw = tiny_config(tmp_path)
    raw["experiment"]["output_dir"] = "runs/x"
    (tmp_path / "rel.yaml").write_text(yaml.safe_dump(raw))
    proc = ift(["submit", "rel.yaml", "--address", "http://127.0.0.1:1"], cwd=tmp_path, timeout=30)
    assert proc.returncode == 2
    assert "experiment.output_dir" in proc.stderr and "shared storage" in proc.stderr


def test_wrong_token_is_a_clear_error(ray_head: str, tmp_path: Path) -> None:
    bad = tmp_path / "token"
    bad.write_text("not-the-token")
    proc = ift(
        ["jobs", "list", "--address", ray_head, "--token-file", str(bad)], cwd=tmp_path, timeout=60
    )
    assert proc.returncode != 0
    assert "ift jobs" in proc.stderr or "Authentication" in proc.stderr
    json.dumps(proc.stderr)  # printable, no binary noise

"""MLflow lineage against a real tracking server: PostgreSQL (started here as the `postgres`
user on a loopback port) as the backend store, `mlflow server` with an artifacts destination,
and the session's real two-node Ray cluster (conftest.py) for `ift submit`. Nothing is mocked.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import RayCluster, free_port
from tests.integration.test_cli_pipeline import tiny_config
from tests.integration.test_submit import ift

BIN = Path(sys.executable).parent
PG_BIN = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"))), None)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        PG_BIN is None or os.geteuid() != 0 or shutil.which("runuser") is None,
        reason="needs PostgreSQL server binaries and root (to run it as postgres)",
    ),
]


def as_postgres(*cmd: str) -> None:
    subprocess.run(["runuser", "-u", "postgres", "--", *cmd], check=True, capture_output=True)


@pytest.fixture(scope="module")
def postgres(tmp_path_factory: pytest.TempPathFactory):
    assert PG_BIN is not None
    # Outside pytest's root-only tmp tree: the postgres user must be able to reach it.
    data = Path(tempfile.mkdtemp(prefix="ift-pg-")) / "data"
    data.mkdir()
    shutil.chown(data.parent, "postgres", "postgres")
    shutil.chown(data, "postgres", "postgres")
    port = free_port()
    as_postgres(str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres")
    as_postgres(
        str(PG_BIN / "pg_ctl"),
        "-D",
        str(data),
        "-w",
        "-l",
        str(data / "log"),
        "-o",
        f"-p {port} -k {data} -c listen_addresses=127.0.0.1",
        "start",
    )
    as_postgres(str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(port), "mlflow")
    # psycopg2 driver named explicitly: MLflow 3 otherwise picks psycopg (v3).
    yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/mlflow"
    as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "stop")
    shutil.rmtree(data.parent, ignore_errors=True)


class MlflowServer:
    def __init__(self, store: str, artifacts: Path, port: int) -> None:
        self.store, self.artifacts, self.port = store, artifacts, port
        self.uri = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                str(BIN / "mlflow"),
                "server",
                "--backend-store-uri",
                self.store,
                "--artifacts-destination",
                str(self.artifacts),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2)  # noqa: S310
                return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("mlflow server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.proc = None


@pytest.fixture(scope="module")
def mlflow_server(postgres: str, tmp_path_factory: pytest.TempPathFactory):
    server = MlflowServer(postgres, tmp_path_factory.mktemp("artifacts"), free_port())
    server.start()
    yield server
    server.stop()


def config_file(tmp_path: Path, server: MlflowServer, **train: object) -> Path:
    raw = tiny_config(tmp_path)
    raw["tracking"] = {"tracking_uri": server.uri, "experiment_name": "tiny"}
    raw["train"].update(train)
    raw["eval"]["models"] = ["finetuned"]
    path = tmp_path / "project" / "tiny.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return path


def test_submitted_pipeline_is_tracked_on_the_server(
    ray_cluster: RayCluster,
    mlflow_server: MlflowServer,
    tmp_path: Path,
) -> None:
    import mlflow

    cfg = config_file(tmp_path, mlflow_server, max_steps=3, eval_every=0, checkpoint_every=0)
    proc = ift(["submit", cfg.name, "--address", ray_cluster.address], cwd=cfg.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = mlflow.MlflowClient(tracking_uri=mlflow_server.uri)
    exp = client.get_experiment_by_name("tiny")
    assert exp is not None
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    parent = runs["tiny-run"]
    for stage in ("prepare", "train", "eval-finetuned"):
        assert runs[stage].data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert [m.step for m in client.get_metric_history(runs["train"].info.run_id, "train/loss")] == [
        1,
        2,
        3,
    ]
    assert "sst2/accuracy" in runs["eval-finetuned"].data.metrics
    assert parent.data.params["train.max_steps"] == "3"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert "config.yaml" in artifacts
    version = client.get_model_version_by_alias("tiny", "candidate")
    assert version.run_id == runs["train"].info.run_id


@pytest.mark.slow  # fault injection: `make test-reliability`
def test_server_restart_during_training_loses_no_metric(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    import mlflow

    steps = 40
    cfg = config_file(
        tmp_path,
        mlflow_server,
        max_steps=steps,
        eval_every=0,
        checkpoint_every=0,
        micro_batch_size=1,
        grad_accum=1,
    )
    client = mlflow.MlflowClient(tracking_uri=mlflow_server.uri)
    restarted: list[float] = []

    def restart_once_training_logs() -> None:
        deadline = time.time() + 600
        while time.time() < deadline:
            try:
                exp = client.get_experiment_by_name("tiny")
                if exp is None:  # the pipeline has not created it yet
                    time.sleep(0.5)
                    continue
                runs = client.search_runs(
                    [exp.experiment_id],
                    "attributes.run_name = 'train'",
                    order_by=["attributes.start_time DESC"],
                )
                if (
                    runs
                    and runs[0].info.status == "RUNNING"
                    and client.get_metric_history(runs[0].info.run_id, "train/loss")
                ):
                    mlflow_server.stop()
                    time.sleep(8)  # several flush attempts fail meanwhile
                    mlflow_server.start()
                    restarted.append(time.time())
                    return
            except Exception:  # noqa: BLE001 - the server may be between states
                pass
            time.sleep(0.5)

    watcher = threading.Thread(target=restart_once_training_logs, daemon=True)
    watcher.start()
    proc = ift(["run", str(cfg), "eval.models=[]"], cwd=cfg.parent)
    watcher.join(timeout=5)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert restarted, "the server was never restarted: the test exercised nothing"
    exp = client.get_experiment_by_name("tiny")
    assert exp is not None
    train_run = client.search_runs(
        [exp.experiment_id],
        "attributes.run_name = 'train'",
        order_by=["attributes.start_time DESC"],
    )[0]
    history = client.get_metric_history(train_run.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, steps + 1))


def test_unreachable_server_fails_before_training(tmp_path: Path) -> None:
    raw = tiny_config(tmp_path)
    raw["tracking"] = {"tracking_uri": f"http://127.0.0.1:{free_port()}"}
    path = tmp_path / "down.yaml"
    path.write_text(yaml.safe_dump(raw))
    t0 = time.time()
    proc = ift(["run", str(path)], cwd=tmp_path, timeout=60)
    assert proc.returncode == 2
    assert "tracking.tracking_uri" in proc.stderr and "unreachable" in proc.stderr
    assert time.time() - t0 < 30
    assert not (tmp_path / "runs").exists()  # nothing started, nothing written

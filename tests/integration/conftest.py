"""One two-node Ray cluster for every `ift submit` test of the session (tests/integration).

`ray start --head` and `ray start --address` on this machine, each `--block`ing in its own
process group, token authentication on (as Ray 2.60's `ray start --head` sets it up), the job
server on loopback and every port picked free (Ray swaps 127.0.0.1 for the host IP for its
own servers; the token guards them). Each node has 2 CPUs and a custom resource that names
it, so a test can tell from the Ray State API on which node an actor ran. Teardown kills the
two process groups: never another Ray instance on the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from launcher.submit import auth_headers

BIN = Path(sys.executable).parent
NODE_CPUS = 2
JOIN_TRIES = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RayCluster:
    """A running two-node cluster: the job server's address and the id of each node."""

    address: str  # http://127.0.0.1:PORT, the dashboard / job server
    head_node: str
    worker_node: str

    def get(self, path: str) -> Any:
        """GET a dashboard endpoint (`/api/...`) with the cluster's auth token."""
        req = urllib.request.Request(f"{self.address}{path}", headers=auth_headers())
        with urllib.request.urlopen(req, timeout=30) as r:  # noqa: S310 - loopback
            return json.load(r)

    def state(self, resource: str, **equal: str) -> list[dict[str, Any]]:
        """Ray State API listing (`actors`, `nodes`, ...) filtered by `key=value`; dead actors
        stay listed, so a finished job's actors can still be inspected."""
        query = [("detail", "1"), ("limit", "10000")]
        for k, v in equal.items():
            query += [("filter_keys", k), ("filter_predicates", "="), ("filter_values", v)]
        body = self.get(f"/api/v0/{resource}?{urllib.parse.urlencode(query)}")
        return list(body["data"]["result"]["result"])

    def ray_job_id(self, submission_id: str) -> str:
        """The Ray job id (what actors carry as `job_id`) of a submitted job."""
        return str(self.get(f"/api/jobs/{submission_id}")["job_id"])


def _python_only(folder: Path) -> Path:
    """A folder whose `python` runs this environment's interpreter, to put first on the
    cluster's PATH: the job's entrypoint is `python -m launcher ...`.

    Not the whole venv bin: its pip `ninja` (1.13) hashes build commands differently from the
    system one (1.11) that local runs find, so DeepSpeed's CPU shm op was rebuilt (minutes on
    2 cores) each time a cluster run and a local run alternated. A wrapper, not a symlink: a
    symlinked interpreter outside the venv does not find its pyvenv.cfg.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("python", "python3"):
        shim = folder / name
        shim.write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
        shim.chmod(0o755)
    return folder


def _start_node(args: list[str], temp_dir: Path, log: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "PATH": f"{_python_only(temp_dir / 'bin')}{os.pathsep}{os.environ.get('PATH', '')}",
        # A joining node only sends the cluster's token when told the cluster wants one.
        "RAY_AUTH_MODE": "token",
    }
    env.pop("RAY_ADDRESS", None)
    with log.open("w") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [
                str(BIN / "ray"),
                "start",
                "--block",
                "--node-ip-address=127.0.0.1",
                f"--num-cpus={NODE_CPUS}",
                # Defaults are fixed ports (52365, 10001): another Ray on the machine may hold them.
                f"--dashboard-agent-listen-port={free_port()}",
                # Per node: nodes sharing one session folder share `runtime_resources/`, and one
                # node unpacking the job's working_dir deleted it under the other's running driver.
                f"--temp-dir={temp_dir}",
                "--disable-usage-stats",
                *args,
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM makes a node drain for up to 30 s: give it a moment, then kill the whole group."""
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + 3
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory):
    logs = tmp_path_factory.mktemp("ray-cluster")
    # Short paths: Ray's Unix sockets live under the temp dir (108-byte limit).
    temp_dirs = [Path(tempfile.mkdtemp(prefix="ift-ray-", dir="/tmp")) for _ in range(2)]
    gcs, dash = free_port(), free_port()
    procs = [
        _start_node(
            [
                "--head",
                f"--port={gcs}",
                f"--dashboard-port={dash}",
                "--dashboard-host=127.0.0.1",
                f"--ray-client-server-port={free_port()}",
                '--resources={"ift_head": 1}',
            ],
            temp_dirs[0],
            logs / "head.log",
        )
    ]
    address = f"http://127.0.0.1:{dash}"
    try:
        if not _wait(lambda: _up(address), 180, procs[0]):
            pytest.fail(
                f"the Ray head did not come up in 180s; {_tails(logs / 'head.log', temp_dirs[0])}"
            )
        probe = RayCluster(address, "", "")

        def both_alive() -> bool:
            nodes = probe.state("nodes", state="ALIVE")
            return {n for node in nodes for n in node["resources_total"]} >= {
                "ift_head",
                "ift_worker",
            }

        # `ray start` gives its raylet a fixed 30 s to register with the GCS and exits if it
        # has not: on a loaded 2-core machine it once missed it (CI, 2026-12-08). Start again.
        for attempt in range(1, JOIN_TRIES + 1):
            log = logs / f"worker-{attempt}.log"
            procs.append(
                _start_node(
                    [f"--address=127.0.0.1:{gcs}", '--resources={"ift_worker": 1}'],
                    temp_dirs[1],
                    log,
                )
            )
            if _wait(both_alive, 180, procs[-1]):
                break
            _stop([procs.pop()])
        else:
            tails = _tails(log, temp_dirs[1])
            pytest.fail(f"the second Ray node did not join in {JOIN_TRIES} tries; {tails}")
        by_role = {
            role: node["node_id"]
            for node in probe.state("nodes", state="ALIVE")
            for role in ("ift_head", "ift_worker")
            if role in node["resources_total"]
        }
        yield RayCluster(address, by_role["ift_head"], by_role["ift_worker"])
    finally:
        _stop(procs[::-1])
        for d in temp_dirs:
            shutil.rmtree(d, ignore_errors=True)


def _up(address: str) -> bool:
    try:
        urllib.request.urlopen(f"{address}/api/version", timeout=2)  # noqa: S310 - loopback
    except urllib.error.HTTPError:  # up, and asking for the auth token
        return True
    except OSError:
        return False
    return True


def _wait(ready: Any, timeout: float, node: subprocess.Popen) -> bool:
    """Whether `ready()` held within `timeout`; False at once if the node's process exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and node.poll() is None:
        try:
            if ready():
                return True
        except OSError:  # the dashboard is still starting
            pass
        time.sleep(1)
    return False


def _tails(log: Path, temp_dir: Path) -> str:
    """The end of a node's `ray start` output and of its raylet's log, for a failure message."""
    parts = [f"{log.name} ends:\n{log.read_text()[-3000:]}"]
    raylet = temp_dir / "session_latest" / "logs" / "raylet.out"
    if raylet.exists():
        parts.append(f"raylet.out ends:\n{raylet.read_text(errors='replace')[-3000:]}")
    return "\n".join(parts)

"""`ift submit` and `ift jobs`: the same command as a Ray job on a running cluster.

    ift submit configs/x.yaml train.lr=1e-4 --address http://HEAD:8265 [--stage run] [--no-wait]
    ift jobs list|logs|stop [JOB_ID] --address http://HEAD:8265

The config is validated here first (a bad config never reaches the cluster). The current
directory is the job's working_dir (without .venv, runs, mlflow.db, .git) and ift's own packages
travel as py_modules, so the cluster runs exactly this code. With token authentication (Ray
>= 2.52 `ray start --head` turns it on) the token is read from `RAY_AUTH_TOKEN`, `--token-file`
or `~/.ray/auth_token` and sent as a Bearer header.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from launcher.config import ConfigError, apply_overrides, load_config

EXCLUDES = [
    ".venv",
    "runs",
    "mlflow.db",
    "mlartifacts",
    "mlruns",
    ".git",
    "__pycache__",
    "*.pyc",
    ".pytest_cache",
    ".mypy_cache",
    ".ruff_cache",
    "benchmarks/results",
]
PACKAGES = ("launcher", "training", "data_pipeline", "eval")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class SubmitError(RuntimeError):
    user_facing = True


def submit(
    config: str,
    overrides: list[str],
    address: str,
    stage: str = "run",
    wait: bool = True,
    token_file: str | None = None,
) -> int:
    """Validate, submit as a Ray job, and (unless `wait` is False) follow its logs.

    Returns the process exit code: 0 when the job SUCCEEDED (or was submitted with no wait).
    """
    load_config(config, overrides)  # every problem, before anything leaves this machine
    check_shared_storage(config, overrides)
    cwd = Path.cwd()
    cfg_path = Path(config).resolve()
    if not cfg_path.is_relative_to(cwd):
        raise SubmitError(
            f"{config}: the config must be inside the current directory {cwd}, "
            "which is shipped as the job's working_dir"
        )
    entry = " ".join(
        shlex.quote(a)
        for a in ["python", "-m", "launcher", stage, str(cfg_path.relative_to(cwd)), *overrides]
    )
    runtime_env: dict[str, Any] = {
        "working_dir": str(cwd),
        "excludes": EXCLUDES,
        "env_vars": {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")},
    }
    root = Path(__file__).resolve().parents[1]
    if not (cwd / "launcher").is_dir():  # ift's code is not in the working_dir: ship it
        runtime_env["py_modules"] = [str(root / p) for p in PACKAGES]
    client = _client(address, token_file)
    job_id = _submit_with_retry(client, entry, runtime_env)
    print(f"submitted {job_id} to {address}: {entry}", flush=True)
    if not wait:
        print(job_id)
        return 0
    try:
        asyncio.run(_follow(client, job_id))
    except KeyboardInterrupt:
        print(
            f"\nstopped following; the job goes on. Stop it with: ift jobs stop {job_id} "
            f"--address {address}",
            file=sys.stderr,
        )
        return 130
    status = _wait_terminal(client, job_id)
    print(f"job {job_id}: {status}", flush=True)
    return 0 if status == "SUCCEEDED" else 1


def jobs(action: str, job_id: str | None, address: str, token_file: str | None = None) -> int:
    client = _client(address, token_file)
    if action == "list":
        for j in client.list_jobs():
            print(f"{j.submission_id}\t{j.status}\t{j.entrypoint}")
        return 0
    if not job_id:
        raise SubmitError(f"ift jobs {action}: give a job id (see `ift jobs list`)")
    if action == "logs":
        print(client.get_job_logs(job_id), end="")
        return 0
    if action == "stop":
        client.stop_job(job_id)
        print(f"job {job_id}: {_wait_terminal(client, job_id, timeout=120)}")
        return 0
    raise SubmitError(f"unknown action {action!r}: use list, logs or stop")


def check_shared_storage(config: str, overrides: list[str]) -> None:
    """A job's working_dir is a temporary copy on the head node: outputs and a SQLite MLflow
    store must live on storage that outlives it and that every node sees."""
    raw = apply_overrides(yaml.safe_load(Path(config).read_text()) or {}, overrides)
    problems = []
    out = (raw.get("experiment") or {}).get("output_dir", "runs/ift")
    if "://" not in out and not os.path.isabs(out):
        problems.append(
            f"experiment.output_dir: {out!r} is relative; with `ift submit` it must "
            "be shared storage: an absolute path every node mounts, or s3://..."
        )
    uri = (raw.get("tracking") or {}).get("tracking_uri", "sqlite:///mlflow.db")
    enabled = (raw.get("tracking") or {}).get("enabled", True)
    if enabled and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        problems.append(
            f"tracking.tracking_uri: {uri!r} is a relative SQLite file; use an MLflow "
            "server (http://...) or an absolute sqlite:////path on shared storage"
        )
    if problems:
        raise ConfigError(
            f"invalid config {config} for a cluster job:\n"
            + "\n".join(f"  - {p}" for p in problems)
        )


def auth_headers(token_file: str | None = None) -> dict[str, str]:
    """Bearer header for Ray's token authentication, when a token can be found."""
    token = os.environ.get("RAY_AUTH_TOKEN")
    path = Path(token_file).expanduser() if token_file else Path.home() / ".ray" / "auth_token"
    if not token and path.is_file():
        token = path.read_text().strip()
    if token_file and not token:
        raise SubmitError(f"--token-file {token_file}: no token found there")
    return {"Authorization": f"Bearer {token}"} if token else {}


def _client(address: str, token_file: str | None) -> Any:
    from ray.job_submission import JobSubmissionClient

    headers = auth_headers(token_file)
    try:
        return JobSubmissionClient(address, headers=headers)
    except Exception as e:  # connection refused, 401, ...
        hint = (
            ""
            if headers
            else " No Ray auth token was found (RAY_AUTH_TOKEN, --token-file, "
            "~/.ray/auth_token): a cluster with token authentication refuses the request."
        )
        raise SubmitError(f"cannot reach the Ray job server at {address}: {e}.{hint}") from None


def _submit_with_retry(
    client: Any, entry: str, runtime_env: dict[str, Any], timeout: float = 300
) -> str:
    """A freshly started head answers 'No available agent' until its job agent is up."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return str(client.submit_job(entrypoint=entry, runtime_env=runtime_env))
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise SubmitError(f"the job server refused the job: {e}") from None
            time.sleep(2)


async def _follow(client: Any, job_id: str) -> None:
    async for chunk in client.tail_job_logs(job_id):
        print(chunk, end="", flush=True)


def _wait_terminal(client: Any, job_id: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    status = str(client.get_job_status(job_id))
    while status.split(".")[-1] not in TERMINAL and time.monotonic() < deadline:
        time.sleep(1)
        status = str(client.get_job_status(job_id))
    return status.split(".")[-1]

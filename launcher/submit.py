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
from launcher.pipeline import worker_env

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
    # Every problem, before anything leaves this machine (paths on the cluster's volume are
    # checked where the job runs).
    cfg = load_config(config, overrides, cluster_side=True)
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
        # Job-level env reaches the job's workers on every node, not only the driver's.
        "env_vars": {
            **worker_env(cfg.train.use_gpu),
            **{k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")},
        },
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
    """`ift jobs list|logs|stop`: returns the exit code (stop: 0 once the job is STOPPED or had
    already ended, 1 when it is still running after the wait)."""
    client = _client(address, token_file)
    if action == "list":
        for j in sorted(client.list_jobs(), key=lambda j: j.start_time or 0):
            print(f"{j.submission_id}\t{_status(j.status)}\t{j.entrypoint}")
        return 0
    if not job_id:
        raise SubmitError(f"ift jobs {action}: give a job id (see `ift jobs list`)")
    try:
        if action == "logs":
            print(client.get_job_logs(job_id), end="")
            return 0
        if action == "stop":
            client.stop_job(job_id)  # False when the job had already ended: not an error
            status = _wait_terminal(client, job_id, timeout=120)
            print(f"job {job_id}: {status}", flush=True)
            return 0 if status in TERMINAL else 1
    except RuntimeError as e:  # an unknown job id answers 404
        raise SubmitError(f"job {job_id} at {address}: {e}") from None
    raise SubmitError(f"unknown action {action!r}: use list, logs or stop")


def check_shared_storage(config: str, overrides: list[str]) -> None:
    """A job's working_dir is a temporary copy on the head node: outputs and a SQLite MLflow
    store must live on storage that outlives it and that every node sees."""
    raw = apply_overrides(yaml.safe_load(Path(config).read_text()) or {}, overrides)
    problems = []
    outputs = {
        "experiment.output_dir": (raw.get("experiment") or {}).get("output_dir", "runs/ift"),
        "data.output_dir": (raw.get("data") or {}).get("output_dir"),
    }
    for key, out in outputs.items():
        if out is not None and "://" not in out and not os.path.isabs(out):
            problems.append(
                f"{key}: {out!r} is relative; with `ift submit` it must "
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
    token, _ = find_token(token_file)
    return {"Authorization": f"Bearer {token}"} if token else {}


def find_token(token_file: str | None = None) -> tuple[str | None, str]:
    """The Ray auth token and where it came from: `--token-file` when given (an explicit flag
    wins over the environment), else `RAY_AUTH_TOKEN`, else `~/.ray/auth_token`."""
    if token_file:
        path = Path(token_file).expanduser()
        token = path.read_text().strip() if path.is_file() else ""
        if not token:
            raise SubmitError(f"--token-file {token_file}: no token found there")
        return token, f"--token-file {token_file}"
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    default = Path.home() / ".ray" / "auth_token"
    if default.is_file() and default.read_text().strip():
        return default.read_text().strip(), str(default)
    return None, ""


def _client(address: str, token_file: str | None) -> Any:
    from ray.job_submission import JobSubmissionClient

    token, source = find_token(token_file)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        return JobSubmissionClient(address, headers=headers)
    except Exception as e:  # connection refused, 401 (no token), 403 (wrong token), ...
        if type(e).__name__ == "AuthenticationError":  # ray.exceptions, a multi-page text
            first = str(e).strip().splitlines()[0]
            hint = (
                f"the token from {source} was refused"
                if token
                else "no Ray auth token was found (RAY_AUTH_TOKEN, --token-file, "
                "~/.ray/auth_token) and the cluster requires one"
            )
            raise SubmitError(
                f"the Ray job server at {address} refused the request: {hint} ({first})"
            ) from None
        raise SubmitError(f"cannot reach the Ray job server at {address}: {e}") from None


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
    status = _status(client.get_job_status(job_id))
    while status not in TERMINAL and time.monotonic() < deadline:
        time.sleep(1)
        status = _status(client.get_job_status(job_id))
    return status


def _status(status: Any) -> str:
    """`JobStatus.SUCCEEDED` (a str enum; its str() varies by Python version) -> `SUCCEEDED`."""
    return str(getattr(status, "value", status)).split(".")[-1]

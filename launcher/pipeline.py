"""The pipeline driver: prepare -> train -> eval under one MLflow pipeline run.

Each stage is a child MLflow run (`mlflow.parentRunId`), so one `ift run` is one row in the
MLflow UI with its stages under it, whatever the number of Ray workers or nodes: only this
driver and rank 0 of training ever log.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

from launcher.config import Config, mask_text
from launcher.tracking import Tracker


def log(msg: str) -> None:
    print(msg, flush=True)


def run_pipeline(
    cfg: Config, command: str, stages: tuple[str, ...], config_path: str = ""
) -> dict[str, Any]:
    """Run `stages` of the experiment; returns {"manifest", "train", "eval": {role: metrics}}."""
    t0 = time.perf_counter()
    tracker = Tracker(cfg)
    tracker.check_reachable()
    ensure_ray(cfg)
    from data_pipeline.prepare import prepare, read_manifest

    result: dict[str, Any] = {"eval": {}}
    with tracker.pipeline(command, config_path):
        manifest = read_manifest(cfg.data_dir) if "prepare" not in stages else None
        if manifest is None:
            with tracker.stage("prepare") as run:
                log(f"== prepare -> {cfg.data_dir}")
                manifest = prepare(cfg, log=log)
                tracker.log_prepare(run, manifest, cfg.data_dir)
        result["manifest"] = manifest
        if "train" in stages:
            from training.train import train

            with tracker.stage("train") as run:
                log(f"== train -> {cfg.experiment.output_dir}")
                summary = train(cfg, manifest, tracking=tracker.worker_target(run), log=log)
                tracker.log_train(run, summary, cfg, manifest)
                result["train"] = summary
        if "eval" in stages:
            from eval.evaluate import evaluate

            for role in cfg.eval.models:
                with tracker.stage(f"eval-{role}") as run:
                    log(f"== eval {role}")
                    out = evaluate(cfg, manifest, role, log=log)
                    tracker.log_eval(run, out)
                    result["eval"][role] = out["metrics"]
            if result["eval"]:
                tracker.log_comparison(result["eval"])
    if result["eval"]:
        print_table(result["eval"])
    log(f"== done in {time.perf_counter() - t0:.0f}s. Outputs: {cfg.experiment.output_dir}")
    if cfg.tracking.enabled:
        uri = mask_text(cfg.tracking.tracking_uri)
        ui = f"mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite") else f"open {uri}"
        log(
            f"   MLflow: experiment '{cfg.tracking.experiment_name}' at {uri}\n"
            f"   to browse it: {ui}   (then http://127.0.0.1:5000)"
        )
    return result


def worker_env(use_gpu: bool) -> dict[str, str]:
    """Environment of every Ray worker: quiet libraries, no hub, and DeepSpeed told up front that
    a CPU run is a CPU run instead of probing for accelerators."""
    env = {
        "TOKENIZERS_PARALLELISM": "false",
        "TRANSFORMERS_VERBOSITY": "error",
        "HF_HUB_OFFLINE": "1",
        "TQDM_DISABLE": "1",
        # Ray Train's print patch tees every worker print into a logger as well: lines came twice.
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    }
    if not use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    return env


def ensure_ray(cfg: Config) -> None:
    """Join `cluster.address`, or start a local Ray with no dashboard.

    Ray 2.60 has no loopback-only mode (it swaps 127.0.0.1 for the host IP and its gRPC servers
    listen on all interfaces): its token authentication and the host firewall guard the ports.
    """
    import ray

    if ray.is_initialized():
        return
    # Set before Ray starts so every local worker inherits them (`ift submit` ships the same
    # through the job's runtime_env, for workers on other nodes).
    for key, value in worker_env(cfg.train.use_gpu).items():
        os.environ.setdefault(key, value)
    if cfg.cluster.address:
        ray.init(address=cfg.cluster.address, logging_level=logging.WARNING)
        return
    if os.environ.get("RAY_ADDRESS"):  # inside a Ray job (`ift submit`): join its cluster
        ray.init(logging_level=logging.WARNING)
        return
    ray.init(
        address="local",  # a new local Ray, never one `ray start` left running on this host
        num_cpus=cfg.cluster.num_cpus,
        include_dashboard=False,
        logging_level=logging.WARNING,
        configure_logging=True,
        _node_ip_address="127.0.0.1",
    )


def print_table(evals: dict[str, dict[str, float]]) -> None:
    """metric | base | [base k-shot |] fine-tuned | delta (fine-tuned - base), for every task
    metric any model reported."""
    from eval.report import ROLE_TITLES, table_roles

    names = sorted({k for m in evals.values() for k in m if not k.startswith("eval/")})
    roles = table_roles(evals)
    base, ft = evals.get("base", {}), evals.get("finetuned", {})

    def fmt(v: float | None) -> str:
        return f"{v:.2f}" if v is not None else "-"

    rows = [("metric", *(ROLE_TITLES[r] for r in roles), "delta")]
    for n in names:
        b, f = base.get(n), ft.get(n)
        delta = f"{f - b:+.2f}" if b is not None and f is not None else "-"
        rows.append((n, *(fmt(evals.get(r, {}).get(n)) for r in roles), delta))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        " | ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    print("\n" + "\n".join(lines) + "\n", flush=True)
    sys.stdout.flush()


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=str)

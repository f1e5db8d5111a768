"""The pipeline driver: prepare -> train -> eval under one MLflow pipeline run.

Each stage is a child MLflow run (`mlflow.parentRunId`), so one `ift run` is one row in the
MLflow UI with its stages under it, whatever the number of Ray workers or nodes: only this
driver and rank 0 of training ever log.

The console (launcher/console.py) gets a few lines and one progress bar per stage (a line
every few seconds when it is not a terminal), then the results table and where the outputs
are. Ray's, MLflow's and the libraries' own output goes to `<output_dir>/logs/ift.log`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from data_pipeline import storage
from launcher import console
from launcher.config import Config, mask_text
from launcher.tracking import Tracker

LOG_FILE = "ift.log"


def log(msg: str) -> None:
    print(msg, flush=True)


def run_pipeline(
    cfg: Config, command: str, stages: tuple[str, ...], config_path: str = ""
) -> dict[str, Any]:
    """Run `stages` of the experiment; returns {"manifest", "train", "eval": {role: metrics}}."""
    t0 = time.perf_counter()
    tracker = Tracker(cfg)
    tracker.check_reachable()  # before the console takes stdout: its warning is for the user
    path = log_path(cfg)
    with console.session(path) as con:
        con.line(f"ift {command} {config_path}".rstrip() + f"  (full log: {path})")
        started_ray = False
        workers = console.WorkerLines(con)
        unsubscribe = console.on_worker_lines(workers)
        try:
            started_ray = ensure_ray(cfg)
            result = _run_stages(cfg, stages, command, config_path, tracker, con, workers)
        except BaseException:
            elapsed = console.fmt_seconds(time.perf_counter() - t0)
            con.line(f"== failed after {elapsed}; full log: {path}")
            raise
        finally:
            workers.drain()
            unsubscribe()
            if started_ray:  # while the log still takes Ray's output: its last lines go there
                import ray

                ray.shutdown()
        if result["eval"]:
            print_table(result["eval"], write=con.line)
        con.line(f"== done in {console.fmt_seconds(time.perf_counter() - t0)}")
        con.line(where(cfg, path, tracker.enabled, bool(result["eval"])))
    return result


def _run_stages(
    cfg: Config,
    stages: tuple[str, ...],
    command: str,
    config_path: str,
    tracker: Tracker,
    con: console.Console,
    workers: console.WorkerLines,
) -> dict[str, Any]:
    from data_pipeline.prepare import prepare, read_manifest

    result: dict[str, Any] = {"eval": {}}
    with tracker.pipeline(command, config_path):
        manifest = read_manifest(cfg.data_dir) if "prepare" not in stages else None
        if manifest is None:
            with tracker.stage("prepare") as run:
                con.line(f"== prepare -> {cfg.data_dir}")
                bar = console.progress_callback(con, "[prepare]", "units")
                manifest = prepare(cfg, log=con.line, progress=bar)
                _close(con)
                tracker.log_prepare(run, manifest, cfg.data_dir)
        result["manifest"] = manifest
        if "train" in stages:
            from training.train import train

            with tracker.stage("train") as run:
                con.line(f"== train -> {cfg.experiment.output_dir}")
                # Rank 0's step lines reach this driver through Ray's log forwarding.
                workers.steps = True
                try:
                    summary = train(
                        cfg, manifest, tracking=tracker.worker_target(run), log=con.line
                    )
                    _train_done(con, summary)
                    tracker.log_train(run, summary, cfg, manifest)
                finally:
                    workers.steps = False
                    _close(con)
                result["train"] = summary
        if "eval" in stages:
            from eval.evaluate import evaluate

            for role in cfg.eval.models:
                with tracker.stage(f"eval-{role}") as run:
                    con.line(f"== eval {role}")
                    bar = console.progress_callback(con, f"[eval {role}]", "batches")
                    out = evaluate(cfg, manifest, role, log=con.line, progress=bar)
                    _close(con)
                    tracker.log_eval(run, out)
                    result["eval"][role] = out["metrics"]
            if result["eval"]:
                tracker.log_comparison(result["eval"])
    return result


def _train_done(con: console.Console, summary: dict[str, Any]) -> None:
    """The bar's last state from the run's final metrics: rank 0's last step line may still
    be on its way (or the run was reused, and there is no bar)."""
    if con.bar is None or "train/steps" not in summary:
        return
    steps = int(summary["train/steps"])
    if con.bar.done >= steps:
        return
    status = f"loss {summary.get('train/loss', float('nan')):.4f}"
    if "val/loss" in summary:
        status += f"  val loss {summary['val/loss']:.4f}"
    console.advance(con, console.TRAIN_LABEL, "steps", steps, steps, status)


def _close(con: console.Console) -> None:
    if con.bar is not None:
        con.bar.close()


def log_path(cfg: Config) -> str:
    """`<output_dir>/logs/ift.log`; for an output folder on an object store, a local folder
    named after it (a log is appended line by line, which an object store cannot do)."""
    folder = storage.staging_dir(storage.join(cfg.experiment.output_dir, "logs"))
    return os.path.join(folder, LOG_FILE)


def where(cfg: Config, log_file: str, tracking: bool, evaluated: bool) -> str:
    """The closing lines: where the outputs, the log and the MLflow runs are."""
    out = cfg.experiment.output_dir
    lines = [f"   outputs: {out}"]
    if evaluated:
        lines[0] += f"  (eval report: {storage.join(out, 'eval', 'report.md')})"
    lines.append(f"   log:     {log_file}")
    if tracking:
        uri = mask_text(cfg.tracking.tracking_uri)
        ui = f"mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite") else f"open {uri}"
        lines.append(f"   MLflow:  experiment '{cfg.tracking.experiment_name}' at {uri}")
        lines.append(f"            to browse it: {ui}   (then http://127.0.0.1:5000)")
    return "\n".join(lines)


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


def ensure_ray(cfg: Config) -> bool:
    """Join `cluster.address`, or start a local Ray (`launcher.local_ray.start`); True when this
    call connected (False: Ray was initialized already)."""
    import ray

    from launcher import local_ray

    if ray.is_initialized():
        return False
    # Set before Ray starts so every local worker inherits them (`ift submit` ships the same
    # through the job's runtime_env, for workers on other nodes).
    for key, value in worker_env(cfg.train.use_gpu).items():
        os.environ.setdefault(key, value)
    if cfg.cluster.address:
        ray.init(address=cfg.cluster.address, logging_level=logging.WARNING)
        return True
    if os.environ.get("RAY_ADDRESS"):  # inside a Ray job (`ift submit`): join its cluster
        ray.init(logging_level=logging.WARNING)
        return True
    local_ray.start(cfg.cluster.num_cpus)
    return True


def print_table(evals: dict[str, dict[str, float]], write: Callable[[str], None] = log) -> None:
    """metric | base | [base k-shot |] fine-tuned | delta (fine-tuned - base), for every task
    metric any model reported, given to `write` as one text between blank lines."""
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
    write("\n" + "\n".join(lines) + "\n")
    sys.stdout.flush()


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=str)

"""MLflow runs of a pipeline: one parent run per command, one child run per stage.

All logging to MLflow goes through here (driver side) or `training.mlflow_logger` (rank 0 of
training, given the train run's id). With `tracking.enabled: false` every method is a no-op.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import launcher
from launcher.config import Config, ConfigError, flatten, mask_text, redact_secrets, to_yaml


class Tracker:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.enabled = cfg.tracking.enabled
        self.parent_id: str | None = None

    def check_reachable(self) -> None:
        """Fail before any resource starts when a tracking server does not answer."""
        uri = self.cfg.tracking.tracking_uri
        if not self.enabled or not uri.startswith(("http://", "https://")):
            return
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            if self.cfg.tracking.required:
                raise ConfigError(
                    f"tracking.tracking_uri: MLflow server {mask_text(uri)} is unreachable ({e}); "
                    "start it, "
                    "fix the URI, or set tracking.required=false to run without it"
                ) from None
            print(f"[mlflow] {mask_text(uri)} unreachable; continuing without tracking", flush=True)
            self.enabled = False

    @contextlib.contextmanager
    def pipeline(self, command: str, config_path: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        import mlflow

        mlflow.set_tracking_uri(self.cfg.tracking.tracking_uri)
        mlflow.set_experiment(self.cfg.tracking.experiment_name)
        tags = {
            "ift.version": launcher.__version__,
            "ift.command": command,
            "ift.config_path": config_path,
        }
        commit = _git_commit()
        if commit:
            tags["mlflow.source.git.commit"] = commit
        with mlflow.start_run(run_name=f"{self.cfg.experiment.name}-{command}", tags=tags) as run:
            self.parent_id = run.info.run_id
            mlflow.log_params(flatten(self.cfg))
            mlflow.log_text(to_yaml(self.cfg), "config.yaml")
            yield

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[Any]:
        if not self.enabled:
            yield None
            return
        import mlflow

        with mlflow.start_run(
            run_name=name,
            nested=True,
            tags={"ift.stage": name},
            log_system_metrics=self.cfg.tracking.system_metrics,
        ) as run:
            yield run

    def worker_target(self, run: Any) -> dict[str, Any] | None:
        """What rank 0 of training needs to log into this run."""
        if run is None:
            return None
        return {"tracking_uri": self.cfg.tracking.tracking_uri, "run_id": run.info.run_id}

    def log_prepare(self, run: Any, manifest: dict[str, Any], data_dir: str) -> None:
        if run is None:
            return
        import mlflow

        mlflow.set_tag("ift.data_fingerprint", manifest["fingerprint"])
        if self.parent_id:
            mlflow.MlflowClient().set_tag(
                self.parent_id, "ift.data_fingerprint", manifest["fingerprint"]
            )
        metrics = {"data/rejected": manifest["rejected"]}
        for split, info in manifest["splits"].items():
            metrics[f"data/{split}_rows"] = info["rows"]
            metrics[f"data/{split}_tokens"] = info.get("tokens", 0)
            if "packing_efficiency" in info:
                metrics[f"data/{split}_packing_efficiency"] = info["packing_efficiency"]
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
        mlflow.log_dict(manifest, "data/manifest.json")
        self.log_dataset(manifest, data_dir, "prepared")
        rejects = os.path.join(data_dir, "rejects.jsonl")
        if os.path.exists(rejects) and os.path.getsize(rejects):
            mlflow.log_artifact(rejects, "data")

    def log_dataset(self, manifest: dict[str, Any], data_dir: str, context: str) -> None:
        """`mlflow.log_input` of the prepared data, identified by its content fingerprint."""
        import mlflow
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset

        dataset = MetaDataset(  # type: ignore[abstract]
            source=resolve_dataset_source(data_dir),
            name="ift-prepared",
            digest=manifest["fingerprint"][:36],
        )
        mlflow.log_input(dataset, context=context)

    def log_model(self, cfg: Config) -> None:
        """The fine-tuned model (transformers flavor) on the active run, registered with an alias.

        A failure here is reported, not raised: the trained model is already safe on disk.
        """
        import mlflow

        name = cfg.tracking.registered_model_name
        name = cfg.experiment.name if name is None else name
        try:
            import torch
            import transformers

            # A pipeline object, not the folder path: MLflow 3's checkpoint-path route does
            # not understand transformers 5's task registry.
            pipe = transformers.pipeline("text-generation", model=cfg.model_dir)
            info = mlflow.transformers.log_model(  # type: ignore[attr-defined]
                transformers_model=pipe,
                name="model",
                pip_requirements=[
                    f"transformers=={transformers.__version__}",
                    f"torch=={torch.__version__.split('+')[0]}",
                ],
            )
            if name:
                version = mlflow.register_model(info.model_uri, name)
                mlflow.MlflowClient().set_registered_model_alias(
                    name, cfg.tracking.model_alias, version.version
                )
                print(
                    f"[mlflow] registered model {name!r} version {version.version} as "
                    f"@{cfg.tracking.model_alias}",
                    flush=True,
                )
        except Exception as e:  # noqa: BLE001
            print(f"[mlflow] could not log/register the model: {type(e).__name__}: {e}", flush=True)

    def log_train(
        self, run: Any, summary: dict[str, Any], cfg: Config, manifest: dict[str, Any] | None = None
    ) -> None:
        if run is None:
            return
        import mlflow

        if manifest is not None:
            self.log_dataset(manifest, cfg.data_dir, "training")
        if cfg.tracking.log_model and os.path.exists(os.path.join(cfg.model_dir, "config.json")):
            self.log_model(cfg)

        ds = os.path.join(cfg.experiment.output_dir, "deepspeed_config.json")
        if os.path.exists(ds):
            # The user's ds_config is merged in verbatim: monitor api keys must not leak.
            with open(ds) as f:
                mlflow.log_dict(redact_secrets(json.load(f)), "deepspeed_config.json")
        final = {
            k: float(v)
            for k, v in summary.items()
            if isinstance(v, int | float) and k.startswith(("val/", "train/steps", "train/tokens"))
        }
        if final:
            mlflow.log_metrics({f"final/{k}": v for k, v in final.items()})

    def log_eval(self, run: Any, out: dict[str, Any]) -> None:
        if run is None:
            return
        import mlflow

        mlflow.log_metrics({k: float(v) for k, v in out["metrics"].items()})
        mlflow.log_artifact(out["predictions"])
        mlflow.log_artifact(out["metrics_path"])
        # The predictions as an MLflow table: browsable and comparable across runs in the UI.
        with open(out["predictions"], encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        if rows:
            columns = {k: [str(r.get(k, "")) for r in rows] for k in rows[0]}
            mlflow.log_table(data=columns, artifact_file="predictions_table.json")

    def log_comparison(self, evals: dict[str, dict[str, float]]) -> None:
        """Base vs fine-tuned on the pipeline run itself, for one-glance comparison."""
        if not self.enabled or self.parent_id is None:
            return
        import mlflow

        client = mlflow.MlflowClient()
        for role, metrics in evals.items():
            for k, v in metrics.items():
                if not k.startswith("eval/"):
                    client.log_metric(self.parent_id, f"{role}/{k}", float(v))
        client.log_text(self.parent_id, json.dumps(evals, indent=2), "eval/comparison.json")
        # report.md and comparison.png, written by the eval job next to the role folders.
        eval_dir = os.path.join(self.cfg.experiment.output_dir, "eval")
        for name in ("report.md", "comparison.png"):
            if os.path.exists(os.path.join(eval_dir, name)):
                client.log_artifact(self.parent_id, os.path.join(eval_dir, name), "eval")


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=os.path.dirname(os.path.dirname(__file__)),
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None

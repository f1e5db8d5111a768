"""MLflow runs of a pipeline: one parent run per command, one child run per stage.

All logging to MLflow goes through here (driver side) or `training.mlflow_logger` (rank 0 of
training, given the train run's id). With `tracking.enabled: false` every method is a no-op.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import subprocess
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import launcher
from data_pipeline import storage
from launcher.config import Config, ConfigError, flatten, mask_text, redact_secrets, to_yaml

# Predictions shown as an MLflow table per eval run (the UI pages through a few hundred).
TABLE_ROWS = 1000


class RegistrationError(RuntimeError):
    """The fine-tuned model could not be logged or registered in MLflow."""

    user_facing = True


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
        if "mix" in manifest:  # weighted mixing: each source's train examples before and after
            params = {"data.mix.total": manifest["mix"]["total"]}
            for i, entry in enumerate(manifest["mix"]["sources"]):
                name = re.sub(r"[^\w\-. ]", "_", f"{i}_{entry['task']}")  # MLflow's key chars
                params[f"data.mix.{name}.weight"] = entry["weight"]
                params[f"data.mix.{name}.mixed"] = entry["mixed"]
                for key in ("kept", "mixed", "repeats"):
                    metrics[f"data/mix/{name}/{key}"] = entry[key]
            mlflow.log_params(params)
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
        mlflow.log_dict(manifest, "data/manifest.json")
        self.log_dataset(manifest, data_dir, "prepared")
        rejects = storage.join(data_dir, manifest.get("rejects", "rejects.jsonl"))
        with _local_copy(rejects) as local:
            if local and os.path.getsize(local):
                mlflow.log_artifact(local, "data")

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

        Raises:
            RegistrationError: Logging or registering failed (with MLflow's reason); the stage
                fails, since `models:/NAME@ALIAS` would silently be missing or stale. The
                trained model is safe on disk either way.
        """
        import mlflow

        name = cfg.tracking.registered_model_name
        name = cfg.experiment.name if name is None else name
        try:
            import torch
            import transformers

            # A pipeline object, not the folder path: MLflow 3's checkpoint-path route does
            # not understand transformers 5's task registry.
            model_dir = cfg.model_dir
            if storage.local_path(model_dir) is None:  # on an object store: a cached copy
                model_dir = storage.cached_copy(model_dir, required="config.json")
            pipe = transformers.pipeline("text-generation", model=model_dir)
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
        except Exception as e:  # noqa: BLE001 - MLflow raises many types; all mean "not registered"
            target = f" as {name!r}@{cfg.tracking.model_alias}" if name else ""
            raise RegistrationError(
                f"could not log/register the fine-tuned model{target} in MLflow at "
                f"{mask_text(cfg.tracking.tracking_uri)}: {type(e).__name__}: "
                f"{mask_text(str(e))}. The model is saved in "
                f"{cfg.model_dir}; fix the tracking server or set tracking.log_model=false "
                '(or tracking.registered_model_name="" to log without registering)'
            ) from e

    def log_train(
        self, run: Any, summary: dict[str, Any], cfg: Config, manifest: dict[str, Any] | None = None
    ) -> None:
        if run is None:
            return
        import mlflow

        if manifest is not None:
            self.log_dataset(manifest, cfg.data_dir, "training")
        if cfg.tracking.log_model and storage.exists(storage.join(cfg.model_dir, "config.json")):
            self.log_model(cfg)

        ds = storage.read_json(storage.join(cfg.experiment.output_dir, "deepspeed_config.json"))
        if ds is not None:
            # The user's ds_config is merged in verbatim: monitor api keys must not leak.
            mlflow.log_dict(redact_secrets(ds), "deepspeed_config.json")
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
        # The first TABLE_ROWS predictions as an MLflow table, browsable and comparable across
        # runs in the UI; all of them are in the artifact above. Read line by line: a test
        # split of millions must not sit in the driver's memory.
        with open(out["predictions"], encoding="utf-8") as f:
            rows = [json.loads(line) for line in itertools.islice(filter(str.strip, f), TABLE_ROWS)]
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
        eval_dir = storage.join(self.cfg.experiment.output_dir, "eval")
        for name in ("report.md", "comparison.png"):
            with _local_copy(storage.join(eval_dir, name)) as local:
                if local:
                    client.log_artifact(self.parent_id, local, "eval")


@contextlib.contextmanager
def _local_copy(path: str) -> Iterator[str | None]:
    """A local file with the content of `path` (downloaded from an object store into a
    temporary folder, with its name), or None when there is no such file."""
    local = storage.local_path(path)
    if local is not None:
        yield local if os.path.isfile(local) else None
        return
    if not storage.exists(path):
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="ift-artifact-") as tmp:
        name = os.path.join(tmp, os.path.basename(path.partition("?")[0]))
        with open(name, "wb") as f:
            f.write(storage.read_bytes(path))
        yield name


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

"""Tracker.log_eval on a big test split: a bounded table, the whole file as an artifact, and
the driver's memory independent of the number of predictions.

A real MLflow store (SQLite in tmp_path) and a real predictions file of 100k rows (the eval
job's format: one JSON object per line).
"""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from launcher import tracking
from launcher.config import Config

ROWS = 100_000


@pytest.fixture(autouse=True)
def _restore_tracking_uri() -> Iterator[None]:
    import mlflow

    previous = mlflow.get_tracking_uri()
    yield
    mlflow.set_tracking_uri(previous)


def _cfg(uri: str) -> Config:
    return Config.model_validate(
        {
            "model": {"name_or_path": "m"},
            "data": {"sources": [{"path": "d.jsonl", "template": "alpaca"}]},
            "tracking": {"tracking_uri": uri},
        }
    )


def test_log_eval_streams_the_predictions(tmp_path: Path) -> None:
    import mlflow

    preds = tmp_path / "predictions.jsonl"
    with preds.open("w", encoding="utf-8") as f:
        for i in range(ROWS):
            row = {"id": f"sst2-{i}", "task": "sst2", "prompt": "Review: " + "word " * 20}
            f.write(json.dumps({**row, "prediction": "positive", "reference": "negative"}) + "\n")
    metrics = tmp_path / "metrics.json"
    metrics.write_text("{}")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = _cfg(uri)
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.MlflowClient(uri).create_experiment("t")  # not another test's active one
    with mlflow.start_run(experiment_id=experiment) as run:
        tracemalloc.start()
        try:
            tracking.Tracker(cfg).log_eval(
                run, {"metrics": {"sst2/accuracy": 0.5}, "predictions": str(preds),
                      "metrics_path": str(metrics)}
            )  # fmt: skip
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    # The file is ~14 MB; parsed into Python rows and columns it was over 100 MB at this size.
    assert peak < 8 << 20, peak
    client = mlflow.MlflowClient(uri)
    table = client.download_artifacts(run.info.run_id, "predictions_table.json", str(tmp_path))
    content = json.loads(Path(table).read_text())
    ids = [row[content["columns"].index("id")] for row in content["data"]]
    assert ids == [f"sst2-{i}" for i in range(tracking.TABLE_ROWS)]
    local = client.download_artifacts(run.info.run_id, "predictions.jsonl", str(tmp_path / "dl"))
    assert Path(local).read_bytes() == preds.read_bytes()


@pytest.mark.parametrize("lines", [[], ["\n"]])
def test_log_eval_of_no_predictions_logs_no_table(tmp_path: Path, lines: list[str]) -> None:
    import mlflow

    preds = tmp_path / "predictions.jsonl"
    preds.write_text("".join(lines))
    (tmp_path / "metrics.json").write_text("{}")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = _cfg(uri)
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.MlflowClient(uri).create_experiment("t")  # not another test's active one
    with mlflow.start_run(experiment_id=experiment) as run:
        tracking.Tracker(cfg).log_eval(
            run, {"metrics": {}, "predictions": str(preds),
                  "metrics_path": str(tmp_path / "metrics.json")}
        )  # fmt: skip
    names = {a.path for a in mlflow.MlflowClient(uri).list_artifacts(run.info.run_id)}
    assert "predictions_table.json" not in names and "predictions.jsonl" in names

"""Every task recipe in configs/tasks/ runs end to end and reports its task's metrics.

Slow (run by `make test-reliability`): the real CLI in a subprocess (`python -m launcher run`),
real local Ray, DeepSpeed and MLflow (SQLite), the real stories260K, the recipe's own data. Each
recipe runs as written (its epochs and test records: the README's scores are this test's), with
its outputs and MLflow store moved to a temporary folder; each takes a few minutes on 2 CPU
cores. The test checks that eval scored every task of the recipe with its
metrics for the base and the fine-tuned model, and, on the classification recipes, that
fine-tuning beats the base model: the base never answers with a label, so anything less means
the recipe no longer teaches the task.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from eval.metrics import ROUGE_KEYS, default_metrics
from launcher.config import load_config

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "configs" / "tasks").glob("*.yaml"))
# Recipes whose fine-tuned model must beat the base on every accuracy it reports.
CLASSIFICATION = {"sst2", "amazon_reviews"}
# Keys a metric writes into metrics.json (eval/metrics.py's table).
REPORTED = {"rouge": ROUGE_KEYS, "entity_f1": ("entity_f1", "entity_precision", "entity_recall")}

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_every_recipe_names_its_command() -> None:
    assert RECIPES, "configs/tasks/ holds no recipe"
    for path in RECIPES:
        first = path.read_text().splitlines()[0]
        assert first == f"# ift run configs/tasks/{path.name}", path.name


def expected_metrics(config: Path) -> dict[str, list[str]]:
    """Task -> metric names, for every source of the recipe that has test records."""
    cfg = load_config(config)
    hashed_test = cfg.data.split.get("test", 0.0) > 0
    out: dict[str, list[str]] = {}
    for src in cfg.data.sources:
        if src.split == "test" or (src.split is None and hashed_test):
            template = src.template if isinstance(src.template, str) else "custom"
            out[src.task_name] = list(src.metrics or default_metrics(template))
    return out


@pytest.mark.parametrize("config", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_runs_end_to_end(
    config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Data paths in the recipes are relative to the repository root: run (and load) from there.
    monkeypatch.chdir(ROOT)
    out = tmp_path / "runs"
    overrides = [
        f"experiment.output_dir={out}",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "launcher", "run", str(config.relative_to(ROOT)), *overrides],
        cwd=ROOT,
        text=True,
        capture_output=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    tasks = expected_metrics(config)
    assert tasks, f"{config.name} evaluates no task"
    scores = {}
    for role in ("base", "finetuned"):
        written = json.loads((out / "eval" / role / "metrics.json").read_text())
        assert written["tasks"] == tasks
        for task, names in tasks.items():
            for name in names:
                for key in REPORTED.get(name, (name,)):
                    value = written["metrics"][f"{task}/{key}"]
                    assert math.isfinite(value) and 0.0 <= value <= 100.0, (role, task, key)
        predictions = (out / "eval" / role / "predictions.jsonl").read_text().splitlines()
        assert {json.loads(line)["task"] for line in predictions} == set(tasks)
        scores[role] = written["metrics"]

    if config.stem in CLASSIFICATION:
        accuracies = [k for k in scores["base"] if k.endswith("/accuracy")]
        assert accuracies
        for key in accuracies:
            assert scores["finetuned"][key] > scores["base"][key], (key, scores)

"""The eval job on real Ray Data actors with the real stories260K: reproducibility, actor-count
invariance, output integrity, the report and its MLflow logging. Nothing is mocked.

A copy of the base model stands in for the fine-tuned `model/`, so the comparison has two
roles without running training here (tests/integration/test_cli_pipeline.py covers that).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from eval import metrics as M
from eval.evaluate import evaluate
from launcher.config import Config, from_dict, resolve_paths
from tests.integration.test_prepare_s3 import BUCKET as S3_BUCKET
from tests.integration.test_prepare_s3 import s3  # noqa: F401 - the moto fixture, by name

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "tests" / "assets"
MODEL = ASSETS / "models" / "stories260K"

pytestmark = pytest.mark.integration


def eval_config(out: Path) -> dict[str, Any]:
    return {
        "experiment": {"name": "evaltest", "output_dir": str(out / "runs"), "seed": 0},
        "model": {"name_or_path": str(MODEL)},
        "data": {
            "sources": [
                {
                    "path": str(ASSETS / "data" / "sst2" / "train.tsv"),
                    "template": "sst2",
                    "max_records": 120,
                },
                {
                    "path": str(ASSETS / "data" / "wmt21" / "newstest2021.de-en.jsonl"),
                    "template": "wmt",
                    "params": {"source_lang": "de", "target_lang": "en"},
                    "max_records": 40,
                },
            ],
            "split": {"train": 0.7, "validation": 0.1, "test": 0.2},
            "max_seq_len": 128,
            "truncation": "left",
            "num_workers": 1,
        },
        # Small batches so that two actors both get work; few new tokens to stay fast.
        "eval": {"max_new_tokens": 8, "batch_size": 8},
        "tracking": {
            "tracking_uri": f"sqlite:///{out / 'mlflow.db'}",
            "experiment_name": "evaltest",
        },
    }


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    import ray

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    # address="local": never join a cluster someone else started on this machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def prepared(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, dict]:
    from data_pipeline.prepare import prepare

    out = tmp_path_factory.mktemp("eval")
    cfg = resolve_paths(from_dict(eval_config(out)))
    manifest = prepare(cfg, log=lambda _: None)
    assert manifest["splits"]["test"]["rows"] >= 20
    return cfg, manifest


def run_eval(
    prepared: tuple[Config, dict],
    out: Path,
    role: str = "base",
    bootstrap: int = 0,
    **eval_fields: Any,
) -> dict[str, Any]:
    """Evaluate `role` into a fresh output dir (same prepared data), with eval overrides."""
    cfg, manifest = prepared
    cfg = cfg.model_copy(deep=True)
    cfg.experiment.output_dir = str(out)
    for k, v in eval_fields.items():
        setattr(cfg.eval, k, v)
    return evaluate(cfg, manifest, role, log=lambda _: None, bootstrap=bootstrap)


def records(result: dict[str, Any]) -> list[dict[str, Any]]:
    with open(result["predictions"], encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def predictions(result: dict[str, Any]) -> dict[str, str]:
    return {r["id"]: r["prediction"] for r in records(result)}


@pytest.fixture(scope="module")
def greedy(prepared: tuple[Config, dict], tmp_path_factory: pytest.TempPathFactory) -> dict:
    return run_eval(prepared, tmp_path_factory.mktemp("greedy"), num_workers=1)


def test_greedy_is_reproducible(prepared, greedy, tmp_path: Path) -> None:
    again = run_eval(prepared, tmp_path, num_workers=1)
    assert predictions(again) == predictions(greedy)


def test_one_and_two_actors_give_identical_predictions(prepared, greedy, tmp_path: Path) -> None:
    two = run_eval(prepared, tmp_path, num_workers=2)
    assert predictions(two) == predictions(greedy)


def test_sampling_is_reproducible_under_a_seed(prepared, greedy, tmp_path: Path) -> None:
    first = run_eval(prepared, tmp_path / "a", temperature=1.0, top_p=0.95, seed=3)
    second = run_eval(prepared, tmp_path / "b", temperature=1.0, top_p=0.95, seed=3)
    assert predictions(first) == predictions(second)
    # Sampling really happened: it moves away from greedy decoding on this many prompts.
    assert predictions(first) != predictions(greedy)


def test_sampling_does_not_depend_on_the_actor_count(prepared, tmp_path: Path) -> None:
    one = run_eval(prepared, tmp_path / "a", temperature=1.0, seed=5, num_workers=1)
    two = run_eval(prepared, tmp_path / "b", temperature=1.0, seed=5, num_workers=2)
    assert predictions(one) == predictions(two)


def test_predictions_cover_the_test_split_once(prepared, greedy) -> None:
    import pyarrow.parquet as pq

    cfg, manifest = prepared
    test_ids = []
    for f in manifest["splits"]["test"]["files"]:
        test_ids += pq.read_table(os.path.join(cfg.data_dir, f), columns=["id"])["id"].to_pylist()
    ids = [r["id"] for r in records(greedy)]
    assert len(ids) == len(set(ids)) == manifest["splits"]["test"]["rows"]
    assert sorted(ids) == sorted(test_ids)
    assert all(
        set(r) == {"id", "task", "prompt", "prediction", "reference"} for r in records(greedy)
    )


def test_metrics_json_equals_a_recomputation_from_predictions(greedy) -> None:
    data = json.loads(Path(greedy["metrics_path"]).read_text())
    rows = records(greedy)
    assert data["tasks"] == {"sst2": ["accuracy"], "wmt": ["bleu", "chrf"]}
    expected: dict[str, float] = {}
    for task, names in data["tasks"].items():
        mine = [r for r in rows if r["task"] == task]
        scores = M.compute_metrics(
            names, [r["prediction"] for r in mine], [[r["reference"]] for r in mine]
        )
        expected.update({f"{task}/{k}": v for k, v in scores.items()})
    task_metrics = {k: v for k, v in data["metrics"].items() if not k.startswith("eval/")}
    assert task_metrics == expected  # exact: same metric code on the same strings


def test_report_bootstrap_and_mlflow_logging(prepared, tmp_path: Path) -> None:
    import mlflow

    from launcher.tracking import Tracker

    cfg, manifest = prepared
    cfg = cfg.model_copy(deep=True)
    cfg.experiment.output_dir = str(tmp_path / "runs")
    cfg.tracking.tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    shutil.copytree(MODEL, cfg.model_dir)  # the stand-in fine-tuned model
    tracker = Tracker(cfg)
    evals = {}
    with tracker.pipeline("eval", ""):
        for role in ("base", "finetuned"):
            with tracker.stage(f"eval-{role}") as run:
                out = evaluate(cfg, manifest, role, log=lambda _: None, bootstrap=200)
                tracker.log_eval(run, out)
                evals[role] = out["metrics"]
                child_id = run.info.run_id
        tracker.log_comparison(evals)

    eval_dir = Path(cfg.experiment.output_dir) / "eval"
    assert out["report"] == str(eval_dir / "report.md")
    text = (eval_dir / "report.md").read_text()
    # Same weights in both roles: same predictions, so the paired delta interval is exactly 0.
    assert "| sst2/accuracy |" in text and "| +0.00 [+0.00, +0.00] |" in text
    assert "200 resamples" in text
    assert (eval_dir / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    low, high = out["intervals"]["sst2/accuracy"]
    assert low <= out["metrics"]["sst2/accuracy"] <= high

    client = mlflow.MlflowClient(cfg.tracking.tracking_uri)
    parent = {a.path for a in client.list_artifacts(tracker.parent_id, "eval")}
    assert {"eval/report.md", "eval/comparison.png"} <= parent
    assert "predictions_table.json" in {a.path for a in client.list_artifacts(child_id)}
    table = mlflow.load_table("predictions_table.json", run_ids=[child_id])
    assert sorted(table["id"]) == sorted(r["id"] for r in records(out))


# --- k-shot base (role base_fewshot) ----------------------------------------------------------


def exemplar_pools(cfg: Config) -> dict[str, list[dict[str, str]]]:
    """The exemplar files prepare wrote, read here without eval's code."""
    pools = {}
    for path in sorted((Path(cfg.data_dir) / "exemplars").glob("*.jsonl")):
        pools[path.stem] = [json.loads(line) for line in path.read_text().splitlines() if line]
    return pools


def split_exemplars(prompt: str, record_prompt: str, pool: list[dict[str, str]]) -> list[dict]:
    """The exemplars in front of `record_prompt` in a k-shot prompt, in order; fails on any text
    that is not a whole exemplar block."""
    assert prompt.endswith(record_prompt)
    head = prompt[: len(prompt) - len(record_prompt)]
    found = []
    while head:
        match = [e for e in pool if head.startswith(e["prompt"] + e["completion"] + "\n\n")]
        assert match, f"not an exemplar block: {head[:80]!r}"
        found.append(match[0])
        head = head[len(match[0]["prompt"] + match[0]["completion"]) + 2 :]
    return found


@pytest.fixture(scope="module")
def fewshot_run(prepared, greedy, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return run_eval(
        prepared,
        tmp_path_factory.mktemp("fewshot"),
        role="base_fewshot",
        few_shot=2,
        max_prompt_len=400,
        models=["base", "base_fewshot"],
    )


def test_fewshot_prompts_hold_exemplars_of_the_task(prepared, greedy, fewshot_run) -> None:
    cfg, manifest = prepared
    pools = exemplar_pools(cfg)
    assert set(pools) == {"sst2", "wmt"} and all(len(p) >= 2 for p in pools.values())
    zero_shot = {r["id"]: r for r in records(greedy)}
    rows = records(fewshot_run)
    # Every test record predicted exactly once, with the zero-shot prompt at the end.
    assert sorted(r["id"] for r in rows) == sorted(zero_shot)
    assert len(rows) == manifest["splits"]["test"]["rows"]
    kept = []
    for r in rows:
        shots = split_exemplars(r["prompt"], zero_shot[r["id"]]["prompt"], pools[r["task"]])
        assert len(shots) <= 2
        # Never the test record itself, neither its prompt nor its prompt + answer.
        assert all(e["prompt"] != zero_shot[r["id"]]["prompt"] for e in shots)
        kept.append(len(shots))
    # Short sst2 prompts keep both exemplars; exemplars are dropped only for length.
    assert all(n == 2 for n, r in zip(kept, rows, strict=True) if r["task"] == "sst2")
    assert sum(kept) > len(rows)
    # The exemplars reached the model: some predictions change against zero-shot.
    changed = sum(r["prediction"] != zero_shot[r["id"]]["prediction"] for r in rows)
    assert changed > 0
    data = json.loads(Path(fewshot_run["metrics_path"]).read_text())
    assert data["role"] == "base_fewshot" and data["few_shot"] == 2


def test_fewshot_rerun_is_identical_and_reported(prepared, fewshot_run, tmp_path: Path) -> None:
    again = run_eval(
        prepared,
        tmp_path,
        role="base_fewshot",
        few_shot=2,
        max_prompt_len=400,
        num_workers=2,
        models=["base", "base_fewshot"],
    )
    assert records(again) == records(fewshot_run)  # prompts and predictions, two actors
    # The zero-shot base under the same settings: the report now has both base columns.
    base = run_eval(prepared, tmp_path, role="base", few_shot=2, max_prompt_len=400)
    text = Path(base["report"]).read_text()
    assert "| metric | base | base k-shot | fine-tuned | delta |" in text


def test_fewshot_cache_key_covers_k_and_the_exemplars(prepared, fewshot_run) -> None:
    from eval.evaluate import _eval_hash

    cfg, manifest = prepared
    cfg = cfg.model_copy(deep=True)
    pools = exemplar_pools(cfg)
    key = _eval_hash(cfg, manifest, str(MODEL), pools)
    cfg.eval.few_shot = 3
    assert _eval_hash(cfg, manifest, str(MODEL), pools) != key
    cfg.eval.few_shot = 2
    other = {t: list(reversed(p)) for t, p in pools.items()}
    assert _eval_hash(cfg, manifest, str(MODEL), other) != key
    # Zero-shot base does not depend on either.
    assert _eval_hash(cfg, manifest, str(MODEL)) == _eval_hash(
        cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"few_shot": 5})}),
        manifest,
        str(MODEL),
    )


# --- fine-tuned model from the MLflow Model Registry ------------------------------------------


def test_finetuned_model_from_an_mlflow_uri(prepared, tmp_path: Path) -> None:
    import mlflow
    import transformers

    from eval.evaluate import EvalError, _model_for_actors, eval_root, local_model, model_path_for

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # Logged and registered the way launcher/tracking.py does it after training.
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("uri-test")
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(experiment_id=exp) as run:
        pipe = transformers.pipeline("text-generation", model=str(MODEL))
        info = mlflow.transformers.log_model(
            transformers_model=pipe, name="model", pip_requirements=["transformers"]
        )
    version = mlflow.register_model(info.model_uri, "stories")
    client.set_registered_model_alias("stories", "candidate", version.version)

    def finetuned(out: Path, model: str) -> dict[str, Any]:
        cfg, manifest = prepared
        cfg = cfg.model_copy(deep=True)
        cfg.experiment.output_dir = str(out)
        cfg.tracking.tracking_uri = uri
        cfg.eval.finetuned_model = model
        lines: list[str] = []
        result = evaluate(cfg, manifest, "finetuned", log=lines.append)
        return {**result, "cfg": cfg, "log": lines}

    folder = finetuned(tmp_path / "folder", str(MODEL))
    by_alias = finetuned(tmp_path / "alias", "models:/stories@candidate")
    by_run = finetuned(tmp_path / "run", f"runs:/{run.info.run_id}/model")
    assert predictions(by_alias) == predictions(folder)
    assert predictions(by_run) == predictions(folder)
    assert json.loads(Path(by_alias["metrics_path"]).read_text())["model"].startswith(
        "models:/stories@candidate ("
    )
    # Downloaded once, atomically: one complete cache entry, found again without a download.
    cache = tmp_path / "alias" / "eval" / "mlflow-models"
    assert [p.name for p in cache.iterdir() if not p.name.startswith(".")] == [
        p.name for p in cache.iterdir()
    ]
    assert len(list(cache.iterdir())) == 1
    assert sum("downloading" in line for line in by_alias["log"]) == 1
    again: list[str] = []
    path = model_path_for(by_alias["cfg"], "finetuned", log=again.append)
    assert path.startswith(str(cache)) and again == []
    # With the output folder on S3 the driver's download sits in a local mirror no other node
    # sees: actors get the version the driver resolved, and download it on their own node.
    cfg_s3 = by_alias["cfg"].model_copy(deep=True)
    cfg_s3.experiment.output_dir = "s3://no-bucket/exp"
    source = _model_for_actors(cfg_s3, "finetuned", path)
    assert source == {
        "mlflow": f"models:/stories/{version.version}",
        "tracking_uri": uri,
        "cache": os.path.join(eval_root(cfg_s3), "mlflow-models"),
    }
    node_copy = local_model({**source, "cache": str(tmp_path / "node-cache")})
    assert node_copy.startswith(str(tmp_path / "node-cache"))
    assert (Path(node_copy) / "config.json").read_bytes() == (
        Path(path) / "config.json"
    ).read_bytes()
    assert _model_for_actors(by_alias["cfg"], "finetuned", path) == path  # output folder shared

    for bad in ("models:/stories@no-such-alias", "models:/missing/1", "models:/stories"):
        with pytest.raises(EvalError, match="eval.finetuned_model"):
            finetuned(tmp_path / "bad", bad)


# --- the cache key and model registration ------------------------------------------------------


def test_cache_key_covers_what_changes_predictions(prepared) -> None:
    """dtype (a bf16 rerun once reused fp32 predictions), attention kernel, device, the
    generation settings and the ROUGE option change the key; the actor count does not."""
    from eval.evaluate import _eval_hash

    cfg, manifest = prepared
    key = _eval_hash(cfg, manifest, str(MODEL))
    changes = {
        "model": {"dtype": "bfloat16", "attn_implementation": "eager", "trust_remote_code": True},
        "train": {"use_gpu": True},
        "eval": {
            "max_new_tokens": 9,
            "batch_size": 4,
            "stop": ["."],
            "temperature": 0.5,
            "seed": 1,
            "max_prompt_len": 64,
            "rouge_split_sentences": True,
            "bleu_tokenize": "intl",
        },
    }
    for section, fields in changes.items():
        for field, value in fields.items():
            other = cfg.model_copy(deep=True)
            setattr(getattr(other, section), field, value)
            assert _eval_hash(other, manifest, str(MODEL)) != key, (section, field)
    same = cfg.model_copy(deep=True)
    same.eval.num_workers = 3
    same.eval.bootstrap = 100
    assert _eval_hash(same, manifest, str(MODEL)) == key


def test_failed_registration_fails_the_stage(tmp_path: Path) -> None:
    """A model that cannot be registered fails the train stage with MLflow's reason, instead
    of leaving `models:/NAME@candidate` silently missing."""
    import mlflow

    from launcher.tracking import RegistrationError, Tracker

    cfg = resolve_paths(from_dict(eval_config(tmp_path)))
    cfg.tracking.registered_model_name = "bad/name"  # MLflow refuses '/' in model names
    shutil.copytree(MODEL, cfg.model_dir)
    tracker = Tracker(cfg)
    with (
        pytest.raises(RegistrationError, match="cannot contain '/'") as err,
        tracker.pipeline("train", ""),
        tracker.stage("train") as run,
    ):
        tracker.log_train(run, {}, cfg)
    assert "bad/name" in str(err.value) and str(cfg.model_dir) in str(err.value)
    client = mlflow.MlflowClient(cfg.tracking.tracking_uri)
    assert client.get_run(run.info.run_id).info.status == "FAILED"


# --- output folder on S3, actors off the driver's node (last: replaces the module's Ray) ---


@pytest.mark.usefixtures("s3")
def test_outputs_on_s3_eval_runs_on_a_node_other_than_the_drivers(
    prepared, greedy, tmp_path: Path
) -> None:
    """With the output folder on S3 (a real moto server) the driver works in a local mirror,
    and keeps its copy of a fine-tuned model on S3 in a cache, that other nodes cannot see.
    Here the driver's node (the head) has no CPU for an actor, as a KubeRay head has no GPU, so
    every actor runs on the other node: it reads its prompts through Ray's object store and
    copies the model into its own node's cache (its own TMPDIR here). The predictions on S3
    equal the local run's. Pinning the actors to the driver's node (as before) never schedules
    them: Ray refuses the actors as infeasible.
    """
    import threading

    import ray
    from ray.cluster_utils import Cluster

    from data_pipeline import storage

    cfg, manifest = prepared
    cfg = cfg.model_copy(deep=True)
    cfg.experiment.output_dir = f"s3://{S3_BUCKET}/eval-on-nodes"
    cfg.eval.num_workers = 2
    for f in MODEL.iterdir():  # the stand-in fine-tuned model, on S3
        storage.put_file(str(f), f"{cfg.model_dir}/{f.name}")
    node_tmp = tmp_path / "node2-tmp"
    node_tmp.mkdir()
    ray.shutdown()
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False}
    )
    results: dict[str, Any] = {}
    try:
        cluster.add_node(num_cpus=2, env_vars={"TMPDIR": str(node_tmp)})
        ray.init(address=cluster.address, logging_level="ERROR")
        cluster.wait_for_nodes()

        def run() -> None:
            try:
                for role in ("base", "finetuned"):
                    results[role] = evaluate(cfg, manifest, role, log=lambda _: None)
            except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
                results["error"] = e

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        thread.join(timeout=300)
        assert not thread.is_alive(), "eval did not finish in 300 s"
        if "error" in results:
            raise results["error"]
    finally:
        ray.shutdown()
        cluster.shutdown()
    os.environ.pop("RAY_ADDRESS", None)
    for role in ("base", "finetuned"):
        remote = f"{cfg.experiment.output_dir}/eval/{role}/predictions.jsonl"
        lines = storage.read_bytes(remote).decode().splitlines()
        got = {json.loads(line)["id"]: json.loads(line)["prediction"] for line in lines}
        assert got == predictions(greedy), role
    # The actors' node made its own copy of the model.
    assert list((node_tmp / "ift-cache").glob("*/config.json"))

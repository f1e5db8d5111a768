"""The eval job: generate on the held-out test split with a Ray Data actor pool, then score.

    ift eval configs/quickstart.yaml eval.models=[finetuned]

Reads top to bottom: `evaluate()` is the driver for one model role (`base` or `finetuned`);
`Generator` is the actor (one model replica each); helpers follow. Prompts are the token ids the
prepare job rendered with the training template, so base and fine-tuned see exactly the prompts
training used. Batches are planned on the driver (by prompt length) and each carries its own
seed, so predictions do not depend on the number of actors.

Outputs: `<output_dir>/eval/<role>/predictions.jsonl` and `metrics.json`, written atomically,
then `<output_dir>/eval/report.md` and `comparison.png` (`eval.report`) over every role whose
outputs are current. Metric names are `<task>/<metric>` (e.g. `sst2/accuracy`, `wmt/bleu`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from typing import Any

import pyarrow.parquet as pq

from eval import metrics as M
from eval.generate import generate, plan_batches
from eval.report import bootstrap_by_task, intervals_of, read_predictions, write_report

ROLES = ("base", "finetuned")
CONFIDENCE = 0.95


class EvalError(RuntimeError):
    user_facing = True


def evaluate(
    cfg: Any,
    manifest: dict[str, Any],
    role: str,
    log: Callable[[str], None] = print,
    bootstrap: int | None = None,
) -> dict[str, Any]:
    """Generates and scores one model role on the test split, then rewrites the report.

    Args:
        cfg: The resolved config.
        manifest: The prepared data's manifest.
        role: `base` or `finetuned`.
        log: Progress lines go here.
        bootstrap: Bootstrap resamples for confidence intervals (0: none); None reads
            `eval.bootstrap` when the config has that field, else 0.

    Returns:
        {"metrics", "intervals", "predictions", "metrics_path", "report", "chart"}: scores,
        `<key>: (low, high)` (empty without bootstrap) and the paths written.
    """
    import ray

    if bootstrap is None:
        # EvalConfig has no `bootstrap` field yet (owned elsewhere); read it once it exists.
        bootstrap = int(getattr(cfg.eval, "bootstrap", 0) or 0)
    model_path = model_path_for(cfg, role)
    eval_dir = os.path.join(cfg.experiment.output_dir, "eval")
    out_dir = os.path.join(eval_dir, role)
    test = read_test_split(cfg.data_dir, manifest)
    if not test["id"]:
        raise EvalError(
            "the test split is empty: set data.split with a test ratio or pin a "
            "source with `split: test`"
        )
    key = _eval_hash(cfg, manifest, model_path)
    pred_path = os.path.join(out_dir, "predictions.jsonl")
    metrics_path = os.path.join(out_dir, "metrics.json")
    cached = _cached(out_dir, key)
    if cached is not None:
        log(f"[eval {role}] reusing {out_dir}: same model, data and settings")
        boot = _boot_settings(bootstrap, cfg.eval.seed)
        if cached.get("bootstrap") != boot:
            # Intervals are a function of the predictions: add them without generating again.
            cached["bootstrap"] = boot
            cached["intervals"] = _intervals(
                cached["tasks"], read_predictions(pred_path), boot, cfg.eval.bleu_tokenize
            )
            _write_atomic(metrics_path, json.dumps(cached, indent=2))
        return {
            "metrics": cached["metrics"],
            "intervals": cached["intervals"],
            "predictions": pred_path,
            "metrics_path": metrics_path,
            **write_report(eval_dir, current_roles(cfg, manifest), cfg.eval.bleu_tokenize),
        }

    e = cfg.eval
    max_prompt = e.max_prompt_len or manifest["max_seq_len"]
    prompts = [p[-max_prompt:] for p in test["prompt_ids"]]
    batches = plan_batches([len(p) for p in prompts], e.batch_size)
    items = [
        {"batch": i, "index": b, "prompt_ids": [prompts[j] for j in b]}
        for i, b in enumerate(batches)
    ]
    n_actors = max(1, min(e.num_workers, len(items)))
    total_cpus = max(1.0, float(ray.cluster_resources().get("CPU", 1)))
    cpus = e.cpus_per_worker if cfg.train.use_gpu else min(e.cpus_per_worker, total_cpus / n_actors)
    log(
        f"[eval {role}] {len(prompts)} prompts in {len(items)} batches on {n_actors} actor(s), "
        f"model {model_path}"
    )
    t0 = time.perf_counter()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ds = ray.data.from_items(items, override_num_blocks=min(len(items), 4 * n_actors)).map_batches(
        Generator,
        fn_constructor_kwargs={
            "model_path": model_path,
            "eval_cfg": e.model_dump(),
            "dtype": cfg.model.dtype,
            "use_gpu": cfg.train.use_gpu,
            "cpus": cpus,
            "trust_remote_code": cfg.model.trust_remote_code,
        },
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=n_actors),
        num_cpus=cpus,
        num_gpus=1 if cfg.train.use_gpu else 0,
    )
    predictions: list[str | None] = [None] * len(prompts)
    new_tokens = 0
    for row in ds.iter_rows():
        for j, text in zip(row["index"], row["predictions"], strict=True):
            predictions[int(j)] = str(text)
        new_tokens += int(row["new_tokens"])
    seconds = time.perf_counter() - t0
    assert all(p is not None for p in predictions), "an eval batch came back empty"
    preds = [str(p) for p in predictions]

    tasks = task_metrics(manifest, test["task"])
    scores = score_by_task(manifest, test, preds, bleu_tokenize=e.bleu_tokenize)
    scores["eval/examples_per_s"] = len(preds) / seconds
    scores["eval/new_tokens_per_s"] = new_tokens / seconds
    records = [
        {
            "id": test["id"][i],
            "task": test["task"][i],
            "prompt": test["prompt"][i],
            "prediction": preds[i],
            "reference": test["reference"][i],
        }
        for i in range(len(preds))
    ]
    boot = _boot_settings(bootstrap, e.seed)
    intervals = _intervals(tasks, records, boot, e.bleu_tokenize)
    os.makedirs(out_dir, exist_ok=True)
    _write_atomic(pred_path, "".join(json.dumps(r) + "\n" for r in records))
    _write_atomic(
        metrics_path,
        json.dumps(
            {
                "eval_hash": key,
                "role": role,
                "model": model_path,
                "metrics": scores,
                "tasks": tasks,
                "bootstrap": boot,
                "intervals": intervals,
            },
            indent=2,
        ),
    )
    log(
        f"[eval {role}] {len(preds)} predictions in {seconds:.1f}s: "
        + ", ".join(f"{k} {v:.2f}" for k, v in scores.items() if not k.startswith("eval/"))
    )
    return {
        "metrics": scores,
        "intervals": intervals,
        "predictions": pred_path,
        "metrics_path": metrics_path,
        **write_report(eval_dir, current_roles(cfg, manifest), e.bleu_tokenize),
    }


class Generator:
    """Ray Data actor: one model replica; generates for one planned batch per call."""

    def __init__(
        self,
        model_path: str,
        eval_cfg: dict[str, Any],
        dtype: str,
        use_gpu: bool,
        cpus: float,
        trust_remote_code: bool = False,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not use_gpu:
            torch.set_num_threads(max(1, int(cpus)))
        self.cfg = eval_cfg
        self.tok = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        torch_dtype = {
            "float32": torch.float32,
            "bfloat16": torch.bfloat16,
            "float16": torch.float16,
        }[dtype]
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=torch_dtype, trust_remote_code=trust_remote_code
        )
        self.model.eval()
        if use_gpu:
            self.model.to("cuda")  # type: ignore[arg-type]

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        c = self.cfg
        out: dict[str, list[Any]] = {"index": [], "predictions": [], "new_tokens": []}
        for b, index, prompt_ids in zip(
            batch["batch"], batch["index"], batch["prompt_ids"], strict=True
        ):
            prompts = [[int(x) for x in p] for p in prompt_ids]
            texts = generate(
                self.model,
                self.tok,
                prompts,
                max_new_tokens=c["max_new_tokens"],
                temperature=c["temperature"],
                top_p=c["top_p"],
                num_beams=c["num_beams"],
                stop=c["stop"],
                seed=c["seed"] + int(b),
            )
            out["index"].append([int(i) for i in index])
            out["predictions"].append(texts)
            out["new_tokens"].append(
                sum(len(self.tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
            )
        return out


def task_metrics(manifest: dict[str, Any], task_of: list[str]) -> dict[str, list[str]]:
    """Metric names of each task present in the test split (the source's `metrics`, else the
    template's defaults), in manifest order."""
    present = set(task_of)
    out: dict[str, list[str]] = {}
    for spec in manifest["templates"]:
        if spec["task"] in present:
            template = spec["template"] if isinstance(spec["template"], str) else "custom"
            out[spec["task"]] = list(spec.get("metrics") or M.default_metrics(template))
    return out


def score_by_task(
    manifest: dict[str, Any],
    test: dict[str, list[Any]],
    preds: list[str],
    bleu_tokenize: str = "13a",
) -> dict[str, float]:
    """Metrics per task (the source's `metrics`, else the template's defaults)."""
    scores: dict[str, float] = {}
    for task, names in task_metrics(manifest, test["task"]).items():
        idx = [i for i, t in enumerate(test["task"]) if t == task]
        result = M.compute_metrics(
            names,
            [preds[i] for i in idx],
            [[test["reference"][i]] for i in idx],
            options={"bleu_tokenize": bleu_tokenize},
        )
        scores.update({f"{task}/{k}": float(v) for k, v in result.items()})
    return scores


def current_roles(cfg: Any, manifest: dict[str, Any]) -> list[str]:
    """Roles whose outputs on disk match the current model, data and eval settings, so the
    report never mixes in a stale run (e.g. the fine-tuned eval of an older training run)."""
    roles = []
    for role in ROLES:
        try:
            path = model_path_for(cfg, role)
        except EvalError:
            continue
        out_dir = os.path.join(cfg.experiment.output_dir, "eval", role)
        if _cached(out_dir, _eval_hash(cfg, manifest, path)) is not None:
            roles.append(role)
    return roles


def model_path_for(cfg: Any, role: str) -> str:
    if role == "base":
        return str(cfg.model.name_or_path)
    if not os.path.exists(os.path.join(cfg.model_dir, "config.json")):
        raise EvalError(
            f"no fine-tuned model at {cfg.model_dir}: run `ift train` first "
            "(or evaluate only the base model with eval.models=[base])"
        )
    return str(cfg.model_dir)


def read_test_split(data_dir: str, manifest: dict[str, Any]) -> dict[str, list[Any]]:
    cols = ["id", "task", "prompt", "reference", "prompt_ids"]
    out: dict[str, list[Any]] = {c: [] for c in cols}
    for f in manifest["splits"]["test"]["files"]:
        table = pq.read_table(os.path.join(data_dir, f), columns=cols)
        for c in cols:
            out[c] += table.column(c).to_pylist()
    return out


def _eval_hash(cfg: Any, manifest: dict[str, Any], model_path: str) -> str:
    model_id = model_path
    state = os.path.join(model_path, "ift_train.json")
    if os.path.exists(state):  # a fine-tuned model: its identity is the run that made it
        with open(state) as f:
            model_id = json.load(f)["run_hash"]
    payload = {
        "model": model_id,
        "data": manifest["fingerprint"],
        # Settings that cannot change a prediction stay out: the actor count, and `bootstrap`
        # (a proposed EvalConfig field), whose intervals are recomputed from cached predictions.
        "eval": {
            k: v
            for k, v in cfg.eval.model_dump(mode="json").items()
            if k not in ("num_workers", "cpus_per_worker", "models", "bootstrap")
        },
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _cached(out_dir: str, key: str) -> dict[str, Any] | None:
    """The whole metrics.json when it was written for `key` by this version of the job."""
    path = os.path.join(out_dir, "metrics.json")
    if not os.path.exists(path) or not os.path.exists(os.path.join(out_dir, "predictions.jsonl")):
        return None
    with open(path) as f:
        data = json.load(f)
    # Outputs written before `tasks` was recorded cannot be bootstrapped or reported: redo them.
    return data if data.get("eval_hash") == key and "tasks" in data else None  # type: ignore[no-any-return]


def _boot_settings(samples: int, seed: int) -> dict[str, Any] | None:
    return {"samples": samples, "seed": seed, "confidence": CONFIDENCE} if samples > 0 else None


def _intervals(
    tasks: dict[str, list[str]],
    records: list[dict[str, Any]],
    boot: dict[str, Any] | None,
    bleu_tokenize: str,
) -> dict[str, tuple[float, float]]:
    if boot is None:
        return {}
    samples = bootstrap_by_task(
        tasks,
        [r["task"] for r in records],
        [r["prediction"] for r in records],
        [[r["reference"]] if isinstance(r["reference"], str) else r["reference"] for r in records],
        n=boot["samples"],
        seed=boot["seed"],
        bleu_tokenize=bleu_tokenize,
    )
    return intervals_of(samples, boot["confidence"])


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)

"""The eval job: generate on the held-out test split with a Ray Data actor pool, then score.

    ift eval configs/quickstart.yaml eval.models=[finetuned]

Reads top to bottom: `evaluate()` is the driver for one model role (`base`, `base_fewshot` or
`finetuned`); `Generator` is the actor (one model replica each); helpers follow. Prompts are the
token ids the prepare job rendered with the training template, so base and fine-tuned see
exactly the prompts training used; `base_fewshot` puts `eval.few_shot` train exemplars of the
same task before them (eval/fewshot.py). Batches are planned on the driver (by prompt length)
and each carries its own seed, so predictions do not depend on the number of actors. A batch
lost with its actor is run again by Ray Data (actors restart, tasks retry), and the seed it
carries makes the retry give the same predictions.

The fine-tuned model is `eval.finetuned_model` (a folder, or an MLflow `models:/` / `runs:/`
URI downloaded once into `<output_dir>/eval/mlflow-models/`), else `<output_dir>/model`.

Outputs: `<output_dir>/eval/<role>/predictions.jsonl` and `metrics.json`, written atomically,
then `<output_dir>/eval/report.md` and `comparison.png` (`eval.report`) over every role whose
outputs are current. Metric names are `<task>/<metric>` (e.g. `sst2/accuracy`, `wmt/bleu`).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import pyarrow.parquet as pq

from eval import fewshot
from eval import metrics as M
from eval.generate import generate_counted, plan_batches
from eval.report import bootstrap_by_task, intervals_of, read_predictions, write_report

ROLES = ("base", "base_fewshot", "finetuned")
MLFLOW_SCHEMES = ("models:/", "runs:/")
MODEL_CACHE = "mlflow-models"
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
        `<key>: (low, high)` (empty without bootstrap) and the paths written; after a
        generation (not a cache hit) also "actors": batches per `host:pid` actor process.
    """
    import ray

    if bootstrap is None:
        # EvalConfig has no `bootstrap` field yet (owned elsewhere); read it once it exists.
        bootstrap = int(getattr(cfg.eval, "bootstrap", 0) or 0)
    model_path = model_path_for(cfg, role, log=log)
    eval_dir = os.path.join(cfg.experiment.output_dir, "eval")
    out_dir = os.path.join(eval_dir, role)
    test = read_test_split(cfg.data_dir, manifest)
    if not test["id"]:
        raise EvalError(
            "the test split is empty: set data.split with a test ratio or pin a "
            "source with `split: test`"
        )
    pools = _exemplar_pools(cfg, manifest, test["task"]) if role == "base_fewshot" else None
    key = _eval_hash(cfg, manifest, model_path, pools)
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
    prompt_text = list(test["prompt"])
    if pools is not None:
        tok_path = manifest.get("tokenizer") or cfg.model.tokenizer or cfg.model.name_or_path
        prompts, prompt_text = _fewshot_prompts(
            tok_path, cfg.model.trust_remote_code, test, pools, e.few_shot, max_prompt
        )
    else:
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
        # Ray Data's actor pool defaults (max_restarts=-1, max_task_retries=-1) are what makes
        # the predictions complete after an actor dies: it is restarted and its in-flight
        # batches run again (tests/reliability/test_eval_faults.py).
        compute=ray.data.ActorPoolStrategy(size=n_actors),
        num_cpus=cpus,
        num_gpus=1 if cfg.train.use_gpu else 0,
    )
    predictions: list[str | None] = [None] * len(prompts)
    new_tokens = 0
    done = 0
    actors: dict[str, int] = {}  # batches per actor process: the load balance, and retries
    for row in ds.iter_rows():
        for j, text in zip(row["index"], row["predictions"], strict=True):
            # A retried batch that came back twice would overwrite itself with the same text
            # (seeded); the count below still checks that every prompt got a prediction.
            predictions[int(j)] = str(text)
        new_tokens += int(row["new_tokens"])
        actors[str(row["actor"])] = actors.get(str(row["actor"]), 0) + 1
        done += 1
        if done % max(1, len(items) // 10) == 0 or done == len(items):
            log(f"[eval {role}] {done}/{len(items)} batches")
    seconds = time.perf_counter() - t0
    missing = sum(p is None for p in predictions)
    if missing:
        raise EvalError(f"[eval {role}] {missing} of {len(predictions)} prompts got no prediction")
    preds = [str(p) for p in predictions]

    tasks = task_metrics(manifest, test["task"])
    scores = score_by_task(manifest, test, preds, bleu_tokenize=e.bleu_tokenize)
    scores["eval/examples_per_s"] = len(preds) / seconds
    scores["eval/new_tokens_per_s"] = new_tokens / seconds
    records = [
        {
            "id": test["id"][i],
            "task": test["task"][i],
            "prompt": prompt_text[i],
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
                "model": model_display(cfg, role, model_path),
                "few_shot": e.few_shot if pools is not None else 0,
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
        "actors": actors,
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
        self.name = f"{socket.gethostname()}:{os.getpid()}"
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
        out: dict[str, list[Any]] = {"index": [], "predictions": [], "new_tokens": [], "actor": []}
        for b, index, prompt_ids in zip(
            batch["batch"], batch["index"], batch["prompt_ids"], strict=True
        ):
            prompts = [[int(x) for x in p] for p in prompt_ids]
            texts, lengths = generate_counted(
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
            out["new_tokens"].append(sum(lengths))
            out["actor"].append(self.name)
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
        out_dir = os.path.join(cfg.experiment.output_dir, "eval", role)
        if not os.path.exists(os.path.join(out_dir, "metrics.json")):
            continue
        try:
            path = model_path_for(cfg, role, download=False)
            pools = None
            if role == "base_fewshot":
                if cfg.eval.few_shot < 1:
                    continue
                test_tasks = read_test_split(cfg.data_dir, manifest, ["task"])["task"]
                pools = _exemplar_pools(cfg, manifest, test_tasks)
        except EvalError:
            continue
        if _cached(out_dir, _eval_hash(cfg, manifest, path, pools)) is not None:
            roles.append(role)
    return roles


def model_path_for(
    cfg: Any, role: str, log: Callable[[str], None] = print, download: bool = True
) -> str:
    """The local folder of a role's model (the base model for `base` and `base_fewshot`).

    Args:
        cfg: The resolved config.
        role: An eval role.
        log: Progress lines (an MLflow download) go here.
        download: False: an MLflow model not downloaded yet is an EvalError, not a download.
    """
    if role in ("base", "base_fewshot"):
        return str(cfg.model.name_or_path)
    uri = cfg.eval.finetuned_model
    if uri and uri.startswith(MLFLOW_SCHEMES):
        cache = os.path.join(cfg.experiment.output_dir, "eval", MODEL_CACHE)
        return fetch_mlflow_model(uri, cfg.tracking.tracking_uri, cache, log, download)
    path = os.path.abspath(os.path.expanduser(uri)) if uri else str(cfg.model_dir)
    if not os.path.exists(os.path.join(path, "config.json")):
        if uri:
            raise EvalError(
                f"eval.finetuned_model: no Hugging Face model (config.json) in {path}; give a "
                "model folder or an MLflow URI (models:/NAME@ALIAS, models:/NAME/VERSION, "
                "runs:/RUN_ID/model)"
            )
        raise EvalError(
            f"no fine-tuned model at {path}: run `ift train` first "
            "(or evaluate only the base model with eval.models=[base])"
        )
    return path


def model_display(cfg: Any, role: str, path: str) -> str:
    """What metrics.json and the report name as a role's model: the URI when there is one."""
    uri = cfg.eval.finetuned_model
    if role == "finetuned" and uri and uri.startswith(MLFLOW_SCHEMES):
        return f"{uri} ({path})"
    return path


def fetch_mlflow_model(
    uri: str,
    tracking_uri: str,
    cache_dir: str,
    log: Callable[[str], None] = print,
    download: bool = True,
) -> str:
    """A transformers-flavor MLflow model as one Hugging Face folder, downloaded once.

    `models:/NAME@ALIAS` is resolved to its version first, so the cache key (and with it the
    eval hash) follows the alias when it moves. The artifacts are downloaded into a temp dir,
    the model weights (`model/`) and tokenizer (`components/tokenizer/`) are merged into
    `hf/`, and the dir is renamed into place: a crash never leaves a half-filled cache entry.

    Raises:
        EvalError: The URI cannot be resolved or downloaded, or holds no transformers model.
    """
    import shutil
    import tempfile

    import mlflow

    def bad(why: str) -> EvalError:
        return EvalError(f"eval.finetuned_model: cannot load {uri!r} from {tracking_uri}: {why}")

    try:
        client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        if uri.startswith("models:/"):
            ref = uri.removeprefix("models:/")
            if "@" in ref:
                name, alias = ref.split("@", 1)
                version = client.get_model_version_by_alias(name, alias)
            elif "/" in ref:
                name, number = ref.split("/", 1)
                version = client.get_model_version(name, number)
            else:
                raise bad("expected models:/NAME@ALIAS or models:/NAME/VERSION")
            identity = f"models:/{version.name}/{version.version}"
        else:
            identity = uri
    except EvalError:
        raise
    except Exception as e:  # noqa: BLE001 - MLflow raises many types; all mean "not usable"
        raise bad(f"{type(e).__name__}: {e}") from e
    key = hashlib.sha256(f"{tracking_uri}|{identity}".encode()).hexdigest()[:16]
    final = os.path.join(cache_dir, key)
    hf = os.path.join(final, "hf")
    if os.path.exists(os.path.join(hf, "config.json")):
        return hf
    if not download:
        raise bad("not downloaded yet")
    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{key}-", dir=cache_dir)
    try:
        log(f"[eval finetuned] downloading {identity} from {tracking_uri}")
        try:
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=identity,
                dst_path=os.path.join(tmp, "mlflow"),
                tracking_uri=tracking_uri,
            )
        except Exception as e:  # noqa: BLE001
            raise bad(f"{type(e).__name__}: {e}") from e
        binary, tokenizer = _transformers_layout(local)
        if binary is None:
            raise bad("not a transformers-flavor model (no config.json under its model folder)")
        os.makedirs(os.path.join(tmp, "hf"))
        for folder in (binary, tokenizer):
            if folder and os.path.isdir(folder):
                for name in os.listdir(folder):
                    shutil.move(os.path.join(folder, name), os.path.join(tmp, "hf", name))
        with open(os.path.join(tmp, "source.json"), "w") as f:
            json.dump({"uri": uri, "resolved": identity, "tracking_uri": tracking_uri}, f)
        shutil.rmtree(os.path.join(tmp, "mlflow"))
        try:
            os.rename(tmp, final)
        except OSError:
            if not os.path.exists(os.path.join(hf, "config.json")):
                raise  # not a concurrent download that finished first
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return hf


def _transformers_layout(local: str) -> tuple[str | None, str | None]:
    """(model folder, tokenizer folder) of a downloaded transformers-flavor model."""
    import yaml

    binary, components = "model", "components"
    mlmodel = os.path.join(local, "MLmodel")
    if os.path.exists(mlmodel):
        with open(mlmodel) as f:
            flavor = (yaml.safe_load(f) or {}).get("flavors", {}).get("transformers", {})
        binary = flavor.get("model_binary", binary)
    model_dir = os.path.join(local, binary)
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        return None, None
    return model_dir, os.path.join(local, components, "tokenizer")


def read_test_split(
    data_dir: str, manifest: dict[str, Any], cols: list[str] | None = None
) -> dict[str, list[Any]]:
    cols = cols or ["id", "task", "prompt", "reference", "prompt_ids"]
    out: dict[str, list[Any]] = {c: [] for c in cols}
    for f in manifest["splits"]["test"]["files"]:
        table = pq.read_table(os.path.join(data_dir, f), columns=cols)
        for c in cols:
            out[c] += table.column(c).to_pylist()
    return out


def _exemplar_pools(
    cfg: Any, manifest: dict[str, Any], tasks: list[str]
) -> dict[str, list[dict[str, str]]]:
    try:
        return fewshot.read_exemplars(cfg.data_dir, manifest, tasks)
    except FileNotFoundError as e:
        raise EvalError(
            f"eval.few_shot: no exemplar file {e.filename}: prepare the data again with "
            "data.exemplars >= eval.few_shot"
        ) from e


def _fewshot_prompts(
    tok_path: str,
    trust_remote_code: bool,
    test: dict[str, list[Any]],
    pools: dict[str, list[dict[str, str]]],
    k: int,
    max_len: int,
) -> tuple[list[list[int]], list[str]]:
    """k-shot ids with the tokenizer prepare used (so exemplar and test ids agree)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_path, trust_remote_code=trust_remote_code)
    bos = tok.bos_token_id if tok.bos_token_id != tok.eos_token_id else None

    def encode(texts: list[str]) -> list[list[int]]:
        return tok(texts, add_special_tokens=False)["input_ids"]  # type: ignore[no-any-return]

    return fewshot.build_prompts(test, pools, k, encode, bos, max_len)


def _eval_hash(
    cfg: Any,
    manifest: dict[str, Any],
    model_path: str,
    pools: dict[str, list[dict[str, str]]] | None = None,
) -> str:
    model_id = model_path
    state = os.path.join(model_path, "ift_train.json")
    if os.path.exists(state):  # a fine-tuned model: its identity is the run that made it
        with open(state) as f:
            model_id = json.load(f)["run_hash"]
    payload: dict[str, Any] = {
        "model": model_id,
        "data": manifest["fingerprint"],
        # Settings that cannot change a prediction stay out: the actor count, and `bootstrap`,
        # whose intervals are recomputed from cached predictions. `few_shot` counts only for
        # the k-shot role, and `finetuned_model` only through the model it names.
        "eval": {
            k: v
            for k, v in cfg.eval.model_dump(mode="json").items()
            if k
            not in (
                "num_workers",
                "cpus_per_worker",
                "models",
                "bootstrap",
                "few_shot",
                "finetuned_model",
            )
        },
    }
    if pools is not None:
        payload["few_shot"] = {"k": cfg.eval.few_shot, "exemplars": pools}
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

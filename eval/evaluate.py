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

Memory does not grow with the test split on the driver: it streams the split once into a
prompt store on disk (`<role>/.work/`: token ids and offsets, memory-mapped by the actors, which
get only batch numbers), appends each batch's predictions to disk as it comes back, then
streams the split again to write `predictions.jsonl` in test-split order while merging the
metrics' sufficient statistics chunk by chunk. The work folder lives under the output folder,
which every node reads anyway (the fine-tuned model is there). With the output folder on an
object store (s3://...), eval works in a local mirror of `<output_dir>/eval` (`eval_root`),
copies each role's predictions and then metrics back, then the report; the prompt store, which
only the driver's node sees there, reaches the actors through Ray's object store (fetched once
per node, `_prompt_store_for_actors`), so they run on any node (a KubeRay head has no GPU), and
a fine-tuned model on the store is downloaded once per node into a local cache
(`storage.cached_copy`).

The fine-tuned model is `eval.finetuned_model` (a folder, or an MLflow `models:/` / `runs:/`
URI downloaded once into `<output_dir>/eval/mlflow-models/`), else `<output_dir>/model`.

Outputs: `<output_dir>/eval/<role>/predictions.jsonl` and `metrics.json`, written atomically,
then `<output_dir>/eval/report.md` and `comparison.png` (`eval.report`) over every role whose
outputs are current. Metric names are `<task>/<metric>` (e.g. `sst2/accuracy`, `wmt/bleu`).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_pipeline import local_cache, storage
from eval import fewshot
from eval import metrics as M
from eval.generate import generate_counted
from eval.report import StatsByTask, bootstrap_file, write_report

ROLES = ("base", "base_fewshot", "finetuned")
MLFLOW_SCHEMES = ("models:/", "runs:/")
MODEL_CACHE = "mlflow-models"
OUTPUT_FILES = ("predictions.jsonl", "metrics.json")
CONFIDENCE = 0.95
# Test-split rows the driver holds at once: a chunk's decoded columns, records, JSON lines and
# metric inputs take 2-3 KB a row (measured), so its peak is a few MB whatever the split size.
CHUNK_ROWS = 1024
# Bumped when the job's outputs change for the same settings (the cache key includes it).
EVAL_VERSION = 2


class EvalError(RuntimeError):
    user_facing = True


def evaluate(
    cfg: Any,
    manifest: dict[str, Any],
    role: str,
    log: Callable[[str], None] = print,
    bootstrap: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Generates and scores one model role on the test split, then rewrites the report.

    Args:
        cfg: The resolved config.
        manifest: The prepared data's manifest.
        role: `base`, `base_fewshot` or `finetuned`.
        log: Progress lines go here.
        bootstrap: Bootstrap resamples for confidence intervals (0: none); None reads
            `eval.bootstrap`.
        progress: Called with (batches done, batches) as each batch comes back; without
            it, `log` gets a line every tenth of the batches.

    Returns:
        {"metrics", "intervals", "predictions", "metrics_path", "report", "chart"}: scores,
        `<key>: (low, high)` (empty without bootstrap) and the paths written; after a
        generation (not a cache hit) also "actors": batches per `host:pid` actor process.
    """
    import ray

    e = cfg.eval
    bootstrap = e.bootstrap if bootstrap is None else bootstrap
    options = metric_options(e)
    eval_dir = eval_root(cfg)
    _pull(cfg, eval_dir)
    model_path = model_path_for(cfg, role, log=log)
    out_dir = os.path.join(eval_dir, role)
    if not manifest["splits"]["test"]["rows"]:
        raise EvalError(
            "the test split is empty: set data.split with a test ratio or pin a "
            "source with `split: test`"
        )
    pools = None
    if role == "base_fewshot":
        pools = _exemplar_pools(cfg, manifest, test_tasks(cfg.data_dir, manifest))
    key = _eval_hash(cfg, manifest, model_path, pools)
    pred_path = os.path.join(out_dir, "predictions.jsonl")
    metrics_path = os.path.join(out_dir, "metrics.json")
    boot = _boot_settings(bootstrap, e.seed)
    cached = _cached(out_dir, key)
    if cached is not None:
        log(f"[eval {role}] reusing {out_dir}: same model, data and settings")
        if cached.get("bootstrap") != boot:
            # Intervals are a function of the predictions: add them without generating again.
            cached["bootstrap"] = boot
            cached["intervals"] = (
                bootstrap_file(pred_path, cached["tasks"], boot, options) if boot else {}
            )
            _write_atomic(metrics_path, json.dumps(cached, indent=2))
            _push(cfg, eval_dir, [f"{role}/metrics.json"])
        return {
            "metrics": cached["metrics"],
            "intervals": cached["intervals"],
            "predictions": pred_path,
            "metrics_path": metrics_path,
            **_report(cfg, eval_dir, current_roles(cfg, manifest), options),
        }

    # 1. The prompt store: every generation input on disk, planned into length-sorted batches.
    max_prompt = e.max_prompt_len or manifest["max_seq_len"]
    work = os.path.join(out_dir, ".work")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    try:
        if pools is not None:
            tok_path = manifest.get("tokenizer") or cfg.model.tokenizer or cfg.model.name_or_path
            n = write_fewshot_store(
                work,
                cfg.data_dir,
                manifest,
                pools,
                e.few_shot,
                max_prompt,
                tok_path,
                cfg.model.trust_remote_code,
            )
        else:
            n = write_prompt_store(work, cfg.data_dir, manifest)
        n_batches = plan_store(work, e.batch_size, max_prompt)

        # 2. Generation: actors get batch numbers and read their prompts from the store.
        n_actors = max(1, min(e.num_workers, n_batches))
        total_cpus = max(1.0, float(ray.cluster_resources().get("CPU", 1)))
        cpus = e.cpus_per_worker
        if not cfg.train.use_gpu:
            cpus = min(cpus, total_cpus / n_actors)
        log(
            f"[eval {role}] {n} prompts in {n_batches} batches on {n_actors} actor(s), "
            f"model {model_path}"
        )
        t0 = time.perf_counter()
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        # Batch numbers only (8 bytes a batch), put by the driver: no read tasks, which an actor
        # pool holding every CPU would starve (DESIGN.md: Ray Data on a 2-CPU node).
        numbers = np.array_split(np.arange(n_batches), min(n_batches, 4 * n_actors))
        ds = ray.data.from_numpy(numbers).map_batches(
            Generator,
            fn_constructor_kwargs={
                "model_path": _model_for_actors(cfg, role, model_path),
                "eval_cfg": e.model_dump(),
                "dtype": cfg.model.dtype,
                "use_gpu": cfg.train.use_gpu,
                "cpus": cpus,
                "trust_remote_code": cfg.model.trust_remote_code,
                "attn_implementation": cfg.model.attn_implementation,
                "prompt_store": _prompt_store_for_actors(cfg, work),
                "max_prompt": max_prompt,
            },
            batch_size=1,
            # Ray Data's actor pool defaults (max_restarts=-1, max_task_retries=-1) are
            # what makes the predictions complete after an actor dies: it is restarted and
            # its in-flight batches run again (tests/reliability/test_eval_faults.py).
            compute=ray.data.ActorPoolStrategy(size=n_actors),
            num_cpus=cpus,
            num_gpus=1 if cfg.train.use_gpu else 0,
        )
        new_tokens = 0
        done = 0
        actors: dict[str, int] = {}  # batches per actor process: the load balance, and retries
        with PredictionStore(work, n, "w") as store:
            for row in ds.iter_rows():
                # A retried batch that came back twice overwrites itself with the same text
                # (seeded); `missing` below still checks that every prompt got a prediction.
                store.put(row["index"], row["predictions"])
                new_tokens += int(row["new_tokens"])
                actors[str(row["actor"])] = actors.get(str(row["actor"]), 0) + 1
                done += 1
                if progress is not None:
                    progress(done, n_batches)
                elif done % max(1, n_batches // 10) == 0 or done == n_batches:
                    log(f"[eval {role}] {done}/{n_batches} batches")
            seconds = time.perf_counter() - t0
            missing = store.missing()
        if missing:
            raise EvalError(f"[eval {role}] {missing} of {n} prompts got no prediction")

        # 3. Outputs: predictions.jsonl in test-split order, metrics merged chunk by chunk.
        tasks = task_metrics(manifest, test_tasks(cfg.data_dir, manifest))
        stats = StatsByTask(tasks, options, keep_tables=boot is not None)
        write_predictions(pred_path, work, cfg.data_dir, manifest, stats, pools is not None)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    scores = stats.scores()
    scores["eval/examples_per_s"] = n / seconds
    scores["eval/new_tokens_per_s"] = new_tokens / seconds
    intervals = stats.intervals(boot) if boot else {}
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
                "metric_options": options,
                "bootstrap": boot,
                "intervals": intervals,
            },
            indent=2,
        ),
    )
    log(
        f"[eval {role}] {n} predictions in {seconds:.1f}s: "
        + ", ".join(f"{k} {v:.2f}" for k, v in scores.items() if not k.startswith("eval/"))
    )
    # metrics.json last: the cache check needs both, and names the predictions' identity.
    _push(cfg, eval_dir, [f"{role}/predictions.jsonl", f"{role}/metrics.json"])
    return {
        "metrics": scores,
        "intervals": intervals,
        "predictions": pred_path,
        "metrics_path": metrics_path,
        "actors": actors,
        **_report(cfg, eval_dir, current_roles(cfg, manifest), options),
    }


def eval_root(cfg: Any) -> str:
    """The local folder eval works in: `<output_dir>/eval`, or, when the output folder is on
    an object store (s3://...), a local mirror of it that `_pull` fills from the store and
    `_push` copies back (predictions, metrics, report), since the work folder, the streamed
    predictions and the report are written in place."""
    remote = storage.join(cfg.experiment.output_dir, "eval")
    return storage.local_path(remote) or storage.staging_dir(remote)


def _pull(cfg: Any, eval_dir: str) -> None:
    """Mirror each role's outputs on the object store (if any) into `eval_dir`."""
    remote = storage.join(cfg.experiment.output_dir, "eval")
    if storage.local_path(remote) is not None:
        return
    for role in ROLES:
        shutil.rmtree(os.path.join(eval_dir, role), ignore_errors=True)
        for name in OUTPUT_FILES:
            if storage.exists(src := storage.join(remote, role, name)):
                storage.get_file(src, os.path.join(eval_dir, role, name))


def _push(cfg: Any, eval_dir: str, names: list[str]) -> None:
    """Copy `names` (relative to `eval_dir`) to the object store, in order; local: nothing."""
    remote = storage.join(cfg.experiment.output_dir, "eval")
    if storage.local_path(remote) is not None:
        return
    for name in names:
        storage.put_file(os.path.join(eval_dir, name), storage.join(remote, name))


def _report(cfg: Any, eval_dir: str, roles: list[str], options: dict[str, Any]) -> dict[str, str]:
    out = write_report(eval_dir, roles, options)
    _push(
        cfg,
        eval_dir,
        [os.path.relpath(out["report"], eval_dir), os.path.relpath(out["chart"], eval_dir)],
    )
    return out


def _prompt_store_for_actors(cfg: Any, work: str) -> str | dict[str, Any]:
    """How the actors reach the prompt store: the work folder itself when it is under the
    output folder, which every node reads; else (the output folder is on an object store and
    the work folder a local mirror only this node sees) its arrays put into Ray's object store,
    from their memory maps (shared memory, not the driver's heap), and fetched once by each node
    that runs an actor."""
    if storage.local_path(cfg.experiment.output_dir) is not None:
        return work
    import ray

    refs = {}
    for name, dtype in (("tokens", np.int32), ("offsets", np.int64), ("order", np.int64)):
        path = os.path.join(work, f"{name}.bin")
        empty = os.path.getsize(path) == 0  # np.memmap refuses an empty file
        array = np.zeros(0, dtype) if empty else np.asarray(np.memmap(path, dtype, mode="r"))
        refs[name] = ray.put(array)
    return refs


def _model_for_actors(cfg: Any, role: str, model_path: str) -> str | dict[str, str]:
    """What the actors load: `model_path` where every node sees it (the base model, a local or
    shared folder, an MLflow download under a local or shared output folder); else a source
    that each actor's node copies once itself (`local_model`): the driver's copy of a model
    on an object store, and of an MLflow model when the output folder is on one, lies in a
    cache only the driver's node sees."""
    if role in ("base", "base_fewshot"):
        return model_path
    uri = cfg.eval.finetuned_model
    if uri and uri.startswith(MLFLOW_SCHEMES):
        if storage.local_path(cfg.experiment.output_dir) is not None:
            return model_path
        # The version the driver resolved and hashed, even if the alias moves meanwhile.
        with open(os.path.join(os.path.dirname(model_path), "source.json")) as f:
            resolved = json.load(f)["resolved"]
        cache = os.path.join(eval_root(cfg), MODEL_CACHE)
        return {"mlflow": resolved, "tracking_uri": cfg.tracking.tracking_uri, "cache": cache}
    folder = uri or str(cfg.model_dir)
    return model_path if storage.local_path(folder) is not None else {"folder": folder}


def local_model(source: str | dict[str, str]) -> str:
    """The local folder of an actor's model (`_model_for_actors`), copied to this node once."""
    if isinstance(source, str):
        return source
    if "folder" in source:
        return storage.cached_copy(source["folder"], required="config.json")
    return fetch_mlflow_model(source["mlflow"], source["tracking_uri"], source["cache"], print)


class Generator:
    """Ray Data actor: one model replica; generates for one planned batch per call.

    In the job, each input row is a batch number (`data`) and the prompts come from the prompt
    store (`prompt_store`, memory-mapped); called in process (benchmarks) a row may carry its
    `batch`, `index` and `prompt_ids` instead.
    """

    def __init__(
        self,
        model_path: str | dict[str, str],
        eval_cfg: dict[str, Any],
        dtype: str,
        use_gpu: bool,
        cpus: float,
        trust_remote_code: bool = False,
        attn_implementation: str | None = None,
        prompt_store: str | dict[str, Any] | None = None,
        max_prompt: int | None = None,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not use_gpu:
            torch.set_num_threads(max(1, int(cpus)))
        self.cfg = eval_cfg
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.store = PromptStore(prompt_store) if prompt_store else None
        self.max_prompt = max_prompt
        model_path = local_model(model_path)
        self.tok = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        torch_dtype = {
            "float32": torch.float32,
            "bfloat16": torch.bfloat16,
            "float16": torch.float16,
        }[dtype]
        extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=torch_dtype, trust_remote_code=trust_remote_code, **extra
        )
        self.model.eval()
        if use_gpu:
            self.model.to("cuda")  # type: ignore[arg-type]

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        c = self.cfg
        out: dict[str, list[Any]] = {"index": [], "predictions": [], "new_tokens": [], "actor": []}
        for b, index, prompts in self._batches(batch):
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

    def _batches(self, batch: dict[str, Any]) -> Iterator[tuple[int, list[int], list[list[int]]]]:
        if self.store is None:
            for b, index, prompt_ids in zip(
                batch["batch"], batch["index"], batch["prompt_ids"], strict=True
            ):
                yield int(b), list(index), [[int(x) for x in p] for p in prompt_ids]
            return
        order, size = self.store.order, int(self.cfg["batch_size"])
        assert order is not None, "the prompt store has no batch plan (plan_store)"
        for b in batch["data"]:
            index = order[int(b) * size : (int(b) + 1) * size].tolist()
            yield int(b), index, [self.store.prompt(j, self.max_prompt) for j in index]


# --------------------------------------------------------------------------- prompt store


class PromptStore:
    """The generation inputs on disk, memory-mapped: every prompt's token ids (int32, one flat
    file and its int64 offsets, as Megatron's indexed datasets), the batch plan (`order`: test
    rows sorted by prompt length) and, for k-shot prompts, their text."""

    def __init__(self, work: str | dict[str, Any]) -> None:
        if isinstance(work, dict):  # Ray object refs (`_prompt_store_for_actors`)
            import ray

            self.tokens, self.offsets, self.order = ray.get(
                [work["tokens"], work["offsets"], work["order"]]
            )
            return
        self.tokens = np.memmap(os.path.join(work, "tokens.bin"), dtype=np.int32, mode="r")
        self.offsets = np.memmap(os.path.join(work, "offsets.bin"), dtype=np.int64, mode="r")
        order = os.path.join(work, "order.bin")
        self.order = np.memmap(order, dtype=np.int64, mode="r") if os.path.exists(order) else None

    def prompt(self, j: int, max_len: int | None = None) -> list[int]:
        a, b = int(self.offsets[j]), int(self.offsets[j + 1])
        if max_len is not None:
            a = max(a, b - max_len)  # cut from the left, as the prompt is cut everywhere
        return [int(x) for x in self.tokens[a:b]]


class _Appender:
    """One growing data file and its offsets file (starting at 0), written sequentially."""

    def __init__(self, work: str, data: str, offsets: str) -> None:
        self.data = open(os.path.join(work, data), "wb")  # noqa: SIM115 - closed in close()
        self.offsets = open(os.path.join(work, offsets), "wb")  # noqa: SIM115
        self.end = 0
        self.rows = 0
        self.offsets.write(np.zeros(1, dtype=np.int64).tobytes())

    def add(self, values: np.ndarray, lengths: np.ndarray) -> None:
        self.data.write(values.tobytes())
        ends = self.end + np.cumsum(lengths, dtype=np.int64)
        self.offsets.write(ends.tobytes())
        self.end = int(ends[-1]) if len(ends) else self.end
        self.rows += len(lengths)

    def close(self) -> None:
        self.data.close()
        self.offsets.close()


def write_prompt_store(work: str, data_dir: str, manifest: dict[str, Any]) -> int:
    """The zero-shot prompts (prepare's `prompt_ids`, uncut) into the store; returns the rows."""
    out = _Appender(work, "tokens.bin", "offsets.bin")
    try:
        for batch in _test_batches(data_dir, manifest, ["prompt_ids"]):
            col = batch.column(0)
            values = pc.list_flatten(col).to_numpy(zero_copy_only=False).astype(np.int32)
            out.add(values, pc.list_value_length(col).to_numpy(zero_copy_only=False))
    finally:
        out.close()
    return out.rows


def write_fewshot_store(
    work: str,
    data_dir: str,
    manifest: dict[str, Any],
    pools: dict[str, list[dict[str, str]]],
    k: int,
    max_len: int,
    tok_path: str,
    trust_remote_code: bool,
) -> int:
    """k-shot ids (with the tokenizer prepare used, so exemplar and test ids agree) and their
    text into the store, chunk by chunk; returns the rows."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_path, trust_remote_code=trust_remote_code)
    bos = tok.bos_token_id if tok.bos_token_id != tok.eos_token_id else None

    def encode(texts: list[str]) -> list[list[int]]:
        return tok(texts, add_special_tokens=False)["input_ids"]  # type: ignore[no-any-return]

    ids_out = _Appender(work, "tokens.bin", "offsets.bin")
    text_out = _Appender(work, "text.bin", "text_offsets.bin")
    try:
        for batch in _test_batches(data_dir, manifest, ["id", "task", "prompt", "prompt_ids"]):
            ids, texts = fewshot.build_prompts(batch.to_pydict(), pools, k, encode, bos, max_len)
            ids_out.add(
                np.fromiter((t for p in ids for t in p), dtype=np.int32),
                np.array([len(p) for p in ids], dtype=np.int64),
            )
            raw = [t.encode("utf-8") for t in texts]
            text_out.add(
                np.frombuffer(b"".join(raw), dtype=np.uint8),
                np.array([len(r) for r in raw], dtype=np.int64),
            )
    finally:
        ids_out.close()
        text_out.close()
    return ids_out.rows


def plan_store(work: str, batch_size: int, max_prompt: int) -> int:
    """Writes the batch plan (`order.bin`) of a prompt store; returns the number of batches.

    Batch i is rows `order[i * batch_size : (i + 1) * batch_size]`: rows sorted by prompt
    length (after the cut to `max_prompt`), ties in row order, as `generate.plan_batches`.
    """
    offsets = np.memmap(os.path.join(work, "offsets.bin"), dtype=np.int64, mode="r")
    lengths = np.minimum(np.diff(offsets), max_prompt)
    order = np.argsort(lengths, kind="stable").astype(np.int64)
    order.tofile(os.path.join(work, "order.bin"))
    return -(-len(order) // batch_size)


class PredictionStore:
    """Predictions as they arrive, on disk: UTF-8 text appended to one file and, per test row,
    (offset, length + 1) in a memory-mapped index (0: no prediction yet)."""

    def __init__(self, work: str, rows: int, mode: str = "r") -> None:
        self.path = os.path.join(work, "predictions.bin")
        self.index = np.memmap(
            os.path.join(work, "predictions.idx"),
            dtype=np.int64,
            mode="w+" if mode == "w" else "r",
            shape=(rows, 2),
        )
        self.file = open(self.path, "ab" if mode == "w" else "rb")  # noqa: SIM115
        self.end = self.file.seek(0, os.SEEK_END)

    def __enter__(self) -> PredictionStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()
        self.index.flush()

    def put(self, index: Any, texts: Any) -> None:
        for j, text in zip(index, texts, strict=True):
            raw = str(text).encode("utf-8")
            self.file.write(raw)
            self.index[int(j)] = (self.end, len(raw) + 1)
            self.end += len(raw)

    def missing(self) -> int:
        return sum(
            int((self.index[a : a + CHUNK_ROWS, 1] == 0).sum())
            for a in range(0, len(self.index), CHUNK_ROWS)
        )

    def get(self, j: int) -> str:
        start, size = (int(x) for x in self.index[j])
        self.file.seek(start)
        return self.file.read(size - 1).decode("utf-8")


def write_predictions(
    path: str, work: str, data_dir: str, manifest: dict[str, Any], stats: StatsByTask, k_shot: bool
) -> None:
    """Writes `predictions.jsonl` in test-split order (atomically), adding every chunk of
    records to `stats` on the way."""
    prompts = _TextStore(work, "text.bin", "text_offsets.bin") if k_shot else None
    tmp = f"{path}.tmp-{os.getpid()}"
    j = 0
    with open(tmp, "w", encoding="utf-8") as f, PredictionStore(work, _store_rows(work)) as preds:
        for batch in _test_batches(data_dir, manifest, ["id", "task", "prompt", "reference"]):
            cols = batch.to_pydict()
            records = [
                {
                    "id": rid,
                    "task": task,
                    "prompt": prompts.get(j + i) if prompts is not None else prompt,
                    "prediction": preds.get(j + i),
                    "reference": reference,
                }
                for i, (rid, task, prompt, reference) in enumerate(
                    zip(cols["id"], cols["task"], cols["prompt"], cols["reference"], strict=True)
                )
            ]
            j += len(records)
            f.write("".join(json.dumps(r) + "\n" for r in records))
            stats.add(records)
    os.replace(tmp, path)


class _TextStore:
    """Texts written by `_Appender` (UTF-8 bytes and offsets), memory-mapped."""

    def __init__(self, work: str, data: str, offsets: str) -> None:
        path = os.path.join(work, data)
        self.data = np.memmap(path, dtype=np.uint8, mode="r") if os.path.getsize(path) else None
        self.offsets = np.memmap(os.path.join(work, offsets), dtype=np.int64, mode="r")

    def get(self, j: int) -> str:
        a, b = int(self.offsets[j]), int(self.offsets[j + 1])
        return bytes(self.data[a:b]).decode("utf-8") if self.data is not None else ""


def _store_rows(work: str) -> int:
    return os.path.getsize(os.path.join(work, "offsets.bin")) // 8 - 1


def _test_batches(data_dir: str, manifest: dict[str, Any], cols: list[str]) -> Iterator[Any]:
    """The test split in order, as pyarrow record batches of at most CHUNK_ROWS rows.

    Read on this thread, without pre-buffering, and Arrow's pool hands freed pages back after
    each batch: otherwise its allocator (mimalloc) keeps the pages every I/O and CPU pool
    thread touched, and the driver's memory grew with the row groups read (+20 MiB at 100k
    rows, tests/reliability/test_eval_memory.py). Releasing an idle pool costs about 1 us.
    """
    pool = pa.default_memory_pool()
    for f in manifest["splits"]["test"]["files"]:
        with pq.ParquetFile(os.path.join(data_dir, f), pre_buffer=False) as reader:
            for batch in reader.iter_batches(
                batch_size=CHUNK_ROWS, columns=cols, use_threads=False
            ):
                yield batch
                pool.release_unused()


def task_metrics(manifest: dict[str, Any], present: set[str]) -> dict[str, list[str]]:
    """Metric names of each task present in the test split (the source's `metrics`, else the
    template's defaults), in manifest order."""
    out: dict[str, list[str]] = {}
    for spec in manifest["templates"]:
        if spec["task"] in present:
            template = spec["template"] if isinstance(spec["template"], str) else "custom"
            out[spec["task"]] = list(spec.get("metrics") or M.default_metrics(template))
    return out


def test_tasks(data_dir: str, manifest: dict[str, Any]) -> set[str]:
    """The tasks present in the test split, read one column chunk at a time."""
    present: set[str] = set()
    for batch in _test_batches(data_dir, manifest, ["task"]):
        present.update(pc.unique(batch.column(0)).to_pylist())
    return present


def metric_options(eval_cfg: Any) -> dict[str, Any]:
    """The `eval.metrics.MetricOptions` the eval config sets (recorded in metrics.json)."""
    return {
        "bleu_tokenize": eval_cfg.bleu_tokenize,
        "rouge_split_sentences": eval_cfg.rouge_split_sentences,
    }


def current_roles(cfg: Any, manifest: dict[str, Any]) -> list[str]:
    """Roles whose outputs on disk match the current model, data and eval settings, so the
    report never mixes in a stale run (e.g. the fine-tuned eval of an older training run)."""
    roles = []
    for role in ROLES:
        out_dir = os.path.join(eval_root(cfg), role)
        if not os.path.exists(os.path.join(out_dir, "metrics.json")):
            continue
        try:
            path = model_path_for(cfg, role, download=False)
            pools = None
            if role == "base_fewshot":
                if cfg.eval.few_shot < 1:
                    continue
                pools = _exemplar_pools(cfg, manifest, test_tasks(cfg.data_dir, manifest))
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
        cache = os.path.join(eval_root(cfg), MODEL_CACHE)
        return fetch_mlflow_model(uri, cfg.tracking.tracking_uri, cache, log, download)
    local = storage.local_path(uri or str(cfg.model_dir))
    if local is None:  # on an object store: a local copy, made once
        return _remote_model(uri or str(cfg.model_dir), uri, download)
    path = os.path.abspath(os.path.expanduser(local))
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


def _remote_model(path: str, uri: str | None, download: bool) -> str:
    """A model folder on an object store, downloaded once per node into a local cache named
    by its URI and its files' sizes and times (`storage.cached_copy`); `download` False: only
    a copy already there (else EvalError)."""
    if not storage.exists(storage.join(path, "config.json")):
        if uri:
            raise EvalError(f"eval.finetuned_model: no Hugging Face model (config.json) in {path}")
        raise EvalError(
            f"no fine-tuned model at {path}: run `ift train` first "
            "(or evaluate only the base model with eval.models=[base])"
        )
    try:
        return storage.cached_copy(path, required="config.json", download=download)
    except FileNotFoundError as e:
        raise EvalError(f"{path}: {e}") from e


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
    `hf/` of a `local_cache` entry: a crash never leaves a half-filled one.

    Raises:
        EvalError: The URI cannot be resolved or downloaded, or holds no transformers model.
    """
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

    def fill(tmp: str) -> None:
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
        return os.path.join(local_cache.cached(cache_dir, key, fill if download else None), "hf")
    except local_cache.NotCached:
        raise bad("not downloaded yet") from None


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
    """The whole test split as Python lists: for small splits (benchmarks, tests) only; the job
    streams it (`_test_batches`)."""
    cols = cols or ["id", "task", "prompt", "reference", "prompt_ids"]
    out: dict[str, list[Any]] = {c: [] for c in cols}
    for f in manifest["splits"]["test"]["files"]:
        table = pq.read_table(os.path.join(data_dir, f), columns=cols)
        for c in cols:
            out[c] += table.column(c).to_pylist()
    return out


def _exemplar_pools(
    cfg: Any, manifest: dict[str, Any], tasks: set[str]
) -> dict[str, list[dict[str, str]]]:
    try:
        return fewshot.read_exemplars(cfg.data_dir, manifest, sorted(tasks))
    except FileNotFoundError as e:
        raise EvalError(
            f"eval.few_shot: no exemplar file {e.filename}: prepare the data again with "
            "data.exemplars >= eval.few_shot"
        ) from e


def _eval_hash(
    cfg: Any,
    manifest: dict[str, Any],
    model_path: str,
    pools: dict[str, list[dict[str, str]]] | None = None,
) -> str:
    """The cache key of a role's outputs: everything that can change a prediction or a score.

    That is the model (its training run, else its folder's files, tokenizer included), how
    it is loaded and run (dtype, attention kernel, remote code, CPU or GPU, the transformers
    and torch versions), the data (fingerprint, prompt cut, the tokenizer k-shot prompts
    use), every eval setting but the few that cannot (below), and this job's version.
    """
    model_id: Any = _folder_identity(model_path)
    state = os.path.join(model_path, "ift_train.json")
    if os.path.exists(state):  # a fine-tuned model: its identity is the run that made it
        with open(state) as f:
            model_id = json.load(f)["run_hash"]
    payload: dict[str, Any] = {
        "version": EVAL_VERSION,
        "model": model_id,
        "runtime": {
            "dtype": cfg.model.dtype,
            "attn_implementation": cfg.model.attn_implementation,
            "trust_remote_code": cfg.model.trust_remote_code,
            "device": "cuda" if cfg.train.use_gpu else "cpu",
            "transformers": importlib.metadata.version("transformers"),
            "torch": importlib.metadata.version("torch"),
        },
        "data": manifest["fingerprint"],
        "max_seq_len": manifest.get("max_seq_len"),
        # Settings that cannot change a prediction stay out: the actor count, and `bootstrap`,
        # whose intervals are recomputed from cached predictions. `few_shot` counts only for
        # the k-shot role, and `finetuned_model` only through the model it names. The batch
        # size stays in: it sets the padding and each batch's sampling seed.
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
        payload["few_shot"] = {
            "k": cfg.eval.few_shot,
            "exemplars": pools,
            "tokenizer": manifest.get("tokenizer") or cfg.model.tokenizer or cfg.model.name_or_path,
        }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _folder_identity(path: str) -> list[Any]:
    """A model folder as (path, then name, size, mtime_ns of each file): cheap to compute and
    changed by any rewrite of the weights, config or tokenizer."""
    entries = os.scandir(path) if os.path.isdir(path) else iter(())
    files = sorted((e for e in entries if e.is_file()), key=lambda e: e.name)
    return [path, *[(e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in files]]


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


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)

"""Typed experiment config: YAML + dotted overrides, validated before any cluster resource starts.

Every section is a pydantic model with ``extra="forbid"`` so a misspelt key is an error, defaults
live here and nowhere else, and :func:`load_config` reports every problem of a config at once,
each naming its dotted key.
"""

from __future__ import annotations

import copy
import glob
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

SPLITS = ("train", "validation", "test")


class ConfigError(ValueError):
    """A config that cannot run; the message lists every problem with its dotted key."""


class _Strict(BaseModel):
    # inf/nan pass `gt=0` checks (lr=.inf, epochs=.inf) and break arithmetic later: refuse them.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ExperimentConfig(_Strict):
    name: str = "ift"
    """Experiment name: names the Ray Train run (resume key) and the MLflow pipeline run."""
    output_dir: str = "runs/ift"
    """Checkpoints, the final `model/` and `eval/` outputs go here (local or shared storage)."""
    seed: int = 42


class ModelConfig(_Strict):
    name_or_path: str
    """A local Hugging Face model folder (no hub access is assumed)."""
    tokenizer: str | None = None
    """Tokenizer folder; defaults to `name_or_path`."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    trust_remote_code: bool = False


class DataSource(_Strict):
    path: str
    """File, glob, or folder: json, jsonl, csv, tsv, parquet (optionally .gz), conll, or a
    `datasets` save_to_disk folder."""
    template: str | dict[str, str]
    """A built-in template name, or {prompt: "<jinja>", completion: "<jinja>"}."""
    params: dict[str, Any] = Field(default_factory=dict)
    """Template parameters, e.g. {source_lang: de, target_lang: en} for `wmt`."""
    name: str | None = None
    """Task name used for eval metric names (`<name>/<metric>`); defaults to the template name."""
    format: str | None = None
    """Override the format detected from the file extension."""
    split: Literal["train", "validation", "test"] | None = None
    """Pin every record of this source to one split instead of hashing."""
    max_records: int | None = Field(default=None, gt=0)
    """Keep only the first N good records of this source (in file order)."""
    metrics: list[str] | None = None
    """Eval metrics for this task; defaults by template (accuracy, bleu/chrf, rouge, ...)."""
    weight: float | None = Field(default=None, gt=0)
    """Mixing weight of this source's train examples. When any source has one, source i gets
    round(N x w_i / sum(w)) train examples, N the sum of the sources' kept train examples (or
    `data.mix_total`): sampled without repetition below its size, whole passes then a sample
    above it. Validation and test are untouched."""

    @property
    def task_name(self) -> str:
        if self.name:
            return self.name
        return self.template if isinstance(self.template, str) else Path(self.path).stem


class DataConfig(_Strict):
    sources: list[DataSource] = Field(min_length=1)
    output_dir: str | None = None
    """Prepared data folder; defaults to `<experiment.output_dir>/data`."""
    split: dict[str, float] = Field(
        default_factory=lambda: {"train": 0.9, "validation": 0.05, "test": 0.05}
    )
    max_seq_len: int = Field(default=512, gt=8)
    truncation: Literal["drop", "left"] = "drop"
    """Over-long examples: `drop` rejects them, `left` cuts the prompt from the left."""
    packing: bool = True
    dedupe: bool = True
    num_workers: int = Field(default=2, gt=0)
    max_reject_fraction: float = Field(default=0.1, ge=0.0, le=1.0)
    max_test_records: int | None = Field(default=None, gt=0)
    """Cap on test records per source (eval cost); the rest of the test split is dropped."""
    mix_total: int | None = Field(default=None, gt=0)
    """Train examples of the weighted mixture (see `DataSource.weight`); default: the sum of
    the sources' kept train examples."""
    exemplars: int = Field(default=8, ge=0)
    """Train records per task kept as text in `exemplars/<task>.jsonl` (chosen by content hash,
    so independent of file order) for k-shot prompting of the base model (`eval.few_shot`)."""


class LoraSettings(_Strict):
    r: int = Field(default=8, gt=0)
    alpha: float = Field(default=16.0, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )


class TrainConfig(_Strict):
    epochs: float = Field(default=1.0, gt=0)
    max_steps: int | None = Field(default=None, gt=0)
    """Optimizer steps; overrides `epochs` when set."""
    micro_batch_size: int = Field(default=8, gt=0)
    grad_accum: int | None = Field(default=None, gt=0)
    global_batch_size: int | None = Field(default=None, gt=0)
    """micro_batch_size x grad_accum x num_workers; give one of grad_accum / global_batch_size."""
    lr: float = Field(default=1e-3, gt=0)
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    weight_decay: float = Field(default=0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = Field(default=0, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    grad_clip: float = Field(default=1.0, ge=0)
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    gradient_checkpointing: bool = False
    loss: Literal["chunked", "liger", "naive"] = "chunked"
    """Cross-entropy: `chunked` (the output head and fp32 upcast a chunk of tokens at a time),
    `liger` (liger-kernel's fused linear cross-entropy: GPU workers with liger-kernel installed,
    ZeRO 0-2) or `naive` (full fp32 logits; the reference). See training/loss.py."""
    num_workers: int = Field(default=2, gt=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=1.0, gt=0)
    gpus_per_worker: float = Field(default=1.0, ge=0)
    checkpoint_every: int = Field(default=0, ge=0)
    """Checkpoint every N optimizer steps (0: only at the end)."""
    keep_checkpoints: int = Field(default=2, gt=0)
    max_failures: int = Field(default=0, ge=-1)
    log_every: int = Field(default=1, gt=0)
    eval_every: int = Field(default=0, ge=0)
    """Validation loss every N steps (0: only at the end)."""
    ds_config: str | None = None
    """A DeepSpeed JSON merged over the generated one; batch-size keys must agree."""
    lora: LoraSettings | None = None
    """Train LoRA adapters (peft) instead of all weights; `model/` gets the merged model and
    `model/adapter/` the adapter alone."""
    check_fit: bool = True
    """Refuse to start (`ift run`, `submit`, `k8s`) when `ift plan` says the run cannot fit the
    GPU (or, on CPU, the host) memory."""
    stop_after_steps: int | None = Field(default=None, gt=0)
    """Stop (after checkpointing) once this step is reached, as if interrupted: for resume tests."""

    def accumulation(self) -> int:
        """Gradient accumulation steps: the one place the batch arithmetic lives."""
        if self.grad_accum is not None:
            return self.grad_accum
        if self.global_batch_size is not None:
            return self.global_batch_size // (self.micro_batch_size * self.num_workers)
        return 1

    def global_batch(self) -> int:
        return self.micro_batch_size * self.accumulation() * self.num_workers


class EvalConfig(_Strict):
    models: list[Literal["base", "base_fewshot", "finetuned"]] = Field(
        default_factory=lambda: ["base", "finetuned"]  # type: ignore[arg-type]
    )
    """Roles to evaluate: the base model zero-shot, the base model k-shot (`few_shot`
    exemplars from the train split before each prompt), the fine-tuned model."""
    few_shot: int = Field(default=0, ge=0)
    """Exemplars per prompt for the `base_fewshot` role (at most `data.exemplars`)."""
    finetuned_model: str | None = None
    """The fine-tuned model to evaluate: a folder or an MLflow model URI (`models:/NAME@ALIAS`,
    `runs:/RUN_ID/model`); default `<experiment.output_dir>/model`."""
    max_new_tokens: int = Field(default=32, gt=0)
    batch_size: int = Field(default=16, gt=0)
    num_workers: int = Field(default=1, gt=0)
    cpus_per_worker: float = Field(default=1.0, gt=0)
    temperature: float = Field(default=0.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    num_beams: int = Field(default=1, gt=0)
    stop: list[str] = Field(default_factory=lambda: ["\n"])
    """Generation is cut at the first of these strings."""
    max_prompt_len: int | None = Field(default=None, gt=0)
    bleu_tokenize: str = "13a"
    rouge_split_sentences: bool = False
    """Split texts into one sentence per line at `.`, `!`, `?` before rougeLsum. Off (the
    default), ROUGE is rouge-score's on the texts as generated; the report says when it was
    on."""
    seed: int = 0
    bootstrap: int = Field(default=0, ge=0)
    """Bootstrap resamples for confidence intervals in the eval report (0: none)."""


class TrackingConfig(_Strict):
    enabled: bool = True
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment_name: str = "ift"
    required: bool = True
    """Fail before training when the tracking server is unreachable."""
    system_metrics: bool = True
    """CPU/GPU/memory samples (`system/*`) on every stage run."""
    log_model: bool = True
    """Log the fine-tuned model with the `transformers` flavor on the train run."""
    registered_model_name: str | None = None
    """Register the logged model under this name (default: `experiment.name`); "" disables."""
    model_alias: str = "candidate"
    """Alias set on the new model version in the Model Registry."""


class ClusterConfig(_Strict):
    address: str | None = None
    """Ray address to join (`auto`, `ray://...`); None starts a local Ray."""
    num_cpus: int | None = Field(default=None, gt=0)
    """CPUs of the local Ray started when `address` is None (default: all)."""
    gpu_memory_gb: float | None = Field(default=None, gt=0)
    """Memory of one GPU in GB, for `ift plan`'s fit check; default from `gpu_type`."""
    gpu_type: str | None = None
    """A known GPU (`ift plan` lists them, e.g. H100-80GB, A100-40GB) giving `gpu_memory_gb`."""

    # Kubernetes (`ift k8s`, rendered by launcher/k8s.py): the rest of this section.
    class Toleration(_Strict):
        """A Kubernetes pod toleration, spelt as in a pod spec."""

        key: str | None = None
        operator: Literal["Exists", "Equal"] = "Equal"
        value: str | None = None
        effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
        tolerationSeconds: int | None = None  # the Kubernetes spelling

    image: str = "ift:0.1.0"
    """Container image of the head, worker and submitter pods (built from k8s/Dockerfile)."""
    image_pull_policy: Literal["IfNotPresent", "Always", "Never"] = "IfNotPresent"
    namespace: str = "ift"
    """Namespace of the rendered objects; the MLflow ConfigMap/Secret must live there too."""
    workdir: str = "/app"
    """The project folder inside the image: relative config paths resolve against it."""
    ray_version: str = "2.60.0"
    """Ray version in the image (the RayCluster's `rayVersion`)."""
    stage: Literal["run", "prepare", "train", "eval"] = "run"
    """What the RayJob's entrypoint runs: `ift <stage> CONFIG overrides...`."""
    head_cpu: str = "2"
    """Head pod CPU request (a Kubernetes quantity)."""
    head_cpu_limit: str | None = None
    """Head pod CPU limit; defaults to the request."""
    head_memory: str = "8Gi"
    head_memory_limit: str | None = None
    worker_cpu: str = "4"
    """CPU request of each worker pod."""
    worker_cpu_limit: str | None = None
    worker_memory: str = "16Gi"
    worker_memory_limit: str | None = None
    gpus_per_worker: int | None = Field(default=None, ge=0)
    """`nvidia.com/gpu` of each worker pod; default: ceil(train.gpus_per_worker) when
    train.use_gpu, else 0."""
    worker_replicas: int | None = Field(default=None, gt=0)
    """Worker pods; default: enough for train.num_workers (one per Ray Train worker on CPU,
    packed by GPUs on GPU)."""
    node_selector: dict[str, str] = Field(default_factory=dict)
    """Node selector of the worker pods (e.g. {nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3})."""
    tolerations: list[Toleration] = Field(default_factory=list)
    """Tolerations of every Ray pod (a toleration only permits, so the head gets them too)."""
    storage_pvc: str | None = "ift-storage"
    """PVC (ReadWriteMany) mounted on head and workers at `storage_mount_path`; local
    experiment.output_dir / data.output_dir must lie under it. None: no shared volume."""
    storage_mount_path: str = "/mnt/ift"
    s3_credentials_secret: str | None = None
    """Secret with AWS_* variables (envFrom) for an s3:// experiment.output_dir."""
    mlflow_configmap: str | None = "ift-mlflow"
    """ConfigMap with MLFLOW_TRACKING_URI (k8s/base creates it); the job logs there unless
    tracking.tracking_uri is already an http(s) server."""
    mlflow_secret: str | None = None
    """Optional Secret with MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (envFrom)."""
    ray_auth: bool = True
    """Ray token authentication (KubeRay `authOptions.mode: token`), as Ray >= 2.60 expects."""
    shutdown_after_job_finishes: bool = True
    ttl_seconds_after_finished: int = Field(default=3600, ge=0)
    """Seconds the finished RayJob's cluster is kept (for logs) before deletion."""
    active_deadline_seconds: int | None = Field(default=None, gt=0)
    """Fail the RayJob after this many seconds."""
    backoff_limit: int = Field(default=0, ge=0)
    """Retries of the whole RayJob (each on a new cluster) after a failure."""

    @model_validator(mode="before")
    @classmethod
    def _numbers_as_quantities(cls, data: Any) -> Any:
        # `cluster.worker_cpu=8` parses as an int; Kubernetes quantities are strings.
        if isinstance(data, dict):
            data = {
                k: str(v)
                if k.startswith(("head_", "worker_cpu", "worker_memory"))
                and isinstance(v, int | float)
                and not isinstance(v, bool)
                else v
                for k, v in data.items()
            }
        return data

    def gpus(self, train: TrainConfig) -> int:
        """GPUs of each worker pod: the explicit value, or derived from the train section."""
        if self.gpus_per_worker is not None:
            return self.gpus_per_worker
        import math

        return math.ceil(train.gpus_per_worker) if train.use_gpu else 0

    def replicas(self, train: TrainConfig) -> int:
        """Worker pods: the explicit value, or just enough for train.num_workers."""
        if self.worker_replicas is not None:
            return self.worker_replicas
        gpus = self.gpus(train)
        if gpus > 0 and train.use_gpu and train.gpus_per_worker > 0:
            import math

            return max(1, math.ceil(train.num_workers * train.gpus_per_worker / gpus))
        return train.num_workers

    @staticmethod
    def quantity(text: str) -> float:
        """A Kubernetes quantity ("500m", "16Gi", "1e3") as a number, for comparisons."""
        suffixes = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}
        binary = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
        for suffix, scale in binary.items():
            if text.endswith(suffix):
                return float(text[: -len(suffix)]) * scale
        if text[-1:] in suffixes:
            return float(text[:-1]) * suffixes[text[-1]]
        return float(text)


class Config(_Strict):
    experiment: ExperimentConfig = Field(default_factory=ExperimentConfig)
    model: ModelConfig
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    @model_validator(mode="after")
    def _derive(self) -> Config:
        if self.data.output_dir is None:
            self.data.output_dir = join(self.experiment.output_dir, "data")
        return self

    @property
    def data_dir(self) -> str:
        assert self.data.output_dir is not None
        return self.data.output_dir

    @property
    def model_dir(self) -> str:
        return join(self.experiment.output_dir, "model")


def join(base: str, name: str) -> str:
    """Path join that keeps `s3://`-style URIs intact (pathlib collapses the double slash)."""
    if _is_remote(base):
        return base.rstrip("/") + "/" + name
    return str(Path(base) / name)


def _is_remote(path: str) -> bool:
    return "://" in path


def cross_check(cfg: Config) -> list[str]:
    """Checks that span fields or touch the filesystem. Returns every problem found."""
    problems: list[str] = []
    t = cfg.train
    if t.grad_accum is not None and t.global_batch_size is not None:
        if t.global_batch_size != t.micro_batch_size * t.grad_accum * t.num_workers:
            problems.append(
                f"train.global_batch_size: {t.global_batch_size} != micro_batch_size "
                f"{t.micro_batch_size} x grad_accum {t.grad_accum} x num_workers {t.num_workers}"
            )
    elif t.global_batch_size is not None:
        per_step = t.micro_batch_size * t.num_workers
        if t.global_batch_size % per_step:
            problems.append(
                f"train.global_batch_size: {t.global_batch_size} is not a multiple of "
                f"micro_batch_size x num_workers = {per_step}"
            )
    if t.offload_params and t.zero_stage != 3:
        problems.append("train.offload_params: parameter offload needs train.zero_stage=3")
    if t.offload_optimizer and t.zero_stage == 0:
        problems.append("train.offload_optimizer: optimizer offload needs train.zero_stage >= 1")
    if not t.use_gpu and t.precision == "fp16":
        problems.append("train.precision: fp16 needs a GPU (train.use_gpu=true); use fp32 or bf16")
    if cfg.model.attn_implementation == "flash_attention_2" and not t.use_gpu:
        # Otherwise transformers fails inside every Ray worker, after the cluster has started.
        # Whether flash_attn is installed is the workers' business: `ift submit` validates on a
        # laptop that need not have it.
        problems.append(
            "model.attn_implementation: flash_attention_2 needs a GPU (train.use_gpu=true); "
            "use sdpa or eager"
        )
    if t.loss == "liger" and not t.use_gpu:
        problems.append("train.loss: liger runs on CUDA only (train.use_gpu=true); use chunked")
    if t.loss == "liger" and t.zero_stage == 3:
        # liger reads the output head's weight outside the head's forward, where ZeRO-3 keeps
        # it partitioned. Whether liger-kernel is installed is the GPU workers' business (they
        # refuse to start without it), as for flash_attention_2.
        problems.append("train.loss: liger cannot read ZeRO-3's partitioned head; use chunked")
    if (
        t.stop_after_steps is not None
        and t.max_steps is not None
        and t.stop_after_steps > t.max_steps
    ):
        problems.append("train.stop_after_steps: larger than train.max_steps")
    e = cfg.eval
    if "base_fewshot" in e.models and e.few_shot == 0:
        problems.append("eval.models: role 'base_fewshot' needs eval.few_shot >= 1 exemplars")
    if e.few_shot > 0 and "base_fewshot" not in e.models:
        problems.append(
            f"eval.few_shot: {e.few_shot} exemplars set but eval.models has no 'base_fewshot' role"
        )
    if e.few_shot > cfg.data.exemplars:
        problems.append(
            f"eval.few_shot: {e.few_shot} exemplars but prepare keeps only "
            f"data.exemplars={cfg.data.exemplars} per task"
        )
    weighted = [s.weight is not None for s in cfg.data.sources]
    if any(weighted):
        # A source pinned to validation or test has no train examples to weigh.
        for i, (src, has) in enumerate(zip(cfg.data.sources, weighted, strict=True)):
            if not has and src.split in (None, "train"):
                problems.append(
                    f"data.sources.{i}.weight: missing; when one source has a mixing weight, "
                    "every source with train examples needs one"
                )
    elif cfg.data.mix_total is not None:
        problems.append("data.mix_total: set, but no source has a mixing weight")
    problems += k8s_cross_check(cfg)
    problems += storage_check(cfg)
    ratios = cfg.data.split
    unknown = sorted(set(ratios) - set(SPLITS))
    if unknown:
        problems.append(f"data.split: unknown split(s) {unknown}; use {list(SPLITS)}")
    if any(v < 0 for v in ratios.values()) or abs(sum(ratios.values()) - 1.0) > 1e-6:
        problems.append(f"data.split: ratios must be >= 0 and sum to 1, got {ratios}")

    return problems


# Schemes that name something no stage can write to, or that ift cannot read back.
_READ_ONLY_SCHEMES = ("http", "https", "ftp", "hf", "github")


def storage_check(cfg: Config) -> list[str]:
    """What cannot work on object storage, refused before any cluster resource starts.

    Outputs go through `data_pipeline.storage` (any filesystem pyarrow or fsspec writes), but
    models, the DeepSpeed config, `datasets` folders and SQLite are read from local disk.
    """
    problems: list[str] = []
    outputs = {"experiment.output_dir": cfg.experiment.output_dir, "data.output_dir": cfg.data_dir}
    for key, path in outputs.items():
        if not _is_remote(path):
            continue
        scheme = path.split("://", 1)[0].lower()
        if scheme in _READ_ONLY_SCHEMES:
            problems.append(f"{key}: {scheme}:// cannot be written; use a local path or s3://")
        elif not _known_scheme(scheme):
            problems.append(f"{key}: no filesystem for {scheme}:// (pyarrow or fsspec)")
        if "?" in path:
            # Stages and Ray workers join file names onto the folder: a query would end up in
            # the middle of every path.
            problems.append(
                f"{key}: options in a URI query ({path.partition('?')[2]}) are not supported "
                "for outputs; set them in the environment (AWS_ENDPOINT_URL, AWS_DEFAULT_REGION)"
            )
    for key in ("name_or_path", "tokenizer"):
        path = getattr(cfg.model, key)
        if path and _is_remote(path):
            problems.append(
                f"model.{key}: {path} is a URI; models load from a local folder only "
                "(copy it to local or shared disk first)"
            )
    if cfg.train.ds_config and _is_remote(cfg.train.ds_config):
        problems.append(f"train.ds_config: {cfg.train.ds_config} must be a local file")
    for i, src in enumerate(cfg.data.sources):
        if src.format == "hf" and _is_remote(src.path):
            problems.append(
                f"data.sources.{i}.path: a `datasets` save_to_disk folder is read from local "
                "disk only; convert it to Parquet or JSONL on object storage"
            )
    uri = cfg.tracking.tracking_uri
    if cfg.tracking.enabled and uri.startswith("sqlite:") and "://" in uri[len("sqlite:///") :]:
        problems.append(
            f"tracking.tracking_uri: SQLite needs a local file, not {uri}; use a tracking "
            "server (http://...) to share runs"
        )
    elif cfg.tracking.enabled and uri.split("://", 1)[0].lower() in ("s3", "gs", "gcs"):
        problems.append(
            f"tracking.tracking_uri: MLflow keeps no runs on {uri.split('://', 1)[0]}://; use "
            "sqlite:///mlflow.db or a tracking server (http://...)"
        )
    return problems


def _known_scheme(scheme: str) -> bool:
    import fsspec.registry

    pyarrow = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss", "file")
    return scheme in pyarrow or scheme in fsspec.registry.known_implementations


def k8s_cross_check(cfg: Config) -> list[str]:
    """The `cluster` section's Kubernetes settings against each other and the train section.

    Storage and tracking are checked where they matter, when `ift k8s` renders (the same config
    runs locally with a relative output_dir).
    """
    quantity_re = re.compile(
        r"^[+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[numkMGTPE]|[eE][+-]?[0-9]+)?$"
    )
    problems: list[str] = []
    c, t = cfg.cluster, cfg.train
    gpus = c.gpus(t)
    if c.gpus_per_worker is not None and c.gpus_per_worker > 0 and not t.use_gpu:
        problems.append(
            f"cluster.gpus_per_worker: {c.gpus_per_worker} GPU(s) per worker pod requested but "
            "train.use_gpu is false, so training would never use them; set train.use_gpu=true "
            "or cluster.gpus_per_worker=0"
        )
    elif t.use_gpu and gpus == 0:
        problems.append(
            "train.use_gpu: true but cluster.gpus_per_worker is 0, so no worker pod gets a GPU; "
            "set cluster.gpus_per_worker >= 1 or train.use_gpu=false"
        )
    elif t.use_gpu and gpus < t.gpus_per_worker:
        problems.append(
            f"cluster.gpus_per_worker: {gpus} is less than train.gpus_per_worker "
            f"{t.gpus_per_worker}; a Ray Train worker would not fit in a worker pod"
        )
    elif t.use_gpu and c.replicas(t) * gpus < t.num_workers * t.gpus_per_worker:
        problems.append(
            f"cluster.worker_replicas: {c.replicas(t)} pods x {gpus} GPU(s) cannot hold "
            f"train.num_workers {t.num_workers} x train.gpus_per_worker {t.gpus_per_worker}"
        )
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", c.namespace) or len(c.namespace) > 63:
        problems.append(f"cluster.namespace: {c.namespace!r} is not a DNS-1123 label")
    bad: set[str] = set()
    for role in ("head", "worker"):
        for res in ("cpu", "memory"):
            request = getattr(c, f"{role}_{res}")
            limit = getattr(c, f"{role}_{res}_limit")
            for key, value in ((f"{role}_{res}", request), (f"{role}_{res}_limit", limit)):
                if value is not None and not quantity_re.match(value):
                    problems.append(
                        f"cluster.{key}: {value!r} is not a Kubernetes quantity "
                        "(e.g. 4, 500m, 16Gi)"
                    )
                    bad.add(key)
            pair_ok = not {f"{role}_{res}", f"{role}_{res}_limit"} & bad
            if pair_ok and limit is not None and c.quantity(limit) < c.quantity(request):
                problems.append(
                    f"cluster.{role}_{res}_limit: {limit} is below the request "
                    f"cluster.{role}_{res} {request}"
                )
    if "worker_cpu" not in bad and not t.use_gpu and c.quantity(c.worker_cpu) < t.cpus_per_worker:
        problems.append(
            f"cluster.worker_cpu: {c.worker_cpu} is below train.cpus_per_worker "
            f"{t.cpus_per_worker}; a Ray Train worker would not fit in a worker pod"
        )
    if c.storage_pvc is not None and not c.storage_mount_path.startswith("/"):
        problems.append(f"cluster.storage_mount_path: {c.storage_mount_path!r} must be absolute")
    if not c.workdir.startswith("/"):
        problems.append(f"cluster.workdir: {c.workdir!r} must be absolute")
    return problems


def resource_checks(raw: dict[str, Any], cluster_side: bool = False) -> list[str]:
    """Model folders, source files, templates and metrics, checked on the raw dict so that they
    are reported together with schema errors.

    With `cluster_side` (`ift submit`, `ift k8s`: the run happens elsewhere), a path under
    `cluster.storage_mount_path` that this machine does not have is taken to be on the
    cluster's shared volume; the job itself reports it if it is missing there.
    """
    problems: list[str] = []
    cluster: dict[str, Any] = raw["cluster"] if isinstance(raw.get("cluster"), dict) else {}
    mount = cluster.get(
        "storage_mount_path", ClusterConfig.model_fields["storage_mount_path"].default
    )
    volume = f"{str(mount).rstrip('/')}/" if cluster_side and isinstance(mount, str) else None

    def elsewhere(path: str) -> bool:
        return volume is not None and path.startswith(volume)

    model: dict[str, Any] = raw["model"] if isinstance(raw.get("model"), dict) else {}
    for key in ("name_or_path", "tokenizer"):
        path = model.get(key)
        if isinstance(path, str) and "\x00" in path:  # os/pwd calls raise ValueError on NUL
            problems.append(f"model.{key}: path contains a NUL character: {path!r}")
            continue
        if (
            not isinstance(path, str)
            or _is_remote(path)
            or elsewhere(path)
            or Path(path).expanduser().exists()
        ):
            continue
        # A relative path whose first component exists, or an explicit ./ / ~ path, is clearly
        # meant to be local; anything else may be a hub id and is left to the loader.
        looks_local = path.startswith((".", "/", "~")) or (
            os.sep in path and Path(path.split(os.sep)[0]).exists()
        )
        if looks_local:
            problems.append(f"model.{key}: model folder not found: {path}")
    t: dict[str, Any] = raw["train"] if isinstance(raw.get("train"), dict) else {}
    ds = t.get("ds_config")
    if (
        isinstance(ds, str)
        and not _is_remote(ds)
        and not elsewhere(ds)
        and ("\x00" in ds or not Path(ds).is_file())
    ):
        problems.append(f"train.ds_config: file not found: {ds}")

    from data_pipeline.templates import validate_template
    from eval.metrics import METRIC_NAMES

    data: dict[str, Any] = raw["data"] if isinstance(raw.get("data"), dict) else {}
    sources: list[Any] = data["sources"] if isinstance(data.get("sources"), list) else []
    names: dict[str, int] = {}
    for i, src in enumerate(sources):
        if not isinstance(src, dict):
            continue
        key = f"data.sources.{i}"
        path = src.get("path")
        if (
            isinstance(path, str)
            and not _is_remote(path)
            and not elsewhere(path)
            and ("\x00" in path or not glob.glob(os.path.expanduser(path)))
        ):
            problems.append(f"{key}.path: no file matches {path}")
        template = src.get("template")
        params = src.get("params")
        # Wrongly typed params / name / metrics are schema errors, reported above; skip them here.
        if isinstance(template, str | dict) and isinstance(params, dict | None):
            try:
                validate_template(template, params or {})
            except ValueError as e:
                problems.append(f"{key}.template: {e}")
        task = src.get("name") or (template if isinstance(template, str) else Path(str(path)).stem)
        if not isinstance(task, str):
            continue
        if task in names:
            problems.append(
                f"{key}.name: task name {task!r} also used by data.sources."
                f"{names[task]}; set distinct `name`s"
            )
        names[task] = i
        metrics = src.get("metrics")
        bad = [m for m in metrics if m not in METRIC_NAMES] if isinstance(metrics, list) else []
        if bad:
            problems.append(f"{key}.metrics: unknown metric(s) {bad}; known: {list(METRIC_NAMES)}")
    return problems


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], yaml-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. train.zero_stage=3")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:  # `train.lr=[1`, `x=!!python/object:...`: a typo, not a crash
        problem = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"override {key}: value {raw!r} is not valid YAML ({problem})") from None
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted overrides to a raw config dict; list items are addressed by index."""
    out = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node: Any = out
        for depth, part in enumerate(path[:-1]):
            if isinstance(node, list):
                if not _is_index(part) or int(part) >= len(node):
                    raise ConfigError(f"{'.'.join(path[: depth + 1])}: no such list item")
                node = node[int(part)]
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
            if not isinstance(node, dict | list):
                raise ConfigError(f"{'.'.join(path[: depth + 1])}: is a value, not a section")
        last = path[-1]
        if isinstance(node, list):
            if not _is_index(last) or int(last) >= len(node):
                raise ConfigError(f"{'.'.join(path)}: no such list item")
            node[int(last)] = value
        else:
            node[last] = value
    return out


def _is_index(part: str) -> bool:
    # ASCII only: "²".isdigit() is True but int("²") raises.
    return part.isascii() and part.isdigit()


def _format_validation_error(err: ValidationError) -> list[str]:
    problems = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        problems.append(f"{key}: {msg}")
    return problems


def from_dict(raw: dict[str, Any], source: str = "<config>", cluster_side: bool = False) -> Config:
    """Validate a raw dict; raise ConfigError listing every problem (`cluster_side`: see
    `resource_checks`)."""
    problems: list[str] = []
    cfg = None
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as err:
        problems += _format_validation_error(err)
    problems += resource_checks(raw, cluster_side)
    if cfg is not None:
        problems += cross_check(cfg)
    if problems or cfg is None:
        raise ConfigError(_problem_text(source, problems))
    return cfg


def _problem_text(source: str, problems: list[str]) -> str:
    lines = "\n".join(f"  - {p}" for p in problems)
    plural = "s" if len(problems) > 1 else ""
    return f"invalid config {source} ({len(problems)} problem{plural}):\n{lines}"


def load_config(
    path: str | os.PathLike[str], overrides: list[str] | None = None, cluster_side: bool = False
) -> Config:
    """Load a YAML config, apply dotted overrides, validate everything, resolve local paths.

    Relative paths are resolved against the current directory (where `ift` runs), so Ray
    workers, whose working directory differs, see absolute paths. `cluster_side`: the config
    runs on a cluster (`ift submit`, `ift k8s`), whose shared volume this machine may not
    mount (see `resource_checks`).
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path}: top level must be a mapping of sections")
    raw = apply_overrides(raw, overrides or [])
    return resolve_paths(from_dict(raw, str(path), cluster_side))


def _abs(path: str) -> str:
    if _is_remote(path):
        return path
    return str(Path(path).expanduser().absolute())


def resolve_paths(cfg: Config) -> Config:
    """Make every local path absolute (a no-op for URIs)."""
    cfg = cfg.model_copy(deep=True)
    cfg.experiment.output_dir = _abs(cfg.experiment.output_dir)
    cfg.data.output_dir = _abs(cfg.data_dir)
    cfg.model.name_or_path = (
        _abs(cfg.model.name_or_path)
        if Path(cfg.model.name_or_path).expanduser().exists()
        else cfg.model.name_or_path
    )
    if cfg.model.tokenizer and Path(cfg.model.tokenizer).expanduser().exists():
        cfg.model.tokenizer = _abs(cfg.model.tokenizer)
    for src in cfg.data.sources:
        src.path = _abs(src.path)
    if cfg.train.ds_config:
        cfg.train.ds_config = _abs(cfg.train.ds_config)
    uri = cfg.tracking.tracking_uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        cfg.tracking.tracking_uri = "sqlite:///" + _abs(uri[len("sqlite:///") :])
    return cfg


def to_yaml(cfg: Config, redact: bool = True) -> str:
    """The resolved config as YAML; with `redact` (for logging), secrets masked as in `flatten`."""
    dumped = cfg.model_dump(mode="json")
    return yaml.safe_dump(redact_secrets(dumped) if redact else dumped, sort_keys=False)


# The password runs to the *last* `@` of the URI: an unencoded `@` or `/` in a password must not
# leave its tail visible; `redis://:pw@host` (no user) counts too.
URI_PASSWORD_RE = re.compile(r"(://[^:/@\s]*:)[^\s]*@")
# Credentials passed as query parameters (`?password=...`, `&access_token=...`, `&sig=...`).
URI_QUERY_SECRET_RE = re.compile(
    r"([?&;](?:[^=&;#\s]*[_-])?(?:password|passwd|pwd|secret|api_?key|access_?key|token|sig|"
    r"signature|credential|credentials)=)[^&;#\s]*",
    re.IGNORECASE,
)
# Leaf names that hold credentials; matched whole-word so `max_new_tokens` stays visible.
SECRET_RE = re.compile(r"(^|_)(password|passwd|secret|api_key|access_key|auth_token|token)$")


def mask_text(text: str) -> str:
    """`text` with credentials inside URIs (user:password@, ?token=...) replaced by `***`."""
    return URI_QUERY_SECRET_RE.sub(r"\1***", URI_PASSWORD_RE.sub(r"\1***@", text))


def _is_secret_key(key: str) -> bool:
    return bool(SECRET_RE.search(key.lower()))


def redact_secrets(value: Any, key: str = "") -> Any:
    """A JSON-like value with secret leaves and URI credentials masked (see `flatten`)."""
    if isinstance(value, dict):
        return {k: redact_secrets(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_secrets(v, key) for v in value]
    if _is_secret_key(key) and value not in (None, ""):
        return "***"
    return mask_text(value) if isinstance(value, str) else value


def flatten(cfg: Config) -> dict[str, str]:
    """Flattened `section.key` -> str for MLflow params; secret-looking values are masked."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for i, v in enumerate(value):
                walk(f"{prefix}.{i}", v)
        else:
            leaf = prefix.rsplit(".", 1)[-1].lower()
            secret = bool(SECRET_RE.search(leaf)) and value not in (None, "")
            # Credentials inside URIs (postgresql://user:pw@host) are masked too.
            out[prefix] = "***" if secret else mask_text(str(value))

    walk("", cfg.model_dump(mode="json"))
    return out

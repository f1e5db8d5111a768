"""`ift plan`: what a run will do and whether it fits, without Ray and without loading weights.

    ift plan configs/quickstart.yaml train.zero_stage=3 [--json] [--mfu 0.4]

Reads top to bottom: `build_plan` (config -> `Plan`), its parts (`data_plan`, `model_shape`,
`memory_plan` over the pure `model_state_bytes` and `activation_bytes`, `fit_fix`), then
`check_fit` (the hook `ift run/train/submit/k8s` call before any cluster resource) and
`format_plan`, the text renderer.

Memory is counted per rank (one GPU, or one CPU worker) the way DeepSpeed's own estimators count
it (`estimate_zero2_model_states_mem_needs`, `estimate_zero3_model_states_mem_needs`, with the
default 1.5 buffer factor for host memory): for 16-bit training the model states equal theirs
byte for byte, and for fp32 they follow what `ift train` holds (measured by benchmarks/train.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from launcher.config import Config, ConfigError

GIB = 2**30
# Records parsed, rendered and tokenized per source when there is no prepared manifest.
SAMPLE_RECORDS = 200
# Packed rows are filled to about this fraction of max_seq_len (the quickstart packs to 0.986).
PACKING_EFFICIENCY = 0.95
# Of a GPU's memory, what the plan may use: the CUDA context, NCCL buffers and the caching
# allocator's fragmentation take the rest. CPU ranks get this share of host memory too.
USABLE_FRACTION = 0.9
HOST_BUFFER_FACTOR = 1.5  # DeepSpeed's estimators' `additional_buffer_factor`


# `cluster.gpu_type` values: GiB of one GPU. Their peak FLOP/s are training/train.py's
# PEAK_FLOPS (the table MFU is logged with).
GPUS: dict[str, float] = {
    "H100-80GB": 80,
    "H200-141GB": 141,
    "A100-80GB": 80,
    "A100-40GB": 40,
    "L40S": 48,
    "A10G": 24,
    "L4": 24,
    "V100-32GB": 32,
    "V100-16GB": 16,
}


def gpu_type_problems(cfg: Config) -> list[str]:
    """`cluster.gpu_type` against the table (`ift plan` and the fit check call this)."""
    name = cfg.cluster.gpu_type
    if name is None or name in GPUS:
        return []
    return [
        f"cluster.gpu_type: unknown GPU {name!r}; known: {', '.join(GPUS)} (or set "
        "cluster.gpu_memory_gb)"
    ]


def peak_flops(gpu_type: str | None, precision: str) -> float | None:
    """Dense peak FLOP/s of one GPU of `gpu_type` at `precision`; None when unknown."""
    if gpu_type is None or gpu_type not in GPUS:
        return None
    from training.train import PEAK_FLOPS

    for key, table in PEAK_FLOPS.items():
        if gpu_type.startswith(key):
            return table.get(precision)
    return None


@dataclass
class SourcePlan:
    task: str
    path: str
    files: int
    bytes: int
    records: int
    """Good records (after `max_records`), exact from a manifest, else estimated."""
    tokens: int | None
    """Tokens of its examples (None from a manifest, which counts tokens per split only)."""


@dataclass
class DataPlan:
    origin: str
    """`manifest` (prepared data) or `sample` (estimated from the first records)."""
    note: str
    sources: list[SourcePlan]
    train_rows: int
    train_tokens: int
    splits: dict[str, dict[str, int]]
    """Per split: rows, tokens, examples."""


@dataclass(frozen=True)
class ModelShape:
    parameters: int
    trainable: int
    largest_layer: int
    """Parameters of the largest module (its own, not its children's): ZeRO-3 gathers it."""
    hidden: int
    layers: int
    heads: int
    vocab: int
    flops_per_token: float
    """Training FLOPs per token of the full model at max_seq_len (training.train's formula)."""
    lora_missing: tuple[str, ...] = ()
    """`train.lora.target_modules` that match no Linear/Embedding of the model."""


@dataclass
class Plan:
    parameters: int | None
    trainable_parameters: int | None
    steps: int
    steps_per_epoch: int
    global_batch: int
    micro_batch_size: int
    grad_accum: int
    world: int
    ranks_per_node: int
    nodes: int
    zero_stage: int
    precision: str
    offload_optimizer: bool
    offload_params: bool
    gradient_checkpointing: bool
    device: str
    """`gpu` or `cpu` (CPU ranks are checked against host memory)."""
    gpu_type: str | None
    gpu_memory_gb: float | None
    """Memory one rank may have, in GiB (a GPU's; on CPU, host memory / ranks on the node)."""
    memory_source: str
    memory: dict[str, int] | None
    """Per rank bytes: params, grads, optimizer, gathered (ZeRO-3), activations (as
    configured), activations_checkpointed, activations_full, total, and host (per node)."""
    fits: bool | None
    fix: list[str] | None
    """key=value changes that make it fit (when it does not and something does)."""
    mfu: float
    peak_flops: float | None
    epoch_seconds: float | None
    data: DataPlan | None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_plan(cfg: Config, mfu: float = 0.4, with_data: bool = True) -> Plan:
    """Everything `ift plan` prints, for a validated config.

    Args:
        cfg: the validated config (overrides applied).
        mfu: model FLOPs utilisation assumed for the time estimate.
        with_data: count records and tokens (the fit check does not need them).
    """
    t = cfg.train
    notes: list[str] = []
    data = data_plan(cfg) if with_data else None
    if data is not None and data.note:
        notes.append(data.note)
    shape = model_shape(cfg)
    if shape is None:
        notes.append(
            f"no model could be built from {cfg.model.name_or_path} here (a config.json "
            "transformers reads): parameters and memory not estimated"
        )
    elif shape.lora_missing:
        notes.append(
            f"train.lora.target_modules: {list(shape.lora_missing)} match no layer "
            "of the model (peft refuses to start)"
        )
    from training.data import steps_per_epoch, total_steps

    gb = t.global_batch()
    rows = data.train_rows if data is not None else 0
    per_epoch = steps_per_epoch(rows, gb)
    steps = total_steps(rows, gb, t.epochs, t.max_steps)
    if data is not None and per_epoch == 0:
        notes.append(f"the train split has ~{rows} rows, fewer than one global batch of {gb}")
    ranks_per_node, nodes = topology(cfg)
    capacity_gb, source = capacity(cfg, ranks_per_node)
    memory = fits = fix = None
    if shape is not None:
        memory = memory_plan(cfg, t, shape, ranks_per_node)
        if capacity_gb is not None:
            fits = _fits(memory, capacity_gb, t, ranks_per_node)
            if not fits:
                fix = fit_fix(cfg, shape, ranks_per_node, capacity_gb)
    peak = peak_flops(cfg.cluster.gpu_type, t.precision) if t.use_gpu else None
    if t.use_gpu and cfg.cluster.gpu_type in GPUS and peak is None:
        notes.append(f"cluster.gpu_type {cfg.cluster.gpu_type} has no {t.precision} support")
    epoch_s = None
    if shape is not None and peak and data is not None:
        flops = shape.flops_per_token
        if t.lora is not None:
            flops *= 4 / 6  # no weight gradients for the frozen weights (PaLM's 6N is 2N + 4N)
        if t.gradient_checkpointing:
            flops *= 8 / 6  # the forward runs twice
        epoch_s = data.train_tokens * flops / (t.num_workers * peak * mfu)
    return Plan(
        parameters=shape.parameters if shape else None,
        trainable_parameters=shape.trainable if shape else None,
        steps=steps,
        steps_per_epoch=per_epoch,
        global_batch=gb,
        micro_batch_size=t.micro_batch_size,
        grad_accum=t.accumulation(),
        world=t.num_workers,
        ranks_per_node=ranks_per_node,
        nodes=nodes,
        zero_stage=t.zero_stage,
        precision=t.precision,
        offload_optimizer=t.offload_optimizer,
        offload_params=t.offload_params,
        gradient_checkpointing=t.gradient_checkpointing,
        device="gpu" if t.use_gpu else "cpu",
        gpu_type=cfg.cluster.gpu_type,
        gpu_memory_gb=capacity_gb,
        memory_source=source,
        memory=memory,
        fits=fits,
        fix=fix,
        mfu=mfu,
        peak_flops=peak,
        epoch_seconds=epoch_s,
        data=data,
        notes=notes,
    )


# --- data -------------------------------------------------------------------------------------


def data_plan(cfg: Config) -> DataPlan:
    """Records and tokens: the prepared manifest's when it is current, else a sample's."""
    from data_pipeline.manifest import read_manifest

    stale = ""
    try:
        manifest = read_manifest(cfg.data_dir)
    except Exception as e:  # noqa: BLE001 - an unreadable store: estimate instead
        manifest, stale = None, f" ({cfg.data_dir} unreadable: {type(e).__name__})"
    if manifest is not None:
        if _manifest_current(cfg, manifest):
            return _from_manifest(manifest, cfg)
        stale = f" (the data prepared in {cfg.data_dir} is for other inputs or settings)"
    return _from_sample(cfg, stale)


def _manifest_current(cfg: Config, manifest: dict[str, Any]) -> bool:
    """Whether `ift prepare` would reuse this manifest (the same test it makes)."""
    try:
        from data_pipeline import fingerprint
        from data_pipeline.inputs import expand

        files = [expand(s.path, s.format, i) for i, s in enumerate(cfg.data.sources)]
        inputs = fingerprint.input_digests(files, manifest.get("inputs"))
        tok = cfg.model.tokenizer or cfg.model.name_or_path
        return bool(manifest.get("config_hash") == fingerprint.config_hash(cfg, files, tok, inputs))
    except Exception:  # noqa: BLE001 - missing inputs and the like: treat as not current
        return False


def _from_manifest(manifest: dict[str, Any], cfg: Config) -> DataPlan:
    splits = manifest["splits"]
    per_task: dict[str, int] = {}
    for info in splits.values():
        for task, n in info.get("per_task", {}).items():
            per_task[task] = per_task.get(task, 0) + int(n)
    sources = []
    for src in cfg.data.sources:
        files = _files(src.path, src.format)
        sources.append(
            SourcePlan(
                src.task_name,
                src.path,
                len(files),
                _total_bytes(files),
                per_task.get(src.task_name, 0),
                None,
            )
        )
    return DataPlan(
        origin="manifest",
        note="",
        sources=sources,
        train_rows=int(splits["train"]["rows"]),
        train_tokens=int(splits["train"]["tokens"]),
        splits={
            name: {k: int(info.get(k, 0)) for k in ("rows", "tokens", "examples")}
            for name, info in splits.items()
        },
    )


def _from_sample(cfg: Config, why: str) -> DataPlan:
    """Estimate from the first `SAMPLE_RECORDS` records of each source, scaled by file bytes."""
    tokenizer = _encoder(cfg)
    how = "the config's tokenizer" if tokenizer[0] is not None else "bytes/4 (no tokenizer here)"
    ratios = cfg.data.split
    sources: list[SourcePlan] = []
    split_examples = {s: 0.0 for s in ("train", "validation", "test")}
    split_tokens = {s: 0.0 for s in ("train", "validation", "test")}
    for src in cfg.data.sources:
        files = _files(src.path, src.format)
        records, tokens = _sample_source(src, files, tokenizer)
        if src.max_records is not None and records > src.max_records:
            tokens, records = tokens * src.max_records / records, src.max_records
        sources.append(
            SourcePlan(
                src.task_name,
                src.path,
                len(files),
                _total_bytes(files),
                round(records),
                round(tokens),
            )
        )
        for name in split_examples:
            share = (1.0 if src.split == name else 0.0) if src.split else ratios.get(name, 0.0)
            split_examples[name] += records * share
            split_tokens[name] += tokens * share
    if cfg.data.mix_total is not None and split_examples["train"]:
        scale = cfg.data.mix_total / split_examples["train"]
        split_examples["train"] *= scale
        split_tokens["train"] *= scale
    if cfg.data.max_test_records is not None:
        cap = cfg.data.max_test_records * len(cfg.data.sources)
        if split_examples["test"] > cap:
            split_tokens["test"] *= cap / split_examples["test"]
            split_examples["test"] = cap
    splits = {}
    for name in split_examples:
        examples, tokens = split_examples[name], split_tokens[name]
        rows = examples
        if cfg.data.packing and name != "test":  # test rows stay one example each
            rows = math.ceil(tokens / (cfg.data.max_seq_len * PACKING_EFFICIENCY))
        splits[name] = {"rows": round(rows), "tokens": round(tokens), "examples": round(examples)}
    note = (
        f"no current prepared data{why}: records and tokens estimated from the first "
        f"{SAMPLE_RECORDS} records of each source, tokens by {how}"
    )
    return DataPlan(
        origin="sample",
        note=note,
        sources=sources,
        train_rows=splits["train"]["rows"],
        train_tokens=splits["train"]["tokens"],
        splits=splits,
    )


def _files(path: str, fmt: str | None) -> list[tuple[str, str]]:
    from data_pipeline.inputs import expand

    try:
        return expand(path, fmt, 0)
    except Exception:  # noqa: BLE001 - reported by config validation / prepare
        return []


def _total_bytes(files: list[tuple[str, str]]) -> int:
    total = 0
    for path, fmt in files:
        try:
            p = Path(path)
            total += (
                sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
                if fmt == "hf"
                else (p.stat().st_size if "://" not in path else 0)
            )
        except OSError:
            pass
    return total


def _encoder(cfg: Config) -> tuple[Any, dict[str, Any], Any]:
    """(texts -> ids, `build_batch` arguments, the `chat` template's renderer) as the prepare
    workers build them; (None, {}, None) where the tokenizer does not load here."""
    from data_pipeline import templates
    from data_pipeline.tokenizer import make_encoder, tokenizer_spec

    path = cfg.model.tokenizer or cfg.model.name_or_path
    if not Path(path).is_dir():
        return None, {}, None
    try:
        spec = tokenizer_spec(path, cfg.model.trust_remote_code)
    except Exception:  # noqa: BLE001 - any loading problem: fall back to bytes/4
        return None, {}, None
    chat = None
    if spec.get("chat_template"):
        chat = templates.tokenizer_chat_template(
            spec["chat_template"], spec["special_tokens"], strip_bos=spec["bos"] is not None
        )
    build = {
        "bos_id": spec["bos"],
        "eos_id": spec["eos"],
        "max_seq_len": cfg.data.max_seq_len,
        "truncation": cfg.data.truncation,
    }
    return make_encoder(spec), build, chat


def _sample_source(
    src: Any, files: list[tuple[str, str]], tokenizer: tuple[Any, dict[str, Any], Any]
) -> tuple[float, float]:
    """(records, tokens) of one source: the records of its first file's first work unit
    counted, the first `SAMPLE_RECORDS` rendered and tokenized (rejects as prepare rejects
    them), scaled to the source's bytes."""
    from data_pipeline import templates
    from data_pipeline.inputs import plan_units, records
    from data_pipeline.sources import Reject
    from data_pipeline.worker import tokenize_turns

    if not files:
        return 0.0, 0.0
    encode, build, chat = tokenizer
    units = plan_units([files[:1]])
    parsed = [rec for _, rec in records(units[0]) if not isinstance(rec, Reject)]
    render = templates.renderer(src.template, src.params, chat_template=chat)
    turns: list[Any] = []
    for rec in parsed[:SAMPLE_RECORDS]:
        try:
            turns.append(render(rec))
        except Exception:  # noqa: BLE001, S112 - a template reject, as prepare counts it
            continue
    if not turns:
        return 0.0, 0.0
    if encode is not None:
        batch, _ = tokenize_turns(turns, encode, **build)
        kept, tokens = len(batch.kept), len(batch.input_ids)
    else:  # about 4 bytes of text per token
        kept = len(turns)
        tokens = sum(len((p + c).encode()) for t in turns for p, c in t) // 4
    # The first file's records: its first unit's scaled by bytes, or by units where a unit's
    # bytes are of a decompressed stream; the other files by their size against the first's.
    first, first_bytes = units[0], _total_bytes(files[:1])
    in_file = float(len(parsed))
    if len(units) > 1:
        span = first["end"] - first["start"]
        in_file *= first_bytes / span if span > 0 and not first.get("gz") else len(units)
    in_source = in_file * (_total_bytes(files) / first_bytes if first_bytes else len(files))
    good = in_source * kept / min(len(parsed), SAMPLE_RECORDS)
    return good, good * tokens / max(kept, 1)


# --- model ------------------------------------------------------------------------------------


def model_shape(cfg: Config) -> ModelShape | None:
    """Exact parameter counts from the model folder's config.json, on the meta device (no
    weights are read or allocated); None when the folder is not readable here."""
    path = cfg.model.name_or_path
    if not (Path(path) / "config.json").is_file():
        return None
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from training.train import model_flops_per_token

    remote = cfg.model.trust_remote_code
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=remote)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=remote)
    except Exception:  # noqa: BLE001 - e.g. remote code absent here: the plan says so
        return None
    # parameters() yields a tied weight once (DeepSpeed's model_to_params counts the same).
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    trainable, missing = total, list[str]()
    if cfg.train.lora is not None:
        trainable, missing = lora_parameters(model, cfg.train.lora.r, cfg.train.lora.target_modules)
    c = model.config
    text = getattr(c, "text_config", None) or c
    return ModelShape(
        parameters=total,
        trainable=trainable,
        largest_layer=largest,
        hidden=text.hidden_size,
        layers=text.num_hidden_layers,
        heads=text.num_attention_heads,
        vocab=text.vocab_size,
        flops_per_token=model_flops_per_token(text, cfg.data.max_seq_len),
        lora_missing=tuple(missing),
    )


def lora_parameters(model: Any, r: int, targets: list[str]) -> tuple[int, list[str]]:
    """LoRA adapter parameters peft adds for `targets` (matched as peft matches a list: the
    module's name or its last dotted parts), r x (in + out) per targeted layer; and the targets
    that match nothing."""
    import torch

    total, hit = 0, set()
    for name, module in model.named_modules():
        key = next((k for k in targets if name == k or name.endswith("." + k)), None)
        if key is None:
            continue
        if isinstance(module, torch.nn.Linear):
            total += r * (module.in_features + module.out_features)
        elif isinstance(module, torch.nn.Embedding):
            total += r * (module.num_embeddings + module.embedding_dim)
        elif type(module).__name__ == "Conv1D":  # GPT-2's transposed Linear
            total += r * sum(module.weight.shape)
        else:
            continue
        hit.add(key)
    return total, [k for k in targets if k not in hit]


# --- memory -----------------------------------------------------------------------------------


def model_state_bytes(
    params: int,
    trainable: int,
    largest_layer: int,
    *,
    precision: str,
    zero_stage: int,
    world: int,
    ranks_per_node: int,
    offload_optimizer: bool = False,
    offload_params: bool = False,
) -> dict[str, int]:
    """Per rank bytes of weights, gradients and optimizer state, plus host bytes per node.

    Bytes per parameter (P all, T trainable, N ranks), for the configs `build_ds_config` makes:
    - 16-bit (bf16/fp16): weights 2, gradients 2 plus their fp32 partition 4, fp32 master 4,
      Adam 8. ZeRO-0 20P; ZeRO-2 2P + 18T/N; ZeRO-3 18T/N (gradients counted 4, as
      DeepSpeed's estimator counts them) + 4 x the largest layer, gathered for its forward.
      ZeRO-2/3 equal DeepSpeed's estimators byte for byte: they include the fp32 gradient
      partition that lives during the optimizer step.
    - fp32: weights 4, gradients 4, Adam 8: ZeRO-0 16P; ZeRO-3 16T/N (the master partition is
      the weights', `share_zero3_fp32_master`), both measured by benchmarks/train.py;
      ZeRO-1/2 keep an fp32 master clone of the partition: 4P + 16T/N.
    ZeRO-1 counts every low-precision gradient whole (held so between micro-batches).
    Offload moves optimizer state and gradient partitions (with `offload_params` the weights
    too) to host memory, sized as the estimators size it; without offload the host still
    materialises the fp32 model per rank while loading it (ZeRO-3's zero.Init: one layer).
    """
    half = precision != "fp32"
    w = 2 if half else 4
    grad_fp32 = 4 if half else 0  # fp32: the gradient already is fp32
    master = 4 if half or zero_stage in (1, 2) else 0
    adam = 8
    n, gpn = world, ranks_per_node
    nodes = math.ceil(world / ranks_per_node)
    gathered = 0
    if zero_stage < 3:
        weights = w * params
        if zero_stage == 0:
            grads = (w + grad_fp32) * trainable
            optim = (master + adam) * trainable
        else:
            full = w if zero_stage == 1 else 0  # ZeRO-1 keeps every low-precision gradient
            shard = grad_fp32 + (0 if zero_stage == 1 else w)
            if offload_optimizer:
                grads, optim = full * trainable, 0
            else:
                grads = full * trainable + int(shard * trainable / n)
                # One int() over the whole partition, as the estimator rounds it.
                optim = int((shard + master + adam) * trainable / n) - int(shard * trainable / n)
        if offload_optimizer:
            host = int(max(params * 4 * n, trainable * 16) * HOST_BUFFER_FACTOR)
        else:
            host = int(params * 4 * gpn * HOST_BUFFER_FACTOR)
    else:
        gathered = 4 * largest_layer
        grad = 4  # 16-bit: the estimator's count; fp32: the gradient partition
        if offload_optimizer and offload_params:
            weights = grads = optim = 0
            host = int((16 * trainable + w * params) * (1 / nodes) * HOST_BUFFER_FACTOR)
        elif offload_optimizer:
            weights, grads, optim = int(w * params / n), 0, 0
            host = int(trainable * 16 * (1 / nodes) * HOST_BUFFER_FACTOR)
        else:
            weights = 0 if offload_params else int(w * params / n)
            grads = int(grad * trainable / n)
            sharded = int(
                (w * params * (not offload_params) + (grad + master + adam) * trainable) / n
            )
            optim = sharded - weights - grads
            if offload_params:
                host = int(w * params * (1 / nodes) * HOST_BUFFER_FACTOR)
            else:  # zero.Init: each rank materialises one layer at a time while loading
                host = int(largest_layer * 4 * gpn * HOST_BUFFER_FACTOR)
    return {
        "params": weights,
        "grads": grads,
        "optimizer": optim,
        "gathered": gathered,
        "host": host,
    }


def activation_bytes(
    *,
    micro_batch: int,
    seq_len: int,
    hidden: int,
    layers: int,
    heads: int,
    vocab: int,
    precision: str,
    attn_implementation: str,
    loss: str,
    checkpointing: bool,
) -> int:
    """Activations one rank keeps for the backward of one micro-batch.

    Per layer s*b*h*(34 + 5*a*s/h) bytes of 16-bit activations (Korthikanti et al. 2022,
    "Reducing Activation Recomputation", eq. 1; fp32 doubles it); sdpa and flash attention do
    not materialise the s x s scores, so only eager keeps the 5*a*s/h term. With gradient
    checkpointing: every layer's input plus one layer recomputed at a time. Plus the loss's
    logits: `naive` the whole micro-batch's, in the weights' dtype, upcast to fp32 and its fp32
    gradient; `chunked` (and `liger`) one chunk of tokens of that at a time (training/loss.py).
    """
    from training.loss import CHUNK_TOKENS, chunks_for

    w = 4 if precision == "fp32" else 2
    s, b, h = seq_len, micro_batch, hidden
    scores = 5 * heads * s * s * b if attn_implementation == "eager" else 0
    layer = (34 * s * b * h + scores) * w // 2
    body = layers * s * b * h * w + layer if checkpointing else layers * layer
    tokens = s * b
    if loss != "naive":
        tokens = -(-tokens // chunks_for(tokens, CHUNK_TOKENS))
    logits = tokens * vocab * (w + (4 if w != 4 else 0) + 4)
    return int(body + logits)


def memory_plan(cfg: Config, train: Any, shape: ModelShape, ranks_per_node: int) -> dict[str, int]:
    """Per rank bytes for `train` (the config's train section, or a changed copy)."""
    states = model_state_bytes(
        shape.parameters,
        shape.trainable,
        shape.largest_layer,
        precision=train.precision,
        zero_stage=train.zero_stage,
        world=train.num_workers,
        ranks_per_node=ranks_per_node,
        offload_optimizer=train.offload_optimizer,
        offload_params=train.offload_params,
    )
    act = {
        ckpt: activation_bytes(
            micro_batch=train.micro_batch_size,
            seq_len=cfg.data.max_seq_len,
            hidden=shape.hidden,
            layers=shape.layers,
            heads=shape.heads,
            vocab=shape.vocab,
            precision=train.precision,
            attn_implementation=cfg.model.attn_implementation,
            loss=train.loss,
            checkpointing=ckpt,
        )
        for ckpt in (False, True)
    }
    activations = act[train.gradient_checkpointing]
    total = sum(states[k] for k in ("params", "grads", "optimizer", "gathered")) + activations
    return {
        **states,
        "activations": activations,
        "activations_full": act[False],
        "activations_checkpointed": act[True],
        "total": total,
    }


def topology(cfg: Config) -> tuple[int, int]:
    """(ranks per node, nodes). GPU: a worker pod is a node holding cluster.gpus_per_worker /
    train.gpus_per_worker ranks; CPU: every rank on this machine."""
    t = cfg.train
    if not t.use_gpu:
        return t.num_workers, 1
    per_node = max(1, int(cfg.cluster.gpus(t) / max(t.gpus_per_worker, 1e-9)))
    per_node = min(per_node, t.num_workers)
    return per_node, math.ceil(t.num_workers / per_node)


def capacity(cfg: Config, ranks_per_node: int) -> tuple[float | None, str]:
    """(GiB one rank may use, where that figure comes from)."""
    t, c = cfg.train, cfg.cluster
    if not t.use_gpu:
        import psutil

        host = psutil.virtual_memory().total / GIB
        return host / ranks_per_node, f"host memory {host:.1f} GiB / {ranks_per_node} ranks"
    share = min(1.0, t.gpus_per_worker)  # fractional GPUs: ranks share one
    if c.gpu_memory_gb is not None:
        return c.gpu_memory_gb * share, "cluster.gpu_memory_gb"
    if c.gpu_type in GPUS:
        return GPUS[c.gpu_type] * share, f"cluster.gpu_type {c.gpu_type}"
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            return props.total_memory / GIB * share, f"local GPU {props.name}"
    except Exception:  # noqa: BLE001, S110 - no usable CUDA: unknown capacity
        pass
    return None, "unknown (set cluster.gpu_type or cluster.gpu_memory_gb)"


def _fits(memory: dict[str, int], capacity_gb: float, train: Any, ranks_per_node: int) -> bool:
    need = memory["total"]
    if not train.use_gpu and (train.offload_optimizer or train.offload_params):
        need += memory["host"] // ranks_per_node  # "offloaded" to the same host memory
    return need <= capacity_gb * GIB * USABLE_FRACTION


def fit_fix(
    cfg: Config, shape: ModelShape, ranks_per_node: int, capacity_gb: float
) -> list[str] | None:
    """The `train.` changes that make the run fit; None when none does.

    Tried in order, each kept while it still does not fit: gradient checkpointing, a smaller
    micro-batch, a higher ZeRO stage, optimizer offload, parameter offload. Then every change
    it also fits without is dropped (ZeRO: the lowest stage that fits), and the micro-batch is
    the largest divisor of the configured one that fits, with the grad_accum that keeps the
    global batch (unless `global_batch_size` alone sets it).
    """
    t = cfg.train
    micros = [m for m in range(t.micro_batch_size, 0, -1) if t.micro_batch_size % m == 0]
    steps: list[dict[str, Any]] = [{"gradient_checkpointing": True}, {"micro_batch_size": 1}]
    steps += [{"zero_stage": z} for z in range(t.zero_stage + 1, 4)]
    steps += [{"offload_optimizer": True}, {"offload_params": True}]

    def fits(change: dict[str, Any]) -> bool:
        train = t.model_copy(update=change)  # activations depend on the micro-batch only
        if train.offload_params and train.zero_stage != 3:
            return False
        if train.offload_optimizer and train.zero_stage == 0:
            return False
        memory = memory_plan(cfg, train, shape, ranks_per_node)
        return _fits(memory, capacity_gb, train, ranks_per_node)

    change: dict[str, Any] = {}
    for step in steps:
        change |= step
        if fits(change):
            break
    else:
        return None
    for key in [k for k in SETTINGS if k in change and k != "micro_batch_size"]:
        lower = range(t.zero_stage, change[key]) if key == "zero_stage" else [getattr(t, key)]
        for value in lower:
            if fits(change | {key: value}):
                change[key] = value
                break
    change["micro_batch_size"] = next(m for m in micros if fits(change | {"micro_batch_size": m}))
    out = [f"train.{k}={str(v).lower()}" for k, v in change.items() if getattr(t, k) != v]
    fixed_global = t.global_batch_size is not None and t.grad_accum is None
    if change["micro_batch_size"] != t.micro_batch_size and not fixed_global:
        accum = t.accumulation() * t.micro_batch_size // change["micro_batch_size"]
        out.append(f"train.grad_accum={accum}")
    return out


# --- the fit check of run / train / submit / k8s ----------------------------------------------


def check_fit(cfg: Config, pods: bool = False) -> str | None:
    """Refuse (ConfigError) a run that cannot fit; returns a one-line note when not checked.

    Called after config validation and before any cluster resource; `train.check_fit: false`
    turns it off. `pods`: the nodes are the worker pods `ift k8s` sizes, so the host memory an
    offloading GPU run needs is checked against theirs too (`host_problem`).
    """
    problems = gpu_type_problems(cfg)
    if problems:
        raise ConfigError("\n".join(problems))
    if not cfg.train.check_fit:
        return None
    if not (Path(cfg.model.name_or_path) / "config.json").is_file():
        return f"fit check skipped: the model folder {cfg.model.name_or_path} is not readable here"
    plan = build_plan(cfg, with_data=False)
    if plan.memory is None:
        return f"fit check skipped: no model could be built from {cfg.model.name_or_path}"
    if plan.fits is None:
        return f"fit check skipped: memory per rank {plan.memory_source}"
    if not plan.fits:
        raise ConfigError(_refusal(plan))
    problem = host_problem(cfg, plan) if pods else None
    if problem:
        raise ConfigError(problem)
    return None


def host_problem(cfg: Config, plan: Plan) -> str | None:
    """Why a worker pod cannot hold what a GPU run offloads to host memory (None: it can).

    Offloaded optimizer state or parameters live in the node's memory for the whole run, so a
    pod limit below it is an OOM kill after model load, hours in. The need is the plan's host
    bytes per node (DeepSpeed's estimate, with its 1.5x buffer); the pod's memory is
    `cluster.worker_memory_limit`, else `cluster.worker_memory`.
    """
    t, c = cfg.train, cfg.cluster
    if plan.memory is None or not t.use_gpu or not (t.offload_optimizer or t.offload_params):
        return None
    key = "worker_memory_limit" if c.worker_memory_limit else "worker_memory"
    pod = c.worker_memory_limit or c.worker_memory
    if plan.memory["host"] <= c.quantity(pod):
        return None
    what = " and ".join(
        name
        for name, on in (("optimizer state", t.offload_optimizer), ("parameters", t.offload_params))
        if on
    )
    return (
        f"cluster.{key}: a worker pod has {pod}, but offloading the {what} takes "
        f"{_gib(plan.memory['host'])} of host memory per node (DeepSpeed's estimate, with its "
        f"1.5x buffer; see `ift plan`): raise cluster.{key}, or spread the run over more nodes "
        "(train.num_workers)"
    )


def _refusal(plan: Plan) -> str:
    assert plan.memory is not None and plan.gpu_memory_gb is not None
    now = " ".join(f"train.{k}={str(getattr(plan, k)).lower()}" for k in SETTINGS)
    fix = f"it fits with {' '.join(plan.fix)}" if plan.fix else NO_FIX
    return (
        f"the run does not fit: {_gib(plan.memory['total'])} per "
        f"{'GPU' if plan.device == 'gpu' else 'CPU rank'} needed, "
        f"{plan.gpu_memory_gb * USABLE_FRACTION:.2f} GiB usable ({plan.memory_source}) with "
        f"{now}; {fix} (see `ift plan`; train.check_fit=false skips this check)"
    )


SETTINGS = (
    "zero_stage",
    "micro_batch_size",
    "gradient_checkpointing",
    "offload_optimizer",
    "offload_params",
)
NO_FIX = (
    "no gradient checkpointing, micro-batch, ZeRO stage or offload makes it fit: use more "
    "ranks (train.num_workers) or bigger GPUs (cluster.gpu_type)"
)


# --- text -------------------------------------------------------------------------------------


def _gib(n: float) -> str:
    if n >= GIB / 10:
        return f"{n / GIB:.2f} GiB"
    return f"{n / 2**20:.2f} MiB"


def _count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def format_plan(plan: Plan) -> str:
    """The plan as the text `ift plan` prints."""
    lines: list[str] = []
    d = plan.data
    if d is not None:
        about = "" if d.origin == "manifest" else "~"
        lines.append(f"data ({'prepared' if about == '' else 'estimated from a sample'}):")
        for s in d.sources:
            tokens = "" if s.tokens is None else f", {about}{_count(s.tokens)} tokens"
            lines.append(
                f"  {s.task}: {about}{s.records} records{tokens} "
                f"({s.files} file(s), {_gib(s.bytes)})"
            )
        for name, n in d.splits.items():
            lines.append(
                f"  {name}: {about}{n['rows']} rows, {about}{_count(n['tokens'])} "
                f"tokens, {about}{n['examples']} examples"
            )
    lines.append(
        f"steps: {plan.steps} ({plan.steps_per_epoch} per epoch); global batch "
        f"{plan.global_batch} = micro {plan.micro_batch_size} x accum {plan.grad_accum} "
        f"x {plan.world} ranks ({plan.ranks_per_node} per node, {plan.nodes} node(s))"
    )
    if plan.parameters is not None:
        lines.append(f"parameters: {plan.parameters:,}; trainable: {plan.trainable_parameters:,}")
    offload = [k for k in ("optimizer", "params") if getattr(plan, f"offload_{k}")]
    lines.append(
        f"ZeRO-{plan.zero_stage}, {plan.precision}, {plan.device.upper()}, offload: "
        f"{'+'.join(offload) or 'none'}, gradient checkpointing: "
        f"{'on' if plan.gradient_checkpointing else 'off'}"
    )
    rank = "GPU" if plan.device == "gpu" else "rank"
    m = plan.memory
    if m is not None:
        lines.append(f"memory per {rank}:")
        keys = ["params", "grads", "optimizer", "gathered", "activations", "total"]
        lines += [f"  {k:<12}{_gib(m[k]):>12}" for k in keys if m[k] or k != "gathered"]
        lines.append(
            f"  activations without / with gradient checkpointing: "
            f"{_gib(m['activations_full'])} / {_gib(m['activations_checkpointed'])}"
        )
        why = "offload" if offload else "while loading the model"
        lines.append(f"  host memory per node: {_gib(m['host'])} ({why})")
    if plan.gpu_memory_gb is None:
        lines.append(f"capacity: {plan.memory_source}")
    else:
        lines.append(
            f"capacity per {rank}: {plan.gpu_memory_gb:.2f} GiB "
            f"({plan.memory_source}), {USABLE_FRACTION:.0%} usable"
        )
    if plan.fits is not None:
        lines.append(f"fits: {'yes' if plan.fits else 'NO'}")
    if plan.fits is False:
        lines.append(f"  fix: {' '.join(plan.fix) if plan.fix else NO_FIX}")
    if plan.epoch_seconds is not None and plan.peak_flops is not None:
        lines.append(
            f"time per epoch: ~{_duration(plan.epoch_seconds)} at MFU {plan.mfu:g} "
            f"({plan.peak_flops / 1e12:g} TFLOP/s peak per GPU)"
        )
    else:
        why = "on CPU" if plan.device == "cpu" else "without a known cluster.gpu_type"
        lines.append(f"time per epoch: not estimated {why}")
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"

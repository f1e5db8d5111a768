"""The train job: DeepSpeed ZeRO in every Ray Train worker, resumable, logged from rank 0.

    ift train configs/quickstart.yaml train.zero_stage=3

Reads top to bottom: `train()` is the driver (plans steps, writes the DeepSpeed config, runs a
`TorchTrainer`); `train_worker()` runs in each worker (model -> `deepspeed.initialize` -> resume
-> loop -> checkpoints -> final model); helpers follow.

Loss: summed token cross-entropy over the completion tokens of a micro-batch, scaled by
`accumulation x world / tokens in the global batch`. DeepSpeed divides by the accumulation steps
and averages gradients over ranks, so each optimizer step minimises the mean over every loss
token of the global batch, not a mean of per-micro-batch means.

Resume: checkpoints go through `ray.train.report`, under
`<output_dir>/checkpoints/run-<hash>/`. Running the same experiment again (same output_dir and
settings) restarts from the latest complete one with the optimizer, LR schedule, RNG and data
position; the data position is just the step, because the order of examples is a function of
(seed, epoch).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

from data_pipeline import storage
from training import batch as tbatch
from training import data as tdata
from training import loss as tloss
from training.ds_config import (
    build_ds_config,
    load_user_config,
    lr_multiplier,
    model_hidden_size,
)
from training.mlflow_logger import MetricLogger

TRAIN_STATE = "ift_train.json"
CKPT_TAG = "ds"
UPLOAD_DELAY_ENV = "IFT_TEST_CHECKPOINT_UPLOAD_DELAY_S"
# Train settings that do not change the result: a rerun that only changes these still resumes.
RUNTIME_ONLY = (
    "stop_after_steps",
    "max_failures",
    "checkpoint_every",
    "keep_checkpoints",
    "log_every",
    "eval_every",
    "cpus_per_worker",
)


class TrainError(RuntimeError):
    user_facing = True


def train(
    cfg: Any,
    manifest: dict[str, Any],
    tracking: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Fine-tune `cfg.model` on the prepared data; returns a summary (steps, final loss, paths).

    Args:
        cfg: a validated `launcher.config.Config`.
        manifest: the prepared-data manifest.
        tracking: {"tracking_uri", "run_id"} of the MLflow run rank 0 logs to, or None.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t = cfg.train
    out = cfg.experiment.output_dir
    tdata.check_manifest(manifest, cfg.data_dir)  # before any resume: old data has no store
    n_rows = manifest["splits"]["train"]["rows"]
    gb = t.global_batch()
    if tdata.steps_per_epoch(n_rows, gb) == 0:
        raise TrainError(
            f"the train split has {n_rows} rows, fewer than one global batch of {gb} "
            "(train.micro_batch_size x grad_accum x num_workers); lower it or add data"
        )
    steps = tdata.total_steps(n_rows, gb, t.epochs, t.max_steps)
    run_hash = train_hash(cfg, manifest)
    done = _finished(cfg.model_dir, run_hash)
    if done:
        log(f"[train] reusing {cfg.model_dir}: finished with the same data and settings")
        return done

    # The hidden size sizes the GPU ZeRO buckets; read from config.json, no weights loaded.
    hidden = model_hidden_size(cfg.model.name_or_path) if t.use_gpu else None
    ds_cfg = build_ds_config(t, load_user_config(t.ds_config), hidden_size=hidden)
    storage.write_json(storage.join(out, "deepspeed_config.json"), ds_cfg)
    log(
        f"[train] {steps} steps x global batch {gb} (micro {t.micro_batch_size} x accum "
        f"{t.accumulation()} x {t.num_workers} workers), ZeRO-{t.zero_stage}, {t.precision}, "
        f"{'GPU' if t.use_gpu else 'CPU'}"
    )

    resources = {"CPU": t.cpus_per_worker}
    if t.use_gpu:
        resources["GPU"] = t.gpus_per_worker
    # An object store (s3://...) goes to Ray as a pyarrow filesystem plus its path, so that a
    # URI's query (endpoint_override=...) reaches every worker; a local path as it is.
    ckpt_fs, ckpt_path = storage.filesystem(storage.join(out, "checkpoints"))
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "cfg": cfg,
            "manifest": manifest,
            "ds_config": ds_cfg,
            "total_steps": steps,
            "tracking": tracking,
            "run_hash": run_hash,
        },
        scaling_config=ScalingConfig(
            num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources
        ),
        # One Ray run per train identity: rerunning the same experiment resumes it, while a
        # changed setting starts a fresh run instead of loading incompatible state.
        run_config=RunConfig(
            name=f"run-{run_hash[:12]}",
            storage_path=ckpt_path,
            storage_filesystem=ckpt_fs if storage.is_uri(out) else None,
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
            failure_config=FailureConfig(max_failures=t.max_failures),
        ),
    )
    result = trainer.fit()
    if result.error:
        raise TrainError(f"training failed: {result.error}")
    metrics = dict(result.metrics or {})
    metrics["checkpoint"] = result.checkpoint.path if result.checkpoint else None
    return metrics


def train_worker(config: dict[str, Any]) -> None:
    """Per-worker loop (runs inside a Ray Train worker with torch.distributed set up)."""
    import deepspeed
    import torch

    from training import context as run_context

    cfg = config["cfg"]
    t = cfg.train
    manifest = config["manifest"]
    total = config["total_steps"]
    ctx = run_context.get_context()  # Ray Train's, or the one-process stand-in
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if not t.use_gpu:
        torch.set_num_threads(max(1, int(t.cpus_per_worker)))
    torch.manual_seed(cfg.experiment.seed)
    # Wrap the process group Ray Train created, so deepspeed.comm (and zero.Init while the
    # model loads) sees the real world size.
    deepspeed.init_distributed(dist_backend="nccl" if t.use_gpu else "gloo")

    tok, model = _load_model(cfg, config["ds_config"])
    flops_per_token = model_flops_per_token(model.config, cfg.data.max_seq_len)
    peak = peak_flops(t.precision) if t.use_gpu else None
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=config["ds_config"],
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_multiplier(s, t, total)
        ),
        dist_init_required=False,
    )
    share_zero3_fp32_master(engine)
    # The loss comes out of the model's own forward (see training/loss.py); the head calls per
    # micro-batch follow from its largest size.
    tloss.install(engine.module, t.loss, max_tokens=t.micro_batch_size * cfg.data.max_seq_len)
    start = 0
    last: dict[str, float] = {}
    ckpt = run_context.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            _, state = engine.load_checkpoint(d, tag=CKPT_TAG)
        if state.get("run_hash") != config["run_hash"]:
            raise TrainError(
                f"the checkpoints under {cfg.experiment.output_dir}/checkpoints come from a "
                "different model, data or train settings; use another experiment.output_dir "
                "or delete them"
            )
        start = int(state["step"])
        last = dict(state.get("metrics", {}))
        torch.set_rng_state(state["torch_rng"])
        _restore_cuda_rng(state.get("cuda_rng"))  # absent in checkpoints before CUDA RNG
        if rank == 0:
            print(f"[train] resumed from step {start}", flush=True)

    train_split = tdata.load_split(cfg.data_dir, manifest, "train")
    val_split = (
        tdata.load_split(cfg.data_dir, manifest, "validation")
        if manifest["splits"]["validation"]["rows"]
        else None
    )
    logger = MetricLogger(**(config["tracking"] or {"tracking_uri": None, "run_id": None}))
    gb, micro, accum = t.global_batch(), t.micro_batch_size, t.accumulation()
    n = len(train_split)
    t_start = t_prev = time.perf_counter()
    tokens_seen = 0
    engine.train()
    step = start
    for step in range(start, total):
        lr = scheduler.get_last_lr()[0]
        loss_value, step_tokens = optimizer_step(
            engine,
            train_split,
            step,
            seed=cfg.experiment.seed,
            global_batch=gb,
            micro=micro,
            accum=accum,
            rank=rank,
            world=world,
            pad_id=pad_id,
        )
        # Throughput of the whole loop (the period since the previous step ended), so the time
        # spent logging, validating and checkpointing counts against it too.
        now = time.perf_counter()
        dt, t_prev = now - t_prev, now
        tokens_seen += step_tokens
        grad_norm = engine.get_global_grad_norm()
        last = {
            "train/loss": loss_value,
            "train/lr": lr,
            "train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "train/tokens_per_s": step_tokens / dt,
            "train/epoch": step / max(tdata.steps_per_epoch(n, gb), 1),
        }
        if peak:
            last["train/mfu"] = step_tokens / dt * flops_per_token / (peak * world)
        done = step + 1
        if val_split is not None and t.eval_every and done % t.eval_every == 0 and done < total:
            last.update(_validate(engine, val_split, pad_id, rank, world, micro))
        if rank == 0:
            logger.log(last, step=done)
            if done % t.log_every == 0 or done == total:
                elapsed = time.perf_counter() - t_start
                eta = elapsed / (done - start) * (total - done)
                # The driver's console reads this line (forwarded by Ray) for its progress
                # bar: launcher/console.py's TRAIN_STEP pattern.
                print(
                    f"[train] step {done}/{total} loss {last['train/loss']:.4f} lr {lr:.2e} "
                    f"grad_norm {last['train/grad_norm']:.3f} tok/s "
                    f"{last['train/tokens_per_s']:.0f} eta {_fmt_s(eta)}",
                    flush=True,
                )
        stopping = t.stop_after_steps is not None and done >= t.stop_after_steps and done < total
        if done < total and (stopping or (t.checkpoint_every and done % t.checkpoint_every == 0)):
            _checkpoint(engine, done, config["run_hash"], last, rank)
        if stopping:
            if rank == 0:
                print(f"[train] stopped after step {done} (train.stop_after_steps)", flush=True)
            logger.close()
            return

    if val_split is not None:
        last.update(_validate(engine, val_split, pad_id, rank, world, micro))
    last["train/steps"] = float(total)
    last["train/tokens"] = float(tokens_seen)
    if rank == 0:
        logger.log({k: v for k, v in last.items() if k.startswith("val/")}, step=total)
        logger.close()
        if "val/loss" in last:
            print(
                f"[train] validation loss {last['val/loss']:.4f} token accuracy "
                f"{last['val/token_accuracy']:.3f}",
                flush=True,
            )
    # Checkpoint before the final model: merging LoRA weights changes the module in place.
    _checkpoint(engine, total, config["run_hash"], last, rank)
    _save_final_model(engine, tok, cfg, config["run_hash"], last, rank)


def optimizer_step(
    engine: Any,
    split: tdata.Split,
    step: int,
    *,
    seed: int,
    global_batch: int,
    micro: int,
    accum: int,
    rank: int,
    world: int,
    pad_id: int,
) -> tuple[float, int]:
    """One optimizer step over global batch `step` (every micro-batch of this rank).

    Returns the mean loss per completion token over the whole global batch and the number of
    tokens (padding excluded) all ranks processed. The engine's module must have the loss
    installed (`training.loss.install`).
    """
    import torch
    import torch.distributed as dist

    layout = tbatch.layout_for(engine.module.config._attn_implementation)
    batch = tdata.global_batch_indices(step, len(split), global_batch, seed)
    loss_tokens = split.loss_tokens(batch)  # the same on every rank: the global normaliser
    scale = accum * world / max(loss_tokens, 1)
    loss_sum = torch.zeros((), dtype=torch.float64)
    n_tokens = 0
    for a in range(accum):
        rows = split.rows(tdata.micro_batch_indices(batch, micro, a, rank, world))
        loss = _loss_sums(engine, tbatch.collate(rows, pad_id, layout))["loss"]
        engine.backward(loss * scale)
        engine.step()
        loss_sum += loss.detach().double().cpu()
        n_tokens += sum(len(ids) for ids, _, _ in rows)
    totals = torch.tensor([float(loss_sum), float(n_tokens)], dtype=torch.float64)
    dist.all_reduce(totals)
    return float(totals[0]) / max(loss_tokens, 1), int(totals[1])


def share_zero3_fp32_master(engine: Any) -> int:
    """Drop ZeRO-3's second fp32 copy of this rank's parameter partition; returns bytes freed.

    With fp32 parameters and no optimizer offload, DeepSpeed (0.19) means the fp32 master
    partition to *be* the parameter partition, but its check compares a `torch.device` with a
    device-name string, which is never equal, so it clones it: 4 bytes x parameters / world
    extra per rank. Sharing the storage is what its own aliasing branch does (the master and
    the partition hold the same values until the first step, which then writes both).
    """
    opt = engine.optimizer
    low = getattr(opt, "fp16_partitioned_groups_flat", None)
    high = getattr(opt, "fp32_partitioned_groups_flat", None)
    if not low or not high or getattr(opt, "offload_optimizer", False):
        return 0
    freed = 0
    for lo, hi in zip(low, high, strict=True):
        if (
            lo is not None
            and lo.dtype == hi.dtype
            and lo.device == hi.device
            and lo.shape == hi.shape
            and lo.data_ptr() != hi.data_ptr()
        ):
            hi.data = lo.data  # same Python object: the optimizer's param groups follow
            freed += hi.numel() * hi.element_size()
    return freed


def model_flops_per_token(model_config: Any, seq_len: int) -> float:
    """Training FLOPs per token of a decoder-only transformer: 6 x parameters in matmuls plus
    the attention score/value matmuls, 12 x layers x hidden x seq (the PaLM MFU formula)."""
    c = model_config
    hidden, layers = c.hidden_size, c.num_hidden_layers
    heads, kv = c.num_attention_heads, getattr(c, "num_key_value_heads", c.num_attention_heads)
    head_dim = getattr(c, "head_dim", None) or hidden // heads
    attn = hidden * head_dim * (2 * heads + 2 * kv)  # q, o and k, v projections
    mlp = 3 * hidden * c.intermediate_size
    matmul_params = layers * (attn + mlp) + hidden * c.vocab_size  # + the output head
    return 6.0 * matmul_params + 12.0 * layers * hidden * seq_len


# Dense peak FLOP/s per GPU by precision (vendors' data sheets, no sparsity), for MFU and
# `ift plan`'s time estimate; matched as a substring of the device name (`cluster.gpu_type` as
# a prefix), first match wins: L40S before L4. Unknown devices report no MFU.
PEAK_FLOPS = {
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
    "L40S": {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12},
    "A10G": {"bf16": 70e12, "fp16": 70e12, "fp32": 31.2e12},
    "L4": {"bf16": 121e12, "fp16": 121e12, "fp32": 30.3e12},
    "V100": {"fp16": 125e12, "fp32": 15.7e12},  # no bf16
}


def peak_flops(precision: str) -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, table in PEAK_FLOPS.items():
        if key in name:
            return table.get(precision)
    return None


def _load_model(cfg: Any, ds_config: dict[str, Any]) -> tuple[Any, Any]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        cfg.model.tokenizer or cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code
    )
    dschf = None
    if cfg.train.zero_stage == 3:
        # Keeps a reference alive so from_pretrained partitions weights as it loads them
        # (zero.Init): a model bigger than one worker's memory never materialises whole.
        from transformers.integrations import HfDeepSpeedConfig

        dschf = HfDeepSpeedConfig(ds_config)  # noqa: F841
    model = _base_model(cfg)
    model.config.use_cache = False
    if cfg.train.lora is not None:
        from peft import get_peft_model

        # Under ZeRO-3 the adapter layers are created outside zero.Init (unpartitioned);
        # deepspeed.initialize partitions them with the rest.
        model = get_peft_model(model, _lora_config(cfg))
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    del dschf
    return tok, model


def _base_model(cfg: Any) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    return AutoModelForCausalLM.from_pretrained(
        cfg.model.name_or_path,
        dtype=dtype[cfg.model.dtype],
        attn_implementation=cfg.model.attn_implementation,
        trust_remote_code=cfg.model.trust_remote_code,
    )


def _lora_config(cfg: Any) -> Any:
    from peft import LoraConfig

    lora = cfg.train.lora
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )


def _validate(
    engine: Any, split: tdata.Split, pad_id: int, rank: int, world: int, micro: int
) -> dict[str, float]:
    """Token-level loss and accuracy over the whole validation split, rows sharded by rank."""
    import torch
    import torch.distributed as dist

    layout = tbatch.layout_for(engine.module.config._attn_implementation)
    engine.eval()
    sums = torch.zeros(3, dtype=torch.float64)  # loss, tokens, correct
    mine = list(range(rank, len(split), world))
    # Every rank runs the same number of forward passes: ZeRO-3 gathers parameters collectively.
    n_batches = math.ceil(math.ceil(len(split) / world) / micro)
    with torch.no_grad():
        for i in range(n_batches):
            idx = mine[i * micro : (i + 1) * micro] or [0]
            out = _loss_sums(engine, tbatch.collate(split.rows(idx), pad_id, layout), True)
            if mine[i * micro : (i + 1) * micro]:
                sums += torch.tensor(
                    [float(out["loss"]), float(out["loss_tokens"]), float(out["correct"])],
                    dtype=torch.float64,
                )
    dist.all_reduce(sums)
    engine.train()
    return {
        "val/loss": float(sums[0] / sums[1].clamp(min=1)),
        "val/token_accuracy": float(sums[2] / sums[1].clamp(min=1)),
    }


def _loss_sums(engine: Any, batch: tbatch.Batch, accuracy: bool = False) -> dict[str, Any]:
    """The installed loss's sums (`loss`, `loss_tokens`, `correct` when `accuracy`) of one
    micro-batch, through the engine's forward so DeepSpeed sees the loss it returns."""
    inputs = tbatch.to_device(batch, engine.device)
    labels = inputs.pop("labels")
    return engine(**inputs, loss_labels=labels, loss_accuracy=accuracy, use_cache=False)  # type: ignore[no-any-return]


def _checkpoint(
    engine: Any, step: int, run_hash: str, metrics: dict[str, float], rank: int
) -> None:
    """Every rank saves its ZeRO shard into a temp dir; Ray merges them into one checkpoint.

    The RNG states go with it, so dropout after a resume draws what it would have drawn. The
    data order is keyed by (seed, epoch) and draws from no global numpy or Python RNG."""
    import torch

    from training import context as run_context

    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(
            tmp,
            tag=CKPT_TAG,
            client_state={
                "step": step,
                "run_hash": run_hash,
                "torch_rng": torch.get_rng_state(),
                # Every visible device's generator (a Ray GPU worker sees its own GPU only).
                "cuda_rng": torch.cuda.get_rng_state_all() if _cuda_in_use() else None,
                "metrics": metrics,  # so a run resumed at the last step still reports its loss
            },
        )
        # Ray registers the checkpoint only once every rank has uploaded its files, so a run
        # killed mid-upload leaves a partial `step_*` folder that resuming never picks up.
        delay = float(os.environ.get(UPLOAD_DELAY_ENV, "0"))
        run_context.report(
            {**metrics, "step": step},
            checkpoint_dir=tmp,
            dir_name=f"step_{step:07d}",
            upload_fn=(lambda c, name: _slow_upload(c, name, delay)) if delay else None,
        )


def _cuda_in_use() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_initialized()


def _restore_cuda_rng(states: list[Any] | None) -> None:
    """Set the CUDA generators saved by `_checkpoint`; none on a CPU run, or for a checkpoint
    saved without CUDA. Devices beyond those saved keep their seeded state."""
    import torch

    if not states or not torch.cuda.is_available():
        return
    for device, state in enumerate(states[: torch.cuda.device_count()]):
        torch.cuda.set_rng_state(state.cpu(), device)


def _slow_upload(checkpoint: Any, dir_name: str, delay: float) -> Any:
    """Test hook (`IFT_TEST_CHECKPOINT_UPLOAD_DELAY_S`, local storage only): upload file by file
    with a pause before each, so a fault test can kill the run while a checkpoint is half
    written. The real path is Ray's own upload."""
    import ray.train
    from ray.train import Checkpoint

    dest = os.path.join(ray.train.get_context().get_storage().experiment_fs_path, dir_name)
    for root, _, files in os.walk(checkpoint.path):
        for name in sorted(files):
            src = os.path.join(root, name)
            target = os.path.join(dest, os.path.relpath(src, checkpoint.path))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            time.sleep(delay)
            shutil.copyfile(src, target)
    return Checkpoint(dest)


def _save_final_model(
    engine: Any, tok: Any, cfg: Any, run_hash: str, metrics: dict[str, float], rank: int
) -> None:
    """Consolidate the ZeRO shards into `model/` (Hugging Face format) atomically, from rank 0.

    Saved to a local folder first; locally it is renamed into place, on an object store
    uploaded with `TRAIN_STATE` (what `_finished` reads) last, after the old model's marker
    and files were deleted: a crash midway never leaves a model that looks finished.
    """
    if cfg.train.zero_stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # collective: every rank calls it
    else:
        state = engine.module.state_dict() if rank == 0 else None
    if rank != 0:
        return
    final = cfg.model_dir
    local = storage.local_path(final)
    tmp = f"{local}.tmp-{os.getpid()}" if local else tempfile.mkdtemp(prefix="ift-model-")
    shutil.rmtree(tmp, ignore_errors=True)
    state = {k: v.detach().cpu().clone() for k, v in state.items()}
    module = engine.module
    if cfg.train.lora is not None:
        module = _merge_lora(cfg, state, os.path.join(tmp, "adapter"))
        state = module.state_dict()
    module.save_pretrained(tmp, state_dict=state, safe_serialization=True)
    tok.save_pretrained(tmp)
    with open(os.path.join(tmp, TRAIN_STATE), "w") as f:
        json.dump({"run_hash": run_hash, "metrics": metrics}, f, indent=2)
    if local:
        shutil.rmtree(local, ignore_errors=True)
        os.replace(tmp, local)
    else:
        storage.delete(storage.join(final, TRAIN_STATE))
        storage.delete(final)
        storage.upload_folder(tmp, final, last=[TRAIN_STATE])
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"[train] model saved to {final}", flush=True)


def _merge_lora(cfg: Any, state: dict[str, Any], adapter_dir: str) -> Any:
    """Saves the adapter alone (peft format) to `adapter_dir` and returns the merged model.

    Works from the consolidated state dict on a fresh, unpartitioned copy of the model: under
    ZeRO-3 the engine's own parameters are shards, which neither peft's save nor its merge can
    read.
    """
    from peft import get_peft_model

    model = get_peft_model(_base_model(cfg), _lora_config(cfg))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied weights may be stored once; every adapter weight must be there.
    if unexpected or any("lora_" in k for k in missing):
        raise TrainError(f"LoRA state does not fit the model: {missing=} {unexpected=}")
    model.save_pretrained(adapter_dir)
    return model.merge_and_unload()


def train_hash(cfg: Any, manifest: dict[str, Any]) -> str:
    """Identity of a training run: model, data fingerprint and every result-changing setting."""
    train = cfg.train.model_dump(mode="json")
    for k in RUNTIME_ONLY:
        train.pop(k, None)
    payload = {
        "model": cfg.model.model_dump(mode="json"),
        "data": manifest["fingerprint"],
        "train": train,
        "seed": cfg.experiment.seed,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _finished(model_dir: str, run_hash: str) -> dict[str, Any] | None:
    """The final metrics of a finished run with this hash in `model_dir` (local or a URI)."""
    state = storage.read_json(storage.join(model_dir, TRAIN_STATE))
    if state is None:
        return None
    return state["metrics"] if state.get("run_hash") == run_hash else None  # type: ignore[no-any-return]


def _fmt_s(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"

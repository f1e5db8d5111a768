"""Baselines for benchmarks/train.py, run under torchrun (no Ray):

    torchrun --nproc_per_node 2 benchmarks/_train_baselines.py MODE SPEC.json OUT.json

MODE `deepspeed`: the plain torchrun + DeepSpeed loop a user would write, with the very same
model, data, DeepSpeed config, step code (`training.train.optimizer_step`), per-step metrics
and timing as `ift train`, so the difference to ift is Ray Train's orchestration only.
MODE `hf`: the Hugging Face Trainer with DeepSpeed on the same packed rows (its own loss: mean
per micro-batch), the tool users would otherwise reach for.
MODE `memory`: per-rank bytes of parameters + gradients + optimizer state after the first
optimizer step and the second backward (see `run_memory`), for the ZeRO stage in the spec, on a
random-init model.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import torch
import torch.distributed as dist


def main() -> None:
    mode, spec_path, out_path = sys.argv[1:4]
    with open(spec_path) as f:
        spec = json.load(f)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    result = {"deepspeed": run_deepspeed, "hf": run_hf, "memory": run_memory}[mode](spec)
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(result, f)


def _model(path: str) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.config.use_cache = False
    return model


def run_deepspeed(spec: dict[str, Any]) -> dict[str, Any]:
    """The loop of `training.train.train_worker` without Ray: the same step, the same per-step
    bookkeeping (grad norm, LR, metrics to MLflow from rank 0) and the same timing (the period
    between consecutive step ends), in the main thread of a torchrun process."""
    import deepspeed

    from training import data as tdata
    from training import loss as tloss
    from training.mlflow_logger import MetricLogger
    from training.train import optimizer_step

    rank, world = dist.get_rank(), dist.get_world_size()
    split = tdata.load_split(spec["data_dir"], spec["manifest"], "train")
    engine, _, _, scheduler = deepspeed.initialize(
        model=_model(spec["model"]),
        model_parameters=None,
        config=spec["ds_config"],
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
    )
    # As `train_worker` does: the same loss (train.loss's default) and batch layout.
    tloss.install(engine.module, "chunked", max_tokens=spec["micro"] * spec["max_seq_len"])
    engine.train()
    tracking = spec.get("tracking") if rank == 0 else None
    logger = MetricLogger(**(tracking or {"tracking_uri": None, "run_id": None}))
    times, tokens = [], []
    t_prev = time.perf_counter()
    for step in range(spec["steps"]):
        lr = scheduler.get_last_lr()[0]
        loss, n = optimizer_step(
            engine,
            split,
            step,
            seed=spec["seed"],
            global_batch=spec["gb"],
            micro=spec["micro"],
            accum=spec["accum"],
            rank=rank,
            world=world,
            pad_id=0,
        )
        now = time.perf_counter()
        times.append(now - t_prev)
        t_prev = now
        tokens.append(n)
        grad_norm = engine.get_global_grad_norm()
        logger.log(
            {
                "train/loss": loss,
                "train/lr": lr,
                "train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "train/tokens_per_s": n / times[-1],
            },
            step=step + 1,
        )
    logger.close()
    return {"step_seconds": times, "step_tokens": tokens}


def run_hf(spec: dict[str, Any]) -> dict[str, Any]:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from training import batch as tbatch
    from training import data as tdata

    split = tdata.load_split(spec["data_dir"], spec["manifest"], "train")
    model = _model(spec["model"])
    # The batches ift hands the same model (its layout for the model's attention); the Trainer
    # computes its own loss from their `labels`.
    layout = tbatch.layout_for(model.config._attn_implementation)

    class Rows(torch.utils.data.Dataset):  # type: ignore[type-arg]
        def __len__(self) -> int:
            return len(split)

        def __getitem__(self, i: int) -> int:
            return i

    def collate(idx: list[int]) -> tbatch.Batch:
        return tbatch.collate(split.rows(idx), 0, layout)

    times: list[float] = []
    tokens: list[int] = []

    class Timer(TrainerCallback):
        """Step end to step end, the span ift and the plain loop time: on_step_begin comes
        after the Trainer has fetched and collated the step's micro-batches, so timing from
        it would leave the data loading out of the Trainer's steps only."""

        def on_train_begin(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
            self.t_prev = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
            now = time.perf_counter()
            times.append(now - self.t_prev)
            self.t_prev = now

    ds = dict(spec["ds_config"])
    ds.pop("optimizer", None)  # the Trainer builds its own AdamW (same hyper-parameters)
    args = TrainingArguments(
        output_dir=spec["tmp"],
        per_device_train_batch_size=spec["micro"],
        gradient_accumulation_steps=spec["accum"],
        max_steps=spec["steps"],
        learning_rate=spec["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=1.0,
        logging_steps=10**6,
        save_strategy="no",
        report_to=[],
        deepspeed=ds,
        use_cpu=True,
        dataloader_num_workers=0,
        seed=spec["seed"],
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Rows(),
        data_collator=collate,
        callbacks=[Timer()],
    )
    trainer.train()
    # Tokens per optimizer step: every rank's micro-batches are as big as ift's, on average.
    mean_row = int(split.row_tokens[-1]) / len(split)
    tokens = [int(mean_row * spec["gb"])] * len(times)
    return {"step_seconds": times, "step_tokens": tokens}


def run_memory(spec: dict[str, Any]) -> dict[str, Any]:
    """Per-rank bytes held for training state, counted identically for every ZeRO stage.

    Pinned measurement point: after the first optimizer step and the backward pass of the
    second (before its step), i.e. when optimizer state and a full set of gradients coexist:
    the peak of persistent state. Counted: parameters as this rank holds them (a ZeRO-3 shard
    or the whole tensor), fp32 master weights, optimizer moments and gradients (as stored:
    `.grad` or ZeRO's flat partition buffers). Every tensor is counted by its storage, once:
    ZeRO keeps parameters and gradients as views into flat buffers, and counting views by data
    pointer would count those bytes twice. Activations are gone at this point.
    """
    import deepspeed
    from transformers import LlamaConfig, LlamaForCausalLM

    from training.train import share_zero3_fp32_master

    cfg = LlamaConfig(**spec["llama"])
    ds = spec["ds_config"]
    if ds["zero_optimization"]["stage"] == 3:
        with deepspeed.zero.Init(config_dict_or_path=ds):
            model = LlamaForCausalLM(cfg)
    else:
        model = LlamaForCausalLM(cfg)
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    engine, *_ = deepspeed.initialize(model=model, model_parameters=None, config=ds)
    share_zero3_fp32_master(engine)  # as `ift train` does (a no-op below ZeRO-3)
    ids = torch.randint(0, cfg.vocab_size, (1, 64))
    for step in range(2):
        loss = engine(input_ids=ids, labels=ids, use_cache=False).loss
        engine.backward(loss)
        if step == 0:
            engine.step()
    state, grads = _state_storages(engine)
    held = torch.tensor([float(sum(state.values())), float(sum(grads.values()))])
    gathered = [torch.zeros(2) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, held)
    return {
        "params": n_params,
        "bytes_per_rank": [float(g.sum()) for g in gathered],
        "grad_bytes_per_rank": [float(g[1]) for g in gathered],
        "rss_bytes": _rss(),
    }


def _state_storages(engine: Any) -> tuple[dict[int, int], dict[int, int]]:
    """{storage pointer: bytes} of the parameters + optimizer state, and of the gradients."""
    state: dict[int, int] = {}
    grads: dict[int, int] = {}

    def add(t: Any, into: dict[int, int]) -> None:
        if isinstance(t, torch.Tensor) and t.numel():
            s = t.untyped_storage()
            if s.data_ptr() not in state and s.data_ptr() not in grads:
                into[s.data_ptr()] = s.nbytes()

    def walk(obj: Any, into: dict[int, int], depth: int = 0) -> None:
        if isinstance(obj, torch.Tensor):
            add(obj, into)
        elif depth < 3 and isinstance(obj, (list, tuple)):
            for x in obj:
                walk(x, into, depth + 1)
        elif depth < 3 and isinstance(obj, dict):
            for x in obj.values():
                walk(x, into, depth + 1)

    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    # Gradients first, so a flat gradient buffer is never mistaken for state.
    for p in engine.module.parameters():
        add(p.grad, grads)
    for group in inner.param_groups:
        for p in group["params"]:
            add(p.grad, grads)
    for name, value in vars(opt).items():
        if "grad" in name:
            walk(value, grads)
    for p in engine.module.parameters():  # parameters as held on this rank
        add(p.ds_tensor if hasattr(p, "ds_tensor") else p.data, state)
    for group in inner.param_groups:  # fp32 master partitions of ZeRO optimizers
        for p in group["params"]:
            add(p.data, state)
    walk(list(inner.state.values()), state)
    for name, value in vars(opt).items():  # ZeRO's flat parameter partitions
        if "grad" not in name:
            walk(value, state)
    return state, grads


def _rss() -> int:
    import psutil

    return int(psutil.Process(os.getpid()).memory_info().rss)


if __name__ == "__main__":
    main()

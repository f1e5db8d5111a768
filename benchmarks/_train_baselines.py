"""Baselines for benchmarks/train.py, run under torchrun (no Ray):

    torchrun --nproc_per_node 2 benchmarks/_train_baselines.py MODE SPEC.json OUT.json

MODE `deepspeed`: the plain torchrun + DeepSpeed loop a user would write, with the very same
model, data, DeepSpeed config and step code as `ift train` (`training.train.optimizer_step`),
so the difference to ift is Ray Train's orchestration only.
MODE `hf`: the Hugging Face Trainer with DeepSpeed on the same packed rows (its own loss: mean
per micro-batch), the tool users would otherwise reach for.
MODE `memory`: per-rank bytes of parameters + gradients + optimizer state after one step, for
the ZeRO stage in the spec, on a random-init model.
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
    import deepspeed

    from training import data as tdata
    from training.train import optimizer_step

    rank, world = dist.get_rank(), dist.get_world_size()
    split = tdata.load_split(spec["data_dir"], spec["manifest"], "train")
    engine, *_ = deepspeed.initialize(
        model=_model(spec["model"]), model_parameters=None, config=spec["ds_config"]
    )
    times, tokens = [], []
    for step in range(spec["steps"]):
        t0 = time.perf_counter()
        _, n = optimizer_step(
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
        times.append(time.perf_counter() - t0)
        tokens.append(n)
    return {"step_seconds": times, "step_tokens": tokens}


def run_hf(spec: dict[str, Any]) -> dict[str, Any]:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from training import data as tdata

    split = tdata.load_split(spec["data_dir"], spec["manifest"], "train")

    class Rows(torch.utils.data.Dataset):  # type: ignore[type-arg]
        def __len__(self) -> int:
            return len(split)

        def __getitem__(self, i: int) -> int:
            return i

    def collate(idx: list[int]) -> dict[str, torch.Tensor]:
        return tdata.collate(split, idx, pad_id=0)

    times: list[float] = []
    tokens: list[int] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
            times.append(time.perf_counter() - self.t0)

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
        model=_model(spec["model"]),
        args=args,
        train_dataset=Rows(),
        data_collator=collate,
        callbacks=[Timer()],
    )
    trainer.train()
    # Tokens per optimizer step: every rank's micro-batches are as big as ift's, on average.
    mean_row = sum(len(x) for x in split.input_ids) / len(split)
    tokens = [int(mean_row * spec["gb"])] * len(times)
    return {"step_seconds": times, "step_tokens": tokens}


def run_memory(spec: dict[str, Any]) -> dict[str, Any]:
    import deepspeed
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**spec["llama"])
    ds = spec["ds_config"]
    if ds["zero_optimization"]["stage"] == 3:
        with deepspeed.zero.Init(config_dict_or_path=ds):
            model = LlamaForCausalLM(cfg)
    else:
        model = LlamaForCausalLM(cfg)
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    engine, *_ = deepspeed.initialize(model=model, model_parameters=None, config=ds)
    ids = torch.randint(0, cfg.vocab_size, (1, 64))
    # Measure at the peak of persistent state: optimizer state exists (after one step) and the
    # gradients of the next step are still held (after backward, before step).
    for step in range(2):
        loss = engine(input_ids=ids, labels=ids, use_cache=False).loss
        engine.backward(loss)
        if step == 0:
            engine.step()
    seen: set[int] = set()
    total = 0

    def add(t: Any) -> None:
        nonlocal total
        if isinstance(t, torch.Tensor) and t.numel() and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()

    for p in engine.module.parameters():  # parameters as held on this rank
        add(p.ds_tensor if hasattr(p, "ds_tensor") else p.data)
        add(p.grad)
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    for group in inner.param_groups:  # fp32 master partitions of ZeRO optimizers
        for p in group["params"]:
            add(p.data)
            add(p.grad)
    for state in inner.state.values():
        for v in state.values():
            add(v)
    for name in (
        "fp32_partitioned_groups_flat",
        "single_partition_of_fp32_groups",
        "averaged_gradients",
        "fp16_partitioned_groups_flat",
    ):
        obj = getattr(opt, name, None)
        for t in obj.values() if isinstance(obj, dict) else (obj or []):
            if isinstance(t, list):
                for x in t:
                    add(x)
            else:
                add(t)
    totals = torch.tensor([float(total)])
    gathered = [torch.zeros(1) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, totals)
    return {"params": n_params, "bytes_per_rank": [float(g) for g in gathered], "rss_bytes": _rss()}


def _rss() -> int:
    import psutil

    return int(psutil.Process(os.getpid()).memory_info().rss)


if __name__ == "__main__":
    main()

"""The DeepSpeed config as a pure function of the train config.

Batch arithmetic lives in `TrainConfig.accumulation()` and nowhere else; every DeepSpeed key is
filled here (the `"auto"` values of the Hugging Face integration do not exist outside it).

CPU and GPU differ only where the hardware does. On GPU (`train.use_gpu`):
- the optimizer is torch's AdamW with `fused=True` (one CUDA kernel for the whole step).
  DeepSpeed (0.19) builds `torch.optim.AdamW(params, **optimizer.params)` when `torch_adam` is
  set, so the key reaches torch unchanged. DeepSpeed's own FusedAdam is not used: it is a JIT
  op that needs nvcc and a build on every fresh image, for the same arithmetic. With optimizer
  offload the step runs on CPU tensors, so it stays unfused there.
- under ZeRO-2/3, `overlap_comm` is on (reductions overlap the backward pass) and the buckets
  follow the model's hidden size as the Hugging Face integration's `"auto"` values do.
CPU runs keep the settings tuned there: gloo has no separate stream to overlap on, and small
buckets keep a worker's peak memory low.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any


class DeepSpeedConfigError(ValueError):
    user_facing = True


BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def build_ds_config(
    train: Any, user_config: dict[str, Any] | None = None, *, hidden_size: int | None = None
) -> dict[str, Any]:
    """DeepSpeed config for a `launcher.config.TrainConfig`.

    Args:
        train: the train section of the config.
        user_config: a user DeepSpeed dict merged over the generated one; batch keys that
            disagree with the train config are an error.
        hidden_size: the model's hidden size (`model_hidden_size`), which sizes the ZeRO-2/3
            buckets on GPU. Without it GPU runs keep the fixed CPU bucket sizes.
    """
    accum = train.accumulation()
    cfg: dict[str, Any] = {
        "train_batch_size": train.micro_batch_size * accum * train.num_workers,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": train.grad_clip,
        "steps_per_print": 10**9,  # ift prints its own progress
        "wall_clock_breakdown": False,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": train.lr,
                "betas": list(train.betas),
                "eps": 1e-8,
                "weight_decay": train.weight_decay,
                # torch's AdamW rather than DeepSpeed's JIT-built ops: nothing to compile on
                # CPU, and results stay comparable across ZeRO stages.
                "torch_adam": True,
                "adam_w_mode": True,
            },
        },
        "zero_optimization": _zero(train, hidden_size),
        "bf16": {"enabled": train.precision == "bf16"},
        "fp16": {"enabled": train.precision == "fp16", "initial_scale_power": 16},
    }
    if train.use_gpu and not train.offload_optimizer:
        # Passed through to torch.optim.AdamW (see the module docstring).
        cfg["optimizer"]["params"]["fused"] = True
    if train.offload_optimizer:
        # Keep torch's AdamW with offload instead of requiring the JIT-built DeepSpeedCPUAdam.
        cfg["zero_force_ds_cpu_optimizer"] = False
    if user_config:
        cfg = merge_user_config(cfg, user_config)
    return cfg


def lr_multiplier(step: int, train: Any, total_steps: int) -> float:
    """LR multiplier for optimizer step `step` (0-based): linear warmup, then cosine/linear decay
    to `min_lr_ratio`, or constant. A torch `LambdaLR` over this is handed to DeepSpeed, which
    steps it and stores it in checkpoints; DeepSpeed's own schedulers cannot express a zero-step
    warmup."""
    warmup = min(train.warmup_steps, max(total_steps - 1, 0))
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if train.schedule == "constant":
        return 1.0
    decay_steps = max(total_steps - warmup - 1, 1)
    progress = min(max(step - warmup, 0) / decay_steps, 1.0)
    floor = train.min_lr_ratio
    if train.schedule == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return floor + (1 - floor) * (1 - progress)


def model_hidden_size(model_path: str) -> int | None:
    """The hidden size in `<model_path>/config.json`, found as the Hugging Face integration
    finds it (`hidden_size`, else the largest of `hidden_sizes`, also under `text_config`);
    None when the folder has no config.json or it names none. Reads no weights."""
    path = os.path.join(model_path, "config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        config = json.load(f)
    for node in (config, config.get("text_config") or {}):
        if isinstance(node.get("hidden_size"), int):
            return int(node["hidden_size"])
        if node.get("hidden_sizes"):
            return int(max(node["hidden_sizes"]))
    return None


def _zero(train: Any, hidden_size: int | None = None) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": train.zero_stage}
    if train.zero_stage >= 1:
        zero.update(
            {
                "overlap_comm": False,
                "contiguous_gradients": True,
                "reduce_bucket_size": 5e7,
                "allgather_bucket_size": 5e7,
            }
        )
    if train.zero_stage == 3:
        # Gather full weights on save so `model/` is a plain Hugging Face checkpoint.
        zero.update(
            {
                "stage3_gather_16bit_weights_on_model_save": True,
                "stage3_param_persistence_threshold": 1e4,
                "stage3_prefetch_bucket_size": 5e7,
            }
        )
    if train.use_gpu and train.zero_stage >= 2:
        # NCCL reduces on its own stream, so the reduction overlaps the backward pass.
        zero["overlap_comm"] = True
        if hidden_size:
            # The values transformers' `HfTrainerDeepSpeedConfig.trainer_config_finalize`
            # (integrations/deepspeed.py) puts in place of "auto": reduce buckets of
            # hidden^2 elements; under ZeRO-3 prefetch 0.9 x hidden^2 and keep parameters
            # smaller than 10 x hidden (norms, biases) whole on every rank.
            zero["reduce_bucket_size"] = hidden_size * hidden_size
            if train.zero_stage == 3:
                zero["stage3_prefetch_bucket_size"] = int(0.9 * hidden_size * hidden_size)
                zero["stage3_param_persistence_threshold"] = 10 * hidden_size
    if train.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": train.use_gpu}
    if train.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": train.use_gpu}
    return zero


def merge_user_config(base: dict[str, Any], user: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `user` over `base`; a batch key that disagrees is an error, not a silent win."""
    autos = _auto_keys(user)
    if autos:
        raise DeepSpeedConfigError(
            "train.ds_config: "
            + ", ".join(f"'{k}' is 'auto'" for k in autos)
            + "; ift fills every value itself: remove the key(s) or give numbers"
        )
    conflicts = [
        f"{k}: ds_config says {user[k]}, train config gives {base[k]}"
        for k in BATCH_KEYS
        if k in user and user[k] != "auto" and user[k] != base[k]
    ]
    if conflicts:
        raise DeepSpeedConfigError(
            "train.ds_config conflicts with the batch arithmetic of the train section "
            "(set micro_batch_size / grad_accum / num_workers instead): " + "; ".join(conflicts)
        )

    def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        out = dict(a)
        for k, v in b.items():
            if k in BATCH_KEYS:
                continue
            out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        return out

    return merge(base, user)


def _auto_keys(node: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose value is "auto" (only the Hugging Face Trainer resolves those)."""
    if isinstance(node, dict):
        return [k for key, v in node.items() for k in _auto_keys(v, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if node == "auto" else []


def load_user_config(path: str | None) -> dict[str, Any] | None:
    if path is None:
        return None
    with open(path) as f:
        return json.load(f)  # type: ignore[no-any-return]

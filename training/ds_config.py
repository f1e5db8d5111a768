"""The DeepSpeed config as a pure function of the train config.

Batch arithmetic lives in `TrainConfig.accumulation()` and nowhere else; every DeepSpeed key is
filled here (the `"auto"` values of the Hugging Face integration do not exist outside it).
"""

from __future__ import annotations

import json
import math
from typing import Any


class DeepSpeedConfigError(ValueError):
    user_facing = True


BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def build_ds_config(train: Any, user_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """DeepSpeed config for a `launcher.config.TrainConfig`.

    Args:
        train: the train section of the config.
        user_config: a user DeepSpeed dict merged over the generated one; batch keys that
            disagree with the train config are an error.
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
                # torch's AdamW: the fused CUDA kernel does not exist on CPU, and results stay
                # comparable across ZeRO stages.
                "torch_adam": True,
                "adam_w_mode": True,
            },
        },
        "zero_optimization": _zero(train),
        "bf16": {"enabled": train.precision == "bf16"},
        "fp16": {"enabled": train.precision == "fp16", "initial_scale_power": 16},
    }
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


def _zero(train: Any) -> dict[str, Any]:
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

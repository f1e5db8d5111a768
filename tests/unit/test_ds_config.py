"""Tests for training.ds_config: the DeepSpeed dict is a pure function of the train config."""

from __future__ import annotations

import math

import pytest

from launcher.config import TrainConfig
from training.ds_config import (
    DeepSpeedConfigError,
    build_ds_config,
    lr_multiplier,
    merge_user_config,
)

# --- batch keys -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("micro", "accum", "workers"),
    [(1, 1, 1), (4, 2, 2), (2, 4, 1), (8, 1, 4), (3, 5, 3)],
)
def test_batch_keys_follow_train_config(micro: int, accum: int, workers: int) -> None:
    train = TrainConfig(micro_batch_size=micro, grad_accum=accum, num_workers=workers)
    ds = build_ds_config(train)
    assert ds["train_micro_batch_size_per_gpu"] == micro
    assert ds["gradient_accumulation_steps"] == accum
    assert ds["train_batch_size"] == micro * accum * workers == train.global_batch()


def test_batch_keys_from_global_batch_size() -> None:
    train = TrainConfig(micro_batch_size=2, global_batch_size=24, num_workers=3)
    ds = build_ds_config(train)
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 24


def test_optimizer_follows_train_config() -> None:
    train = TrainConfig(lr=2e-4, weight_decay=0.01, betas=(0.8, 0.99), grad_clip=0.5)
    ds = build_ds_config(train)
    params = ds["optimizer"]["params"]
    assert ds["optimizer"]["type"] == "AdamW"
    assert (params["lr"], params["weight_decay"], params["betas"]) == (2e-4, 0.01, [0.8, 0.99])
    assert ds["gradient_clipping"] == 0.5


def test_no_auto_values_are_generated() -> None:
    train = TrainConfig(zero_stage=3, offload_optimizer=True, offload_params=True)

    def values(node: object) -> list[object]:
        if isinstance(node, dict):
            return [v for x in node.values() for v in values(x)]
        return [node]

    assert "auto" not in values(build_ds_config(train))


# --- ZeRO and precision -----------------------------------------------------------------------


def test_zero_stage_0_has_no_zero_tuning() -> None:
    assert build_ds_config(TrainConfig(zero_stage=0))["zero_optimization"] == {"stage": 0}


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_stage_1_and_2(stage: int) -> None:
    zero = build_ds_config(TrainConfig(zero_stage=stage))["zero_optimization"]
    assert zero["stage"] == stage
    assert "stage3_gather_16bit_weights_on_model_save" not in zero
    assert "offload_optimizer" not in zero and "offload_param" not in zero


def test_zero_stage_3_gathers_weights_on_save() -> None:
    zero = build_ds_config(TrainConfig(zero_stage=3))["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True


def test_optimizer_offload_block() -> None:
    ds = build_ds_config(TrainConfig(zero_stage=2, offload_optimizer=True))
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": False}
    assert "offload_param" not in ds["zero_optimization"]
    assert ds["zero_force_ds_cpu_optimizer"] is False


def test_param_offload_block_pins_memory_on_gpu() -> None:
    ds = build_ds_config(TrainConfig(zero_stage=3, offload_params=True, use_gpu=True))
    assert ds["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert "zero_force_ds_cpu_optimizer" not in ds


@pytest.mark.parametrize(
    ("precision", "bf16", "fp16"),
    [("fp32", False, False), ("bf16", True, False), ("fp16", False, True)],
)
def test_precision_flags(precision: str, bf16: bool, fp16: bool) -> None:
    ds = build_ds_config(TrainConfig(precision=precision, use_gpu=True))
    assert ds["bf16"]["enabled"] is bf16
    assert ds["fp16"]["enabled"] is fp16


# --- CPU vs GPU -------------------------------------------------------------------------------


def _flat(node: object, prefix: str = "") -> dict[str, object]:
    if isinstance(node, dict):
        return {k: v for key, x in node.items() for k, v in _flat(x, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): node}


def cpu_gpu_diff(hidden: int | None = 2048, **train: object) -> dict[str, tuple[object, object]]:
    """{dotted key: (CPU value, GPU value)} for every key whose value differs; a key present on
    one side only shows as None on the other."""
    cpu = _flat(build_ds_config(TrainConfig(use_gpu=False, **train), hidden_size=hidden))
    gpu = _flat(build_ds_config(TrainConfig(use_gpu=True, **train), hidden_size=hidden))
    return {
        k: (cpu.get(k), gpu.get(k)) for k in cpu.keys() | gpu.keys() if cpu.get(k) != gpu.get(k)
    }


FUSED = {"optimizer.params.fused": (None, True)}
OVERLAP = {"zero_optimization.overlap_comm": (False, True)}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("stage", [0, 1])
def test_gpu_below_zero2_only_fuses_the_optimizer(stage: int, precision: str) -> None:
    assert cpu_gpu_diff(zero_stage=stage, precision=precision) == FUSED


def test_gpu_zero2_overlaps_and_sizes_the_reduce_bucket_by_hidden() -> None:
    assert cpu_gpu_diff(2048, zero_stage=2, precision="bf16") == {
        **FUSED,
        **OVERLAP,
        "zero_optimization.reduce_bucket_size": (5e7, 2048 * 2048),
    }


def test_gpu_zero3_sizes_every_bucket_as_the_hf_auto_values() -> None:
    assert cpu_gpu_diff(2048, zero_stage=3, precision="bf16") == {
        **FUSED,
        **OVERLAP,
        "zero_optimization.reduce_bucket_size": (5e7, 4194304),
        "zero_optimization.stage3_prefetch_bucket_size": (5e7, 3774873),  # int(0.9 x 2048^2)
        "zero_optimization.stage3_param_persistence_threshold": (1e4, 20480),
    }


def test_gpu_with_optimizer_offload_keeps_the_unfused_cpu_step() -> None:
    diff = cpu_gpu_diff(64, zero_stage=3, offload_optimizer=True, offload_params=True)
    assert diff == {
        **OVERLAP,
        "zero_optimization.reduce_bucket_size": (5e7, 64 * 64),
        "zero_optimization.stage3_prefetch_bucket_size": (5e7, int(0.9 * 64 * 64)),
        "zero_optimization.stage3_param_persistence_threshold": (1e4, 640),
        "zero_optimization.offload_optimizer.pin_memory": (False, True),
        "zero_optimization.offload_param.pin_memory": (False, True),
    }


def test_gpu_without_a_hidden_size_keeps_the_fixed_buckets() -> None:
    assert cpu_gpu_diff(None, zero_stage=3) == {**FUSED, **OVERLAP}


def test_cpu_config_ignores_the_hidden_size() -> None:
    for stage in (0, 1, 2, 3):
        train = TrainConfig(zero_stage=stage)
        assert build_ds_config(train, hidden_size=4096) == build_ds_config(train)


def test_user_config_still_wins_over_gpu_defaults() -> None:
    ds = build_ds_config(
        TrainConfig(zero_stage=2, use_gpu=True),
        {"zero_optimization": {"overlap_comm": False, "reduce_bucket_size": 1e6}},
        hidden_size=1024,
    )
    assert ds["zero_optimization"]["overlap_comm"] is False
    assert ds["zero_optimization"]["reduce_bucket_size"] == 1e6


@pytest.mark.parametrize("use_gpu", [False, True])
def test_deepspeed_builds_torch_adamw_fused_only_on_gpu(use_gpu: bool) -> None:
    """The optimizer block goes through DeepSpeed's own construction (`torch_adam` path), so a
    key it dropped or renamed would show here. torch's fused AdamW also runs on CPU tensors."""
    import torch
    from deepspeed.runtime.engine import DeepSpeedEngine

    params = build_ds_config(TrainConfig(use_gpu=use_gpu, zero_stage=0))["optimizer"]["params"]

    class Engine:  # the parts of DeepSpeedEngine its optimizer construction reads
        get_optimizer_configuration = DeepSpeedEngine.get_optimizer_configuration

        def optimizer_params(self) -> dict:
            return params

        def optimizer_name(self) -> str:
            return "adamw"

        def zero_use_cpu_optimizer(self) -> bool:
            return False

    weight = torch.nn.Parameter(torch.ones(4))
    opt = DeepSpeedEngine._configure_basic_optimizer(Engine(), [weight])
    assert type(opt) is torch.optim.AdamW
    assert bool(opt.defaults["fused"]) is use_gpu
    weight.grad = torch.ones(4)
    opt.step()  # the fused kernel takes the step
    assert torch.all(weight < 1)


def test_model_hidden_size_reads_config_json(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json
    from pathlib import Path

    from training.ds_config import model_hidden_size

    stories = Path(__file__).resolve().parents[1] / "assets" / "models" / "stories260K"
    assert model_hidden_size(str(stories)) == 64
    assert model_hidden_size(str(tmp_path)) is None  # no config.json
    for config, want in [
        ({"hidden_sizes": [96, 384, 768]}, 768),
        ({"text_config": {"hidden_size": 320}}, 320),
        ({"n_embd": 12}, None),
    ]:
        (tmp_path / "config.json").write_text(json.dumps(config))
        assert model_hidden_size(str(tmp_path)) == want


# --- user JSON merge --------------------------------------------------------------------------


def base() -> dict:
    return build_ds_config(TrainConfig(micro_batch_size=2, grad_accum=2, num_workers=2))


def test_user_config_deep_merges_non_batch_key() -> None:
    ds = build_ds_config(
        TrainConfig(zero_stage=2),
        {"zero_optimization": {"reduce_bucket_size": 1e6}, "wall_clock_breakdown": True},
    )
    assert ds["zero_optimization"]["reduce_bucket_size"] == 1e6
    assert ds["zero_optimization"]["stage"] == 2  # untouched siblings survive
    assert ds["zero_optimization"]["contiguous_gradients"] is True
    assert ds["wall_clock_breakdown"] is True


def test_user_config_adds_new_sections() -> None:
    ds = merge_user_config(base(), {"activation_checkpointing": {"partition_activations": True}})
    assert ds["activation_checkpointing"] == {"partition_activations": True}


def test_merge_does_not_mutate_base() -> None:
    b = base()
    merge_user_config(b, {"zero_optimization": {"reduce_bucket_size": 1}})
    assert b["zero_optimization"]["reduce_bucket_size"] == 5e7


def test_agreeing_batch_keys_are_accepted() -> None:
    ds = merge_user_config(base(), {"train_batch_size": 8, "gradient_accumulation_steps": 2})
    assert ds["train_batch_size"] == 8


@pytest.mark.parametrize(
    "key", ["train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"]
)
def test_conflicting_batch_key_raises_naming_it(key: str) -> None:
    with pytest.raises(DeepSpeedConfigError, match=key):
        merge_user_config(base(), {key: 999})


@pytest.mark.parametrize(
    ("user", "key"),
    [
        ({"gradient_clipping": "auto"}, "gradient_clipping"),
        ({"optimizer": {"params": {"lr": "auto"}}}, "lr"),
        ({"zero_optimization": {"reduce_bucket_size": "auto"}}, "reduce_bucket_size"),
    ],
)
def test_auto_value_raises(user: dict, key: str) -> None:
    with pytest.raises(DeepSpeedConfigError, match=f"{key}' is 'auto'"):
        merge_user_config(base(), user)


def test_auto_nested_in_new_section_raises() -> None:
    user = {"zero_optimization": {"offload_optimizer": {"device": "cpu", "pin_memory": "auto"}}}
    with pytest.raises(DeepSpeedConfigError, match="auto"):
        merge_user_config(base(), user)


# --- learning-rate schedule -------------------------------------------------------------------


def sched(schedule: str, warmup: int = 4, min_lr_ratio: float = 0.1) -> TrainConfig:
    return TrainConfig(schedule=schedule, warmup_steps=warmup, min_lr_ratio=min_lr_ratio)


# total 13 steps, warmup 4: decay over steps 4..12 (8 intervals); step 6 is a quarter in.
TOTAL = 13


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_warmup_is_linear_from_first_step(schedule: str) -> None:
    train = sched(schedule)
    got = [lr_multiplier(s, train, TOTAL) for s in range(5)]
    assert got == pytest.approx([1 / 5, 2 / 5, 3 / 5, 4 / 5, 1.0])


def test_cosine_values() -> None:
    train = sched("cosine")
    assert lr_multiplier(4, train, TOTAL) == pytest.approx(1.0)
    quarter = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))  # 0.868198...
    assert lr_multiplier(6, train, TOTAL) == pytest.approx(quarter)
    assert lr_multiplier(8, train, TOTAL) == pytest.approx(0.55)
    assert lr_multiplier(TOTAL - 1, train, TOTAL) == pytest.approx(0.1)


def test_linear_values() -> None:
    train = sched("linear")
    assert lr_multiplier(4, train, TOTAL) == pytest.approx(1.0)
    assert lr_multiplier(6, train, TOTAL) == pytest.approx(0.775)
    assert lr_multiplier(8, train, TOTAL) == pytest.approx(0.55)
    assert lr_multiplier(TOTAL - 1, train, TOTAL) == pytest.approx(0.1)


def test_constant_after_warmup() -> None:
    train = sched("constant")
    assert [lr_multiplier(s, train, TOTAL) for s in range(4, TOTAL)] == [1.0] * (TOTAL - 4)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_decay_is_monotone_and_stays_at_floor(schedule: str) -> None:
    train = sched(schedule, min_lr_ratio=0.25)
    values = [lr_multiplier(s, train, TOTAL) for s in range(4, TOTAL + 3)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    assert values[TOTAL - 1 - 4 :] == pytest.approx([0.25] * 4)


def test_no_warmup_starts_at_full_lr() -> None:
    train = sched("cosine", warmup=0, min_lr_ratio=0.0)
    assert lr_multiplier(0, train, 11) == pytest.approx(1.0)
    assert lr_multiplier(5, train, 11) == pytest.approx(0.5)
    assert lr_multiplier(10, train, 11) == pytest.approx(0.0)


def test_warmup_longer_than_run_is_clipped() -> None:
    train = sched("cosine", warmup=10)
    got = [lr_multiplier(s, train, 3) for s in range(3)]
    assert got == pytest.approx([1 / 3, 2 / 3, 1.0])


def test_single_step_run_uses_full_lr() -> None:
    assert lr_multiplier(0, sched("cosine", warmup=5), 1) == pytest.approx(1.0)


def test_model_flops_per_token_matches_hand_count() -> None:
    from transformers import LlamaConfig

    from training.train import model_flops_per_token

    c = LlamaConfig(
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=5,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=512,
    )
    # per layer: q,o 64x64 each; k,v 64x32 each; mlp 3x64x172; head 64x512
    matmul = 5 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 172) + 64 * 512
    assert model_flops_per_token(c, 256) == 6 * matmul + 12 * 5 * 64 * 256


# --- train-related cross checks (launcher.config.cross_check) ---------------------------------


def _cfg(model: dict | None = None, **train: object):  # type: ignore[no-untyped-def]
    from launcher.config import from_dict

    root = "tests/assets"
    return from_dict(
        {
            "model": {"name_or_path": f"{root}/models/stories260K", **(model or {})},
            "data": {"sources": [{"path": f"{root}/data/sst2/train.tsv", "template": "sst2"}]},
            "train": {"micro_batch_size": 2, "grad_accum": 1, "num_workers": 2, **train},
            "tracking": {"enabled": False},
        }
    )


@pytest.fixture
def _in_repo_root(monkeypatch: pytest.MonkeyPatch) -> None:
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[2])


@pytest.mark.usefixtures("_in_repo_root")
def test_lora_is_accepted_under_zero3() -> None:
    cfg = _cfg(zero_stage=3, lora={"r": 4})
    assert cfg.train.lora is not None and cfg.train.zero_stage == 3


@pytest.mark.usefixtures("_in_repo_root")
def test_flash_attention_without_gpu_is_a_config_error_naming_the_key() -> None:
    from launcher.config import ConfigError

    with pytest.raises(ConfigError, match=r"model\.attn_implementation: flash_attention_2 needs"):
        _cfg(model={"attn_implementation": "flash_attention_2"})

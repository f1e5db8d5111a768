"""`ift plan` and the fit check: memory agrees with DeepSpeed's estimators and the benchmark's
measurement, parameter counts with the real models, and `ift run` refuses what cannot fit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from launcher import cli
from launcher.config import load_config
from launcher.plan import build_plan, format_plan, model_shape, model_state_bytes

QUICKSTART = "configs/quickstart.yaml"
STORIES = "tests/assets/models/stories260K"
RESULTS = Path("benchmarks/results/train.json")
STATE_KEYS = ("params", "grads", "optimizer", "gathered")

pytestmark = pytest.mark.usefixtures("one_thread")


def _gpu_states(states: dict[str, int]) -> int:
    return sum(states[k] for k in STATE_KEYS)


@pytest.mark.parametrize(("per_node", "nodes"), [(1, 1), (8, 1), (8, 4), (3, 2)])
@pytest.mark.parametrize("offload", [False, True])
def test_zero2_equals_deepspeeds_estimator(per_node: int, nodes: int, offload: bool) -> None:
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    params = 6_738_415_617  # odd, so every division rounds
    cpu, gpu = estimate_zero2_model_states_mem_needs(
        total_params=params, num_gpus_per_node=per_node, num_nodes=nodes, cpu_offload=offload
    )
    states = model_state_bytes(
        params,
        params,
        131_072_000,
        precision="bf16",
        zero_stage=2,
        world=per_node * nodes,
        ranks_per_node=per_node,
        offload_optimizer=offload,
    )
    assert (_gpu_states(states), states["host"]) == (gpu, cpu)


@pytest.mark.parametrize(("per_node", "nodes"), [(1, 1), (8, 1), (8, 4), (3, 2)])
@pytest.mark.parametrize(
    ("offload_optimizer", "offload_params"), [(False, False), (True, False), (True, True)]
)
def test_zero3_equals_deepspeeds_estimator(
    per_node: int, nodes: int, offload_optimizer: bool, offload_params: bool
) -> None:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    params, largest = 6_738_415_617, 131_072_001
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
        params,
        largest,
        num_gpus_per_node=per_node,
        num_nodes=nodes,
        cpu_offload=offload_optimizer,
        cpu_offload_params=offload_params,
        zero_init=True,
    )
    for precision in ("bf16", "fp16"):
        states = model_state_bytes(
            params,
            params,
            largest,
            precision=precision,
            zero_stage=3,
            world=per_node * nodes,
            ranks_per_node=per_node,
            offload_optimizer=offload_optimizer,
            offload_params=offload_params,
        )
        assert (_gpu_states(states), states["host"]) == (gpu, cpu)


def test_plan_of_a_config_equals_the_estimator_on_the_real_model() -> None:
    """Through the config: the topology (4 GPUs per worker pod, 8 ranks: 2 nodes), the meta
    model's parameter and largest-layer counts against DeepSpeed's own `model_to_params`."""
    from deepspeed.runtime.zero.stage3 import (
        estimate_zero3_model_states_mem_needs,
        model_to_params,
    )
    from transformers import AutoModelForCausalLM

    cfg = load_config(
        QUICKSTART,
        [
            "train.use_gpu=true",
            "train.precision=bf16",
            "train.zero_stage=3",
            "train.num_workers=8",
            "cluster.gpus_per_worker=4",
            "cluster.gpu_type=H100-80GB",
        ],
    )
    plan = build_plan(cfg, with_data=False)
    assert (plan.ranks_per_node, plan.nodes, plan.gpu_memory_gb, plan.fits) == (4, 2, 80, True)
    total, largest = model_to_params(AutoModelForCausalLM.from_pretrained(STORIES))
    _, gpu, _ = estimate_zero3_model_states_mem_needs(
        total,
        largest,
        num_gpus_per_node=4,
        num_nodes=2,
        cpu_offload=False,
        cpu_offload_params=False,
    )
    assert plan.memory is not None
    assert _gpu_states(plan.memory) == gpu
    assert plan.memory["total"] == gpu + plan.memory["activations"]


def test_parameter_count_is_exact_and_tied_weights_count_once() -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(STORIES)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied
    shape = model_shape(load_config(QUICKSTART))
    assert shape is not None
    assert shape.parameters == sum(p.numel() for p in model.parameters()) == 260_032
    assert shape.trainable == shape.parameters


@pytest.mark.parametrize(
    "targets",
    [["q_proj", "k_proj", "v_proj", "o_proj"], ["gate_proj", "up_proj", "down_proj", "lm_head"]],
)
def test_lora_trainable_count_equals_peft(targets: list[str]) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(STORIES),
        LoraConfig(r=4, target_modules=targets, task_type="CAUSAL_LM"),
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    overrides = ["train.lora.r=4", f"train.lora.target_modules={json.dumps(targets)}"]
    shape = model_shape(load_config(QUICKSTART, overrides))
    assert shape is not None
    assert (shape.trainable, shape.parameters, shape.lora_missing) == (trainable, 260_032, ())


def test_model_states_within_10_percent_of_the_benchmarks_measurement() -> None:
    """benchmarks/train.py counts a rank's parameters, gradients and optimizer state after the
    first step of its ~58M Llama (fp32, 2 CPU ranks, ZeRO-0 and ZeRO-3)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from benchmarks.train import LARGE

    recorded = json.loads(RESULTS.read_text())
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**LARGE))
    params = sum(p.numel() for p in model.parameters())
    assert params == recorded["setup"]["memory_model_params"]
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    measured = {
        0: recorded["baselines"]["zero0_bytes_per_rank"],
        3: recorded["measurements"]["zero3_bytes_per_rank"],
    }
    for stage, held in measured.items():
        states = model_state_bytes(
            params,
            params,
            largest,
            precision="fp32",
            zero_stage=stage,
            world=2,
            ranks_per_node=2,
        )
        # The ZeRO-3 gather buffer is transient: the measurement point has released it.
        planned = states["params"] + states["grads"] + states["optimizer"]
        assert planned == pytest.approx(held, rel=0.10), stage


def test_json_has_the_documented_keys(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # Flags and overrides in any order; no prepared data there: estimated from a sample.
    argv = ["plan", QUICKSTART, "--json", f"data.output_dir={tmp_path}", "--mfu", "0.5"]
    assert cli.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("parameters", "trainable_parameters", "steps", "global_batch", "gpu_memory_gb"):
        assert out[key] is not None, key
    assert out["fits"] is True
    assert out["parameters"] == 260_032 and out["global_batch"] == 16
    memory = out["memory"]
    assert {"params", "grads", "optimizer", "activations", "total"} <= set(memory)
    assert memory["total"] == sum(memory[k] for k in (*STATE_KEYS, "activations"))
    assert out["data"]["origin"] == "sample"
    rows = out["data"]["train_rows"]
    assert rows > 0 and out["steps"] == 2 * (rows // 16)  # epochs 2, global batch 16


def test_sample_estimate_is_close_to_the_exact_counts(tmp_path: Path) -> None:
    """A ~340 KB TSV is cut into 64 KiB units: the plan parses only the first one."""
    from data_pipeline import templates
    from data_pipeline.sources import parse_bytes
    from data_pipeline.tokenizer import make_encoder, tokenizer_spec
    from data_pipeline.worker import tokenize_turns

    sst2 = "tests/assets/quickstart/sst2_train.tsv"
    config = tmp_path / "c.yaml"
    config.write_text(
        f"model: {{name_or_path: {STORIES}}}\n"
        f"data: {{sources: [{{path: {sst2}, template: sst2}}], max_seq_len: 256, "
        f"output_dir: {tmp_path / 'data'}}}\n"
    )
    plan = build_plan(load_config(config), with_data=True)
    assert plan.data is not None and plan.data.origin == "sample"
    (source,) = plan.data.sources
    render = templates.renderer("sst2", {})
    parsed = [
        r for _, r in parse_bytes(Path(sst2).read_bytes(), sst2, "tsv") if isinstance(r, dict)
    ]
    spec = tokenizer_spec(STORIES)
    batch, _ = tokenize_turns(
        [render(r) for r in parsed],
        make_encoder(spec),
        bos_id=spec["bos"],
        eos_id=spec["eos"],
        max_seq_len=256,
    )
    assert source.records == pytest.approx(len(batch.kept), rel=0.05)
    assert source.tokens == pytest.approx(len(batch.input_ids), rel=0.10)


def test_counts_come_from_a_current_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import launcher.plan

    splits = {
        "train": {"rows": 320, "tokens": 80_000, "examples": 1000, "per_task": {"sst2": 900}},
        "validation": {"rows": 9, "tokens": 2_000, "examples": 30, "per_task": {"sst2": 20}},
        "test": {"rows": 50, "tokens": 4_000, "examples": 50, "per_task": {"sst2_dev": 50}},
    }
    (tmp_path / "manifest.json").write_text(json.dumps({"splits": splits}))
    monkeypatch.setattr(launcher.plan, "_manifest_current", lambda cfg, manifest: True)
    plan = build_plan(load_config(QUICKSTART, [f"data.output_dir={tmp_path}"]))
    assert plan.data is not None and plan.data.origin == "manifest"
    assert (plan.steps_per_epoch, plan.steps) == (20, 40)  # 320 rows // 16, 2 epochs
    assert [s.records for s in plan.data.sources][:2] == [920, 50]
    assert "data (prepared):" in format_plan(plan)


def test_a_plan_that_does_not_fit_names_the_fix() -> None:
    # 28 MiB per rank (25 of activations) against 0.02 GiB: checkpointing alone fits.
    cfg = load_config(QUICKSTART, ["train.use_gpu=true", "cluster.gpu_memory_gb=0.02"])
    plan = build_plan(cfg, with_data=False)
    assert plan.fits is False
    assert plan.fix == ["train.gradient_checkpointing=true"]
    assert "fix: train.gradient_checkpointing=true" in format_plan(plan)
    # Already checkpointing: the largest micro-batch that fits, the global batch kept at 16.
    overrides = ["train.use_gpu=true", "train.gradient_checkpointing=true"]
    fixes = {
        0.01: ["train.micro_batch_size=2", "train.grad_accum=4"],
        0.004: ["train.micro_batch_size=1", "train.offload_optimizer=true", "train.grad_accum=8"],
    }
    for gib, fix in fixes.items():
        cfg = load_config(QUICKSTART, [*overrides, f"cluster.gpu_memory_gb={gib}"])
        assert build_plan(cfg, with_data=False).fix == fix


def _no_pipeline(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    import launcher.pipeline

    calls: list[Any] = []
    monkeypatch.setattr(launcher.pipeline, "run_pipeline", lambda *a, **k: calls.append(a))
    return calls


def test_run_refuses_an_impossible_fit_before_ray(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import ray

    calls = _no_pipeline(monkeypatch)
    argv = ["run", QUICKSTART, "cluster.gpu_memory_gb=0.001", "train.use_gpu=true"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "does not fit" in err and "train.zero_stage=2" in err and "train.num_workers" in err
    assert "train.check_fit=false" in err
    assert calls == [] and not ray.is_initialized()


def test_check_fit_false_skips_the_check(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _no_pipeline(monkeypatch)
    argv = ["train", QUICKSTART, "cluster.gpu_memory_gb=0.001", "train.use_gpu=true"]
    assert cli.main([*argv, "train.check_fit=false"]) == 0
    assert len(calls) == 1


def test_the_check_is_skipped_with_a_note_without_the_model_folder(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    # A hub-style id is left to the loader by validation: here, on the cluster.
    calls = _no_pipeline(monkeypatch)
    argv = [
        "run",
        QUICKSTART,
        "model.name_or_path=some-org/some-model",
        "train.use_gpu=true",
        "cluster.gpu_memory_gb=0.001",
    ]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "ift: fit check skipped: the model folder some-org/some-model is not readable here"
    ]
    assert len(calls) == 1


def test_unknown_gpu_type_is_a_config_error(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["plan", QUICKSTART, "cluster.gpu_type=H100"]) == 2
    assert "cluster.gpu_type: unknown GPU 'H100'" in capsys.readouterr().err


LLAMA_7B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
}


@pytest.mark.parametrize(
    ("gpu", "fix"),
    [
        ("A100-40GB", ["train.zero_stage=2"]),
        # ZeRO-3 alone does not fit, + optimizer offload does: so does ZeRO-2 + offload.
        ("V100-16GB", ["train.zero_stage=2", "train.offload_optimizer=true"]),
        ("A100-80GB", None),  # fits as configured
    ],
)
def test_the_fix_is_the_first_change_in_order_that_fits(
    tmp_path: Path, gpu: str, fix: list[str] | None
) -> None:
    """A 7B Llama (meta device: nothing allocated) in bf16 on 8 GPUs, checkpointing on,
    micro-batch 1, ZeRO-1: too big for 40 GB until ZeRO-2, for 16 GB until optimizer offload."""
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_7B))
    overrides = [
        f"model.name_or_path={tmp_path}", f"model.tokenizer={STORIES}", "train.use_gpu=true",
        "train.precision=bf16", "train.num_workers=8", "train.micro_batch_size=1",
        "train.zero_stage=1", "train.gradient_checkpointing=true", "data.max_seq_len=2048",
        f"cluster.gpu_type={gpu}",
    ]  # fmt: skip
    plan = build_plan(load_config(QUICKSTART, overrides), with_data=False)
    assert plan.parameters == 6_738_415_616
    assert (plan.fits, plan.fix) == (fix is None, fix)


@pytest.mark.parametrize("command", [["train"], ["submit", "--address", "http://h:8265"], ["k8s"]])
def test_every_launching_command_refuses_an_impossible_fit(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, command: list[str]
) -> None:
    import launcher.k8s
    import launcher.submit

    def launched(*args: Any, **kwargs: Any) -> int:
        raise AssertionError("launched")

    monkeypatch.setattr(launcher.submit, "submit", launched)
    monkeypatch.setattr(launcher.k8s, "main", launched)
    _no_pipeline(monkeypatch)
    impossible = ["cluster.gpu_memory_gb=0.001", "train.use_gpu=true"]
    assert cli.main([command[0], QUICKSTART, *impossible, *command[1:]]) == 2
    assert "does not fit" in capsys.readouterr().err

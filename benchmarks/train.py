"""Training benchmark: ift train vs a plain torchrun + DeepSpeed loop vs the HF Trainer, and
ZeRO-3 vs ZeRO-0 memory, measured in one run.

    python benchmarks/train.py            # writes benchmarks/results/train.json

Throughput: the same random-init Llama (~3M parameters, the stories260K tokenizer), the same
packed quickstart data and DeepSpeed config (ZeRO-2, 2 CPU workers, gloo); steady-state
tokens/s is the median over steps after a warm-up, so start-up costs are reported apart. Both
loops do the same per-step work (the step, grad norm, LR, metrics logged to MLflow by rank 0) and
time the same span (step end to step end). `ray_overhead` = 1 - ift / plain DeepSpeed, the plain
loop run before and after ift and averaged. Memory: per-rank bytes of parameters, gradients and
optimizer state after the first optimizer step and the second backward (the pinned point, see
`_train_baselines.run_memory`) of a ~58M-parameter random-init Llama on 2 ranks.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
WARMUP, MEASURED = 5, 20
SMALL = {
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "vocab_size": 512,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
}
LARGE = {
    "hidden_size": 512,
    "intermediate_size": 1376,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}


def main() -> int:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    tmp = Path(tempfile.mkdtemp(prefix="ift-bench-train-"))
    try:
        return run(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(tmp: Path) -> int:
    import ray
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from data_pipeline.prepare import prepare
    from launcher.config import from_dict, resolve_paths
    from training.ds_config import build_ds_config
    from training.train import train

    torch.manual_seed(0)
    model_dir = tmp / "model"
    LlamaForCausalLM(LlamaConfig(**SMALL, bos_token_id=1, eos_token_id=2)).save_pretrained(
        model_dir
    )
    AutoTokenizer.from_pretrained(ROOT / "tests/assets/models/stories260K").save_pretrained(
        model_dir
    )
    cfg = resolve_paths(
        from_dict(
            {
                "experiment": {"name": "bench", "output_dir": str(tmp / "out"), "seed": 0},
                "model": {"name_or_path": str(model_dir)},
                "data": {
                    "sources": [
                        {
                            "path": str(ROOT / "tests/assets/quickstart/sst2_train.tsv"),
                            "template": "sst2",
                            "split": "train",
                        }
                    ],
                    "max_seq_len": 256,
                    "num_workers": 2,
                },
                "train": {
                    "max_steps": WARMUP + MEASURED,
                    "micro_batch_size": 4,
                    "grad_accum": 2,
                    "num_workers": 2,
                    "lr": 1e-3,
                    "schedule": "constant",
                    "zero_stage": 2,
                    "log_every": 1000,
                },
                "tracking": {"enabled": False},
            }
        )
    )

    def start_ray() -> None:
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            logging_level="ERROR",
        )

    start_ray()
    manifest = prepare(cfg, log=lambda _: None)
    ray.shutdown()  # the plain loop runs without Ray's daemons, as a plain user's would
    import mlflow

    db = tmp / "mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp_id = client.create_experiment("bench")
    ds = build_ds_config(cfg.train)
    spec = {
        "data_dir": cfg.data_dir,
        "manifest": manifest,
        "model": str(model_dir),
        "ds_config": ds,
        "steps": WARMUP + MEASURED,
        "seed": 0,
        "gb": cfg.train.global_batch(),
        "micro": 4,
        "accum": 2,
        "lr": 1e-3,
        "tmp": str(tmp / "hf"),
    }

    def plain_loop() -> float:
        run = client.create_run(exp_id).info.run_id
        tracking = {"tracking_uri": f"sqlite:///{db}", "run_id": run}
        return median_rate(torchrun("deepspeed", {**spec, "tracking": tracking}, tmp))

    # plain, ift, plain: the mean of the two plain runs cancels a linear drift of the load on a
    # shared machine over the ift run between them.
    plain_tps_runs = [plain_loop()]
    start_ray()
    run_id = client.create_run(exp_id).info.run_id
    t0 = time.perf_counter()
    train(
        cfg,
        manifest,
        tracking={"tracking_uri": f"sqlite:///{db}", "run_id": run_id},
        log=lambda _: None,
    )
    ift_wall = time.perf_counter() - t0
    ray.shutdown()
    rates = [
        v
        for (v,) in sqlite3.connect(db).execute(
            "select value from metrics where run_uuid=? and key='train/tokens_per_s' order by step",
            (run_id,),
        )
    ]
    ift_tps = statistics.median(rates[WARMUP:])
    plain_tps_runs.append(plain_loop())
    plain_tps = statistics.mean(plain_tps_runs)
    try:
        hf = torchrun("hf", spec, tmp)
        hf_tps: float | None = median_rate(hf)
    except RuntimeError as e:  # reported, not hidden
        print(f"HF Trainer baseline failed: {e}", file=sys.stderr)
        hf_tps = None

    memory = {}
    for stage in (0, 3):
        mem_spec = {
            "llama": LARGE,
            "ds_config": {
                "train_batch_size": 2,
                "train_micro_batch_size_per_gpu": 1,
                "gradient_accumulation_steps": 1,
                "zero_optimization": {"stage": stage},
                "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
                "steps_per_print": 10**9,
            },
        }
        memory[stage] = torchrun("memory", mem_spec, tmp)

    result = {
        "benchmark": "train",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU",
        "setup": {
            "model_params": sum(
                p.numel() for p in LlamaForCausalLM(LlamaConfig(**SMALL)).parameters()
            ),
            "workers": 2,
            "zero_stage": 2,
            "global_batch_rows": cfg.train.global_batch(),
            "max_seq_len": 256,
            "warmup_steps_excluded": WARMUP,
            "measured_steps": MEASURED,
            "memory_model_params": memory[0]["params"],
        },
        "measurements": {
            "ift_tokens_per_s": ift_tps,
            "ift_train_wall_s": ift_wall,
            "zero3_bytes_per_rank": max(memory[3]["bytes_per_rank"]),
            "zero3_grad_bytes_per_rank": max(memory[3]["grad_bytes_per_rank"]),
        },
        "baselines": {
            "torchrun_deepspeed_tokens_per_s": plain_tps,
            "hf_trainer_deepspeed_tokens_per_s": hf_tps,
            "torchrun_deepspeed_tokens_per_s_before_ift": plain_tps_runs[0],
            "torchrun_deepspeed_tokens_per_s_after_ift": plain_tps_runs[1],
            "zero0_bytes_per_rank": max(memory[0]["bytes_per_rank"]),
            "zero0_grad_bytes_per_rank": max(memory[0]["grad_bytes_per_rank"]),
        },
        "ratios": {
            "ray_overhead": 1 - ift_tps / plain_tps,
            "ratio_vs_hf_trainer": ift_tps / hf_tps if hf_tps else None,
            "zero3_memory_ratio": max(memory[3]["bytes_per_rank"])
            / max(memory[0]["bytes_per_rank"]),
            # The same without gradients (ZeRO-2/3 partition them; some would count them apart).
            "zero3_memory_ratio_without_grads": _no_grads(memory[3]) / _no_grads(memory[0]),
        },
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train.json").write_text(json.dumps(result, indent=2) + "\n")
    for section in ("measurements", "baselines", "ratios"):
        for k, v in result[section].items():
            print(f"{section:>12}  {k:<42} {v if v is None else f'{v:.4g}'}")
    return 0


def torchrun(mode: str, spec: dict, tmp: Path) -> dict:
    spec_path, out_path = tmp / f"{mode}.spec.json", tmp / f"{mode}.out.json"
    spec_path.write_text(json.dumps(spec))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29517",
        str(ROOT / "benchmarks" / "_train_baselines.py"),
        mode,
        str(spec_path),
        str(out_path),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode}: exit {proc.returncode}: {proc.stderr[-3000:]}")
    return json.loads(out_path.read_text())  # type: ignore[no-any-return]


def _no_grads(mem: dict) -> float:
    pairs = zip(mem["bytes_per_rank"], mem["grad_bytes_per_rank"], strict=True)
    return max(b - g for b, g in pairs)


def median_rate(out: dict) -> float:
    rates = [n / s for n, s in zip(out["step_tokens"], out["step_seconds"], strict=True)]
    return statistics.median(rates[WARMUP:])


if __name__ == "__main__":
    raise SystemExit(main())

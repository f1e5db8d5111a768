"""The GPU check: ift's training, batch layouts and generation on one CUDA device, in minutes.

    make gpu-check                                   # on the device: installs build/gpu-wheels
    python -m benchmarks.gpu                         # the same, when deepspeed & co. import
    python -m benchmarks.gpu --smoke --out X.json    # the same code on CPU, tiny model, seconds

Three sections, each a dict in the JSON result (`benchmarks/results/gpu.json`; smoke runs
write to `--out` or a temp file, never to the results):

- `train`: `training.train.train_worker` itself, in this process without Ray (a single-rank
  process group and `training.context.local_run`), on a ~1B random-init Llama in bf16 under
  ZeRO-3 with the GPU DeepSpeed config (`build_ds_config`, buckets from the model's
  config.json). It stops after a few steps with a checkpoint and a second call resumes from
  it, so saving and restoring the CUDA RNG states runs too. Reported: the last step's
  tokens/s and MFU (`model_flops_per_token`, `peak_flops`), loss, wall times.
- `layouts`: the same packed rows as "padded" and "padding_free" micro-batches
  (`training.batch.collate`) on two copies of one model, trained side by side for a few
  AdamW steps: the per-step losses must agree, under sdpa (fp32) and, where flash-attn is
  installed, flash_attention_2 (bf16) against sdpa padded.
- `generate`: `eval.generate.generate_counted` throughput (new tokens/s) on the train model.

Tracking is off; nothing is fetched: the tokenizer is the GPT-2 one in benchmarks/data.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "gpu.json"
SST2 = ROOT / "tests" / "assets" / "data" / "sst2" / "train.tsv"  # a source the config accepts

# ~1.1B parameters (TinyLlama's shape with GPT-2's vocabulary padded to a multiple of 64).
GPU = {
    "model": {
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "vocab_size": 50304,
        "max_position_embeddings": 2048,
    },
    "tokenizer": ROOT / "benchmarks" / "data" / "gpt2",
    "seq_len": 2048,
    # 2 x 2 accumulation rather than 4 x 1: the same tokens per step with half the activations,
    # headroom in case the stopped run's ZeRO-3 state is not all freed before the resume.
    "micro": 2,
    "accum": 2,
    "steps": 12,
    "stop_after": 6,
    "precision": "bf16",
    "layout_model": {
        "hidden_size": 512,
        "intermediate_size": 1376,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "vocab_size": 50304,
    },
    "layout_rows": (4, 1024),
    "generate": {"batch": 32, "prompt": 128, "new": 128},
}
SMOKE = {
    "model": {
        "hidden_size": 64,
        "intermediate_size": 172,
        "num_hidden_layers": 2,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "vocab_size": 512,
        "max_position_embeddings": 256,
    },
    "tokenizer": ROOT / "tests" / "assets" / "models" / "stories260K",
    "seq_len": 64,
    "micro": 2,
    "accum": 1,
    "steps": 4,
    "stop_after": 2,
    "precision": "fp32",
    "layout_model": {
        "hidden_size": 64,
        "intermediate_size": 172,
        "num_hidden_layers": 2,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "vocab_size": 512,
    },
    "layout_rows": (3, 48),
    "generate": {"batch": 4, "prompt": 16, "new": 8},
}
LAYOUT_STEPS = 3
LAYOUT_RTOL = {"fp32": 1e-4, "bf16": 3e-2}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every section; print the JSON result and write it. Returns the result."""
    args = _parse(argv)
    shape = SMOKE if args.smoke else GPU
    import torch

    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py needs a CUDA device (use --smoke on CPU)")
    device = torch.device("cpu") if args.smoke else torch.device("cuda", 0)
    if device.type == "cuda":
        torch.cuda.set_device(0)
    t0 = time.perf_counter()
    env = _environment()
    result: dict[str, Any] = {"benchmark": "gpu", "machine": env["device"], **env}
    result["mode"] = "smoke" if args.smoke else "gpu"
    with tempfile.TemporaryDirectory(prefix="ift-gpu-check-") as work:
        result["train"] = check_train(shape, Path(work), device)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        result["layouts"] = check_layouts(shape, device)
        result["generate"] = check_generate(shape, Path(work) / "train" / "model", device)
    result["wall_s"] = round(time.perf_counter() - t0, 2)
    result["measurements"] = headline(result)  # what `python -m benchmarks.table` prints
    out = Path(args.out) if args.out else None
    if out is None:
        out = Path(tempfile.mkdtemp(prefix="ift-gpu-smoke-")) / "gpu.json" if args.smoke else RESULT
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"[gpu] wrote {out}", file=sys.stderr)
    return result


def headline(result: dict[str, Any]) -> dict[str, Any]:
    """The figures worth a row in the benchmark table."""
    train, gen, layouts = result["train"], result["generate"], result["layouts"]
    out = {
        "train_tokens_per_s": train["tokens_per_s"],
        "train_mfu": train["mfu"],
        "generate_tokens_per_s": gen["tokens_per_s"],
        "wall_s": result["wall_s"],
    }
    for impl, r in layouts.items():
        if isinstance(r, dict) and "agree" in r:
            out[f"layouts_agree_{impl}"] = r["agree"]
    return out


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model: checks the code only")
    p.add_argument("--out", help=f"result path (default: {RESULT.relative_to(ROOT)}; smoke: temp)")
    return p.parse_args(argv)


def _environment() -> dict[str, Any]:
    import torch
    import transformers

    env: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
    }
    with contextlib.suppress(ImportError):
        import deepspeed

        env["deepspeed"] = deepspeed.__version__
    env["flash_attn"] = _flash_attn_version()
    return env


def _flash_attn_version() -> str | None:
    try:
        import flash_attn  # type: ignore[import-not-found]
    except ImportError:
        return None
    return str(flash_attn.__version__)


# --- train ------------------------------------------------------------------------------------


def check_train(shape: dict[str, Any], work: Path, device: Any) -> dict[str, Any]:
    """Train with `train_worker` in two calls (stop with a checkpoint, then resume to the end)."""
    import torch

    from launcher.config import from_dict
    from training import context
    from training.ds_config import build_ds_config, model_hidden_size
    from training.train import model_flops_per_token, peak_flops, train_worker

    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if shape["precision"] == "bf16" else torch.float32
    model_dir = save_random_model(shape["model"], work / "model", dtype, shape["tokenizer"])
    rows = shape["steps"] * shape["micro"] * shape["accum"]
    vocab = shape["model"]["vocab_size"]
    data_dir = write_synthetic_data(work / "data", rows, shape["seq_len"], vocab, seed=0)
    manifest = json.loads((data_dir / "manifest.json").read_text())

    def config(stop_after: int | None) -> Any:
        return from_dict(
            {
                "experiment": {"name": "gpu-check", "output_dir": str(work / "train"), "seed": 0},
                "model": {
                    "name_or_path": str(model_dir),
                    "dtype": "bfloat16" if dtype == torch.bfloat16 else "float32",
                    "attn_implementation": "sdpa",
                },
                "data": {
                    "sources": [{"path": str(SST2), "template": "sst2"}],
                    "output_dir": str(data_dir),
                    "max_seq_len": shape["seq_len"],
                },
                "train": {
                    "max_steps": shape["steps"],
                    "micro_batch_size": shape["micro"],
                    "grad_accum": shape["accum"],
                    "num_workers": 1,
                    "zero_stage": 3,
                    "precision": shape["precision"],
                    "use_gpu": gpu,
                    "lr": 1e-4,
                    "warmup_steps": 2,
                    "stop_after_steps": stop_after,
                    "log_every": 1,
                },
                "tracking": {"enabled": False},
            }
        )

    first, second = config(shape["stop_after"]), config(None)
    ds_config = build_ds_config(second.train, hidden_size=model_hidden_size(str(model_dir)))
    worker = {
        "manifest": manifest,
        "ds_config": ds_config,
        "total_steps": shape["steps"],
        "tracking": None,
        "run_hash": "gpu-check",
    }
    storage = work / "train" / "checkpoints"
    walls = []
    # One checkpoint kept: a 1B model's ZeRO state is ~15 GB on the device's disk.
    with (
        single_rank_process_group("nccl" if gpu else "gloo"),
        context.local_run(str(storage), keep=1) as run,
    ):
        for cfg in (first, second):
            t0 = time.perf_counter()
            train_worker({**worker, "cfg": cfg})
            walls.append(round(time.perf_counter() - t0, 2))
            if cfg is first:  # before the final checkpoint replaces it
                cuda_rng_saved = _saved_cuda_rng(storage)
            gc.collect()
            if gpu:
                torch.cuda.empty_cache()
    stopped, last = run.reports[0], run.reports[-1]
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(model_dir)
    peak = peak_flops(shape["precision"])
    flops = model_flops_per_token(model_config, shape["seq_len"])
    tokens_per_s = float(last["train/tokens_per_s"])
    return {
        "model_params": _count_params(model_config),
        "seq_len": shape["seq_len"],
        "micro_batch": shape["micro"],
        "grad_accum": shape["accum"],
        "steps": int(last["train/steps"]),
        "resumed_at": int(stopped["step"]),
        "loss_at_stop": float(stopped["train/loss"]),
        "loss": float(last["train/loss"]),
        "tokens_per_s": tokens_per_s,
        "flops_per_token": flops,
        "peak_flops": peak,
        "mfu": tokens_per_s * flops / peak if peak else None,
        "wall_s_until_stop": walls[0],
        "wall_s_resumed": walls[1],
        "cuda_rng_states_saved": cuda_rng_saved,
        "zero_optimization": ds_config["zero_optimization"],
        "optimizer_fused": bool(ds_config["optimizer"]["params"].get("fused")),
    }


@contextlib.contextmanager
def single_rank_process_group(backend: str) -> Iterator[None]:
    """The process group a one-worker Ray Train run sets up: rank 0 of 1 on loopback."""
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0"}
    env |= {"WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def save_random_model(model: dict[str, Any], folder: Path, dtype: Any, tokenizer: Path) -> Path:
    """A random-init Llama (seed 0) saved with the tokenizer, as `from_pretrained` reads it."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer))
    config = LlamaConfig(
        **model,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    with torch.device("cpu"):
        LlamaForCausalLM(config).to(dtype).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_synthetic_data(folder: Path, rows: int, seq_len: int, vocab: int, seed: int) -> Path:
    """Prepared data as `ift prepare` leaves it, from random packed rows: a token store for the
    train split (validation and test empty) and a manifest of the version training reads.

    Each row is full (`seq_len` tokens) and packs examples of 16 to seq_len / 2 tokens; the
    first quarter of each example is prompt (label -100), as are the row's first tokens.
    """
    import numpy as np
    import pyarrow as pa

    from data_pipeline.token_store import TokenStoreWriter
    from training.data import MANIFEST_VERSION

    ids, labels, lens = _packed_rows(np.random.default_rng(seed), rows, seq_len, vocab)
    i32 = pa.list_(pa.int32())
    table = pa.table(
        {"input_ids": ids, "labels": labels, "seq_lens": lens},
        schema=pa.schema([("input_ids", i32), ("labels", i32), ("seq_lens", i32)]),
    )
    writer = TokenStoreWriter(str(folder / "train" / "store"), vocab_size=vocab)
    writer.write(table)
    index = writer.close()
    split = {"rows": rows, "tokens": int(index["tokens"]), "files": []}
    empty = {"rows": 0, "tokens": 0, "files": []}
    manifest = {
        "version": MANIFEST_VERSION,
        "fingerprint": f"gpu-check-{seed}-{rows}x{seq_len}",
        "tokenizer": None,
        "splits": {
            "train": {**split, "store": {"path": "train/store", **index}},
            "validation": empty,
            "test": empty,
        },
        "rejected": 0,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return folder


def _packed_rows(
    rng: Any, rows: int, seq_len: int, vocab: int
) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    ids, labels, lens = [], [], []
    for _ in range(rows):
        row_lens: list[int] = []
        while sum(row_lens) < seq_len:
            left = seq_len - sum(row_lens)
            n = min(left, int(rng.integers(16, max(17, seq_len // 2))))
            row_lens.append(n)
        row = rng.integers(3, vocab, size=seq_len).tolist()
        label = list(row)
        start = 0
        for n in row_lens:  # mask each example's prompt (its first quarter, at least one token)
            label[start : start + max(1, n // 4)] = [-100] * max(1, n // 4)
            start += n
        ids.append(row)
        labels.append(label)
        lens.append(row_lens)
    return ids, labels, lens


def _saved_cuda_rng(storage: Path) -> int | None:
    """How many CUDA generator states the newest checkpoint's client state holds: 0 on CPU,
    None when it has no `cuda_rng` key at all (a checkpoint from before the key)."""
    import torch

    for path in sorted(storage.glob("step_*/*/*model_states.pt"))[-1:]:
        state = torch.load(path, map_location="cpu", weights_only=False)
        if "cuda_rng" in state:
            return len(state["cuda_rng"] or [])
    return None


def _count_params(config: Any) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


# --- padded vs padding-free -------------------------------------------------------------------


def check_layouts(shape: dict[str, Any], device: Any) -> dict[str, Any]:
    """Per-step losses of the padded and padding-free layouts of the same rows."""
    try:
        from training import batch as tbatch
    except ImportError as e:
        return {"skipped": f"training/batch.py is not there yet ({e})"}
    import numpy as np

    n_rows, seq_len = shape["layout_rows"]
    rng = np.random.default_rng(1)
    steps = []
    for _ in range(LAYOUT_STEPS):  # rows of unequal length, so the padded layout pads
        ids, labels, lens = _packed_rows(rng, n_rows, seq_len, shape["layout_model"]["vocab_size"])
        cut = [seq_len - 8 * j for j in range(n_rows)]
        steps.append(
            [
                (np.array(i[:c]), np.array(la[:c]), _trim(np.array(ln), c))
                for i, la, ln, c in zip(ids, labels, lens, cut, strict=True)
            ]
        )
    runs = {"sdpa": ("sdpa", "sdpa", "fp32")}
    if device.type == "cuda" and _flash_attn_version():
        # flash-attn runs in half precision only: its padding-free batches against sdpa padded.
        runs["flash_attention_2"] = ("sdpa", "flash_attention_2", "bf16")
    out: dict[str, Any] = {}
    for name, (ref_impl, impl, precision) in runs.items():
        padded = _train_layout(shape, steps, device, ref_impl, "padded", precision, tbatch)
        free = _train_layout(shape, steps, device, impl, "padding_free", precision, tbatch)
        rel = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(padded, free, strict=True))
        out[name] = {
            "precision": precision,
            "padded": padded,
            "padding_free": free,
            "max_rel_diff": rel,
            "rtol": LAYOUT_RTOL[precision],
            "agree": rel <= LAYOUT_RTOL[precision],
        }
    if "flash_attention_2" not in out:
        out["flash_attention_2"] = {"skipped": "flash-attn is not installed (or no CUDA device)"}
    return out


def _trim(seq_lens: Any, n: int) -> Any:
    """`seq_lens` of a row cut to its first `n` tokens."""
    import numpy as np

    ends = np.cumsum(seq_lens)
    keep = seq_lens[ends <= n].tolist()
    if sum(keep) < n:
        keep.append(n - sum(keep))
    return np.array(keep)


def _train_layout(
    shape: dict[str, Any],
    steps: list[list[Any]],
    device: Any,
    impl: str,
    layout: str,
    precision: str,
    tbatch: Any,
) -> list[float]:
    """Mean loss per completion token at each of `steps` AdamW steps, from one seeded init."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    torch.manual_seed(0)
    config = LlamaConfig(**shape["layout_model"], attn_implementation=impl)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for rows in steps:
        batch = tbatch.collate(rows, 0, layout)
        labels = batch.pop("labels").to(device)
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        logits = model(**inputs, use_cache=False).logits
        loss_sum, count = _loss_sum(logits, labels)
        (loss_sum / count).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss_sum.detach() / count))
    del model, opt
    return losses


def _loss_sum(logits: Any, labels: Any) -> tuple[Any, int]:
    """Summed next-token cross-entropy over labelled tokens and their count. The shift is safe
    in both layouts: every example's first label is -100."""
    import torch

    shift = labels[:, 1:].reshape(-1)
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.size(-1)), shift, reduction="sum"
    )
    return loss, int((shift != -100).sum())


# --- generation -------------------------------------------------------------------------------


def check_generate(shape: dict[str, Any], model_dir: Path, device: Any) -> dict[str, Any]:
    """Greedy generation throughput of the trained model through `eval.generate`."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eval.generate import generate_counted

    g = shape["generate"]
    dtype = torch.bfloat16 if shape["precision"] == "bf16" else torch.float32
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    model = model.to(device).eval()
    rng = np.random.default_rng(2)
    prompts = rng.integers(3, len(tok), size=(g["batch"], g["prompt"])).tolist()
    options = {"max_new_tokens": g["new"], "stop": [], "stop_early": False}
    generate_counted(model, tok, prompts[:2], **{**options, "max_new_tokens": 2})  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    _, counts = generate_counted(model, tok, prompts, **options)
    _sync(device)
    seconds = time.perf_counter() - t0
    return {
        "batch": g["batch"],
        "prompt_tokens": g["prompt"],
        "max_new_tokens": g["new"],
        "new_tokens": int(sum(counts)),
        "seconds": round(seconds, 3),
        "tokens_per_s": sum(counts) / seconds,
    }


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def finite(value: Any) -> bool:
    """True when every number in `value` (nested dicts and lists) is finite."""
    if isinstance(value, dict):
        return all(finite(v) for v in value.values())
    if isinstance(value, list):
        return all(finite(v) for v in value)
    if isinstance(value, float):
        return math.isfinite(value)
    return True


if __name__ == "__main__":
    main()

"""Loss benchmark: peak memory of the training loss, full logits (naive) vs chunked, vocab 128k.

    python -m benchmarks.loss            # writes benchmarks/results/loss.json

What is measured: the forward and backward of the loss alone, from the decoder's last hidden
states (4 rows x 512 tokens, hidden 512, float32, every token a target) through a 128,256-word
output head (Llama 3's vocabulary) to the gradients of the hidden states and of the head. Naive
is `training.loss.naive_loss_sum` on the head's full logits (what ift computed before); chunked is
`training.loss.chunked_loss_sum` with the chunk count `ift train` uses (`chunks_for`).

How: each variant runs in a fresh process (after a small warm-up pass of the same code). The
peak is the kernel's resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs
right before the pass) minus the resident set just before it: every byte the CPU allocator
touched, freed or not, with no model of the allocator. float32 because bfloat16 matmuls are
~10x slower on these CPUs; in bfloat16 the naive loss also makes an fp32 copy of the logits, so
these figures understate its peak. The naive peak grows with the tokens of a micro-batch, the
chunked one with the chunk size (`CHUNK_TOKENS` tokens) only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "loss.json"
VOCAB, HIDDEN, ROWS, SEQ = 128_256, 512, 4, 512


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=["naive", "chunked"])
    parser.add_argument("--seq", type=int, default=SEQ)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.seq)))
        return 0
    runs = {impl: child(impl, args.seq) for impl in ("naive", "chunked")}
    measurements: dict[str, Any] = {
        "vocab": VOCAB,
        "hidden": HIDDEN,
        "tokens": ROWS * args.seq,
        "dtype": "float32",
    }
    for impl, r in runs.items():
        measurements[f"{impl}_peak_bytes"] = r["peak_bytes"]
        measurements[f"{impl}_seconds"] = r["seconds"]
        measurements[f"{impl}_loss"] = r["loss"]
    measurements["chunks"] = runs["chunked"]["chunks"]
    measurements["full_logits_bytes"] = ROWS * args.seq * VOCAB * 4
    result = {
        "benchmark": "loss",
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU; torch threads 2",
        "method": "fresh process per variant; VmHWM (reset before the pass) - VmRSS before",
        "measurements": measurements,
        "ratios": {
            "peak_memory_chunked_over_naive": runs["chunked"]["peak_bytes"]
            / runs["naive"]["peak_bytes"],
            "time_chunked_over_naive": runs["chunked"]["seconds"] / runs["naive"]["seconds"],
            # The two losses are one quantity: this is float32 summation order only.
            "loss_rel_diff": abs(runs["chunked"]["loss"] - runs["naive"]["loss"])
            / abs(runs["naive"]["loss"]),
        },
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


def child(impl: str, seq: int) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.loss", "--child", impl, "--seq", str(seq)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def measure(impl: str, seq: int) -> dict[str, Any]:
    import torch

    from training import loss as tloss

    torch.set_num_threads(2)
    torch.manual_seed(0)
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)
    chunks = tloss.chunks_for(ROWS * seq)

    def run(rows: int, length: int) -> float:
        hidden = torch.randn(rows, length, HIDDEN, requires_grad=True)
        labels = torch.randint(0, VOCAB, (rows, length))
        if impl == "naive":
            loss, _, _ = tloss.naive_loss_sum(head(hidden), labels)
        else:
            loss, _, _ = tloss.chunked_loss_sum(hidden, labels, head, chunks)
        loss.backward()
        return float(loss)

    run(1, 8)  # warm-up: lazy initialisation is not the loss's memory
    head.zero_grad(set_to_none=True)
    before = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    t0 = time.perf_counter()
    loss = run(ROWS, seq)
    seconds = time.perf_counter() - t0
    return {
        "peak_bytes": _status("VmHWM") - before,
        "seconds": round(seconds, 2),
        "loss": loss,
        "chunks": chunks if impl == "chunked" else 1,
    }


def _status(key: str) -> int:
    """A /proc/self/status memory figure, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


if __name__ == "__main__":
    raise SystemExit(main())

"""Load: `ift eval` on 10,000 prompts finishes, with one prediction per prompt.

Slow (run by `make test-reliability`): the real CLI in a subprocess, real local Ray, the real
stories260K model generating a few tokens per prompt on CPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "tests" / "assets" / "models" / "stories260K"
PROMPTS = 10_000

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_eval_on_ten_thousand_prompts_completes(tmp_path: Path) -> None:
    words = ["cat", "dog", "sun", "tree", "boat", "moon", "bird", "fish", "cake", "rain"]
    with (tmp_path / "prompts.jsonl").open("w") as f:
        for i in range(PROMPTS):
            a, b, c = words[i % 10], words[i // 10 % 10], words[i // 100 % 10]
            record = {"instruction": f"Tell a story about a {a}, a {b} and a {c} (#{i}).",
                      "output": f"Once upon a time there was a {a}."}  # fmt: skip
            f.write(json.dumps(record) + "\n")
    config = {
        "experiment": {"name": "load", "output_dir": str(tmp_path / "out"), "seed": 1},
        "model": {"name_or_path": str(MODEL)},
        "data": {
            "sources": [
                {"path": str(tmp_path / "prompts.jsonl"), "template": "alpaca", "split": "test"}
            ],
            "max_seq_len": 256,
            "num_workers": 1,
            "dedupe": True,
        },
        "eval": {"models": ["base"], "max_new_tokens": 4, "batch_size": 128, "num_workers": 1},
        "cluster": {"num_cpus": 2},
        "tracking": {"enabled": False},
    }
    path = tmp_path / "load.yaml"
    path.write_text(yaml.safe_dump(config))
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "launcher", "eval", str(path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=3000,
    )
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    role_dir = tmp_path / "out" / "eval" / "base"
    rows = [json.loads(x) for x in (role_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == PROMPTS
    assert len({r["id"] for r in rows}) == PROMPTS
    assert all(isinstance(r["prediction"], str) for r in rows)
    metrics = json.loads((role_dir / "metrics.json").read_text())["metrics"]
    assert metrics, "no metric computed"
    print(f"ift eval on {PROMPTS} prompts: {seconds:.0f}s ({PROMPTS / seconds:.0f} prompts/s)")

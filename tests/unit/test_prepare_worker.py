"""The prepare worker: its batches are bounded by text as well as by records, and where a batch
ends never changes what it returns; a worker replaced by new settings is freed. No Ray: the worker
runs in this process (or a child process) on the real Alpaca demo (999 records of ~850
characters: 1024 of them would be one ~1M-character batch)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from data_pipeline import worker as worker_module
from data_pipeline.tokenizer import tokenizer_spec
from data_pipeline.worker import ShardWorker

ROOT = Path(__file__).resolve().parents[2]
ALPACA = ROOT / "tests" / "assets" / "recipes" / "alpaca" / "alpaca_en_demo.json"
TOKENIZER = ROOT / "tests" / "assets" / "models" / "stories260K"


UNIT = {"source": 0, "part": 0, "path": str(ALPACA), "fmt": "json", "gz": False, "whole": True,
        "start": 0, "end": ALPACA.stat().st_size, "first_line": 1}  # fmt: skip


def worker_args() -> dict[str, Any]:
    return {
        "sources": [{"template": "alpaca", "params": {}, "split": None}],
        "tokenizer": tokenizer_spec(str(TOKENIZER)),
        "max_seq_len": 512,
        "truncation": "left",
        "seed": 0,
        "ratios": {"train": 0.8, "validation": 0.1, "test": 0.1},
        "train_text": True,
    }


def alpaca_table(monkeypatch: pytest.MonkeyPatch, batch_chars: int) -> tuple[pa.Table, list[int]]:
    """The whole file as one unit; and the characters given to each tokenizer call."""
    monkeypatch.setattr(worker_module, "BATCH_CHARS", batch_chars)
    worker = ShardWorker(**worker_args())
    calls: list[int] = []
    encode = worker.encode

    def counting(texts: list[str]) -> Any:
        calls.append(sum(map(len, texts)))
        return encode(texts)

    worker.encode = counting  # type: ignore[method-assign]
    return worker._process(UNIT), calls


def test_batches_are_bounded_by_characters_and_their_bounds_change_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bounded, calls = alpaca_table(monkeypatch, 64 << 10)
    longest = 20_000  # more than any one record of the file renders to
    assert len(calls) > 8 and max(calls) < (64 << 10) + longest
    # Bounded by records alone (the old batches): one call for the whole file.
    by_records, calls = alpaca_table(monkeypatch, 1 << 40)
    assert len(calls) == 1 and calls[0] > 800_000
    assert bounded.num_rows == by_records.num_rows > 990
    # Each batch's rejects follow its good rows: the good rows, and the rejects (in line
    # order), are the same whatever the batches, as the driver reads them.
    for ok in (True, False):
        got, expected = (t.filter(pc.equal(t["ok"], ok)) for t in (bounded, by_records))
        assert got.num_rows > 0 and got.equals(expected)


# In a child process: `process_unit` freezes the heap of the process it runs in (a Ray worker's).
REPLACED = """
import gc, json, sys, weakref
from data_pipeline import worker
unit, args = json.loads(sys.argv[1]), json.loads(sys.argv[2])
list(worker.process_unit(unit, "first", args))
first = weakref.ref(worker._WORKERS["first"])
assert gc.get_freeze_count() > 0  # the process's heap is frozen after the first build
list(worker.process_unit(unit, "second", args))
print(json.dumps({"first_freed": first() is None, "kept": sorted(worker._WORKERS)}))
"""


def test_a_worker_replaced_by_new_settings_is_freed() -> None:
    """Without the collection before the heap is frozen again, the replaced worker (which
    holds reference cycles) stays frozen: ~14 MiB of tokenizer per change of settings."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", REPLACED, json.dumps(UNIT), json.dumps(worker_args())],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    assert json.loads(out.splitlines()[-1]) == {"first_freed": True, "kept": ["second"]}

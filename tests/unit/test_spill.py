"""The driver's spill: checkpoints, and a resume after a kill that equals an uninterrupted run.

No Ray: the worker runs in-process on real units of the quickstart SST-2 file (the same
`ShardWorker` the Ray tasks run), and "killed" is a spill abandoned without closing it, with
output written after its last checkpoint, as a SIGKILL leaves it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from data_pipeline import inputs, spill
from data_pipeline.tokenizer import tokenizer_spec
from data_pipeline.worker import ShardWorker

ROOT = Path(__file__).resolve().parents[2]
SST2 = ROOT / "tests" / "assets" / "quickstart" / "sst2_train.tsv"
TOKENIZER = ROOT / "tests" / "assets" / "models" / "stories260K"


@pytest.fixture(scope="module")
def unit_tables() -> list[list[pa.Table]]:
    """Each unit's tables, as `run_units` delivers them (several units of one file)."""
    units = inputs.plan_units([[(str(SST2), "tsv")]])
    assert len(units) >= 4
    worker = ShardWorker(
        sources=[{"template": "sst2", "params": {}, "split": None}],
        tokenizer=tokenizer_spec(str(TOKENIZER)),
        max_seq_len=64,
        truncation="drop",
        seed=0,
        ratios={"train": 0.8, "validation": 0.1, "test": 0.1},
    )
    return [list(worker._tables(unit)) for unit in units]


def stream(tables: list[list[pa.Table]], start: int = 0) -> Any:
    for i, unit in enumerate(tables[start:], start):
        for table in unit:
            yield i, table
        yield i, None


def contents(spilled: dict[str, Any]) -> dict[str, Any]:
    """Everything the later steps read from a spill, independent of its segment files."""
    out: dict[str, Any] = {k: spilled[k] for k in ("good", "rejected", "first_reject")}
    out["rows"] = Path(spilled["rows"]).read_bytes()
    for kind in ("ck", "pk"):
        buckets = spill.KeyBuckets(spilled[kind])
        out[kind] = hashlib.sha256(
            b"".join(buckets.read(b).tobytes() for b in range(spill.N_BUCKETS))
        ).hexdigest()
    for name, paths in spilled["spill"].items():
        table = spill.SpillTable(paths)
        out[name] = table.take(pa.array(range(table.num_rows)).to_numpy(), spill.SPILL_COLUMNS)
    return out


def test_a_spill_killed_after_a_checkpoint_resumes_to_the_same_content(
    unit_tables: list[list[pa.Table]], tmp_path: Path
) -> None:
    whole = tmp_path / "whole"
    (whole / spill.SPILL).mkdir(parents=True)
    expected = contents(spill.write_spill(stream(unit_tables), str(whole), "h", checkpoint_s=1e9))

    killed = tmp_path / "killed"
    (killed / spill.SPILL).mkdir(parents=True)
    writer = spill._SpillWriter(str(killed), "h")
    for i, table in stream(unit_tables):
        if table is not None:
            writer.add(table)
        elif i == 1:
            writer.checkpoint(2)  # units 0 and 1 are safe
        elif i == 2:  # unit 2 was spilled after the checkpoint, then the process died
            writer._flush()
            break
    assert spill.resume_point(str(killed), "other settings") == 0
    start = spill.resume_point(str(killed), "h")
    assert start == 2
    resumed = spill.write_spill(stream(unit_tables, start), str(killed), "h", checkpoint_s=0)
    got = contents(resumed)
    assert len(resumed["spill"]["train"]) > 1  # segments from before and after the kill
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, pa.Table):
            assert got[key].equals(value), key
        else:
            assert got[key] == value, key

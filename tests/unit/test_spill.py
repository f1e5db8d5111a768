"""The driver's spill: checkpoints, and a resume after a kill that equals an uninterrupted run.

No Ray: the worker runs in-process on real units of the quickstart SST-2 file (the same
`ShardWorker` the Ray tasks run), and "killed" is a spill abandoned without closing it, with
output written after its last checkpoint, as a SIGKILL leaves it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from data_pipeline import inputs, spill, split
from data_pipeline.selection import select_rows
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
        buckets = spill.KeyBuckets(spilled[kind], spilled["buckets"])
        out[kind] = hashlib.sha256(
            b"".join(buckets.read(b).tobytes() for b in range(buckets.n))
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


def test_bucket_count_grows_with_the_input_in_powers_of_two() -> None:
    mib = spill.BUCKET_INPUT_BYTES
    assert [spill.bucket_count(n) for n in (0, 1, mib, mib + 1, 3 * mib, 4 * mib)] == [
        1, 1, 1, 2, 4, 4,
    ]  # fmt: skip
    assert spill.bucket_count(10**12) == spill.MAX_BUCKETS


def test_selection_is_the_same_for_any_bucket_count(
    unit_tables: list[list[pa.Table]], tmp_path: Path
) -> None:
    """Dedupe and the prompt-overlap rule give the same drops with 1, 4 and 256 key buckets.

    The units come twice: the first copy's rows are each other's duplicates, and in the second
    copy every other row's content key is changed and its split set to test, so that it is
    no duplicate but takes its prompt from the first copy's split (an overlap)."""
    test_code = split.SPLIT_CODES["test"]

    def second(table: pa.Table) -> pa.Table:
        odd = np.arange(table.num_rows) % 2 == 1
        ck_lo = table.column("ck_lo").to_numpy() ^ odd.astype(np.uint64)
        codes = np.where(odd, test_code, table.column("split").to_numpy()).astype(np.int8)
        table = table.set_column(table.schema.get_field_index("ck_lo"), "ck_lo", pa.array(ck_lo))
        return table.set_column(table.schema.get_field_index("split"), "split", pa.array(codes))

    tables = unit_tables + [[second(t) for t in unit] for unit in unit_tables]
    source = SimpleNamespace(weight=None, split=None, task_name="sst2", max_records=None)
    cfg = SimpleNamespace(
        data=SimpleNamespace(dedupe=True, sources=[source], max_test_records=None),
        experiment=SimpleNamespace(seed=0),
    )
    results = []
    for n in (1, 4, 256):
        folder = tmp_path / str(n)
        (folder / spill.SPILL).mkdir(parents=True)
        spilled = spill.write_spill(stream(tables), str(folder), "h", n, checkpoint_s=1e9)
        assert spilled["buckets"] == n
        assert len(list(Path(spilled["ck"]).iterdir())) == n
        drops, stats = select_rows(cfg, spilled)
        results.append((Path(drops).read_bytes(), stats))
    drops, stats = results[0]
    assert stats["duplicates"] > 100 and stats["overlap"] > 100
    assert all(r == results[0] for r in results[1:])

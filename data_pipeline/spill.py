"""The driver's spill: the workers' rows, per split, in an Arrow IPC file on local disk.

The driver receives the workers' tables in input order and appends each split's rows to its
spill file (`write_spill`), keeping only the few numbers per row that selection needs (content
and prompt keys, source, split). The spill is read back memory mapped (`read_spill`), and rows
are taken from it a slice at a time (`take`), so that the token data never sits in the
driver's anonymous memory.
"""

from __future__ import annotations

import json
import mmap
import os
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_pipeline import split
from data_pipeline.manifest import REJECTS
from data_pipeline.worker import ROW_SCHEMA

SPILL = ".spill"
SPILL_COLUMNS = [
    "source",
    "part",
    "line",
    "input_ids",
    "labels",
    "loss_tokens",
    "prompt",
    "reference",
    "prompt_ids",
]


def write_spill(batches: Iterable[pa.Table], tmp: str) -> dict[str, Any]:
    """Stream the workers' tables (in input order) into per-split spill files and rejects.jsonl.

    Returns the per-row keys of the good rows (numpy arrays, in input order) and counts.
    """
    writers: dict[str, Any] = {}
    keys: dict[str, list[np.ndarray]] = {
        k: [] for k in ("ck_hi", "ck_lo", "pk_hi", "pk_lo", "source", "split")
    }
    rejected = 0
    first_reject: dict[str, Any] | None = None
    spill_schema = ROW_SCHEMA.empty_table().select(SPILL_COLUMNS).schema
    with open(os.path.join(tmp, REJECTS), "w") as rejects_file:
        for table in batches:
            ok = table.column("ok").to_numpy()
            if not ok.all():
                bad = table.filter(pc.invert(table.column("ok")))
                for row in bad.select(["file", "line", "reason"]).to_pylist():
                    reject = {"source": row["file"], "line": row["line"], "reason": row["reason"]}
                    rejects_file.write(json.dumps(reject) + "\n")
                    first_reject = first_reject or reject
                rejected += bad.num_rows
                table = table.filter(table.column("ok"))
            if table.num_rows == 0:
                continue
            for k, parts in keys.items():
                # A copy: a view would pin the whole result in Ray's object store until the end.
                parts.append(table.column(k).to_numpy().copy())
            codes = keys["split"][-1]
            for name, code in split.SPLIT_CODES.items():
                mask = codes == code
                if not mask.any():
                    continue
                if name not in writers:
                    path = os.path.join(tmp, SPILL, f"{name}.arrow")
                    writers[name] = pa.ipc.new_file(path, spill_schema)
                part = table.filter(pa.array(mask)).select(SPILL_COLUMNS)
                writers[name].write_table(part)
    for w in writers.values():
        w.close()
    arrays = {}
    for k, parts in keys.items():  # one column at a time: the chunks go as its copy is made
        arrays[k] = np.concatenate(parts) if parts else np.zeros(0, np.uint64)
        parts.clear()
    return {
        **arrays,
        "good": len(arrays["split"]),
        "rejected": rejected,
        "first_reject": first_reject,
        "spill": {name: os.path.join(tmp, SPILL, f"{name}.arrow") for name in writers},
    }


def read_spill(path: str | None) -> tuple[pa.Table, Callable[[], None]]:
    """A split's spill file, memory mapped, and a function that drops its pages from the
    process: they are read on demand and never copied, and releasing them after each slice
    keeps the driver's resident memory flat however big the spill is (the data stays in the
    page cache; a later read maps it again)."""
    if path is None:
        return ROW_SCHEMA.empty_table().select(SPILL_COLUMNS), lambda: None
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    table = pa.ipc.open_file(pa.py_buffer(mapped)).read_all()
    return table, lambda: mapped.madvise(mmap.MADV_DONTNEED)


def list_lengths(column: pa.ChunkedArray) -> np.ndarray:
    if column.num_chunks == 0:
        return np.zeros(0, np.int64)
    return pc.list_value_length(column).to_numpy().astype(np.int64)


def take(table: pa.Table, rows: np.ndarray, columns: list[str]) -> pa.Table:
    """`table.select(columns).take(rows)`, one record batch at a time.

    Arrow's take on a chunked column first concatenates all its chunks, i.e. copies the whole
    spill column into memory for every slice; here only the batches that hold a wanted row
    are touched, and only those rows are copied.
    """
    if len(rows) == 0:
        return table.select(columns).slice(0, 0)
    batches = table.select(columns).to_batches()
    starts = np.cumsum([0] + [b.num_rows for b in batches])
    which = np.searchsorted(starts, rows, side="right") - 1
    order = np.argsort(which, kind="stable")
    in_order, which = rows[order], which[order]
    used, first = np.unique(which, return_index=True)
    ends = list(first[1:]) + [len(which)]
    parts = [
        batches[b].take(pa.array(in_order[i:j] - starts[b]))
        for b, i, j in zip(used, first, ends, strict=True)
    ]
    grouped = pa.Table.from_batches(parts).combine_chunks()
    # Back from batch order to the order asked for.
    return grouped.take(pa.array(np.argsort(order, kind="stable")))

"""The driver's spill: everything the workers return, on local disk, read back in slices.

The driver receives the workers' tables in input order (`write_spill`) and keeps nothing per
record in memory:

- each split's rows go to an Arrow IPC file (`<split>.arrow`), read back memory mapped a batch
  at a time (`SpillTable`), so the token data never sits in the driver's anonymous memory;
- each good row's split and source go to `rows.bin` (`ROW_META`, in input order), where the
  selection marks the rows it drops (`drops.bin`, one byte per row);
- the 128-bit content and prompt keys go, with the row's index, to `KeyBuckets`: files
  partitioned by the key's top bits, so that all rows of one key are in one bucket and exact
  dedupe and the prompt-overlap check read one bucket at a time (datatrove's hash-range
  buckets; Megatron's memory-mapped indices).

Memory: a bucket holds about 1/MAX_BUCKETS of the keys at scale (24k rows at 6M records), a
slice of `rows.bin` SLICE_ROWS rows, the spill one record batch; none of it grows with the
input. Smaller inputs get fewer buckets (`bucket_count`): each is a file, and creating 512 of
them cost a 61k-record prepare ~0.3 s of the driver's CPU while the workers needed it.
"""

from __future__ import annotations

import json
import mmap
import os
import time
from collections.abc import Iterable, Iterator
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_pipeline import split
from data_pipeline.manifest import REJECTS, write_json_atomic
from data_pipeline.worker import ROW_SCHEMA

SPILL = ".spill"
PROGRESS = "progress.json"
# A killed prepare resumes from its last checkpoint, taken at a unit's end this often (s).
CHECKPOINT_S = 10.0
SPILL_COLUMNS = [
    "source",
    "part",
    "line",
    "ck_hi",
    "ck_lo",
    "input_ids",
    "labels",
    "loss_tokens",
    "prompt",
    "reference",
    "prompt_ids",
]
# Per good row, in input order: its split code and source index.
ROW_META = np.dtype([("split", "i1"), ("source", "<i4")])
# A key with the row it belongs to (index in input order) and that row's split code.
KEY_RECORD = np.dtype([("hi", "<u8"), ("lo", "<u8"), ("row", "<i8"), ("split", "i1")])
MAX_BUCKETS = 256
_TOP_BYTE = np.uint64(56)  # a key's top 8 bits; its bucket is their top log2(n) bits
# Below this much input per bucket, fewer buckets (a power of two, down to 1).
BUCKET_INPUT_BYTES = 1 << 20
# Rows of rows.bin / drops.bin handled at a time by the passes over them.
SLICE_ROWS = 1 << 15


def bucket_count(input_bytes: int) -> int:
    """How many KeyBuckets a prepare of `input_bytes` of (decompressed) input uses: a power of
    two, one per BUCKET_INPUT_BYTES, from 1 to MAX_BUCKETS. Any count gives the same selection
    (a key's rows share a bucket); it only sizes the files."""
    wanted = -(-input_bytes // BUCKET_INPUT_BYTES)
    return min(MAX_BUCKETS, 1 << max(0, wanted - 1).bit_length())


def write_spill(
    batches: Iterable[tuple[int, pa.Table | None]],
    tmp: str,
    config_hash: str,
    n_buckets: int = MAX_BUCKETS,
    checkpoint_s: float = CHECKPOINT_S,
) -> dict[str, Any]:
    """Stream the workers' tables (in input order) to the spill and rejects.jsonl.

    `batches` gives `(unit, table)` pairs and `(unit, None)` once a unit is complete (see
    `schedule.run_units`). At a unit's end, at most every `checkpoint_s`, the spill records
    its progress (`progress.json`: the units done and the length of every file), so that a
    prepare killed later resumes from there (`resume_point`) instead of from the start.

    Returns:
        `good` and `rejected` counts, the first reject, and the paths of the spill's parts:
        `spill` (split name -> its Arrow IPC segment files), `rows` (rows.bin), `ck` and `pk`
        (KeyBuckets folders of the content and prompt keys) and `buckets` (their count).
    """
    spill = _SpillWriter(tmp, config_hash, n_buckets)
    last = time.monotonic()
    pool = pa.default_memory_pool()
    for unit, table in batches:
        if table is not None:
            spill.add(table)
            # Arrow's allocator keeps freed pages for reuse; bigger tables at scale would
            # otherwise leave a bigger idle heap. Returning them costs microseconds.
            pool.release_unused()
        elif time.monotonic() - last >= checkpoint_s:
            spill.checkpoint(unit + 1)
            last = time.monotonic()
    return spill.close()


def resume_point(tmp: str, config_hash: str) -> int:
    """The number of units a killed prepare's spill in `tmp` holds completely (0: none, or
    the spill of other inputs or settings)."""
    progress = _read_progress(tmp)
    if progress is None or progress["config_hash"] != config_hash:
        return 0
    return int(progress["units_done"])


def _read_progress(tmp: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(tmp, SPILL, PROGRESS)) as f:
            return json.load(f)  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return None


class _SpillWriter:
    """The spill's open files, and their checkpoints. Each split's rows go to Arrow IPC
    segment files, closed (footer written) at every checkpoint; the other files are appended
    to and, on resume, cut back to the length the last checkpoint recorded."""

    def __init__(self, tmp: str, config_hash: str, n_buckets: int = MAX_BUCKETS) -> None:
        self.tmp, self.config_hash = tmp, config_hash
        self.folder = os.path.join(tmp, SPILL)
        self.schema = ROW_SCHEMA.empty_table().select(SPILL_COLUMNS).schema
        self.content = KeyBuckets(os.path.join(self.folder, "ck"), n_buckets)
        self.prompt = KeyBuckets(os.path.join(self.folder, "pk"), n_buckets)
        self.rows_path = os.path.join(self.folder, "rows.bin")
        self.rejects_path = os.path.join(tmp, REJECTS)
        progress = _read_progress(tmp)
        if progress is None or progress["config_hash"] != config_hash:
            progress = {"good": 0, "rejected": 0, "first_reject": None, "segments": {}, "sizes": {}}
        self.good, self.rejected = int(progress["good"]), int(progress["rejected"])
        self.first_reject: dict[str, Any] | None = progress["first_reject"]
        self.segments: dict[str, list[str]] = {k: list(v) for k, v in progress["segments"].items()}
        self._restore(progress["sizes"])
        self.rows_file = open(self.rows_path, "ab")  # noqa: SIM115 (closed in close)
        self.rejects_file = open(self.rejects_path, "a")  # noqa: SIM115
        self.writers: dict[str, Any] = {}

    def _restore(self, sizes: dict[str, int]) -> None:
        """Cut every appended file back to its checkpointed length; delete what came after
        the checkpoint (files it does not list, segments it does not name)."""
        keep = {
            os.path.join(self.folder, name) for names in self.segments.values() for name in names
        }
        appended = [self.rows_path, self.rejects_path]
        appended += [
            os.path.join(b.folder, f)
            for b in (self.content, self.prompt)
            for f in os.listdir(b.folder)
        ]
        for path in appended:
            if not os.path.exists(path):
                continue
            rel = os.path.relpath(path, self.tmp)
            if rel in sizes:
                os.truncate(path, sizes[rel])
            else:
                os.remove(path)
        for name in os.listdir(self.folder):
            path = os.path.join(self.folder, name)
            if name.endswith(".arrow") and path not in keep:
                os.remove(path)

    def _appended(self) -> list[str]:
        """The files a checkpoint records by length: rows, rejects and key buckets."""
        buckets = [
            os.path.join(b.folder, name)
            for b in (self.content, self.prompt)
            for name in sorted(os.listdir(b.folder))
        ]
        return [self.rows_path, self.rejects_path] + buckets

    def add(self, table: pa.Table) -> None:
        ok = table.column("ok").to_numpy()
        if not ok.all():
            bad = table.filter(pc.invert(table.column("ok")))
            for row in bad.select(["file", "line", "reason"]).to_pylist():
                reject = {"source": row["file"], "line": row["line"], "reason": row["reason"]}
                self.rejects_file.write(json.dumps(reject) + "\n")
                self.first_reject = self.first_reject or reject
            self.rejected += bad.num_rows
            table = table.filter(table.column("ok"))
        n = table.num_rows
        if n == 0:
            return
        codes = table.column("split").to_numpy()
        meta = np.empty(n, ROW_META)
        meta["split"], meta["source"] = codes, table.column("source").to_numpy()
        self.rows_file.write(meta.tobytes())
        rows = np.arange(self.good, self.good + n, dtype=np.int64)
        for buckets, hi, lo in ((self.content, "ck_hi", "ck_lo"), (self.prompt, "pk_hi", "pk_lo")):
            buckets.add(table.column(hi).to_numpy(), table.column(lo).to_numpy(), rows, codes)
        self.good += n
        for name, code in split.SPLIT_CODES.items():
            mask = codes == code
            if not mask.any():
                continue
            if name not in self.writers:
                segment = f"{name}-{len(self.segments.setdefault(name, [])):05d}.arrow"
                self.segments[name].append(segment)
                self.writers[name] = pa.ipc.new_file(
                    os.path.join(self.folder, segment), self.schema
                )
            # One record batch per table (a worker's table is a chunk per RECORDS_PER_BATCH
            # records): packing gathers a bin's examples from across a window, at a cost per
            # batch it touches.
            rows_of_split = table.filter(pa.array(mask)).select(SPILL_COLUMNS).combine_chunks()
            self.writers[name].write_table(rows_of_split)

    def _flush(self) -> None:
        for w in self.writers.values():
            w.close()
        self.writers.clear()
        self.rows_file.flush()
        self.rejects_file.flush()
        self.content.flush()
        self.prompt.flush()

    def checkpoint(self, units_done: int) -> None:
        """Make everything written so far durable for a resume (a killed process's writes
        are in the page cache already), then record it: progress.json is written last."""
        self._flush()
        sizes = {
            os.path.relpath(path, self.tmp): os.path.getsize(path)
            for path in [self.rows_path, self.rejects_path]
            + [
                os.path.join(b.folder, f)
                for b in (self.content, self.prompt)
                for f in os.listdir(b.folder)
            ]
        }
        write_json_atomic(
            os.path.join(self.folder, PROGRESS),
            {
                "config_hash": self.config_hash,
                "units_done": units_done,
                "good": self.good,
                "rejected": self.rejected,
                "first_reject": self.first_reject,
                "segments": self.segments,
                "sizes": sizes,
            },
        )

    def close(self) -> dict[str, Any]:
        self._flush()
        self.rows_file.close()
        self.rejects_file.close()
        self.content.close()
        self.prompt.close()
        return {
            "good": self.good,
            "rejected": self.rejected,
            "first_reject": self.first_reject,
            "spill": {
                name: [os.path.join(self.folder, s) for s in segs]
                for name, segs in self.segments.items()
            },
            "rows": self.rows_path,
            "ck": self.content.folder,
            "pk": self.prompt.folder,
            "buckets": self.content.n,
        }


class KeyBuckets:
    """128-bit keys with their row and split, hash-partitioned into `n` files (a power of two).

    The keys are cryptographic hashes, so their top bits spread the rows evenly, and every
    occurrence of one key lands in the same bucket: a rule over equal keys (dedupe, overlap)
    taken bucket by bucket is the same rule taken over all rows at once.
    """

    def __init__(self, folder: str, n: int = MAX_BUCKETS) -> None:
        assert 1 <= n <= MAX_BUCKETS and n & (n - 1) == 0, n
        self.folder, self.n = folder, n
        self.shift = np.uint64(8 - (n.bit_length() - 1))  # after _TOP_BYTE: 0..8, defined
        self.files: dict[int, BinaryIO] = {}
        os.makedirs(folder, exist_ok=True)

    def add(self, hi: np.ndarray, lo: np.ndarray, rows: np.ndarray, codes: np.ndarray) -> None:
        records = np.empty(len(rows), KEY_RECORD)
        records["hi"], records["lo"], records["row"], records["split"] = hi, lo, rows, codes
        bucket = ((records["hi"] >> _TOP_BYTE) >> self.shift).astype(np.intp)
        order = np.argsort(bucket, kind="stable")  # rows stay in input order in a bucket
        records, bucket = records[order], bucket[order]
        bounds = np.searchsorted(bucket, np.arange(self.n + 1))
        for b in np.flatnonzero(np.diff(bounds)).tolist():
            f = self.files.get(b)
            if f is None:
                # Appended to: a resumed spill continues the files of its checkpoint.
                f = self.files[b] = open(self._path(b), "ab")  # noqa: SIM115 (closed in close)
            f.write(records[bounds[b] : bounds[b + 1]].tobytes())

    def flush(self) -> None:
        for f in self.files.values():
            f.flush()

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        self.files.clear()

    def read(self, b: int) -> np.ndarray:
        """Bucket `b`'s records, in input order."""
        path = self._path(b)
        if not os.path.exists(path):
            return np.zeros(0, KEY_RECORD)
        return np.fromfile(path, KEY_RECORD)

    def _path(self, b: int) -> str:
        return os.path.join(self.folder, f"{b:03d}.bin")


def row_slices(
    rows_path: str, drops_path: str | None = None
) -> Iterator[tuple[int, np.ndarray, Any]]:
    """(first row, ROW_META slice, writable drops slice or None) over rows.bin, SLICE_ROWS rows
    at a time; the slices are views of memory maps (file pages, not the process's memory)."""
    n = os.path.getsize(rows_path) // ROW_META.itemsize
    if n == 0:
        return
    meta = np.memmap(rows_path, ROW_META, "r", shape=(n,))
    drops = np.memmap(drops_path, np.uint8, "r+", shape=(n,)) if drops_path else None
    for start in range(0, n, SLICE_ROWS):
        end = min(n, start + SLICE_ROWS)
        yield start, meta[start:end], drops[start:end] if drops is not None else None
    if drops is not None:
        drops.flush()


class SpillTable:
    """A split's spill (its segment files), memory mapped, read by row index one record batch
    at a time.

    Only the files' footers (where each batch starts) are held; a batch is mapped when a row of
    it is wanted, and `release` drops the pages read so far from the process, which keeps the
    driver's resident memory flat however big the spill is (the data stays in the page cache).
    """

    def __init__(self, paths: list[str] | None) -> None:
        self.maps: list[mmap.mmap] = []
        self.readers: list[Any] = []
        owner: list[tuple[int, int]] = []  # per batch: (segment, batch in that segment)
        sizes: list[int] = []
        for path in paths or []:
            with open(path, "rb") as f:
                self.maps.append(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
            reader = pa.ipc.open_file(pa.py_buffer(self.maps[-1]))
            self.readers.append(reader)
            for i in range(reader.num_record_batches):
                owner.append((len(self.readers) - 1, i))
                sizes.append(reader.get_batch(i).num_rows)
        self.owner = np.asarray(owner, np.int64).reshape(-1, 2)
        self.starts = np.zeros(len(sizes) + 1, np.int64)
        np.cumsum(sizes, out=self.starts[1:])

    @property
    def num_rows(self) -> int:
        return int(self.starts[-1])

    def _groups(self, rows: np.ndarray) -> Iterator[tuple[pa.RecordBatch, np.ndarray, np.ndarray]]:
        """(batch, positions in `rows`, row indices within the batch) per batch that holds a
        wanted row, in batch order."""
        which = np.searchsorted(self.starts, rows, side="right") - 1
        order = np.argsort(which, kind="stable")
        used, first = np.unique(which[order], return_index=True)
        ends = np.append(first[1:], len(order))
        for b, i, j in zip(used.tolist(), first.tolist(), ends.tolist(), strict=True):
            where = order[i:j]
            segment, index = self.owner[b]
            yield self.readers[segment].get_batch(int(index)), where, rows[where] - self.starts[b]

    def take(self, rows: np.ndarray, columns: list[str]) -> pa.Table:
        """The `columns` of `rows` (spill row indices, any order), in the order asked for.

        Arrow's take on a chunked column would first concatenate all its chunks (copy the
        whole spill column); here only the batches that hold a wanted row are touched.
        """
        if len(rows) == 0:
            return ROW_SCHEMA.empty_table().select(columns)
        order_parts, parts = [], []
        for batch, where, local in self._groups(rows):
            parts.append(batch.select(columns).take(pa.array(local)))
            order_parts.append(where)
        grouped = pa.Table.from_batches(parts).combine_chunks()
        # Back from batch order to the order asked for.
        return grouped.take(pa.array(np.argsort(np.concatenate(order_parts), kind="stable")))

    def flat_values(
        self, rows: np.ndarray, columns: list[str], lengths: np.ndarray
    ) -> list[np.ndarray]:
        """Int32 list columns' values at `rows` (lists of `lengths`, the same in every column),
        each concatenated in the order asked for: one gather per batch straight from its
        buffers, where `take` would copy the lists twice (gather, then reorder) before they are
        flattened."""
        ends = np.cumsum(lengths)
        out = [np.empty(int(ends[-1]) if len(ends) else 0, np.int32) for _ in columns]
        for batch, where, local in self._groups(rows):
            sizes = lengths[where]
            shift = np.cumsum(sizes) - sizes  # where each list starts in this batch's gather
            steps = np.arange(int(shift[-1] + sizes[-1]))
            dst = np.repeat(ends[where] - sizes - shift, sizes) + steps
            for column, values in zip(columns, out, strict=True):
                lists = batch.column(column)
                src = np.repeat(lists.offsets.to_numpy()[local] - shift, sizes) + steps
                values[dst] = lists.values.to_numpy()[src]
        return out

    def numbers(self, rows: np.ndarray, column: str) -> np.ndarray:
        """A fixed-width column's values at `rows`, as NumPy, in the order asked for."""
        out = np.empty(len(rows), ROW_SCHEMA.field(column).type.to_pandas_dtype())
        if len(rows):
            for batch, where, local in self._groups(rows):
                out[where] = batch.column(column).to_numpy()[local]
        return out

    def lengths(self, rows: np.ndarray, column: str = "input_ids") -> np.ndarray:
        """A list column's lengths at `rows`, from its offsets (no value is read)."""
        out = np.empty(len(rows), np.int64)
        if len(rows):
            for batch, where, local in self._groups(rows):
                offsets = batch.column(column).offsets.to_numpy()
                out[where] = offsets[local + 1] - offsets[local]
        return out

    def release(self) -> None:
        for mapped in self.maps:
            mapped.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        # A map itself closes once no Arrow buffer refers to it any more.
        self.release()
        self.readers, self.maps = [], []


def list_lengths(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    if isinstance(column, pa.ChunkedArray) and column.num_chunks == 0:
        return np.zeros(0, np.int64)
    return pc.list_value_length(column).to_numpy().astype(np.int64)

"""Writing a prepared dataset: shards (packed or plain), exemplars, the manifest, atomically.

`write_dataset` reads the kept rows of each split from the spill a slice at a time, packs
train and validation (best-fit decreasing over windows of PACK_WINDOW examples, from their
lengths alone), writes Parquet shards of ROWS_PER_SHARD rows while hashing their content into
the dataset's fingerprint, picks the exemplars, then moves the finished folder into place and
writes `manifest.json` last. A crash at any point leaves either the previous complete dataset
or no manifest at all. With mixing weights the train split streams the mixture instead
(`selection.mixed_rows`): a repeated row is written as several examples.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_pipeline import pack, split, templates, tokenize
from data_pipeline.manifest import (
    EXEMPLARS,
    PLAIN_SCHEMA,
    TEST_SCHEMA,
    VERSION,
    publish,
)
from data_pipeline.selection import ExemplarPicker, kept_rows, mixed_rows
from data_pipeline.spill import SPILL, SpillTable, list_lengths
from data_pipeline.token_store import STORE_DIR, TokenStoreWriter

ROWS_PER_SHARD = 50_000
# Rows are built and written max(1, SLICE_TOKENS // max_seq_len) at a time, so that the
# copies a slice takes stay a few MiB whatever the size of the split.
SLICE_TOKENS = 1 << 18
# Best-fit decreasing runs over windows of this many examples (in input order).
PACK_WINDOW = 65_536


def write_dataset(
    cfg: Any,
    tmp: str,
    out_dir: str,
    drops_path: str,
    spilled: dict[str, Any],
    stats: dict[str, Any],
    config_hash: str,
    tok_path: str,
) -> dict[str, Any]:
    """Write every split's kept rows from the spill into `tmp`, swap it into `out_dir`, and
    write the manifest last. Each split streams its kept rows in input order, a window at a
    time (`kept_rows`; train with mixing weights: `mixed_rows`, following `stats["mix"]`), so
    nothing here grows with the number of rows."""
    names = [s.task_name for s in cfg.data.sources]
    tasks = sorted(set(names))
    task_of_source = np.asarray([tasks.index(n) for n in names], np.int64)
    capacity = cfg.data.max_seq_len
    per_slice = max(1, SLICE_TOKENS // capacity)
    digest = hashlib.sha256()
    splits: dict[str, Any] = {}
    exemplars: dict[str, Any] = {}
    pool = pa.default_memory_pool()
    # Parquet encoding, the token store and the content hash run on a thread, overlapped with
    # the gathering and packing of the next batch here (both mostly outside the GIL).
    with InOrder() as output:
        for name in split.SPLITS:
            spill = SpillTable(spilled["spill"].get(name))
            packed = name != "test" and cfg.data.packing
            writer = ShardWriter(
                os.path.join(tmp, name), TEST_SCHEMA if name == "test" else PLAIN_SCHEMA
            )
            # Training reads train and validation from a memory-mapped copy of the same rows.
            store = (
                None
                if name == "test"
                else TokenStoreWriter(os.path.join(tmp, STORE_DIR, name), spilled["vocab_size"])
            )
            picker = (
                ExemplarPicker(len(tasks), cfg.data.exemplars)
                if name == "train" and cfg.data.exemplars
                else None
            )
            histogram = np.zeros(capacity + 1, np.int64)
            per_task = np.zeros(len(names), np.int64)
            loss_tokens = examples = n_bins = 0
            # Packing runs over windows of PACK_WINDOW examples (in input order; a weighted
            # train split in the mixture's), so that the packer's arrays stay bounded however
            # big the split is.
            window = PACK_WINDOW if packed else per_slice
            if name == "train" and stats["mix"] is not None:
                windows = mixed_rows(stats["mix"], window)
            else:
                windows = kept_rows(spilled["rows"], drops_path, split.SPLIT_CODES[name], window)
            for kept in windows:
                lengths = spill.lengths(kept)
                histogram = _add_counts(histogram, lengths)
                loss_tokens += int(spill.numbers(kept, "loss_tokens").sum(dtype=np.int64))
                sources = spill.numbers(kept, "source")
                per_task += np.bincount(sources, minlength=len(names))
                examples += len(kept)
                if picker is not None:
                    hi, lo = spill.numbers(kept, "ck_hi"), spill.numbers(kept, "ck_lo")
                    picker.add(kept, hi, lo, task_of_source[sources])
                if packed:
                    members, bin_sizes = pack.bin_members(pack.assign_bins(lengths, capacity))
                    n_bins += len(bin_sizes)
                    batches: Iterator[pa.Table] = _packed_batches(
                        spill, kept, lengths, members, bin_sizes, per_slice
                    )
                else:
                    batches = iter([_plain_batch(spill, kept, names, spilled["multi_file"], name)])
                for batch in batches:
                    output.put(_write_batch, writer, store, batch)
                    spill.release()  # the batch is a copy: its spill pages can go
                    # Built on this thread: Arrow's allocator (mimalloc) returns a thread's
                    # free pages only when that thread asks (~12 MiB held at 100x quickstart).
                    pool.release_unused()
            output.drain()
            info: dict[str, Any] = {**tokenize.token_stats_from_histogram(histogram, loss_tokens)}
            info["packed"] = packed
            if packed:
                info["packed_rows"] = n_bins
                info["packing_efficiency"] = (
                    float(info["tokens"]) / (n_bins * capacity) if n_bins else 0.0
                )
            info["examples"] = examples
            info["rows"] = writer.rows
            info["files"] = writer.close()
            if store is not None:  # not in the fingerprint: a function of the shards' rows
                info["store"] = {"path": f"{STORE_DIR}/{name}", **store.close()}
            digest.update(f"{name}:{writer.rows}:{writer.digest()}".encode())
            info["per_task"] = {n: int(per_task[i]) for i, n in enumerate(names)}
            splits[name] = info
            if picker is not None:
                exemplars = _write_exemplars(tmp, spill, picker.result(), tasks)
                digest.update(f"exemplars:{json.dumps(exemplars, sort_keys=True)}".encode())
            spill.close()
    shutil.rmtree(os.path.join(tmp, SPILL))
    manifest = {
        "version": VERSION,
        "config_hash": config_hash,
        "fingerprint": digest.hexdigest(),
        "tokenizer": tok_path,
        "max_seq_len": cfg.data.max_seq_len,
        "templates": [
            {
                "task": s.task_name,
                "path": s.path,
                "template": s.template,
                "params": s.params,
                "metrics": s.metrics,
                "template_hash": templates.template_fingerprint(s.template, s.params),
                **({"chat_template": spilled["chat_template"]} if s.template == "chat" else {}),
            }
            for s in cfg.data.sources
        ],
        "splits": splits,
        "exemplars": exemplars,
        "rejected": int(spilled["rejected"]),
        "duplicates": stats["duplicates"],
        "capped": stats["capped"],
        "overlap_dropped": stats["overlap"],
        **({"mix": _mix_entries(cfg, stats["mix"])} if stats["mix"] is not None else {}),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        # What the next run's reuse check needs to skip re-hashing unchanged inputs.
        "inputs": spilled["inputs"],
    }
    # Swap the finished folder in (locally) or upload it under a new prefix (object store),
    # then write the manifest last: a crash at any point before leaves either the old complete
    # dataset or no manifest at all.
    return publish(tmp, out_dir, manifest)


def _mix_entries(cfg: Any, plan: dict[str, Any]) -> dict[str, Any]:
    """The manifest's `mix`: N (`total`) and per source (`sources`, in order) its weight and
    train examples kept before mixing and written after it, and how: whole passes, the sampled
    remainder, and the repeats (examples beyond the first copy of a row)."""
    entries = []
    for src, weight, kept, target in zip(
        cfg.data.sources, plan["weights"], plan["kept"], plan["targets"], strict=True
    ):
        passes, sampled = divmod(target, kept) if kept else (0, 0)
        entries.append(
            {
                "task": src.task_name,
                "weight": weight,
                "kept": kept,
                "mixed": target,
                "passes": passes,
                "sampled": sampled,
                "repeats": target - min(target, kept),
            }
        )
    return {"total": plan["total"], "sources": entries}


def _write_batch(writer: ShardWriter, store: TokenStoreWriter | None, batch: pa.Table) -> None:
    writer.write(batch)
    if store is not None:
        store.write(batch)
    # Arrow's allocator keeps the pages a thread freed for that thread: hand back what the
    # Parquet encoder freed, or the writer thread's idle heap grows with the batches.
    pa.default_memory_pool().release_unused()


class InOrder:
    """Runs calls on one background thread, in the order given, at most `depth` waiting.

    `put` blocks while `depth` calls wait (the batches they hold bound the memory), and raises
    the first failure of an earlier call; `drain` waits for all of them.
    """

    def __init__(self, depth: int = 2) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ift-write")
        self.depth = depth
        self.pending: list[Any] = []

    def put(self, fn: Any, *args: Any) -> None:
        while len(self.pending) >= self.depth:
            self.pending.pop(0).result()
        self.pending.append(self.pool.submit(fn, *args))

    def drain(self) -> None:
        while self.pending:
            self.pending.pop(0).result()

    def __enter__(self) -> InOrder:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        try:
            if exc_type is None:
                self.drain()
        finally:  # after a failure here, what has not started is dropped
            self.pool.shutdown(wait=True, cancel_futures=True)


def _add_counts(histogram: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    counts = np.bincount(lengths, minlength=len(histogram))
    if len(counts) > len(histogram):  # longer than max_seq_len: only if a template allows it
        histogram = np.concatenate([histogram, np.zeros(len(counts) - len(histogram), np.int64)])
    histogram += counts
    return histogram


def _write_exemplars(
    tmp: str, spill: SpillTable, chosen: list[np.ndarray], tasks: list[str]
) -> dict[str, Any]:
    """`exemplars/<task>.jsonl`: the chosen kept train rows (spill indices) per task as
    rendered text; only their text is read from the (memory-mapped) train spill. Every task
    gets a file, empty when it has no train rows (e.g. a source pinned to test)."""
    os.makedirs(os.path.join(tmp, EXEMPLARS))
    out: dict[str, Any] = {}
    for task, rows in zip(tasks, chosen, strict=True):
        picked = spill.take(rows, ["prompt", "reference"]).to_pylist()
        lines = [json.dumps({"prompt": r["prompt"], "completion": r["reference"]}) for r in picked]
        rel = f"{EXEMPLARS}/{task}.jsonl"
        with open(os.path.join(tmp, rel), "w") as f:
            f.write("".join(line + "\n" for line in lines))
        out[task] = {"file": rel, "rows": len(lines)}
    return out


def stale_tmp_dirs(out_dir: str) -> list[str]:
    """The temporary folders of earlier runs that were killed (their process is gone). A folder
    whose process still runs on this host is another prepare at work and is left alone."""
    stale = []
    for path in glob.glob(glob.escape(out_dir.rstrip("/")) + ".tmp-*"):
        suffix = path.rsplit(".tmp-", 1)[1]
        if not (suffix.isascii() and suffix.isdigit()) or not os.path.isdir(path):
            continue
        try:
            os.kill(int(suffix), 0)
        except ProcessLookupError:
            stale.append(path)
        except PermissionError:  # alive, another user's
            pass
    return sorted(stale)


def _plain_batch(
    spill: SpillTable, kept: np.ndarray, names: list[str], multi_file: set[int], split_name: str
) -> pa.Table:
    """Unpacked rows, one example per row; the test split keeps its text and ids too.

    A test row's `id` is `<task>-<line>`, or `<task>-<file index>-<line>` for a source of
    several files (the index in the sorted file list), so that ids are unique.
    """
    with_text = split_name == "test"
    columns = ["input_ids", "labels"] + (
        ["source", "part", "line", "prompt", "reference", "prompt_ids"] if with_text else []
    )
    rows = spill.take(kept, columns)
    lengths = list_lengths(rows.column("input_ids"))
    cols: dict[str, Any] = {
        "input_ids": rows.column("input_ids").combine_chunks(),
        "labels": rows.column("labels").combine_chunks(),
        "seq_lens": pa.ListArray.from_arrays(
            pa.array(np.arange(len(lengths) + 1, dtype=np.int32)),
            pa.array(lengths.astype(np.int32)),
        ),
    }
    if with_text:
        src_ids = rows.column("source").to_pylist()
        parts, lines = rows.column("part").to_pylist(), rows.column("line").to_pylist()
        where = zip(src_ids, parts, lines, strict=True)
        cols["id"] = pa.array(
            [
                f"{names[src]}-{part}-{line}" if src in multi_file else f"{names[src]}-{line}"
                for src, part, line in where
            ],
            pa.string(),
        )
        cols["task"] = pa.array([names[i] for i in src_ids], pa.string())
        cols["prompt"] = rows.column("prompt").combine_chunks()
        cols["reference"] = rows.column("reference").combine_chunks()
        cols["prompt_ids"] = rows.column("prompt_ids").combine_chunks()
    return pa.table(cols, schema=TEST_SCHEMA if with_text else PLAIN_SCHEMA)


def _packed_batches(
    spill: SpillTable,
    kept: np.ndarray,
    lengths: np.ndarray,
    members: np.ndarray,
    bin_sizes: np.ndarray,
    per_slice: int,
) -> Iterator[pa.Table]:
    """The packed rows of a window, `per_slice` bins at a time (`members`: the examples, as
    indices into `kept`, bin after bin; `bin_sizes`: how many each bin holds)."""
    member_at = np.concatenate([[0], np.cumsum(bin_sizes)])
    for a in range(0, len(bin_sizes), per_slice):
        b = min(a + per_slice, len(bin_sizes))
        yield _packed_batch(
            spill, kept, lengths, members[member_at[a] : member_at[b]], bin_sizes[a:b]
        )


def _packed_batch(
    spill: SpillTable,
    kept: np.ndarray,
    lengths: np.ndarray,
    members: np.ndarray,
    per_row: np.ndarray,
) -> pa.Table:
    """Packed rows of bins of `per_row` examples each, `members` (indices into `kept`) bin after
    bin, built by `pack.pack_bins`: the members are taken from the spill in order and their
    tokens concatenated."""
    example_lens = lengths[members]
    ids, labels = spill.flat_values(kept[members], ["input_ids", "labels"], example_lens)
    labels, token_offsets, member_offsets = pack.pack_bins(labels, example_lens, per_row)
    token_offsets_arr = pa.array(token_offsets.astype(np.int32))
    return pa.table(
        {
            "input_ids": pa.ListArray.from_arrays(token_offsets_arr, pa.array(ids, pa.int32())),
            "labels": pa.ListArray.from_arrays(token_offsets_arr, pa.array(labels, pa.int32())),
            "seq_lens": pa.ListArray.from_arrays(
                pa.array(member_offsets.astype(np.int32)), pa.array(example_lens.astype(np.int32))
            ),
        },
        schema=PLAIN_SCHEMA,
    )


class ShardWriter:
    """Writes a split as Parquet files of ROWS_PER_SHARD rows and hashes their content.

    The hash covers, per column, the stream of row lengths and the stream of values, so it
    is the same however the rows were cut into batches or files.
    """

    def __init__(self, folder: str, schema: pa.Schema) -> None:
        self.folder = folder
        self.schema = schema
        self.rows = 0
        self.files: list[str] = []
        self.writer: pq.ParquetWriter | None = None
        self.in_file = 0
        self.hashes: dict[str, tuple[Any, Any]] = {}
        os.makedirs(folder, exist_ok=True)

    def write(self, table: pa.Table) -> None:
        while table.num_rows:
            if self.writer is None or self.in_file == ROWS_PER_SHARD:
                self._next_file()
            assert self.writer is not None
            part = table.slice(0, ROWS_PER_SHARD - self.in_file)
            self.writer.write_table(part)
            self._hash(part)
            self.in_file += part.num_rows
            self.rows += part.num_rows
            table = table.slice(part.num_rows)

    def _next_file(self) -> None:
        if self.writer is not None:
            self.writer.close()
        name = f"part-{len(self.files):05d}.parquet"
        self.writer = pq.ParquetWriter(os.path.join(self.folder, name), self.schema)
        self.files.append(f"{os.path.basename(self.folder)}/{name}")
        self.in_file = 0

    def _hash(self, table: pa.Table) -> None:
        for col in table.column_names:
            lengths_hash, values_hash = self.hashes.setdefault(
                col, (hashlib.sha256(), hashlib.sha256())
            )
            column = table.column(col)
            if pa.types.is_list(column.type):
                lengths_hash.update(list_lengths(column).astype("<i8").tobytes())
                values_hash.update(pc.list_flatten(column).to_numpy().astype("<i4").tobytes())
            else:
                for value in column.to_pylist():
                    data = str(value).encode() if value is not None else b"\xff"
                    lengths_hash.update(len(data).to_bytes(8, "little"))
                    values_hash.update(data)

    def digest(self) -> str:
        h = hashlib.sha256()
        for col, (lengths_hash, values_hash) in self.hashes.items():
            h.update(f"{col}:{lengths_hash.hexdigest()}:{values_hash.hexdigest()}".encode())
        return h.hexdigest()

    def close(self) -> list[str]:
        if self.writer is None:  # an empty split still gets one (empty) file
            self._next_file()
            assert self.writer is not None
            self.writer.write_table(self.schema.empty_table())
        self.writer.close()
        return self.files

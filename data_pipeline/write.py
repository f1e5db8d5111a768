"""Writing a prepared dataset: shards (packed or plain), exemplars, the manifest, atomically.

`write_dataset` reads the kept rows of each split from the spill a slice at a time, packs
train and validation (best-fit decreasing over windows of PACK_WINDOW examples, from their
lengths alone), writes Parquet shards of ROWS_PER_SHARD rows while hashing their content into
the dataset's fingerprint, picks the exemplars, then moves the finished folder into place and
writes `manifest.json` last. A crash at any point leaves either the previous complete dataset
or no manifest at all.
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
    MANIFEST,
    PLAIN_SCHEMA,
    TEST_SCHEMA,
    VERSION,
    write_json_atomic,
)
from data_pipeline.selection import exemplar_rows_in_slices
from data_pipeline.spill import SPILL, SPILL_COLUMNS, list_lengths, read_spill, take

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
    keep: np.ndarray,
    spilled: dict[str, Any],
    stats: dict[str, int],
    config_hash: str,
    tok_path: str,
) -> dict[str, Any]:
    names = [s.task_name for s in cfg.data.sources]
    capacity = cfg.data.max_seq_len
    digest = hashlib.sha256()
    splits: dict[str, Any] = {}
    exemplars: dict[str, Any] = {}
    for name in split.SPLITS:
        in_split = spilled["split"] == split.SPLIT_CODES[name]
        mask = keep[in_split]  # spill rows are in input order too
        table, release = read_spill(spilled["spill"].get(name))
        kept = np.flatnonzero(mask)
        lengths = list_lengths(table.column("input_ids"))[kept]
        loss_tokens = table.column("loss_tokens").to_numpy()[kept]
        release()
        info: dict[str, Any] = {**tokenize.token_stats(lengths, loss_tokens)}
        schema = TEST_SCHEMA if name == "test" else PLAIN_SCHEMA
        writer = ShardWriter(os.path.join(tmp, name), schema)
        per_slice = max(1, SLICE_TOKENS // capacity)
        if name == "test" or not cfg.data.packing:
            multi_file = spilled["multi_file"]
            for batch in _plain_batches(
                table, kept, names, multi_file, with_text=(name == "test"), per_slice=per_slice
            ):
                writer.write(batch)
                release()
            info["packed"] = False
        else:
            # Packed a window of PACK_WINDOW examples at a time, so that the packer's Python
            # lists stay bounded however big the split is.
            n_bins = 0
            for first in range(0, len(kept), PACK_WINDOW):
                window = lengths[first : first + PACK_WINDOW]
                bins = pack.best_fit_decreasing(window.tolist(), capacity)
                n_bins += len(bins)
                for start in range(0, len(bins), per_slice):
                    part = bins[start : start + per_slice]
                    writer.write(_packed_batch(table, kept[first:], window, part))
                    release()
            info["packed"] = True
            info["packed_rows"] = n_bins
            info["packing_efficiency"] = (
                float(lengths.sum()) / (n_bins * capacity) if n_bins else 0.0
            )
        info["examples"] = int(len(kept))
        info["rows"] = writer.rows
        info["files"] = writer.close()
        digest.update(f"{name}:{writer.rows}:{writer.digest()}".encode())
        sources_kept = table.column("source").to_numpy()[kept]
        counts = np.bincount(sources_kept, minlength=len(names))
        info["per_task"] = {n: int(counts[i]) for i, n in enumerate(names)}
        splits[name] = info
        if name == "train" and cfg.data.exemplars:
            rows = np.flatnonzero(in_split)[kept]  # the kept train rows among all rows
            ck = (spilled["ck_hi"], spilled["ck_lo"])
            exemplars = _write_exemplars(tmp, table, kept, rows, ck, names, cfg.data.exemplars)
            del rows
            digest.update(f"exemplars:{json.dumps(exemplars, sort_keys=True)}".encode())
        del table
        release()
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
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    # Swap the finished folder in, then write the manifest last: a crash at any point before
    # leaves either the old complete dataset or no manifest at all.
    if os.path.exists(out_dir):
        old_manifest = os.path.join(out_dir, MANIFEST)
        if os.path.exists(old_manifest):
            os.remove(old_manifest)
        shutil.rmtree(out_dir)
    os.makedirs(os.path.dirname(out_dir.rstrip("/")) or ".", exist_ok=True)
    os.rename(tmp, out_dir)
    write_json_atomic(os.path.join(out_dir, MANIFEST), manifest)
    return manifest


def _write_exemplars(
    tmp: str,
    table: pa.Table,
    kept: np.ndarray,
    rows: np.ndarray,
    ck: tuple[np.ndarray, np.ndarray],
    names: list[str],
    k: int,
) -> dict[str, Any]:
    """`exemplars/<task>.jsonl`: up to `k` kept train rows per task as rendered text.

    `kept` indexes the train spill and `rows` the same rows among all rows (the content keys
    `ck`); the choice loads PACK_WINDOW rows at a time. Only the chosen rows' text is read
    from the (memory-mapped) train spill. Every task gets a file, empty when it has no
    train rows (e.g. a source pinned to test).
    """
    tasks = sorted(set(names))
    task_of_source = np.asarray([tasks.index(n) for n in names], np.int64)
    source = table.column("source").to_numpy()

    def load(part: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return ck[0][rows[part]], ck[1][rows[part]], task_of_source[source[kept[part]]]

    chosen = exemplar_rows_in_slices(load, len(kept), len(tasks), k, PACK_WINDOW)
    os.makedirs(os.path.join(tmp, EXEMPLARS))
    out: dict[str, Any] = {}
    for task, mine in zip(tasks, chosen, strict=True):
        picked = take(table, kept[mine], ["prompt", "reference"]).to_pylist()
        lines = [json.dumps({"prompt": r["prompt"], "completion": r["reference"]}) for r in picked]
        rel = f"{EXEMPLARS}/{task}.jsonl"
        with open(os.path.join(tmp, rel), "w") as f:
            f.write("".join(line + "\n" for line in lines))
        out[task] = {"file": rel, "rows": len(lines)}
    return out


def remove_stale_tmp(out_dir: str) -> None:
    """Delete the temporary folders of earlier runs that were killed (their process is gone),
    so that crashes do not pile up spill files next to the dataset. A folder whose process
    still runs on this host is another prepare at work and is left alone."""
    for path in glob.glob(glob.escape(out_dir.rstrip("/")) + ".tmp-*"):
        suffix = path.rsplit(".tmp-", 1)[1]
        if not (suffix.isascii() and suffix.isdigit()) or not os.path.isdir(path):
            continue
        try:
            os.kill(int(suffix), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass


def _plain_batches(
    table: pa.Table,
    kept: np.ndarray,
    names: list[str],
    multi_file: set[int],
    with_text: bool,
    per_slice: int,
) -> Iterator[pa.Table]:
    """Unpacked rows in input order, one example per row, a slice at a time.

    A test row's `id` is `<task>-<line>`, or `<task>-<file index>-<line>` for a source of
    several files (the index in the sorted file list), so that ids are unique.
    """
    for start in range(0, len(kept), per_slice):
        rows = take(table, kept[start : start + per_slice], SPILL_COLUMNS)
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
            task = [names[i] for i in src_ids]
            parts, lines = rows.column("part").to_pylist(), rows.column("line").to_pylist()
            where = zip(src_ids, parts, lines, strict=True)
            cols["id"] = pa.array(
                [
                    f"{names[src]}-{part}-{line}" if src in multi_file else f"{names[src]}-{line}"
                    for src, part, line in where
                ],
                pa.string(),
            )
            cols["task"] = pa.array(task, pa.string())
            cols["prompt"] = rows.column("prompt").combine_chunks()
            cols["reference"] = rows.column("reference").combine_chunks()
            cols["prompt_ids"] = rows.column("prompt_ids").combine_chunks()
        yield pa.table(cols, schema=TEST_SCHEMA if with_text else PLAIN_SCHEMA)


def _packed_batch(
    table: pa.Table, kept: np.ndarray, lengths: np.ndarray, bins: list[list[int]]
) -> pa.Table:
    """Packed rows for `bins` (indices into `kept`), built by `pack.pack_bins`: the members of
    each bin are taken from the spill in order and their tokens concatenated."""
    members = np.fromiter((i for b in bins for i in b), np.int64)
    per_row = np.fromiter((len(b) for b in bins), np.int64, count=len(bins))
    rows = take(table, kept[members], ["input_ids", "labels"])
    ids = pc.list_flatten(rows.column("input_ids")).to_numpy()
    example_lens = lengths[members]
    labels, token_offsets, member_offsets = pack.pack_bins(
        pc.list_flatten(rows.column("labels")).to_numpy(), example_lens, per_row
    )
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

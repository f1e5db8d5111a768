"""The memory-mapped token store: exact round trip of real rows, loss counts, refusals, the
object-storage cache, and a rank's anonymous memory that does not grow with the split."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer

from data_pipeline import token_store as ts
from data_pipeline.pack import pack_rows
from data_pipeline.sources import Reject, detect_format, parse_bytes
from data_pipeline.templates import render
from data_pipeline.tokenize import build_batch
from training.data import MANIFEST_VERSION, load_split

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "tests" / "assets"
BOS, EOS = 1, 2  # stories260K: <s>, </s>
VOCAB = 512  # stories260K's vocabulary
IGNORE = -100


def table_of(rows: list[dict[str, list[int]]]) -> pa.Table:
    cols = {name: [r[name] for r in rows] for name in ts.ROW_SCHEMA.names}
    return pa.table(cols, schema=ts.ROW_SCHEMA)


@pytest.fixture(scope="module")
def examples() -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of real records, built as prepare builds them (prompts masked)."""
    tok = Tokenizer.from_file(str(ASSETS / "models" / "stories260K" / "tokenizer.json"))
    tok.no_truncation()
    turns = []
    for rel, template in [
        ("sst2/train.tsv", "sst2"),
        ("instruction/alpaca_en_demo.json", "alpaca"),
    ]:
        path = ASSETS / "data" / rel
        parsed = parse_bytes(path.read_bytes(), rel, detect_format(str(path)))
        turns += [render(template, r) for _, r in parsed if not isinstance(r, Reject)][:600]
    texts = [text for t in turns for pair in t for text in pair]
    ids = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
    built = build_batch(
        ids, [len(t) for t in turns], bos_id=BOS, eos_id=EOS, max_seq_len=128, truncation="left"
    )
    off = built.offsets
    return [
        (built.input_ids[a:b].tolist(), built.labels[a:b].tolist())
        for a, b in zip(off[:-1], off[1:], strict=True)
    ]


@pytest.fixture(scope="module", params=["packed", "unpacked"])
def rows(request: pytest.FixtureRequest, examples) -> list[dict[str, list[int]]]:
    if request.param == "packed":
        return pack_rows(examples, capacity=128)
    return [{"input_ids": i, "labels": lab, "seq_lens": [len(i)]} for i, lab in examples]


def write_both(rows: list[dict[str, list[int]]], folder: Path) -> tuple[pa.Table, ts.TokenStore]:
    """Write the rows as a Parquet shard and as a store, in uneven tables (one empty)."""
    cuts = [0, 0, 1, 37, 38, 400, len(rows)]
    store_writer = ts.TokenStoreWriter(str(folder / "store"), VOCAB)
    with pq.ParquetWriter(folder / "part.parquet", ts.ROW_SCHEMA) as pw:
        for a, b in zip(cuts[:-1], cuts[1:], strict=True):
            part = table_of(rows[a:b])
            pw.write_table(part)
            store_writer.write(part)
    index = store_writer.close()
    assert index["rows"] == len(rows)
    assert index["tokens"] == sum(len(r["input_ids"]) for r in rows)
    return pq.read_table(folder / "part.parquet"), ts.open_store(str(folder / "store"))


def old_loss_tokens(labels: list[list[int]], idx: list[int]) -> int:
    """What `Split.loss_tokens` computed before the store: a Python loop over rows."""
    return int(sum(int((np.asarray(labels[i][1:]) != IGNORE).sum()) for i in idx))


def test_rows_equal_the_parquet_rows_exactly(rows, tmp_path: Path) -> None:
    table, store = write_both(rows, tmp_path)
    assert len(store) == table.num_rows == len(rows) > 100
    assert store.tokens.dtype == np.dtype("<u2")
    parquet = {c: table.column(c).to_pylist() for c in ts.ROW_SCHEMA.names}
    order = np.random.default_rng(0).permutation(len(rows))
    got = store.rows(order)
    for i, (ids, labels, seq_lens) in zip(order.tolist(), got, strict=True):
        assert ids.dtype == labels.dtype == seq_lens.dtype == np.int64
        assert ids.tolist() == parquet["input_ids"][i]
        assert labels.tolist() == parquet["labels"][i]
        assert seq_lens.tolist() == parquet["seq_lens"][i]
    assert store.rows([]) == []


def test_loss_tokens_equal_the_old_loop(rows, tmp_path: Path) -> None:
    table, store = write_both(rows, tmp_path)
    labels = table.column("labels").to_pylist()
    rng = np.random.default_rng(1)
    everything = list(range(len(rows)))
    assert store.loss_tokens(everything) == old_loss_tokens(labels, everything)
    for size in (1, 4, 33):
        idx = rng.integers(0, len(rows), size)  # repeats count twice, as before
        assert store.loss_tokens(idx) == old_loss_tokens(labels, idx.tolist())
    assert store.loss_tokens([]) == 0
    # Masked firsts of packed examples are not counted; a learned first token of a row would be
    # (it is the target of nothing): the shift, not the mask, excludes it.
    one = ts.from_rows([{"input_ids": [5, 6, 7], "labels": [5, 6, IGNORE], "seq_lens": [3]}])
    assert one.loss_tokens([0]) == 1


def test_files_are_little_endian_and_dtypes_follow_the_vocabulary(tmp_path: Path) -> None:
    row = {"input_ids": [1, 70_000, 3], "labels": [IGNORE, 70_000, 3], "seq_lens": [3]}
    assert ts.token_dtype(65_536) == "<u2" and ts.token_dtype(65_537) == "<u4"
    writer = ts.TokenStoreWriter(str(tmp_path), vocab_size=100_000)
    writer.write(table_of([row, row]))
    index = writer.close()
    assert index["dtype"]["tokens"] == "<u4" and index["version"] == ts.VERSION
    raw = (tmp_path / "tokens.bin").read_bytes()
    assert raw[4:8] == (70_000).to_bytes(4, "little")
    assert json.loads((tmp_path / ts.INDEX).read_text()) == index
    ids, labels, lens = ts.open_store(str(tmp_path)).rows([1])[0]
    assert ids.tolist() == row["input_ids"] and labels.tolist() == row["labels"]
    assert lens.tolist() == [3]


def test_writer_refuses_what_the_store_cannot_hold(tmp_path: Path) -> None:
    good = {"input_ids": [1, 5, 6], "labels": [IGNORE, 5, 6], "seq_lens": [3]}
    cases = {
        "neither its token": {**good, "labels": [IGNORE, 9, 6]},
        "add up": {**good, "seq_lens": [2]},
        "number of labels": {**good, "labels": [IGNORE, 5]},
        "outside": {**good, "input_ids": [1, 70_000, 6], "labels": [IGNORE, 70_000, 6]},
    }
    for message, row in cases.items():
        writer = ts.TokenStoreWriter(str(tmp_path / message.replace(" ", "_")), VOCAB)
        with pytest.raises(ValueError, match=message):
            writer.write(table_of([good, row]))


def test_open_refuses_unfinished_or_damaged_stores(tmp_path: Path) -> None:
    writer = ts.TokenStoreWriter(str(tmp_path), VOCAB)
    writer.write(table_of([{"input_ids": [1, 5], "labels": [IGNORE, 5], "seq_lens": [2]}]))
    with pytest.raises(FileNotFoundError, match="not a finished"):
        ts.open_store(str(tmp_path))  # index.json comes last
    writer.close()
    assert len(ts.open_store(str(tmp_path))) == 1
    with open(tmp_path / "tokens.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(ValueError, match="bytes, expected"):
        ts.open_store(str(tmp_path))
    index = json.loads((tmp_path / ts.INDEX).read_text())
    (tmp_path / ts.INDEX).write_text(json.dumps({**index, "version": 0}))
    with pytest.raises(ValueError, match="prepare the data again"):
        ts.open_store(str(tmp_path))


def test_an_empty_split_opens(tmp_path: Path) -> None:
    writer = ts.TokenStoreWriter(str(tmp_path), VOCAB)
    writer.write(table_of([]))
    assert writer.close()["rows"] == 0
    store = ts.open_store(str(tmp_path))
    assert len(store) == 0 and store.loss_tokens([]) == 0


def manifest_for(folder: str) -> dict[str, Any]:
    return {
        "version": MANIFEST_VERSION,
        "fingerprint": "f" * 64,
        "splits": {"train": {"rows": 2, "store": {"path": folder}}},
    }


def test_load_split_maps_the_store_named_by_the_manifest(tmp_path: Path) -> None:
    rows = [
        {"input_ids": [1, 5, 6], "labels": [IGNORE, 5, 6], "seq_lens": [3]},
        {"input_ids": [1, 7, 1, 8], "labels": [IGNORE, 7, IGNORE, 8], "seq_lens": [2, 2]},
    ]
    writer = ts.TokenStoreWriter(str(tmp_path / "store" / "train"), VOCAB)
    writer.write(table_of(rows))
    writer.close()
    split = load_split(str(tmp_path), manifest_for("store/train"), "train")
    assert isinstance(split.tokens, np.memmap)
    assert [r[1].tolist() for r in split.rows([1, 0])] == [rows[1]["labels"], rows[0]["labels"]]
    assert split.loss_tokens([0, 1]) == 4


def test_a_uri_is_copied_once_to_the_local_cache(tmp_path: Path, monkeypatch) -> None:
    rows = [{"input_ids": [1, 5, 6], "labels": [IGNORE, 5, 6], "seq_lens": [3]}] * 3
    data = tmp_path / "remote"
    writer = ts.TokenStoreWriter(str(data / "store" / "train"), VOCAB)
    writer.write(table_of(rows))
    writer.close()
    cache = tmp_path / "cache"
    monkeypatch.setenv(ts.CACHE_ENV, str(cache))
    split = load_split(f"file://{data}", manifest_for("store/train"), "train")
    assert len(split) == 3 and split.loss_tokens([0, 1, 2]) == 6
    (copied,) = cache.iterdir()
    assert copied.name.startswith("f" * 24) and str(split.tokens.filename).startswith(str(copied))
    assert not [p for p in cache.iterdir() if ".tmp-" in p.name]
    # The second rank of the node maps the copy: the source is not read again.
    (data / "store" / "train" / "tokens.bin").unlink()
    again = load_split(f"file://{data}", manifest_for("store/train"), "train")
    assert [r[0].tolist() for r in again.rows([2])] == [[1, 5, 6]]


# --- a rank's anonymous memory depends on the micro-batch, not on the split --------------------

PROBE = """
import json, sys
import numpy as np
from data_pipeline.token_store import open_store

def anon_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))

base = anon_kib()
store = open_store(sys.argv[1])
opened = anon_kib()
rng = np.random.default_rng(0)
for _ in range(50):  # 50 micro-batches of 8 rows, as a rank reads them
    idx = rng.integers(0, len(store), 8)
    rows = store.rows(idx)
    store.loss_tokens(idx)
read = anon_kib()
if sys.argv[2] == "control":  # what holding the split in memory costs, to show it is seen
    held = np.asarray(store.tokens, np.int64)
print(json.dumps({"opened": opened - base, "read": read - base, "end": anon_kib() - base}))
"""


def synthetic_store(folder: Path, tokens: int, row_len: int = 512) -> None:
    """`tokens` tokens in packed-looking rows of `row_len`, written a slice at a time."""
    writer = ts.TokenStoreWriter(str(folder), 32_000)
    rng = np.random.default_rng(0)
    per_table = 2048
    for first in range(0, tokens // row_len, per_table):
        n = min(per_table, tokens // row_len - first)
        ids = rng.integers(3, 32_000, n * row_len).astype(np.int32)
        labels = np.where(rng.random(len(ids)) < 0.5, ids, IGNORE).astype(np.int32)
        offsets = pa.array(np.arange(n + 1, dtype=np.int32) * row_len)
        lens = pa.array(np.full(n * 4, row_len // 4, np.int32))
        writer.write(
            pa.table(
                {
                    "input_ids": pa.ListArray.from_arrays(offsets, pa.array(ids)),
                    "labels": pa.ListArray.from_arrays(offsets, pa.array(labels)),
                    "seq_lens": pa.ListArray.from_arrays(pa.array(np.arange(n + 1) * 4), lens),
                },
                schema=ts.ROW_SCHEMA,
            )
        )
    writer.close()


def probe(folder: Path, mode: str = "plain") -> dict[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(folder), mode],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def test_rank_memory_does_not_grow_with_the_split(tmp_path: Path) -> None:
    """1x = 0.5M tokens, 10x = 5M. The old loader's ~38 B/token would add ~170 MiB at 10x;
    the store may add a few hundred KiB (micro-batch arrays, allocator noise)."""
    synthetic_store(tmp_path / "x1", 500_000)
    synthetic_store(tmp_path / "x10", 5_000_000)
    x1, x10 = probe(tmp_path / "x1"), probe(tmp_path / "x10")
    budget_kib = 4 * 1024  # 38 B/token stays under it only below ~110k tokens
    assert x10["opened"] < 512 and x10["read"] < budget_kib, x10
    assert x10["read"] - x1["read"] < 1024, (x1, x10)
    # Control: the probe does see memory a rank holds (5M tokens as int64 = 38 MiB).
    held = probe(tmp_path / "x10", "control")
    assert held["end"] > 30 * 1024, held

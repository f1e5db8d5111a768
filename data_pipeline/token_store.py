"""The token store: a split's rows as flat memory-mapped arrays, written by prepare, read by ranks.

The one place this on-disk contract lives. Megatron-style: a rank opens a store in O(1) time
and memory with `np.memmap` and reads only the rows of its micro-batch, so its anonymous memory
depends on the micro-batch, never on the split. Pure numpy/pyarrow (no Ray).

A store is a folder of little-endian arrays plus `index.json`:

    tokens.bin        every row's input ids, concatenated   uint16 (vocab <= 65536) or uint32
    loss_mask.bin     1 where the label is the token itself,  uint8, one per token
                      0 where it is -100 (prompt, bos, first token of a packed example)
    example_lens.bin  every row's `seq_lens`, concatenated  uint32
    row_tokens.bin    row r's tokens are [row_tokens[r], row_tokens[r+1])      int64, rows + 1
    row_examples.bin  row r's examples are [row_examples[r], row_examples[r+1])  int64, rows + 1
    row_loss.bin      prefix sums of each row's loss tokens after the label shift
                      (labels[1:] != -100, what the loss counts)                 int64, rows + 1

A mask is enough because prepare's label is always the token or -100 (`tokenize.build_batch`
copies completion ids, `pack` only masks); the writer checks this and refuses anything else.
`index.json` is written last, so a folder without it is unfinished.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from data_pipeline import local_cache

FORMAT = "ift-token-store"
VERSION = 1
INDEX = "index.json"
IGNORE_INDEX = -100
# Where prepare puts a split's store, relative to the data dir: store/<split>/.
STORE_DIR = "store"
CACHE_ENV = "IFT_TOKEN_CACHE"

# name -> fixed dtype; "tokens" is chosen per store from the vocabulary size.
_FIXED = {
    "loss_mask": "u1",
    "example_lens": "<u4",
    "row_tokens": "<i8",
    "row_examples": "<i8",
    "row_loss": "<i8",
}
_OFFSETS = ("row_tokens", "row_examples", "row_loss")
ARRAYS = ("tokens", *_FIXED)


def token_dtype(vocab_size: int) -> str:
    """The smallest unsigned little-endian dtype that holds every id of the vocabulary."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return "<u2" if vocab_size <= 1 << 16 else "<u4"


def _flat(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return pc.list_flatten(column).to_numpy(zero_copy_only=False)


def _lengths(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)


def _offsets(lengths: np.ndarray) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def encode(table: pa.Table, dtype: str) -> dict[str, np.ndarray]:
    """The store's arrays for the rows of one table; offsets start at 0 and have rows + 1 entries.

    Args:
        table: list<int32> columns `input_ids`, `labels`, `seq_lens`, one row per (packed) row.
        dtype: the token dtype (`token_dtype`).

    Returns:
        A dict with every name of `ARRAYS`.

    Raises:
        ValueError: If a row's labels or seq_lens do not match its ids, a label is neither its
            token nor -100, or an id does not fit `dtype`.
    """
    ids = _flat(table.column("input_ids")).astype(np.int64)
    labels = _flat(table.column("labels")).astype(np.int64)
    row_len = _lengths(table.column("input_ids"))
    ex_len = _flat(table.column("seq_lens")).astype(np.int64)
    ex_per_row = _lengths(table.column("seq_lens"))
    row_tokens = _offsets(row_len)
    row_examples = _offsets(ex_per_row)
    if not np.array_equal(_lengths(table.column("labels")), row_len):
        raise ValueError("a row has a different number of labels and input ids")
    ex_end = _offsets(ex_len)
    if not np.array_equal(ex_end[row_examples[1:]] - ex_end[row_examples[:-1]], row_len):
        raise ValueError("a row's seq_lens do not add up to its length")
    limit = np.iinfo(np.dtype(dtype)).max
    if len(ids) and (ids.min() < 0 or ids.max() > limit):
        raise ValueError(f"token ids span [{ids.min()}, {ids.max()}], outside {dtype}")
    learned = labels != IGNORE_INDEX
    if np.any(learned & (labels != ids)):
        raise ValueError("a label is neither its token nor -100: the store keeps only a mask")
    # What the loss counts: labels[1:] of each row, so not the first token of a row.
    counted = learned.copy()
    counted[row_tokens[:-1][row_len > 0]] = False
    loss_prefix = _offsets(counted.astype(np.int64))
    row_loss = _offsets(loss_prefix[row_tokens[1:]] - loss_prefix[row_tokens[:-1]])
    return {
        "tokens": ids.astype(dtype),
        "loss_mask": learned.astype("u1"),
        "example_lens": ex_len.astype(_FIXED["example_lens"]),
        "row_tokens": row_tokens,
        "row_examples": row_examples,
        "row_loss": row_loss,
    }


class TokenStoreWriter:
    """Appends tables to a store's files; memory is bounded by one table.

    Writes into `folder` as it is given; placing the finished folder atomically is the caller's
    job (prepare builds its whole output in a temporary folder and renames it).
    """

    def __init__(self, folder: str, vocab_size: int) -> None:
        self.folder = folder
        self.dtype = token_dtype(vocab_size)
        self.vocab_size = vocab_size
        os.makedirs(folder, exist_ok=True)
        self.files = {name: open(os.path.join(folder, f"{name}.bin"), "wb") for name in ARRAYS}
        self.totals = dict.fromkeys(_OFFSETS, 0)
        for name in _OFFSETS:  # every offset array starts at 0
            self.files[name].write(np.zeros(1, "<i8").tobytes())
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        """Append the rows of `table` (list<int32> `input_ids`, `labels`, `seq_lens`)."""
        arrays = encode(table, self.dtype)
        for name in ("tokens", "loss_mask", "example_lens"):
            self.files[name].write(arrays[name].tobytes())
        for name in _OFFSETS:  # shift by what is written already; drop the leading 0
            self.files[name].write((arrays[name][1:] + self.totals[name]).tobytes())
            self.totals[name] += int(arrays[name][-1])
        self.rows += table.num_rows

    def close(self) -> dict[str, Any]:
        """Close the files and write `index.json` (last); returns the index for the manifest."""
        for file in self.files.values():
            file.close()
        index = {
            "format": FORMAT,
            "version": VERSION,
            "dtype": {**_FIXED, "tokens": self.dtype},
            "vocab_size": self.vocab_size,
            "rows": self.rows,
            "tokens": self.totals["row_tokens"],
            "examples": self.totals["row_examples"],
            "loss_tokens": self.totals["row_loss"],
            "files": {name: f"{name}.bin" for name in ARRAYS},
        }
        with open(os.path.join(self.folder, INDEX), "w") as out:
            json.dump(index, out, indent=2)
        return index


@dataclass(frozen=True)
class TokenStore:
    """A split's rows as flat arrays: memory maps (`open_store`) or in memory (`from_table`)."""

    tokens: np.ndarray
    loss_mask: np.ndarray
    example_lens: np.ndarray
    row_tokens: np.ndarray
    row_examples: np.ndarray
    row_loss: np.ndarray

    def __len__(self) -> int:
        return len(self.row_tokens) - 1

    def rows(
        self, idx: Sequence[int] | np.ndarray
    ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """The rows `idx`, in that order, as Parquet holds them.

        Returns:
            `(input_ids, labels, seq_lens)` int64 arrays per row; labels are -100 where masked.
        """
        out = []
        for i in np.asarray(idx, np.int64).tolist():
            start, end = int(self.row_tokens[i]), int(self.row_tokens[i + 1])
            ids = np.asarray(self.tokens[start:end], np.int64)
            labels = np.where(self.loss_mask[start:end] != 0, ids, IGNORE_INDEX)
            first, last = int(self.row_examples[i]), int(self.row_examples[i + 1])
            out.append((ids, labels, np.asarray(self.example_lens[first:last], np.int64)))
        return out

    def loss_tokens(self, idx: Sequence[int] | np.ndarray) -> int:
        """Tokens the loss counts (labels after the shift that are not -100) over rows `idx`."""
        i = np.asarray(idx, np.int64)
        return int((self.row_loss[i + 1] - self.row_loss[i]).sum())


def _map(path: str, dtype: str, count: int) -> np.ndarray:
    if count == 0:  # mmap refuses an empty file
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


def open_store(folder: str) -> TokenStore:
    """Map a finished store read-only: O(1) time and memory, whatever its size.

    Raises:
        FileNotFoundError: If the folder has no `index.json` (not a store, or unfinished).
        ValueError: If it is another format or version, or a file has the wrong size.
    """
    path = os.path.join(folder, INDEX)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{folder} is not a finished token store (no {INDEX})")
    with open(path) as f:
        index = json.load(f)
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise ValueError(
            f"{folder}: token store {index.get('format')} v{index.get('version')}, this code "
            f"reads {FORMAT} v{VERSION}; prepare the data again"
        )
    counts = {
        "tokens": index["tokens"],
        "loss_mask": index["tokens"],
        "example_lens": index["examples"],
        **dict.fromkeys(_OFFSETS, index["rows"] + 1),
    }
    arrays = {}
    for name in ARRAYS:
        file = os.path.join(folder, index["files"][name])
        dtype = index["dtype"][name]
        expected = counts[name] * np.dtype(dtype).itemsize
        if os.path.getsize(file) != expected:
            raise ValueError(f"{file} has {os.path.getsize(file)} bytes, expected {expected}")
        arrays[name] = _map(file, dtype, counts[name])
    return TokenStore(**arrays)


def from_table(table: pa.Table, vocab_size: int | None = None) -> TokenStore:
    """An in-memory store of `table`'s rows, encoded exactly as the writer encodes them."""
    if vocab_size is None:
        ids = _flat(table.column("input_ids"))
        vocab_size = int(ids.max()) + 1 if len(ids) else 1
    return TokenStore(**encode(table, token_dtype(vocab_size)))


ROW_SCHEMA = pa.schema(
    [(name, pa.list_(pa.int32())) for name in ("input_ids", "labels", "seq_lens")]
)


def from_rows(rows: Iterable[Mapping[str, Sequence[int]]]) -> TokenStore:
    """An in-memory store of dict rows (`input_ids`, `labels`, `seq_lens`), for tests and tools."""
    rows = list(rows)
    cols = {name: [list(r[name]) for r in rows] for name in ROW_SCHEMA.names}
    return from_table(pa.table(cols, schema=ROW_SCHEMA))


def cache_root() -> str:
    """Where `local_copy` keeps its copies by default (`ift cache` lists and prunes it)."""
    return os.environ.get(CACHE_ENV) or os.path.join(tempfile.gettempdir(), "ift-token-cache")


def local_copy(uri: str, key: str, cache_dir: str | None = None) -> str:
    """A local folder holding the store at `uri` (s3://..., file://...), copied once per node.

    Every rank of a node asks for the same `key` (the data fingerprint and split); the copy is a
    `local_cache` entry: filled atomically (ranks that race never see a half-copied store),
    held while the rank lives, the cache kept within its disk budget.

    Args:
        uri: the store folder on any filesystem pyarrow knows.
        key: names the copy; must change whenever the data changes.
        cache_dir: where copies live; default `$IFT_TOKEN_CACHE` or `<tmp>/ift-token-cache`.

    Returns:
        The local folder to `open_store`.
    """
    root = cache_dir or cache_root()

    def fill(tmp: str) -> None:
        fs, path = pafs.FileSystem.from_uri(uri)
        pafs.copy_files(
            path, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem()
        )
        if not os.path.exists(os.path.join(tmp, INDEX)):
            raise FileNotFoundError(f"{uri} is not a finished token store (no {INDEX})")

    return local_cache.cached(root, key, fill)

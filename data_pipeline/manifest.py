"""The prepared-data contract: what `ift prepare` leaves in `data.output_dir`.

Training and eval read prepared data through the names and schemas defined here, and prepare
writes them; nothing else of data_pipeline's internals crosses that line
(docs/ARCHITECTURE.md). The folder holds

- `manifest.json` (`MANIFEST`): written last, atomically; no manifest, no dataset. Its
  `version` is `VERSION`; `splits.<name>` gives `rows`, `tokens`, `files` (Parquet shards
  relative to the folder) and the per-task counts.
- `<split>/part-NNNNN.parquet`: `PLAIN_SCHEMA` rows for train and validation (packed or one
  example per row; `seq_lens` holds the lengths of the examples in a row), `TEST_SCHEMA` for
  test (one example per row, with the text and ids generation needs).
- `rejects.jsonl` (`REJECTS`): one line per rejected record (`source`, `line`, `reason`).
- `exemplars/<task>.jsonl` (`EXEMPLARS`): k-shot exemplar candidates as rendered text.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pyarrow as pa

VERSION = 2
MANIFEST = "manifest.json"
REJECTS = "rejects.jsonl"
EXEMPLARS = "exemplars"

_I32_LIST = pa.list_(pa.int32())
PLAIN_SCHEMA = pa.schema([("input_ids", _I32_LIST), ("labels", _I32_LIST), ("seq_lens", _I32_LIST)])
TEST_SCHEMA = pa.schema(
    list(PLAIN_SCHEMA)
    + [
        ("id", pa.string()),
        ("task", pa.string()),
        ("prompt", pa.string()),
        ("reference", pa.string()),
        ("prompt_ids", _I32_LIST),
    ]
)


def read_manifest(out_dir: str) -> dict[str, Any] | None:
    """The manifest of a prepared folder, or None when there is none (no finished dataset)."""
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)  # type: ignore[no-any-return]


def write_json_atomic(path: str, obj: Any) -> None:
    """Write JSON to a temporary name, flush it to disk, then rename it over `path`."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)

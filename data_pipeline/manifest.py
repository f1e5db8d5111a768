"""The prepared-data contract: what `ift prepare` leaves in `data.output_dir`.

Training and eval read prepared data through the names and schemas defined here, and prepare
writes them; nothing else of data_pipeline's internals crosses that line
(docs/ARCHITECTURE.md). The folder holds

- `manifest.json` (`MANIFEST`): written last, atomically; no manifest, no dataset. Its
  `version` is `VERSION`; `splits.<name>` gives `rows`, `tokens`, `files` (Parquet shards
  relative to the folder) and the per-task counts; for train and validation, `store`: the
  split's token store (`path` relative to the folder, plus its index: `dtype`, `rows`,
  `tokens`, `examples`, `loss_tokens`, `files`; see `data_pipeline.token_store`). With
  mixing weights (`data.sources[].weight`) also `mix`: `total` (N) and `sources`, per source
  in config order `task`, `weight` (0 when ignored: pinned to validation or test), `kept`
  (train examples before mixing), `mixed` (after; the train split's `per_task` counts them),
  `passes` (whole passes), `sampled` (the remainder drawn) and `repeats` (examples beyond a
  row's first copy); absent without weights.
- `store/<split>/`: train and validation as a token store, the same rows as the Parquet
  shards, which training ranks open by memory map.
- `<split>/part-NNNNN.parquet`: `PLAIN_SCHEMA` rows for train and validation (packed or one
  example per row; `seq_lens` holds the lengths of the examples in a row), `TEST_SCHEMA` for
  test (one example per row, with the text and ids generation needs).
- `rejects.jsonl` (`REJECTS`): one line per rejected record (`source`, `line`, `reason`).
- `exemplars/<task>.jsonl` (`EXEMPLARS`): k-shot exemplar candidates as rendered text.

On an object store (`data.output_dir` a URI such as s3://...; see `publish`) everything but the
manifest lies under a prefix of its own, `data-<fingerprint[:12]>-<UTC time>-<random>/`, named
by the manifest's `prefix`; its `files`, `store.path`, exemplar `file` and `rejects` entries
include that prefix, so they stay relative to the folder and readers need no change.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from typing import Any

import pyarrow as pa

from data_pipeline import storage

# 3: train and validation also as memory-mapped token stores (`splits.<name>.store`).
VERSION = 3
MANIFEST = "manifest.json"
REJECTS = "rejects.jsonl"
EXEMPLARS = "exemplars"
# Each dataset on an object store lies under a prefix of its own starting with this (`publish`).
DATA_PREFIX = "data-"

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
    """The manifest of a prepared folder (local or a URI), or None when there is none (no
    finished dataset)."""
    path = storage.join(out_dir, MANIFEST)
    if not storage.exists(path):
        return None
    return storage.read_json(path)  # type: ignore[no-any-return]


def publish(tmp: str, out_dir: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """Make the finished dataset in the local folder `tmp` the one `out_dir` serves; returns
    its manifest, written last.

    Local (`out_dir` a path or file://): the folder is renamed into place, then the manifest
    written atomically; a crash leaves the old complete dataset or no manifest at all.

    Object store: there is no rename, so the folder is uploaded under a new prefix
    (`data-<fingerprint[:12]>-<UTC time>-<random>/`) next to the previous dataset, which stays
    readable through the old manifest meanwhile; then `manifest.json`, pointing into the new
    prefix, is written in one PUT; only then are older prefixes deleted. A crash before the
    manifest lands leaves the old manifest pointing at its complete files, and an orphaned
    prefix that the next publish deletes.
    """
    local = storage.local_path(out_dir)
    if local is not None:
        if os.path.exists(local):
            old_manifest = os.path.join(local, MANIFEST)
            if os.path.exists(old_manifest):
                os.remove(old_manifest)
            shutil.rmtree(local)
        os.makedirs(os.path.dirname(local.rstrip("/")) or ".", exist_ok=True)
        os.rename(tmp, local)
        write_json_atomic(os.path.join(local, MANIFEST), manifest)
        return manifest
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    prefix = f"{DATA_PREFIX}{manifest['fingerprint'][:12]}-{stamp}-{uuid.uuid4().hex[:6]}"
    manifest = with_prefix(manifest, prefix)
    try:
        storage.upload_folder(tmp, storage.join(out_dir, prefix))
    except BaseException:
        try:  # best effort: the next publish deletes what is left anyway
            storage.delete(storage.join(out_dir, prefix))
        except Exception:  # noqa: BLE001, S110 - the upload's own error is the one to raise
            pass
        raise
    storage.write_json(storage.join(out_dir, MANIFEST), manifest)
    for name in storage.list_dir(out_dir):
        if name.startswith(DATA_PREFIX) and name != prefix:
            storage.delete(storage.join(out_dir, name))
    shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def with_prefix(manifest: dict[str, Any], prefix: str) -> dict[str, Any]:
    """`manifest` with every file it names moved under `prefix/` (and `prefix`, `rejects` set)."""
    out = json.loads(json.dumps(manifest))  # a deep copy
    for info in out["splits"].values():
        info["files"] = [f"{prefix}/{f}" for f in info["files"]]
        if "store" in info:
            info["store"]["path"] = f"{prefix}/{info['store']['path']}"
    for entry in out.get("exemplars", {}).values():
        entry["file"] = f"{prefix}/{entry['file']}"
    out["prefix"] = prefix
    out["rejects"] = f"{prefix}/{REJECTS}"
    return out


def write_json_atomic(path: str, obj: Any) -> None:
    """Write JSON to a temporary name, flush it to disk, then rename it over `path`."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)

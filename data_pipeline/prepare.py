"""The prepare job: raw files -> templated, split, tokenized, packed Parquet shards + manifest.

    ift prepare configs/quickstart.yaml

`prepare()` is the driver and reads top to bottom; each step is a module of its own:

1. `inputs`: expand each source to files and cut them into units (ranges of records:
   quote-aware line ranges, JSON array elements, Parquet row groups, Arrow files, CoNLL
   documents; whole files where no cut is safe). `fingerprint.config_hash` decides whether
   an existing result can be reused, re-hashing only inputs whose size or mtime changed.
2. `schedule.run_units` runs `worker.process_unit` as ordered Ray tasks: the workers do
   everything that is per record (parse, render the template, assign the split from a hash of
   the prompt and the seed, tokenize with the prompt masked) and return Arrow tables in input
   order.
3. `spill.write_spill`: the driver appends each split's rows to a spill file on local disk,
   each row's split and source to a row table and its content and prompt keys to
   hash-partitioned bucket files; it holds nothing per record in memory and never turns a
   token into a Python object.
4. `selection.select_rows`: dedupe, per-source caps and the train/test prompt-overlap check,
   one key bucket or one slice of the row table at a time, in input order.
5. `write.write_dataset`: packing from the lengths alone, Parquet shards and token stores
   written a window at a time, exemplars, then the folder published (`manifest.publish`) with
   `manifest.json` (the contract in `manifest`) written last.

The output depends only on the inputs and the config, never on the number of workers or the
order in which tasks finish. docs/ARCHITECTURE.md describes the whole system.

Crash safety: everything is written to a temporary folder that is moved into place (on an
object store: uploaded under a new prefix, the previous dataset readable until then; see
`manifest.publish`), and `manifest.json` is written last, atomically. No manifest, no dataset.
A rerun removes the temporary folders of killed runs.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from typing import Any

from data_pipeline import fingerprint, split, storage
from data_pipeline.errors import PrepareError
from data_pipeline.inputs import estimated_bytes, expand, plan_units
from data_pipeline.manifest import MANIFEST, REJECTS, read_manifest
from data_pipeline.schedule import run_units
from data_pipeline.selection import select_rows
from data_pipeline.spill import CHECKPOINT_S, SPILL, bucket_count, resume_point, write_spill
from data_pipeline.tokenizer import tokenizer_files, tokenizer_spec
from data_pipeline.write import stale_tmp_dirs, write_dataset

__all__ = ["PrepareError", "prepare", "read_manifest"]


def prepare(
    cfg: Any,
    log: Callable[[str], None] = print,
    progress: Callable[[int, int, str], None] | None = None,
) -> dict[str, Any]:
    """Prepare `cfg.data` into `cfg.data_dir`, or reuse a finished result with the same hash.

    Args:
        cfg: a validated `launcher.config.Config`.
        log: progress printer.
        progress: called with (units done, units, "N records") as each unit finishes.

    Returns:
        The manifest (also written to `<data_dir>/manifest.json`); `reused` is True when an
        existing result was returned without recomputing.

    Raises:
        PrepareError: No file matches a source, or too many records were rejected (then no
            manifest is written and an existing output folder is left as it was).
    """
    out_dir = cfg.data_dir
    tok_path = cfg.model.tokenizer or cfg.model.name_or_path
    files = [expand(src.path, src.format, i) for i, src in enumerate(cfg.data.sources)]
    existing = read_manifest(out_dir)
    # Only inputs whose size or mtime changed are read again (fingerprint.input_digests).
    inputs = fingerprint.input_digests(files, (existing or {}).get("inputs"))
    # The tokenizer's files are hashed once: for the fingerprint and the spec cache's key.
    tok_files = tokenizer_files(tok_path)
    config_hash = fingerprint.config_hash(cfg, files, tok_path, inputs, tok_files)
    if existing and existing.get("config_hash") == config_hash:
        log(
            f"[prepare] reusing {out_dir}: same inputs and settings "
            f"(fingerprint {existing['fingerprint'][:12]})"
        )
        if inputs != existing.get("inputs"):
            # Some inputs were hashed again (the racy window of fingerprint.input_digests):
            # record it, so the next rerun reads nothing. Same data, same hash; atomic write.
            existing = {**existing, "inputs": inputs}
            storage.write_json(storage.join(out_dir, MANIFEST), existing)
        return {**existing, "reused": True}

    import ray

    t0 = time.perf_counter()
    units = plan_units(files)
    n_workers = max(1, min(cfg.data.num_workers, len(units)))
    # Budget CPUs explicitly: workers that ask for more CPUs than the cluster has never start,
    # and ones that take them all starve everything else (seen on 2-CPU nodes).
    total_cpus = max(1.0, float(ray.cluster_resources().get("CPU", 1)))
    cpus = min(1.0, total_cpus / n_workers)
    log(
        f"[prepare] {sum(len(f) for f in files)} file(s) in {len(units)} unit(s) on "
        f"{n_workers} Ray worker(s)"
    )

    spec = tokenizer_spec(tok_path, cfg.model.trust_remote_code, files=tok_files)
    t_spec = time.perf_counter() - t0
    worker_args = {
        "sources": [s.model_dump(mode="json") for s in cfg.data.sources],
        "tokenizer": spec,
        "max_seq_len": cfg.data.max_seq_len,
        "truncation": cfg.data.truncation,
        "seed": cfg.experiment.seed,
        "ratios": dict(cfg.data.split),
        "train_text": cfg.data.exemplars > 0,
    }
    # Built on local disk (the spill must be), next to a local output so that it can be
    # renamed into place; for an object store in the temp folder, then uploaded (`publish`).
    staging = storage.staging_dir(out_dir)
    tmp = f"{staging.rstrip('/')}.tmp-{os.getpid()}"
    start = _adopt_killed_run(staging, tmp, config_hash)
    if start:
        log(f"[prepare] resuming a killed run of the same inputs from unit {start}/{len(units)}")
    os.makedirs(os.path.join(tmp, SPILL), exist_ok=True)
    try:
        batches = run_units(units, worker_args, n_workers, cpus, start=start)
        if progress is not None:
            batches = _reporting(batches, len(units), start, progress)
        # The checkpoint period is a test hook: the fault test checkpoints every unit.
        every = float(os.environ.get("IFT_TEST_PREPARE_CHECKPOINT_S", CHECKPOINT_S))
        spilled = write_spill(
            batches,
            tmp,
            config_hash,
            bucket_count(sum(estimated_bytes(i["path"], i["size"]) for i in inputs)),
            checkpoint_s=every,
        )
        # Line numbers only identify a record within its file: name the file when there are several.
        spilled["multi_file"] = {i for i, entries in enumerate(files) if len(entries) > 1}
        spilled["chat_template"] = "tokenizer" if spec["chat_template"] else "default"
        spilled["inputs"] = inputs
        spilled["vocab_size"] = spec["vocab_size"]
        t_tok = time.perf_counter() - t0
        total = spilled["good"] + spilled["rejected"]
        reject_fraction = spilled["rejected"] / total if total else 1.0
        if total == 0 or reject_fraction > cfg.data.max_reject_fraction:
            kept_rejects = storage.suffixed(out_dir, ".rejects.jsonl")
            storage.move_file(os.path.join(tmp, REJECTS), kept_rejects)
            first = spilled["first_reject"]
            raise PrepareError(
                f"{spilled['rejected']} of {total} records rejected ({reject_fraction:.1%} > "
                f"data.max_reject_fraction {cfg.data.max_reject_fraction:.1%}); no dataset "
                f"written. See {kept_rejects}" + (f"; first: {_fmt_reject(first)}" if first else "")
            )
        drops, stats = select_rows(cfg, spilled)
        manifest = write_dataset(cfg, tmp, out_dir, drops, spilled, stats, config_hash, tok_path)
    except BaseException as e:
        # Kept for a rerun to resume from (Ctrl-C, a worker lost for good); a data error
        # would only happen again.
        if isinstance(e, PrepareError) or not resume_point(tmp, config_hash):
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful swap
    log(
        f"[prepare] {spilled['good']} examples, {spilled['rejected']} rejected, "
        + ", ".join(f"{s} {manifest['splits'][s]['rows']} rows" for s in split.SPLITS)
        + f" in {time.perf_counter() - t0:.1f}s (tokenizer load {t_spec:.1f}s, workers "
        f"{t_tok - t_spec:.1f}s, select/pack/write {time.perf_counter() - t0 - t_tok:.1f}s)"
    )
    return {**manifest, "reused": False}


def _reporting(
    batches: Iterator[tuple[int, Any]],
    n_units: int,
    start: int,
    progress: Callable[[int, int, str], None],
) -> Iterator[tuple[int, Any]]:
    """`run_units`' output passed through unchanged, telling `progress` as each unit ends."""
    done, records = start, 0
    for head, table in batches:
        if table is None:
            done += 1
            progress(done, n_units, f"{records:,} records")
        else:
            records += table.num_rows
        yield head, table


def _adopt_killed_run(staging: str, tmp: str, config_hash: str) -> int:
    """Take over the temporary folder of a killed prepare of the same inputs and settings, and
    return the units it had finished (0 when there is none): the spill resumes there. The
    other leftovers of killed runs are deleted."""
    candidates = [tmp] + stale_tmp_dirs(staging)
    best = max(candidates, key=lambda path: resume_point(path, config_hash))
    start = resume_point(best, config_hash)
    if start and best != tmp:
        shutil.rmtree(tmp, ignore_errors=True)
        os.rename(best, tmp)
    elif not start:
        shutil.rmtree(tmp, ignore_errors=True)
    for path in stale_tmp_dirs(staging):
        shutil.rmtree(path, ignore_errors=True)
    return start


def _fmt_reject(r: dict[str, Any]) -> str:
    return f"{r['source']}:{r['line']}: {r['reason']}"

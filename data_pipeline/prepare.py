"""The prepare job: raw files -> templated, split, tokenized, packed Parquet shards + manifest.

    ift prepare configs/quickstart.yaml

`prepare()` is the driver and reads top to bottom; each step is a module of its own:

1. `inputs`: expand each source to files and cut them into units (whole files, or
   line-aligned ranges of one); `fingerprint.config_hash` decides whether an existing result
   can be reused.
2. `schedule.run_units` runs `worker.process_unit` as ordered Ray tasks: the workers do
   everything that is per record (parse, render the template, assign the split from a hash of
   the prompt and the seed, tokenize with the prompt masked) and return Arrow tables in input
   order.
3. `spill.write_spill`: the driver appends each split's rows to a spill file on local disk and
   keeps only a few numbers per row (content and prompt keys, source, split); it never turns a
   token into a Python object.
4. `selection.select_rows`: dedupe, per-source caps and the train/test prompt-overlap check, as
   array operations over those keys in input order.
5. `write.write_dataset`: packing from the lengths alone, Parquet shards written a slice at a
   time, exemplars, then the folder swapped into place and `manifest.json` (the contract in
   `manifest`) written last.

The output depends only on the inputs and the config, never on the number of workers or the
order in which tasks finish. docs/ARCHITECTURE.md describes the whole system.

Crash safety: everything is written to a temporary folder that is moved into place, and
`manifest.json` is written last, atomically. No manifest, no dataset. A rerun removes the
temporary folders of killed runs.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from typing import Any

from data_pipeline import fingerprint, split
from data_pipeline.errors import PrepareError
from data_pipeline.inputs import expand, plan_units
from data_pipeline.manifest import REJECTS, read_manifest
from data_pipeline.schedule import run_units
from data_pipeline.selection import select_rows
from data_pipeline.spill import SPILL, write_spill
from data_pipeline.tokenizer import tokenizer_spec
from data_pipeline.write import remove_stale_tmp, write_dataset

__all__ = ["PrepareError", "prepare", "read_manifest"]


def prepare(cfg: Any, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Prepare `cfg.data` into `cfg.data_dir`, or reuse a finished result with the same hash.

    Args:
        cfg: a validated `launcher.config.Config`.
        log: progress printer.

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
    config_hash = fingerprint.config_hash(cfg, files, tok_path)
    existing = read_manifest(out_dir)
    if existing and existing.get("config_hash") == config_hash:
        log(
            f"[prepare] reusing {out_dir}: same inputs and settings "
            f"(fingerprint {existing['fingerprint'][:12]})"
        )
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

    spec = tokenizer_spec(tok_path, cfg.model.trust_remote_code)
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
    tmp = f"{out_dir.rstrip('/')}.tmp-{os.getpid()}"
    remove_stale_tmp(out_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, SPILL))
    try:
        spilled = write_spill(run_units(units, worker_args, n_workers, cpus), tmp)
        # Line numbers only identify a record within its file: name the file when there are several.
        spilled["multi_file"] = {i for i, entries in enumerate(files) if len(entries) > 1}
        spilled["chat_template"] = "tokenizer" if spec["chat_template"] else "default"
        t_tok = time.perf_counter() - t0
        total = spilled["good"] + spilled["rejected"]
        reject_fraction = spilled["rejected"] / total if total else 1.0
        if total == 0 or reject_fraction > cfg.data.max_reject_fraction:
            kept_rejects = f"{out_dir.rstrip('/')}.rejects.jsonl"
            os.replace(os.path.join(tmp, REJECTS), kept_rejects)
            first = spilled["first_reject"]
            raise PrepareError(
                f"{spilled['rejected']} of {total} records rejected ({reject_fraction:.1%} > "
                f"data.max_reject_fraction {cfg.data.max_reject_fraction:.1%}); no dataset "
                f"written. See {kept_rejects}" + (f"; first: {_fmt_reject(first)}" if first else "")
            )
        keep, stats = select_rows(cfg, spilled)
        del spilled["pk_hi"], spilled["pk_lo"]  # the selection was their only use
        manifest = write_dataset(cfg, tmp, out_dir, keep, spilled, stats, config_hash, tok_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful swap
    log(
        f"[prepare] {spilled['good']} examples, {spilled['rejected']} rejected, "
        + ", ".join(f"{s} {manifest['splits'][s]['rows']} rows" for s in split.SPLITS)
        + f" in {time.perf_counter() - t0:.1f}s (tokenizer load {t_spec:.1f}s, workers "
        f"{t_tok - t_spec:.1f}s, select/pack/write {time.perf_counter() - t0 - t_tok:.1f}s)"
    )
    return {**manifest, "reused": False}


def _fmt_reject(r: dict[str, Any]) -> str:
    return f"{r['source']}:{r['line']}: {r['reason']}"

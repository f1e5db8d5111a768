"""The prepare job: raw files -> templated, split, tokenized, packed Parquet shards + manifest.

    ift prepare configs/quickstart.yaml

Reads top to bottom: `prepare()` is the driver; `ShardWorker`, run in Ray tasks
(`_run_units`, `process_unit`), parses, renders, splits and tokenizes one unit of input (a
file, or a line-aligned range of one); the rest are small helpers.

The workers do everything that is per record, including the split assignment (a hash of the
prompt and the seed). The driver receives their Arrow tables in input order and never turns a
token into a Python object: it appends each split's rows to a spill file (Arrow IPC, memory
mapped when read back) and keeps only a few numbers per row (content and prompt keys, source,
split). Dedupe, the per-source caps and the train/test overlap check are then array operations
over those keys, packing works from the lengths alone, and the shards are written in slices.
The driver's memory therefore grows by tens of bytes per record, not with the token data, and
the output depends only on the inputs and the config, never on the number of workers or the
order in which tasks finish.

Memory: a worker handles a unit RECORDS_PER_BATCH records at a time and units are at most
CHUNK_BYTES, so its memory does not grow with the input; the driver reads the spill files a
slice at a time and drops their pages after each slice, packs in windows of PACK_WINDOW, and
keeps 37 bytes of keys per record (the one part that still grows with the input).

Exemplars: `exemplars/<task>.jsonl` holds up to `data.exemplars` kept train records per task
as rendered text (`prompt`, `completion`), those with the lowest content hashes, for k-shot
prompting; the workers send the text of train rows to the spill, and only the chosen rows'
text is ever read back.

Crash safety: everything is written to a temporary folder that is moved into place, and
`manifest.json` is written last, atomically. No manifest, no dataset. A rerun removes the
temporary folders of killed runs.
"""

from __future__ import annotations

import fnmatch
import glob
import gzip
import hashlib
import json
import mmap
import os
import shutil
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from data_pipeline import pack, sources, split, templates, tokenize
from data_pipeline.sources import Reject, detect_format, parse_bytes, read_hf_dataset

MANIFEST = "manifest.json"
REJECTS = "rejects.jsonl"
SPILL = ".spill"
EXEMPLARS = "exemplars"
# Line-delimited files are cut at newlines into about 8 ranges each (64 .. 512 KiB), so that
# one big file still spreads over every worker and the driver can start on the first range
# while the rest are tokenized. The cut depends on the file alone, never on the worker count.
# Other formats (json arrays, csv with quoted newlines, parquet) go whole.
RANGES_PER_FILE = 8
MIN_CHUNK_BYTES = 64 << 10
CHUNK_BYTES = 512 << 10
# A worker renders and tokenizes a unit this many records at a time, and sends its output on
# in tables of about OUTPUT_BYTES (see ShardWorker._tables).
RECORDS_PER_BATCH = 1024
OUTPUT_BYTES = 8 << 20
# Nominal gzip ratio of text, to size the ranges of a .gz file from its compressed size.
GZIP_RATIO = 3
LINE_FORMATS = ("jsonl", "tsv")
ROWS_PER_SHARD = 50_000
# Rows are built and written max(1, SLICE_TOKENS // max_seq_len) at a time, so that the
# copies a slice takes stay a few MiB whatever the size of the split.
SLICE_TOKENS = 1 << 18
# Best-fit decreasing runs over windows of this many examples (in input order).
PACK_WINDOW = 65_536
# The tokenizer's identity is every file in its folder except model weights (too big to hash).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
# Marker files of a folder written by `datasets.Dataset.save_to_disk`.
_HF_MARKERS = ("dataset_info.json", "state.json")

SPLIT_CODES = {name: code for code, name in enumerate(split.SPLITS)}
_I32_LIST = pa.list_(pa.int32())
# What a worker returns for one unit: good rows (`ok`) and rejects in one table.
ROW_SCHEMA = pa.schema(
    [
        ("ok", pa.bool_()),
        ("source", pa.int32()),
        ("line", pa.int64()),
        ("part", pa.int32()),  # which file of its source
        ("file", pa.string()),  # rejects only
        ("reason", pa.string()),  # rejects only
        ("split", pa.int8()),
        # 128-bit content key (exact duplicates) and prompt key (train/test overlap).
        ("ck_hi", pa.uint64()),
        ("ck_lo", pa.uint64()),
        ("pk_hi", pa.uint64()),
        ("pk_lo", pa.uint64()),
        ("input_ids", _I32_LIST),
        ("labels", _I32_LIST),
        ("loss_tokens", pa.int32()),
        # Rendered text: the test split's generation inputs, and on train rows (when exemplars
        # are kept) the exemplar candidates; null on every other row.
        ("prompt", pa.string()),
        ("reference", pa.string()),
        ("prompt_ids", _I32_LIST),
    ]
)
# What the shards hold (see DESIGN.md, "Prepared data"); the test split keeps its text too.
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


class PrepareError(RuntimeError):
    """The data cannot be prepared; the message says which file or record, and why."""

    user_facing = True


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
    files = [_expand(src.path, src.format, i) for i, src in enumerate(cfg.data.sources)]
    config_hash = _config_hash(cfg, files, tok_path)
    existing = read_manifest(out_dir)
    if existing and existing.get("config_hash") == config_hash:
        log(
            f"[prepare] reusing {out_dir}: same inputs and settings "
            f"(fingerprint {existing['fingerprint'][:12]})"
        )
        return {**existing, "reused": True}

    import ray

    t0 = time.perf_counter()
    units = _units(files)
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
    _remove_stale_tmp(out_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, SPILL))
    try:
        spilled = _spill(_run_units(units, worker_args, n_workers, cpus), tmp)
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
        keep, stats = _select(cfg, spilled)
        del spilled["pk_hi"], spilled["pk_lo"]  # the selection was their only use
        manifest = _write_dataset(cfg, tmp, out_dir, keep, spilled, stats, config_hash, tok_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful swap
    log(
        f"[prepare] {spilled['good']} examples, {spilled['rejected']} rejected, "
        + ", ".join(f"{s} {manifest['splits'][s]['rows']} rows" for s in split.SPLITS)
        + f" in {time.perf_counter() - t0:.1f}s (tokenizer load {t_spec:.1f}s, workers "
        f"{t_tok - t_spec:.1f}s, select/pack/write {time.perf_counter() - t0 - t_tok:.1f}s)"
    )
    return {**manifest, "reused": False}


# --------------------------------------------------------------------------------------------
# Ray workers
# --------------------------------------------------------------------------------------------


class ShardWorker:
    """Parse, template, split and tokenize one input unit. The tokenizer is built once."""

    def __init__(
        self,
        sources: list[dict[str, Any]],
        tokenizer: dict[str, Any],
        max_seq_len: int,
        truncation: str,
        seed: int,
        ratios: dict[str, float],
        train_text: bool = False,
    ) -> None:
        chat = None
        if tokenizer.get("chat_template"):
            chat = templates.tokenizer_chat_template(
                tokenizer["chat_template"],
                tokenizer["special_tokens"],
                strip_bos=tokenizer["bos"] is not None,
            )
        self.renderers = [
            templates.renderer(s["template"], s["params"], chat_template=chat) for s in sources
        ]
        self.pinned = [s["split"] for s in sources]
        self.encode = make_encoder(tokenizer)
        self.bos, self.eos = tokenizer["bos"], tokenizer["eos"]
        self.max_seq_len = max_seq_len
        self.truncation = truncation
        self.choose_split = split.split_chooser(seed, ratios)
        self.train_text = train_text

    def _process(self, unit: dict[str, Any]) -> pa.Table:
        """One unit as one table (`_tables` concatenated)."""
        tables = list(self._tables(unit))
        return pa.concat_tables(tables) if len(tables) > 1 else tables[0]

    def _tables(self, unit: dict[str, Any]) -> Iterator[pa.Table]:
        """One unit, RECORDS_PER_BATCH records at a time, as tables of about OUTPUT_BYTES.

        The Python objects of a batch (texts, token lists) are freed once it is an Arrow
        table, and the tables leave the worker as they fill, so a worker's memory is bounded
        by the batch, not by the unit (a JSON array or Parquet file comes whole).
        """
        pending: list[pa.Table] = []
        size, processed = 0, False
        batch: list[sources.Parsed] = []
        for item in _records(unit):
            batch.append(item)
            if len(batch) == RECORDS_PER_BATCH:
                pending.append(self._process_batch(unit, batch))
                batch, processed = [], True
                size += pending[-1].nbytes
                if size >= OUTPUT_BYTES:
                    yield pa.concat_tables(pending)
                    pending, size = [], 0
        if not processed and not batch and unit.get("whole", False):
            # An empty input among good ones is most likely a mistake: say so, at line 0.
            batch = [(0, Reject(unit["path"], 0, "empty file: no records"))]
        if batch or not processed:
            pending.append(self._process_batch(unit, batch))
        if pending:
            yield pa.concat_tables(pending)

    def _process_batch(self, unit: dict[str, Any], batch: list[sources.Parsed]) -> pa.Table:
        src_idx = unit["source"]
        render = self.renderers[src_idx]
        rejects: list[tuple[int, str]] = []
        lines: list[int] = []
        rendered: list[split.Turns] = []
        for line, rec in batch:
            if isinstance(rec, Reject):
                rejects.append((line, rec.reason))
                continue
            try:
                rendered.append(render(rec))
                lines.append(line)
            except templates.TemplateError as e:
                rejects.append((line, str(e)))
        built, ids = tokenize_turns(
            rendered,
            self.encode,
            bos_id=self.bos,
            eos_id=self.eos,
            max_seq_len=self.max_seq_len,
            truncation=self.truncation,
        )
        rejects += [(lines[i], str(e)) for i, e in built.errors.items()]
        rejects.sort(key=lambda r: r[0])  # length rejects are found last; report in file order
        # What stays per record in Python: the two text hashes, the split, and the text kept
        # for the test split (generation inputs) and for exemplar candidates.
        first_text = built.text_start
        kept = built.kept.tolist()
        codes = np.empty(len(kept), np.int8)
        keys: list[bytes] = []
        prompt: list[str | None] = []
        reference: list[str | None] = []
        prompt_ids: list[list[int]] = []
        pinned = self.pinned[src_idx]
        for j, i in enumerate(kept):
            turns = rendered[i]
            pk, ck = split.keys(turns)
            keys.append(ck + pk)
            name = pinned or self.choose_split(pk.hex())
            codes[j] = SPLIT_CODES[name]
            if name == "test" or (name == "train" and self.train_text):
                prompt.append(_prompt_text(turns))
                reference.append(turns[-1][1])
            else:
                prompt.append(None)
                reference.append(None)
            if name == "test":
                texts = ids[first_text[i] : first_text[i + 1]]
                prompt_ids.append(
                    tokenize.prompt_ids_for_generation(
                        texts[0::2], texts[1::2], self.bos, self.max_seq_len
                    )
                )
            else:
                prompt_ids.append([])
        good = {
            "line": np.asarray(lines, np.int64)[built.kept],
            "split": codes,
            "keys": keys,
            "input_ids": (built.offsets, built.input_ids),
            "labels": (built.offsets, built.labels),
            "loss_tokens": built.loss_tokens,
            "prompt": prompt,
            "reference": reference,
            "prompt_ids": prompt_ids,
        }
        return _unit_table(good, src_idx, unit["part"], unit["path"], rejects)


def _run_units(
    units: list[dict[str, Any]], worker_args: dict[str, Any], n_workers: int, cpus: float
) -> Iterator[pa.Table]:
    """The units' tables, in unit order, computed by Ray tasks on at most `n_workers` CPUs.

    Plain Ray tasks rather than Ray Data: its streaming executor polls for finished tasks
    and hands out the next unit only after a round trip, which left each worker idle 0.3 to
    0.5 s between units (the benchmark's worker phase took 2.5 s instead of 1.7 s). Here a
    slot is refilled as soon as a task ends. Tasks, not actors: Ray runs them in its already
    started worker processes, where the built ShardWorker stays cached (`process_unit`), so
    a prepare does not start processes and rebuild the tokenizer.

    Each task is a streaming generator: a unit's output leaves the worker in tables of about
    OUTPUT_BYTES. At most 2 x `n_workers` + 1 units are in flight or finished and waiting
    for their turn in the object store, so memory is bounded. A task whose worker dies is
    retried by Ray (which replays the generator and skips what was already delivered); an
    exception in one fails the prepare.
    """
    import ray

    remote = ray.remote(process_unit).options(num_cpus=cpus, max_retries=3, num_returns="streaming")
    key, args_ref = _worker_key(worker_args), ray.put(worker_args)
    # Whole files (JSON arrays, Parquet: not cut into ranges), biggest first, are submitted
    # before the ranges, so that a big one is not the last task, run by one worker while the
    # others idle; the results still come back in unit order.
    size = [u["end"] - u["start"] if u.get("whole") else -1 for u in units]
    order = deque(sorted(range(len(units)), key=lambda i: -size[i]))
    streams: dict[int, Any] = {}  # submitted and not yet taken whole
    running: set[Any] = set()  # the completion refs of tasks still running
    gz = _GzRanges()

    def submit(i: int) -> None:
        order.popleft() if order[0] == i else order.remove(i)
        unit = {**units[i], "data": gz.read(units[i])} if units[i].get("gz") else units[i]
        streams[i] = remote.remote(unit, key, args_ref)
        running.add(streams[i].completed())

    try:
        for head in range(len(units)):
            while True:
                # Fill the free CPU slots: the unit to yield next first, then the rest in
                # order while the window has room.
                while len(running) < n_workers and (head not in streams or order):
                    if head not in streams:
                        submit(head)
                    elif len(streams) < 2 * n_workers:
                        submit(order[0])
                    else:
                        break
                stream = streams.get(head)
                if stream is not None:
                    while stream.next_ready() and (ref := next(stream, None)) is not None:
                        yield ray.get(ref)
                    if stream.is_finished():
                        break
                    if stream.completed() not in running:  # ended: the rest is on its way
                        yield from (ray.get(ref) for ref in stream)
                        break
                # Until the head has more output or any task ends (a slot to refill).
                waitables = list(running) + ([stream] if stream is not None else [])
                done, _ = ray.wait(waitables, num_returns=1)
                running.difference_update(done)
            del streams[head]
    finally:
        gz.close()


_WORKERS: dict[str, ShardWorker] = {}


def process_unit(unit: dict[str, Any], key: str, worker_args: dict[str, Any]) -> Iterator[pa.Table]:
    """The Ray task (a streaming generator): `ShardWorker(**worker_args)._tables(unit)`, with
    the worker built once per process and settings (`key`), so that later tasks and later
    prepare runs in the same Ray session skip building the tokenizer. One is kept: new
    settings replace it."""
    worker = _WORKERS.get(key)
    if worker is None:
        _WORKERS.clear()
        worker = _WORKERS[key] = ShardWorker(**worker_args)
    yield from worker._tables(unit)


def _worker_key(worker_args: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(worker_args, sort_keys=True).encode()).hexdigest()


def tokenize_turns(
    examples: list[split.Turns],
    encode: Callable[[list[str]], list[list[int]]],
    **build: Any,
) -> tuple[tokenize.Batch, list[list[int]]]:
    """Tokenize rendered examples with one `encode` call, then mask them (`build_batch`).

    Shared by the workers and the `datasets.map` baseline of benchmarks/prepare.py, so that
    both do exactly the same work per record.

    Args:
        examples: Each example's (prompt, completion) turns.
        encode: texts -> ids, without special tokens (`make_encoder`).
        **build: `bos_id`, `eos_id`, `max_seq_len`, `truncation` for `build_batch`.

    Returns:
        The built rows, and the ids of every text (p1, c1, p2, c2, ... per example).
    """
    # One tokenizer call for all: the per-call overhead is paid once.
    texts = [t for turns in examples for pair in turns for t in pair]
    # Each distinct text once: labels of classification tasks repeat on every record.
    unique = dict.fromkeys(texts)
    if len(unique) == len(texts):
        ids = encode(texts) if texts else []
    else:
        encoded = dict(zip(unique, encode(list(unique)), strict=True))
        ids = [encoded[t] for t in texts]
    del texts, unique
    return tokenize.build_batch(ids, [len(t) for t in examples], **build), ids


def _prompt_text(turns: split.Turns) -> str:
    """Everything before the last completion: the prompt a model continues to produce it."""
    if len(turns) == 1:
        return turns[0][0]
    return "".join(p + c for p, c in turns[:-1]) + turns[-1][0]


def _unit_table(
    good: dict[str, Any], source: int, part: int, file: str, rejects: list[tuple[int, str]]
) -> pa.Table:
    """One batch's good rows (columns from `_process_batch`), then its rejects (whose other
    columns are zero, empty or null), as a ROW_SCHEMA table."""
    n, r = len(good["split"]), len(rejects)
    # The four 64-bit halves of the content and prompt keys, from the concatenated digests.
    keys = np.frombuffer(b"".join(good["keys"]), dtype=">u8").reshape(n, 4).astype(np.uint64)
    keys = np.concatenate([keys, np.zeros((r, 4), np.uint64)])

    def lists(offsets: np.ndarray, values: np.ndarray) -> pa.Array:
        offs = np.concatenate([offsets, np.full(r, offsets[-1])]).astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(offs), pa.array(values, pa.int32()))

    def numbers(values: np.ndarray, dtype: Any) -> pa.Array:
        return pa.array(np.concatenate([values, np.zeros(r, values.dtype)]).astype(dtype))

    prompt_lens = np.fromiter(map(len, good["prompt_ids"]), np.int64, count=n)
    prompt_offsets = np.zeros(n + 1, np.int64)
    np.cumsum(prompt_lens, out=prompt_offsets[1:])
    prompt_ids = np.fromiter(
        (t for ids in good["prompt_ids"] for t in ids), np.int32, count=int(prompt_offsets[-1])
    )
    cols = {
        "ok": pa.array(np.arange(n + r) < n),
        "source": pa.array(np.full(n + r, source, np.int32)),
        "part": pa.array(np.full(n + r, part, np.int32)),
        "line": pa.array(
            np.concatenate([good["line"], np.asarray([line for line, _ in rejects], np.int64)])
        ),
        "file": pa.array([None] * n + [file] * r, pa.string()),
        "reason": pa.array([None] * n + [reason for _, reason in rejects], pa.string()),
        "split": numbers(good["split"], np.int8),
        "ck_hi": pa.array(keys[:, 0]),
        "ck_lo": pa.array(keys[:, 1]),
        "pk_hi": pa.array(keys[:, 2]),
        "pk_lo": pa.array(keys[:, 3]),
        "input_ids": lists(*good["input_ids"]),
        "labels": lists(*good["labels"]),
        "loss_tokens": numbers(good["loss_tokens"], np.int32),
        "prompt": pa.array(good["prompt"] + [None] * r, pa.string()),
        "reference": pa.array(good["reference"] + [None] * r, pa.string()),
        "prompt_ids": lists(prompt_offsets, prompt_ids),
    }
    return pa.table(cols, schema=ROW_SCHEMA)


def tokenizer_spec(path: str, trust_remote_code: bool = False) -> dict[str, Any]:
    """What a worker needs to tokenize exactly as `AutoTokenizer.from_pretrained(path)` does.

    The driver loads the tokenizer once with transformers (the reference every stage uses) and
    ships its Rust backend as JSON: workers then need only the `tokenizers` package, which
    imports in a fraction of the time transformers takes. A tokenizer without a Rust backend
    is loaded by path in each worker instead.
    """
    tok = load_tokenizer(path, trust_remote_code)
    bos, eos = special_ids(tok)
    backend = getattr(tok, "backend_tokenizer", None)
    # The tokenizer's own chat template (tokenizer_config.json or chat_template.jinja, as
    # transformers resolved it), rendered by the `chat` template in the workers.
    chat_template = getattr(tok, "chat_template", None)
    if isinstance(chat_template, dict):  # named templates: the default one
        chat_template = chat_template.get("default")
    names = ("bos_token", "eos_token", "unk_token", "pad_token")
    return {
        "json": backend.to_str() if backend is not None else None,
        "path": path,
        "trust_remote_code": trust_remote_code,
        "bos": bos,
        "eos": eos,
        "chat_template": chat_template if isinstance(chat_template, str) else None,
        "special_tokens": {n: v for n in names if isinstance(v := getattr(tok, n, None), str)},
    }


def make_encoder(spec: dict[str, Any]) -> Callable[[list[str]], list[list[int]]]:
    """texts -> token ids without special tokens, truncation or padding (see tokenizer_spec)."""
    if spec["json"] is None:
        tok = load_tokenizer(spec["path"], spec["trust_remote_code"])

        def encode_slow(texts: list[str]) -> list[list[int]]:
            return tok(texts, add_special_tokens=False)["input_ids"]  # type: ignore[no-any-return]

        return encode_slow
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(spec["json"])
    # transformers clears these for a call without truncation or padding; so must we.
    backend.no_truncation()
    backend.no_padding()
    # encode_batch_fast skips the character offsets, which nothing here uses.
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return lambda texts: [e.ids for e in encode(texts, add_special_tokens=False)]


def load_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def special_ids(tok: Any) -> tuple[int | None, int]:
    """(bos, eos) as ift uses them: no BOS for tokenizers whose BOS is their EOS (GPT-2)."""
    eos = tok.eos_token_id
    if eos is None:
        raise PrepareError(f"tokenizer {tok.name_or_path} has no EOS token")
    bos = tok.bos_token_id
    return (None if bos is None or bos == eos else bos), eos


def _records(unit: dict[str, Any]) -> Iterator[sources.Parsed]:
    """(line, record | Reject) for one unit, with line numbers of the whole file."""
    if unit["fmt"] == "hf":
        yield from read_hf_dataset(unit["path"], unit["path"])
        return
    data = _read_unit(unit)
    header = b""
    if unit["start"] > 0 and unit["fmt"] == "tsv":
        header = _read_unit({**unit, "start": 0, "end": 1 << 16, "data": None})
        header = header[: header.find(b"\n") + 1]
    shift = unit["first_line"] - 1 - (1 if header else 0)
    for line, rec in parse_bytes(header + data, unit["path"], unit["fmt"]):
        if isinstance(rec, Reject):
            rec = Reject(rec.source, line + shift, rec.reason)
        yield line + shift, rec


# --------------------------------------------------------------------------------------------
# Driver: spill, select, pack, write
# --------------------------------------------------------------------------------------------


def _spill(batches: Iterable[pa.Table], tmp: str) -> dict[str, Any]:
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
            for name, code in SPLIT_CODES.items():
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


def _select(cfg: Any, spilled: dict[str, Any]) -> tuple[np.ndarray, dict[str, int]]:
    """Which good rows are kept: dedupe, per-source caps, then no prompt in two splits.

    Every rule is taken in input order, so the result does not depend on how the input was
    cut into units or on which worker finished first.
    """
    n = spilled["good"]
    source, codes = spilled["source"], spilled["split"]
    keep = np.ones(n, bool)
    stats = {"good": n, "duplicates": 0, "capped": 0, "overlap": 0}
    if cfg.data.dedupe and n:
        keep[:] = False
        keep[first_occurrences(spilled["ck_hi"], spilled["ck_lo"])] = True
        stats["duplicates"] = int(n - keep.sum())
    test = codes == SPLIT_CODES["test"]
    for i, src in enumerate(cfg.data.sources):
        mine = source == i
        if src.max_records is not None:
            over = keep & mine & (np.cumsum(keep & mine) > src.max_records)
            stats["capped"] += int(over.sum())
            keep &= ~over
        if cfg.data.max_test_records is not None:
            mine_test = keep & mine & test
            over = mine_test & (np.cumsum(mine_test) > cfg.data.max_test_records)
            stats["capped"] += int(over.sum())
            keep &= ~over
    # A prompt lands in one split by its hash, but a source pinned to a split can still bring
    # a prompt that another source put elsewhere: test wins over validation over train.
    pk_hi, pk_lo = spilled["pk_hi"], spilled["pk_lo"]
    for later in ("test", "validation"):
        held = keep & (codes == SPLIT_CODES[later])
        earlier = keep & (codes < SPLIT_CODES[later])
        if held.any() and earlier.any():
            leak = earlier & _isin128(pk_hi, pk_lo, pk_hi[held], pk_lo[held])
            stats["overlap"] += int(leak.sum())
            keep &= ~leak
    return keep, stats


def first_occurrences(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """Indices of the first row of each distinct 128-bit key (`hi`, `lo`), in key order.

    A stable lexsort puts equal keys next to each other in row order, so the first of each
    run is its first occurrence (np.unique on a structured array does the same, 20x slower).
    """
    order = np.lexsort((lo, hi))
    h, lo_sorted = hi[order], lo[order]
    new = np.ones(len(order), bool)
    new[1:] = (h[1:] != h[:-1]) | (lo_sorted[1:] != lo_sorted[:-1])
    return order[new]


def _isin128(
    hi: np.ndarray, lo: np.ndarray, held_hi: np.ndarray, held_lo: np.ndarray
) -> np.ndarray:
    """Which rows' 128-bit keys (`hi`, `lo`) are among the held ones.

    The high halves narrow it down (np.isin on uint64 is fast; on a structured array it
    sorts 20x slower); the few candidates are then checked whole.
    """
    out = np.zeros(len(hi), bool)
    candidates = np.flatnonzero(np.isin(hi, held_hi))
    if candidates.size:
        held = set(zip(held_hi.tolist(), held_lo.tolist(), strict=True))
        pairs = zip(hi[candidates].tolist(), lo[candidates].tolist(), strict=True)
        out[candidates] = [pair in held for pair in pairs]
    return out


def _write_dataset(
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
        in_split = spilled["split"] == SPLIT_CODES[name]
        mask = keep[in_split]  # spill rows are in input order too
        table, release = _read_spill(spilled["spill"].get(name))
        kept = np.flatnonzero(mask)
        lengths = _list_lengths(table.column("input_ids"))[kept]
        loss_tokens = table.column("loss_tokens").to_numpy()[kept]
        release()
        info: dict[str, Any] = {**tokenize.token_stats(lengths, loss_tokens)}
        schema = TEST_SCHEMA if name == "test" else PLAIN_SCHEMA
        writer = _ShardWriter(os.path.join(tmp, name), schema)
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
        "version": 2,
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


def exemplar_rows(
    ck_hi: np.ndarray, ck_lo: np.ndarray, groups: np.ndarray, n_groups: int, k: int
) -> list[np.ndarray]:
    """Per group, the rows of the `k` lowest distinct content keys, lowest first.

    The keys are hashes of the rendered text, so the choice is a fair sample that depends on
    the content alone (not on file order or the number of workers); a key seen twice (dedupe
    off) is one exemplar.

    Args:
        ck_hi: High 64 bits of each row's content key.
        ck_lo: Low 64 bits.
        groups: Each row's group (task) index in ``[0, n_groups)``.
        n_groups: Number of groups.
        k: Exemplars per group.

    Returns:
        One array of row indices per group, at most ``k`` long.
    """
    order = np.lexsort((ck_lo, ck_hi, groups))
    g, hi, lo = groups[order], ck_hi[order], ck_lo[order]
    new = np.ones(len(order), bool)
    new[1:] = (g[1:] != g[:-1]) | (hi[1:] != hi[:-1]) | (lo[1:] != lo[:-1])
    order, g = order[new], g[new]
    starts = np.searchsorted(g, np.arange(n_groups))
    ends = np.searchsorted(g, np.arange(n_groups), side="right")
    return [order[a : min(b, a + k)] for a, b in zip(starts, ends, strict=True)]


def exemplar_rows_in_slices(
    load: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]],
    n: int,
    n_groups: int,
    k: int,
    slice_rows: int,
) -> list[np.ndarray]:
    """`exemplar_rows` over `n` rows loaded `slice_rows` at a time, in bounded memory.

    Each slice keeps its candidates: a group's k lowest keys overall are among the k lowest of
    the slices that hold them. The candidates are then chosen among in row order, so that of
    equal keys the first occurrence still wins: the result equals `exemplar_rows` on all rows.

    Args:
        load: Row indices -> their (ck_hi, ck_lo, groups).
        n: Number of rows.
        n_groups: Number of groups.
        k: Exemplars per group.
        slice_rows: Rows loaded at a time.

    Returns:
        As `exemplar_rows`.
    """
    candidates = [np.zeros(0, np.int64)]
    for start in range(0, n, slice_rows):
        part = np.arange(start, min(n, start + slice_rows))
        chosen = exemplar_rows(*load(part), n_groups, k)
        candidates.append(part[np.concatenate(chosen)] if chosen else part[:0])
    picks = np.sort(np.concatenate(candidates))
    return [picks[c] for c in exemplar_rows(*load(picks), n_groups, k)]


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
        picked = _take(table, kept[mine], ["prompt", "reference"]).to_pylist()
        lines = [json.dumps({"prompt": r["prompt"], "completion": r["reference"]}) for r in picked]
        rel = f"{EXEMPLARS}/{task}.jsonl"
        with open(os.path.join(tmp, rel), "w") as f:
            f.write("".join(line + "\n" for line in lines))
        out[task] = {"file": rel, "rows": len(lines)}
    return out


def _remove_stale_tmp(out_dir: str) -> None:
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


def _read_spill(path: str | None) -> tuple[pa.Table, Callable[[], None]]:
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


def _list_lengths(column: pa.ChunkedArray) -> np.ndarray:
    if column.num_chunks == 0:
        return np.zeros(0, np.int64)
    return pc.list_value_length(column).to_numpy().astype(np.int64)


def _take(table: pa.Table, rows: np.ndarray, columns: list[str]) -> pa.Table:
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
        rows = _take(table, kept[start : start + per_slice], SPILL_COLUMNS)
        lengths = _list_lengths(rows.column("input_ids"))
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
    """Packed rows for `bins` (indices into `kept`), as `pack.pack_rows` builds them.

    The members of each bin are taken in order and their tokens concatenated; the first label
    of every example is masked, since in a packed row it would be the target of the previous
    example's last token.
    """
    members = np.fromiter((i for b in bins for i in b), np.int64)
    per_row = np.fromiter((len(b) for b in bins), np.int64, count=len(bins))
    rows = _take(table, kept[members], ["input_ids", "labels"])
    ids = pc.list_flatten(rows.column("input_ids")).to_numpy()
    labels = pc.list_flatten(rows.column("labels")).to_numpy().copy()
    example_lens = lengths[members]
    starts = np.concatenate([[0], np.cumsum(example_lens)[:-1]]).astype(np.int64)
    labels[starts] = pack.IGNORE_INDEX
    row_tokens = np.add.reduceat(example_lens, np.concatenate([[0], np.cumsum(per_row)[:-1]]))
    token_offsets = pa.array(np.concatenate([[0], np.cumsum(row_tokens)]).astype(np.int32))
    member_offsets = pa.array(np.concatenate([[0], np.cumsum(per_row)]).astype(np.int32))
    return pa.table(
        {
            "input_ids": pa.ListArray.from_arrays(token_offsets, pa.array(ids, pa.int32())),
            "labels": pa.ListArray.from_arrays(token_offsets, pa.array(labels, pa.int32())),
            "seq_lens": pa.ListArray.from_arrays(
                member_offsets, pa.array(example_lens.astype(np.int32))
            ),
        },
        schema=PLAIN_SCHEMA,
    )


class _ShardWriter:
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
                lengths_hash.update(_list_lengths(column).astype("<i8").tobytes())
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


def _fmt_reject(r: dict[str, Any]) -> str:
    return f"{r['source']}:{r['line']}: {r['reason']}"


def read_manifest(out_dir: str) -> dict[str, Any] | None:
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)  # type: ignore[no-any-return]


def write_json_atomic(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# Inputs: expanding sources, cutting files into units, hashing everything the output depends on
# --------------------------------------------------------------------------------------------


def _expand(path: str, fmt: str | None, index: int) -> list[tuple[str, str]]:
    """A source path (file, glob, folder; local or a URI) -> sorted [(file, format)]."""
    if "://" in path:
        matches = _expand_uri(path, fmt, index)
    elif (p := Path(path)).is_dir():
        if fmt == "hf" or any((p / m).exists() for m in _HF_MARKERS):
            return [(str(p), "hf")]
        matches = sorted(str(f) for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
    else:
        matches = sorted(glob.glob(path, recursive=True))
    if not matches:
        raise PrepareError(f"data.sources.{index}.path: no file matches {path}")
    out = []
    for m in matches:
        try:
            out.append((m, fmt or detect_format(_strip_query(m))))
        except ValueError as e:
            raise PrepareError(f"data.sources.{index}.path: {e}") from None
    return out


def _expand_uri(uri: str, fmt: str | None, index: int) -> list[str]:
    """The files a URI names, on any filesystem pyarrow opens (s3://, gs://, hdfs://, file://).

    A URI with `*` or `[` in it is matched against every file under its longest prefix without
    one, as glob.glob matches (`*` within a name, `**` across folders, a name starting with '.'
    only where the pattern starts with '.'); `?` is no wildcard here: it starts the query. A
    folder (for S3: a key prefix) lists every file under it but those under a name starting
    with '.'. Anything else is one file, if it exists. Each URI returned keeps the query of
    `uri`, so that `_fs()` reopens it with the same options.

    S3 is configured as for any AWS client, from the environment of the driver and of the Ray
    workers: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, and AWS_ENDPOINT_URL
    for MinIO and other S3-compatible stores; or per source in the query, e.g.
    `s3://bucket/sst2/*.tsv?endpoint_override=minio:9000&scheme=http`. Never put keys in the
    path: it is written to the manifest and to rejects.jsonl.

    Args:
        uri: `scheme://...`, optionally with a glob and a `?query`.
        fmt: The source's format override (`hf` is refused: see Raises).
        index: The source's index, for error messages.

    Returns:
        The matching file URIs, sorted; empty when nothing matches.

    Raises:
        PrepareError: pyarrow cannot open or list the URI, or it is a `datasets` save_to_disk
            folder (read from local disk only).
    """
    hf_folder = PrepareError(
        f"data.sources.{index}.path: {uri} is a `datasets` save_to_disk folder; only a local "
        "one can be read (copy it here, or save it as Parquet files)"
    )
    if fmt == "hf":
        raise hf_folder
    base, sep, query = uri.partition("?")
    glob_at = min((i for i in map(base.find, "*[") if i >= 0), default=-1)
    root = base[: base.rfind("/", 0, glob_at)] if glob_at >= 0 else base.rstrip("/")
    pattern = base[len(root) + 1 :].split("/") if glob_at >= 0 else None
    try:
        fs, root_path = pafs.FileSystem.from_uri(root + sep + query)
        kind = fs.get_file_info(root_path).type
        if pattern is None and kind == pafs.FileType.File:
            return [uri]
        listing = []
        if kind == pafs.FileType.Directory:
            listing = fs.get_file_info(pafs.FileSelector(root_path, recursive=True))
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise PrepareError(f"data.sources.{index}.path: cannot list {uri}: {e}") from None
    prefix = root_path.rstrip("/") + "/"
    found = []
    for info in listing:
        if info.type != pafs.FileType.File or not info.path.startswith(prefix):
            continue
        parts = info.path[len(prefix) :].split("/")
        if pattern is None and len(parts) == 1 and parts[0] in _HF_MARKERS:
            raise hf_folder
        if _glob_match(parts, pattern) if pattern else not any(x[:1] == "." for x in parts):
            found.append(f"{root.rstrip('/')}/{'/'.join(parts)}{sep}{query}")
    return sorted(found)


def _glob_match(parts: list[str], pattern: list[str]) -> bool:
    """Whether a relative path (split at '/') matches a glob (split at '/'), by glob.glob's
    rules with recursive=True: see `_expand_uri`."""
    if not pattern:
        return not parts
    head, rest = pattern[0], pattern[1:]
    if head == "**":  # any number of folders, none of them hidden
        return _glob_match(parts, rest) or (
            bool(parts) and parts[0][:1] != "." and _glob_match(parts[1:], pattern)
        )
    return (
        bool(parts)
        and (parts[0][:1] != "." or head[:1] == ".")
        and fnmatch.fnmatchcase(parts[0], head)
        and _glob_match(parts[1:], rest)
    )


def _strip_query(path: str) -> str:
    """A path without the `?query` of a URI (filesystem options, not part of the name)."""
    return path.partition("?")[0] if "://" in path else path


def _units(files: list[list[tuple[str, str]]]) -> list[dict[str, Any]]:
    """Work units: whole files, or line-aligned ranges of line-delimited ones.

    A range of a .gz file is one of its decompressed stream (`gz`); the driver decompresses
    it when the unit is submitted (`_GzRanges`).
    """
    units = []
    for src_idx, entries in enumerate(files):
        for part, (path, fmt) in enumerate(entries):
            size = _size(path) if fmt != "hf" else 0
            gz = _strip_query(path).endswith(".gz")
            chunk = min(
                CHUNK_BYTES,
                max(MIN_CHUNK_BYTES, -(-size * (GZIP_RATIO if gz else 1) // RANGES_PER_FILE)),
            )
            ranges = _line_ranges(path, gz, chunk) if fmt in LINE_FORMATS else None
            if not ranges or len(ranges) == 1:
                ranges, gz = [(0, size, 1)], False  # whole file; parse_bytes gunzips it
            whole = len(ranges) == 1
            for start, end, first_line in ranges:
                units.append(
                    {
                        "source": src_idx,
                        "part": part,
                        "path": path,
                        "fmt": fmt,
                        "gz": gz,
                        "start": start,
                        "end": end,
                        "first_line": first_line,
                        "whole": whole,
                    }
                )
    return units


def _line_ranges(path: str, gz: bool, chunk: int) -> list[tuple[int, int, int]] | None:
    """Cut a line-delimited file at newlines into ~`chunk`-byte ranges (start, end, first line).

    Streams the file (decompressed when `gz`) holding at most about one range in memory; None
    when a .gz file is corrupt, so that it goes whole to a worker, which reports it.
    """
    ranges = []
    start, first_line, buf = 0, 1, b""
    try:
        with _open_stream(path, gz) as f:
            while block := f.read(1 << 20):
                buf += block
                while len(buf) >= chunk and (cut := buf.find(b"\n", chunk - 1)) >= 0:
                    ranges.append((start, start + cut + 1, first_line))
                    first_line += buf.count(b"\n", 0, cut + 1)
                    start += cut + 1
                    buf = buf[cut + 1 :]
    except (OSError, EOFError, zlib.error):
        return None
    if buf:
        ranges.append((start, start + len(buf), first_line))
    return ranges


class _GzRanges:
    """The bytes of .gz ranges, decompressed on the driver in one pass per file.

    A worker can only reach the middle of a gzip stream by decompressing everything before
    it, so each of a file's N ranges read by the workers cost O(N^2) decompression in all
    (a third of the workers' time at 10x the benchmark). Units are submitted in order, so
    here one open stream per file moves forward range by range.
    """

    def __init__(self) -> None:
        self.path: str | None = None
        self.stream: Any = None
        self.pos = 0

    def read(self, unit: dict[str, Any]) -> bytes:
        if unit["path"] != self.path or unit["start"] < self.pos:
            self.close()
            self.path, self.stream, self.pos = unit["path"], _open_stream(unit["path"], True), 0
        if unit["start"] > self.pos:
            self.stream.seek(unit["start"])  # forward: decompresses and discards
        data: bytes = self.stream.read(unit["end"] - unit["start"])
        self.pos = unit["end"]
        return data

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
        self.path, self.stream = None, None


def _open_stream(path: str, gz: bool) -> Any:
    fs, p = _fs(path)
    stream = fs.open_input_stream(p, compression=None)  # we gunzip ourselves
    return gzip.GzipFile(fileobj=stream) if gz else stream


def _read_unit(unit: dict[str, Any]) -> bytes:
    if unit.get("data") is not None:  # a .gz range the driver decompressed (_GzRanges)
        return unit["data"]  # type: ignore[no-any-return]
    start, end = unit["start"], unit["end"]
    if end <= start:
        return b""
    if unit.get("gz"):
        with _open_stream(unit["path"], True) as f:
            f.seek(start)  # decompresses and discards up to `start`
            return f.read(end - start)  # type: ignore[no-any-return]
    fs, p = _fs(unit["path"])
    with fs.open_input_file(p) as f:
        return bytes(f.read_at(end - start, start))


def _fs(path: str) -> tuple[pafs.FileSystem, str]:
    if "://" in path:
        return pafs.FileSystem.from_uri(path)  # type: ignore[no-any-return]
    return pafs.LocalFileSystem(), path


def _size(path: str) -> int:
    fs, p = _fs(path)
    return int(fs.get_file_info(p).size or 0)


def _file_digest(path: str, fmt: str) -> str:
    if fmt == "hf":
        h = hashlib.sha256()
        for f in sorted(Path(path).rglob("*")):
            if f.is_file():
                h.update(f.name.encode())
                h.update(f.read_bytes())
        return h.hexdigest()
    fs, p = _fs(path)
    h = hashlib.sha256()
    with fs.open_input_stream(p, compression=None) as f:  # hash the bytes as stored
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _config_hash(cfg: Any, files: list[list[tuple[str, str]]], tok_path: str) -> str:
    """Everything the output depends on: file contents, templates (their code), tokenizer and
    settings."""
    data = cfg.data.model_dump(mode="json")
    data.pop("num_workers")  # the result must not depend on it
    data.pop("output_dir")
    tok_files = sorted(Path(tok_path).glob("*")) if Path(tok_path).is_dir() else []
    payload = {
        "version": 2,
        "data": data,
        "seed": cfg.experiment.seed,
        "files": [[(p, fmt, _file_digest(p, fmt)) for p, fmt in entries] for entries in files],
        "templates": [
            templates.template_fingerprint(s.template, s.params) for s in cfg.data.sources
        ],
        "tokenizer": [
            (f.name, hashlib.sha256(f.read_bytes()).hexdigest())
            for f in tok_files
            if f.is_file() and f.suffix not in WEIGHT_SUFFIXES
        ],
        "code": _code_fingerprint(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _code_fingerprint() -> str:
    """Hash of the code that builds the data (templates are hashed per template), so that a
    change of how data is read, tokenized, split, packed or written recomputes."""
    h = hashlib.sha256()
    for mod in (sources, tokenize, pack, split):
        h.update(Path(mod.__file__ or "").read_bytes())
    # The `chat` template's tokenizer path (the `chat` function itself is hashed per template).
    h.update(templates._definition_text(templates.tokenizer_chat_template).encode())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()

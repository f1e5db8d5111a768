"""The prepare worker: one unit of input -> Arrow tables of tokenized rows and rejects.

`process_unit` is the Ray task (`schedule.run_units` runs it): it parses the unit's records
(`inputs.records`), renders them with their source's template, assigns each a split (a hash of
the prompt and the seed), tokenizes with the prompt masked out of the loss, and yields
`ROW_SCHEMA` tables of about OUTPUT_BYTES. Everything per record happens here, in the worker;
the driver only moves these tables to disk.
"""

from __future__ import annotations

import gc
import hashlib
import json
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from data_pipeline import split, templates, tokenize
from data_pipeline.inputs import records
from data_pipeline.sources import Reject
from data_pipeline.tokenizer import make_encoder

# A worker tokenizes a unit this many records, or this many characters of rendered text, at a
# time, and sends its output on in tables of about OUTPUT_BYTES (see ShardWorker._tables). The
# character bound keeps a batch's transient objects (encodings, token id lists: ~150 bytes per
# token) the same whatever the record length: 1024 Alpaca records are ~1M characters.
RECORDS_PER_BATCH = 1024
BATCH_CHARS = 128 << 10
OUTPUT_BYTES = 8 << 20

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


_WORKERS: dict[str, ShardWorker] = {}


def process_unit(unit: dict[str, Any], key: str, worker_args: dict[str, Any]) -> Iterator[pa.Table]:
    """The Ray task (a streaming generator): `ShardWorker(**worker_args)._tables(unit)`, with
    the worker built once per process and settings (`key`), so that later tasks and later
    prepare runs in the same Ray session skip building the tokenizer. One is kept: new
    settings replace it."""
    worker = _WORKERS.get(key)
    if worker is None:
        _WORKERS.clear()
        gc.unfreeze()  # the replaced worker's objects are collectable again
        worker = _WORKERS[key] = ShardWorker(**worker_args)
        # Everything alive now (imported modules, Ray's state, this worker) lasts as long as
        # the process: frozen, it is out of the cyclic collector's sight, whose collections,
        # triggered by the per-record objects, then scan only what a batch made. py-spy on
        # the benchmark's workers: the collector's share fell from 10% to 5%. Garbage is
        # collected first, or the replaced worker (its tokenizer: ~14 MiB) would stay frozen.
        gc.collect()
        gc.freeze()
    pool = pa.default_memory_pool()
    for table in worker._tables(unit):
        yield table
        # Hand Arrow's freed pages back once a table has left: its allocator keeps them, and
        # a long-lived worker's idle heap would grow over a big prepare.
        pool.release_unused()


def worker_key(worker_args: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(worker_args, sort_keys=True).encode()).hexdigest()


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
        """One unit, a batch of at most RECORDS_PER_BATCH records or about BATCH_CHARS
        characters at a time, as tables of about OUTPUT_BYTES.

        Records are rendered as they are parsed; the Python objects of a batch (texts, token
        lists) are freed once it is an Arrow table, and the tables leave the worker as they
        fill, so a worker's memory is bounded by the batch, not by the unit or the record
        length (a file that cannot be cut, e.g. a SQuAD JSON, comes whole).
        """
        render = self.renderers[unit["source"]]
        pending: list[pa.Table] = []
        size, processed = 0, False
        lines: list[int] = []
        rendered: list[split.Turns] = []
        rejects: list[tuple[int, str]] = []
        n = chars = 0
        for line, rec in records(unit):
            n += 1
            if isinstance(rec, Reject):
                rejects.append((line, rec.reason))
            else:
                try:
                    turns = render(rec)
                except templates.TemplateError as e:
                    rejects.append((line, str(e)))
                else:
                    rendered.append(turns)
                    lines.append(line)
                    if len(turns) == 1:
                        chars += len(turns[0][0]) + len(turns[0][1])
                    else:
                        chars += sum(len(p) + len(c) for p, c in turns)
            if n == RECORDS_PER_BATCH or chars >= BATCH_CHARS:
                pending.append(self._process_batch(unit, lines, rendered, rejects))
                lines, rendered, rejects, n, chars = [], [], [], 0, 0
                processed = True
                size += pending[-1].nbytes
                if size >= OUTPUT_BYTES:
                    yield pa.concat_tables(pending)
                    pending, size = [], 0
        if not processed and not n and unit.get("whole", False):
            # An empty input among good ones is most likely a mistake: say so, at line 0.
            rejects, n = [(0, "empty file: no records")], 1
        if n or not processed:
            pending.append(self._process_batch(unit, lines, rendered, rejects))
        if pending:
            yield pa.concat_tables(pending)

    def _process_batch(
        self,
        unit: dict[str, Any],
        lines: list[int],
        rendered: list[split.Turns],
        rejects: list[tuple[int, str]],
    ) -> pa.Table:
        """Tokenize a batch's rendered records (at `lines`) and key and split them; one
        ROW_SCHEMA table of its good rows, then its rejects in file order."""
        src_idx = unit["source"]
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
            codes[j] = split.SPLIT_CODES[name]
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

"""The prepare job: raw files -> templated, split, tokenized, packed Parquet shards + manifest.

    ift prepare configs/quickstart.yaml

Reads top to bottom: `prepare()` is the driver; `ShardWorker` is the Ray Data actor that parses,
renders and tokenizes one unit of input (a file or a line-aligned byte range of one); the rest
are small helpers. Dedupe, caps, splitting, packing and writing happen on the driver over the
tokenized rows, kept in input order, so the output depends only on the inputs and the config,
never on the number of workers or the order in which tasks finish.

Crash safety: shards are written to a temporary folder that is moved into place, and
`manifest.json` is written last, atomically. No manifest, no dataset.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from data_pipeline import pack, split, templates, tokenize
from data_pipeline.sources import Reject, detect_format, parse_bytes, read_hf_dataset

MANIFEST = "manifest.json"
REJECTS = "rejects.jsonl"
# Line-delimited formats are cut into byte ranges of about this size so that one big file still
# spreads over every worker; other formats (json arrays, csv with quoted newlines, parquet)
# go whole.
CHUNK_BYTES = 4 << 20
ROWS_PER_SHARD = 50_000
LINE_FORMATS = ("jsonl", "tsv")
# The tokenizer's identity is every file in its folder except model weights (too big to hash).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")

ROW_SCHEMA = pa.schema(
    [
        ("ok", pa.bool_()),
        ("source", pa.int32()),
        ("file", pa.string()),
        ("line", pa.int64()),
        ("reason", pa.string()),
        ("split_key", pa.string()),
        ("content_key", pa.string()),
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("prompt_ids", pa.list_(pa.int32())),
        ("prompt", pa.string()),
        ("reference", pa.string()),
    ]
)


class PrepareError(RuntimeError):
    """The data cannot be prepared; the message says which file or record, and why."""

    user_facing = True


def prepare(cfg: Any, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Prepare `cfg.data` into `cfg.data_dir`, or reuse a finished result with the same hash.

    Args:
        cfg: a validated `launcher.config.Config`.
        log: progress printer.

    Returns:
        The manifest (also written to `<data_dir>/manifest.json`).
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
        return existing

    import ray

    t0 = time.perf_counter()
    units = _units(files)
    n_workers = max(1, min(cfg.data.num_workers, len(units)))
    # Budget CPUs explicitly: an actor pool that asks for more CPUs than the cluster has never
    # starts, and one that takes them all starves everything else (seen on 2-CPU nodes).
    total_cpus = max(1.0, float(ray.cluster_resources().get("CPU", 1)))
    cpus = min(1.0, total_cpus / n_workers)
    log(
        f"[prepare] {sum(len(f) for f in files)} file(s) in {len(units)} unit(s) on "
        f"{n_workers} Ray worker(s)"
    )

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # output order == input order, for determinism
    ctx.enable_progress_bars = False
    worker_args = {
        "sources": [s.model_dump(mode="json") for s in cfg.data.sources],
        "tokenizer_path": tok_path,
        "max_seq_len": cfg.data.max_seq_len,
        "truncation": cfg.data.truncation,
        "trust_remote_code": cfg.model.trust_remote_code,
    }
    ds = ray.data.from_items(units, override_num_blocks=len(units)).map_batches(
        ShardWorker,
        fn_constructor_kwargs=worker_args,
        batch_size=1,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=n_workers),
        num_cpus=cpus,
    )
    rows_by_split, rejects, stats = _collect(
        cfg, ds.iter_batches(batch_format="pyarrow", batch_size=None)
    )
    t_tok = time.perf_counter() - t0
    total = stats["good"] + len(rejects)
    reject_fraction = len(rejects) / total if total else 1.0
    if total == 0 or reject_fraction > cfg.data.max_reject_fraction:
        tmp_rejects = _write_rejects(out_dir, rejects)
        raise PrepareError(
            f"{len(rejects)} of {total} records rejected ({reject_fraction:.1%} > "
            f"data.max_reject_fraction {cfg.data.max_reject_fraction:.1%}); no dataset written. "
            f"See {tmp_rejects}" + (f"; first: {_fmt_reject(rejects[0])}" if rejects else "")
        )
    manifest = _write_dataset(cfg, out_dir, rows_by_split, rejects, stats, config_hash, tok_path)
    log(
        f"[prepare] {stats['good']} examples, {len(rejects)} rejected, "
        + ", ".join(f"{s} {manifest['splits'][s]['rows']} rows" for s in split.SPLITS)
        + f" in {time.perf_counter() - t0:.1f}s (tokenize {t_tok:.1f}s)"
    )
    return manifest


# --------------------------------------------------------------------------------------------
# Ray Data actor
# --------------------------------------------------------------------------------------------


class ShardWorker:
    """Parse, template and tokenize one input unit. The tokenizer is loaded once per actor."""

    def __init__(
        self,
        sources: list[dict[str, Any]],
        tokenizer_path: str,
        max_seq_len: int,
        truncation: str,
        trust_remote_code: bool = False,
    ) -> None:
        self.sources = sources
        self.tok = load_tokenizer(tokenizer_path, trust_remote_code)
        self.bos, self.eos = special_ids(self.tok)
        self.max_seq_len = max_seq_len
        self.truncation = truncation

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = _empty_columns()
        for unit in batch.to_pylist():
            self._process(unit, out)
        return pa.table(out, schema=ROW_SCHEMA)

    def _process(self, unit: dict[str, Any], out: dict[str, list[Any]]) -> None:
        src_idx = unit["source"]
        src = self.sources[src_idx]
        label = unit["path"]
        rendered: list[tuple[int, list[tuple[str, str]]]] = []
        for line, rec in _records(unit):
            if isinstance(rec, Reject):
                _add_reject(out, src_idx, label, line, rec.reason)
                continue
            try:
                turns = templates.render(src["template"], rec, src["params"])
            except templates.TemplateError as e:
                _add_reject(out, src_idx, label, line, str(e))
                continue
            rendered.append((line, turns))
        if not rendered:
            return
        # One batched call per unit: the fast tokenizer parallelises inside it.
        texts = [t for _, turns in rendered for pair in turns for t in pair]
        ids = self.tok(texts, add_special_tokens=False)["input_ids"]
        pos = 0
        for line, turns in rendered:
            n = len(turns)
            chunk = ids[pos : pos + 2 * n]
            pos += 2 * n
            p_ids, c_ids = chunk[0::2], chunk[1::2]
            try:
                input_ids, labels = tokenize.build_example(
                    p_ids,
                    c_ids,
                    bos_id=self.bos,
                    eos_id=self.eos,
                    max_seq_len=self.max_seq_len,
                    truncation=self.truncation,
                )
            except tokenize.LengthError as e:
                _add_reject(out, src_idx, label, line, str(e))
                continue
            prompt_ids = tokenize.prompt_ids_for_generation(
                p_ids, c_ids, self.bos, self.max_seq_len
            )
            prompt_text = "".join(p + c for p, c in turns[:-1]) + turns[-1][0]
            out["ok"].append(True)
            out["source"].append(src_idx)
            out["file"].append(label)
            out["line"].append(line)
            out["reason"].append(None)
            out["split_key"].append(split.record_key(turns))
            out["content_key"].append(split.content_key(turns))
            out["input_ids"].append(input_ids)
            out["labels"].append(labels)
            out["prompt_ids"].append(prompt_ids)
            out["prompt"].append(prompt_text)
            out["reference"].append(turns[-1][1])


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


def _records(unit: dict[str, Any]):  # type: ignore[no-untyped-def]
    """(line, record | Reject) for one unit, with line numbers of the whole file."""
    if unit["fmt"] == "hf":
        yield from read_hf_dataset(unit["path"], unit["path"])
        return
    data = _read_range(unit["path"], unit["start"], unit["end"])
    header = b""
    if unit["start"] > 0 and unit["fmt"] == "tsv":
        header = _read_header(unit["path"])
    shift = unit["first_line"] - 1 - (1 if header else 0)
    for line, rec in parse_bytes(header + data, unit["path"], unit["fmt"]):
        if isinstance(rec, Reject):
            rec = Reject(rec.source, line + shift, rec.reason)
        yield line + shift, rec


# --------------------------------------------------------------------------------------------
# Driver helpers
# --------------------------------------------------------------------------------------------


def _collect(cfg: Any, batches: Any) -> tuple[dict[str, list[dict[str, Any]]], list[dict], dict]:
    """Dedupe, cap per source, assign splits; everything in input order."""
    ratios = cfg.data.split
    seed = cfg.experiment.seed
    seen: set[str] = set()
    kept_per_source = [0] * len(cfg.data.sources)
    test_per_source = [0] * len(cfg.data.sources)
    rows_by_split: dict[str, list[dict[str, Any]]] = {s: [] for s in split.SPLITS}
    rejects: list[dict[str, Any]] = []
    stats = {"good": 0, "duplicates": 0, "capped": 0}
    for table in batches:
        for row in table.to_pylist():
            src = cfg.data.sources[row["source"]]
            if not row["ok"]:
                rejects.append(
                    {"source": row["file"], "line": row["line"], "reason": row["reason"]}
                )
                continue
            stats["good"] += 1
            if cfg.data.dedupe:
                if row["content_key"] in seen:
                    stats["duplicates"] += 1
                    continue
                seen.add(row["content_key"])
            if src.max_records is not None and kept_per_source[row["source"]] >= src.max_records:
                stats["capped"] += 1
                continue
            kept_per_source[row["source"]] += 1
            name = src.split or split.assign_split(row["split_key"], seed, ratios)
            if name == "test" and cfg.data.max_test_records is not None:
                if test_per_source[row["source"]] >= cfg.data.max_test_records:
                    stats["capped"] += 1
                    continue
                test_per_source[row["source"]] += 1
            rows_by_split[name].append(row)
    return rows_by_split, rejects, stats


def _write_dataset(
    cfg: Any,
    out_dir: str,
    rows_by_split: dict[str, list[dict[str, Any]]],
    rejects: list[dict[str, Any]],
    stats: dict[str, int],
    config_hash: str,
    tok_path: str,
) -> dict[str, Any]:
    tmp = f"{out_dir.rstrip('/')}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    digest = hashlib.sha256()
    splits: dict[str, Any] = {}
    names = [s.task_name for s in cfg.data.sources]
    for name in split.SPLITS:
        rows = rows_by_split[name]
        lengths = [len(r["input_ids"]) for r in rows]
        loss_tokens = [sum(1 for x in r["labels"] if x != -100) for r in rows]
        info: dict[str, Any] = {**tokenize.token_stats(lengths, loss_tokens)}
        if name == "test" or not cfg.data.packing:
            table = _plain_table(rows, names, with_text=(name == "test"))
            info["packed"] = False
        else:
            packed = pack.pack_rows(
                [(r["input_ids"], r["labels"]) for r in rows], cfg.data.max_seq_len
            )
            table = pa.table(
                {
                    "input_ids": pa.array([p["input_ids"] for p in packed], pa.list_(pa.int32())),
                    "labels": pa.array([p["labels"] for p in packed], pa.list_(pa.int32())),
                    "seq_lens": pa.array([p["seq_lens"] for p in packed], pa.list_(pa.int32())),
                }
            )
            info["packed"] = True
            info["packed_rows"] = len(packed)
            info["packing_efficiency"] = pack.packing_efficiency(packed, cfg.data.max_seq_len)
        info["examples"] = len(rows)
        info["rows"] = table.num_rows
        info["files"] = _write_shards(table, os.path.join(tmp, name), digest)
        info["per_task"] = {
            n: sum(1 for r in rows if r["source"] == i) for i, n in enumerate(names)
        }
        splits[name] = info
    with open(os.path.join(tmp, REJECTS), "w") as f:
        for r in rejects:
            f.write(json.dumps(r) + "\n")
    manifest = {
        "version": 1,
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
            }
            for s in cfg.data.sources
        ],
        "splits": splits,
        "rejected": len(rejects),
        "duplicates": stats["duplicates"],
        "capped": stats["capped"],
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


def _plain_table(rows: list[dict[str, Any]], names: list[str], with_text: bool) -> pa.Table:
    cols: dict[str, Any] = {
        "input_ids": pa.array([r["input_ids"] for r in rows], pa.list_(pa.int32())),
        "labels": pa.array([r["labels"] for r in rows], pa.list_(pa.int32())),
        "seq_lens": pa.array([[len(r["input_ids"])] for r in rows], pa.list_(pa.int32())),
    }
    if with_text:
        cols["id"] = pa.array([f"{names[r['source']]}-{r['line']}" for r in rows], pa.string())
        cols["task"] = pa.array([names[r["source"]] for r in rows], pa.string())
        cols["prompt"] = pa.array([r["prompt"] for r in rows], pa.string())
        cols["reference"] = pa.array([r["reference"] for r in rows], pa.string())
        cols["prompt_ids"] = pa.array([r["prompt_ids"] for r in rows], pa.list_(pa.int32()))
    return pa.table(cols)


def _write_shards(table: pa.Table, folder: str, digest: Any) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    files = []
    n_shards = max(1, -(-table.num_rows // ROWS_PER_SHARD))
    for i in range(n_shards):
        part = table.slice(i * ROWS_PER_SHARD, ROWS_PER_SHARD)
        name = f"part-{i:05d}.parquet"
        pq.write_table(part, os.path.join(folder, name))
        for col in part.column_names:  # fingerprint the content, not the file bytes
            digest.update(col.encode())
            for chunk in part.column(col).chunks:
                for buf in chunk.buffers():
                    if buf is not None:
                        digest.update(buf)
        files.append(f"{os.path.basename(folder)}/{name}")
    return files


def _write_rejects(out_dir: str, rejects: list[dict[str, Any]]) -> str:
    """On failure, rejects go beside (not into) the output folder, which stays untouched."""
    path = f"{out_dir.rstrip('/')}.rejects.jsonl"
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        for r in rejects:
            f.write(json.dumps(r) + "\n")
    return path


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


def _expand(path: str, fmt: str | None, index: int) -> list[tuple[str, str]]:
    """A source path (file, glob, folder) -> sorted [(file, format)]."""
    if "://" in path:
        return [(path, fmt or detect_format(path))]
    p = Path(path)
    if p.is_dir():
        if fmt == "hf" or (p / "dataset_info.json").exists() or (p / "state.json").exists():
            return [(str(p), "hf")]
        matches = sorted(str(f) for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
    else:
        matches = sorted(glob.glob(path, recursive=True))
    if not matches:
        raise PrepareError(f"data.sources.{index}.path: no file matches {path}")
    out = []
    for m in matches:
        try:
            out.append((m, fmt or detect_format(m)))
        except ValueError as e:
            raise PrepareError(f"data.sources.{index}.path: {e}") from None
    return out


def _units(files: list[list[tuple[str, str]]]) -> list[dict[str, Any]]:
    units = []
    for src_idx, entries in enumerate(files):
        for path, fmt in entries:
            size = _size(path) if fmt != "hf" else 0
            if fmt not in LINE_FORMATS or size <= CHUNK_BYTES or path.endswith(".gz"):
                units.append(
                    {
                        "source": src_idx,
                        "path": path,
                        "fmt": fmt,
                        "start": 0,
                        "end": size,
                        "first_line": 1,
                    }
                )
                continue
            for start, end, first_line in _line_ranges(path, size):
                units.append(
                    {
                        "source": src_idx,
                        "path": path,
                        "fmt": fmt,
                        "start": start,
                        "end": end,
                        "first_line": first_line,
                    }
                )
    return units


def _line_ranges(path: str, size: int) -> list[tuple[int, int, int]]:
    """Cut a line-delimited file at newlines into ~CHUNK_BYTES ranges, with first line numbers."""
    data = _read_range(path, 0, size)
    ranges = []
    start, line = 0, 1
    while start < size:
        end = data.find(b"\n", min(start + CHUNK_BYTES, size) - 1)
        end = size if end < 0 else end + 1
        ranges.append((start, end, line))
        line += data.count(b"\n", start, end)
        start = end
    return ranges


def _fs(path: str) -> tuple[pafs.FileSystem, str]:
    if "://" in path:
        return pafs.FileSystem.from_uri(path)  # type: ignore[no-any-return]
    return pafs.LocalFileSystem(), path


def _size(path: str) -> int:
    fs, p = _fs(path)
    return int(fs.get_file_info(p).size or 0)


def _read_range(path: str, start: int, end: int) -> bytes:
    fs, p = _fs(path)
    with fs.open_input_file(p) as f:
        return bytes(f.read_at(end - start, start)) if end > start else b""


def _read_header(path: str) -> bytes:
    head = _read_range(path, 0, min(_size(path), 1 << 16))
    return head[: head.find(b"\n") + 1]


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
    with fs.open_input_stream(p) as f:
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
        "version": 1,
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
    """Hash of the tokenize/pack/split code, so a change of how data is built recomputes."""
    h = hashlib.sha256()
    for mod in (tokenize, pack, split):
        h.update(Path(mod.__file__ or "").read_bytes())
    return h.hexdigest()


def _empty_columns() -> dict[str, list[Any]]:
    return {name: [] for name in ROW_SCHEMA.names}


def _add_reject(out: dict[str, list[Any]], source: int, file: str, line: int, reason: str) -> None:
    for name in ROW_SCHEMA.names:
        out[name].append(None)
    out["ok"][-1] = False
    out["source"][-1] = source
    out["file"][-1] = file
    out["line"][-1] = line
    out["reason"][-1] = reason

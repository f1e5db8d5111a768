"""Inputs of the prepare job: sources expanded to files, files cut into units, units read.

A source path (a file, a glob, a folder; local or any URI pyarrow opens) expands to a sorted
list of (file, format) (`expand`). Files become work units (`plan_units`): line-delimited
files are cut at newlines into ranges so that one big file spreads over every worker; the cut
depends on the file alone, never on the worker count. A worker turns a unit into
(line, record | Reject) pairs (`records`), with line numbers of the whole file.
"""

from __future__ import annotations

import fnmatch
import glob
import gzip
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from data_pipeline import sources
from data_pipeline.errors import PrepareError
from data_pipeline.sources import Reject, detect_format, parse_bytes, read_hf_dataset

# Line-delimited files are cut at newlines into about 8 ranges each (64 .. 512 KiB), so that
# one big file still spreads over every worker and the driver can start on the first range
# while the rest are tokenized. The cut depends on the file alone, never on the worker count.
# Other formats (json arrays, csv with quoted newlines, parquet) go whole.
RANGES_PER_FILE = 8
MIN_CHUNK_BYTES = 64 << 10
CHUNK_BYTES = 512 << 10
# Nominal gzip ratio of text, to size the ranges of a .gz file from its compressed size.
GZIP_RATIO = 3
LINE_FORMATS = ("jsonl", "tsv")
# Marker files of a folder written by `datasets.Dataset.save_to_disk`.
_HF_MARKERS = ("dataset_info.json", "state.json")


def expand(path: str, fmt: str | None, index: int) -> list[tuple[str, str]]:
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
    `uri`, so that `filesystem()` reopens it with the same options.

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


def plan_units(files: list[list[tuple[str, str]]]) -> list[dict[str, Any]]:
    """Work units: whole files, or line-aligned ranges of line-delimited ones.

    A range of a .gz file is one of its decompressed stream (`gz`); the driver decompresses
    it when the unit is submitted (`GzRanges`).
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


class GzRanges:
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
    fs, p = filesystem(path)
    stream = fs.open_input_stream(p, compression=None)  # we gunzip ourselves
    return gzip.GzipFile(fileobj=stream) if gz else stream


def read_unit(unit: dict[str, Any]) -> bytes:
    if unit.get("data") is not None:  # a .gz range the driver decompressed (GzRanges)
        return unit["data"]  # type: ignore[no-any-return]
    start, end = unit["start"], unit["end"]
    if end <= start:
        return b""
    if unit.get("gz"):
        with _open_stream(unit["path"], True) as f:
            f.seek(start)  # decompresses and discards up to `start`
            return f.read(end - start)  # type: ignore[no-any-return]
    fs, p = filesystem(unit["path"])
    with fs.open_input_file(p) as f:
        return bytes(f.read_at(end - start, start))


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    if "://" in path:
        return pafs.FileSystem.from_uri(path)  # type: ignore[no-any-return]
    return pafs.LocalFileSystem(), path


def _size(path: str) -> int:
    fs, p = filesystem(path)
    return int(fs.get_file_info(p).size or 0)


def records(unit: dict[str, Any]) -> Iterator[sources.Parsed]:
    """(line, record | Reject) for one unit, with line numbers of the whole file."""
    if unit["fmt"] == "hf":
        yield from read_hf_dataset(unit["path"], unit["path"])
        return
    data = read_unit(unit)
    header = b""
    if unit["start"] > 0 and unit["fmt"] == "tsv":
        header = read_unit({**unit, "start": 0, "end": 1 << 16, "data": None})
        header = header[: header.find(b"\n") + 1]
    shift = unit["first_line"] - 1 - (1 if header else 0)
    for line, rec in parse_bytes(header + data, unit["path"], unit["fmt"]):
        if isinstance(rec, Reject):
            rec = Reject(rec.source, line + shift, rec.reason)
        yield line + shift, rec

"""Inputs of the prepare job: sources expanded to files, files cut into units, units read.

A source path (a file, a glob, a folder; local or any URI pyarrow opens) expands to a sorted
list of (file, format) (`expand`). Files become work units (`plan_units`): every format is
cut into ranges where its records end (`_cut`: lines, CSV/TSV rows outside quotes, JSON array
elements, CoNLL sentences, Parquet row groups, the Arrow files of a `datasets` folder), so
that one big file spreads over every worker; the cut depends on the file alone, never on the
worker count. A worker turns a unit into (line, record | Reject) pairs (`records`), with line
numbers of the whole file: the ranges of a file give exactly what parsing it whole gives.
"""

from __future__ import annotations

import codecs
import fnmatch
import glob
import gzip
import io
import itertools
import json
import re
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from data_pipeline import sources
from data_pipeline.errors import PrepareError
from data_pipeline.sources import Reject, detect_format, parse_bytes, read_hf_dataset

# Files are cut into about 8 ranges each (64 .. 512 KiB), so that one big file still spreads
# over every worker and the driver can start on the first range while the rest are
# tokenized. The cut depends on the file alone, never on the worker count (see `_cut`).
RANGES_PER_FILE = 8
MIN_CHUNK_BYTES = 64 << 10
CHUNK_BYTES = 512 << 10
# Nominal gzip ratio of text, to size the ranges of a .gz file from its compressed size.
GZIP_RATIO = 3
# Formats read as bytes: their ranges of a .gz file are decompressed by the driver.
STREAM_FORMATS = ("jsonl", "csv", "tsv", "json", "conll")
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
    """Work units: whole files, or ranges of files cut by format (`_cut`).

    A unit's `start`/`end` are bytes of the file (for .gz files: of its decompressed stream,
    which the driver decompresses when the unit is submitted, `GzRanges`), `first_line` the
    file's line (element, row) number of its first record, `whole` whether it is the whole
    file, parsed as one by `parse_bytes`. Ranges carry what their format needs besides
    (`header_end`, `literal`, `row_groups`, `rows`): see `_cut`.
    """
    units = []
    for src_idx, entries in enumerate(files):
        for part, (path, fmt) in enumerate(entries):
            size = _size(path) if fmt != "hf" else 0
            gz = _strip_query(path).endswith(".gz")
            chunk = min(
                CHUNK_BYTES,
                max(MIN_CHUNK_BYTES, -(-estimated_bytes(path, size) // RANGES_PER_FILE)),
            )
            pieces = _cut(path, fmt, gz, size, chunk)
            if not pieces or len(pieces) == 1:
                pieces, gz = [{"start": 0, "end": size, "first_line": 1}], False
            whole = len(pieces) == 1
            for piece in pieces:
                units.append(
                    {
                        "source": src_idx,
                        "part": part,
                        "path": path,
                        "fmt": fmt,
                        "gz": gz and fmt in STREAM_FORMATS,
                        "whole": whole,
                        **piece,
                    }
                )
    return units


def estimated_bytes(path: str, size: int) -> int:
    """A file's size as read: a .gz file's decompressed size estimated at GZIP_RATIO."""
    return size * (GZIP_RATIO if _strip_query(path).endswith(".gz") else 1)


def _cut(path: str, fmt: str, gz: bool, size: int, chunk: int) -> list[dict[str, Any]] | None:
    """A file cut into ranges of about `chunk` bytes; None (or one range): keep it whole.

    Every cut depends on the file alone, and parsing the ranges one by one gives exactly the
    records, order, line numbers and rejects of parsing the whole file (`parse_bytes`): a
    file that the whole-file parse would reject at once (bad header, malformed JSON, bad
    gzip) stays whole, so that `parse_bytes` reports it as before.

    * jsonl: at newlines.
    * csv, tsv: at newlines outside quoted fields; each range re-reads the header row
      (`header_end`). A TSV with quoted fields is read quoted or literally as a whole
      (`literal`, decided as `parse_bytes` decides it, over the whole file).
    * json: a top-level array between elements (its other layouts go whole).
    * conll: after a blank or `-DOCSTART-` line, where a sentence ends.
    * parquet: by row groups (`row_groups`), from the footer alone.
    * hf (`datasets` folder): by its Arrow files (`rows`, counted across files).
    """
    if fmt == "parquet":
        return None if gz else _parquet_ranges(path, chunk)
    if fmt == "hf":
        return _hf_ranges(path, chunk)
    if not gz and size <= chunk:
        return None
    try:
        return cut_stream(lambda: _blocks(path, gz), fmt, chunk)
    except (OSError, EOFError, zlib.error):
        return None  # a corrupt .gz goes whole to a worker, which reports it


def cut_stream(
    blocks: Callable[[], Iterator[bytes]], fmt: str, chunk: int
) -> list[dict[str, Any]] | None:
    """The ranges of a file of a byte-stream format (see `_cut`).

    Args:
        blocks: Opens the file's bytes afresh (decompressed for .gz), as an iterator of blocks.
        fmt: One of STREAM_FORMATS.
        chunk: The least range size.

    Returns:
        Ranges (`start`, `end`, `first_line` and what `records` needs for `fmt`), or None.
    """
    stream = blocks()
    head = b""
    while len(head) < 2 and (block := next(stream, None)) is not None:
        head += block
    if head[:2] == _GZIP_MAGIC:  # `parse_bytes` gunzips by the magic bytes, whatever the name
        return None
    stream = itertools.chain([head], stream)
    if fmt == "jsonl":
        return _pieces(line_cuts(stream, chunk))
    if fmt == "conll":
        return _pieces(conll_cuts(stream, chunk))
    if fmt == "json":
        cut = json_array_cuts(stream, chunk)
        return None if cut is None else _pieces(cut)
    if fmt in ("csv", "tsv"):
        return _delimited_ranges(blocks, fmt, chunk)
    return None


def _pieces(ranges: list[tuple[int, int, int]]) -> list[dict[str, Any]]:
    return [{"start": a, "end": b, "first_line": line} for a, b, line in ranges]


def _blocks(path: str, gz: bool) -> Iterator[bytes]:
    with _open_stream(path, gz) as f:
        while block := f.read(1 << 20):
            yield block


def line_cuts(blocks: Iterable[bytes], chunk: int) -> list[tuple[int, int, int]]:
    """Cut line-delimited bytes at newlines into ranges of at least `chunk` bytes (the last
    may be shorter): [(start, end, first line)], lines counted at ``\n``. Holds about one
    range in memory."""
    ranges = []
    start, first_line, buf = 0, 1, b""
    for block in blocks:
        buf += block
        while len(buf) >= chunk and (cut := buf.find(b"\n", chunk - 1)) >= 0:
            ranges.append((start, start + cut + 1, first_line))
            first_line += buf.count(b"\n", 0, cut + 1)
            start += cut + 1
            buf = buf[cut + 1 :]
    if buf:
        ranges.append((start, start + len(buf), first_line))
    return ranges


# A CoNLL sentence ends at a blank line or a -DOCSTART- line (after `bytes.strip()`):
# the match runs from the newline before such a line to the newline after it.
_CONLL_BOUNDARY = re.compile(rb"\n[ \t\r\x0b\x0c]*(?:-DOCSTART-[^\n]*)?\n")


def conll_cuts(blocks: Iterable[bytes], chunk: int) -> list[tuple[int, int, int]]:
    """Cut CoNLL bytes just after a sentence boundary line (blank or `-DOCSTART-`), where
    `parse_conll` starts afresh, into ranges of at least `chunk` bytes: [(start, end, first
    line)]. A range never starts at the file's first line (its BOM is stripped only there)."""
    ranges = []
    start, first_line, buf, search = 0, 1, b"", chunk - 1
    for block in blocks:
        buf += block
        while (m := _CONLL_BOUNDARY.search(buf, max(search, 0))) is not None:
            cut = m.end()
            ranges.append((start, start + cut, first_line))
            first_line += buf.count(b"\n", 0, cut)
            start += cut
            buf = buf[cut:]
            search = chunk - 1
        # A boundary found later starts at a newline at or after the last one seen here.
        search = max(chunk - 1, buf.rfind(b"\n"))
    if buf:
        ranges.append((start, start + len(buf), first_line))
    return ranges


_GZIP_MAGIC = b"\x1f\x8b"
_BOM = b"\xef\xbb\xbf"
# The rest of a quoted CSV field after its opening quote, up to (not including) the quote
# that may close it: any text, doubled quotes included. Possessive, so that it never takes
# the first quote of a doubled pair as the closing one.
_QUOTED_CONTENT = re.compile(rb'[^"]*+(?:""[^"]*+)*+')


def delimited_cuts(
    blocks: Iterable[bytes], delimiter: bytes, chunk: int, quoting: bool = True
) -> tuple[list[tuple[int, int, int]], bool]:
    """Cut CSV or TSV bytes at row ends into ranges of at least `chunk` bytes.

    A row ends at a newline outside quoted fields, by the csv module's rules (the default
    dialect, as `sources` reads): a field is quoted when it starts with ``"`` (just after
    the delimiter, a line end or the file's start and BOM); it runs to a ``"`` not doubled,
    newlines included; a quote anywhere else is text. The delimiter, quote and line ends
    are ASCII, so bytes give the same answer as the decoded text. Cuts are only after a
    ``\n``; line numbers count ``\n``, ``\r\n`` and a lone ``\r``, as the csv module does.
    Streams the bytes, holding about one block (plus an unfinished quoted field's rest).

    Args:
        blocks: The file's bytes, in order.
        delimiter: ``b","`` or ``b"\t"``.
        chunk: The least range size (the last range may be shorter).
        quoting: False: quotes are text (the literal TSV reading): every newline ends a row.

    Returns:
        The ranges [(start, end, first line)], and whether any field starts with a quote
        (only then can the quote-aware and the literal readings differ).
    """
    openers = (delimiter[0], ord("\r"), ord("\n"))

    def field_quote(pos: int) -> int:
        """The first quote at or after `pos` that opens a field, or -1. A `find` loop: the
        same search as a look-behind regex, which scans in Python's regex engine at every
        byte, costs a third of the time of planning the 100x benchmark input."""
        while (q := buf.find(b'"', pos)) > 0:
            if buf[q - 1] in openers:
                return q
            pos = q + 1
        return -1

    ranges: list[tuple[int, int, int]] = []
    quoted = False
    start, first_line = 0, 1  # the current range
    mark, line = 0, 1  # the line number at byte `mark`
    buf, base = b"", -1  # buf[i] is byte base + i; byte -1 a delimiter: a quote at 0 opens a field
    pos, inside, eof = 1, False, False
    it = iter(blocks)

    def breaks(a: int, b: int) -> int:
        return buf.count(b"\n", a, b) + buf.count(b"\r", a, b) - buf.count(b"\r\n", a, b)

    head = b""
    while not eof:
        block = next(it, None)
        eof = block is None
        if base == -1 and not buf:
            head += block or b""
            if len(head) < 3 and not eof:
                continue
            # The BOM is stripped before parsing: a quote right after it opens a field.
            buf = delimiter + (b"xx" + delimiter + head[3:] if head[:3] == _BOM else head)
        elif block:
            buf += block
        while True:
            if inside:
                end = _QUOTED_CONTENT.match(buf, pos).end()  # type: ignore[union-attr]
                if end >= len(buf) - (0 if eof else 1):
                    pos = end  # the byte after its quote is not read yet, or it never closes
                    break
                pos, inside = end + 1, False
            q = field_quote(pos) if quoting else -1
            limit = q if q >= 0 else len(buf)
            while (nl := buf.find(b"\n", max(pos, start - base + chunk - 1), limit)) >= 0:
                line += breaks(mark - base, nl + 1)
                mark = base + nl + 1
                ranges.append((start, mark, first_line))
                start, first_line, pos = mark, line, nl + 1
            if q < 0:
                pos = len(buf)
                break
            quoted, inside, pos = True, True, q + 1
        # Drop what is scanned, keeping the byte before `pos` (the quote's look-behind) and
        # never parting a "\r\n" (one line end).
        keep = pos - 1
        if keep > 0 and buf[keep - 1 : keep + 1] == b"\r\n":
            keep -= 1
        if keep > mark - base:
            line += breaks(mark - base, keep)
            mark = base + keep
        if keep > 0:
            buf, base, pos = buf[keep:], base + keep, pos - keep
    if base + len(buf) > start:
        ranges.append((start, base + len(buf), first_line))
    return ranges, quoted


def _line_breaks(data: bytes) -> int:
    """Lines ends as the csv module counts them: ``\n``, ``\r\n`` and a lone ``\r``."""
    return data.count(b"\n") + data.count(b"\r") - data.count(b"\r\n")


def _text_lines(blocks: Iterable[bytes]) -> Iterator[str]:
    """Decoded lines (surrogateescape, BOM removed), cut as ``io.StringIO(text, newline="")``
    cuts the whole text: each piece is cut after its last ``\n``, where a line surely ends."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
    rest, first = "", True
    for block in blocks:
        text = rest + decoder.decode(block)
        if first and text:
            text, first = text.removeprefix("\ufeff"), False
        cut = text.rfind("\n") + 1
        yield from io.StringIO(text[:cut], newline="")
        rest = text[cut:]
    text = rest + decoder.decode(b"", final=True)
    yield from io.StringIO(text.removeprefix("\ufeff") if first else text, newline="")


# Header rows further than this many rows into a file (after blank rows) keep it whole.
_MAX_HEADER_ROWS = 64


def _delimited_ranges(
    blocks: Callable[[], Iterator[bytes]], fmt: str, chunk: int
) -> list[dict[str, Any]] | None:
    """CSV or TSV ranges (`delimited_cuts`), each with the end of the file's header row and the
    reading of the whole file."""
    delimiter = b"," if fmt == "csv" else b"\t"
    ranges, quoted = delimited_cuts(blocks(), delimiter, chunk)
    literal = False
    if fmt == "tsv" and quoted:
        # Only a quote opening a field can make the two readings differ.
        literal = sources.literal_tsv(lambda: _text_lines(blocks()))
        if literal:
            ranges, _ = delimited_cuts(blocks(), delimiter, chunk, quoting=False)
    if len(ranges) < 2:
        return None
    head = b""
    for block in blocks():
        head += block
        if len(head) >= ranges[0][1]:
            break
    head = head[: ranges[0][1]]
    rows, _ = delimited_cuts([head], delimiter, 1, quoting=not literal)
    for _, row_end, _ in rows[:_MAX_HEADER_ROWS]:
        found = sources.delimited_header(head[:row_end], fmt, literal)
        if found is not None:
            if not found:
                return None  # a bad header: the whole file is one reject
            return [
                {
                    "start": a,
                    "end": b,
                    "first_line": line,
                    "header_end": row_end,
                    "literal": literal,
                }
                for a, b, line in ranges
            ]
    return None


_JSON_SPACE = b" \t\n\r"
_JSON_SPACES = re.compile(rb"[ \t\n\r]*")
# Everything but brackets and an unfinished string: text between brackets, whole strings.
_JSON_SKIP = re.compile(rb'(?:[^"\[\]{}]++|"[^"\\]*+(?:\\.[^"\\]*+)*+")*+', re.DOTALL)
_OPENER = {ord("]"): ord("["), ord("}"): ord("{")}


def json_array_cuts(blocks: Iterable[bytes], chunk: int) -> list[tuple[int, int, int]] | None:
    """Cut a top-level JSON array between elements into ranges of at least `chunk` bytes.

    A scanner skips strings (escapes included) and tracks the nesting of brackets; a range
    ends just after an element that closes at depth 1. The first range starts after the
    ``[``, the last ends at the closing ``]``; a later range starts with the ``,`` before its
    first element (`sources.parse_json_elements` reads them). Each range is decoded once
    here, so that a malformed file (which `parse_bytes` rejects whole, at its error) and one
    that is not an array are found: None for them. Streams the bytes, holding about one
    range.

    Returns:
        [(start, end, index of the first element)], or None: keep the file whole.
    """
    it = iter(blocks)
    buf, base, eof = b"", 0, False

    def more() -> bool:
        nonlocal buf, eof
        block = next(it, None)
        eof = block is None
        buf += block or b""
        return not eof

    while len(buf) < 3 and more():
        pass
    pos = 3 if buf[:3] == _BOM else 0
    while (pos := _JSON_SPACES.match(buf, pos).end()) == len(buf):  # type: ignore[union-attr]
        if not more():
            return None
    if buf[pos] != ord("["):
        return None  # an object (a wrapper, SQuAD) or no JSON: whole
    ranges: list[tuple[int, int, int]] = []
    stack, start, index = [ord("[")], pos + 1, 1
    pos += 1
    while True:
        pos = _JSON_SKIP.match(buf, pos).end()  # type: ignore[union-attr]
        if pos == len(buf) or buf[pos] == ord('"'):  # more to read, or an unfinished string
            buf, pos, base = buf[start - base :], pos - (start - base), start
            if not more():
                return None
            continue
        c = buf[pos]
        pos += 1
        if c in b"[{":
            stack.append(c)
            continue
        if stack.pop() != _OPENER[c]:
            return None
        if len(stack) == 1 and base + pos - start >= chunk:
            n = _count_elements(buf[start - base : pos], first=not ranges)
            if n is None:
                return None
            ranges.append((start, base + pos, index))
            start, index = base + pos, index + n
        elif not stack:
            close = base + pos - 1
            last = buf[start - base : pos - 1]
            if ranges and not last.strip(_JSON_SPACE):
                ranges[-1] = (*ranges[-1][:1], close, ranges[-1][2])  # only spaces left
            elif _count_elements(last, first=not ranges) is None:
                return None
            else:
                ranges.append((start, close, index))
            tail = buf[pos:]
            while True:  # nothing but spaces may follow
                if tail.strip(_JSON_SPACE):
                    return None
                if (block := next(it, None)) is None:
                    return ranges
                tail = block


def _count_elements(data: bytes, first: bool) -> int | None:
    """The number of elements of an array range (see `json_array_cuts`); None if malformed."""
    try:
        text = data.decode("utf-8")
        if not first:
            text = text.lstrip(" \t\n\r")
            if not text.startswith(","):
                return None
            text = text[1:]
        return len(json.loads("[" + text + "]"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None


def _parquet_ranges(path: str, chunk: int) -> list[dict[str, Any]] | None:
    """Runs of whole row groups of at least `chunk` compressed bytes, from the footer."""
    import pyarrow.parquet as pq  # lazy: only this format needs it

    fs, p = filesystem(path)
    try:
        with fs.open_input_file(p) as f:
            meta = pq.ParquetFile(f).metadata
    except Exception:  # a damaged file goes whole: its worker reports it
        return None
    if meta.num_row_groups < 2 or meta.num_rows == 0:
        return None
    pieces: list[dict[str, Any]] = []
    first, row, first_row, size = 0, 0, 0, 0
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        size += sum(group.column(c).total_compressed_size for c in range(group.num_columns))
        row += group.num_rows
        if size >= chunk or g == meta.num_row_groups - 1:
            start = pieces[-1]["end"] if pieces else 0
            pieces.append({"start": start, "end": start + size, "first_line": first_row + 1,
                           "row_groups": (first, g + 1)})  # fmt: skip
            first, first_row, size = g + 1, row, 0
    return pieces


def _hf_ranges(path: str, chunk: int) -> list[dict[str, Any]] | None:
    """Runs of whole Arrow files of a `datasets` folder (in the order of its state.json, as
    `datasets.load_from_disk` concatenates them) of at least `chunk` bytes."""
    state = Path(path) / "state.json"
    if not state.exists():
        return None  # a DatasetDict: its worker says to point at one split
    import pyarrow as pa

    files = [Path(path) / f["filename"] for f in json.loads(state.read_text())["_data_files"]]
    if len(files) < 2:
        return None
    pieces: list[dict[str, Any]] = []
    first, row, size, start = 0, 0, 0, 0
    for k, file in enumerate(files):
        with pa.memory_map(str(file)) as source:  # batches are mapped, not read
            row += sum(batch.num_rows for batch in pa.ipc.open_stream(source))
        size += file.stat().st_size
        if size >= chunk or k == len(files) - 1:
            pieces.append({"start": start, "end": start + size, "first_line": first + 1,
                           "rows": (first, row)})  # fmt: skip
            first, start, size = row, start + size, 0
    return pieces if row else None


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


def records(
    unit: dict[str, Any], read: Callable[[dict[str, Any]], bytes] = read_unit
) -> Iterator[sources.Parsed]:
    """(line, record | Reject) for one unit, with line numbers of the whole file.

    Args:
        unit: From `plan_units`.
        read: Reads a unit's bytes (`read_unit`; tests read from memory).
    """
    path, fmt, first = unit["path"], unit["fmt"], unit["first_line"]
    if fmt == "hf":
        yield from read_hf_dataset(path, path, unit.get("rows"))
        return
    if fmt == "parquet" and not _strip_query(path).endswith(".gz"):
        fs, p = filesystem(path)
        with fs.open_input_file(p) as f:  # only the footer and the unit's row groups are read
            yield from sources.read_parquet(f, path, unit.get("row_groups"))
        return
    data = read(unit)
    if unit["whole"]:
        yield from parse_bytes(data, path, fmt)
    elif fmt == "json":
        yield from sources.parse_json_elements(data, path, first)
    elif fmt == "conll":
        yield from sources.parse_conll(data, path, first)
    elif fmt == "jsonl":
        yield from sources.parse_jsonl(data, path, first)
    else:  # csv, tsv: the header row, then the range's rows
        header = b""
        if unit["start"] > 0:
            header = read({**unit, "start": 0, "end": unit["header_end"], "data": None})
        shift = first - 1 - _line_breaks(header)
        for line, rec in sources.parse_delimited(header + data, path, fmt, unit["literal"]):
            if isinstance(rec, Reject):
                rec = Reject(rec.source, line + shift, rec.reason)
            yield line + shift, rec

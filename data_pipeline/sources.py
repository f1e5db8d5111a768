"""Parse raw source files into records, keeping where each record came from.

Every parser yields ``(line, record)`` or ``(line, Reject)`` pairs so that one bad line never
costs the rest of the file, and every dropped record can be reported with its position:

* json, jsonl, csv, tsv, conll: the 1-based line on which the record starts;
* a JSON array: the element's index + 1; Parquet and ``datasets`` folders: the row index + 1;
* SQuAD JSON (detected by its layout) is flattened to one record per question, numbered 1..n;
* ``0`` when the whole file is unusable (corrupt gzip or Parquet, a JSON document that does not
  hold a list of objects); a malformed JSON document is reported at the line of the error.

Pure functions of the input bytes: the Ray Data job reads the files and calls ``parse_bytes``.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import re
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

FORMATS = ("json", "jsonl", "csv", "tsv", "parquet", "conll", "hf")

_EXTENSIONS = {
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".conll": "conll",
}
# The CoNLL-2003 distribution names its files eng.train / eng.testa / eng.testb (deu.* too).
_CONLL_NAME = re.compile(r"^(eng|deu|esp|ned)\.(train|testa|testb)$")
# Marker files of a `datasets` save_to_disk folder (a Dataset or a DatasetDict).
_HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_GZIP_MAGIC = b"\x1f\x8b"
_BOM = "\ufeff"
_CONLL_COLUMNS = ("tokens", "pos", "chunk", "ner_tags")


@dataclass(frozen=True)
class Reject:
    """A record that could not be read, with enough context to find it in its file.

    Attributes:
        source: The source path (or name) the record came from.
        line: 1-based line, element or row number (see the module docstring); 0 means the
            whole file.
        reason: Human-readable cause, e.g. ``"malformed JSON: Expecting ',' delimiter (col 17)"``.
    """

    source: str
    line: int
    reason: str


Parsed = tuple[int, dict[str, Any] | Reject]


def detect_format(path: str) -> str:
    """Guess a source's format from its path.

    A trailing ``.gz`` is ignored (``train.jsonl.gz`` is jsonl). A local folder written by
    ``datasets.Dataset.save_to_disk`` is ``"hf"``.

    Args:
        path: Local path or URI of the source.

    Returns:
        One of ``FORMATS``.

    Raises:
        ValueError: If the extension is not one this module reads.
    """
    stripped = path.rstrip("/")
    if os.path.isdir(stripped):
        if any(os.path.exists(os.path.join(stripped, m)) for m in _HF_MARKERS):
            return "hf"
        raise ValueError(
            f"{path}: a folder that is not a `datasets` save_to_disk folder "
            f"(none of {', '.join(_HF_MARKERS)} found)"
        )
    name = os.path.basename(stripped)
    if name.lower().endswith(".gz"):
        name = name[:-3]
    if _CONLL_NAME.match(name):
        return "conll"
    ext = os.path.splitext(name)[1].lower()
    if ext in _EXTENSIONS:
        return _EXTENSIONS[ext]
    known = ", ".join(sorted(_EXTENSIONS))
    raise ValueError(
        f"{path}: cannot tell the format from the extension {ext or '(none)'!r}; "
        f"known: {known} (optionally .gz), or a `datasets` save_to_disk folder"
    )


def parse_bytes(data: bytes, source: str, fmt: str) -> Iterator[Parsed]:
    """Parse one file's bytes into records.

    Gzipped data (by its magic bytes) is decompressed first. Lines that are not valid UTF-8,
    malformed JSON lines, rows with the wrong number of fields and similar problems become
    ``Reject`` items; every other record is still yielded.

    Args:
        data: The raw file content.
        source: Name used in ``Reject.source`` (normally the path).
        fmt: One of ``FORMATS`` except ``"hf"`` (see ``read_hf_dataset``).

    Yields:
        ``(line, record)`` for good records, ``(line, Reject)`` for bad ones, in file order.

    Raises:
        ValueError: For an unknown format or ``"hf"``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if fmt == "hf":
        raise ValueError("a `datasets` folder is not a byte stream: use read_hf_dataset()")
    if data[:2] == _GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            yield 0, Reject(source, 0, f"corrupt gzip data: {exc}")
            return
    if fmt == "jsonl":
        yield from parse_jsonl(data, source)
    elif fmt == "json":
        yield from _parse_json(data, source)
    elif fmt == "csv":
        yield from _parse_delimited(data, source, ",")
    elif fmt == "tsv":
        yield from _parse_delimited(data, source, "\t")
    elif fmt == "conll":
        yield from parse_conll(data, source)
    else:
        yield from _parse_parquet(data, source)


def read_hf_dataset(
    path: str, source: str, rows: tuple[int, int] | None = None
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Read a folder written by ``datasets.Dataset.save_to_disk``.

    Args:
        path: The folder of one split (for a ``DatasetDict`` folder, point at ``path/<split>``).
        source: Name used in error messages.
        rows: Only rows ``[start, stop)`` of the whole dataset (the rows of some of its Arrow
            files); the folder's files are memory mapped, so the others are never read.

    Yields:
        ``(row index + 1, row)`` pairs, indices counted over the whole dataset.

    Raises:
        ValueError: If the folder holds a ``DatasetDict`` rather than a single split.
    """
    import datasets  # lazy: a heavy import that only this format needs

    loaded = datasets.load_from_disk(path)
    if isinstance(loaded, datasets.DatasetDict):
        splits = ", ".join(sorted(loaded))
        raise ValueError(
            f"{source}: a DatasetDict with splits [{splits}]; point the source at one split "
            f"folder, e.g. {path.rstrip('/')}/{next(iter(sorted(loaded)), 'train')}"
        )
    start = 0
    if rows is not None:
        start = rows[0]
        loaded = loaded.select(range(*rows))  # contiguous: a slice of the table, no copy
    for index, row in enumerate(loaded, start + 1):
        yield index, dict(row)


# --- helpers -------------------------------------------------------------------------------


def _utf8_reason(exc: UnicodeDecodeError, offset: int = 0) -> str:
    bad = exc.object[exc.start : exc.start + 1].hex()
    return f"not valid UTF-8: byte 0x{bad} at col {exc.start - offset + 1}"


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    return names.get(type(value), "a number")


def parse_jsonl(data: bytes, source: str, first_line: int = 1) -> Iterator[Parsed]:
    """JSON Lines records, one object per line.

    Args:
        data: The file, or a range of it cut at a newline.
        source: Name used in ``Reject.source``.
        first_line: The file's line number of `data`'s first line (a BOM is stripped on
            line 1 only).

    Yields:
        ``(line, record)`` or ``(line, Reject)``; blank lines are skipped.
    """
    for lineno, raw in enumerate(data.split(b"\n"), first_line):
        if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        raw = raw.strip()
        if not raw:
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield lineno, Reject(source, lineno, _utf8_reason(exc))
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            yield lineno, Reject(source, lineno, f"malformed JSON: {exc.msg} (col {exc.colno})")
            continue
        if not isinstance(obj, dict):
            yield lineno, Reject(source, lineno, f"expected a JSON object, got {_json_type(obj)}")
            continue
        yield lineno, obj


def _parse_json(data: bytes, source: str) -> Iterator[Parsed]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        col_offset = data.rfind(b"\n", 0, exc.start) + 1
        yield line, Reject(source, line, _utf8_reason(exc, col_offset))
        return
    text = text.removeprefix(_BOM)
    try:
        if _FIRST_JSON_CHAR.match(text) is not None:
            # A top-level array: check it whole, then decode it again an element at a time,
            # so that a worker never holds every record of a big file at once.
            for _ in _array_items(text):
                pass
            doc: Any = _array_items(text)
        else:
            doc = json.loads(text)
    except json.JSONDecodeError as exc:
        yield exc.lineno, Reject(source, exc.lineno, f"malformed JSON: {exc.msg} (col {exc.colno})")
        return
    if _is_squad(doc):
        try:
            yield from enumerate(squad_records(doc), 1)
        except ValueError as exc:
            yield 0, Reject(source, 0, f"malformed SQuAD JSON: {exc}")
        return
    if isinstance(doc, dict):
        # A wrapper such as {"data": [...]} or {"version": "1.1", "data": [...]}.
        lists = [key for key, value in doc.items() if isinstance(value, list)]
        if len(lists) != 1:
            yield (
                0,
                Reject(
                    source,
                    0,
                    "expected a JSON array of objects or an object holding exactly one list; "
                    f"got an object with {len(lists)} list fields",
                ),
            )
            return
        doc = doc[lists[0]]
    elif not isinstance(doc, list | Iterator):
        yield 0, Reject(source, 0, f"expected a JSON array of objects, got {_json_type(doc)}")
        return
    yield from _elements(doc, source, 1)


def _elements(items: Iterable[Any], source: str, first_index: int) -> Iterator[Parsed]:
    for index, item in enumerate(items, first_index):
        if isinstance(item, dict):
            yield index, item
        else:
            yield (
                index,
                Reject(
                    source, index, f"array element {index} is {_json_type(item)}, not an object"
                ),
            )


def parse_json_elements(data: bytes, source: str, first_index: int) -> Iterator[Parsed]:
    """Records of a range of a top-level JSON array's elements, numbered as in the whole file.

    The ranges are cut by ``inputs.json_array_cuts``, which checked that the whole file is a
    valid array (a malformed one goes whole to ``parse_bytes``, which reports it).

    Args:
        data: Whole elements: the first range from just after the array's ``[``; a later
            one from just after the previous range's last element, so starting with the
            ``,`` before its own first element; the last range up to the closing ``]``.
        source: Name used in ``Reject.source``.
        first_index: The 1-based index of the range's first element in the whole array.

    Yields:
        ``(element index, record)`` or ``(element index, Reject)``, as ``parse_bytes`` gives
        them for the whole file.
    """
    text = data.decode("utf-8")
    if first_index > 1:
        text = text.lstrip(_JSON_SPACE).removeprefix(",")
    try:
        yield from _elements(_array_items("[" + text + "]"), source, first_index)
    except json.JSONDecodeError as exc:  # only if the file changed since it was cut
        yield 0, Reject(source, 0, f"malformed JSON in elements from {first_index}: {exc}")


_JSON_SPACE = " \t\n\r"
_FIRST_JSON_CHAR = re.compile(r"[ \t\n\r]*\[")  # a top-level array (no copy of the text)
_DECODER = json.JSONDecoder()


def _array_items(text: str) -> Iterator[Any]:
    """The elements of the JSON array `text`, decoded one by one; a malformed text raises the
    JSONDecodeError (message and position) that `json.loads(text)` raises."""

    def skip(i: int) -> int:
        while i < len(text) and text[i] in _JSON_SPACE:
            i += 1
        return i

    i = skip(skip(0) + 1)  # past "["
    if i < len(text) and text[i] == "]":
        i += 1
    else:
        while True:
            item, i = _DECODER.raw_decode(text, i)
            yield item
            i = skip(i)
            if i < len(text) and text[i] == ",":
                i = skip(i + 1)
                continue
            if i < len(text) and text[i] == "]":
                i += 1
                break
            raise json.JSONDecodeError("Expecting ',' delimiter", text, i)
    if skip(i) != len(text):
        raise json.JSONDecodeError("Extra data", text, skip(i))


def _is_squad(doc: Any) -> bool:
    data = doc.get("data") if isinstance(doc, dict) else None
    return (
        isinstance(data, list)
        and bool(data)
        and isinstance(data[0], dict)
        and ("paragraphs" in data[0])
    )


def squad_records(squad_json: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Flatten official SQuAD JSON into one record per question.

    ``parse_bytes`` applies it to any JSON document with the SQuAD layout, numbering the
    records by question (1-based).

    Args:
        squad_json: ``{"data": [{"title", "paragraphs": [{"context", "qas": [...]}]}]}``.

    Yields:
        ``{"id", "title", "context", "question", "answers"}`` with ``answers`` in the
        Hugging Face layout ``{"text": [...], "answer_start": [...]}``.

    Raises:
        ValueError: If the document does not have the SQuAD structure.
    """
    articles = squad_json.get("data") if isinstance(squad_json, dict) else None
    if not isinstance(articles, list):
        raise ValueError("expected an object with a 'data' list")
    for a, article in enumerate(articles):
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            raise ValueError(f"data[{a}] has no 'paragraphs' list")
        for p, paragraph in enumerate(paragraphs):
            where = f"data[{a}].paragraphs[{p}]"
            if not isinstance(paragraph, dict) or not isinstance(paragraph.get("context"), str):
                raise ValueError(f"{where} has no 'context' text")
            for q, qa in enumerate(paragraph.get("qas", [])):
                if not isinstance(qa, dict) or not isinstance(qa.get("question"), str):
                    raise ValueError(f"{where}.qas[{q}] has no 'question' text")
                answers = [x for x in qa.get("answers", []) if isinstance(x, dict)]
                yield {
                    "id": str(qa.get("id", "")),
                    "title": str(article.get("title", "")),
                    "context": paragraph["context"],
                    "question": qa["question"],
                    "answers": {
                        "text": [str(x.get("text", "")) for x in answers],
                        "answer_start": [int(x.get("answer_start", -1)) for x in answers],
                    },
                }


_SURROGATE = re.compile("[\udc80-\udcff]")


def _bad_utf8_field(fields: list[str]) -> str | None:
    # Text was decoded with surrogateescape: each undecodable byte became a lone surrogate.
    # One regex scan per field: a Python loop over every character was the parser's hot spot.
    for field in fields:
        if found := _SURROGATE.search(field):
            return f"not valid UTF-8: byte 0x{ord(found.group()) - 0xDC00:02x}"
    return None


def _delimited_rows(text: str, delimiter: str, literal: bool) -> list[tuple[int, list[str] | str]]:
    """Split text into (start line, fields) rows, or (line, csv error message).

    ``literal`` turns quote handling off: a quote character is then just text.
    """
    if "\r" not in text and "\0" not in text and (literal or '"' not in text):
        # No quotes, carriage returns or NULs: the csv module's rows are then exactly the
        # lines cut at the delimiter, which this gets several times faster.
        plain: list[tuple[int, list[str] | str]] = []
        for number, line in enumerate(text.split("\n"), 1):
            if not line or line.isspace():
                continue
            fields = line.split(delimiter)
            if fields[0].strip() or any(field.strip() for field in fields):
                plain.append((number, fields))
        return plain
    return list(_reader_rows(io.StringIO(text, newline=""), delimiter, literal))


def _reader_rows(
    lines: Iterable[str], delimiter: str, literal: bool
) -> Iterator[tuple[int, list[str] | str]]:
    """`_delimited_rows` by the csv module, from lines as ``io.StringIO(text, newline="")``
    gives them (ends kept; cut after ``\n``, ``\r\n`` or a lone ``\r``)."""
    previous_limit = csv.field_size_limit(2**31 - 1)  # news articles exceed the 128 KiB default
    try:
        if literal:
            reader = csv.reader(lines, delimiter=delimiter, quoting=csv.QUOTE_NONE)
        else:
            reader = csv.reader(lines, delimiter=delimiter)
        while True:
            start = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                yield start, f"unreadable row: {exc}"
                if reader.line_num < start:  # no progress: stop rather than loop forever
                    break
                continue
            if any(field.strip() for field in row):
                yield start, row
    finally:
        csv.field_size_limit(previous_limit)


def _delimited_records(
    text: str, source: str, delimiter: str, literal: bool
) -> list[tuple[int, dict[str, Any] | Reject]]:
    rows = _delimited_rows(text, delimiter, literal)
    # One scan when the whole text is clean.
    return list(_row_records(rows, source, check_utf8=_SURROGATE.search(text) is not None))


def _row_records(
    rows: Iterable[tuple[int, list[str] | str]], source: str, check_utf8: bool
) -> Iterator[tuple[int, dict[str, Any] | Reject]]:
    """The first row is the header; each other row a record or a Reject."""
    rows = iter(rows)
    first = next(rows, None)
    if first is None:
        return
    header_line, header = first
    if isinstance(header, str):
        yield header_line, Reject(source, header_line, f"header: {header}")
        return
    header = [name.strip() for name in header]
    problem = _bad_utf8_field(header)
    duplicates = sorted({name for name in header if header.count(name) > 1})
    if duplicates:
        problem = f"duplicate column names in header: {duplicates}"
    if problem:
        yield header_line, Reject(source, header_line, f"header: {problem}")
        return
    for line, row in rows:
        if isinstance(row, str):
            yield line, Reject(source, line, row)
        elif len(row) != len(header):
            reason = f"expected {len(header)} fields, got {len(row)}"
            yield line, Reject(source, line, reason)
        elif check_utf8 and (bad := _bad_utf8_field(row)) is not None:
            yield line, Reject(source, line, bad)
        else:
            yield line, dict(zip(header, row, strict=True))


def _parse_delimited(data: bytes, source: str, delimiter: str) -> Iterator[Parsed]:
    text = data.decode("utf-8", errors="surrogateescape").removeprefix(_BOM)
    records = _delimited_records(text, source, delimiter, literal=False)
    if delimiter == "\t":
        # TSV comes both Excel-quoted (amazon_alexa.tsv: "...""smart""...") and unquoted with
        # stray quote characters in the text. Quote-aware parsing is right for the first; for
        # the second an unbalanced quote swallows the following lines into one bad row. Use
        # the literal reading when it rejects fewer rows. (A TSV cut into ranges gets this
        # choice from `literal_tsv`, made over the whole file.)
        bad = sum(isinstance(r, Reject) for _, r in records)
        if bad:
            literal = _delimited_records(text, source, delimiter, literal=True)
            if sum(isinstance(r, Reject) for _, r in literal) < bad:
                records = literal
    yield from records


_DELIMITERS = {"csv": ",", "tsv": "\t"}


def parse_delimited(data: bytes, source: str, fmt: str, literal: bool) -> Iterator[Parsed]:
    """CSV or TSV records of a range of rows, in one reading chosen for the whole file.

    Args:
        data: The file's bytes up to and including its header row, then the range's rows
            (both cut at row ends: see ``inputs.delimited_cuts``).
        source: Name used in ``Reject.source``.
        fmt: ``"csv"`` or ``"tsv"``.
        literal: Quote characters are plain text (TSV only: see ``literal_tsv``).

    Yields:
        ``(line, record)`` or ``(line, Reject)``, lines counted from the start of `data`.
    """
    text = data.decode("utf-8", errors="surrogateescape").removeprefix(_BOM)
    yield from _delimited_records(text, source, _DELIMITERS[fmt], literal)


def delimited_header(prefix: bytes, fmt: str, literal: bool) -> bool | None:
    """Whether `prefix` (a file's start, cut at a row end) holds exactly its header row.

    Returns:
        None while it holds only blank rows; True when it holds one row and that is a valid
        header, so that it can be put in front of any range of the file's rows; False
        otherwise (a bad header rejects the whole file: it is not cut).
    """
    text = prefix.decode("utf-8", errors="surrogateescape").removeprefix(_BOM)
    rows = len(_delimited_rows(text, _DELIMITERS[fmt], literal))
    if rows == 0:
        return None
    return rows == 1 and not _delimited_records(text, "", _DELIMITERS[fmt], literal)


def literal_tsv(lines: Callable[[], Iterable[str]]) -> bool:
    """Whether ``parse_bytes`` reads this whole TSV file literally (quotes as text).

    It does when the literal reading rejects fewer rows than the quote-aware one. Counted a
    row at a time, so that a big file is never held whole.

    Args:
        lines: Opens the file's text afresh (decoded with ``surrogateescape``, the BOM
            removed) as lines cut as ``io.StringIO(text, newline="")`` cuts them.
    """

    def rejects(literal: bool) -> int:
        rows = _reader_rows(lines(), "\t", literal)
        return sum(isinstance(r, Reject) for _, r in _row_records(rows, "", check_utf8=True))

    quoted = rejects(False)
    return quoted > 0 and rejects(True) < quoted


def _iob1_to_iob2(tags: list[str]) -> list[str]:
    """IOB1 starts an entity with I- unless it touches one of the same type; IOB2 always B-."""
    out = []
    previous = "O"
    for tag in tags:
        if tag.startswith("I-") and previous[2:] != tag[2:]:
            tag = "B-" + tag[2:]
        out.append(tag)
        previous = tag
    return out


def parse_conll(data: bytes, source: str, first_line: int = 1) -> Iterator[Parsed]:
    """CoNLL-2003 sentences: one record per sentence, at the line of its first token.

    Args:
        data: The file, or a range of it that starts after a sentence boundary (a blank or
            ``-DOCSTART-`` line: see ``inputs.conll_cuts``).
        source: Name used in ``Reject.source``.
        first_line: The file's line number of `data`'s first line.

    Yields:
        ``(line, record)`` or ``(line, Reject)``; a sentence with a bad line is one Reject.
    """
    sentence: list[list[str]] = []
    start = 0
    problem: Reject | None = None

    def flush() -> Iterator[Parsed]:
        if problem is not None:
            yield problem.line, problem
        elif sentence:
            record: dict[str, Any] = {
                name: [cols[i] for cols in sentence] for i, name in enumerate(_CONLL_COLUMNS)
            }
            record["ner_iob2"] = _iob1_to_iob2(record["ner_tags"])
            yield start, record

    for lineno, raw in enumerate(data.split(b"\n"), first_line):
        if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        stripped = raw.strip()
        if not stripped or stripped.startswith(b"-DOCSTART-"):
            yield from flush()
            sentence, problem = [], None
            continue
        if not sentence and problem is None:
            start = lineno
        if problem is not None:
            continue  # the sentence is already rejected; skip to its end
        try:
            cols = stripped.decode("utf-8").split()
        except UnicodeDecodeError as exc:
            problem = Reject(source, lineno, _utf8_reason(exc) + " (sentence dropped)")
            continue
        if len(cols) != len(_CONLL_COLUMNS):
            problem = Reject(
                source,
                lineno,
                f"expected {len(_CONLL_COLUMNS)} columns (word POS chunk NER), got {len(cols)}"
                " (sentence dropped)",
            )
            continue
        tag = cols[3]
        if tag != "O" and not (tag[:2] in ("B-", "I-") and len(tag) > 2):
            problem = Reject(source, lineno, f"bad NER tag {tag!r} (sentence dropped)")
            continue
        sentence.append(cols)
    yield from flush()


def _parse_parquet(data: bytes, source: str) -> Iterator[Parsed]:
    yield from read_parquet(io.BytesIO(data), source)


def read_parquet(
    file: Any, source: str, row_groups: tuple[int, int] | None = None
) -> Iterator[Parsed]:
    """Rows of a Parquet file, a row group at a time; a row group that cannot be read is one
    Reject (at its first row), and the rows of the others are still read.

    Args:
        file: The open file (any file object pyarrow reads with random access: only the
            footer and the row groups read are fetched).
        source: Name used in ``Reject.source``.
        row_groups: Only row groups ``[first, stop)``.

    Yields:
        ``(row index + 1, row)`` or ``(row index + 1, Reject)``, rows counted over the
        whole file; ``(0, Reject)`` when the file cannot be opened at all.
    """
    import pyarrow.parquet as pq  # lazy: only this format needs it

    try:
        parquet = pq.ParquetFile(file)
        meta = parquet.metadata
        first, stop = row_groups or (0, meta.num_row_groups)
        index = sum(meta.row_group(g).num_rows for g in range(first))
    except Exception as exc:  # pyarrow raises several types for a damaged file
        yield 0, Reject(source, 0, f"unreadable Parquet: {exc}")
        return
    for group in range(first, stop):
        rows = meta.row_group(group).num_rows
        try:
            table = parquet.read_row_group(group)
        except Exception as exc:
            where = f"row group {group} (rows {index + 1}-{index + rows})"
            reason = f"unreadable Parquet {where}: {exc}"
            yield index + 1, Reject(source, index + 1, reason)
            index += rows
            continue
        for batch in table.to_batches(max_chunksize=4096):
            for row in batch.to_pylist():
                index += 1
                yield index, row
        del table

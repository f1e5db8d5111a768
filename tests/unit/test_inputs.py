"""Files cut into ranges (`inputs`): parsing the ranges one by one must give exactly what
parsing the whole file gives (records, order, line numbers, rejects), for every format."""

from __future__ import annotations

import gzip
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_pipeline import inputs
from data_pipeline.sources import Reject, parse_bytes, read_hf_dataset

DATA = Path(__file__).resolve().parents[1] / "assets" / "data"


def blocks_of(data: bytes, size: int) -> Iterator[bytes]:
    return iter([data[i : i + size] for i in range(0, len(data), size)])


def ranged(data: bytes, fmt: str, chunk: int, block: int = 1 << 20) -> tuple[int, list[Any]]:
    """(number of ranges, what their records give one after the other); a file that is not
    cut is parsed whole, as `plan_units` leaves it."""
    pieces = inputs.cut_stream(lambda: blocks_of(data, block), fmt, chunk)
    if not pieces or len(pieces) == 1:
        return 1, list(parse_bytes(data, "x", fmt))
    assert [p["start"] for p in pieces[1:]] == [p["end"] for p in pieces[:-1]]  # contiguous
    out: list[Any] = []
    for piece in pieces:
        unit = {"path": "x", "fmt": fmt, "whole": False, "gz": False, **piece}
        out += inputs.records(unit, read=lambda u: data[u["start"] : u["end"]])
    return len(pieces), out


def assert_same_as_whole(data: bytes, fmt: str, chunk: int, block: int) -> int:
    n, got = ranged(data, fmt, chunk, block)
    assert got == list(parse_bytes(data, "x", fmt)), (data, chunk, block)
    return n


# --- the real samples, cut small ------------------------------------------------------------


@pytest.mark.parametrize(
    ("relative", "fmt", "min_ranges"),
    [
        ("sst2/train.tsv", "tsv", 50),
        ("amazon_reviews/amazon_alexa.tsv", "tsv", 20),  # Excel-quoted, CRLF, BOM
        ("instruction/alpaca_en_demo.json", "json", 50),
        ("conll2003/eng.testa", "conll", 3),
        ("instruction/v1_sft_demo.jsonl", "jsonl", 20),
        ("squad/xquad.en.json", "json", 1),  # an object: whole
        ("bad/embedded_newlines.csv", "csv", 2),
        ("bad/stray_quotes.tsv", "tsv", 2),
        ("bad/bad.conll", "conll", 2),
        ("bad/broken.json", "json", 1),  # malformed: whole, one reject at its error
        ("bad/alpaca_bad.jsonl", "jsonl", 2),
    ],
)
def test_samples_cut_into_ranges_parse_as_the_whole_file(
    relative: str, fmt: str, min_ranges: int
) -> None:
    data = (DATA / relative).read_bytes()
    counts = [
        assert_same_as_whole(data, fmt, chunk, block)
        for chunk in (1, 60, 2000)
        for block in (7, 1 << 20)
    ]
    assert max(counts) >= min_ranges


def test_csv_quoted_newlines_are_never_cut() -> None:
    rows = [b"id,text\n"] + [
        b'%d,"line one\nline ""two"", still\r\nthree"\n' % i for i in range(50)
    ]
    data = b"".join(rows)
    ranges, quoted = inputs.delimited_cuts(blocks_of(data, 5), b",", 1)
    assert quoted and len(ranges) == 51  # one per row: never inside a field
    assert [line for _, _, line in ranges] == [1] + [2 + 3 * i for i in range(50)]
    assert assert_same_as_whole(data, "csv", 100, 13) > 5


def test_tsv_reading_is_chosen_over_the_whole_file() -> None:
    """`parse_bytes` reads a TSV literally when that rejects fewer rows over the whole file;
    each range must be read so too, even one whose own rows read better quoted."""
    # Quoted: 2 fields (good), literally 3 (a reject). Then rows that read quoted as 1 field
    # (a reject) and literally as 2: the literal reading wins, 1 reject against 3.
    data = b'text\tlabel\n"c\td"\t1\n' + b"x\t0\n" * 30 + b'"a\tb"\n' * 3
    whole = list(parse_bytes(data, "x", "tsv"))
    assert [line for line, r in whole if isinstance(r, Reject)] == [2]
    assert list(parse_bytes(data[:40], "x", "tsv"))[0] == (2, {"text": "c\td", "label": "1"})
    assert assert_same_as_whole(data, "tsv", 20, 8) > 5


def test_empty_and_tiny_files_stay_whole() -> None:
    for fmt in inputs.STREAM_FORMATS:
        assert not inputs.cut_stream(lambda: iter([]), fmt, 1)
        assert_same_as_whole(b"\n", fmt, 1, 1)
    assert inputs.cut_stream(lambda: iter([b"\x1f\x8b", b"\n\n\n"]), "jsonl", 1) is None


# --- property tests on random texts ---------------------------------------------------------

_DELIMITED = [b"a", b"bc", b" ", b",", b"\t", b'"', b'""', b"\n", b"\n", b"\r\n", b"\r"]
_DELIMITED += ["é".encode(), b"\xff", b"\xef\xbb\xbf", b"\x00"]


@settings(max_examples=300, deadline=None)
@given(
    head=st.sampled_from([b"", b"\xef\xbb\xbf", b"\n \n", b'"h,1"\t']),
    header=st.sampled_from([b"h1,h2\n", b"h1\th2\n", b"h\n", b'"h\n1",h2\n', b"h,h\n"]),
    body=st.lists(st.sampled_from(_DELIMITED), max_size=80),
    fmt=st.sampled_from(["csv", "tsv"]),
    chunk=st.integers(1, 30),
    block=st.integers(1, 40),
)
def test_delimited_ranges_equal_the_whole_file(
    head: bytes, header: bytes, body: list[bytes], fmt: str, chunk: int, block: int
) -> None:
    assert_same_as_whole(head + header + b"".join(body), fmt, chunk, block)


_STRINGS = st.text(alphabet=st.sampled_from(list('ab"\\[]{},:\n\t é\u2028\x00')), max_size=8)
_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=False) | _STRINGS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_STRINGS, inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=100, deadline=None)
@given(
    items=st.lists(st.dictionaries(_STRINGS, _VALUES, max_size=3) | _VALUES, max_size=12),
    indent=st.sampled_from([None, 0, 2]),
    ascii_only=st.booleans(),
    damage=st.sampled_from(["", "cut", "insert", "trail", "bom", "lead"]),
    where=st.integers(0, 10**6),
    junk=st.sampled_from([b",", b"]", b"}", b"x", b'"', b"\\", b"\xff", b" "]),
    chunk=st.integers(1, 60),
    block=st.integers(1, 50),
)
def test_json_array_ranges_equal_the_whole_file(
    items: list[Any],
    indent: int | None,
    ascii_only: bool,
    damage: str,
    where: int,
    junk: bytes,
    chunk: int,
    block: int,
) -> None:
    data = json.dumps(items, indent=indent, ensure_ascii=ascii_only).encode()
    at = where % (len(data) + 1)
    if damage == "cut":
        data = data[:at]
    elif damage == "insert":
        data = data[:at] + junk + data[at:]
    elif damage == "trail":
        data += b"\n" + junk
    elif damage == "bom":
        data = b"\xef\xbb\xbf \n" + data
    elif damage == "lead":
        data = junk + data
    assert_same_as_whole(data, "json", chunk, block)


_CONLL = [
    b"EU NNP B-NP B-ORG",
    b"rejects VBZ B-VP O",
    b"German JJ B-NP I-MISC",
    b"",
    b"  ",
    b"-DOCSTART- -X- O O",
    b" -DOCSTART- -X- O O",
    b"two cols",
    b"x X X Q-BAD",
    b"caf\xe9 NN B-NP O",
    b"\xef\xbb\xbfBOM NN B-NP O",
    b"a b c O\r",
]


@settings(max_examples=200, deadline=None)
@given(
    lines=st.lists(st.sampled_from(_CONLL), max_size=40),
    end=st.sampled_from([b"", b"\n"]),
    chunk=st.integers(1, 80),
    block=st.integers(1, 40),
)
def test_conll_ranges_equal_the_whole_file(
    lines: list[bytes], end: bytes, chunk: int, block: int
) -> None:
    assert_same_as_whole(b"\n".join(lines) + end, "conll", chunk, block)


_JSONL = [b'{"a": 1}', b"", b"  ", b"[1]", b'{"a": ', b"\xff", b'\xef\xbb\xbf{"b": 2}', b"\r"]


@settings(max_examples=100, deadline=None)
@given(
    lines=st.lists(st.sampled_from(_JSONL), max_size=30),
    chunk=st.integers(1, 40),
    block=st.integers(1, 30),
)
def test_jsonl_ranges_equal_the_whole_file(lines: list[bytes], chunk: int, block: int) -> None:
    assert_same_as_whole(b"\n".join(lines), "jsonl", chunk, block)


# --- Parquet by row group, `datasets` folders by Arrow file, .gz ranges -----------------------


def units_of(path: Path, fmt: str) -> list[dict[str, Any]]:
    return inputs.plan_units([[(str(path), fmt)]])


def unit_records(units: list[dict[str, Any]]) -> list[Any]:
    return [item for unit in units for item in inputs.records(unit)]


@pytest.fixture
def small_ranges(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inputs, "MIN_CHUNK_BYTES", 1)
    monkeypatch.setattr(inputs, "CHUNK_BYTES", 1)


def parquet_file(path: Path, rows: int = 50, group: int = 10) -> pa.Table:
    table = pa.table(
        {"sentence": [f"s{i} " * (i % 7) for i in range(rows)], "label": list(range(rows))}
    )
    pq.write_table(table, path, row_group_size=group)
    return table


def test_parquet_cut_by_row_group(tmp_path: Path, small_ranges: None) -> None:
    table = parquet_file(tmp_path / "p.parquet")
    units = units_of(tmp_path / "p.parquet", "parquet")
    assert [u["row_groups"] for u in units] == [(g, g + 1) for g in range(5)]
    assert [u["first_line"] for u in units] == [1, 11, 21, 31, 41]
    expected = list(enumerate(table.to_pylist(), 1))
    assert unit_records(units) == expected
    assert list(parse_bytes((tmp_path / "p.parquet").read_bytes(), "x", "parquet")) == expected


def corrupt_row_group(path: Path, group: int) -> None:
    """Overwrite the data pages of one row group (the footer stays readable)."""
    column = pq.ParquetFile(path).metadata.row_group(group).column(0)
    start = column.dictionary_page_offset or column.data_page_offset
    raw = bytearray(path.read_bytes())
    raw[start : start + column.total_compressed_size] = b"\xff" * column.total_compressed_size
    path.write_bytes(bytes(raw))


def test_corrupt_parquet_row_group_is_one_reject_and_the_rest_is_read(tmp_path: Path) -> None:
    path = tmp_path / "p.parquet"
    table = parquet_file(path)
    corrupt_row_group(path, 2)
    for units in (units_of(path, "parquet"), [{**units_of(path, "parquet")[0], "whole": True}]):
        got = unit_records(units)
        rejects = [(line, r) for line, r in got if isinstance(r, Reject)]
        assert len(rejects) == 1
        line, reject = rejects[0]
        assert line == reject.line == 21 and reject.source == str(path)
        assert reject.reason.startswith("unreadable Parquet row group 2 (rows 21-30)")
        rows = table.to_pylist()
        assert [item for item in got if not isinstance(item[1], Reject)] == [
            (i, rows[i - 1]) for i in range(1, 51) if not 21 <= i <= 30
        ]


def test_hf_folder_cut_by_arrow_file(tmp_path: Path, small_ranges: None) -> None:
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict(
        {"sentence": [f"s{i}" for i in range(30)], "label": [i % 2 for i in range(30)]}
    )
    ds.save_to_disk(str(tmp_path / "hf"), num_shards=3)
    units = units_of(tmp_path / "hf", "hf")
    assert [u["rows"] for u in units] == [(0, 10), (10, 20), (20, 30)]
    assert unit_records(units) == list(read_hf_dataset(str(tmp_path / "hf"), "x"))
    assert unit_records(units)[12] == (13, {"sentence": "s12", "label": 0})


def test_gz_csv_ranges_read_through_the_decompressed_stream(
    tmp_path: Path, small_ranges: None
) -> None:
    data = (DATA / "bad" / "embedded_newlines.csv").read_bytes() * 3
    (tmp_path / "e.csv").write_bytes(data)
    with gzip.open(tmp_path / "e.csv.gz", "wb") as f:
        f.write(data)
    plain, gz = units_of(tmp_path / "e.csv", "csv"), units_of(tmp_path / "e.csv.gz", "csv")
    assert len(plain) == len(gz) > 3 and all(u["gz"] for u in gz)
    assert unit_records(plain) == list(parse_bytes(data, str(tmp_path / "e.csv"), "csv"))
    assert unit_records(gz) == list(parse_bytes(data, str(tmp_path / "e.csv.gz"), "csv"))


def test_cut_depends_on_the_file_alone(tmp_path: Path) -> None:
    shutil.copy(DATA / "instruction" / "alpaca_en_demo.json", tmp_path / "a.json")
    first = units_of(tmp_path / "a.json", "json")
    assert len(first) > 1 and first == units_of(tmp_path / "a.json", "json")

"""Parsing raw files into records with provenance: real samples and deliberately broken ones."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline.sources import (
    FORMATS,
    Reject,
    detect_format,
    parse_bytes,
    read_hf_dataset,
    squad_records,
)

DATA = Path(__file__).resolve().parents[1] / "assets" / "data"


def parse_file(relative: str) -> list[tuple[int, dict | Reject]]:
    path = DATA / relative
    return list(parse_bytes(path.read_bytes(), relative, detect_format(str(path))))


def split_items(items: list[tuple[int, dict | Reject]]) -> tuple[list, list[Reject]]:
    good = [(line, rec) for line, rec in items if not isinstance(rec, Reject)]
    bad = [rec for _, rec in items if isinstance(rec, Reject)]
    return good, bad


# --- detect_format ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "fmt"),
    [
        ("data/train.jsonl", "jsonl"),
        ("data/train.jsonl.gz", "jsonl"),
        ("s3://bucket/x/alpaca.JSON", "json"),
        ("reviews.tsv.gz", "tsv"),
        ("a.csv", "csv"),
        ("part-0.parquet", "parquet"),
        ("ner.conll", "conll"),
        ("conll2003/eng.testa", "conll"),
        ("eng.train.gz", "conll"),
    ],
)
def test_detect_format_by_extension(path: str, fmt: str) -> None:
    assert detect_format(path) == fmt
    assert fmt in FORMATS


def test_detect_format_unknown_extension_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"\.txt.*known: .*\.jsonl"):
        detect_format("notes.txt")


def test_detect_format_hf_folder(tmp_path: Path) -> None:
    (tmp_path / "dataset_info.json").write_text("{}")
    assert detect_format(str(tmp_path)) == "hf"
    other = tmp_path / "plain"
    other.mkdir()
    with pytest.raises(ValueError, match="save_to_disk"):
        detect_format(str(other))


def test_parse_bytes_rejects_unknown_format_and_hf() -> None:
    with pytest.raises(ValueError, match="unknown format"):
        list(parse_bytes(b"", "x", "xml"))
    with pytest.raises(ValueError, match="read_hf_dataset"):
        list(parse_bytes(b"", "x", "hf"))


# --- real samples ----------------------------------------------------------------------------


def test_sst2_tsv() -> None:
    good, bad = split_items(parse_file("sst2/test.tsv"))
    assert bad == []
    assert len(good) == 299
    assert good[0] == (
        2,
        {"sentence": "it 's a charming and often affecting journey . ", "label": "1"},
    )
    assert [line for line, _ in good] == list(range(2, 301))
    lines = (DATA / "sst2/test.tsv").read_text().split("\n")
    for line, rec in good:
        assert lines[line - 1] == f"{rec['sentence']}\t{rec['label']}"
    train, bad = split_items(parse_file("sst2/train.tsv"))
    assert bad == [] and len(train) == 1999


def test_amazon_tsv_bom_crlf_and_excel_quoting() -> None:
    good, bad = split_items(parse_file("amazon_reviews/amazon_alexa.tsv"))
    assert bad == []
    assert len(good) == 299
    line, first = good[0]
    assert line == 2
    # The UTF-8 BOM is not part of the first column name, CRLF is not part of the last field.
    assert list(first) == ["rating", "date", "variation", "verified_reviews", "feedback"]
    assert first["feedback"] == "1"
    assert first["verified_reviews"] == "Love my Echo!"
    by_line = dict(good)
    # Excel-style quoting: surrounding quotes removed, "" unescaped.
    assert by_line[4]["verified_reviews"].startswith("Sometimes while playing a game, you can")
    assert not by_line[4]["verified_reviews"].startswith('"')
    doubled = [r["verified_reviews"] for r in by_line.values() if '"' in r["verified_reviews"]]
    assert all('""' not in text for text in doubled)
    # The real dirty data: empty reviews survive parsing (the template rejects them).
    assert [ln for ln, r in good if not r["verified_reviews"].strip()] == [87, 185, 221]


def test_alpaca_json_array() -> None:
    good, bad = split_items(parse_file("instruction/alpaca_en_demo.json"))
    assert bad == []
    assert [line for line, _ in good] == list(range(1, 201))
    assert good[0][1]["instruction"] == "Describe a process of making crepes."
    assert good[5][1]["input"] == "Side 1 = 4\nSide 2 = 6\nSide 3 = 8"


def test_chat_jsonl_line_numbers_match_the_file() -> None:
    good, bad = split_items(parse_file("instruction/v1_sft_demo.jsonl"))
    assert bad == []
    assert len(good) == 100
    lines = (DATA / "instruction/v1_sft_demo.jsonl").read_text().split("\n")
    for line, rec in good:
        assert json.loads(lines[line - 1]) == rec


def test_jsonl_formats_of_the_other_samples() -> None:
    wmt, bad = split_items(parse_file("wmt21/newstest2021.de-en.jsonl"))
    assert bad == [] and len(wmt) == 200
    assert wmt[0][1]["de"] == "Biker reagiert blitzschnell und verhindert Schlimmeres"
    cnn, bad = split_items(parse_file("cnn_dailymail/summeval.jsonl"))
    assert bad == [] and len(cnn) == 20
    assert set(cnn[0][1]) == {"id", "article", "highlights"}


def test_squad_json_is_flattened_per_question() -> None:
    good, bad = split_items(parse_file("squad/xquad.en.json"))
    assert bad == []
    assert len(good) == 74
    assert [line for line, _ in good] == list(range(1, 75))
    first = good[0][1]
    assert first["id"] == "56beb4343aeaaa14008c925b"
    assert first["question"] == "How many points did the Panthers defense surrender?"
    assert first["answers"] == {"text": ["308"], "answer_start": [34]}
    assert first["context"].startswith("The Panthers defense gave up just 308 points")
    # The same function is what parse_bytes used.
    doc = json.loads((DATA / "squad/xquad.en.json").read_text())
    assert [r for _, r in good] == list(squad_records(doc))


def test_squad_records_rejects_other_layouts() -> None:
    with pytest.raises(ValueError, match="'data' list"):
        list(squad_records({"version": "1.1"}))
    with pytest.raises(ValueError, match="question"):
        list(squad_records({"data": [{"paragraphs": [{"context": "c", "qas": [{"id": 1}]}]}]}))


def test_conll_sentences_iob2_and_docstart() -> None:
    good, bad = split_items(parse_file("conll2003/eng.testa"))
    assert bad == []
    text_lines = (DATA / "conll2003/eng.testa").read_text().split("\n")
    expected = sum(
        1
        for i, ln in enumerate(text_lines)
        if ln.strip() and not ln.startswith("-DOCSTART-") and (i == 0 or not text_lines[i - 1])
    )
    assert len(good) == expected == 16
    line, first = good[0]
    assert line == 1
    assert first["tokens"][:3] == ["CRICKET", "-", "LEICESTERSHIRE"]
    assert first["ner_tags"][2] == "I-ORG"  # IOB1 as in the file
    assert first["ner_iob2"][2] == "B-ORG"
    assert set(first) == {"tokens", "pos", "chunk", "ner_tags", "ner_iob2"}
    # Every record's line is the line of its first token.
    for line, rec in good:
        assert text_lines[line - 1].split()[0] == rec["tokens"][0]
        assert len(rec["tokens"]) == len(rec["pos"]) == len(rec["chunk"]) == len(rec["ner_tags"])
    assert all(tok != "-DOCSTART-" for _, rec in good for tok in rec["tokens"])
    west = next(rec for _, rec in good if rec["tokens"][:2] == ["West", "Indian"])
    assert west["ner_iob2"][:5] == ["B-MISC", "I-MISC", "O", "B-PER", "I-PER"]


def test_gzip_is_transparent() -> None:
    raw = (DATA / "instruction/v1_sft_demo.jsonl").read_bytes()
    assert list(parse_bytes(gzip.compress(raw), "x", "jsonl")) == list(
        parse_bytes(raw, "x", "jsonl")
    )
    [(line, reject)] = list(parse_bytes(b"\x1f\x8bnot gzip", "x.gz", "jsonl"))
    assert line == 0 and isinstance(reject, Reject)
    assert reject.reason.startswith("corrupt gzip data")


# --- deliberately broken inputs --------------------------------------------------------------


def test_bad_jsonl_keeps_every_good_line() -> None:
    items = parse_file("bad/alpaca_bad.jsonl")
    good, bad = split_items(items)
    assert [line for line, _ in good] == [1, 3, 7, 8, 9]
    assert [(r.line, r.reason) for r in bad] == [
        (2, "malformed JSON: Expecting ',' delimiter (col 56)"),
        (4, "not valid UTF-8: byte 0xe9 at col 27"),
        (6, "expected a JSON object, got an array"),
    ]
    assert all(r.source == "bad/alpaca_bad.jsonl" for r in bad)
    # Items come in file order with the yielded line equal to the Reject's line.
    assert [line for line, _ in items] == [1, 2, 3, 4, 6, 7, 8, 9]
    assert all(line == rec.line for line, rec in items if isinstance(rec, Reject))


def test_bad_csv_embedded_newlines_and_wrong_field_counts() -> None:
    good, bad = split_items(parse_file("bad/embedded_newlines.csv"))
    assert [line for line, _ in good] == [2, 7, 8, 9]
    assert good[0][1]["output"] == (
        "Soft rain on the roof\na quiet drum for the night\nmorning smells of earth"
    )
    assert good[1][1] == {
        "instruction": 'Quote the word "yes", with a comma.',
        "input": "",
        "output": '"yes", said she',
    }
    assert good[3][1]["output"] == "apple\nbanana"
    assert [(r.line, r.reason) for r in bad] == [
        (5, "expected 3 fields, got 4"),
        (6, "not valid UTF-8: byte 0xef"),
    ]


def test_malformed_json_document_is_one_reject_at_the_error() -> None:
    items = parse_file("bad/broken.json")
    assert items == [
        (3, Reject("bad/broken.json", 3, "malformed JSON: Expecting ',' delimiter (col 23)"))
    ]


def test_bad_conll_sentences_are_rejected_alone() -> None:
    good, bad = split_items(parse_file("bad/bad.conll"))
    assert [(line, rec["tokens"]) for line, rec in good] == [
        (3, ["EU", "rejects", "German", "call", "."]),
        (15, ["BRUSSELS", "1996-08-22"]),
    ]
    assert [(r.line, r.reason) for r in bad] == [
        (10, "expected 4 columns (word POS chunk NER), got 2 (sentence dropped)"),
        (12, "not valid UTF-8: byte 0xe9 at col 4 (sentence dropped)"),
        (19, "bad NER tag 'X-MISC' (sentence dropped)"),
    ]


def test_tsv_with_stray_quotes_reads_literally() -> None:
    good, bad = split_items(parse_file("bad/stray_quotes.tsv"))
    assert bad == []
    assert [(line, rec["sentence"]) for line, rec in good] == [
        (2, 'a "great" film . '),
        (3, '" unbalanced quote opens this line '),
        (4, "plain and simple . "),
        (5, "the end . "),
    ]


def test_json_wrappers_and_non_objects() -> None:
    wrapped = json.dumps({"data": [{"a": 1}, 5, {"a": 2}]}).encode()
    items = list(parse_bytes(wrapped, "w.json", "json"))
    assert items == [
        (1, {"a": 1}),
        (2, Reject("w.json", 2, "array element 2 is a number, not an object")),
        (3, {"a": 2}),
    ]
    assert list(parse_bytes(b'"text"', "s.json", "json")) == [
        (0, Reject("s.json", 0, "expected a JSON array of objects, got a string"))
    ]
    two_lists = json.dumps({"a": [], "b": []}).encode()
    [(line, reject)] = list(parse_bytes(two_lists, "t.json", "json"))
    assert line == 0 and isinstance(reject, Reject) and "2 list fields" in reject.reason
    bad_utf8 = b'[\n{"a": "caf\xe9"}\n]'
    assert list(parse_bytes(bad_utf8, "u.json", "json")) == [
        (2, Reject("u.json", 2, "not valid UTF-8: byte 0xe9 at col 11"))
    ]


def test_jsonl_blank_lines_bom_and_no_trailing_newline() -> None:
    data = b'\xef\xbb\xbf{"a": 1}\r\n\r\n   \n{"a": 2}'
    assert list(parse_bytes(data, "x", "jsonl")) == [(1, {"a": 1}), (4, {"a": 2})]


def test_csv_duplicate_header_is_rejected() -> None:
    assert list(parse_bytes(b"a,a\n1,2\n", "d.csv", "csv")) == [
        (1, Reject("d.csv", 1, "header: duplicate column names in header: ['a']"))
    ]


def test_parquet_rows_and_damaged_file() -> None:
    table = pa.table({"sentence": ["good", "bad"], "label": [1, 0]})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    assert list(parse_bytes(buffer.getvalue(), "p.parquet", "parquet")) == [
        (1, {"sentence": "good", "label": 1}),
        (2, {"sentence": "bad", "label": 0}),
    ]
    [(line, reject)] = list(parse_bytes(b"PAR1 not really", "p.parquet", "parquet"))
    assert line == 0 and isinstance(reject, Reject)
    assert reject.reason.startswith("unreadable Parquet")


def test_read_hf_dataset(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"sentence": ["a", "b", "c"], "label": [0, 1, 0]})
    ds.save_to_disk(str(tmp_path / "one"))
    assert detect_format(str(tmp_path / "one")) == "hf"
    rows = list(read_hf_dataset(str(tmp_path / "one"), "one"))
    assert rows == [
        (1, {"sentence": "a", "label": 0}),
        (2, {"sentence": "b", "label": 1}),
        (3, {"sentence": "c", "label": 0}),
    ]
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(ValueError, match=r"DatasetDict with splits \[train\]"):
        list(read_hf_dataset(str(tmp_path / "dict"), "dict"))
    assert list(read_hf_dataset(str(tmp_path / "dict" / "train"), "dict"))[0][0] == 1


def test_csv_fields_longer_than_the_csv_module_default_limit() -> None:
    article = "word " * 60_000  # 300 kB, over csv's 128 KiB default field limit
    data = f'article,highlights\n"{article}",short\n'.encode()
    [(line, rec)] = list(parse_bytes(data, "long.csv", "csv"))
    assert line == 2 and isinstance(rec, dict) and rec["article"] == article


def test_delimited_fast_path_equals_the_csv_module() -> None:
    """Text without quotes, carriage returns or NULs is cut into rows by str.split; the rows
    (line numbers, fields, blank rows skipped) must be exactly those of the csv module."""
    import csv
    import random

    from data_pipeline.sources import _delimited_rows

    def with_csv(text: str, delimiter: str, literal: bool) -> list[tuple[int, list[str]]]:
        quoting = csv.QUOTE_NONE if literal else csv.QUOTE_MINIMAL
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting)
        rows = []
        while True:
            start = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                return rows
            if any(field.strip() for field in row):
                rows.append((start, row))

    rng = random.Random(0)
    alphabet = ["a", "b", " ", "\t", ",", "\n", "\n\n", "é", "\udcff", "\v", "\x1c", "\xa0"]
    for _ in range(5000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        for delimiter in ("\t", ","):
            for literal in (False, True):
                assert _delimited_rows(text, delimiter, literal) == with_csv(
                    text, delimiter, literal
                ), (text, delimiter, literal)
    # Quoted fields still go through the csv module.
    assert _delimited_rows('a,b\n"x\ny",2\n', ",", False) == [(1, ["a", "b"]), (2, ["x\ny", "2"])]


def test_json_array_decoded_element_by_element_equals_json_loads() -> None:
    """A top-level JSON array is decoded one element at a time (a worker never holds every
    record of a big file); its elements, and for a malformed text the error message and
    position that end up in rejects.jsonl, must be json.loads's."""
    import random

    from data_pipeline.sources import _array_items

    rng = random.Random(0)
    pieces = ["[", "]", ",", " ", "\n", "1", '"a"', '{"x": 1}', "{", "}", "null", "x", "[1,2]"]
    pieces += ['"', "\r", ":", "2.5e3", "NaN", "\t"]
    compared = 0
    for _ in range(20000):
        text = (
            rng.choice(["", " ", "\n "]) + "[" + "".join(rng.choices(pieces, k=rng.randint(0, 8)))
        )
        try:
            expected: tuple[Any, ...] = ("ok", json.loads(text))
        except json.JSONDecodeError as e:
            expected = ("error", e.msg, e.pos)
        try:
            got: tuple[Any, ...] = ("ok", list(_array_items(text)))
        except json.JSONDecodeError as e:
            got = ("error", e.msg, e.pos)
        assert got == expected, text
        compared += expected[0] == "error"
    assert compared > 1000  # malformed texts were among them

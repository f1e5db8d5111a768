"""The prepare job on a real local Ray (and a simulated 2-node cluster), on the real samples.

Nothing is mocked: real Ray tasks, the real stories260K tokenizer, the real files under
tests/assets/data. Configs stay tiny because the test machines have 2 shared CPUs.
"""

from __future__ import annotations

import collections
import gzip
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline import fingerprint, inputs
from data_pipeline import prepare as prep
from data_pipeline.fingerprint import config_hash
from data_pipeline.manifest import MANIFEST
from data_pipeline.schedule import run_units
from data_pipeline.sources import detect_format
from data_pipeline.tokenizer import tokenizer_spec
from data_pipeline.worker import OUTPUT_BYTES, ShardWorker
from launcher.config import from_dict, resolve_paths
from tests.ray_local import start_local_ray

ray = pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "tests" / "assets"
DATA = ASSETS / "data"
TOKENIZER = ASSETS / "models" / "stories260K"

pytestmark = pytest.mark.integration

# main_config's output (tokens, labels, test text, exemplars) as commit 7d58db9 wrote it.
PINNED_FINGERPRINT = "ef71b8871703c8f7242d416c822f22c63ef09bb24902c07b351f07739ba2bbc1"


def _quiet(_: str) -> None:
    pass


def make_inputs(folder: Path) -> Path:
    """The inputs of the main config, copied so that a test may change their bytes.

    SST-2 train is cut into two files of one source (the second gzipped) and also given whole
    as another source (so every record of it is an exact duplicate); a pinned test source
    repeats 50 train prompts with flipped labels (same prompt, other content).
    """
    folder.mkdir(parents=True)
    lines = (DATA / "sst2" / "train.tsv").read_bytes().splitlines(keepends=True)
    header, body = lines[0], lines[1:]
    (folder / "sst2").mkdir()
    (folder / "sst2" / "part-0.tsv").write_bytes(header + b"".join(body[:1000]))
    with gzip.open(folder / "sst2" / "part-1.tsv.gz", "wb") as f:
        f.write(header + b"".join(body[1000:]))
    shutil.copy(DATA / "sst2" / "train.tsv", folder / "sst2_whole.tsv")
    flipped = []
    for line in body[:50]:
        sentence, label = line.rstrip(b"\n").rsplit(b"\t", 1)
        flipped.append(sentence + b"\t" + (b"0" if label.strip() == b"1" else b"1") + b"\n")
    (folder / "pinned.tsv").write_bytes(header + b"".join(flipped))
    shutil.copy(DATA / "wmt21" / "newstest2021.de-en.jsonl", folder / "wmt.jsonl")
    shutil.copy(DATA / "instruction" / "v1_sft_demo.jsonl", folder / "chat.jsonl")
    return folder


def main_config(inputs: Path, out: Path, **data: Any) -> Any:
    raw = {
        "experiment": {"name": "prep", "output_dir": str(out), "seed": 7},
        "model": {"name_or_path": str(TOKENIZER)},
        "data": {
            "sources": [
                {"path": str(inputs / "sst2" / "part-*.tsv*"), "template": "sst2"},
                {
                    "path": str(inputs / "pinned.tsv"),
                    "template": "sst2",
                    "name": "sst2_pinned",
                    "split": "test",
                },
                {
                    "path": str(inputs / "wmt.jsonl"),
                    "template": "wmt",
                    "params": {"source_lang": "de", "target_lang": "en"},
                    "max_records": 60,
                },
                {"path": str(inputs / "chat.jsonl"), "template": "chat", "max_records": 40},
                {"path": str(inputs / "sst2_whole.tsv"), "template": "sst2", "name": "sst2_dup"},
            ],
            "split": {"train": 0.8, "validation": 0.1, "test": 0.1},
            "max_seq_len": 256,
            "truncation": "drop",
            "max_reject_fraction": 0.5,
            **data,
        },
        "tracking": {"enabled": False},
    }
    return resolve_paths(from_dict(raw))


def read_split(data_dir: Path, manifest: dict[str, Any], name: str) -> pa.Table:
    files = manifest["splits"][name]["files"]
    return pa.concat_tables([pq.read_table(data_dir / f) for f in files])


def examples(table: pa.Table) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of every original example, packed rows cut at `seq_lens`."""
    out = []
    for ids, labels, lens in zip(
        table["input_ids"].to_pylist(),
        table["labels"].to_pylist(),
        table["seq_lens"].to_pylist(),
        strict=True,
    ):
        start = 0
        for n in lens:
            out.append((ids[start : start + n], labels[start : start + n]))
            start += n
        assert start == len(ids)
    return out


def prompt_tokens(example: tuple[list[int], list[int]]) -> tuple[int, ...]:
    ids, labels = example
    return tuple(i for i, label in zip(ids, labels, strict=True) if label == -100)


@pytest.fixture(scope="module")
def local_ray():
    start_local_ray()
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("prepare")


@pytest.fixture(scope="module")
def two_workers(local_ray, work: Path) -> tuple[Any, dict[str, Any], float]:
    cfg = main_config(make_inputs(work / "in2"), work / "out2", num_workers=2)
    t0 = time.perf_counter()
    manifest = prep.prepare(cfg, log=_quiet)
    return cfg, manifest, time.perf_counter() - t0


@pytest.fixture(scope="module")
def one_worker(local_ray, work: Path) -> tuple[Any, dict[str, Any]]:
    cfg = main_config(make_inputs(work / "in1"), work / "out1", num_workers=1)
    return cfg, prep.prepare(cfg, log=_quiet)


def test_same_fingerprint_with_1_and_2_workers(two_workers, one_worker) -> None:
    (cfg2, m2, _), (cfg1, m1) = two_workers, one_worker
    # The glob source is 2 files, one gzipped, cut into line ranges: more units than workers.
    assert (
        len(inputs.plan_units([inputs.expand(s.path, s.format, 0) for s in cfg2.data.sources])) > 5
    )
    assert m1["fingerprint"] == m2["fingerprint"]
    # The content hash of every shard and exemplar as the single-module prepare.py (before the
    # package split, commit 7d58db9) wrote them: restructuring the job must not change a byte.
    assert m1["fingerprint"] == PINNED_FINGERPRINT
    assert m1["config_hash"] != m2["config_hash"]  # other input paths; same bytes
    assert m1["splits"] == m2["splits"]
    for name in ("train", "validation", "test"):
        a = read_split(Path(cfg1.data_dir), m1, name)
        b = read_split(Path(cfg2.data_dir), m2, name)
        assert a.equals(b), name


def _exemplars(data_dir: Path, manifest: dict[str, Any]) -> dict[str, list[dict[str, str]]]:
    out = {}
    for task, entry in manifest["exemplars"].items():
        lines = (data_dir / entry["file"]).read_text().splitlines()
        out[task] = [json.loads(line) for line in lines]
        assert len(out[task]) == entry["rows"]
    return out


def test_exemplars_same_with_1_and_2_workers_lowest_hashes_of_train(
    two_workers, one_worker
) -> None:
    from transformers import AutoTokenizer

    from data_pipeline import split, templates
    from data_pipeline.sources import Reject, parse_bytes

    (cfg2, m2, _), (cfg1, m1) = two_workers, one_worker
    k = cfg2.data.exemplars
    assert k == 8  # the default
    ex2, ex1 = _exemplars(Path(cfg2.data_dir), m2), _exemplars(Path(cfg1.data_dir), m1)
    assert ex1 == ex2 and m1["exemplars"] == m2["exemplars"]
    tasks = {s.task_name for s in cfg2.data.sources}
    assert set(ex2) == tasks
    for task in tasks:  # the pinned test source has no train rows: an empty file
        assert len(ex2[task]) == min(k, m2["splits"]["train"]["per_task"][task]), task
    assert ex2["sst2_pinned"] == [] and len(ex2["sst2"]) == k == len(ex2["wmt"])
    # Every exemplar is a kept train example (same tokens), never a held-out prompt.
    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    bos, eos = tok.bos_token_id, tok.eos_token_id
    data_dir = Path(cfg2.data_dir)
    by_split = {name: examples(read_split(data_dir, m2, name)) for name in m2["splits"]}
    train = {tuple(ids) for ids, _ in by_split["train"]}
    held_out = {prompt_tokens(e) for name in ("validation", "test") for e in by_split[name]}

    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]  # type: ignore[no-any-return]

    for task in ("sst2", "wmt"):
        for e in ex2[task]:
            p, c = ids(e["prompt"]), ids(e["completion"])
            assert (bos, *p, *c, eos) in train, (task, e)
            assert (bos, *p) not in held_out, (task, e)
    # They are the lowest content hashes among all train examples of the task: render every
    # input record independently, keep those whose tokens are in the train split.
    for i, task in ((0, "sst2"), (2, "wmt")):
        src = cfg2.data.sources[i]
        render = templates.renderer(src.template, src.params)
        candidates = set()
        for path in sorted(Path(src.path).parent.glob(Path(src.path).name)):
            fmt = detect_format(str(path))
            raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
            for _, rec in parse_bytes(raw, str(path), fmt):
                if isinstance(rec, Reject):
                    continue
                ((prompt, completion),) = render(rec)
                p, c = (tok(t, add_special_tokens=False)["input_ids"] for t in (prompt, completion))
                if (tok.bos_token_id, *p, *c, tok.eos_token_id) in train:
                    candidates.add((split.keys([(prompt, completion)])[1], prompt, completion))
        expected = [{"prompt": p, "completion": c} for _, p, c in sorted(candidates)[:k]]
        assert ex2[task] == expected, task


def test_rerun_reuses_in_seconds(two_workers, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, first, first_s = two_workers
    read: list[str] = []
    real_digest = fingerprint._file_digest
    monkeypatch.setattr(
        fingerprint, "_file_digest", lambda p, f: read.append(p) or real_digest(p, f)
    )
    messages: list[str] = []
    t0 = time.perf_counter()
    again = prep.prepare(cfg, log=messages.append)
    elapsed = time.perf_counter() - t0
    assert again["reused"] is True and first["reused"] is False
    assert any("reusing" in m for m in messages)
    assert again["fingerprint"] == first["fingerprint"]
    assert elapsed < 5 and elapsed < first_s / 3, (elapsed, first_s)
    # Only inputs hashed within TRUST_NS of their mtime are read again (the inputs were written
    # just before the first prepare).
    trust = fingerprint.TRUST_NS
    assert set(read) == {
        i["path"] for i in first["inputs"] if i["hashed_at_ns"] - i["mtime_ns"] < trust
    }
    # A rerun still inside that window must hash again too (a fast prepare gets there in under
    # 2 s); once it has passed, a rerun records hashes it can trust, and the next reads nothing.
    newest = max(i["mtime_ns"] for i in first["inputs"])
    time.sleep(max(0.0, (newest + trust - time.time_ns()) / 1e9))
    assert prep.prepare(cfg, log=messages.append)["reused"] is True
    read.clear()
    assert prep.prepare(cfg, log=messages.append)["reused"] is True
    assert read == []


def test_every_record_accounted_for(two_workers) -> None:
    cfg, m, _ = two_workers
    data_dir = Path(cfg.data_dir)
    # The glob covers both files, the .gz one included: every SST-2 phrase is read once, then
    # again by the duplicate source, whose every record is an exact duplicate of the first.
    per_task = {t: sum(m["splits"][s]["per_task"][t] for s in m["splits"]) for t in ("sst2",)}
    assert m["splits"]["train"]["per_task"]["sst2_dup"] == 0
    assert sum(m["splits"][s]["per_task"]["sst2_dup"] for s in m["splits"]) == 0
    assert m["duplicates"] >= 1999
    assert 1900 < per_task["sst2"] <= 1999
    # Pinned: every pinned record is in test.
    assert m["splits"]["test"]["per_task"]["sst2_pinned"] == 50
    assert m["splits"]["train"]["per_task"]["sst2_pinned"] == 0
    # The 50 pinned prompts pushed their train/validation copies out.
    assert m["overlap_dropped"] > 30
    # Caps per source.
    assert sum(m["splits"][s]["per_task"]["wmt"] for s in m["splits"]) == 60
    assert sum(m["splits"][s]["per_task"]["chat"] for s in m["splits"]) == 40
    rejects = [json.loads(x) for x in (data_dir / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == m["rejected"]
    assert all(r["reason"].startswith("tokens") or "max_seq_len" in r["reason"] for r in rejects)


def test_no_duplicates_and_no_prompt_in_two_splits(two_workers) -> None:
    cfg, m, _ = two_workers
    data_dir = Path(cfg.data_dir)
    by_split = {name: examples(read_split(data_dir, m, name)) for name in m["splits"]}
    for name, exs in by_split.items():
        assert len(exs) == m["splits"][name]["examples"], name
    test = read_split(data_dir, m, "test")
    pairs = list(zip(test["prompt"].to_pylist(), test["reference"].to_pylist(), strict=True))
    assert len(set(pairs)) == len(pairs)
    # Ids are unique; those of a source of several files name the file (1: the .gz one).
    ids = test["id"].to_pylist()
    assert len(set(ids)) == len(ids)
    assert any(i.startswith("sst2-1-") for i in ids) and any(i.startswith("sst2-0-") for i in ids)
    assert any(i.startswith("wmt-") and i.count("-") == 1 for i in ids)
    all_examples = [tuple(ids) for exs in by_split.values() for ids, _ in exs]
    # Exact duplicates: the pinned records differ from their train twins in the label only.
    assert len(set(all_examples)) == len(all_examples)
    prompts = {name: {prompt_tokens(e) for e in exs} for name, exs in by_split.items()}
    assert not prompts["train"] & prompts["test"]
    assert not prompts["train"] & prompts["validation"]
    assert not prompts["validation"] & prompts["test"]


def test_masked_labels_exact_on_real_sample(two_workers) -> None:
    from transformers import AutoTokenizer

    cfg, m, _ = two_workers
    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    bos, eos = tok.bos_token_id, tok.eos_token_id
    test = read_split(Path(cfg.data_dir), m, "test")
    rows = test.to_pylist()
    single_turn = [r for r in rows if r["task"] != "chat"]
    assert len(single_turn) > 200
    for r in single_turn:
        p = tok(r["prompt"], add_special_tokens=False)["input_ids"]
        c = tok(r["reference"], add_special_tokens=False)["input_ids"]
        assert r["input_ids"] == [bos] + p + c + [eos]
        assert r["labels"] == [-100] * (1 + len(p)) + c + [eos]
        assert r["prompt_ids"] == [bos] + p
        assert r["seq_lens"] == [len(r["input_ids"])]
    # The manifest's loss-token counts equal the labels on disk, for every split: in packed
    # rows only the first label of each example is masked again, and that is always bos.
    for name in m["splits"]:
        table = read_split(Path(cfg.data_dir), m, name)
        learned = sum(sum(1 for x in labels if x != -100) for labels in table["labels"].to_pylist())
        assert learned == m["splits"][name]["loss_tokens"], name
        assert sum(len(x) for x in table["input_ids"].to_pylist()) == m["splits"][name]["tokens"]


def test_packed_equals_unpacked_as_token_multisets(two_workers, work: Path) -> None:
    cfg, packed_m, _ = two_workers
    inputs = Path(cfg.data.sources[0].path).parents[1]
    plain_cfg = main_config(inputs, work / "plain", packing=False, exemplars=0)
    plain_m = prep.prepare(plain_cfg, log=_quiet)
    assert plain_m["reused"] is False
    # exemplars: 0 keeps none (and changes no shard).
    assert plain_m["exemplars"] == {}
    assert not (Path(plain_cfg.data_dir) / "exemplars").exists()
    assert plain_m["config_hash"] != packed_m["config_hash"]  # a setting changed: recompute
    for name in ("train", "validation"):
        packed = read_split(Path(cfg.data_dir), packed_m, name)
        plain = read_split(Path(plain_cfg.data_dir), plain_m, name)
        assert packed_m["splits"][name]["packed"] and not plain_m["splits"][name]["packed"]
        assert packed.num_rows < plain.num_rows
        assert max(len(x) for x in packed["input_ids"].to_pylist()) <= cfg.data.max_seq_len
        assert sorted(tuple(ids) for ids, _ in examples(packed)) == sorted(
            tuple(ids) for ids, _ in examples(plain)
        )
        tokens = collections.Counter(t for ids in packed["input_ids"].to_pylist() for t in ids)
        assert tokens == collections.Counter(
            t for ids in plain["input_ids"].to_pylist() for t in ids
        )
        # Same labels too (the first label of each example is bos, masked either way).
        assert sorted(map(repr, examples(packed))) == sorted(map(repr, examples(plain)))
        assert packed_m["splits"][name]["packing_efficiency"] > 0.9


def test_any_change_recomputes(one_worker, two_workers, tmp_path: Path) -> None:
    cfg, before = one_worker
    base = config_hash(cfg, _files(cfg), str(TOKENIZER))
    assert base == before["config_hash"]
    # Template params, settings, tokenizer: each gives a new hash.
    changed = cfg.model_copy(deep=True)
    changed.data.sources[0].params = {"phrasings": True}
    assert config_hash(changed, _files(changed), str(TOKENIZER)) != base
    changed = cfg.model_copy(deep=True)
    changed.data.max_seq_len = 128
    assert config_hash(changed, _files(changed), str(TOKENIZER)) != base
    other_tok = tmp_path / "tok"
    shutil.copytree(TOKENIZER, other_tok)
    config = json.loads((other_tok / "tokenizer_config.json").read_text())
    config["model_max_length"] = 77
    (other_tok / "tokenizer_config.json").write_text(json.dumps(config))
    assert config_hash(cfg, _files(cfg), str(other_tok)) != base
    # The data: change one byte of one input file and run for real.
    part = Path(cfg.data.sources[0].path).parent / "part-0.tsv"
    text = part.read_bytes()
    part.write_bytes(text.replace(b"\t1\n", b"\t0\n", 1))
    after = prep.prepare(cfg, log=_quiet)
    assert after["reused"] is False
    assert after["config_hash"] != before["config_hash"]
    assert after["fingerprint"] != before["fingerprint"]
    assert after["fingerprint"] != two_workers[1]["fingerprint"]


def _files(cfg: Any) -> list[list[tuple[str, str]]]:
    return [inputs.expand(s.path, s.format, i) for i, s in enumerate(cfg.data.sources)]


BAD = [
    ("alpaca_bad.jsonl", "alpaca", {1, 3, 9}, {2: "malformed JSON", 4: "UTF-8", 6: "JSON object",
                                               7: "missing field 'output'", 8: "empty completion"}),
    ("embedded_newlines.csv", "alpaca", {2, 7, 9}, {5: "expected 3 fields", 6: "UTF-8",
                                                    8: "empty completion"}),
    ("stray_quotes.tsv", "sst2", {2, 3, 4, 5}, {}),
    ("bad.conll", "conll2003", {3, 15}, {10: "columns", 12: "UTF-8", 19: "bad NER tag"}),
    ("broken.json", "alpaca", set(), {3: "malformed JSON"}),
]  # fmt: skip


def bad_config(out: Path, max_reject_fraction: float) -> Any:
    raw = {
        "experiment": {"name": "bad", "output_dir": str(out), "seed": 1},
        "model": {"name_or_path": str(TOKENIZER)},
        "data": {
            "sources": [
                {"path": str(DATA / "bad" / name), "template": template, "name": name}
                for name, template, _, _ in BAD
            ],
            "max_seq_len": 256,
            "max_reject_fraction": max_reject_fraction,
            "num_workers": 2,
        },
        "tracking": {"enabled": False},
    }
    return resolve_paths(from_dict(raw))


def test_bad_input_keeps_every_good_record_and_reports_every_bad_one(local_ray, work: Path) -> None:
    cfg = bad_config(work / "bad", max_reject_fraction=0.6)
    m = prep.prepare(cfg, log=_quiet)
    data_dir = Path(cfg.data_dir)
    for name, _, good, _ in BAD:
        assert sum(m["splits"][s]["per_task"][name] for s in m["splits"]) == len(good), name
    assert m["duplicates"] == 0
    rejects = [json.loads(x) for x in (data_dir / "rejects.jsonl").read_text().splitlines()]
    assert m["rejected"] == len(rejects) == sum(len(bad) for *_, bad in BAD)
    got = {(Path(r["source"]).name, r["line"]): r["reason"] for r in rejects}
    for name, _, _, bad in BAD:
        for line, reason in bad.items():
            assert reason in got[(name, line)], (name, line, got.get((name, line)))


def test_too_many_rejects_fails_and_leaves_the_old_output(local_ray, work: Path) -> None:
    out = work / "bad"  # written by the previous test
    data_dir = out / "data"
    if not (data_dir / MANIFEST).exists():
        prep.prepare(bad_config(out, max_reject_fraction=0.6), log=_quiet)
    before = {p: p.read_bytes() for p in data_dir.rglob("*") if p.is_file()}
    with pytest.raises(prep.PrepareError, match="max_reject_fraction") as err:
        prep.prepare(bad_config(out, max_reject_fraction=0.1), log=_quiet)
    assert "rejected" in str(err.value) and "first:" in str(err.value)
    after = {p: p.read_bytes() for p in data_dir.rglob("*") if p.is_file()}
    assert after == before
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
    # A fresh output folder gets no manifest at all.
    fresh = work / "bad_fresh"
    with pytest.raises(prep.PrepareError):
        prep.prepare(bad_config(fresh, max_reject_fraction=0.1), log=_quiet)
    assert not (fresh / "data" / MANIFEST).exists()
    assert (fresh / "data.rejects.jsonl").exists()


def test_ray_tasks_give_every_unit_in_order_as_in_process(local_ray, work: Path) -> None:
    """`_run_units` on Ray returns exactly what the worker computes in this process, unit
    after unit: the first unit, a whole JSON file big enough to leave its worker in several
    tables (OUTPUT_BYTES), takes far longer than the small ranges after it, which finish
    first."""
    folder = work / "order"
    folder.mkdir()
    body = (DATA / "sst2" / "train.tsv").read_text().splitlines(keepends=True)
    rows = [line.rstrip("\n").rsplit("\t", 1) for line in body[1:]]
    big = [
        {"sentence": f"{sentence} ({k})", "label": int(label)}
        for k in range(12)
        for sentence, label in rows
    ]
    # A wrapper object, not an array: not cut into element ranges, one whole unit.
    (folder / "a_big.json").write_text(json.dumps({"data": big}))
    (folder / "b_sst2.tsv").write_text("".join(body))
    sources = [
        {"path": str(folder / "a_big.json"), "template": "sst2"},
        {"path": str(folder / "b_sst2.tsv"), "template": "sst2", "name": "sst2_tsv"},
    ]
    cfg = main_config(folder, work / "order_out", num_workers=2, sources=sources)
    files = [inputs.expand(s.path, s.format, i) for i, s in enumerate(cfg.data.sources)]
    units = inputs.plan_units(files)
    assert len(units) >= 3 and units[0]["whole"]
    args = {
        "sources": [s.model_dump(mode="json") for s in cfg.data.sources],
        "tokenizer": tokenizer_spec(str(TOKENIZER)),
        "max_seq_len": 256,
        "truncation": "left",
        "seed": 0,
        "ratios": {"train": 0.8, "validation": 0.1, "test": 0.1},
        "train_text": True,
    }
    worker = ShardWorker(**args)
    expected = [worker._process(u) for u in units]
    assert expected[0].nbytes > OUTPUT_BYTES
    got = [t for _, t in run_units(units, args, n_workers=2, cpus=1.0) if t is not None]
    assert len(got) > len(units)  # the big unit came in pieces
    assert pa.concat_tables(got).equals(pa.concat_tables(expected))
    # Pieces never mix units: each holds rows of one source and part, in line order.
    assert [t["source"][0].as_py() for t in got] == sorted(t["source"][0].as_py() for t in got)


# --- every input format cut into ranges (before the cluster tests, which end the local Ray) --


@pytest.fixture(scope="module")
def format_inputs(work: Path) -> Path:
    """One file of every input format, each big enough to be cut into several ranges at
    FORMAT_RANGE_BYTES: a CSV with quoted newlines and doubled quotes (also gzipped), an
    Excel-quoted TSV with CRLF and a BOM, a JSON array, a Parquet file of 7 row groups, a
    `datasets` folder of 3 Arrow files, CoNLL and JSON Lines."""
    import csv

    import datasets

    folder = work / "formats_in"
    folder.mkdir()
    with open(DATA / "amazon_reviews" / "amazon_alexa.tsv", newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    with open(folder / "amazon.csv", "w", newline="") as g:
        writer = csv.writer(g)
        writer.writerow(rows[0])
        for k, row in enumerate(rows[1:]):
            if k % 3 == 0:  # a newline and a quoted, comma-holding phrase inside the field
                row[3] = row[3].replace(". ", ".\n", 2) + ' "so, yes"'
            writer.writerow(row)
    with gzip.open(folder / "amazon_gz.csv.gz", "wb") as gz:
        gz.write((folder / "amazon.csv").read_bytes())
    shutil.copy(DATA / "amazon_reviews" / "amazon_alexa.tsv", folder / "amazon.tsv")
    shutil.copy(DATA / "instruction" / "alpaca_en_demo.json", folder / "alpaca.json")
    sst2 = [line.rstrip("\n").rsplit("\t", 1) for line in (DATA / "sst2" / "train.tsv").open()]
    table = pa.table({"sentence": [s for s, _ in sst2[1:]], "label": [int(x) for _, x in sst2[1:]]})
    pq.write_table(table, folder / "sst2.parquet", row_group_size=300)
    datasets.Dataset.from_dict(table.slice(0, 900).to_pydict()).save_to_disk(
        str(folder / "hf"), num_shards=3
    )
    (folder / "eng.testa").write_bytes((DATA / "conll2003" / "eng.testa").read_bytes() * 4)
    shutil.copy(DATA / "wmt21" / "newstest2021.de-en.jsonl", folder / "wmt.jsonl")
    return folder


def formats_config(folder: Path, out: Path, num_workers: int) -> Any:
    sources = [
        {"path": str(folder / "amazon.csv"), "template": "amazon_reviews", "name": "csv"},
        {"path": str(folder / "amazon_gz.csv.gz"), "template": "amazon_reviews", "name": "gz"},
        {"path": str(folder / "amazon.tsv"), "template": "amazon_reviews", "name": "tsv"},
        {"path": str(folder / "alpaca.json"), "template": "alpaca"},
        {"path": str(folder / "sst2.parquet"), "template": "sst2", "name": "parquet"},
        {"path": str(folder / "hf"), "template": "sst2", "name": "hf"},
        {"path": str(folder / "eng.testa"), "template": "conll2003"},
        {
            "path": str(folder / "wmt.jsonl"),
            "template": "wmt",
            "params": {"source_lang": "de", "target_lang": "en"},
        },
    ]
    return main_config(folder, out, num_workers=num_workers, sources=sources)


# Range sizes that cut every file of `format_inputs` into several units.
FORMAT_RANGE_BYTES = 8 << 10


def _cut_small(mp: pytest.MonkeyPatch) -> None:
    mp.setattr(inputs, "MIN_CHUNK_BYTES", FORMAT_RANGE_BYTES)
    mp.setattr(inputs, "CHUNK_BYTES", FORMAT_RANGE_BYTES)


@pytest.fixture(scope="module")
def whole_files(local_ray, format_inputs: Path, work: Path) -> tuple[dict[str, Any], bytes]:
    """Every file as one unit, parsed whole: the manifest and rejects.jsonl to match."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(inputs, "MIN_CHUNK_BYTES", 1 << 40)
        cfg = formats_config(format_inputs, work / "formats_whole", num_workers=2)
        assert all(u["whole"] for u in inputs.plan_units(_files(cfg)))
        manifest = prep.prepare(cfg, log=_quiet)
    return manifest, (Path(cfg.data_dir) / "rejects.jsonl").read_bytes()


def test_every_format_cut_into_ranges_gives_the_whole_file_fingerprint(
    whole_files: tuple[dict[str, Any], bytes],
    format_inputs: Path,
    work: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reference, rejects = whole_files
    _cut_small(monkeypatch)
    for workers in (1, 2):
        cfg = formats_config(format_inputs, work / f"formats_cut{workers}", num_workers=workers)
        units = inputs.plan_units(_files(cfg))
        per_source = collections.Counter(u["source"] for u in units)
        assert all(per_source[i] > 1 for i in range(len(cfg.data.sources))), per_source
        m = prep.prepare(cfg, log=_quiet)
        assert m["fingerprint"] == reference["fingerprint"], workers
        assert m["splits"] == reference["splits"] and m["rejected"] == reference["rejected"]
        assert (Path(cfg.data_dir) / "rejects.jsonl").read_bytes() == rejects


def test_corrupt_parquet_row_group_is_a_reject_and_the_rest_is_kept(
    local_ray, format_inputs: Path, work: Path
) -> None:
    folder = work / "corrupt_pq"
    folder.mkdir()
    path = folder / "sst2.parquet"
    shutil.copy(format_inputs / "sst2.parquet", path)
    meta = pq.ParquetFile(path).metadata
    column = meta.row_group(3).column(0)  # rows 901-1200 of 7 groups of 300
    start = column.dictionary_page_offset or column.data_page_offset
    raw = bytearray(path.read_bytes())
    raw[start : start + column.total_compressed_size] = b"\xff" * column.total_compressed_size
    path.write_bytes(bytes(raw))
    sources = [{"path": str(path), "template": "sst2", "name": "pq"}]
    cfg = main_config(folder, work / "corrupt_pq_out", num_workers=2, sources=sources)
    m = prep.prepare(cfg, log=_quiet)
    [reject] = [
        json.loads(x) for x in (Path(cfg.data_dir) / "rejects.jsonl").read_text().splitlines()
    ]
    assert reject["source"] == str(path) and reject["line"] == 901
    assert reject["reason"].startswith("unreadable Parquet row group 3 (rows 901-1200)")
    kept = sum(m["splits"][s]["per_task"]["pq"] for s in m["splits"])
    dropped = m["duplicates"] + m["capped"] + m["overlap_dropped"]
    assert m["rejected"] == 1 and kept + dropped == meta.num_rows - 300


def test_two_node_cluster_gives_the_same_fingerprint(two_workers, work: Path) -> None:
    """Last in the module: it replaces the module's local Ray with a 2 x 1 CPU cluster."""
    from ray.cluster_utils import Cluster

    _, reference, _ = two_workers
    ray.shutdown()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False},
    )
    try:
        cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, logging_level="ERROR")
        cluster.wait_for_nodes()
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        cfg = main_config(make_inputs(work / "in_cluster"), work / "out_cluster", num_workers=2)
        m = prep.prepare(cfg, log=_quiet)
        assert m["reused"] is False
        assert m["fingerprint"] == reference["fingerprint"]
    finally:
        ray.shutdown()
        cluster.shutdown()
    os.environ.pop("RAY_ADDRESS", None)


def test_every_format_cut_into_ranges_same_fingerprint_on_two_node_cluster(
    whole_files: tuple[dict[str, Any], bytes],
    format_inputs: Path,
    work: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After the other cluster test (the module's local Ray is gone): a 2 x 1 CPU cluster."""
    from ray.cluster_utils import Cluster

    reference, _ = whole_files
    _cut_small(monkeypatch)
    ray.shutdown()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False},
    )
    try:
        cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, logging_level="ERROR")
        cluster.wait_for_nodes()
        cfg = formats_config(format_inputs, work / "formats_cluster", num_workers=2)
        assert len(inputs.plan_units(_files(cfg))) > 3 * len(cfg.data.sources)
        m = prep.prepare(cfg, log=_quiet)
        assert m["reused"] is False
        assert m["fingerprint"] == reference["fingerprint"]
    finally:
        ray.shutdown()
        cluster.shutdown()
    os.environ.pop("RAY_ADDRESS", None)

"""Bad input: every kind of broken record goes through ONE real prepare run (one local Ray).

Each broken record must become a line of `rejects.jsonl` naming its file, line and reason,
and every good record must survive, whatever sits next to it. Bad configs must stop the CLI
with exit code 2 and an error naming the key, before Ray is even imported. Nothing is mocked:
the real prepare job (Ray Data actors), the real stories260K tokenizer, the real CLI.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline import prepare as prep
from data_pipeline.manifest import MANIFEST
from launcher.config import from_dict, resolve_paths

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = ROOT / "tests" / "assets" / "models" / "stories260K"
BIG = 10 * 1024 * 1024  # the "10 MB record" (slow test: ~5-20 s of tokenizer time alone)
LONG = 200 * 1024  # the over-long record of the fast run

pytestmark = pytest.mark.integration


def jl(obj: Any) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def good(n: int) -> dict[str, str]:
    return {"instruction": f"Say the number {n}.", "input": "", "output": f"number {n}"}


# file name -> (template, bytes, {line: expected reason fragment}, expected good completions)
def make_inputs(folder: Path) -> dict[str, tuple[str, bytes, dict[int, str], list[str]]]:
    folder.mkdir(parents=True, exist_ok=True)
    records = b"".join(
        [
            jl({"id": "a1", **good(1)}),  # 1 good
            b'{"instruction": "cut short", "output": \n',  # 2 corrupt JSON
            jl(good(3)),  # 3 good
            jl({"instruction": ["a", "list"], "output": "x"}),  # 4 wrong type
            jl({"instruction": "q", "output": 42}),  # 5 wrong type
            '{"instruction": "café", "output": "x"}\n'.encode("latin-1"),  # 6 not UTF-8
            jl({"instruction": "q", "output": {"nested": 1}}),  # 7 wrong type
            jl({"instruction": None, "output": "y"}),  # 8 null
            jl({"id": "a1", **good(9)}),  # 9 good: same id as line 1, other content
            jl({"instruction": "long " * (LONG // 5), "output": "x"}),  # 10 a 200 KB record
            b"[1, 2, 3]\n",  # 11 not an object
            jl(good(3)),  # 12 exact duplicate of line 3: deduplicated, not a reject
            b"\xff\xfe\x00garbage\n",  # 13 binary junk
            jl({"instruction": "no output field"}),  # 14 missing field
            jl(good(15)),  # 15 good
        ]
    )
    quoted = (
        b"instruction,input,output\n"
        b'"Write two lines.","","first line\nsecond line"\n'  # 2-3 good, quoted newline
        b'"A ""quoted"" word,\nand a comma",context,"ok, fine"\n'  # 4-5 good
        b"too,many,fields,here\n"  # 6 wrong field count
        b'"Last one.","","done"\n'  # 7 good: line numbers survive the quoted newlines
    )
    return {
        "records.jsonl": (
            "alpaca",
            records,
            {
                2: "malformed JSON",
                4: "field 'instruction' must be text",
                5: "field 'output' must be text",
                6: "not valid UTF-8",
                7: "field 'output' must be text",
                8: "field 'instruction' is null",
                10: "max_seq_len",
                11: "JSON object",
                13: "UTF-8",
                14: "missing field 'output'",
            },
            ["number 1", "number 3", "number 9", "number 15"],
        ),
        "quoted.csv": (
            "alpaca",
            quoted,
            {6: "expected 3 fields"},
            ["first line\nsecond line", "ok, fine", "done"],
        ),
        "missing_column.csv": (
            "alpaca",
            b"instruction,input\nfirst,\nsecond,x\n",
            {2: "missing field 'output'", 3: "missing field 'output'"},
            [],
        ),
        "missing_label.tsv": (
            "sst2",
            b"sentence\na great film\n",  # the header names one column; sst2 needs `label`
            {2: "missing field 'label'"},
            [],
        ),
        "empty.jsonl": ("alpaca", b"", {}, []),
        "blank_lines.jsonl": ("alpaca", b"\n\n   \n", {}, []),
    }


@pytest.fixture(scope="module")
def prepared(local_ray, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("bad_input")
    inputs = make_inputs(work / "in")
    for name, (_, data, _, _) in inputs.items():
        (work / "in" / name).write_bytes(data)
    raw = {
        "experiment": {"name": "bad-input", "output_dir": str(work / "out"), "seed": 3},
        "model": {"name_or_path": str(TOKENIZER)},
        "data": {
            "sources": [
                # Pinned to `test` so that the good records' text is kept and can be compared.
                {"path": str(work / "in" / n), "template": t, "name": Path(n).stem, "split": "test"}
                for n, (t, *_) in inputs.items()
            ],
            "max_seq_len": 256,
            "max_reject_fraction": 0.9,
            "num_workers": 2,
        },
        "tracking": {"enabled": False},
    }  # fmt: skip
    cfg = resolve_paths(from_dict(raw))
    manifest = prep.prepare(cfg, log=lambda _: None)
    data_dir = Path(cfg.data_dir)
    rejects = [json.loads(x) for x in (data_dir / "rejects.jsonl").read_text().splitlines()]
    files = manifest["splits"]["test"]["files"]
    test = pa.concat_tables([pq.read_table(data_dir / f) for f in files])
    return {"inputs": inputs, "manifest": manifest, "rejects": rejects, "test": test}


def test_every_bad_record_is_reported_with_file_line_and_reason(prepared) -> None:
    # Line 0 (a whole-file reject) is left to test_empty_source_files_are_reported.
    rejects = [r for r in prepared["rejects"] if r["line"] != 0]
    got = {(Path(r["source"]).name, r["line"]): r["reason"] for r in rejects}
    expected = {
        (name, line): reason
        for name, (_, _, bad, _) in prepared["inputs"].items()
        for line, reason in bad.items()
    }
    assert got.keys() == expected.keys()
    for key, reason in expected.items():
        assert reason in got[key], (key, got[key])
    assert len(rejects) == len(expected)
    assert prepared["manifest"]["rejected"] == len(prepared["rejects"])


def test_every_good_record_is_kept_exactly_once(prepared) -> None:
    test = prepared["test"]
    by_task: dict[str, list[str]] = {}
    for task, reference in zip(
        test["task"].to_pylist(), test["reference"].to_pylist(), strict=True
    ):
        by_task.setdefault(task, []).append(reference)
    for name, (_, _, _, completions) in prepared["inputs"].items():
        assert sorted(by_task.get(Path(name).stem, [])) == sorted(completions), name
    # The exact duplicate (records.jsonl line 12) is counted as such, not as a reject.
    assert prepared["manifest"]["duplicates"] == 1


def test_duplicate_user_ids_get_distinct_example_ids(prepared) -> None:
    ids = prepared["test"]["id"].to_pylist()
    assert len(ids) == len(set(ids))
    assert {"records-1", "records-9"} <= set(ids)  # both records with the user id "a1"


def test_over_long_record_is_rejected_for_its_length(prepared) -> None:
    reason = next(
        r["reason"]
        for r in prepared["rejects"]
        if Path(r["source"]).name == "records.jsonl" and r["line"] == 10
    )
    assert int(reason.split()[0]) > 40_000 and "max_seq_len 256" in reason


@pytest.mark.slow
def test_ten_megabyte_record_is_rejected_and_its_neighbours_kept(local_ray, tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    with path.open("wb") as f:
        f.write(jl(good(1)))
        f.write(jl({"instruction": "big " * (BIG // 4), "output": "x"}))  # line 2: 10 MB
        f.write(jl(good(3)))
    assert path.stat().st_size > BIG
    raw = {
        "experiment": {"name": "big", "output_dir": str(tmp_path / "out")},
        "model": {"name_or_path": str(TOKENIZER)},
        "data": {
            "sources": [{"path": str(path), "template": "alpaca", "split": "test"}],
            "max_seq_len": 256,
            "max_reject_fraction": 0.5,
        },
        "tracking": {"enabled": False},
    }
    cfg = resolve_paths(from_dict(raw))
    manifest = prep.prepare(cfg, log=lambda _: None)
    data_dir = Path(cfg.data_dir)
    rejects = [json.loads(x) for x in (data_dir / "rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], int(r["reason"].split()[0]) > 2_000_000) for r in rejects] == [(2, True)]
    assert "max_seq_len 256" in rejects[0]["reason"]
    files = manifest["splits"]["test"]["files"]
    test = pa.concat_tables([pq.read_table(data_dir / f) for f in files])
    assert sorted(test["reference"].to_pylist()) == ["number 1", "number 3"]


def test_empty_source_files_are_reported(prepared) -> None:
    got = {(Path(r["source"]).name, r["line"]) for r in prepared["rejects"]}
    assert {("empty.jsonl", 0), ("blank_lines.jsonl", 0)} <= got


def test_only_empty_files_is_a_clear_prepare_error(local_ray, tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_bytes(b"")
    raw = {
        "experiment": {"name": "empty", "output_dir": str(tmp_path / "out")},
        "model": {"name_or_path": str(TOKENIZER)},
        "data": {"sources": [{"path": str(tmp_path / "empty.jsonl"), "template": "alpaca"}]},
        "tracking": {"enabled": False},
    }
    with pytest.raises(prep.PrepareError, match="1 of 1 records rejected") as err:
        prep.prepare(resolve_paths(from_dict(raw)), log=lambda _: None)
    assert "empty file" in str(err.value) and "no dataset written" in str(err.value)
    assert not (tmp_path / "out" / "data" / MANIFEST).exists()


# --- bad configs through the real CLI ----------------------------------------------------------

QUICKSTART = "configs/quickstart.yaml"
BAD_CONFIGS = {
    # override -> the dotted key the one-paragraph error must name
    "unknown top-level section": (["optimizer.lr=1"], "optimizer"),
    "unknown nested key": (["train.learning_rate=1e-4"], "train.learning_rate"),
    "unknown key in a source": (["data.sources.0.tempalte=sst2"], "data.sources.0.tempalte"),
    "negative lr": (["train.lr=-0.001"], "train.lr"),
    "zero lr": (["train.lr=0"], "train.lr"),
    "infinite lr": (["train.lr=.inf"], "train.lr"),
    "batch sizes disagree": (
        ["train.micro_batch_size=4", "train.grad_accum=2", "train.global_batch_size=10"],
        "train.global_batch_size",
    ),
    "zero_stage 4": (["train.zero_stage=4"], "train.zero_stage"),
    "missing model path": (["model.name_or_path=./no/such/model"], "model.name_or_path"),
    "missing tokenizer path": (["model.tokenizer=/no/such/tokenizer"], "model.tokenizer"),
    "GPUs without use_gpu": (["cluster.gpus_per_worker=1"], "cluster.gpus_per_worker"),
    "use_gpu without GPUs": (["train.use_gpu=true", "cluster.gpus_per_worker=0"], "train.use_gpu"),
    "override not YAML": (["train.lr=[0.1"], "train.lr"),
    "unicode digit index": (["data.sources.².path=x"], "data.sources.²"),
    "params not a mapping": (["data.sources.0.params=[1]"], "data.sources.0.params"),
    "metrics not a list": (["data.sources.0.metrics=5"], "data.sources.0.metrics"),
    "name not text": (["data.sources.0.name=[1]"], "data.sources.0.name"),
}

_CLI_DRIVER = """
import contextlib, io, json, sys
from launcher.cli import main
out = []
for overrides in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            rc = main(["prepare", "configs/quickstart.yaml", *overrides])
        except SystemExit as e:
            rc = e.code
        except BaseException as e:
            rc = "crash: " + type(e).__name__ + ": " + str(e)
    out.append({"rc": rc, "stderr": err.getvalue(), "ray": "ray" in sys.modules})
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def cli_results() -> dict[str, dict[str, Any]]:
    """Every bad config through `launcher.cli.main` in ONE fresh interpreter (imports once)."""
    cases = list(BAD_CONFIGS.values())
    proc = subprocess.run(
        [sys.executable, "-c", _CLI_DRIVER, json.dumps([o for o, _ in cases])],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout.splitlines()[-1])
    return dict(zip(BAD_CONFIGS, results, strict=True))


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_exits_2_naming_the_key_before_ray(cli_results, case: str) -> None:
    result = cli_results[case]
    key = BAD_CONFIGS[case][1]
    assert result["rc"] == 2, result
    assert key in result["stderr"], result["stderr"]
    assert result["stderr"].startswith("ift: "), result["stderr"]
    assert "Traceback" not in result["stderr"]
    assert not result["ray"], "ray was imported before the config was refused"

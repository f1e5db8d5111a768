"""`ift prepare` with its sources on S3: globs, folders and single files, gzip included.

S3 itself cannot be reached from the test machines, so a real `moto` server process (moto's
S3 API on loopback) stands in for it. Everything else is the real thing: boto3 uploads the
repo's sample files, pyarrow's S3 filesystem lists and reads them, the prepare job runs on a
local Ray with the real stories260K tokenizer. S3 is configured the way users configure it for
MinIO and other S3-compatible stores: AWS_* environment variables, set before Ray starts so
that its workers inherit them. The output must be the same as from the same files on local
disk.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline import fingerprint
from data_pipeline import inputs as prep_inputs
from data_pipeline import prepare as prep
from launcher.config import from_dict, resolve_paths
from tests.ray_local import start_local_ray

ray = pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "assets" / "data"
TOKENIZER = ROOT / "tests" / "assets" / "models" / "stories260K"
BUCKET = "ift-inputs"

pytestmark = pytest.mark.integration


def _quiet(_: str) -> None:
    pass


@dataclass
class S3:
    """The moto server: its endpoint and a boto3 client on it."""

    endpoint: str  # http://127.0.0.1:PORT
    client: Any

    def upload(self, folder: Path, prefix: str) -> None:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                key = f"{prefix}/{f.relative_to(folder)}"
                self.client.put_object(Bucket=BUCKET, Key=key, Body=f.read_bytes())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3]:
    port = _free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as env:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE"):
            env.delenv(name, raising=False)
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        env.setenv("AWS_ENDPOINT_URL", endpoint)
        env.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata probing
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        pytest.fail(f"moto server did not start:\n{log.read_text()[-3000:]}")
                    time.sleep(0.2)
            client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
            client.create_bucket(Bucket=BUCKET)
            yield S3(endpoint, client)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def local_ray(s3: S3) -> Iterator[None]:
    """Started after `s3` has set the AWS_* variables: the Ray workers inherit them."""
    start_local_ray()
    yield
    ray.shutdown()


def make_inputs(folder: Path) -> Path:
    """Sample files in three sources' layouts.

    sst2/: train.tsv (two line ranges, the second re-reads the header) and test.tsv gzipped;
    chat/: the chat sample gzipped (a little over one range: two ranges of its decompressed
    stream) and a hidden file that a folder listing must skip (its name has no known format);
    alpaca.json: a JSON array, read whole, whose long records are rejected at max_seq_len.
    """
    (folder / "sst2").mkdir(parents=True)
    (folder / "chat").mkdir()
    shutil.copy(DATA / "sst2" / "train.tsv", folder / "sst2" / "part-0.tsv")
    (folder / "sst2" / "part-1.tsv.gz").write_bytes(
        gzip.compress((DATA / "sst2" / "test.tsv").read_bytes(), mtime=0)
    )
    (folder / "chat" / "demo.jsonl.gz").write_bytes(
        gzip.compress((DATA / "instruction" / "v1_sft_demo.jsonl").read_bytes(), mtime=0)
    )
    (folder / "chat" / ".keep").write_bytes(b"")
    shutil.copy(DATA / "instruction" / "alpaca_en_demo.json", folder / "alpaca.json")
    return folder


def make_config(inputs: str, out: Path) -> Any:
    """`inputs`: a local folder or an s3:// prefix holding what `make_inputs` writes."""
    raw = {
        "experiment": {"name": "prep-s3", "output_dir": str(out), "seed": 3},
        "model": {"name_or_path": str(TOKENIZER)},
        "data": {
            "sources": [
                {"path": f"{inputs}/sst2/part-*.tsv*", "template": "sst2"},
                {"path": f"{inputs}/chat", "template": "chat", "max_records": 40},
                {"path": f"{inputs}/alpaca.json", "template": "alpaca"},
            ],
            "split": {"train": 0.8, "validation": 0.1, "test": 0.1},
            "max_seq_len": 256,
            "truncation": "drop",
            "max_reject_fraction": 0.5,
            "num_workers": 2,
        },
        "tracking": {"enabled": False},
    }
    return resolve_paths(from_dict(raw))


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("prepare_s3")


@pytest.fixture(scope="module")
def prepared(s3: S3, local_ray: None, work: Path) -> dict[str, tuple[Any, dict[str, Any]]]:
    """The same files prepared from a local folder and from the bucket."""
    inputs = make_inputs(work / "in")
    s3.upload(inputs, "in")
    out = {}
    for name, where in (("local", str(inputs)), ("s3", f"s3://{BUCKET}/in")):
        cfg = make_config(where, work / f"out_{name}")
        out[name] = (cfg, prep.prepare(cfg, log=_quiet))
    return out


def read_split(data_dir: str, manifest: dict[str, Any], name: str) -> pa.Table:
    files = manifest["splits"][name]["files"]
    return pa.concat_tables([pq.read_table(os.path.join(data_dir, f)) for f in files])


def rejects(data_dir: str, inputs: str) -> list[dict[str, Any]]:
    """rejects.jsonl, each source given relative to the inputs folder or prefix."""
    lines = Path(data_dir, "rejects.jsonl").read_text().splitlines()
    out = [json.loads(line) for line in lines]
    for r in out:
        assert r["source"].startswith(inputs + "/"), r
        r["source"] = r["source"][len(inputs) + 1 :]
    return out


def test_s3_glob_folder_and_file_give_the_local_result(prepared, work: Path) -> None:
    (local_cfg, local), (s3_cfg, remote) = prepared["local"], prepared["s3"]
    files = [prep_inputs.expand(s.path, s.format, i) for i, s in enumerate(s3_cfg.data.sources)]
    inputs = f"s3://{BUCKET}/in"
    assert files == [
        [(f"{inputs}/sst2/part-0.tsv", "tsv"), (f"{inputs}/sst2/part-1.tsv.gz", "tsv")],
        [(f"{inputs}/chat/demo.jsonl.gz", "jsonl")],  # .keep skipped
        [(f"{inputs}/alpaca.json", "json")],
    ]
    units = prep_inputs.plan_units(files)
    # Read over S3 in line ranges: train.tsv at byte offsets, the .gz one in its stream.
    assert sum(u["path"].endswith("part-0.tsv") for u in units) == 2
    assert [u["gz"] for u in units if u["path"].endswith("demo.jsonl.gz")] == [True, True]

    assert remote["reused"] is False and local["reused"] is False
    # The paths are part of the config hash, but the fingerprint is the content's alone.
    assert remote["config_hash"] != local["config_hash"]
    assert remote["fingerprint"] == local["fingerprint"]
    for key in ("splits", "exemplars", "rejected", "duplicates", "capped", "overlap_dropped"):
        assert remote[key] == local[key], key
    assert remote["rejected"] > 0 and remote["capped"] > 0
    splits = remote["splits"].values()
    per_task = {t: sum(s["per_task"][t] for s in splits) for t in ("sst2", "chat", "alpaca")}
    assert per_task["chat"] == 40 and per_task["alpaca"] > 0 and per_task["sst2"] > 2000
    for name in remote["splits"]:
        a = read_split(local_cfg.data_dir, local, name)
        b = read_split(s3_cfg.data_dir, remote, name)
        assert a.equals(b), name
    for entry in remote["exemplars"].values():
        a = Path(local_cfg.data_dir, entry["file"]).read_text()
        assert a == Path(s3_cfg.data_dir, entry["file"]).read_text()
    local_rejects = rejects(local_cfg.data_dir, str(work / "in"))
    assert local_rejects == rejects(s3_cfg.data_dir, inputs)
    assert {r["source"] for r in local_rejects} >= {"alpaca.json"}


def test_rerun_with_the_same_s3_inputs_is_reused_without_reading_them(
    prepared, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reuse check re-hashes only inputs whose size or mtime changed, or that were written
    less than TRUST_NS before they were hashed (fingerprint.input_digests): counted here."""
    cfg, first = prepared["s3"]
    read: list[str] = []
    real_digest = fingerprint._file_digest

    def counting(path: str, fmt: str) -> str:
        read.append(path)
        return real_digest(path, fmt)

    monkeypatch.setattr(fingerprint, "_file_digest", counting)
    racy = {
        i["path"]
        for i in first["inputs"]
        if i["hashed_at_ns"] - i["mtime_ns"] < fingerprint.TRUST_NS
    }
    again = prep.prepare(cfg, log=_quiet)
    assert again["reused"] is True
    assert again["fingerprint"] == first["fingerprint"]
    assert set(read) == racy  # only files hashed within the racy window of their mtime
    read.clear()
    if racy:  # they were hashed again just now, long after their mtime: trusted from here on
        assert prep.prepare(cfg, log=_quiet)["reused"] is True
    assert read == []


def test_glob_matching_nothing_names_the_key(s3: S3, work: Path) -> None:
    cfg = make_config(f"s3://{BUCKET}/in", work / "out_missing")
    cfg.data.sources[1].path = f"s3://{BUCKET}/in/nothing/*.jsonl"
    # Raised while expanding the sources, before any Ray work.
    with pytest.raises(prep.PrepareError) as err:
        prep.prepare(cfg, log=_quiet)
    assert str(err.value) == (
        f"data.sources.1.path: no file matches s3://{BUCKET}/in/nothing/*.jsonl"
    )
    cfg.data.sources[1].path = f"s3://{BUCKET}/in/chat/missing.jsonl"
    with pytest.raises(prep.PrepareError, match=r"sources\.1\.path: no file matches .*missing"):
        prep.prepare(cfg, log=_quiet)
    # A `datasets` save_to_disk folder is read from local disk only: say so.
    s3.client.put_object(Bucket=BUCKET, Key="hf/train/dataset_info.json", Body=b"{}")
    with pytest.raises(prep.PrepareError, match="save_to_disk folder; only a local"):
        prep_inputs.expand(f"s3://{BUCKET}/hf/train", None, 0)


def test_options_in_the_query_reach_every_file(
    s3: S3, prepared, work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without AWS_ENDPOINT_URL: the endpoint given in the URI's query is kept on each file
    of the glob, so that the workers reopen them on the same store."""
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    query = f"?endpoint_override={s3.endpoint.removeprefix('http://')}&scheme=http"
    files = prep_inputs.expand(f"s3://{BUCKET}/in/**/*.gz{query}", None, 0)
    assert files == [
        (f"s3://{BUCKET}/in/chat/demo.jsonl.gz{query}", "jsonl"),
        (f"s3://{BUCKET}/in/sst2/part-1.tsv.gz{query}", "tsv"),
    ]
    for (uri, fmt), name in zip(files, ("chat/demo.jsonl.gz", "sst2/part-1.tsv.gz"), strict=True):
        units = prep_inputs.plan_units([[(uri, fmt)]])
        stored = (work / "in" / name).read_bytes()
        # Line ranges of the decompressed stream, or the whole file as stored.
        expected = gzip.decompress(stored) if units[0]["gz"] else stored
        assert b"".join(prep_inputs.read_unit(u) for u in units) == expected


def test_changed_object_recomputes(s3: S3, prepared) -> None:
    """Last: it changes an input object (one label of train.tsv)."""
    cfg, before = prepared["s3"]
    key = "in/sst2/part-0.tsv"
    body = s3.client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    s3.client.put_object(Bucket=BUCKET, Key=key, Body=body.replace(b"\t1\n", b"\t0\n", 1))
    after = prep.prepare(cfg, log=_quiet)
    assert after["reused"] is False
    assert after["config_hash"] != before["config_hash"]
    assert after["fingerprint"] != before["fingerprint"]

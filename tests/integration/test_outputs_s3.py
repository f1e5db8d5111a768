"""Every output folder on S3: prepare's publish rule, and the quickstart end to end.

A real `moto` server stands in for S3, as in test_prepare_s3.py (whose fixtures this module
reuses: the server, the AWS_* environment set before Ray starts, the sample inputs). Outputs go
through `data_pipeline.storage`; a stray `os.makedirs("s3://...")` would show up as a local
folder named `s3:`, which every test looks for.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import yaml

from data_pipeline import manifest as mf
from data_pipeline import prepare as prep
from data_pipeline import storage
from tests.integration.test_prepare_s3 import (  # noqa: F401 - fixtures used by name
    S3,
    local_ray,
    make_config,
    make_inputs,
    s3,
)
from training import data as tdata

ROOT = Path(__file__).resolve().parents[2]
BUCKET = "ift-outputs"

pytestmark = pytest.mark.integration


def _quiet(_: str) -> None:
    pass


def _no_local_s3_folder(*folders: Path) -> None:
    for folder in folders:
        assert not list(folder.rglob("s3:")), f"a local 's3:' folder under {folder}"


@pytest.fixture(scope="module")
def bucket(s3: S3) -> S3:  # noqa: F811
    s3.client.create_bucket(Bucket=BUCKET)
    return s3


def _objects(store: S3, prefix: str) -> list[str]:
    pages = store.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"][len(prefix) :] for p in pages for o in p.get("Contents", []))


def _complete(out: str, manifest: dict[str, Any]) -> None:
    """Every file the manifest names is on the store and readable."""
    for info in manifest["splits"].values():
        for f in info["files"]:
            assert pq.read_table(storage.join(out, f)).num_rows >= 0
        if "store" in info:
            assert storage.list_files(storage.join(out, info["store"]["path"]))
    for entry in manifest["exemplars"].values():
        assert storage.exists(storage.join(out, entry["file"]))


def test_prepare_to_s3_reuses_and_never_exposes_a_partial_dataset(
    bucket: S3,
    local_ray: None,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    inputs = make_inputs(tmp_path / "in")
    cfg = make_config(str(inputs), tmp_path / "exp")
    out = f"s3://{BUCKET}/prep/data"
    cfg.data.output_dir = out

    first = prep.prepare(cfg, log=_quiet)
    assert first["reused"] is False
    prefix = first["prefix"]
    assert prefix.startswith(f"data-{first['fingerprint'][:12]}-")
    names = _objects(bucket, "prep/data/")
    assert mf.MANIFEST in names
    assert all(n.startswith(prefix + "/") for n in names if n != mf.MANIFEST)
    assert f"{prefix}/{mf.REJECTS}" in names and f"{prefix}/train/part-00000.parquet" in names
    on_s3 = mf.read_manifest(out)
    assert on_s3 == {k: v for k, v in first.items() if k != "reused"}
    _complete(out, on_s3)
    # Training's reader maps the token store from a local copy of the prefixed path.
    monkeypatch.setenv("IFT_TOKEN_CACHE", str(tmp_path / "token-cache"))
    train = tdata.load_split(out, on_s3, "train")
    assert len(train) == on_s3["splits"]["train"]["rows"]

    assert prep.prepare(cfg, log=_quiet)["reused"] is True
    # A reuse may rewrite the manifest's `inputs` (fresh hashed_at_ns when the first hash came
    # less than TRUST_NS after the inputs were written); everything else is unchanged.
    reused = mf.read_manifest(out)
    assert {k: v for k, v in reused.items() if k != "inputs"} == {
        k: v for k, v in on_s3.items() if k != "inputs"
    }
    assert [i["digest"] for i in reused["inputs"]] == [i["digest"] for i in on_s3["inputs"]]
    on_s3 = reused

    # A new dataset (another seed) whose upload dies midway: the old manifest still names
    # complete files, and the dead upload is never named by any manifest.
    cfg.experiment.seed = 4
    put, calls = storage._put, []

    def dies_midway(local: str, fs: pafs.FileSystem, dest: str) -> None:
        calls.append(dest)
        if len(calls) == 3:
            raise ConnectionError("upload cut")
        put(local, fs, dest)

    monkeypatch.setattr(storage, "_put", dies_midway)
    with pytest.raises(ConnectionError, match="upload cut"):
        prep.prepare(cfg, log=_quiet)
    monkeypatch.setattr(storage, "_put", put)
    assert len(calls) >= 3
    assert mf.read_manifest(out) == on_s3
    _complete(out, on_s3)

    second = prep.prepare(cfg, log=_quiet)
    assert second["reused"] is False and second["prefix"] != prefix
    assert second["fingerprint"] != first["fingerprint"]
    assert mf.read_manifest(out) == {k: v for k, v in second.items() if k != "reused"}
    # Only the new prefix is left once its manifest is there (pyarrow keeps an empty marker
    # object for the folder itself after deleting under it: "").
    assert {n.split("/")[0] for n in _objects(bucket, "prep/data/")} - {""} == {
        mf.MANIFEST,
        second["prefix"],
    }
    _complete(out, second)
    # Staged on local disk, and the staging folder is gone.
    staging = storage.staging_dir(out)
    assert not [p for p in Path(staging).parent.glob("*") if p.name.startswith(Path(staging).name)]
    _no_local_s3_folder(tmp_path, ROOT)


def _quickstart(workdir: Path, exp: str, data: str) -> Path:
    """configs/quickstart.yaml with small caps and every output folder on S3."""
    raw = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    raw["experiment"]["output_dir"] = exp
    raw["model"]["name_or_path"] = str(ROOT / raw["model"]["name_or_path"])
    caps = {"sst2_train.tsv": 200, "wmt21_de_en.jsonl": 60, "summeval100.jsonl": 20}
    for src in raw["data"]["sources"]:
        cap = caps.get(Path(src["path"]).name)
        src["path"] = str(ROOT / src["path"])
        if cap:
            src["max_records"] = cap
    raw["data"]["output_dir"] = data
    raw["data"]["max_test_records"] = 12
    raw["train"].update({"max_steps": 3, "checkpoint_every": 2, "eval_every": 2})
    raw["train"].pop("epochs", None)
    raw["eval"].update({"max_new_tokens": 4})
    raw["tracking"]["tracking_uri"] = f"sqlite:///{workdir / 'mlflow.db'}"
    path = workdir / "quickstart-s3.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.slow
def test_quickstart_with_every_output_on_s3(bucket: S3, tmp_path: Path) -> None:
    """`ift run` (the real CLI, in a subprocess) with experiment.output_dir and
    data.output_dir on S3: every artifact lands there, nothing named `s3:` locally, and a
    rerun reuses prepare, train and eval."""
    exp, data = f"s3://{BUCKET}/qs/exp", f"s3://{BUCKET}/qs/data"
    config = _quickstart(tmp_path, exp, data)
    env = {**os.environ, "IFT_TOKEN_CACHE": str(tmp_path / "token-cache")}

    def ift_run() -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [sys.executable, "-m", "launcher", "run", str(config)],
            cwd=tmp_path,
            text=True,
            capture_output=True,
            timeout=900,
            env=env,
        )
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        return proc

    ift_run()
    manifest = mf.read_manifest(data)
    assert manifest is not None
    _complete(data, manifest)
    model = _objects(bucket, "qs/exp/model/")
    assert {"config.json", "model.safetensors", "ift_train.json"} <= set(model)
    assert any(n.startswith("tokenizer") for n in model)
    exp_files = _objects(bucket, "qs/exp/")
    assert "deepspeed_config.json" in exp_files
    assert any(n.startswith("checkpoints/") for n in exp_files)
    for role in ("base", "finetuned"):
        preds = storage.read_bytes(f"{exp}/eval/{role}/predictions.jsonl").decode().splitlines()
        assert preds and {"id", "prompt", "prediction", "reference"} <= set(json.loads(preds[0]))
        metrics = storage.read_json(f"{exp}/eval/{role}/metrics.json")
        assert metrics, role
    _no_local_s3_folder(tmp_path, ROOT)

    again = ift_run()
    assert "[prepare] reusing" in again.stdout
    assert "[train] reusing" in again.stdout

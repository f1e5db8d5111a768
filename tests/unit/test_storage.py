"""The filesystem layer every stage writes through (`data_pipeline.storage`), on local paths,
file:// URIs and fsspec's in-memory store (an object store without rename), and the publish
rule of prepared data on an object store (`manifest.publish`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pytest

from data_pipeline import manifest as mf
from data_pipeline import storage


@pytest.fixture(params=["path", "file"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same local folder as a plain path and as a file:// URI."""
    return str(tmp_path / "out") if request.param == "path" else f"file://{tmp_path}/out"


def test_join_keeps_uri_slashes_and_query() -> None:
    assert storage.join("s3://b/x/", "model", "config.json") == "s3://b/x/model/config.json"
    assert storage.join("s3://b/x?scheme=http", "m.json") == "s3://b/x/m.json?scheme=http"
    assert storage.join("/tmp/x", "a", "b") == "/tmp/x/a/b"
    assert storage.suffixed("s3://b/x/?scheme=http", ".rejects") == "s3://b/x.rejects?scheme=http"
    assert storage.suffixed("/tmp/x/", ".rejects") == "/tmp/x.rejects"


def test_local_path_and_staging(tmp_path: Path) -> None:
    assert storage.local_path(f"file://{tmp_path}/a") == f"{tmp_path}/a"
    assert storage.local_path(str(tmp_path)) == str(tmp_path)
    assert storage.local_path("memory://b/a") is None
    # A local output is built next to itself (renamed into place); a remote one on local disk.
    assert storage.staging_dir(f"file://{tmp_path}/a") == f"{tmp_path}/a"
    remote = storage.staging_dir("s3://b/a?scheme=http")
    assert remote == storage.staging_dir("s3://b/a")  # the query is not part of the name
    assert storage.local_path(remote) == remote and "://" not in remote


def test_write_read_list_delete_on_local_storage(root: str, tmp_path: Path) -> None:
    assert storage.read_json(storage.join(root, "m.json")) is None
    storage.write_json(storage.join(root, "sub", "m.json"), {"a": 1})
    storage.write_bytes(storage.join(root, "b.bin"), b"xyz")
    assert storage.read_json(storage.join(root, "sub", "m.json")) == {"a": 1}
    assert storage.read_bytes(storage.join(root, "b.bin")) == b"xyz"
    assert storage.list_files(root) == ["b.bin", "sub/m.json"]
    assert storage.list_dir(root) == ["b.bin", "sub"]
    # Atomic: no temporary file is left next to the target.
    assert sorted(os.listdir(tmp_path / "out")) == ["b.bin", "sub"]
    storage.delete(storage.join(root, "sub"))
    storage.delete(storage.join(root, "missing"))  # no error
    assert storage.list_files(root) == ["b.bin"]
    assert not (tmp_path / "file:").exists()


def test_local_write_is_a_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash while writing leaves the old file whole (the new bytes go to a temp name)."""
    target = tmp_path / "m.json"
    storage.write_json(str(target), {"v": 1})

    def crash(src: str, dst: str) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        storage.write_json(str(target), {"v": 2})
    assert json.loads(target.read_text()) == {"v": 1}
    assert os.listdir(tmp_path) == ["m.json"]


def _folder(path: Path) -> Path:
    (path / "a").mkdir(parents=True)
    (path / "a" / "x.bin").write_bytes(b"1" * 1000)
    (path / "z.txt").write_text("z")
    (path / "done.json").write_text("{}")
    return path


def test_upload_and_download_a_folder(root: str, tmp_path: Path) -> None:
    src = _folder(tmp_path / "src")
    assert storage.upload_folder(str(src), root) == ["a/x.bin", "done.json", "z.txt"]
    assert storage.list_files(root) == ["a/x.bin", "done.json", "z.txt"]
    storage.download_folder(root, str(tmp_path / "back"))
    assert (tmp_path / "back" / "a" / "x.bin").read_bytes() == b"1" * 1000


def test_upload_writes_the_marker_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _folder(tmp_path / "src")
    order: list[str] = []
    put = storage._put

    def record(local: str, fs: pafs.FileSystem, dest: str) -> None:
        order.append(os.path.relpath(local, src))
        put(local, fs, dest)

    monkeypatch.setattr(storage, "_put", record)
    storage.upload_folder(str(src), "memory://bucket/up", last=["done.json"])
    assert sorted(order[:-1]) == ["a/x.bin", "z.txt"] and order[-1] == "done.json"
    assert storage.list_files("memory://bucket/up") == ["a/x.bin", "done.json", "z.txt"]


def test_cached_copy_downloads_once_per_version(tmp_path: Path) -> None:
    uri = "memory://bucket/model"
    storage.upload_folder(str(_folder(tmp_path / "src")), uri)
    cache = str(tmp_path / "cache")
    first = storage.cached_copy(uri, cache, required="done.json")
    assert Path(first, "a", "x.bin").read_bytes() == b"1" * 1000
    assert storage.cached_copy(uri, cache) == first
    storage.write_bytes(storage.join(uri, "z.txt"), b"changed, longer")
    second = storage.cached_copy(uri, cache)
    assert second != first and Path(second, "z.txt").read_bytes() == b"changed, longer"
    with pytest.raises(FileNotFoundError, match="no config.json"):
        storage.cached_copy(uri, cache, required="config.json")


def _dataset(tmp: Path, fingerprint: str) -> dict[str, Any]:
    """A finished dataset folder as `write_dataset` leaves it, and its manifest."""
    (tmp / "train").mkdir(parents=True)
    (tmp / "store" / "train").mkdir(parents=True)
    (tmp / "train" / "part-00000.parquet").write_bytes(fingerprint.encode())
    (tmp / "store" / "train" / "index.json").write_text("{}")
    (tmp / mf.REJECTS).write_text("")
    return {
        "fingerprint": fingerprint,
        "config_hash": fingerprint,
        "splits": {
            "train": {"files": ["train/part-00000.parquet"], "store": {"path": "store/train"}}
        },
        "exemplars": {},
    }


def test_publish_on_object_store_new_prefix_manifest_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = "memory://bucket/data"
    first = mf.publish(str(tmp_path / "t1"), out, _dataset(tmp_path / "t1", "a" * 64))
    assert first["prefix"].startswith("data-aaaaaaaaaaaa-")
    assert first["splits"]["train"]["files"] == [f"{first['prefix']}/train/part-00000.parquet"]
    assert first["splits"]["train"]["store"]["path"] == f"{first['prefix']}/store/train"
    assert mf.read_manifest(out) == first
    assert not (tmp_path / "t1").exists()

    # An upload that fails midway: the old manifest still names complete, readable files.
    calls = []
    put = storage._put

    def fail_second(local: str, fs: pafs.FileSystem, dest: str) -> None:
        calls.append(dest)
        if len(calls) == 2:
            raise OSError("connection reset")
        put(local, fs, dest)

    monkeypatch.setattr(storage, "_put", fail_second)
    monkeypatch.setattr(storage, "IO_THREADS", 1)
    with pytest.raises(OSError, match="connection reset"):
        mf.publish(str(tmp_path / "t2"), out, _dataset(tmp_path / "t2", "b" * 64))
    assert mf.read_manifest(out) == first
    f = first["splits"]["train"]["files"][0]
    assert storage.read_bytes(storage.join(out, f)) == b"a" * 64
    monkeypatch.undo()

    third = mf.publish(str(tmp_path / "t3"), out, _dataset(tmp_path / "t3", "c" * 64))
    assert mf.read_manifest(out) == third
    # Older prefixes are gone once the new manifest is there.
    assert storage.list_dir(out) == sorted([third["prefix"], mf.MANIFEST])


def test_publish_locally_is_the_swap(tmp_path: Path) -> None:
    out = str(tmp_path / "data")
    m = mf.publish(str(tmp_path / "t1"), out, _dataset(tmp_path / "t1", "a" * 64))
    assert "prefix" not in m and m["splits"]["train"]["files"] == ["train/part-00000.parquet"]
    assert sorted(os.listdir(out)) == [mf.MANIFEST, mf.REJECTS, "store", "train"]
    assert mf.read_manifest(f"file://{out}") == m


def test_config_refuses_what_cannot_work_on_object_storage() -> None:
    """Named by key, before any cluster resource starts (`from_dict` runs every check)."""
    from launcher.config import ConfigError, from_dict

    raw: dict[str, Any] = {
        "experiment": {"output_dir": "s3://b/exp?endpoint_override=h:9"},
        "model": {"name_or_path": "s3://b/model"},
        "data": {
            "sources": [{"path": "s3://b/hf", "template": "sst2", "format": "hf"}],
            "output_dir": "https://host/data",
        },
        "train": {"ds_config": "s3://b/ds.json"},
        "tracking": {"tracking_uri": "sqlite:///s3://b/mlflow.db"},
    }
    with pytest.raises(ConfigError) as err:
        from_dict(raw)
    text = str(err.value)
    for key in (
        "experiment.output_dir: options in a URI query",
        "data.output_dir: https:// cannot be written",
        "model.name_or_path: s3://b/model is a URI",
        "train.ds_config: s3://b/ds.json must be a local file",
        "data.sources.0.path: a `datasets` save_to_disk folder",
        "tracking.tracking_uri: SQLite needs a local file",
    ):
        assert key in text, key
    # Outputs on S3 with everything else local are fine.
    ok = {
        "experiment": {"output_dir": "s3://b/exp"},
        "model": {"name_or_path": "m"},
        "data": {"sources": [{"path": "s3://b/in.jsonl", "template": "sst2"}]},
    }
    assert from_dict(ok).data_dir == "s3://b/exp/data"

"""Weighted mixing in the prepare job, on a real local Ray and the real samples.

Two sources weighted 3:1 (SST-2, 2000 records: sampled below its size; WMT, 200 records:
repeated) and a source pinned to test whose weight is ignored. The train split follows the
rule (`data_pipeline.mix`) exactly, is the same with 1 and 2 workers, and validation and test
are the unweighted run's.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline import prepare as prep
from data_pipeline.mix import mix_counts
from launcher.config import from_dict, resolve_paths
from tests.ray_local import start_local_ray

ray = pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "assets" / "data"
TOKENIZER = ROOT / "tests" / "assets" / "models" / "stories260K"

pytestmark = pytest.mark.integration

Example = tuple[tuple[int, ...], tuple[int, ...]]


def _quiet(_: str) -> None:
    pass


def mix_config(out: Path, weights: tuple[float, float] | None, num_workers: int) -> Any:
    sst2: dict[str, Any] = {"path": str(DATA / "sst2" / "train.tsv"), "template": "sst2"}
    wmt: dict[str, Any] = {
        "path": str(DATA / "wmt21" / "newstest2021.de-en.jsonl"),
        "template": "wmt",
        "params": {"source_lang": "de", "target_lang": "en"},
    }
    pinned: dict[str, Any] = {
        "path": str(DATA / "sst2" / "test.tsv"),
        "template": "sst2",
        "name": "sst2_pinned",
        "split": "test",
    }
    if weights is not None:
        sst2["weight"], wmt["weight"] = weights
        pinned["weight"] = 50.0  # pinned to test: no train examples, the weight is ignored
    raw = {
        "experiment": {"name": "mix", "output_dir": str(out), "seed": 7},
        "model": {"name_or_path": str(TOKENIZER)},
        "data": {
            "sources": [sst2, wmt, pinned],
            "split": {"train": 0.8, "validation": 0.1, "test": 0.1},
            "max_seq_len": 256,
            "truncation": "drop",
            "exemplars": 2,
            "num_workers": num_workers,
        },
        "tracking": {"enabled": False},
    }
    return resolve_paths(from_dict(raw))


def read_split(cfg: Any, manifest: dict[str, Any], name: str) -> pa.Table:
    folder = Path(cfg.data_dir)
    return pa.concat_tables([pq.read_table(folder / f) for f in manifest["splits"][name]["files"]])


def examples(table: pa.Table) -> list[Example]:
    """(input_ids, labels) of every example, packed rows cut at `seq_lens`."""
    out = []
    for ids, labels, lens in zip(
        table["input_ids"].to_pylist(),
        table["labels"].to_pylist(),
        table["seq_lens"].to_pylist(),
        strict=True,
    ):
        start = 0
        for n in lens:
            # Packing masks an example's first label: compare the tokens after it.
            out.append((tuple(ids[start : start + n]), tuple(labels[start + 1 : start + n])))
            start += n
    return out


@pytest.fixture(scope="module")
def local_ray():
    start_local_ray()
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def runs(local_ray, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("mixing")
    out = {}
    for key, weights, workers in (
        ("plain", None, 1),
        ("mixed1", (3.0, 1.0), 1),
        ("mixed2", (3.0, 1.0), 2),
    ):
        cfg = mix_config(work / key, weights, workers)
        out[key] = (cfg, prep.prepare(cfg, log=_quiet))
    return out


def test_train_counts_follow_the_rule_and_validation_test_are_untouched(runs) -> None:
    (plain_cfg, plain), (cfg, mixed) = runs["plain"], runs["mixed1"]
    assert "mix" not in plain  # an unweighted manifest is as before
    kept = [plain["splits"]["train"]["per_task"][t] for t in ("sst2", "wmt", "sst2_pinned")]
    assert kept[0] > 1000 and 100 < kept[1] < 200 and kept[2] == 0
    n = sum(kept)
    targets = mix_counts(kept, [3.0, 1.0, 0.0], None)
    assert targets == [round(n * 3 / 4), round(n / 4), 0]
    assert targets[0] < kept[0] and targets[1] > 2 * kept[1]  # a sample; whole passes + a sample

    entries = mixed["mix"]["sources"]
    assert mixed["mix"]["total"] == n
    assert [e["kept"] for e in entries] == kept
    assert [e["mixed"] for e in entries] == targets
    assert [e["weight"] for e in entries] == [3.0, 1.0, 0.0]
    assert entries[1]["passes"] == targets[1] // kept[1]
    assert entries[1]["sampled"] == targets[1] % kept[1]
    assert [e["repeats"] for e in entries] == [0, targets[1] - kept[1], 0]
    train = mixed["splits"]["train"]
    assert train["per_task"] == {"sst2": targets[0], "wmt": targets[1], "sst2_pinned": 0}
    assert train["examples"] == sum(targets)
    assert train["store"]["examples"] == sum(targets)

    # The examples themselves: each one a kept train row of the unweighted run, sst2 ones
    # (completion "positive"/"negative") sampled once at most, wmt ones q or q + 1 times.
    plain_train = collections.Counter(examples(read_split(plain_cfg, plain, "train")))
    assert max(plain_train.values()) == 1
    counts = collections.Counter(examples(read_split(cfg, mixed, "train")))
    assert sum(counts.values()) == sum(targets)
    assert set(counts) <= set(plain_train)
    test = read_split(plain_cfg, plain, "test")
    sst2_completions = {
        tuple(x for x in labels if x != -100)
        for labels, task in zip(test["labels"].to_pylist(), test["task"].to_pylist(), strict=True)
        if task == "sst2"
    }
    assert len(sst2_completions) == 2

    def is_sst2(example: Example) -> bool:
        return tuple(x for x in example[1] if x != -100) in sst2_completions

    per_source: dict[str, collections.Counter[int]] = {
        "sst2": collections.Counter(),
        "wmt": collections.Counter(),
    }
    for example, times in counts.items():
        per_source["sst2" if is_sst2(example) else "wmt"][times] += 1
    assert per_source["sst2"] == {1: targets[0]}
    q, r = divmod(targets[1], kept[1])
    assert per_source["wmt"] == {q: kept[1] - r, q + 1: r}

    # Validation and test as without weights, row for row; so are their manifest entries.
    for name in ("validation", "test"):
        assert read_split(cfg, mixed, name).equals(read_split(plain_cfg, plain, name)), name
        assert mixed["splits"][name] == plain["splits"][name]
    assert mixed["fingerprint"] != plain["fingerprint"]


def test_same_mixture_with_1_and_2_workers(runs) -> None:
    (cfg1, m1), (cfg2, m2) = runs["mixed1"], runs["mixed2"]
    assert m1["fingerprint"] == m2["fingerprint"]
    assert m1["mix"] == m2["mix"] and m1["splits"] == m2["splits"]
    assert m1["exemplars"] == m2["exemplars"]
    for name in ("train", "validation", "test"):
        assert read_split(cfg1, m1, name).equals(read_split(cfg2, m2, name)), name


def test_mixture_counts_logged_to_mlflow(runs, tmp_path: Path) -> None:
    import mlflow

    from launcher.tracking import Tracker

    cfg, manifest = runs["mixed1"]
    cfg = cfg.model_copy(deep=True)
    cfg.tracking.enabled = True
    cfg.tracking.tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(cfg)
    with tracker.pipeline("prepare", ""), tracker.stage("prepare") as run:
        tracker.log_prepare(run, manifest, cfg.data_dir)
        run_id = run.info.run_id
    logged = mlflow.MlflowClient(cfg.tracking.tracking_uri).get_run(run_id).data
    for i, entry in enumerate(manifest["mix"]["sources"]):
        name = f"{i}_{entry['task']}"
        assert logged.metrics[f"data/mix/{name}/kept"] == entry["kept"]
        assert logged.metrics[f"data/mix/{name}/mixed"] == entry["mixed"]
        assert logged.metrics[f"data/mix/{name}/repeats"] == entry["repeats"]
        assert logged.params[f"data.mix.{name}.weight"] == str(entry["weight"])
        assert logged.params[f"data.mix.{name}.mixed"] == str(entry["mixed"])
    assert logged.params["data.mix.total"] == str(manifest["mix"]["total"])

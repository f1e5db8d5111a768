"""Faults and load for `ift prepare`: the real CLI in a subprocess, on the quickstart data.

- A SIGKILL midway (once the job has spilled worker output to its temporary folder) leaves no
  manifest, and the rerun finishes with the fingerprint of an uninterrupted run.
- Peak memory (driver + Ray workers) stays flat when the input grows tenfold (10x -> 100x).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "tests" / "assets" / "quickstart"
TOKENIZER = ROOT / "tests" / "assets" / "models" / "stories260K"

pytestmark = pytest.mark.integration
# prepare's checkpoint period in seconds (data_pipeline/prepare.py reads it; a test hook).
CHECKPOINT_ENV = "IFT_TEST_PREPARE_CHECKPOINT_S"


def quickstart_inputs(folder: Path, scale: int) -> dict[str, Path]:
    """The quickstart sources, `scale` times over: copy 0 is the files byte for byte, copy j
    prefixes every sentence (or German segment) with `j ` so that no record repeats."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in ("sst2_train.tsv", "sst2_test.tsv"):
        header, *body = (QUICKSTART / name).read_text().splitlines(keepends=True)
        lines = [header] + [
            line if j == 0 else f"{j} {line}" for j in range(scale) for line in body
        ]
        (folder / name).write_text("".join(lines))
        out[name] = folder / name
    rows = [json.loads(x) for x in (QUICKSTART / "wmt21_de_en.jsonl").read_text().splitlines()]
    with (folder / "wmt.jsonl").open("w") as f:
        for j in range(scale):
            for row in rows:
                de = row["de"] if j == 0 else f"{j} {row['de']}"
                f.write(json.dumps({"de": de, "en": row["en"]}, ensure_ascii=False) + "\n")
    out["wmt"] = folder / "wmt.jsonl"
    return out


def quickstart_config(tmp: Path, scale: int = 1, **data: Any) -> Path:
    """configs/quickstart.yaml's data section (caps scaled with the input) as a config file."""
    inputs = quickstart_inputs(tmp / "in", scale)
    cfg = {
        "experiment": {"name": "prep", "output_dir": str(tmp / "run"), "seed": 42},
        "model": {"name_or_path": str(TOKENIZER)},
        "data": {
            "sources": [
                {
                    "path": str(inputs["sst2_train.tsv"]),
                    "template": "sst2",
                    "max_records": 4000 * scale,
                },
                {
                    "path": str(inputs["sst2_test.tsv"]),
                    "template": "sst2",
                    "name": "sst2_dev",
                    "split": "test",
                },
                {
                    "path": str(inputs["wmt"]),
                    "template": "wmt",
                    "params": {"source_lang": "de", "target_lang": "en"},
                    "max_records": 500 * scale,
                },
            ],
            "split": {"train": 0.9, "validation": 0.03, "test": 0.07},
            "max_seq_len": 256,
            "truncation": "left",
            "packing": True,
            "num_workers": 2,
            **data,
        },
        "cluster": {"num_cpus": 2},
        "tracking": {"enabled": False},
    }
    path = tmp / "prepare.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def start_prepare(cfg: Path, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local Ray, always
    return subprocess.Popen(
        [sys.executable, "-m", "launcher", "prepare", str(cfg)],
        cwd=ROOT,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, to kill it whole
    )


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL `proc`'s process group and every process it started (Ray daemons may sit in
    their own session: end exactly those)."""
    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree, timeout=30)


class PeakRss:
    """Samples the memory of a process and of its Ray workers every 50 ms in a thread.

    RSS counts pages of shared memory too (Ray's object store, which the driver maps to read
    the workers' output, and memory-mapped files); `anon` is RSS without them: the memory
    the process itself allocated.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = dict.fromkeys(
            ["driver", "driver_anon", "workers", "workers_anon", "total", "total_anon"], 0
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                root = psutil.Process(self.pid)
                mem = root.memory_info()
                now = {"driver": mem.rss, "driver_anon": mem.rss - mem.shared}
                now["workers"] = now["workers_anon"] = 0
                for p in root.children(recursive=True):
                    try:
                        if "default_worker.py" in " ".join(p.cmdline()):
                            mem = p.memory_info()
                            now["workers"] += mem.rss
                            now["workers_anon"] += mem.rss - mem.shared
                    except psutil.Error:
                        pass
            except psutil.Error:
                return
            now["total"] = now["driver"] + now["workers"]
            now["total_anon"] = now["driver_anon"] + now["workers_anon"]
            self.peak = {k: max(v, now[k]) for k, v in self.peak.items()}
            time.sleep(0.05)

    def stop(self) -> dict[str, float]:
        """Peak MiB of each measure (driver and workers, RSS and anonymous)."""
        self._stop.set()
        self._thread.join()
        return {f"{k}_mib": v / (1 << 20) for k, v in self.peak.items()}


# On a loaded 2-CPU machine a local Ray sometimes misses its fixed 30 s start-up deadline
# (ray/_private/node.py); that is the machine, not prepare, so such a start is retried.
RAY_START_FAILED = "timed out during startup"


def run_prepare(cfg: Path, log: Path, timeout: float = 900) -> dict[str, float]:
    """Run `ift prepare` to the end; returns its peak memory (MiB)."""
    for _ in range(3):
        proc = start_prepare(cfg, log)
        peak = PeakRss(proc.pid)
        try:
            rc = proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                kill_tree(proc)
        out = peak.stop()
        if rc == 0 or RAY_START_FAILED not in log.read_text():
            break
    assert rc == 0, log.read_text()[-3000:]
    return out


def manifest(cfg: Path) -> dict[str, Any]:
    raw = yaml.safe_load(cfg.read_text())
    return json.loads(
        (Path(raw["experiment"]["output_dir"]) / "data" / "manifest.json").read_text()
    )


@pytest.mark.slow
def test_prepare_killed_midway_leaves_no_manifest_and_rerun_matches(tmp_path: Path) -> None:
    cfg = quickstart_config(tmp_path / "a")
    data_dir = tmp_path / "a" / "run" / "data"
    # The uninterrupted reference, on the same input bytes in another folder.
    reference_cfg = quickstart_config(tmp_path / "ref")
    run_prepare(reference_cfg, tmp_path / "ref.log")
    reference = manifest(reference_cfg)

    def spilling() -> bool:  # midway: the workers' first output is in the temporary folder
        return any(p.stat().st_size for p in data_dir.parent.glob("data.tmp-*/.spill/*.arrow"))

    log = tmp_path / "killed.log"
    for _ in range(3):
        proc = start_prepare(cfg, log)
        try:
            while not spilling() and proc.poll() is None:
                time.sleep(0.02)
        finally:
            kill_tree(proc)
        if spilling() or RAY_START_FAILED not in log.read_text():
            break
    assert spilling(), log.read_text()[-3000:]
    assert not (data_dir / "manifest.json").exists() and not data_dir.exists()

    run_prepare(cfg, tmp_path / "rerun.log")
    again = manifest(cfg)
    assert "reusing" not in (tmp_path / "rerun.log").read_text()
    assert again["fingerprint"] == reference["fingerprint"]
    assert again["splits"] == reference["splits"]
    assert again["exemplars"] == reference["exemplars"] and again["exemplars"]
    for entry in again["exemplars"].values():
        rel = entry["file"]
        assert (data_dir / rel).read_bytes() == (tmp_path / "ref/run/data" / rel).read_bytes()
    # The killed run's temporary folder (its process is gone) was removed by the rerun.
    assert not list(data_dir.parent.glob("data.tmp-*"))


@pytest.mark.slow
def test_prepare_killed_after_a_checkpoint_resumes_there(tmp_path: Path) -> None:
    """A prepare killed once its spill has checkpointed some units resumes from them (it does
    not redo them) and ends with the fingerprint of an uninterrupted run."""
    cfg = quickstart_config(tmp_path / "a", scale=10)
    data_dir = tmp_path / "a" / "run" / "data"
    reference_cfg = quickstart_config(tmp_path / "ref", scale=10)
    run_prepare(reference_cfg, tmp_path / "ref.log")
    reference = manifest(reference_cfg)

    def units_done() -> int:
        for path in data_dir.parent.glob("data.tmp-*/.spill/progress.json"):
            try:
                return int(json.loads(path.read_text())["units_done"])
            except (OSError, ValueError):  # being replaced right now
                pass
        return 0

    log = tmp_path / "killed.log"
    os.environ[CHECKPOINT_ENV] = "0"  # a checkpoint at every unit's end
    try:
        for _ in range(3):
            proc = start_prepare(cfg, log)
            try:
                while units_done() < 3 and proc.poll() is None:
                    time.sleep(0.02)
            finally:
                kill_tree(proc)
            if units_done() >= 3 or RAY_START_FAILED not in log.read_text():
                break
    finally:
        del os.environ[CHECKPOINT_ENV]
    done = units_done()
    assert done >= 3, log.read_text()[-3000:]
    assert not (data_dir / "manifest.json").exists()

    run_prepare(cfg, tmp_path / "rerun.log")
    text = (tmp_path / "rerun.log").read_text()
    resumed = [line for line in text.splitlines() if "resuming a killed run" in line]
    assert resumed, text[-3000:]
    start = int(resumed[0].rsplit("unit ", 1)[1].split("/")[0])
    assert start >= done  # at least the units checkpointed before the kill are not redone
    again = manifest(cfg)
    assert again["fingerprint"] == reference["fingerprint"]
    assert again["splits"] == reference["splits"]
    assert again["rejected"] == reference["rejected"]
    assert not list(data_dir.parent.glob("data.tmp-*"))


@pytest.mark.slow
def test_peak_memory_flat_from_10x_to_100x_input(tmp_path: Path) -> None:
    """The quickstart data 10 and 100 times over (54k and 537k records): the anonymous memory
    of the driver, of the workers and of both together may grow by at most 15%.

    From 10x, not 1x: 5k records end before the allocators' free lists, Ray's buffers and the
    packing window have filled (1x -> 10x: +6 to +12% of driver memory that then stays flat),
    and a test at the edge of its bound fails by chance. 10x -> 100x measured +6 to +9% on
    2026-12-08. Per-record state in the driver is `test_driver_memory_flat_at_5m_records`'s.
    """
    peaks = {}
    for scale in (10, 100):
        cfg = quickstart_config(tmp_path / f"x{scale}", scale)
        peaks[scale] = run_prepare(cfg, tmp_path / f"x{scale}.log")
        examples = sum(s["examples"] for s in manifest(cfg)["splits"].values())
        peaks[scale]["examples"] = examples
    print(json.dumps(peaks, indent=1))
    assert peaks[100]["examples"] > 9.5 * peaks[10]["examples"]
    # Anonymous memory: RSS also counts the pages of Ray's object store that a process has
    # touched (in every process that maps them) and the memory-mapped spill, both page cache.
    for key in ("driver_anon_mib", "workers_anon_mib", "total_anon_mib"):
        assert peaks[100][key] < 1.15 * peaks[10][key], (key, peaks)


def synthetic_config(tmp: Path, records: int) -> Path:
    """`records` distinct short SST-2-style lines (two pseudo-random words and a label) in one
    TSV: the per-record costs of prepare with as little tokenizer work as possible."""
    tmp.mkdir(parents=True, exist_ok=True)
    words = [w for w in (QUICKSTART / "sst2_train.tsv").read_text().split() if w.isalpha()]
    words = sorted(set(words))[:1000]
    with (tmp / "train.tsv").open("w") as f:
        f.write("sentence\tlabel\n")
        for start in range(0, records, 100_000):
            f.write(
                "".join(
                    f"{words[i % 997]} {words[i // 997 % 1000]} {i}\t{i % 2}\n"
                    for i in range(start, min(records, start + 100_000))
                )
            )
    cfg = {
        "experiment": {"name": "scale", "output_dir": str(tmp / "run"), "seed": 1},
        "model": {"name_or_path": str(TOKENIZER)},
        "data": {
            "sources": [{"path": str(tmp / "train.tsv"), "template": "sst2"}],
            "split": {"train": 0.9, "validation": 0.05, "test": 0.05},
            "max_seq_len": 256,
            "packing": True,
            "num_workers": 2,
        },
        "cluster": {"num_cpus": 2},
        "tracking": {"enabled": False},
    }
    path = tmp / "prepare.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_driver_memory_flat_at_5m_records(tmp_path: Path) -> None:
    """The driver keeps nothing per record in memory (keys, selection and packing work from
    disk): 5M records may add at most 40 MiB (8 B/record) of anonymous driver memory over
    50k, so the 37 B/record that the driver kept before (or 20 B) would fail it."""
    peaks, examples = {}, {}
    for records in (50_000, 5_000_000):
        cfg = synthetic_config(tmp_path / f"n{records}", records)
        peaks[records] = run_prepare(cfg, tmp_path / f"n{records}.log", timeout=1800)
        examples[records] = sum(s["examples"] for s in manifest(cfg)["splits"].values())
    print(json.dumps({"peaks": peaks, "examples": examples}, indent=1))
    assert examples[5_000_000] > 0.99 * 5_000_000
    growth = peaks[5_000_000]["driver_anon_mib"] - peaks[50_000]["driver_anon_mib"]
    assert growth < 40, peaks

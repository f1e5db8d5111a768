"""Benchmark `ift prepare` against `datasets.map` and the raw tokenizer, in one run.

    python benchmarks/prepare.py [--repeat 2] [--scale 10]

Input: the real SST-2 train set (60,614 phrases, gzipped TSV) and the Alpaca demo (999
records), tokenized with GPT-2 at max_seq_len 512 (see benchmarks/data/NOTICE.md). Measured:

* ift: `prepare()` on a local Ray with 2 CPUs. Ray start-up is reported on its own; the first
  prepare (cold: Ray's worker processes import ift and build the tokenizer, the driver
  imports transformers) too; the steady-state time is the best of the later runs (workers
  warm), each into a fresh output folder so nothing is reused.
* datasets.map: `load_dataset` of the same files, then `map(batched=True, num_proc=2)` doing
  the same templates (ift's own), tokenization (the same tokenizer, via transformers) and
  prompt masking (ift's own `tokenize_turns`, as the workers call it); best of `--repeat`
  runs, caching off.
* ceiling: `tokenizers` `encode_batch` of the same prompt and completion texts, already
  rendered, with its Rust thread pool on both cores: tokenization alone, no I/O, no Python.
* packing efficiency of the train split at 512, and peak memory (RSS of the driver and of
  the Ray workers, sampled every 20 ms in runs of their own, as the sampler takes CPU) on
  the input and on the input repeated `--scale` times (each copy's text given a suffix so
  that dedupe keeps it).

Writes benchmarks/results/prepare.json and prints a table. The CPUs of the machine may be
shared with other jobs: compare ratios taken in the same run, not times across runs.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

HERE = Path(__file__).resolve().parent
# Run as a file, this folder comes first on sys.path, where benchmarks/eval.py would shadow the
# `eval` package that launcher.config imports.
if sys.path and Path(sys.path[0]).resolve() == HERE:
    sys.path.pop(0)
DATA = HERE / "data"
SST2 = DATA / "sst2_train.tsv.gz"
ALPACA = DATA / "alpaca_en_demo.json"
TOKENIZER = DATA / "gpt2"
RESULTS = HERE / "results" / "prepare.json"
MAX_SEQ_LEN = 512
CPUS = 2

# Ray workers tokenize on the one CPU each was given; the ceiling turns the pool back on.
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def config(sst2: Path, alpaca: Path, out: Path) -> Any:
    from launcher.config import from_dict, resolve_paths

    raw = {
        "experiment": {"name": "bench", "output_dir": str(out), "seed": 0},
        "model": {"name_or_path": str(TOKENIZER)},
        "data": {
            "sources": [
                {"path": str(sst2), "template": "sst2"},
                {"path": str(alpaca), "template": "alpaca"},
            ],
            "max_seq_len": MAX_SEQ_LEN,
            "truncation": "left",
            "num_workers": CPUS,
        },
        "tracking": {"enabled": False},
    }
    return resolve_paths(from_dict(raw))


class PeakRss:
    """Samples the memory of this process and of the Ray workers that ran prepare's tasks
    until stopped. A worker counts from its first `process_unit` task on, idle or not (it
    keeps the built tokenizer).

    Two measures: RSS, and its anonymous part (RssAnon: the process's own heap). RSS also
    counts file-backed pages (the driver's memory-mapped spill files) and the pages of Ray's
    shared-memory object store a process has touched (a worker writes its results there, the
    driver reads them zero-copy), which belong to the page cache and to Ray's store, whose
    size Ray bounds (and spills to disk past it), not to prepare.
    """

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.driver = self.driver_anon = 0
        self.workers = self.workers_anon = 0
        self.total = self.total_anon = 0
        self._pids: dict[int, psutil.Process] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            driver, driver_anon = me.memory_info().rss, _rss_anon("self")
            for p in me.children(recursive=True):
                if p.pid in self._pids:
                    continue
                try:
                    if "process_unit" in " ".join(p.cmdline()[:1]):
                        self._pids[p.pid] = p
                except psutil.Error:
                    continue
            workers = workers_anon = 0
            for p in list(self._pids.values()):
                try:
                    workers += p.memory_info().rss
                    workers_anon += _rss_anon(str(p.pid))
                except psutil.Error:
                    continue
            self.driver = max(self.driver, driver)
            self.driver_anon = max(self.driver_anon, driver_anon)
            self.workers = max(self.workers, workers)
            self.workers_anon = max(self.workers_anon, workers_anon)
            self.total = max(self.total, driver + workers)
            self.total_anon = max(self.total_anon, driver_anon + workers_anon)
            self._stop.wait(self.interval)


def _rss_anon(pid: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_ift(sst2: Path, alpaca: Path, out: Path) -> tuple[float, dict[str, Any]]:
    """One prepare into a fresh folder, timed (no memory sampler running beside it)."""
    from data_pipeline.prepare import prepare

    shutil.rmtree(out, ignore_errors=True)
    cfg = config(sst2, alpaca, out)
    t0 = time.perf_counter()
    manifest = prepare(cfg, log=lambda _: None)
    elapsed = time.perf_counter() - t0
    assert not manifest["reused"]
    return elapsed, manifest


def peak_memory(sst2: Path, alpaca: Path, out: Path) -> PeakRss:
    """One more prepare with the RSS sampler on (its 50 Hz scans of the process tree take CPU,
    so the timed runs go without it)."""
    with PeakRss() as rss:
        run_ift(sst2, alpaca, out)
    return rss


# --- baselines ------------------------------------------------------------------------------


def _map_batch(batch: dict[str, list[Any]], template: str) -> dict[str, list[Any]]:
    """Template + tokenize + mask one batch with ift's own code (`tokenize_turns`), the
    tokenizer loaded through transformers."""
    from data_pipeline import templates
    from data_pipeline.worker import tokenize_turns

    tok = _tokenizer()
    keys = list(batch)
    records = [dict(zip(keys, values, strict=True)) for values in zip(*batch.values(), strict=True)]
    turns = [templates.render(template, r, {}) for r in records]
    built, _ = tokenize_turns(
        turns,
        lambda texts: tok(texts, add_special_tokens=False)["input_ids"],
        bos_id=None,
        eos_id=tok.eos_token_id,
        max_seq_len=MAX_SEQ_LEN,
        truncation="left",
    )
    # Over-length examples are left out (LengthError), as ift rejects them.
    cuts = built.offsets[1:-1]
    return {"input_ids": np.split(built.input_ids, cuts), "labels": np.split(built.labels, cuts)}


_TOK: Any = None


def _tokenizer() -> Any:
    global _TOK
    if _TOK is None:
        from transformers import AutoTokenizer

        _TOK = AutoTokenizer.from_pretrained(str(TOKENIZER))
    return _TOK


def run_datasets_map(cache: Path) -> tuple[float, int]:
    import datasets

    shutil.rmtree(cache, ignore_errors=True)
    datasets.disable_caching()
    datasets.disable_progress_bars()
    t0 = time.perf_counter()
    sst2 = datasets.load_dataset(
        "csv", data_files=str(SST2), delimiter="\t", split="train", cache_dir=str(cache)
    )
    alpaca = datasets.load_dataset(
        "json", data_files=str(ALPACA), split="train", cache_dir=str(cache)
    )
    rows = 0
    for ds, template in ((sst2, "sst2"), (alpaca, "alpaca")):
        mapped = ds.map(
            _map_batch,
            batched=True,
            num_proc=CPUS,
            fn_kwargs={"template": template},
            remove_columns=ds.column_names,
            load_from_cache_file=False,
        )
        rows += len(mapped)
    return time.perf_counter() - t0, rows


def rendered_texts() -> list[str]:
    from data_pipeline import sources, templates

    texts = []
    for path, fmt, template in ((SST2, "tsv", "sst2"), (ALPACA, "json", "alpaca")):
        for _, rec in sources.parse_bytes(path.read_bytes(), str(path), fmt):
            texts += [t for pair in templates.render(template, rec, {}) for t in pair]  # type: ignore[arg-type]
    return texts


def run_ceiling(texts: list[str]) -> tuple[float, int]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(TOKENIZER / "tokenizer.json"))
    tok.no_truncation()
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        t0 = time.perf_counter()
        encodings = tok.encode_batch(texts, add_special_tokens=False)
        elapsed = time.perf_counter() - t0
    finally:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    return elapsed, sum(len(e.ids) for e in encodings)


def scaled_inputs(folder: Path, scale: int) -> tuple[Path, Path]:
    """The inputs repeated `scale` times, each copy's text marked so dedupe keeps it."""
    lines = gzip.decompress(SST2.read_bytes()).decode().splitlines(keepends=True)
    header, body = lines[0], lines[1:]
    sst2 = folder / "sst2_x.tsv.gz"
    with gzip.open(sst2, "wt") as f:
        f.write(header)
        for k in range(scale):
            for line in body:
                sentence, label = line.rstrip("\n").rsplit("\t", 1)
                f.write(f"{sentence} ({k})\t{label}\n" if k else line)
    records = json.loads(ALPACA.read_text())
    alpaca = folder / "alpaca_x.json"
    alpaca.write_text(
        json.dumps(
            [
                {**r, "instruction": f"{r['instruction']} ({k})" if k else r["instruction"]}
                for k in range(scale)
                for r in records
            ]
        )
    )
    return sst2, alpaca


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="steady-state runs of each")
    parser.add_argument("--scale", type=int, default=10, help="input growth for the memory check")
    args = parser.parse_args()

    import ray

    work = Path(tempfile.mkdtemp(prefix="ift-bench-prepare-"))
    try:
        texts = rendered_texts()
        records = sum(1 for _ in texts) // 2
        ceiling = [run_ceiling(texts) for _ in range(args.repeat)]
        t_ceiling, ceiling_tokens = min(ceiling)
        print(f"ceiling {[round(t, 2) for t, _ in ceiling]} s", flush=True)

        hf = [run_datasets_map(work / "hf_cache") for _ in range(args.repeat)]
        t_datasets, datasets_rows = min(hf)
        print(f"datasets.map {[round(t, 2) for t, _ in hf]} s", flush=True)

        t0 = time.perf_counter()
        ray.init(
            address="local",
            num_cpus=CPUS,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            logging_level=logging.ERROR,
            log_to_driver=False,
        )
        t_ray = time.perf_counter() - t0
        runs = [run_ift(SST2, ALPACA, work / f"ift{i}") for i in range(args.repeat + 1)]
        t_cold, _ = runs[0]
        print(f"ift {[round(r[0], 2) for r in runs]} s (ray.init {t_ray:.1f} s)", flush=True)
        t_ift, manifest = min(runs[1:], key=lambda r: r[0])
        rss_1x = peak_memory(SST2, ALPACA, work / "ift_mem")
        big_sst2, big_alpaca = scaled_inputs(work, args.scale)
        t_big, manifest_big = run_ift(big_sst2, big_alpaca, work / "ift_big")
        print(f"ift x{args.scale} {t_big:.2f} s", flush=True)
        rss_big = peak_memory(big_sst2, big_alpaca, work / "ift_big_mem")
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    splits = manifest["splits"]
    examples = sum(s["examples"] for s in splits.values())
    tokens = sum(s["tokens"] for s in splits.values())
    mib = 1 << 20
    measurements = {
        "records": records,
        "ift_examples": examples,
        "ift_tokens": tokens,
        "ift_rejected": manifest["rejected"],
        "ift_duplicates": manifest["duplicates"],
        "ray_init_s": round(t_ray, 3),
        "ift_cold_s": round(t_cold, 3),
        "ift_s": round(t_ift, 3),
        "ift_records_per_s": round(records / t_ift, 1),
        "packing_efficiency_512": round(splits["train"]["packing_efficiency"], 5),
        f"x{args.scale}_records": records * args.scale,
        f"x{args.scale}_ift_s": round(t_big, 3),
        f"x{args.scale}_ift_examples": sum(s["examples"] for s in manifest_big["splits"].values()),
        f"x{args.scale}_packing_efficiency_512": round(
            manifest_big["splits"]["train"]["packing_efficiency"], 5
        ),
    }
    for prefix, rss in (("", rss_1x), (f"x{args.scale}_", rss_big)):
        for part in ("driver", "workers", "total"):
            measurements[f"{prefix}peak_rss_{part}_mib"] = round(getattr(rss, part) / mib, 1)
            anon = getattr(rss, f"{part}_anon")
            measurements[f"{prefix}peak_rss_anon_{part}_mib"] = round(anon / mib, 1)
    baselines = {
        "datasets_map_num_proc2_s": round(t_datasets, 3),
        "datasets_map_rows": datasets_rows,
        "tokenizers_encode_batch_s": round(t_ceiling, 3),
        "tokenizers_tokens": ceiling_tokens,
    }
    ratios = {
        "ratio_vs_datasets_map": round(t_datasets / t_ift, 3),
        "ratio_vs_ceiling": round(t_ceiling / t_ift, 3),
        "ratio_cold_vs_datasets_map": round(t_datasets / t_cold, 3),
        f"peak_rss_anon_total_x{args.scale}_over_x1": round(
            rss_big.total_anon / rss_1x.total_anon, 3
        ),
        f"peak_rss_anon_driver_x{args.scale}_over_x1": round(
            rss_big.driver_anon / rss_1x.driver_anon, 3
        ),
        f"peak_rss_total_x{args.scale}_over_x1": round(rss_big.total / rss_1x.total, 3),
        f"time_x{args.scale}_over_x1": round(t_big / t_ift, 3),
    }
    result = {
        "benchmark": "prepare",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus_used": CPUS,
            "cpus_online": os.cpu_count(),
            "load_avg_1m": round(os.getloadavg()[0], 2),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "note": "CPUs may be shared with other jobs: compare ratios, not times",
        },
        "measurements": measurements,
        "baselines": baselines,
        "ratios": ratios,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    rows = [("what", "seconds", "records/s")]
    for name, seconds in (
        ("ray.init (once)", t_ray),
        ("ift prepare, cold", t_cold),
        ("ift prepare, steady", t_ift),
        ("datasets.map num_proc=2", t_datasets),
        ("tokenizers encode_batch", t_ceiling),
    ):
        rows.append((name, f"{seconds:.2f}", f"{records / seconds:,.0f}"))
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    for i, row in enumerate(rows):
        print(
            "  ".join(
                c.ljust(w) if j == 0 else c.rjust(w)
                for j, (c, w) in enumerate(zip(row, width, strict=True))
            )
        )
        if i == 0:
            print("  ".join("-" * w for w in width))
    print(json.dumps(ratios, indent=2))
    print(
        f"packing efficiency at {MAX_SEQ_LEN}: {measurements['packing_efficiency_512']:.4f}; "
        f"peak anonymous memory driver+workers {rss_1x.total_anon / mib:.0f} MiB (x1) vs "
        f"{rss_big.total_anon / mib:.0f} MiB (x{args.scale}); RSS {rss_1x.total / mib:.0f} vs "
        f"{rss_big.total / mib:.0f} MiB"
    )
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

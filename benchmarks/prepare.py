"""Benchmark `ift prepare` against `datasets.map`, TRL's SFTTrainer and the raw tokenizer, and
its time and memory at 1x, 10x and 100x the input, in one run.

    python -m benchmarks.prepare        # the full run: --scales 1,10,100 --repeat 3
    python -m benchmarks.prepare --scales 1,2 --repeat 1 --records 3000 --out /tmp/p.json

Input: the real SST-2 train set (60,614 phrases, gzipped TSV) and the Alpaca demo (999
records), 61,613 records in all, tokenized with GPT-2 at max_seq_len 512 (see
benchmarks/data/NOTICE.md). `--records N` keeps only the first N SST-2 phrases (for quick
checks; every figure is then on that smaller input). Every timing below is the median of
`--repeat` runs (`--repeat-x1`, default 9, for ift at 1x: seconds each, and the denominators
of the scale ratios); each run's figure is kept in `measurements`.

* ift: `prepare()` on a local Ray with 2 CPUs, each run into a fresh output folder so nothing
  is reused. Ray start-up is reported on its own, and so is the first prepare (cold: Ray's
  worker processes import ift and build the tokenizer, the driver imports transformers and
  loads the tokenizer, its spec cache emptied first); the
  steady-state time is the median of the later runs (workers warm).
* scale: the same at each of `--scales` (1x, 10x, 100x = 6.16M records): the inputs repeated,
  copy k of each record given a " (k)" suffix on its text so that dedupe keeps it, copy 0
  included, so that a record carries the same number of tokens at every scale (the suffix
  adds 3 GPT-2 tokens to an SST-2 record's ~19: without it on copy 0 the 1x input had ~15%
  less work per record than the 10x and 100x ones, which the time ratios counted as growth).
  The scale ratios divide by this suffixed 1x; the comparisons with the baselines use the
  real files (the 100x input is ~300 MB: written once per run into a temp folder and deleted
  at the end). `tokens_per_record` per scale shows the work per record is the same.
  Peak memory (RSS of the driver and of the Ray workers, and its anonymous part, sampled every
  20 ms) comes from one more run per scale of its own, as the sampler takes CPU.
* datasets.map: `load_dataset` of the same files, then `map(batched=True, num_proc=2)` doing
  the same templates (ift's own), tokenization (the same tokenizer, via transformers) and
  prompt masking (ift's own `tokenize_turns`, as the workers call it); caching off.
* TRL: `SFTTrainer` dataset preparation as a new user gets it: the same records rendered
  with ift's own templates into a prompt/completion `Dataset` (rendering not timed), then
  `SFTTrainer(model, SFTConfig(max_length=512, packing=True, packing_strategy="bfd",
  completion_only_loss=True, dataset_num_proc=2, use_cpu=True), train_dataset=...,
  processing_class=<the GPT-2 tokenizer>)`, whose constructor runs `_prepare_dataset` (add
  EOS, tokenize prompt and prompt+completion, completion mask -> labels, BFD packing), all
  `datasets.map` with num_proc=2. The model is a 1-layer GPT-2 of width 8 built in memory
  before the clock starts (no model load is timed). One untimed constructor on 64 records
  first pays the one-off imports (DeepSpeed, accelerate); the constructor's own cost without
  data (the same call on 2 already tokenized rows with `skip_prepare_dataset`, median of
  `--repeat`) is subtracted from each timed run, so the TRL time is dataset preparation only.
  Run last, after Ray is shut down, so that its imports do not inflate the driver's memory.
* ceiling: `tokenizers` `encode_batch` of the same prompt and completion texts, already
  rendered, with its Rust thread pool on both cores: tokenization alone, no I/O, no Python.
  ift's timed runs on the real files come in 3 blocks, each in a Ray started for it (its
  workers warmed by one untimed run); the ceiling runs 3 times before the first block and
  after each, with Ray shut down (an idle Ray slows its two threads by 10 to 15%).
  `ratio_vs_ceiling` is the median over ift's runs of the mean of the ceiling's medians
  before and after the run's block, over the run's time: the VM's speed drifts by tens of
  percent within minutes (the same ceiling took 1.8 s in one run and 1.4 s in the next).
* packing efficiency at 512: ift's train split (from its manifest), and TRL's packed dataset
  (tokens / (rows x 512), over all records: TRL has no split).

Writes benchmarks/results/prepare.json (or `--out`) and prints a table. The CPUs of the
machine may be shared with other jobs: compare ratios taken in the same run, not times across
runs. The full run takes about 30 to 45 minutes on 2 quiet cores, most of it the four 100x
prepares (3 timed, 1 sampled).
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from benchmarks.sampling import Periodic

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
MIB = 1 << 20
# ift's runs on the real files come in this many blocks, each with the ceiling before and after
# it (the median of CEILING_RUNS runs).
BLOCKS = 3
CEILING_RUNS = 3

# Ray workers tokenize on the one CPU each was given; the ceiling turns the pool back on.
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main() -> int:
    args = parse_args()
    import ray

    from launcher import local_ray

    work = Path(tempfile.mkdtemp(prefix="ift-bench-prepare-"))
    try:
        sst2, alpaca = base_inputs(work, args.records)
        pairs = rendered_pairs(sst2, alpaca)
        records = len(pairs)
        texts = [t for pair in pairs for t in pair]

        hf = [run_datasets_map(sst2, alpaca, work / "hf_cache") for _ in range(args.repeat)]
        print(f"datasets.map {[round(t, 2) for t, _ in hf]} s", flush=True)

        # The scaled inputs are written before Ray starts, so writing them competes with nothing.
        inputs = {}
        for scale in args.scales:
            t0 = time.perf_counter()
            inputs[scale] = scaled_inputs(work, sst2, alpaca, scale)
            size = sum(p.stat().st_size for p in inputs[scale]) / MIB
            print(f"x{scale} input: {size:.0f} MiB in {time.perf_counter() - t0:.0f} s", flush=True)

        # ift on the real files in BLOCKS blocks, each in a Ray of its own, and the ceiling
        # before the first and after each with Ray shut down. The VM's speed drifts by tens of
        # percent within minutes, so each ift run is compared with the ceiling just before and
        # after its block; and an idle Ray slows the ceiling's two threads by 10 to 15%
        # (measured), so it never runs beside one.
        from data_pipeline.tokenizer import SPEC_CACHE

        ceiling = [[run_ceiling(texts) for _ in range(CEILING_RUNS)]]
        real: list[tuple[float, dict[str, Any]]] = []
        blocks: list[int] = []
        for block in range(BLOCKS):
            t0 = time.perf_counter()
            local_ray.start(CPUS, logging.ERROR, log_to_driver=False)  # as `ift prepare` does
            if block == 0:
                t_ray = time.perf_counter() - t0
                # A first prepare on this machine: no tokenizer spec cached yet either.
                shutil.rmtree(SPEC_CACHE, ignore_errors=True)
                t_cold, _ = run_ift(sst2, alpaca, work / "ift")
                print(f"ift cold {t_cold:.2f} s (ray.init {t_ray:.1f} s)", flush=True)
            else:
                run_ift(sst2, alpaca, work / "ift")  # the new Ray's workers warm, untimed
            for _ in range(-(-args.repeat_x1 // BLOCKS)):
                real.append(run_ift(sst2, alpaca, work / "ift"))
                blocks.append(block)
            ray.shutdown()
            ceiling.append([run_ceiling(texts) for _ in range(CEILING_RUNS)])
        print(f"ift on the real files {[round(t, 2) for t, _ in real]} s", flush=True)
        print(f"ceiling {[[round(t, 2) for t, _ in c] for c in ceiling]} s", flush=True)
        local_ray.start(CPUS, logging.ERROR, log_to_driver=False)
        run_ift(sst2, alpaca, work / "ift")  # warm workers for the scale series too
        scales: dict[int, dict[str, Any]] = {}
        for scale in args.scales:
            repeat = args.repeat_x1 if scale == 1 else args.repeat
            runs = [run_ift(*inputs[scale], work / "ift") for _ in range(repeat)]
            rss = peak_memory(*inputs[scale], work / "ift")
            scales[scale] = {
                "runs_s": [t for t, _ in runs],
                "manifest": runs[-1][1],
                "rss": rss,
                "input_mib": sum(p.stat().st_size for p in inputs[scale]) / MIB,
            }
            print(
                f"ift x{scale} {[round(t, 2) for t, _ in runs]} s, peak anonymous memory "
                f"driver {rss.driver_anon / MIB:.0f} MiB, total {rss.total_anon / MIB:.0f} MiB",
                flush=True,
            )
        ray.shutdown()
        # TRL last: it imports torch, DeepSpeed and accelerate into this process, which would
        # add a constant to the driver memory sampled above and flatten its growth.
        trl = run_trl(pairs, work / "trl", args.repeat)
        print(f"trl {trl['runs_s']} s (constructor without data {trl['overhead_s']} s)", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    result = report(args, records, t_ray, t_cold, real, blocks, scales, ceiling, hf, trl)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"wrote {args.out}")
    return 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--scales",
        type=lambda s: sorted({int(x) for x in s.split(",")}),
        default=[1, 10, 100],
        help="input sizes, as multiples of the input, comma separated; must include 1",
    )
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each (median)")
    parser.add_argument(
        "--repeat-x1",
        type=int,
        default=9,
        help="timed runs of ift at 1x: seconds each, and the denominator of "
        "every x10/x100 ratio, so more runs steady their medians",
    )
    parser.add_argument(
        "--records", type=int, default=None, help="keep only the first N SST-2 phrases (checks)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the JSON goes")
    args = parser.parse_args()
    problems = []
    if not args.scales or args.scales[0] != 1:
        problems.append("--scales must include 1 and be positive")
    if args.repeat < 1 or args.repeat_x1 < 1:
        problems.append("--repeat and --repeat-x1 must be at least 1")
    if args.records is not None and args.records < 1:
        problems.append("--records must be at least 1")
    if importlib.util.find_spec("trl") is None:
        problems.append("TRL is not installed: pip install -e '.[bench]' (as `make bench` does)")
    if problems:
        parser.error("; ".join(problems))
    return args


# --- ift ------------------------------------------------------------------------------------


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


def run_ift(sst2: Path, alpaca: Path, out: Path) -> tuple[float, dict[str, Any]]:
    """One prepare into a fresh folder, timed (no memory sampler running beside it); the
    folder is deleted afterwards (the 100x output is several GB)."""
    from data_pipeline.prepare import prepare

    shutil.rmtree(out, ignore_errors=True)
    cfg = config(sst2, alpaca, out)
    t0 = time.perf_counter()
    manifest = prepare(cfg, log=lambda _: None)
    elapsed = time.perf_counter() - t0
    assert not manifest["reused"]
    shutil.rmtree(out, ignore_errors=True)
    return elapsed, manifest


class PeakRss(Periodic):
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
        super().__init__(interval)
        self.driver = self.driver_anon = 0
        self.workers = self.workers_anon = 0
        self.total = self.total_anon = 0
        self._pids: dict[int, psutil.Process] = {}
        self._me = psutil.Process()

    def sample(self) -> None:
        me = self._me
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


def _rss_anon(pid: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


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


def run_datasets_map(sst2_path: Path, alpaca_path: Path, cache: Path) -> tuple[float, int]:
    import datasets

    shutil.rmtree(cache, ignore_errors=True)
    datasets.disable_caching()
    datasets.disable_progress_bars()
    t0 = time.perf_counter()
    sst2 = datasets.load_dataset(
        "csv", data_files=str(sst2_path), delimiter="\t", split="train", cache_dir=str(cache)
    )
    alpaca = datasets.load_dataset(
        "json", data_files=str(alpaca_path), split="train", cache_dir=str(cache)
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
    shutil.rmtree(cache, ignore_errors=True)
    return time.perf_counter() - t0, rows


def run_trl(pairs: list[tuple[str, str]], out: Path, repeat: int) -> dict[str, Any]:
    """TRL's SFTTrainer dataset preparation of the (prompt, completion) pairs, `repeat` times
    (see the module docstring for what is timed and what is subtracted)."""
    import datasets
    import pyarrow.compute as pc
    import trl
    from transformers import GPT2Config, GPT2LMHeadModel
    from trl import SFTConfig, SFTTrainer

    datasets.disable_caching()
    datasets.disable_progress_bars()
    tok = _tokenizer()
    model = GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_head=1, n_embd=8, n_positions=MAX_SEQ_LEN, vocab_size=len(tok))
    )
    prompts, completions = (list(column) for column in zip(*pairs, strict=True))
    data = datasets.Dataset.from_dict({"prompt": prompts, "completion": completions})

    def trainer(dataset: Any, **dataset_kwargs: Any) -> Any:
        cfg = SFTConfig(
            output_dir=str(out),
            max_length=MAX_SEQ_LEN,
            packing=True,
            packing_strategy="bfd",
            completion_only_loss=True,
            dataset_num_proc=CPUS,
            dataset_kwargs=dataset_kwargs or None,
            use_cpu=True,
            report_to="none",
            seed=0,
        )
        return SFTTrainer(model=model, args=cfg, train_dataset=dataset, processing_class=tok)

    trainer(data.select(range(min(64, len(data)))))  # one-off imports, untimed
    tokenized = datasets.Dataset.from_dict({"input_ids": [[1, 2]] * 2, "labels": [[1, 2]] * 2})
    overhead = [
        _timed(lambda: trainer(tokenized, skip_prepare_dataset=True))[0] for _ in range(repeat)
    ]
    t_overhead = statistics.median(overhead)
    runs, packed = [], None
    for _ in range(repeat):
        elapsed, built = _timed(lambda: trainer(data))
        runs.append(elapsed - t_overhead)
        packed = built.train_dataset
    shutil.rmtree(out, ignore_errors=True)
    assert packed is not None
    tokens = pc.sum(pc.list_value_length(packed.data.column("input_ids"))).as_py()
    return {
        "version": trl.__version__,
        "records": len(data),
        "runs_s": [round(t, 3) for t in runs],
        "overhead_runs_s": [round(t, 3) for t in overhead],
        "overhead_s": round(t_overhead, 3),
        "s": statistics.median(runs),
        "rows": len(packed),
        "tokens": tokens,
        "packing_efficiency": tokens / (len(packed) * MAX_SEQ_LEN),
    }


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    value = fn()
    return time.perf_counter() - t0, value


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


# --- inputs ---------------------------------------------------------------------------------


def base_inputs(folder: Path, records: int | None) -> tuple[Path, Path]:
    """The 1x inputs: the data files themselves, or the first `records` SST-2 phrases."""
    if records is None:
        return SST2, ALPACA
    lines = gzip.decompress(SST2.read_bytes()).decode().splitlines(keepends=True)
    sst2 = folder / f"sst2_first{records}.tsv.gz"
    with gzip.open(sst2, "wt") as f:
        f.writelines(lines[: records + 1])
    return sst2, ALPACA


def rendered_pairs(sst2: Path, alpaca: Path) -> list[tuple[str, str]]:
    """Every record's (prompt, completion), rendered by ift's templates (one turn each)."""
    from data_pipeline import sources, templates

    pairs = []
    for path, fmt, template in ((sst2, "tsv", "sst2"), (alpaca, "json", "alpaca")):
        for _, rec in sources.parse_bytes(path.read_bytes(), str(path), fmt):
            if isinstance(rec, sources.Reject):
                continue
            pairs += [tuple(pair) for pair in templates.render(template, rec, {})]
    return pairs  # type: ignore[return-value]


def scaled_inputs(
    folder: Path, sst2_path: Path, alpaca_path: Path, scale: int
) -> tuple[Path, Path]:
    """The inputs repeated `scale` times, copy k of each record's text given a " (k)" suffix
    so that dedupe keeps it; copy 0 too, so that a record's tokens are the same at any scale."""
    lines = gzip.decompress(sst2_path.read_bytes()).decode().splitlines(keepends=True)
    header, body = lines[0], lines[1:]
    rows = [line.rstrip("\n").rsplit("\t", 1) for line in body]
    sst2 = folder / f"sst2_x{scale}.tsv.gz"
    with gzip.open(sst2, "wt", compresslevel=6) as f:
        f.write(header)
        for k in range(scale):
            f.write("".join(f"{sentence} ({k})\t{label}\n" for sentence, label in rows))
    records = json.loads(alpaca_path.read_text())
    alpaca = folder / f"alpaca_x{scale}.json"
    alpaca.write_text(
        json.dumps(
            [
                {**r, "instruction": f"{r['instruction']} ({k})"}
                for k in range(scale)
                for r in records
            ]
        )
    )
    return sst2, alpaca


# --- report ---------------------------------------------------------------------------------


def report(
    args: argparse.Namespace,
    records: int,
    t_ray: float,
    t_cold: float,
    real: list[tuple[float, dict[str, Any]]],
    blocks: list[int],
    scales: dict[int, dict[str, Any]],
    ceiling: list[list[tuple[float, int]]],
    hf: list[tuple[float, int]],
    trl: dict[str, Any],
) -> dict[str, Any]:
    """The JSON: every run's figure under `measurements`, medians compared under `ratios`.

    `real` (the real files at 1x) is compared with the baselines; `scales` (the suffixed
    inputs, 1x included) with each other."""
    t_ift = statistics.median(t for t, _ in real)
    t_ceiling = statistics.median(t for runs in ceiling for t, _ in runs)
    # Each ift run against the mean of the ceiling's medians just before and after its block.
    at = [statistics.median(t for t, _ in runs) for runs in ceiling]
    vs_ceiling = [(at[b] + at[b + 1]) / 2 / t for (t, _), b in zip(real, blocks, strict=True)]
    t_datasets = statistics.median(t for t, _ in hf)
    manifest = real[-1][1]
    splits = manifest["splits"]
    measurements: dict[str, Any] = {
        "records": records,
        "repeat": args.repeat,
        "repeat_x1": args.repeat_x1,
        "ift_examples": sum(s["examples"] for s in splits.values()),
        "ift_tokens": sum(s["tokens"] for s in splits.values()),
        "ift_rejected": manifest.get("rejected"),
        "ift_duplicates": manifest.get("duplicates"),
        "ray_init_s": round(t_ray, 3),
        "ift_cold_s": round(t_cold, 3),
        "ift_runs_s": [round(t, 3) for t, _ in real],
        "ift_s": round(t_ift, 3),
        "ift_records_per_s": round(records / t_ift, 1),
        "ift_runs_block": blocks,
        "ratio_vs_ceiling_runs": [round(r, 3) for r in vs_ceiling],
        "packing_efficiency_ift_512": round(splits["train"]["packing_efficiency"], 5),
        "packing_efficiency_trl_512": round(trl["packing_efficiency"], 5),
    }
    for scale, run in scales.items():
        # The 1x of the scale series (suffixed input) keeps the unprefixed memory keys.
        prefix = "" if scale == 1 else f"x{scale}_"
        big_splits = run["manifest"]["splits"]
        series = f"x{scale}_"
        measurements[f"{series}records"] = records * scale
        measurements[f"{series}input_mib"] = round(run["input_mib"], 1)
        measurements[f"{series}ift_runs_s"] = [round(t, 3) for t in run["runs_s"]]
        measurements[f"{series}ift_s"] = round(statistics.median(run["runs_s"]), 3)
        measurements[f"{series}ift_examples"] = sum(s["examples"] for s in big_splits.values())
        measurements[f"{series}tokens_per_record"] = round(
            sum(s["tokens"] for s in big_splits.values()) / (records * scale), 3
        )
        measurements[f"{series}packing_efficiency_ift_512"] = round(
            big_splits["train"]["packing_efficiency"], 5
        )
        for part in ("driver", "workers", "total"):
            measurements[f"{prefix}peak_rss_{part}_mib"] = round(getattr(run["rss"], part) / MIB, 1)
            anon = getattr(run["rss"], f"{part}_anon")
            measurements[f"{prefix}peak_rss_anon_{part}_mib"] = round(anon / MIB, 1)
    baselines = {
        "datasets_map_num_proc2_runs_s": [round(t, 3) for t, _ in hf],
        "datasets_map_num_proc2_s": round(t_datasets, 3),
        "datasets_map_rows": hf[0][1],
        "trl_version": trl["version"],
        "trl_records": trl["records"],
        "trl_sfttrainer_prepare_runs_s": trl["runs_s"],
        "trl_sfttrainer_prepare_s": round(trl["s"], 3),
        "trl_sfttrainer_overhead_runs_s": trl["overhead_runs_s"],
        "trl_sfttrainer_overhead_s": trl["overhead_s"],
        "trl_packed_rows": trl["rows"],
        "trl_tokens": trl["tokens"],
        "tokenizers_encode_batch_runs_s": [[round(t, 3) for t, _ in runs] for runs in ceiling],
        "tokenizers_encode_batch_s": round(t_ceiling, 3),
        "tokenizers_tokens": ceiling[0][0][1],
    }
    ratios: dict[str, float] = {
        "ratio_vs_datasets_map": round(t_datasets / t_ift, 3),
        "ratio_vs_trl": round(trl["s"] / t_ift, 3),
        "ratio_vs_ceiling": round(statistics.median(vs_ceiling), 3),
        "ratio_cold_vs_datasets_map": round(t_datasets / t_cold, 3),
    }
    rss_1x = scales[1]["rss"]
    t_1x = statistics.median(scales[1]["runs_s"])
    for scale, run in scales.items():
        if scale == 1:
            continue
        t_scale = statistics.median(run["runs_s"])
        ratios[f"time_x{scale}_over_x1"] = round(t_scale / t_1x, 3)
        # Against the real files' 1x, which has ~15% fewer tokens per record (for the record).
        measurements[f"time_x{scale}_over_real_x1"] = round(t_scale / t_ift, 3)
        for name, part in (("anon_driver", "driver_anon"), ("anon_total", "total_anon")):
            ratios[f"peak_rss_{name}_x{scale}_over_x1"] = round(
                getattr(run["rss"], part) / getattr(rss_1x, part), 3
            )
        ratios[f"peak_rss_total_x{scale}_over_x1"] = round(run["rss"].total / rss_1x.total, 3)
    return {
        "benchmark": "prepare",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(["python -m benchmarks.prepare", *sys.argv[1:]]),
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


def print_table(result: dict[str, Any]) -> None:
    m, b = result["measurements"], result["baselines"]
    records = m["records"]
    rows = [("what", "seconds", "records/s")]
    for name, seconds, n in (
        ("ray.init (once)", m["ray_init_s"], records),
        ("ift prepare, cold", m["ift_cold_s"], records),
        ("ift prepare, steady", m["ift_s"], records),
        ("datasets.map num_proc=2", b["datasets_map_num_proc2_s"], records),
        (f"TRL {b['trl_version']} SFTTrainer prep", b["trl_sfttrainer_prepare_s"], records),
        ("tokenizers encode_batch", b["tokenizers_encode_batch_s"], records),
        *(
            (f"ift prepare x{key[1:-6]}", m[key], m[f"{key[:-5]}records"])
            for key in m
            if key.startswith("x") and key.endswith("_ift_s")
        ),
    ):
        rows.append((name, f"{seconds:.2f}", f"{n / seconds:,.0f}"))
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
    print(json.dumps(result["ratios"], indent=2))
    print(
        f"packing efficiency at {MAX_SEQ_LEN}: ift {m['packing_efficiency_ift_512']:.4f}, "
        f"TRL {m['packing_efficiency_trl_512']:.4f}"
    )


if __name__ == "__main__":
    raise SystemExit(main())

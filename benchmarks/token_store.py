"""Benchmark a training rank's data path: the memory-mapped token store vs the old Parquet loader.

    python -m benchmarks.token_store          # writes benchmarks/results/token_store.json

Data: the prepare benchmark's inputs (SST-2 train + the Alpaca demo, GPT-2 tokenizer, prompts
masked, packed at 512 by ift's own `build_batch` and `best_fit_decreasing`) as 1x, written
again and again to make 10x and 100x (100x is over 100M tokens). Each measurement runs in a
fresh process, as a rank does, and reports: the time to open the split, the time to the first
micro-batch (open + the step's global batch + its rows + the batch's loss-token count), the
mean time per micro-batch after it, and the process's RssAnon (anonymous memory: mapped file
pages are the page cache's, not the rank's) after the imports, after opening and after reading
micro-batches. The baseline is the loader this replaced (`to_pylist` into one int64 array per
row on every rank) at 1x and 10x. Five interleaved runs per point, every run kept: times are
medians; memory is the minimum over runs, because the imports alone (torch) take either ~26 or
~155 MiB of anonymous memory from one process to the next on this machine, whatever the data.
"""

from __future__ import annotations

import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
DATA = ROOT / "benchmarks" / "data"
SCALES = (1, 10, 100)
BASELINE_SCALES = (1, 10)
RUNS = 5
MICRO, ACCUM, WORLD, SEED = 4, 2, 2, 0  # the train benchmark's layout
MICRO_BATCHES = 200
MAX_SEQ_LEN = 512


def anon_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))


def old_load_split(files: list[str]) -> Any:
    """The loader the store replaced (training/data.py before it), kept as the baseline."""
    import numpy as np
    import pyarrow.parquet as pq

    ids: list[Any] = []
    labels: list[Any] = []
    lens: list[Any] = []
    for f in files:
        table = pq.read_table(f, columns=["input_ids", "labels", "seq_lens"])
        ids += [np.asarray(x, dtype=np.int64) for x in table.column("input_ids").to_pylist()]
        labels += [np.asarray(x, dtype=np.int64) for x in table.column("labels").to_pylist()]
        lens += [np.asarray(x, dtype=np.int64) for x in table.column("seq_lens").to_pylist()]

    class OldSplit:
        def __len__(self) -> int:
            return len(ids)

        def rows(self, idx: Any) -> list[Any]:
            return [(ids[i], labels[i], lens[i]) for i in map(int, idx)]

        def loss_tokens(self, idx: Any) -> int:
            return int(sum(int((labels[i][1:] != -100).sum()) for i in idx))

    return OldSplit()


def probe(kind: str, path: str) -> dict[str, float]:
    """One rank's view (runs in its own process): open, first micro-batch, then many more."""
    from data_pipeline.token_store import open_store
    from training.data import global_batch_indices, micro_batch_indices

    base = anon_kib()
    t0 = time.perf_counter()
    split = open_store(path) if kind == "store" else old_load_split(json.loads(path))
    opened_s = time.perf_counter() - t0
    opened = anon_kib()
    gb = MICRO * ACCUM * WORLD
    batch = global_batch_indices(0, len(split), gb, SEED)
    split.loss_tokens(batch)
    split.rows(micro_batch_indices(batch, MICRO, 0, 0, WORLD))
    first_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    for k in range(MICRO_BATCHES):
        step, a = divmod(k, ACCUM)
        batch = global_batch_indices(1 + step * 997, len(split), gb, SEED)  # spread over epochs
        if a == 0:
            split.loss_tokens(batch)
        split.rows(micro_batch_indices(batch, MICRO, a, 0, WORLD))
    per_micro_s = (time.perf_counter() - t1) / MICRO_BATCHES
    return {
        "rows": len(split),
        "open_s": opened_s,
        "first_batch_s": first_s,
        "per_micro_batch_s": per_micro_s,
        "rss_anon_imports_kib": base,
        "rss_anon_opened_kib": opened,
        "rss_anon_read_kib": anon_kib(),
        "rss_anon_growth_kib": anon_kib() - base,
    }


def real_rows() -> Any:
    """The 1x train rows: the prepare benchmark's records, tokenized, masked and packed."""
    import pyarrow as pa
    from tokenizers import Tokenizer

    from data_pipeline import pack, sources, templates, token_store, tokenize

    tok = Tokenizer.from_file(str(DATA / "gpt2" / "tokenizer.json"))
    tok.no_truncation()
    eos = tok.token_to_id("<|endoftext|>")
    turns = []
    for name, fmt, template in (
        ("sst2_train.tsv.gz", "tsv", "sst2"),
        ("alpaca_en_demo.json", "json", "alpaca"),
    ):
        path = DATA / name
        for _, rec in sources.parse_bytes(path.read_bytes(), str(path), fmt):
            if not isinstance(rec, sources.Reject):
                turns.append(templates.render(template, rec, {}))
    texts = [text for t in turns for pair in t for text in pair]
    ids = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
    built = tokenize.build_batch(
        ids, [len(t) for t in turns], bos_id=None, eos_id=eos, max_seq_len=MAX_SEQ_LEN
    )
    off = built.offsets
    examples = [
        (built.input_ids[a:b].tolist(), built.labels[a:b].tolist())
        for a, b in zip(off[:-1], off[1:], strict=True)
    ]
    rows = pack.pack_rows(examples, MAX_SEQ_LEN)
    cols = {n: [r[n] for r in rows] for n in token_store.ROW_SCHEMA.names}
    return pa.table(cols, schema=token_store.ROW_SCHEMA)


def run_probe(kind: str, path: str) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.token_store", "--probe", kind, path],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def summary(runs: list[dict[str, float]]) -> dict[str, float]:
    """Median times, minimum memory (import noise only ever adds to it)."""
    pick = {k: min if k.startswith("rss_anon") else statistics.median for k in runs[0]}
    return {k: pick[k](r[k] for r in runs) for k in runs[0]}


def main() -> int:
    import pyarrow.parquet as pq

    from data_pipeline.token_store import TokenStoreWriter

    tmp = Path(tempfile.mkdtemp(prefix="ift-bench-store-"))
    try:
        t0 = time.perf_counter()
        table = real_rows()
        tokens_x1 = sum(len(x) for x in table.column("input_ids").to_pylist())
        took = time.perf_counter() - t0
        print(f"1x: {table.num_rows} packed rows, {tokens_x1} tokens ({took:.1f}s)")
        stores: dict[int, dict[str, Any]] = {}
        for scale in SCALES:
            folder = tmp / f"store_x{scale}"
            t0 = time.perf_counter()
            writer = TokenStoreWriter(str(folder), vocab_size=50257)
            for _ in range(scale):
                writer.write(table)
            index = writer.close()
            size = sum(f.stat().st_size for f in folder.iterdir())
            stores[scale] = {
                "tokens": index["tokens"],
                "rows": index["rows"],
                "write_s": time.perf_counter() - t0,
                "bytes_on_disk": size,
            }
            print(f"store x{scale}: {index['tokens']} tokens, {size / 2**20:.0f} MiB")
        parquet: dict[int, list[str]] = {}
        for scale in BASELINE_SCALES:
            pq.write_table(table, tmp / "part.parquet")
            parquet[scale] = [str(tmp / "part.parquet")] * scale  # the same shard, `scale` times

        measurements: dict[str, Any] = {"stores": stores, "runs": {}}
        medians: dict[str, dict[str, float]] = {}
        for _ in range(RUNS):  # interleaved, so a change of load hits every point alike
            for scale in SCALES:
                key = f"store_x{scale}"
                r = run_probe("store", str(tmp / key))
                measurements["runs"].setdefault(key, []).append(r)
            for scale in BASELINE_SCALES:
                key = f"parquet_x{scale}"
                r = run_probe("parquet", json.dumps(parquet[scale]))
                measurements["runs"].setdefault(key, []).append(r)
        for key, runs in measurements["runs"].items():
            medians[key] = summary(runs)
        measurements["summary"] = medians
        s1, s100 = medians["store_x1"], medians["store_x100"]
        p1, p10 = medians["parquet_x1"], medians["parquet_x10"]
        ratios = {
            "rank_rss_x100_over_x1": s100["rss_anon_read_kib"] / s1["rss_anon_read_kib"],
            "first_batch_x100_over_x1": s100["first_batch_s"] / s1["first_batch_s"],
            "per_micro_batch_x100_over_x1": s100["per_micro_batch_s"] / s1["per_micro_batch_s"],
            "baseline_rank_rss_x10_over_x1": p10["rss_anon_read_kib"] / p1["rss_anon_read_kib"],
            "baseline_first_batch_x10_over_x1": p10["first_batch_s"] / p1["first_batch_s"],
            "growth_x10_baseline_over_store": p10["rss_anon_growth_kib"]
            / max(medians["store_x10"]["rss_anon_growth_kib"], 1),
        }
        result = {
            "benchmark": "token_store",
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": f"{platform.machine()}, {platform.python_version()}",
            "setup": {
                "tokens_x1": tokens_x1,
                "rows_x1": table.num_rows,
                "max_seq_len": MAX_SEQ_LEN,
                "micro_batch": MICRO,
                "accumulation": ACCUM,
                "world": WORLD,
                "micro_batches_timed": MICRO_BATCHES,
                "runs": RUNS,
            },
            "measurements": measurements,
            "baselines": {k: v for k, v in medians.items() if k.startswith("parquet")},
            "ratios": ratios,
        }
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "token_store.json").write_text(json.dumps(result, indent=2) + "\n")
        print(
            f"{'':12} {'open s':>9} {'first s':>9} {'ms/micro':>9} {'anon MiB':>9} {'grow MiB':>9}"
        )
        for key, m in medians.items():
            print(
                f"{key:12} {m['open_s']:9.4f} {m['first_batch_s']:9.4f} "
                f"{m['per_micro_batch_s'] * 1e3:9.3f} {m['rss_anon_read_kib'] / 1024:9.1f} "
                f"{m['rss_anon_growth_kib'] / 1024:9.1f}"
            )
        print(json.dumps(ratios, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--probe":
        print(json.dumps(probe(sys.argv[2], sys.argv[3])))
        sys.exit(0)
    sys.exit(main())

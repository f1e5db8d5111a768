"""Benchmark of the eval stage: batched generation and `ift score`, each against its naive baseline.

    python benchmarks/eval.py

Generation (the real stories260K on a small prepared sst2 + WMT21 test split):
  - naive: one `model.generate` call per prompt, in this process;
  - batched: the eval job's `Generator` (planned, length-sorted, left-padded batches), in this
    process on the same prompts and the same single torch thread, so the ratio is batching alone;
  - the eval job end to end (`evaluate`, Ray Data actor pool) with 1 and 2 actors, actor start-up
    and model loading included, on a larger test split of the same sources (about 1,000
    prompts) so that the fixed start-up cost does not hide the generation.
Scoring: >= 10k ROUGE pairs (SummEval system summaries vs references, repeated) through the real
`ift score --metrics rouge` command line with --num-workers 1 and 2 (interpreter start-up, imports
and file reading included) against a single-process `rouge_score.RougeScorer.score` loop with the
same options in this process, and checks that the numbers agree.

Writes benchmarks/results/eval.json and prints a table. Timings are wall clock on whatever CPU this
runs on; on a shared machine they are noisy.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# Run as `python benchmarks/eval.py` (as `make bench` does), this file's folder is sys.path[0] and
# this very file would shadow the `eval` package: look modules up from the project root instead.
if sys.path and Path(sys.path[0] or ".").resolve() == ROOT / "benchmarks":
    sys.path[0] = str(ROOT)
ASSETS = ROOT / "tests" / "assets"
MODEL = ASSETS / "models" / "stories260K"
RESULTS = ROOT / "benchmarks" / "results" / "eval.json"

MAX_NEW_TOKENS = 32
BATCH_SIZE = 16
SMALL = (96, 32)  # test prompts (sst2, wmt) for the in-process naive vs batched comparison
LARGE = (1000, 56)  # test prompts for the eval job with 1 and 2 actors
ROUGE_REPEAT = 7  # 100 documents x 16 systems x 7 = 11,200 pairs


def main() -> int:
    measurements: dict[str, Any] = {}
    baselines: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="ift-bench-eval-") as tmp:
        gen_m, gen_b = bench_generation(Path(tmp))
        score_m, score_b = bench_score(Path(tmp))
    measurements.update(gen_m | score_m)
    baselines.update(gen_b | score_b)
    ratios = {
        "generation_speedup_vs_naive": measurements["batched_examples_per_s"]
        / baselines["naive_examples_per_s"],
        "generation_tokens_speedup_vs_naive": measurements["batched_new_tokens_per_s"]
        / baselines["naive_new_tokens_per_s"],
        "eval_job_1_actor_speedup_vs_naive": measurements["job_1_actor_examples_per_s"]
        / baselines["naive_examples_per_s"],
        "eval_job_2_vs_1_actors": measurements["job_2_actors_examples_per_s"]
        / measurements["job_1_actor_examples_per_s"],
        "score_speedup_vs_single_process": baselines["rouge_score_loop_s"]
        / measurements["ift_score_2_workers_s"],
        "score_1_worker_speedup_vs_single_process": baselines["rouge_score_loop_s"]
        / measurements["ift_score_1_worker_s"],
    }
    result = {
        "benchmark": "eval",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "measurements": measurements,
        "baselines": baselines,
        "ratios": ratios,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    return 0


# --------------------------------------------------------------------------- generation


def bench_generation(tmp: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Naive loop vs batched Generator (in process), then the eval job with 1 and 2 actors."""
    import ray
    import torch

    from data_pipeline.prepare import prepare
    from eval.evaluate import Generator, evaluate, read_test_split
    from eval.generate import plan_batches
    from launcher import local_ray
    from launcher.config import from_dict, resolve_paths

    for k, v in {
        "TOKENIZERS_PARALLELISM": "false",
        "TRANSFORMERS_VERBOSITY": "error",
        "HF_HUB_OFFLINE": "1",
        "TQDM_DISABLE": "1",
    }.items():
        os.environ.setdefault(k, v)
    local_ray.start(2)  # as `ift eval` does
    try:
        cfg = resolve_paths(from_dict(bench_config(tmp / "small", SMALL)))
        manifest = prepare(cfg, log=lambda _: None)
        test = read_test_split(cfg.data_dir, manifest)
        prompts: list[list[int]] = [list(p) for p in test["prompt_ids"]]
        print(f"generation: {len(prompts)} prompts, max_new_tokens {MAX_NEW_TOKENS}", flush=True)

        # One thread for both in-process paths: what one eval actor gets on a CPU node.
        torch.set_num_threads(1)
        gen = Generator(str(MODEL), cfg.eval.model_dump(), dtype="float32", use_gpu=False, cpus=1.0)
        stop = cfg.eval.stop

        def count(texts: list[str]) -> int:
            return sum(len(gen.tok(t, add_special_tokens=False)["input_ids"]) for t in texts)

        # Warm up both paths once (first-call allocations, lazy imports).
        naive_generate(gen, prompts[:1], stop)
        gen({"batch": [0], "index": [[0]], "prompt_ids": [[prompts[0]]]})

        t0 = time.perf_counter()
        naive = naive_generate(gen, prompts, stop)
        naive_s = time.perf_counter() - t0
        naive_tokens = count(naive)

        batches = plan_batches([len(p) for p in prompts], BATCH_SIZE)
        batched: list[str] = [""] * len(prompts)
        batched_tokens = 0
        t0 = time.perf_counter()
        for i, b in enumerate(batches):
            out = gen({"batch": [i], "index": [b], "prompt_ids": [[prompts[j] for j in b]]})
            for j, text in zip(out["index"][0], out["predictions"][0], strict=True):
                batched[j] = text
            batched_tokens += out["new_tokens"][0]
        batched_s = time.perf_counter() - t0
        print(f"  naive {naive_s:.2f}s, batched {batched_s:.2f}s", flush=True)
        same = sum(a == b for a, b in zip(naive, batched, strict=True)) / len(prompts)

        # The job gets more prompts, so that its fixed cost (actor start-up and model loading in
        # a fresh process, several seconds on a busy CPU) does not hide the generation itself.
        job_cfg = resolve_paths(from_dict(bench_config(tmp / "large", LARGE)))
        job_manifest = prepare(job_cfg, log=lambda _: None)
        job_prompts = job_manifest["splits"]["test"]["rows"]
        job: dict[str, float] = {}
        for actors in (1, 2):
            run_cfg = job_cfg.model_copy(deep=True)
            run_cfg.experiment.output_dir = str(tmp / f"job{actors}")
            run_cfg.eval.num_workers = actors
            t0 = time.perf_counter()
            res = evaluate(run_cfg, job_manifest, "base", log=lambda _: None)
            job[f"wall_{actors}"] = time.perf_counter() - t0
            job[f"eps_{actors}"] = res["metrics"]["eval/examples_per_s"]
            job[f"tps_{actors}"] = res["metrics"]["eval/new_tokens_per_s"]
            print(f"  eval job, {actors} actor(s): {job[f'wall_{actors}']:.2f}s", flush=True)
    finally:
        ray.shutdown()
    measurements = {
        "prompts": len(prompts),
        "max_new_tokens": MAX_NEW_TOKENS,
        "batch_size": BATCH_SIZE,
        "batched_s": batched_s,
        "batched_examples_per_s": len(prompts) / batched_s,
        "batched_new_tokens_per_s": batched_tokens / batched_s,
        "greedy_outputs_equal_to_naive_fraction": same,
        "job_prompts": job_prompts,
        "job_1_actor_wall_s": job["wall_1"],
        "job_1_actor_examples_per_s": job["eps_1"],
        "job_1_actor_new_tokens_per_s": job["tps_1"],
        "job_2_actors_wall_s": job["wall_2"],
        "job_2_actors_examples_per_s": job["eps_2"],
        "job_2_actors_new_tokens_per_s": job["tps_2"],
    }
    baselines = {
        "naive_s": naive_s,
        "naive_examples_per_s": len(prompts) / naive_s,
        "naive_new_tokens_per_s": naive_tokens / naive_s,
    }
    return measurements, baselines


def naive_generate(gen: Any, prompts: list[list[int]], stop: list[str]) -> list[str]:
    """One unpadded `model.generate` call per prompt, greedy, the same stop-string cut."""
    import torch

    from eval.generate import cut_at_stop

    tok, model = gen.tok, gen.model
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p], dtype=torch.long)
            seq = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=MAX_NEW_TOKENS,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                eos_token_id=tok.eos_token_id,
            )
            text = tok.decode(seq[0, len(p) :], skip_special_tokens=True)
            out.append(cut_at_stop(text, stop))
    return out


def bench_config(tmp: Path, records: tuple[int, int]) -> dict[str, Any]:
    """A test-only split of `records` = (sst2, wmt) examples."""
    return {
        "experiment": {"name": "bench-eval", "output_dir": str(tmp / "runs"), "seed": 0},
        "model": {"name_or_path": str(MODEL)},
        "data": {
            "sources": [
                {
                    "path": str(ASSETS / "data" / "sst2" / "train.tsv"),
                    "template": "sst2",
                    "max_records": records[0],
                    "split": "test",
                },
                {
                    "path": str(ASSETS / "data" / "wmt21" / "newstest2021.de-en.jsonl"),
                    "template": "wmt",
                    "params": {"source_lang": "de", "target_lang": "en"},
                    "max_records": records[1],
                    "split": "test",
                },
            ],
            "split": {"train": 0.8, "validation": 0.1, "test": 0.1},
            "max_seq_len": 128,
            "truncation": "left",
            "num_workers": 1,
        },
        "eval": {"max_new_tokens": MAX_NEW_TOKENS, "batch_size": BATCH_SIZE},
        "tracking": {"enabled": False},
    }


# --------------------------------------------------------------------------- scoring


def bench_score(tmp: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """`ift score --metrics rouge` (1 and 2 workers) vs a single-process RougeScorer loop."""
    from rouge_score import rouge_scorer

    from eval.metrics import ROUGE_KEYS

    data = json.loads((ASSETS / "summeval" / "summeval.json").read_text())
    pairs = [
        (system["sys_summ"], doc["ref_summ"])
        for doc in data.values()
        for system in doc["sys_summs"].values()
    ] * ROUGE_REPEAT
    path = tmp / "summeval_pairs.jsonl"
    path.write_text("".join(json.dumps({"prediction": p, "reference": r}) + "\n" for p, r in pairs))
    print(f"scoring: {len(pairs)} ROUGE pairs", flush=True)

    # Baseline: rouge-score as its README shows it, one process, same keys and stemming, on
    # the same strings (ift's default leaves them as they are, rougeLsum included).
    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    t0 = time.perf_counter()
    totals = dict.fromkeys(ROUGE_KEYS, 0.0)
    for p, r in pairs:
        scores = scorer.score(r, p)
        for k in ROUGE_KEYS:
            totals[k] += scores[k].fmeasure
    loop_s = time.perf_counter() - t0
    reference = {k: 100.0 * v / len(pairs) for k, v in totals.items()}
    print(f"  rouge-score loop {loop_s:.2f}s", flush=True)

    measurements: dict[str, Any] = {"rouge_pairs": len(pairs)}
    worst = 0.0
    for workers in (1, 2):
        cmd = [sys.executable, "-m", "launcher", "score", "--predictions", str(path)]
        cmd += ["--metrics", "rouge", "--num-workers", str(workers)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
        seconds = time.perf_counter() - t0
        got = json.loads(proc.stdout)
        diff = max(abs(got[k] - reference[k]) for k in ROUGE_KEYS)
        assert diff < 1e-9, f"ift score disagrees with rouge-score by {diff}"
        worst = max(worst, diff)
        key = f"ift_score_{workers}_worker{'s' if workers > 1 else ''}"
        measurements[f"{key}_s"] = seconds
        measurements[f"{key}_pairs_per_s"] = len(pairs) / seconds
        print(f"  ift score --num-workers {workers}: {seconds:.2f}s", flush=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import eval.score"], check=True, cwd=ROOT)
    measurements["python_start_and_import_s"] = time.perf_counter() - t0
    measurements["rouge_max_abs_diff_vs_rouge_score"] = worst
    baselines = {"rouge_score_loop_s": loop_s, "rouge_score_loop_pairs_per_s": len(pairs) / loop_s}
    return measurements, baselines


# --------------------------------------------------------------------------- helpers


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torch

    return (
        f"{cpu}, {os.cpu_count()} CPUs visible (shared with other jobs), "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}, "
        f"torch {torch.__version__}"
    )


def print_table(result: dict[str, Any]) -> None:
    rows = [("section", "key", "value")]
    for section in ("measurements", "baselines", "ratios"):
        for k, v in result[section].items():
            rows.append((section, k, f"{v:.4g}" if isinstance(v, float) else str(v)))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    print(f"\neval benchmark, {result['date']}, {result['machine']}")
    for i, r in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


if __name__ == "__main__":
    sys.exit(main())

"""The evaluation report: base vs fine-tuned per metric, as Markdown and as a PNG chart.

    <output_dir>/eval/report.md        metric | base | [base k-shot |] fine-tuned | delta
    <output_dir>/eval/comparison.png   grouped bars, one group per metric

Under the tables, `report.md` shows the first `EXAMPLES_PER_TASK` test examples of each task:
the prompt (shortened), the reference and every role's prediction, side by side. The k-shot
column (role `base_fewshot`) appears when that role was evaluated; the delta is
always fine-tuned minus zero-shot base.

`build_markdown` and `bootstrap_by_task` are pure; `write_report` reads each role's
`metrics.json` (and, for the confidence interval of the delta, both `predictions.jsonl`) and
writes the two files. The eval job calls it after every role, so the report always shows the
roles whose outputs match the current model, data and settings. No Ray and no MLflow here.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from eval import metrics as M

Interval = tuple[float, float]
ROLE_TITLES = {"base": "base", "base_fewshot": "base k-shot", "finetuned": "fine-tuned"}
REPORT_FILE = "report.md"
CHART_FILE = "comparison.png"
EXAMPLES_PER_TASK = 3
# A prompt longer than this is shown as its start, " ... " and its end (the answer cue).
PROMPT_HEAD, PROMPT_TAIL = 240, 60


class StatsByTask:
    """The metrics of every task, merged from each chunk of records as it goes by.

    Per `(task, metric)` the statistics are merged and folded (`eval.metrics.fold_stats`), so
    the scores are those of one pass over the whole split in constant memory; with
    `keep_tables` the per-example statistics (`eval.metrics.example_stats`, a few numbers per
    example) are kept for a bootstrap, which resamples them (`bootstrap`).
    """

    def __init__(
        self,
        tasks: Mapping[str, Sequence[str]],
        options: Mapping[str, Any] | None = None,
        keep_tables: bool = False,
    ) -> None:
        self.tasks = {t: list(names) for t, names in tasks.items()}
        self.options = dict(options or {})
        self.keep_tables = keep_tables
        self.stats: dict[tuple[str, str], M.MetricStats] = {}
        self.tables: dict[tuple[str, str], list[np.ndarray]] = {}

    def add(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Adds a chunk of `{"task", "prediction", "reference"}` records, in corpus order."""
        by_task: dict[str, list[Mapping[str, Any]]] = {}
        for r in records:
            by_task.setdefault(str(r["task"]), []).append(r)
        for task, rows in by_task.items():
            preds = [str(r["prediction"]) for r in rows]
            refs = [_refs(r["reference"]) for r in rows]
            for name in self.tasks.get(task, []):
                table = M.example_stats(name, preds, refs, self.options)
                stats = M.stats_of_table(name, table, self.options)
                prev = self.stats.get((task, name))
                merged = stats if prev is None else M.merge_stats(name, [prev, stats])
                self.stats[(task, name)] = M.fold_stats(merged)
                if self.keep_tables:
                    self.tables.setdefault((task, name), []).append(table)

    def scores(self) -> dict[str, float]:
        """`<task>/<key>` -> score, tasks and metrics in `tasks` order."""
        out: dict[str, float] = {}
        for task, names in self.tasks.items():
            for name in names:
                if (task, name) in self.stats:
                    result = M.finalize(name, self.stats[(task, name)])
                    out.update({f"{task}/{k}": float(v) for k, v in result.items()})
        return out

    def bootstrap(self, n: int, seed: int) -> dict[str, np.ndarray]:
        """`<task>/<key>` -> `n` bootstrap scores, each task's examples resampled.

        The resamples depend only on the task's example count and `seed`, so two models
        scored on the same test split (in the same order) get paired samples: `ft - base` is
        a paired bootstrap of the delta.
        """
        out: dict[str, np.ndarray] = {}
        for (task, name), parts in self.tables.items():
            table = np.concatenate(parts) if len(parts) > 1 else parts[0]
            samples = M.bootstrap_table(name, table, n, seed, self.options)
            out.update({f"{task}/{k}": v for k, v in samples.items()})
        return out

    def intervals(self, boot: Mapping[str, Any]) -> dict[str, Interval]:
        """Percentile intervals under `{"samples", "seed", "confidence"}` settings."""
        samples = self.bootstrap(int(boot["samples"]), int(boot["seed"]))
        return intervals_of(samples, float(boot["confidence"]))


def bootstrap_by_task(
    tasks: Mapping[str, Sequence[str]],
    task_of: Sequence[str],
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    n: int,
    seed: int,
    bleu_tokenize: str = "13a",
    options: Mapping[str, Any] | None = None,
) -> dict[str, np.ndarray]:
    """Bootstrap samples of every `<task>/<key>` score from in-memory lists
    (`StatsByTask.bootstrap`; `bootstrap_file` streams a predictions file instead).

    Args:
        tasks: Task name -> metric names (as in `metrics.json`'s `tasks`).
        task_of: The task of each example.
        predictions: One prediction per example.
        references: The references of each example.
        n: Number of resamples.
        seed: Resampling seed.
        bleu_tokenize: sacreBLEU tokenizer for BLEU (when `options` is None).
        options: `eval.metrics.MetricOptions` fields.

    Returns:
        `<task>/<key>` -> array of `n` scores (0-100).
    """
    stats = StatsByTask(tasks, options or {"bleu_tokenize": bleu_tokenize}, keep_tables=True)
    stats.add(
        [
            {"task": t, "prediction": p, "reference": list(r)}
            for t, p, r in zip(task_of, predictions, references, strict=True)
        ]
    )
    return stats.bootstrap(n, seed)


def bootstrap_file(
    path: str,
    tasks: Mapping[str, Sequence[str]],
    boot: Mapping[str, Any],
    options: Mapping[str, Any] | None = None,
) -> dict[str, Interval]:
    """Bootstrap intervals of a `predictions.jsonl` file, read one chunk at a time."""
    stats = StatsByTask(tasks, options, keep_tables=True)
    for chunk in iter_predictions(path):
        stats.add(chunk)
    return stats.intervals(boot)


def intervals_of(samples: Mapping[str, np.ndarray], confidence: float) -> dict[str, Interval]:
    """Percentile interval of each key's bootstrap samples."""
    return {k: M.percentile_interval(v, confidence) for k, v in samples.items()}


def build_markdown(
    evals: Mapping[str, Mapping[str, float]],
    intervals: Mapping[str, Mapping[str, Interval]] | None = None,
    delta_intervals: Mapping[str, Interval] | None = None,
    bootstrap: Mapping[str, Any] | None = None,
    models: Mapping[str, str] | None = None,
    few_shot: int | None = None,
    rouge_split: Sequence[str] = (),
    examples: Mapping[str, Sequence[Mapping[str, str]]] | None = None,
) -> str:
    """The report as Markdown: one table of task metrics, one of generation throughput, then
    example predictions.

    Args:
        evals: Role (`base`, `finetuned`) -> metrics as in `metrics.json` (`<task>/<key>`
            task metrics and `eval/...` throughput).
        intervals: Role -> key -> (low, high) bootstrap interval, shown in brackets.
        delta_intervals: Key -> interval of fine-tuned minus base (paired bootstrap).
        bootstrap: `{"samples", "seed", "confidence"}`, described under the table.
        models: Role -> model path or URI.
        few_shot: Exemplars per prompt of the `base_fewshot` role, shown with its model.
        rouge_split: Roles scored with `rouge_split_sentences` on: a note says their
            rougeLsum is not rouge-score's on the raw text.
        examples: Task -> examples, each {"id", "prompt", "reference", <role>: prediction}
            (`pick_examples`), shown side by side per task.

    Returns:
        The Markdown text, ending with a newline.
    """
    intervals = intervals or {}
    delta_intervals = delta_intervals or {}
    base, ft = evals.get("base", {}), evals.get("finetuned", {})
    roles = table_roles(evals)
    titles = " | ".join(ROLE_TITLES[r] for r in roles)
    names = sorted({k for m in evals.values() for k in m if not k.startswith("eval/")})
    lines = ["# Evaluation report", ""]
    if models:
        for role in ROLE_TITLES:
            if role in models:
                shots = f" with {few_shot} exemplars per prompt" if role == "base_fewshot" else ""
                lines.append(f"- {ROLE_TITLES[role]}: `{models[role]}`{shots}")
        lines.append("")
    lines += [f"| metric | {titles} | delta |", "|---|" + "---:|" * (len(roles) + 1)]
    for n in names:
        b, f = base.get(n), ft.get(n)
        delta = f - b if b is not None and f is not None else None
        cells = " | ".join(
            _cell(evals.get(r, {}).get(n), intervals.get(r, {}).get(n)) for r in roles
        )
        lines.append(f"| {n} | {cells} | {_cell(delta, delta_intervals.get(n), signed=True)} |")
    lines.append("")
    note = "Scores are on a 0-100 scale."
    if bootstrap and bootstrap.get("samples"):
        pct = f"{100 * float(bootstrap['confidence']):g}%"
        note += (
            f" Brackets: {pct} percentile bootstrap interval over {bootstrap['samples']} "
            f"resamples of the test examples (seed {bootstrap['seed']})"
        )
        note += (
            "; the delta's interval is paired (both models on the same resamples)."
            if delta_intervals
            else "."
        )
    lines += [note, ""]
    if rouge_split and any("rougeLsum" in n for n in names):
        who = ", ".join(ROLE_TITLES[r] for r in ROLE_TITLES if r in rouge_split)
        lines += [
            f"rougeLsum ({who}): `rouge_split_sentences` was on, so texts were split into one "
            "sentence per line at `.`, `!` and `?` first; rouge-score on the raw text can "
            "differ.",
            "",
        ]
    speed = sorted({k for m in evals.values() for k in m if k.startswith("eval/")})
    if speed:
        lines += ["## Generation", "", f"| | {titles} |", "|---|" + "---:|" * len(roles)]
        for k in speed:
            cells = " | ".join(_cell(evals.get(r, {}).get(k)) for r in roles)
            lines.append(f"| {k.removeprefix('eval/')} | {cells} |")
        lines.append("")
    if examples:
        lines += _examples_markdown(examples, [r for r in ROLE_TITLES if r in evals])
    return "\n".join(lines)


def _examples_markdown(
    examples: Mapping[str, Sequence[Mapping[str, str]]], roles: Sequence[str]
) -> list[str]:
    lines = ["## Examples", "", "The first test examples of each task, as each model answered."]
    lines.append("")
    for task, rows in examples.items():
        lines += [f"### {task}", ""]
        for row in rows:
            lines += [f"`{row['id']}`", "", "| | |", "|---|---|"]
            lines.append(f"| prompt | {_md_text(_shorten(row['prompt']))} |")
            lines.append(f"| reference | {_md_text(row['reference'])} |")
            for role in roles:
                lines.append(f"| {ROLE_TITLES[role]} | {_md_text(row.get(role, '-'))} |")
            lines.append("")
    return lines


def pick_examples(
    eval_dir: str, roles: Sequence[str], tasks: Sequence[str], per_task: int = EXAMPLES_PER_TASK
) -> dict[str, list[dict[str, str]]]:
    """The first `per_task` test examples of each task with every role's prediction.

    The first role's `predictions.jsonl` picks them (file order: the test split's) and each
    other role's file is then searched for their ids; every file is read a chunk at a time and
    only until what is needed was found, so memory holds just the chosen examples.

    Returns:
        Task -> [{"id", "prompt", "reference", <role>: prediction, ...}], tasks in `tasks`
        order (a task without examples is left out).
    """
    files = {r: os.path.join(eval_dir, r, "predictions.jsonl") for r in roles}
    roles = [r for r in roles if os.path.exists(files[r])]
    if not roles:
        return {}
    chosen: dict[str, list[dict[str, str]]] = {t: [] for t in tasks}
    by_id: dict[str, dict[str, str]] = {}

    def full() -> bool:
        return all(len(rows) >= per_task for rows in chosen.values())

    for chunk in iter_predictions(files[roles[0]], 256):
        for r in chunk:
            rows = chosen.get(str(r["task"]))
            if rows is not None and len(rows) < per_task:
                ref = r["reference"]
                row = {
                    "id": str(r["id"]),
                    "prompt": str(r["prompt"]),
                    "reference": ref if isinstance(ref, str) else " | ".join(map(str, ref)),
                    roles[0]: str(r["prediction"]),
                }
                rows.append(row)
                by_id[row["id"]] = row
        if full():
            break
    for role in roles[1:]:
        missing = set(by_id)
        for chunk in iter_predictions(files[role], 256):
            for r in chunk:
                if str(r["id"]) in missing:
                    by_id[str(r["id"])][role] = str(r["prediction"])
                    missing.discard(str(r["id"]))
            if not missing:
                break
    return {t: rows for t, rows in chosen.items() if rows}


def _shorten(text: str) -> str:
    if len(text) <= PROMPT_HEAD + PROMPT_TAIL + 5:
        return text
    return f"{text[:PROMPT_HEAD]} ... {text[-PROMPT_TAIL:]}"


def _md_text(text: str) -> str:
    """`text` as one Markdown table cell: pipes escaped, line breaks shown as `<br>`."""
    text = text.replace("|", "\\|").replace("\r\n", "\n").strip("\n")
    return text.replace("\n", "<br>") if text.strip() else "(empty)"


def table_roles(evals: Mapping[str, Any]) -> list[str]:
    """Columns of a comparison table: base and fine-tuned always (the delta's two sides), the
    k-shot base between them when it was evaluated."""
    return [r for r in ROLE_TITLES if r != "base_fewshot" or r in evals]


def plot_comparison(
    evals: Mapping[str, Mapping[str, float]],
    path: str,
    intervals: Mapping[str, Mapping[str, Interval]] | None = None,
) -> None:
    """Grouped bar chart, base vs fine-tuned per task metric, written as a PNG.

    Args:
        evals: Role -> metrics (the `eval/...` throughput keys are left out).
        path: Where to write the PNG.
        intervals: Role -> key -> (low, high), drawn as error bars.
    """
    # The object API with the Agg canvas: no pyplot global state, no display needed, and the
    # caller's matplotlib backend is left alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    intervals = intervals or {}
    roles = [r for r in ROLE_TITLES if r in evals]
    names = sorted({k for r in roles for k in evals[r] if not k.startswith("eval/")})
    fig = Figure(figsize=(max(4.0, 1.2 * len(names) + 2.0), 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(roles))
    x = np.arange(len(names))
    for j, role in enumerate(roles):
        pos = x + (j - (len(roles) - 1) / 2) * width
        values = np.array([evals[role].get(n, np.nan) for n in names], dtype=np.float64)
        ax.bar(pos, values, width, label=ROLE_TITLES[role])
        ci = intervals.get(role, {})
        if ci:
            low = np.array([ci.get(n, (v, v))[0] for n, v in zip(names, values, strict=True)])
            high = np.array([ci.get(n, (v, v))[1] for n, v in zip(names, values, strict=True)])
            # errorbar wants distances below and above each bar, never negative.
            err = np.maximum(0.0, np.stack([values - low, high - values]))
            ax.errorbar(pos, values, yerr=err, fmt="none", ecolor="black", capsize=3)
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylabel("score (0-100)")
    ax.set_title(" vs ".join(ROLE_TITLES[r] for r in roles) or "no results")
    if roles:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")


def write_report(
    eval_dir: str, roles: Sequence[str], options: Mapping[str, Any] | None = None
) -> dict[str, str]:
    """Writes `report.md` and `comparison.png` for the given roles' outputs in `eval_dir`.

    Per-role intervals come from each `metrics.json`; when both roles were bootstrapped with
    the same settings, the delta's interval is a paired bootstrap over both predictions files.

    Args:
        eval_dir: `<output_dir>/eval`, holding `<role>/metrics.json` and `predictions.jsonl`.
        roles: The roles to show (normally those whose outputs are current).
        options: Metric options for outputs whose `metrics.json` does not record its own
            `metric_options` (written by an older ift).

    Returns:
        {"report": path of report.md, "chart": path of comparison.png}.
    """
    data = {r: _read_json(os.path.join(eval_dir, r, "metrics.json")) for r in roles}
    evals = {r: d["metrics"] for r, d in data.items()}
    intervals = {
        r: {k: (float(v[0]), float(v[1])) for k, v in d.get("intervals", {}).items()}
        for r, d in data.items()
    }
    boot = {r: d.get("bootstrap") for r, d in data.items()}
    delta: dict[str, Interval] = {}
    settings = next((b for b in boot.values() if b), None)
    used = {r: d.get("metric_options") or dict(options or {}) for r, d in data.items()}
    if {"base", "finetuned"} <= set(data) and settings and boot["base"] == boot["finetuned"]:
        delta = _paired_delta(eval_dir, data["base"]["tasks"], settings, used["base"])
    text = build_markdown(
        evals,
        intervals,
        delta,
        bootstrap=settings,
        models={r: str(d.get("model", "")) for r, d in data.items()},
        few_shot=data.get("base_fewshot", {}).get("few_shot"),
        rouge_split=[r for r in data if used[r].get("rouge_split_sentences")],
        examples=pick_examples(eval_dir, list(data), _task_names(data)),
    )
    report = os.path.join(eval_dir, REPORT_FILE)
    chart = os.path.join(eval_dir, CHART_FILE)
    _write_atomic(report, text.encode())
    tmp = f"{chart}.tmp-{os.getpid()}"
    plot_comparison(evals, tmp, intervals)
    os.replace(tmp, chart)
    return {"report": report, "chart": chart}


def read_predictions(path: str) -> list[dict[str, Any]]:
    """The records of a `predictions.jsonl` file, in file order (all in memory)."""
    return [r for chunk in iter_predictions(path) for r in chunk]


def iter_predictions(path: str, chunk: int = 4096) -> Iterator[list[dict[str, Any]]]:
    """The records of a `predictions.jsonl` file, in file order, `chunk` at a time."""
    rows: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
                if len(rows) == chunk:
                    yield rows
                    rows = []
    if rows:
        yield rows


def _paired_delta(
    eval_dir: str,
    tasks: Mapping[str, Sequence[str]],
    settings: Mapping[str, Any],
    options: Mapping[str, Any] | None,
) -> dict[str, Interval]:
    """Interval of fine-tuned minus base, both bootstrapped on the same resamples.

    Both files are normally in test-split order (the eval job writes them so) and are read
    side by side, a chunk at a time; files in different orders are aligned on `id` in memory.
    """
    paths = [os.path.join(eval_dir, r, "predictions.jsonl") for r in ("base", "finetuned")]
    stats = [StatsByTask(tasks, options, keep_tables=True) for _ in paths]
    base_chunks, ft_chunks = (iter_predictions(p) for p in paths)
    empty: list[dict[str, Any]] = []
    for b_rows, f_rows in itertools.zip_longest(base_chunks, ft_chunks, fillvalue=empty):
        if [r["id"] for r in b_rows] != [r["id"] for r in f_rows]:
            return _paired_delta_by_id(paths, tasks, settings, options)
        stats[0].add(b_rows)
        stats[1].add(f_rows)
    n, seed = int(settings["samples"]), int(settings["seed"])
    b, f = (s.bootstrap(n, seed) for s in stats)
    return intervals_of({k: f[k] - b[k] for k in b if k in f}, float(settings["confidence"]))


def _paired_delta_by_id(
    paths: Sequence[str],
    tasks: Mapping[str, Sequence[str]],
    settings: Mapping[str, Any],
    options: Mapping[str, Any] | None,
) -> dict[str, Interval]:
    base = read_predictions(paths[0])
    ft = {r["id"]: r for r in read_predictions(paths[1])}
    if sorted(ft) != sorted(r["id"] for r in base):
        return {}  # not the same test split: no pairing possible
    stats = [StatsByTask(tasks, options, keep_tables=True) for _ in paths]
    stats[0].add(base)
    stats[1].add([ft[r["id"]] for r in base])  # aligned on id, in the base file's order
    n, seed = int(settings["samples"]), int(settings["seed"])
    b, f = (s.bootstrap(n, seed) for s in stats)
    return intervals_of({k: f[k] - b[k] for k in b if k in f}, float(settings["confidence"]))


def _task_names(data: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Every role's tasks (from `metrics.json`), in first-seen order."""
    return list(dict.fromkeys(t for d in data.values() for t in d.get("tasks", {})))


def _refs(reference: str | list[str]) -> list[str]:
    return [reference] if isinstance(reference, str) else list(reference)


def _cell(value: float | None, ci: Interval | None = None, signed: bool = False) -> str:
    if value is None:
        return "-"
    fmt = "{:+.2f}" if signed else "{:.2f}"
    text = fmt.format(value)
    if ci is not None:
        text += f" [{fmt.format(ci[0])}, {fmt.format(ci[1])}]"
    return text


def _read_json(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)  # type: ignore[no-any-return]


def _write_atomic(path: str, payload: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(payload)
    os.replace(tmp, path)

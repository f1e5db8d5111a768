"""The evaluation report: base vs fine-tuned per metric, as Markdown and as a PNG chart.

    <output_dir>/eval/report.md        metric | base | [base k-shot |] fine-tuned | delta
    <output_dir>/eval/comparison.png   grouped bars, one group per metric

The k-shot column (role `base_fewshot`) appears when that role was evaluated; the delta is
always fine-tuned minus zero-shot base.

`build_markdown` and `bootstrap_by_task` are pure; `write_report` reads each role's
`metrics.json` (and, for the confidence interval of the delta, both `predictions.jsonl`) and
writes the two files. The eval job calls it after every role, so the report always shows the
roles whose outputs match the current model, data and settings. No Ray and no MLflow here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from eval import metrics as M

Interval = tuple[float, float]
ROLE_TITLES = {"base": "base", "base_fewshot": "base k-shot", "finetuned": "fine-tuned"}
REPORT_FILE = "report.md"
CHART_FILE = "comparison.png"


def bootstrap_by_task(
    tasks: Mapping[str, Sequence[str]],
    task_of: Sequence[str],
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    n: int,
    seed: int,
    bleu_tokenize: str = "13a",
) -> dict[str, np.ndarray]:
    """Bootstrap samples of every `<task>/<key>` score, resampling each task's examples.

    The resamples depend only on the task's example count and `seed`, so two models scored on
    the same test split (in the same order) get paired samples: `ft - base` is a paired
    bootstrap of the delta.

    Args:
        tasks: Task name -> metric names (as in `metrics.json`'s `tasks`).
        task_of: The task of each example.
        predictions: One prediction per example.
        references: The references of each example.
        n: Number of resamples.
        seed: Resampling seed.
        bleu_tokenize: sacreBLEU tokenizer for BLEU.

    Returns:
        `<task>/<key>` -> array of `n` scores (0-100).
    """
    out: dict[str, np.ndarray] = {}
    for task, names in tasks.items():
        idx = [i for i, t in enumerate(task_of) if t == task]
        if not idx:
            continue
        indices = M.bootstrap_indices(len(idx), n, seed)
        preds = [predictions[i] for i in idx]
        refs = [list(references[i]) for i in idx]
        for name in names:
            samples = M.bootstrap_scores(
                name, preds, refs, indices, options={"bleu_tokenize": bleu_tokenize}
            )
            out.update({f"{task}/{k}": v for k, v in samples.items()})
    return out


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
) -> str:
    """The report as Markdown: one table of task metrics, one of generation throughput.

    Args:
        evals: Role (`base`, `finetuned`) -> metrics as in `metrics.json` (`<task>/<key>`
            task metrics and `eval/...` throughput).
        intervals: Role -> key -> (low, high) bootstrap interval, shown in brackets.
        delta_intervals: Key -> interval of fine-tuned minus base (paired bootstrap).
        bootstrap: `{"samples", "seed", "confidence"}`, described under the table.
        models: Role -> model path or URI.
        few_shot: Exemplars per prompt of the `base_fewshot` role, shown with its model.

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
    speed = sorted({k for m in evals.values() for k in m if k.startswith("eval/")})
    if speed:
        lines += ["## Generation", "", f"| | {titles} |", "|---|" + "---:|" * len(roles)]
        for k in speed:
            cells = " | ".join(_cell(evals.get(r, {}).get(k)) for r in roles)
            lines.append(f"| {k.removeprefix('eval/')} | {cells} |")
        lines.append("")
    return "\n".join(lines)


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


def write_report(eval_dir: str, roles: Sequence[str], bleu_tokenize: str = "13a") -> dict[str, str]:
    """Writes `report.md` and `comparison.png` for the given roles' outputs in `eval_dir`.

    Per-role intervals come from each `metrics.json`; when both roles were bootstrapped with
    the same settings, the delta's interval is a paired bootstrap over both predictions files.

    Args:
        eval_dir: `<output_dir>/eval`, holding `<role>/metrics.json` and `predictions.jsonl`.
        roles: The roles to show (normally those whose outputs are current).
        bleu_tokenize: sacreBLEU tokenizer, as used for the metrics.

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
    if {"base", "finetuned"} <= set(data) and settings and boot["base"] == boot["finetuned"]:
        delta = _paired_delta(eval_dir, data["base"]["tasks"], settings, bleu_tokenize)
    text = build_markdown(
        evals,
        intervals,
        delta,
        bootstrap=settings,
        models={r: str(d.get("model", "")) for r, d in data.items()},
        few_shot=data.get("base_fewshot", {}).get("few_shot"),
    )
    report = os.path.join(eval_dir, REPORT_FILE)
    chart = os.path.join(eval_dir, CHART_FILE)
    _write_atomic(report, text.encode())
    tmp = f"{chart}.tmp-{os.getpid()}"
    plot_comparison(evals, tmp, intervals)
    os.replace(tmp, chart)
    return {"report": report, "chart": chart}


def read_predictions(path: str) -> list[dict[str, Any]]:
    """The records of a `predictions.jsonl` file, in file order."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _paired_delta(
    eval_dir: str, tasks: Mapping[str, Sequence[str]], settings: Mapping[str, Any], tok: str
) -> dict[str, Interval]:
    base = read_predictions(os.path.join(eval_dir, "base", "predictions.jsonl"))
    ft = {
        r["id"]: r
        for r in read_predictions(os.path.join(eval_dir, "finetuned", "predictions.jsonl"))
    }
    if sorted(ft) != sorted(r["id"] for r in base):
        return {}  # not the same test split: no pairing possible
    ft_rows = [ft[r["id"]] for r in base]  # align on id, in the base file's order
    samples = []
    for rows in (base, ft_rows):
        samples.append(
            bootstrap_by_task(
                tasks,
                [r["task"] for r in rows],
                [r["prediction"] for r in rows],
                [_refs(r["reference"]) for r in rows],
                n=int(settings["samples"]),
                seed=int(settings["seed"]),
                bleu_tokenize=tok,
            )
        )
    b, f = samples
    return intervals_of({k: f[k] - b[k] for k in b if k in f}, float(settings["confidence"]))


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

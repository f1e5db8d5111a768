"""Tests for eval.report (Markdown table, PNG chart, paired bootstrap) and the bootstrap helpers
of eval.metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eval import metrics as M
from eval.report import (
    bootstrap_by_task,
    build_markdown,
    pick_examples,
    plot_comparison,
    write_report,
)

EVALS = {
    "base": {"sst2/accuracy": 50.0, "wmt/bleu": 1.25, "eval/examples_per_s": 10.0},
    "finetuned": {"sst2/accuracy": 75.0, "wmt/bleu": 3.5, "eval/examples_per_s": 12.5},
}


# --- build_markdown ---------------------------------------------------------------------------


def test_markdown_table_without_intervals() -> None:
    assert build_markdown(EVALS) == (
        "# Evaluation report\n"
        "\n"
        "| metric | base | fine-tuned | delta |\n"
        "|---|---:|---:|---:|\n"
        "| sst2/accuracy | 50.00 | 75.00 | +25.00 |\n"
        "| wmt/bleu | 1.25 | 3.50 | +2.25 |\n"
        "\n"
        "Scores are on a 0-100 scale.\n"
        "\n"
        "## Generation\n"
        "\n"
        "| | base | fine-tuned |\n"
        "|---|---:|---:|\n"
        "| examples_per_s | 10.00 | 12.50 |\n"
    )


def test_markdown_with_intervals_and_paired_delta() -> None:
    text = build_markdown(
        {r: {"sst2/accuracy": m["sst2/accuracy"]} for r, m in EVALS.items()},
        intervals={"base": {"sst2/accuracy": (40.0, 60.0)}, "finetuned": {}},
        delta_intervals={"sst2/accuracy": (-5.0, 55.5)},
        bootstrap={"samples": 1000, "seed": 7, "confidence": 0.95},
        models={"base": "models/base", "finetuned": "runs/x/model"},
    )
    lines = text.splitlines()
    assert lines[2:4] == ["- base: `models/base`", "- fine-tuned: `runs/x/model`"]
    assert "| sst2/accuracy | 50.00 [40.00, 60.00] | 75.00 | +25.00 [-5.00, +55.50] |" in lines
    assert (
        "Scores are on a 0-100 scale. Brackets: 95% percentile bootstrap interval over 1000 "
        "resamples of the test examples (seed 7); the delta's interval is paired (both models "
        "on the same resamples)."
    ) in lines
    assert "## Generation" not in text


def test_markdown_with_one_role_shows_dashes() -> None:
    text = build_markdown({"base": {"wmt/chrf": 12.0}})
    assert "| wmt/chrf | 12.00 | - | - |" in text.splitlines()


# --- plot_comparison --------------------------------------------------------------------------


@pytest.mark.parametrize("roles", [("base", "finetuned"), ("base",)])
def test_chart_is_a_valid_png(tmp_path: Path, roles: tuple[str, ...]) -> None:
    path = tmp_path / "comparison.png"
    plot_comparison(
        {r: EVALS[r] for r in roles},
        str(path),
        intervals={"base": {"sst2/accuracy": (40.0, 60.0), "wmt/bleu": (0.5, 2.0)}},
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as img:
        img.verify()  # checks the chunks' CRCs
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size[0] >= 400 and img.size[1] == 400
        # Not a blank canvas: bars, axes and text were drawn.
        assert len(set(img.convert("RGB").getdata())) > 3


# --- bootstrap --------------------------------------------------------------------------------


def test_bootstrap_indices_are_seeded() -> None:
    a = M.bootstrap_indices(5, 3, seed=1)
    assert a.shape == (3, 5) and a.min() >= 0 and a.max() < 5
    assert np.array_equal(a, M.bootstrap_indices(5, 3, seed=1))
    assert not np.array_equal(a, M.bootstrap_indices(5, 3, seed=2))


def test_bootstrap_scores_match_compute_metrics_on_each_resample() -> None:
    preds = ["the cat sat", "a dog", "positive", "the mat", "negative"]
    refs = [["the cat sat down"], ["one dog"], ["positive"], ["on the mat"], ["positive"]]
    idx = M.bootstrap_indices(len(preds), 4, seed=0)
    for name in ("bleu", "rouge", "accuracy"):
        samples = M.bootstrap_scores(name, preds, refs, idx)
        for r, row in enumerate(idx):
            expected = M.compute_metrics([name], [preds[i] for i in row], [refs[i] for i in row])
            for key, value in expected.items():
                assert samples[key][r] == pytest.approx(value, abs=1e-9)


def test_paired_bootstrap_of_identical_systems_is_zero() -> None:
    tasks = {"sst2": ["accuracy"], "wmt": ["bleu", "chrf"]}
    task_of = ["sst2", "wmt", "sst2", "wmt", "wmt"]
    preds = ["positive", "the cat", "negative", "a dog barks", "hello world"]
    refs = [["positive"], ["the cat sat"], ["positive"], ["a dog barked"], ["hello there"]]
    a = bootstrap_by_task(tasks, task_of, preds, refs, n=50, seed=3)
    b = bootstrap_by_task(tasks, task_of, list(preds), refs, n=50, seed=3)
    assert sorted(a) == ["sst2/accuracy", "wmt/bleu", "wmt/chrf"]
    for k in a:
        assert np.array_equal(a[k], b[k])


# --- write_report -----------------------------------------------------------------------------


def _role_outputs(eval_dir: Path, role: str, preds: list[str], boot: dict | None) -> None:
    rows = [
        {"id": f"s{i}", "task": "sst2", "prompt": "p", "prediction": p, "reference": ref}
        for i, (p, ref) in enumerate(zip(preds, ["positive", "negative"] * 10, strict=False))
    ]
    acc = M.compute_metrics(["accuracy"], preds, [r["reference"] for r in rows])["accuracy"]
    (eval_dir / role).mkdir(parents=True)
    if role == "finetuned":
        rows = rows[::-1]  # a different order must not break the pairing (aligned on id)
    (eval_dir / role / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (eval_dir / role / "metrics.json").write_text(
        json.dumps(
            {
                "role": role,
                "model": f"models/{role}",
                "metrics": {"sst2/accuracy": acc},
                "tasks": {"sst2": ["accuracy"]},
                "bootstrap": boot,
                "intervals": {"sst2/accuracy": [acc - 10, acc + 10]} if boot else {},
            }
        )
    )


def test_write_report_with_paired_delta(tmp_path: Path) -> None:
    boot = {"samples": 200, "seed": 0, "confidence": 0.95}
    _role_outputs(tmp_path, "base", ["negative"] * 20, boot)  # half right
    _role_outputs(tmp_path, "finetuned", ["positive", "negative"] * 10, boot)  # all right
    paths = write_report(str(tmp_path), ["base", "finetuned"])
    assert paths == {
        "report": str(tmp_path / "report.md"),
        "chart": str(tmp_path / "comparison.png"),
    }
    text = (tmp_path / "report.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| sst2/accuracy"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "50.00 [40.00, 60.00]"
    assert cells[2] == "100.00 [90.00, 110.00]"
    # The fine-tuned model is right wherever base is, so every resampled delta is >= 0.
    low, high = (float(v) for v in cells[3].split("[")[1].rstrip("]").split(","))
    assert cells[3].startswith("+50.00 [") and 0 < low < 50 < high <= 100
    assert "paired" in text
    assert (tmp_path / "comparison.png").read_bytes()[:4] == b"\x89PNG"


def test_write_report_without_bootstrap_has_no_intervals(tmp_path: Path) -> None:
    _role_outputs(tmp_path, "base", ["negative"] * 20, None)
    write_report(str(tmp_path), ["base"])
    text = (tmp_path / "report.md").read_text()
    assert "| sst2/accuracy | 50.00 | - | - |" in text and "[" not in text


def test_write_report_identical_models_have_a_zero_delta_interval(tmp_path: Path) -> None:
    # Same predictions in another file order: pairing on id makes every resampled delta 0;
    # unpaired resamples would give a wide interval around 0.
    boot = {"samples": 100, "seed": 1, "confidence": 0.95}
    preds = ["positive", "positive", "negative", "negative", "positive"] * 4
    _role_outputs(tmp_path, "base", preds, boot)
    _role_outputs(tmp_path, "finetuned", preds, boot)
    write_report(str(tmp_path), ["base", "finetuned"])
    assert "| +0.00 [+0.00, +0.00] |" in (tmp_path / "report.md").read_text()


def test_write_report_with_the_k_shot_base(tmp_path: Path) -> None:
    boot = {"samples": 100, "seed": 1, "confidence": 0.95}
    _role_outputs(tmp_path, "base", ["negative"] * 20, boot)  # 50
    _role_outputs(tmp_path, "base_fewshot", ["positive"] * 15 + ["negative"] * 5, boot)  # 55
    _role_outputs(tmp_path, "finetuned", ["positive", "negative"] * 10, boot)  # 100
    metrics = json.loads((tmp_path / "base_fewshot" / "metrics.json").read_text())
    (tmp_path / "base_fewshot" / "metrics.json").write_text(json.dumps({**metrics, "few_shot": 4}))
    write_report(str(tmp_path), ["base", "base_fewshot", "finetuned"])
    lines = (tmp_path / "report.md").read_text().splitlines()
    assert "- base k-shot: `models/base_fewshot` with 4 exemplars per prompt" in lines
    assert "| metric | base | base k-shot | fine-tuned | delta |" in lines
    row = next(line for line in lines if line.startswith("| sst2/accuracy"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert [c.split(" [")[0] for c in cells] == [
        "sst2/accuracy",
        "50.00",
        "55.00",
        "100.00",
        "+50.00",
    ]
    assert (tmp_path / "comparison.png").read_bytes()[:4] == b"\x89PNG"


def test_report_says_when_rouge_split_sentences_was_on(tmp_path: Path) -> None:
    evals = {"base": {"cnn/rougeL": 20.0, "cnn/rougeLsum": 25.0}, "finetuned": {}}
    plain = build_markdown(evals)
    assert "rouge_split_sentences" not in plain
    text = build_markdown(evals, rouge_split=["base"])
    assert "rougeLsum (base): `rouge_split_sentences` was on" in text
    # write_report reads it from each role's metrics.json.
    for role, split in (("base", True), ("finetuned", False)):
        (tmp_path / role).mkdir()
        (tmp_path / role / "metrics.json").write_text(
            json.dumps(
                {
                    "role": role,
                    "metrics": {"cnn/rougeLsum": 25.0},
                    "tasks": {"cnn": ["rouge"]},
                    "metric_options": {"bleu_tokenize": "13a", "rouge_split_sentences": split},
                }
            )
        )
    write_report(str(tmp_path), ["base", "finetuned"])
    report = (tmp_path / "report.md").read_text()
    assert "rougeLsum (base): `rouge_split_sentences` was on" in report


def test_paired_delta_streams_files_in_the_same_order(tmp_path: Path) -> None:
    """Outputs of the eval job (same test-split order) are paired chunk by chunk; the interval
    equals the in-memory paired bootstrap."""
    from eval.report import _paired_delta

    boot = {"samples": 300, "seed": 4, "confidence": 0.9}
    n = 9000  # more than one chunk of records
    refs = ["positive", "negative", "positive"] * (n // 3)
    base = ["positive"] * n
    ft = [r if i % 5 else "x" for i, r in enumerate(refs)]
    for role, preds in (("base", base), ("finetuned", ft)):
        (tmp_path / role).mkdir()
        rows = [
            {"id": f"s{i}", "task": "sst2", "prediction": p, "reference": r}
            for i, (p, r) in enumerate(zip(preds, refs, strict=True))
        ]
        (tmp_path / role / "predictions.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows)
        )
    tasks = {"sst2": ["accuracy"]}
    got = _paired_delta(str(tmp_path), tasks, boot, None)
    a = bootstrap_by_task(tasks, ["sst2"] * n, base, [[r] for r in refs], n=300, seed=4)
    b = bootstrap_by_task(tasks, ["sst2"] * n, ft, [[r] for r in refs], n=300, seed=4)
    want = M.percentile_interval(b["sst2/accuracy"] - a["sst2/accuracy"], 0.9)
    assert got["sst2/accuracy"] == want
    assert want[0] > 0  # fine-tuned is clearly better here: a real, non-zero interval


# --- example predictions side by side ----------------------------------------------------------


def test_report_shows_the_first_examples_of_each_task_side_by_side(tmp_path: Path) -> None:
    """Three examples per task, in test-split order, with the reference and each role's
    prediction; the fine-tuned file in another order is matched on id; a long prompt is cut
    to its start and end; pipes and line breaks cannot break the table."""
    article = "Article:\n" + "word " * 200 + "\n\nSummary:\n"
    rows = [
        {
            "id": f"s{i}",
            "task": "sst2",
            "prompt": f"Review: r{i}\nSentiment:",
            "reference": "positive",
        }
        for i in range(5)
    ] + [
        {"id": f"c{i}", "task": "cnn", "prompt": article, "reference": [f"ref {i}", "other"]}
        for i in range(4)
    ]
    for role in ("base", "finetuned"):
        (tmp_path / role).mkdir()
        preds = [{**r, "prediction": f"{role} says | {r['id']}\nmore"} for r in rows]
        if role == "finetuned":
            preds = preds[::-1]
        (tmp_path / role / "predictions.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in preds)
        )
        (tmp_path / role / "metrics.json").write_text(
            json.dumps(
                {
                    "role": role,
                    "metrics": {"sst2/accuracy": 50.0, "cnn/rouge1": 10.0},
                    "tasks": {"sst2": ["accuracy"], "cnn": ["rouge"]},
                }
            )
        )

    picked = pick_examples(str(tmp_path), ["base", "finetuned"], ["sst2", "cnn"])
    assert [[r["id"] for r in rows] for rows in picked.values()] == [
        ["s0", "s1", "s2"],
        ["c0", "c1", "c2"],
    ]
    assert picked["cnn"][1] == {
        "id": "c1",
        "prompt": article,
        "reference": "ref 1 | other",
        "base": "base says | c1\nmore",
        "finetuned": "finetuned says | c1\nmore",
    }

    write_report(str(tmp_path), ["base", "finetuned"])
    text = (tmp_path / "report.md").read_text()
    section = text.split("## Examples\n", 1)[1]
    assert section.index("### sst2") < section.index("### cnn")
    assert "| base | base says \\| s0<br>more |" in section
    assert "| fine-tuned | finetuned says \\| s0<br>more |" in section
    assert "| reference | positive |" in section
    assert "| prompt | Review: r1<br>Sentiment: |" in section
    assert "`s3`" not in section and "`c3`" not in section
    prompt = next(line for line in section.splitlines() if line.startswith("| prompt | Article"))
    assert " ... " in prompt and prompt.endswith("word <br><br>Summary: |")
    assert len(prompt) < 400


def test_pick_examples_without_predictions_files(tmp_path: Path) -> None:
    assert pick_examples(str(tmp_path), ["base"], ["sst2"]) == {}

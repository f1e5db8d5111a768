"""`ift score` through the CLI entry point, checked against sacreBLEU itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sacrebleu

from launcher.cli import main

ROOT = Path(__file__).resolve().parents[2]
WMT = ROOT / "tests" / "assets" / "wmt21" / "txt"


def test_ift_score_prints_sacrebleu_corpus_scores(tmp_path: Path, capsys) -> None:
    hyps = (WMT / "system-outputs" / "newstest2021.de-en.hyp.UEdin.en").read_text().splitlines()
    refs = (WMT / "references" / "newstest2021.de-en.ref.A.en").read_text().splitlines()
    hyps, refs = hyps[:200], refs[:200]
    path = tmp_path / "preds.jsonl"
    path.write_text(
        "".join(
            json.dumps({"prediction": h, "reference": r}) + "\n"
            for h, r in zip(hyps, refs, strict=True)
        )
    )
    assert main(["score", "--predictions", str(path), "--metrics", "bleu,chrf"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score, abs=1e-9)
    assert out["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score, abs=1e-9)


def test_ift_score_names_the_bad_line(tmp_path: Path, capsys) -> None:
    path = tmp_path / "preds.jsonl"
    path.write_text('{"prediction": "a", "reference": "a"}\n{"prediction": "b"\n')
    assert main(["score", "--predictions", str(path)]) != 0
    err = capsys.readouterr().err
    assert "line 2" in err and str(path) in err


def test_ift_score_passes_every_metric_option(tmp_path: Path, capsys) -> None:
    """`ift score` and `python -m eval.score` are one parser: --lowercase reaches sacreBLEU."""
    from eval.score import main as module_main

    hyps = ["The Cat Sat On The Mat .", "A DOG barked"]
    refs = ["the cat sat on the mat .", "a dog barked"]
    path = tmp_path / "preds.jsonl"
    path.write_text(
        "".join(
            json.dumps({"prediction": h, "reference": r}) + "\n"
            for h, r in zip(hyps, refs, strict=True)
        )
    )
    args = ["--predictions", str(path), "--metrics", "bleu,chrf", "--lowercase"]
    assert main(["score", *args]) == 0
    via_ift = json.loads(capsys.readouterr().out)
    assert module_main(args) == 0
    assert json.loads(capsys.readouterr().out) == via_ift
    assert via_ift["bleu"] == pytest.approx(
        sacrebleu.corpus_bleu(hyps, [refs], lowercase=True).score, abs=1e-9
    )
    chrf = sacrebleu.metrics.CHRF(lowercase=True).corpus_score(hyps, [refs]).score
    assert via_ift["chrf"] == pytest.approx(chrf, abs=1e-9)
    assert main(["score", "--predictions", str(path), "--metrics", "bleu"]) == 0
    assert json.loads(capsys.readouterr().out)["bleu"] < via_ift["bleu"]  # case matters without


def test_ift_score_help_documents_every_metric_option(capsys) -> None:
    import dataclasses

    from eval.metrics import MetricOptions

    with pytest.raises(SystemExit) as done:
        main(["score", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for field in dataclasses.fields(MetricOptions):
        flag = "--" + field.name.replace("_", "-")
        assert flag in text, flag
    assert "--rouge-split-sentences" in text and "--no-rouge-split-sentences" in text
    assert "rouge-score" in text  # the help says what the default means

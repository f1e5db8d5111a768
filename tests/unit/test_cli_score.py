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

"""`ift score` on real data: WMT21 BLEU against the official table, SummEval ROUGE against
rouge-score, with 1 and 3 worker processes (the result must not depend on the split)."""

from __future__ import annotations

import concurrent.futures
import csv
import json
import multiprocessing
from collections.abc import Iterator
from pathlib import Path

import pytest

from eval.metrics import ROUGE_KEYS, split_sentences
from eval.score import main, read_predictions, score_file

ASSETS = Path(__file__).resolve().parents[1] / "assets"
WMT = ASSETS / "wmt21"
# Every reference of each pair in txt/references; bleu-all in the table uses all of them.
WMT_REFS = {"de-en": ("A", "B"), "en-de": ("A", "C", "D")}


def _lines(path: Path) -> list[str]:
    # Not splitlines(): it would also split on rare Unicode separators inside a segment.
    return path.read_text(encoding="utf-8").rstrip("\n").split("\n")


def _write_jsonl(path: Path, predictions: list[str], references: list[list[str]]) -> str:
    with path.open("w", encoding="utf-8") as fh:
        for pred, refs in zip(predictions, references, strict=True):
            fh.write(json.dumps({"prediction": pred, "reference": refs}, ensure_ascii=False))
            fh.write("\n")
    return str(path)


def _official_scores() -> dict[tuple[str, str, str], float]:
    with (WMT / "automatic-scores.tsv").open(encoding="utf-8") as fh:
        return {
            (row["pair"], row["system"], row["metric"]): float(row["score"])
            for row in csv.DictReader(fh, delimiter="\t")
        }


def _wmt_systems() -> list[tuple[str, str]]:
    found = []
    for path in sorted((WMT / "txt" / "system-outputs").iterdir()):
        # newstest2021.<pair>.hyp.<system>.<lang>
        pair = path.name.split(".")[1]
        system = path.name.split(".hyp.")[1].rsplit(".", 1)[0]
        found.append((pair, system))
    return found


@pytest.fixture(scope="module")
def pool() -> Iterator[concurrent.futures.Executor]:
    """Three worker processes shared by the module's sharded runs.

    A forkserver that preloads the metric libraries forks the workers, so they do not each
    re-import nltk and scipy for ROUGE (seconds of CPU apiece), and unlike plain fork it is
    safe whatever threads this process has. The spawn pool that ``score_file`` starts on its
    own is tested in ``test_own_spawn_pool_and_default_metrics``.
    """
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        # Ignored if another test already started the forkserver: only slower then.
        context.set_forkserver_preload(["eval.metrics", "rouge_score.rouge_scorer"])
    else:
        context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=3, mp_context=context) as executor:
        yield executor


def test_wmt21_bleu_matches_official_table(tmp_path: Path, pool: concurrent.futures.Executor):
    official = _official_scores()
    systems = _wmt_systems()
    assert len(systems) == 12  # 6 systems per direction
    runs = []
    # The sharded runs go to the pool from a background thread while this process computes
    # the single-process scores, so the two halves of the test overlap on two cores.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as background:
        for pair, system in systems:
            tgt = pair.split("-")[1]
            hyps = _lines(
                WMT / "txt" / "system-outputs" / f"newstest2021.{pair}.hyp.{system}.{tgt}"
            )
            streams = {
                name: _lines(WMT / "txt" / "references" / f"newstest2021.{pair}.ref.{name}.{tgt}")
                for name in WMT_REFS[pair]
            }
            assert {len(s) for s in streams.values()} == {len(hyps)}
            assert len(hyps) == (1000 if pair == "de-en" else 1002)
            for label, names in (("A", ("A",)), ("all", WMT_REFS[pair])):
                refs = [list(r) for r in zip(*(streams[n] for n in names), strict=True)]
                path = _write_jsonl(tmp_path / f"{pair}.{system}.{label}.jsonl", hyps, refs)
                sharded = background.submit(score_file, path, ["bleu"], 3, None, pool)
                runs.append((pair, system, label, score_file(path, ["bleu"]), sharded))
    assert len(runs) == 24
    for pair, system, label, single, sharded in runs:
        expected = official[(pair, system, f"bleu-{label}")]
        assert single["bleu"] == pytest.approx(expected, abs=1e-4), (pair, system, label)
        # Integer statistics are summed, so the split changes nothing at all.
        assert sharded.result() == single, (pair, system, label)


def _summeval_pairs() -> tuple[list[str], list[str]]:
    data = json.loads((ASSETS / "summeval" / "summeval.json").read_text(encoding="utf-8"))
    preds, refs = [], []
    for doc in data.values():
        for system in sorted(doc["sys_summs"]):
            preds.append(doc["sys_summs"][system]["sys_summ"])
            refs.append(doc["ref_summ"])
    return preds, refs


def _rouge_score_means(preds: list[str], refs: list[str]) -> dict[str, float]:
    """The reference numbers, straight from rouge-score on exactly these strings."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_KEYS, 0.0)
    for pred, ref in zip(preds, refs, strict=True):
        for key, score in scorer.score(ref, pred).items():
            totals[key] += score.fmeasure
    return {key: 100.0 * total / len(preds) for key, total in totals.items()}


def test_summeval_rouge_matches_rouge_score(tmp_path: Path, pool: concurrent.futures.Executor):
    preds, refs = _summeval_pairs()
    assert len(preds) == 16 * 100
    assert not any("\n" in t for t in preds + refs)  # sentences separated by spaces only
    path = _write_jsonl(tmp_path / "summeval.jsonl", preds, [[r] for r in refs])

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as background:
        sharded = background.submit(score_file, path, ["rouge"], 3, None, pool)
        expected = _rouge_score_means(preds, refs)
        single = score_file(path, ["rouge"])

    assert set(single) == set(ROUGE_KEYS)
    for key in ROUGE_KEYS:
        assert single[key] == pytest.approx(expected[key], abs=1e-9), key
    # Per-example values are added in corpus order, so even the float sum is identical.
    assert sharded.result() == single
    # Without newlines rouge-score's rougeLsum sees one sentence: it equals rougeL.
    assert single["rougeLsum"] == pytest.approx(single["rougeL"], abs=1e-9)


def test_rouge_with_newlines_matches_rouge_score(tmp_path: Path):
    """Texts with one sentence per line (how summarization sets are often stored): rougeLsum
    uses those lines, exactly as rouge-score does, and differs from rougeL."""
    preds, refs = _summeval_pairs()
    preds = ["\n".join(split_sentences(p)) for p in preds[::4]]
    refs = ["\n".join(split_sentences(r)) for r in refs[::4]]
    assert sum("\n" in t for t in preds) > len(preds) // 2
    path = _write_jsonl(tmp_path / "lines.jsonl", preds, [[r] for r in refs])
    single = score_file(path, ["rouge"])
    expected = _rouge_score_means(preds, refs)
    for key in ROUGE_KEYS:
        assert single[key] == pytest.approx(expected[key], abs=1e-9), key
    assert abs(single["rougeLsum"] - single["rougeL"]) > 1.0


def test_rouge_split_sentences_is_opt_in(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """`--rouge-split-sentences` puts one sentence per line first: rougeLsum changes to
    rouge-score's on the split text, rouge1/2/L do not move."""
    preds, refs = _summeval_pairs()
    preds, refs = preds[1::8], refs[1::8]
    path = _write_jsonl(tmp_path / "split.jsonl", preds, [[r] for r in refs])
    assert main(["--predictions", path, "--metrics", "rouge", "--rouge-split-sentences"]) == 0
    split = json.loads(capsys.readouterr().out)
    assert main(["--predictions", path, "--metrics", "rouge"]) == 0
    plain = json.loads(capsys.readouterr().out)
    expected = _rouge_score_means(
        ["\n".join(split_sentences(p)) for p in preds],
        ["\n".join(split_sentences(r)) for r in refs],
    )
    assert split["rougeLsum"] == pytest.approx(expected["rougeLsum"], abs=1e-9)
    assert abs(split["rougeLsum"] - plain["rougeLsum"]) > 1.0
    for key in ("rouge1", "rouge2", "rougeL"):
        assert split[key] == plain[key]


def test_own_spawn_pool_and_default_metrics(tmp_path: Path):
    preds = ["The cat sat on the mat.", "A dog barked at night. It was loud.", "Hello world"]
    refs = [["The cat is on the mat."], ["The dog barked. It was loud!", "A dog barked."], ["Hi"]]
    path = _write_jsonl(tmp_path / "small.jsonl", preds, refs)
    single = score_file(path, None)
    assert list(single) == ["bleu", "chrf", *ROUGE_KEYS]
    # num_workers=3 without an executor: score_file starts (and stops) its own spawn pool.
    # BLEU and chrF only, so the fresh workers need not import nltk.
    sharded = score_file(path, ["bleu", "chrf"], num_workers=3)
    assert sharded == {"bleu": single["bleu"], "chrf": single["chrf"]}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        ('["a", "b"]', "expected a JSON object"),
        ('{"reference": "x"}', "'prediction' must be a string"),
        ('{"prediction": "x", "reference": []}', "'reference' must be a string"),
        ('{"prediction": "x", "reference": ["a", 3]}', "'reference' must be a string"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path: Path, line: str, message: str):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"prediction": "a", "reference": "a"})
    path.write_text(f"{good}\n\n{line}\n{good}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=message) as info:
        score_file(str(path), ["bleu"])
    assert f"{path}, line 3:" in str(info.value)


def test_reference_string_or_list_and_blank_lines(tmp_path: Path):
    path = tmp_path / "mixed.jsonl"
    path.write_text(
        '{"id": 1, "prediction": "p1", "reference": "r1"}\n'
        "\n"
        '{"id": 2, "prediction": "p2", "reference": ["r2a", "r2b"], "prompt": "q"}\n',
        encoding="utf-8",
    )
    assert read_predictions(str(path)) == (["p1", "p2"], [["r1"], ["r2a", "r2b"]])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no records"):
        read_predictions(str(empty))


def test_main_prints_one_json_object(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    path = _write_jsonl(
        tmp_path / "p.jsonl", ["Positive.", "negative", "positive"], [["positive"]] * 3
    )
    assert (
        main(["--predictions", path, "--metrics", "accuracy,bleu", "--bleu-tokenize", "intl"]) == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert list(result) == ["accuracy", "bleu"]
    assert result["accuracy"] == pytest.approx(200.0 / 3.0)

    assert main(["--predictions", path, "--metrics", "bleu,meteor"]) == 1
    assert "unknown metric 'meteor'" in capsys.readouterr().err
    assert main(["--predictions", str(tmp_path / "missing.jsonl")]) == 1
    assert "missing.jsonl" in capsys.readouterr().err

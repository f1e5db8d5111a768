"""Metrics against the reference libraries and hand-computed values; N shards == 1 shard."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import sacrebleu
from sacrebleu.metrics import CHRF

from eval import metrics as M
from eval.metrics import (
    METRIC_NAMES,
    MetricOptions,
    bootstrap_ci,
    compute_metrics,
    default_metrics,
    finalize,
    label_matches,
    merge_stats,
    metric_stats,
    normalize_answer,
    normalize_label,
    parse_entities,
    split_sentences,
)

ASSETS = Path(__file__).resolve().parents[1] / "assets"
WMT_TXT = ASSETS / "wmt21" / "txt"


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").rstrip("\n").split("\n")


def _sharded(name: str, preds: list[str], refs: list[list[str]], cuts: list[int], **options):
    """finalize(merge(stats of each [cuts[i], cuts[i+1]) shard)), computed in-process."""
    bounds = [0, *cuts, len(preds)]
    shards = [
        metric_stats(name, preds[a:b], refs[a:b], options or None)
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    return finalize(name, merge_stats(name, shards))


@pytest.fixture(scope="module")
def de_en() -> tuple[list[str], list[list[str]]]:
    hyps = _lines(WMT_TXT / "system-outputs" / "newstest2021.de-en.hyp.Facebook-AI.en")
    ref_a = _lines(WMT_TXT / "references" / "newstest2021.de-en.ref.A.en")
    ref_b = _lines(WMT_TXT / "references" / "newstest2021.de-en.ref.B.en")
    return hyps, [[a, b] for a, b in zip(ref_a, ref_b, strict=True)]


# ----------------------------------------------------------------------------- BLEU / chrF


def test_chrf_equals_sacrebleu_and_official_table(de_en):
    hyps, refs = de_en
    streams = [[r[0] for r in refs], [r[1] for r in refs]]
    ours = compute_metrics(["chrf"], hyps, refs)["chrf"]
    assert ours == sacrebleu.corpus_chrf(hyps, streams).score
    assert ours == pytest.approx(70.60836281375266, abs=1e-4)  # chrf-all, automatic-scores.tsv
    assert _sharded("chrf", hyps, refs, [1, 400, 401]) == {"chrf": ours}


def test_bleu_chrf_options_and_ragged_references(de_en):
    hyps, refs = de_en
    hyps, refs = hyps[:300], refs[:300]
    # Lines with one or two references: sacreBLEU takes None in a stream as "no reference".
    ragged = [r if i % 3 else r[:1] for i, r in enumerate(refs)]
    streams = [[r[0] for r in ragged], [r[1] if len(r) > 1 else None for r in ragged]]
    options = {"bleu_tokenize": "intl", "lowercase": True}
    ours = compute_metrics(["bleu", "chrf"], hyps, ragged, options)
    assert (
        ours["bleu"] == sacrebleu.corpus_bleu(hyps, streams, tokenize="intl", lowercase=True).score
    )
    assert ours["chrf"] == CHRF(lowercase=True).corpus_score(hyps, streams).score
    assert _sharded("bleu", hyps, ragged, [7, 150], **options) == {"bleu": ours["bleu"]}

    chrf_pp = compute_metrics(["chrf"], hyps, ragged, {"chrf_word_order": 2})["chrf"]
    assert chrf_pp == sacrebleu.corpus_chrf(hyps, streams, word_order=2).score
    plain = compute_metrics(["bleu"], hyps, ragged)["bleu"]
    assert plain == sacrebleu.corpus_bleu(hyps, streams).score


def test_merge_rejects_other_settings_and_empty_shards_are_neutral(de_en):
    hyps, refs = de_en
    a = metric_stats("bleu", hyps[:10], refs[:10])
    b = metric_stats("bleu", hyps[10:20], refs[10:20], {"bleu_tokenize": "char"})
    with pytest.raises(ValueError, match="cannot merge"):
        merge_stats("bleu", [a, b])
    empty = metric_stats("bleu", [], [])
    assert merge_stats("bleu", [empty, a, empty]).counts == a.counts
    assert finalize("bleu", empty) == {"bleu": 0.0}


# ----------------------------------------------------------------------------- ROUGE


def test_rouge_multi_reference_uses_score_multi():
    from rouge_score import rouge_scorer

    data = json.loads((ASSETS / "summeval" / "summeval.json").read_text(encoding="utf-8"))
    docs = list(data.values())[:4]
    preds = [doc["sys_summs"]["M11"]["sys_summ"] for doc in docs]
    refs = [doc["ref_summs"] for doc in docs]  # 11 references each
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    expected = dict.fromkeys(["rouge1", "rouge2", "rougeL"], 0.0)
    for pred, ref in zip(preds, refs, strict=True):
        for key, score in scorer.score_multi(ref, pred).items():
            expected[key] += score.fmeasure / len(preds) * 100.0
    ours = compute_metrics(["rouge"], preds, refs)
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, abs=1e-9)
    assert _sharded("rouge", preds, refs, [1, 3]) == ours


def test_split_sentences():
    assert split_sentences("One . Two ! Three? Four") == ["One .", "Two !", "Three?", "Four"]
    assert split_sentences('He said "stop." Then left.') == ['He said "stop."', "Then left."]
    # Existing lines are kept as they are (rouge-score's own convention), blank ones dropped.
    assert split_sentences("a. b\n\nc") == ["a. b", "c"]
    assert split_sentences("   ") == []


def test_rouge_default_scores_lsum_like_l_and_splitting_is_opt_in():
    preds = ["the cat sat on the mat. it was happy."]
    refs = [["a cat sat on a mat. the cat was happy."]]
    plain = compute_metrics(["rouge"], preds, refs)
    assert MetricOptions().rouge_split_sentences is False
    assert plain["rougeLsum"] == plain["rougeL"]  # no newline: one "sentence", as rouge-score
    split = compute_metrics(["rouge"], preds, refs, {"rouge_split_sentences": True})
    assert split["rouge1"] == plain["rouge1"] and split["rougeL"] == plain["rougeL"]
    assert split["rougeLsum"] != plain["rougeLsum"]


# ----------------------------------------------------------------------------- accuracy


def test_normalize_label():
    assert normalize_label("Positive.") == "positive"
    assert normalize_label("  POSITIVE!\nBecause the film...") == "positive"
    assert normalize_label("\n\n Very  negative ") == "very negative"
    assert normalize_label("") == ""
    assert label_matches("Positive. The review praises the acting.", "positive")
    assert not label_matches("positively negative", "positive")
    assert not label_matches("not positive", "positive")


def test_accuracy_hand_checked_and_merge():
    preds = ["Positive.", "negative", "NEGATIVE!", "neutral", "positive, clearly", "4 stars"]
    refs = [["positive"], ["positive"], ["negative"], ["negative"], ["positive"], ["3", "4"]]
    # right: 0, 2, 4, 5 ("4 stars" starts with the second reference "4") -> 4 / 6
    assert compute_metrics(["accuracy"], preds, refs) == {"accuracy": pytest.approx(400 / 6)}
    assert _sharded("accuracy", preds, refs, [1, 2, 5]) == compute_metrics(
        ["accuracy"], preds, refs
    )


# ----------------------------------------------------------------------------- SQuAD


def test_squad_normalize_answer():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize_answer("an apple, a pear and THE plum") == "apple pear and plum"


def test_squad_exact_match_and_f1_hand_checked_and_merge():
    preds = ["the Eiffel Tower!", "in Paris, France", "Denver Broncos", "none", "Broncos Denver"]
    refs = [
        ["Eiffel Tower"],
        ["Paris"],
        ["Broncos", "Denver Broncos"],
        ["Carolina Panthers"],
        ["Denver Broncos"],
    ]
    # EM: 1, 0, 1, 0, 0 -> 40.
    # F1: 1; P=1/3 R=1 -> 0.5; max(2/3, 1) = 1; 0; same bag of tokens -> 1.  Mean = 3.5 / 5.
    result = compute_metrics(["exact_match", "f1"], preds, refs)
    assert result == {"exact_match": 40.0, "f1": pytest.approx(70.0, abs=1e-12)}
    for cuts in ([1], [2, 3, 4]):
        assert _sharded("f1", preds, refs, cuts) == {"f1": result["f1"]}
        assert _sharded("exact_match", preds, refs, cuts) == {"exact_match": 40.0}


# ----------------------------------------------------------------------------- NER


def test_parse_entities_is_tolerant():
    assert parse_entities("EU: ORG; German: MISC ;British:misc.") == [
        ("EU", "ORG"),
        ("German", "MISC"),
        ("British", "MISC"),
    ]
    assert parse_entities("None") == parse_entities("") == parse_entities("  no entities.") == []
    assert parse_entities("Time: 10:30 : MISC\nPeter  Blackburn: PER") == [
        ("Time: 10:30", "MISC"),
        ("Peter Blackburn", "PER"),
    ]
    assert parse_entities("Germany") == [("Germany", "")]  # no type: a false positive


def test_entity_f1_hand_checked_and_merge():
    preds = [
        "EU: ORG; German: MISC; British: LOC",
        "none",
        "BRUSSELS: LOC",
        "Germany: LOC; Germany: LOC",
    ]
    refs = [
        ["EU: ORG; German: MISC; British: MISC"],
        ["Peter Blackburn: PER"],
        ["BRUSSELS: LOC"],
        ["Germany: LOC"],
    ]
    # tp = 2 + 0 + 1 + 1 (multiset: the duplicate counts once) = 4; predicted 3+0+1+2 = 6;
    # gold 3+1+1+1 = 6 -> P = R = F1 = 4/6.
    result = compute_metrics(["entity_f1"], preds, refs)
    assert result == {
        "entity_f1": pytest.approx(400 / 6),
        "entity_precision": pytest.approx(400 / 6),
        "entity_recall": pytest.approx(400 / 6),
    }
    assert _sharded("entity_f1", preds, refs, [1, 3]) == result
    assert compute_metrics(["entity_f1"], ["none"], ["None"])["entity_f1"] == 100.0


# ----------------------------------------------------------------------------- API


def test_options_and_names_are_validated():
    with pytest.raises(ValueError, match="unknown metric option 'bleu_tokenizer'"):
        MetricOptions.from_dict({"bleu_tokenizer": "13a"})
    with pytest.raises(ValueError, match="must be bool"):
        MetricOptions.from_dict({"lowercase": 1})
    with pytest.raises(ValueError, match="unknown bleu_tokenize"):
        MetricOptions.from_dict({"bleu_tokenize": "13b"})
    with pytest.raises(ValueError, match="unknown metric 'meteor'"):
        compute_metrics(["meteor"], ["a"], [["a"]])
    with pytest.raises(ValueError, match="2 predictions but 1"):
        compute_metrics(["bleu"], ["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="example 0"):
        compute_metrics(["bleu"], ["a"], [[]])


def test_default_metrics():
    assert default_metrics("sst2") == default_metrics("amazon_reviews") == ["accuracy"]
    assert default_metrics("wmt") == ["bleu", "chrf"]
    assert default_metrics("squad") == ["exact_match", "f1"]
    assert default_metrics("conll2003") == ["entity_f1"]
    for template in ("cnn_dailymail", "alpaca", "chat", "custom"):
        assert default_metrics(template) == ["rouge"]
    templates = ("sst2", "cnn_dailymail", "wmt", "squad", "conll2003")
    assert {m for t in templates for m in default_metrics(t)} == set(METRIC_NAMES)
    with pytest.raises(ValueError, match="no default metrics"):
        default_metrics("nope")


def test_bootstrap_ci_is_seeded_and_brackets_the_score(de_en):
    hyps, refs = de_en
    hyps, refs = hyps[:200], refs[:200]
    score = compute_metrics(["bleu"], hyps, refs)["bleu"]
    low, high = bootstrap_ci("bleu", hyps, refs, n=200, seed=1)
    assert low < score < high
    assert (low, high) == bootstrap_ci("bleu", hyps, refs, n=200, seed=1)
    f1_low, f1_high = bootstrap_ci("f1", ["a b", "c", "d e f"], ["a b", "x", "d"], n=50)
    assert 0.0 <= f1_low <= f1_high <= 100.0


@pytest.mark.parametrize(
    ("name", "key"), [("bleu", "bleu"), ("accuracy", "accuracy"), ("rouge", "rougeL")]
)
def test_bootstrap_ci_equals_rescoring_each_resample(name: str, key: str) -> None:
    preds = ["the cat sat", "a dog", "positive", "the mat", "negative", "hello there"]
    refs = [["the cat sat down"], ["one dog"], ["positive"], ["on the mat"], ["positive"], ["hi"]]
    rng = np.random.default_rng(4)  # the documented resampling: n draws of len(examples)
    scores = []
    for _ in range(30):
        idx = rng.integers(0, len(preds), size=len(preds))
        scores.append(compute_metrics([name], [preds[i] for i in idx], [refs[i] for i in idx])[key])
    expected = np.quantile(scores, [0.05, 0.95])
    low, high = bootstrap_ci(name, preds, refs, n=30, seed=4, key=key, confidence=0.9)
    assert low == pytest.approx(expected[0], abs=1e-9)
    assert high == pytest.approx(expected[1], abs=1e-9)


# ----------------------------------------------------------------------------- streaming merge


@pytest.mark.parametrize("name", ["rouge", "f1", "bleu", "accuracy"])
def test_folded_stream_of_chunks_equals_one_pass(name: str, de_en) -> None:
    """fold_stats(merge_stats([acc, chunk])) chunk after chunk gives the single-pass float
    exactly (mean metrics add left to right in corpus order), in O(1) state."""
    hyps, refs = de_en
    hyps, refs = hyps[:60], refs[:60]
    whole = compute_metrics([name], hyps, refs)
    acc = None
    for a in range(0, len(hyps), 7):
        table = M.example_stats(name, hyps[a : a + 7], refs[a : a + 7])
        chunk = M.stats_of_table(name, table)
        assert chunk == metric_stats(name, hyps[a : a + 7], refs[a : a + 7])
        acc = M.fold_stats(chunk if acc is None else merge_stats(name, [acc, chunk]))
        assert acc.values == ()  # nothing kept per example
    assert acc is not None
    assert finalize(name, acc) == whole
    if name in ("rouge", "f1"):  # folded totals stand for what came before: only first
        with pytest.raises(ValueError, match="first shard"):
            merge_stats(name, [metric_stats(name, hyps[:2], refs[:2]), acc])


# ----------------------------------------------------------------------------- bootstrap


def test_resample_chunks_are_the_rows_of_one_table() -> None:
    """Chunking never changes the draws: the same resamples as one (n, N) table."""
    whole = np.random.default_rng(5).integers(0, 37, size=(23, 37))
    for max_elements in (37, 100, 37 * 23, 10**6):
        got = np.concatenate(list(M.resample_chunks(37, 23, 5, max_elements)))
        assert np.array_equal(got, whole)


@pytest.mark.parametrize("name", ["bleu", "chrf", "rouge", "accuracy"])
def test_chunked_bootstrap_equals_gathering_the_index_table(name: str, de_en) -> None:
    """The weighted chunks give what the old (n x N) gather gave: count metrics exactly, mean
    metrics to float rounding."""
    hyps, refs = de_en
    hyps, refs = hyps[:40], refs[:40]
    table = M.example_stats(name, hyps, refs)
    indices = M.bootstrap_indices(len(hyps), 25, seed=2)
    keys = list(compute_metrics([name], hyps, refs))
    expected = {k: np.empty(25) for k in keys}
    for r, row in enumerate(indices):
        stats = M.stats_of_table(name, table[row])
        for k, v in finalize(name, stats).items():
            expected[k][r] = v
    got = M.bootstrap_table(name, table, 25, seed=2, max_elements=40 * 3)
    for k in keys:
        if name in ("bleu", "chrf", "accuracy"):
            assert np.array_equal(got[k], expected[k]), k
        else:
            np.testing.assert_allclose(got[k], expected[k], rtol=0, atol=1e-12)


def _synthetic_bleu_table(rows: int, seed: int) -> np.ndarray:
    """Valid sacreBLEU BLEU segment statistics: [hyp_len, ref_len, correct_1..4, total_1..4]."""
    rng = np.random.default_rng(seed)
    hyp = rng.integers(5, 40, size=rows)
    totals = np.stack([np.maximum(hyp - k, 0) for k in range(4)], axis=1)
    correct = (totals * rng.uniform(0.1, 0.7, size=(rows, 1))).astype(np.int64)
    ref = hyp + rng.integers(-3, 4, size=rows)
    return np.concatenate([hyp[:, None], ref[:, None], correct, totals], axis=1).astype(np.int64)


def test_bootstrap_memory_is_bounded_by_the_chunk_not_n_times_examples() -> None:
    """200 resamples of 200k examples: the old (n x N) index table alone was 320 MB."""
    import tracemalloc

    table = _synthetic_bleu_table(200_000, seed=0)
    assert M.stats_of_table("bleu", table).counts  # a valid table for finalize
    tracemalloc.start()
    try:
        samples = M.bootstrap_table("bleu", table, n=200, seed=1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert samples["bleu"].shape == (200,) and np.isfinite(samples["bleu"]).all()
    assert samples["bleu"].std() > 0
    assert peak < 200 * 200_000 * 8 / 2, f"peak {peak / 2**20:.0f} MiB"


@pytest.mark.slow
def test_bootstrap_of_bleu_at_1m_examples_and_1000_resamples_peaks_under_1gb() -> None:
    """The acceptance size: the old (n x N) index table would be 8 GB, its gather 80 GB."""
    import tracemalloc

    table = _synthetic_bleu_table(1_000_000, seed=0)
    tracemalloc.start()
    try:
        samples = M.bootstrap_table("bleu", table, n=1000, seed=1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    score = finalize("bleu", M.stats_of_table("bleu", table))["bleu"]
    low, high = M.percentile_interval(samples["bleu"])
    assert low < score < high
    assert peak < 2**30, f"peak {peak / 2**20:.0f} MiB"
    print(f"bootstrap 1M x 1000: peak {peak / 2**20:.0f} MiB")

"""Exact, mergeable evaluation metrics.

Every metric runs in three steps, so that the examples can be split over N workers without
changing a single digit of the result:

1. ``metric_stats(name, predictions, references)`` turns one shard of examples into
   sufficient statistics (a picklable ``MetricStats``);
2. ``merge_stats(name, [shard_0, shard_1, ...])`` combines the shards, given in corpus order;
3. ``finalize(name, stats)`` turns the merged statistics into the reported numbers.

Scores are never averaged per shard. Corpus metrics (BLEU, chrF) sum sacreBLEU's own
per-segment statistics (integers, so the sum is exact) and run sacreBLEU's own score function
once on the sum. Mean metrics (ROUGE, SQuAD F1) keep one value per example and add them up in
corpus order at finalize, so the float result is bit-identical to a single pass.

| name        | statistics                          | reported keys (0-100)                      |
|-------------|-------------------------------------|--------------------------------------------|
| bleu        | summed sacreBLEU BLEU segment stats | bleu                                       |
| chrf        | summed sacreBLEU chrF segment stats | chrf                                       |
| rouge       | per-example F-measures              | rouge1, rouge2, rougeL, rougeLsum          |
| accuracy    | (correct, total)                    | accuracy                                   |
| exact_match | (matches, total)                    | exact_match                                |
| f1          | per-example SQuAD token F1          | f1                                         |
| entity_f1   | (true positives, predicted, gold)   | entity_f1, entity_precision, entity_recall |

References: ``references[i]`` is the list of one or more references of example ``i``; lines
may have different numbers of references.

- BLEU / chrF: sacreBLEU corpus scores with sacreBLEU's defaults (BLEU: 13a tokenizer, exp
  smoothing, 4-grams; chrF: character order 6, word order 0, beta 2). References are passed
  as sacreBLEU reference streams; a line with fewer references is padded with ``None``, which
  sacreBLEU skips for that line (its documented way to give a variable number of references).
- ROUGE: ``rouge_score.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"],
  use_stemmer=True)``; with several references ``score_multi`` (per key, the reference with
  the highest F-measure). The mean F-measure is reported, exactly rouge-score's numbers on the
  same strings. rougeLsum treats each line as a sentence; ``rouge_split_sentences`` (off by
  default) first puts one sentence per line, see ``split_sentences``.
- accuracy: a prediction is right if it matches any reference after ``normalize_label``.
- exact_match / f1: the official SQuAD v1.1 ``evaluate-v1.1.py`` definitions (max over
  references).
- entity_f1: micro-F1 over (entity text, type) multisets, first reference only; see
  ``parse_entities`` for the format.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import multiprocessing
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from sacrebleu.metrics import BLEU, CHRF

METRIC_NAMES: tuple[str, ...] = (
    "bleu",
    "chrf",
    "rouge",
    "accuracy",
    "exact_match",
    "f1",
    "entity_f1",
)
ROUGE_KEYS: tuple[str, ...] = ("rouge1", "rouge2", "rougeL", "rougeLsum")

# Metrics whose statistics are integer counts summed over examples; the others keep one float
# (or one tuple of floats) per example.
_COUNT_METRICS = frozenset({"bleu", "chrf", "accuracy", "exact_match", "entity_f1"})

_TEMPLATE_METRICS: dict[str, tuple[str, ...]] = {
    "sst2": ("accuracy",),
    "amazon_reviews": ("accuracy",),
    "cnn_dailymail": ("rouge",),
    "wmt": ("bleu", "chrf"),
    "squad": ("exact_match", "f1"),
    "conll2003": ("entity_f1",),
    "alpaca": ("rouge",),
    "chat": ("rouge",),
    "custom": ("rouge",),
}


@dataclasses.dataclass(frozen=True)
class MetricOptions:
    """Metric settings; every default is the reference library's default."""

    bleu_tokenize: str = "13a"
    """sacreBLEU tokenizer for BLEU: 13a, intl, zh, char, none, ... (``BLEU.TOKENIZERS``)."""
    lowercase: bool = False
    """Lowercase hypotheses and references before BLEU and chrF."""
    chrf_char_order: int = 6
    """chrF character n-gram order."""
    chrf_word_order: int = 0
    """chrF word n-gram order (2 gives chrF++)."""
    chrf_beta: int = 2
    """chrF recall weight."""
    rouge_use_stemmer: bool = True
    """Porter-stem tokens longer than 3 characters before ROUGE (rouge-score's option)."""
    rouge_split_sentences: bool = False
    """Put one sentence per line (``split_sentences``, a punctuation heuristic) before
    rougeLsum. Off (the default), texts are scored as given, exactly as rouge-score does:
    rougeLsum then splits at existing newlines only and equals rougeL on text without one."""

    @classmethod
    def from_dict(cls, options: Mapping[str, Any] | MetricOptions | None) -> MetricOptions:
        """Builds options from a plain dict, rejecting unknown keys and wrong types.

        Args:
            options: Option values by field name; ``None`` means all defaults.

        Returns:
            The validated options.

        Raises:
            ValueError: On an unknown key, a value of the wrong type or an unknown tokenizer.
        """
        if options is None:
            return cls()
        if isinstance(options, MetricOptions):
            return options
        fields = {f.name: f for f in dataclasses.fields(cls)}
        problems = [
            f"unknown metric option {key!r} (known: {', '.join(fields)})"
            for key in options
            if key not in fields
        ]
        for key, value in options.items():
            if key not in fields:
                continue
            expected = type(getattr(cls(), key))
            # bool is an int subclass: an int option must not silently accept True.
            if type(value) is not expected:
                problems.append(f"metric option {key!r} must be {expected.__name__}, got {value!r}")
        if problems:
            raise ValueError("; ".join(problems))
        result = cls(**options)
        # Imported here: `ift score --help` and the config check need no sacreBLEU.
        from sacrebleu.metrics import BLEU

        if result.bleu_tokenize not in BLEU.TOKENIZERS:
            raise ValueError(
                f"unknown bleu_tokenize {result.bleu_tokenize!r} "
                f"(known: {', '.join(sorted(BLEU.TOKENIZERS))})"
            )
        return result


@dataclasses.dataclass(frozen=True)
class MetricStats:
    """Sufficient statistics of one metric over a run of consecutive examples.

    Attributes:
        name: The metric name.
        params: Settings the score depends on; shards merge only if these agree.
        num_examples: Number of examples covered.
        counts: Integer statistics summed over the examples (count metrics).
        values: One tuple of floats per example, in corpus order (mean metrics).
        sums: Mean metrics folded by ``fold_stats``: the left-to-right totals of the values of
            the examples before ``values``, so a stream of shards keeps O(1) state and still
            gives the float a single pass gives.
    """

    name: str
    params: tuple[tuple[str, Any], ...]
    num_examples: int
    counts: tuple[int, ...] = ()
    values: tuple[tuple[float, ...], ...] = ()
    sums: tuple[float, ...] = ()


# --------------------------------------------------------------------------- public API


def metric_stats(
    name: str,
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    options: Mapping[str, Any] | MetricOptions | None = None,
) -> MetricStats:
    """Computes the sufficient statistics of one metric over a shard of examples.

    Args:
        name: One of ``METRIC_NAMES``.
        predictions: One prediction per example.
        references: One list of references per example (a bare string is one reference).
        options: ``MetricOptions`` fields as a dict; ``None`` for the defaults.

    Returns:
        Picklable statistics; merge shards with ``merge_stats``, score with ``finalize``.

    Raises:
        ValueError: On an unknown metric, mismatched lengths or an example without reference.
    """
    _check_name(name)
    opts = MetricOptions.from_dict(options)
    refs = _check_inputs(predictions, references)
    params, segments = _segment_stats(name, list(predictions), refs, opts)
    return _stats_from_segments(name, params, segments)


def merge_stats(name: str, stats: Sequence[MetricStats]) -> MetricStats:
    """Merges the statistics of consecutive shards.

    Args:
        name: The metric name.
        stats: Shard statistics in corpus order (the order matters for mean metrics, whose
            per-example values are concatenated).

    Returns:
        Statistics equal to those of a single pass over all the shards' examples.

    Raises:
        ValueError: If the list is empty or the shards disagree on metric or settings.
    """
    _check_name(name)
    if not stats:
        raise ValueError(f"merge_stats({name!r}): no statistics to merge")
    first = stats[0]
    for shard in stats:
        if shard.name != name or shard.params != first.params:
            raise ValueError(
                f"merge_stats({name!r}): cannot merge {shard.name!r} statistics with "
                f"settings {dict(shard.params)} into {first.name!r} with {dict(first.params)}"
            )
    if any(shard.sums for shard in stats[1:]):
        # Folded totals stand for the examples before `values`: only the first shard has any.
        raise ValueError(f"merge_stats({name!r}): only the first shard may be folded")
    non_empty = [s.counts for s in stats if s.counts]
    counts = tuple(sum(column) for column in zip(*non_empty, strict=True)) if non_empty else ()
    values = tuple(v for shard in stats for v in shard.values)
    return MetricStats(
        name=name,
        params=first.params,
        num_examples=sum(s.num_examples for s in stats),
        counts=counts,
        values=values,
        sums=first.sums,
    )


def fold_stats(stats: MetricStats) -> MetricStats:
    """Folds a mean metric's per-example values into running totals (count metrics: as is).

    ``fold_stats(merge_stats(name, [acc, shard]))`` over a stream of shards keeps constant
    memory, and ``finalize`` gives exactly the float a single pass gives: the totals are
    added left to right in corpus order, as ``finalize`` adds the values.
    """
    if not stats.values:
        return stats
    width = len(stats.values[0])
    totals = list(stats.sums) if stats.sums else [0.0] * width
    for v in stats.values:
        for i in range(width):
            totals[i] += v[i]
    return dataclasses.replace(stats, values=(), sums=tuple(totals))


def finalize(name: str, stats: MetricStats) -> dict[str, float]:
    """Turns (merged) statistics into the reported scores, all on a 0-100 scale.

    Args:
        name: The metric name.
        stats: Statistics from ``metric_stats`` or ``merge_stats``.

    Returns:
        The scores by key, e.g. ``{"bleu": 23.1}`` or the four ROUGE keys. An empty corpus
        scores 0, except entity_f1 with no predicted and no gold entity, which scores 100.
    """
    _check_name(name)
    if stats.name != name:
        raise ValueError(f"finalize({name!r}) got statistics of {stats.name!r}")
    params = dict(stats.params)
    n = stats.num_examples
    if name == "bleu":
        if not stats.counts:
            return {"bleu": 0.0}
        bleu = _make_bleu(params)
        return {"bleu": float(bleu._compute_score_from_stats(list(stats.counts)).score)}
    if name == "chrf":
        if not stats.counts:
            return {"chrf": 0.0}
        chrf = _make_chrf(params)
        return {"chrf": float(chrf._compute_score_from_stats(list(stats.counts)).score)}
    if name == "rouge":
        return {key: _mean_percent(stats, i, n) for i, key in enumerate(ROUGE_KEYS)}
    if name == "f1":
        return {"f1": _mean_percent(stats, 0, n)}
    if name in ("accuracy", "exact_match"):
        correct, total = stats.counts or (0, 0)
        return {name: 100.0 * correct / total if total else 0.0}
    # entity_f1
    tp, n_pred, n_gold = stats.counts or (0, 0, 0)
    precision = 100.0 * tp / n_pred if n_pred else 0.0
    recall = 100.0 * tp / n_gold if n_gold else 0.0
    # 2PR/(P+R) == 2tp/(pred+gold); the count form avoids rounding P and R first.
    f1 = 200.0 * tp / (n_pred + n_gold) if n_pred + n_gold else 100.0
    return {"entity_f1": f1, "entity_precision": precision, "entity_recall": recall}


def compute_metrics(
    names: Sequence[str],
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    options: Mapping[str, Any] | MetricOptions | None = None,
    num_workers: int = 1,
    executor: concurrent.futures.Executor | None = None,
) -> dict[str, float]:
    """Computes several metrics, optionally over contiguous shards in worker processes.

    The result does not depend on ``num_workers``: shard statistics are merged, never
    shard scores averaged.

    Args:
        names: Metric names from ``METRIC_NAMES`` (duplicates are ignored).
        predictions: One prediction per example.
        references: One list of references per example (a bare string is one reference).
        options: ``MetricOptions`` fields as a dict; ``None`` for the defaults.
        num_workers: Number of contiguous shards; above 1 they run in a spawn-context process
            pool (at most one shard per example).
        executor: An existing pool to run the shards in (reused across calls, e.g. by an eval
            loop or tests); it is not shut down here.

    Returns:
        All reported keys of all requested metrics.

    Raises:
        ValueError: On an unknown metric or option, mismatched lengths, no examples, or an
            example without reference.
    """
    metric_names = list(dict.fromkeys(names))
    if not metric_names:
        raise ValueError("no metrics requested")
    for name in metric_names:
        _check_name(name)
    opts = MetricOptions.from_dict(options)
    refs = _check_inputs(predictions, references)
    preds = list(predictions)
    if not preds:
        raise ValueError("no examples to score")
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")

    bounds = _shard_bounds(len(preds), num_workers)
    if len(bounds) == 1 and executor is None:
        per_shard = [_shard_stats(metric_names, preds, refs, opts)]
    else:
        pool = executor or concurrent.futures.ProcessPoolExecutor(
            max_workers=len(bounds), mp_context=multiprocessing.get_context("spawn")
        )
        try:
            futures = [
                pool.submit(_shard_stats, metric_names, preds[a:b], refs[a:b], opts)
                for a, b in bounds
            ]
            per_shard = [f.result() for f in futures]  # corpus order, not completion order
        finally:
            if executor is None:
                pool.shutdown()

    result: dict[str, float] = {}
    for name in metric_names:
        merged = merge_stats(name, [shard[name] for shard in per_shard])
        result.update(finalize(name, merged))
    return result


def default_metrics(template: str) -> list[str]:
    """Returns the metrics reported by default for a built-in prompt template.

    Args:
        template: A built-in template name (sst2, amazon_reviews, cnn_dailymail, wmt, squad,
            conll2003, alpaca, chat, custom).

    Returns:
        Metric names, e.g. ``["bleu", "chrf"]`` for ``wmt``.

    Raises:
        ValueError: For an unknown template name.
    """
    try:
        return list(_TEMPLATE_METRICS[template])
    except KeyError:
        raise ValueError(
            f"no default metrics for template {template!r} (known: {', '.join(_TEMPLATE_METRICS)})"
        ) from None


def normalize_label(text: str) -> str:
    """Normalizes a classification label or a generated answer for ``accuracy``.

    Keeps the first non-empty line, lowercases it, deletes Unicode punctuation and collapses
    whitespace, so ``"Positive."``, ``" positive\\n"`` and ``"POSITIVE!"`` all become
    ``"positive"``. ``accuracy`` also accepts a prediction that continues after the label
    (``"positive because ..."`` matches ``"positive"``), see ``label_matches``.

    Args:
        text: A label or a model output.

    Returns:
        The normalized label ("" for blank text).
    """
    first = next((line for line in text.splitlines() if line.strip()), "")
    kept = "".join(ch for ch in first.lower() if not unicodedata.category(ch).startswith("P"))
    return " ".join(kept.split())


def label_matches(prediction: str, reference: str) -> bool:
    """Whether a prediction gives the reference label (the ``accuracy`` criterion).

    True if the normalized prediction equals the normalized reference, or starts with it
    followed by a space: generative models often continue after the label
    ("Positive. The review praises ..."). An empty reference only matches an empty prediction.

    Args:
        prediction: A model output.
        reference: The gold label.

    Returns:
        True for a correct prediction.
    """
    pred, ref = normalize_label(prediction), normalize_label(reference)
    return pred == ref or (bool(ref) and pred.startswith(ref + " "))


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 answer normalization (lowercase, no punctuation, articles or extra spaces).

    Same steps, in the same order, as ``normalize_answer`` in the official
    ``evaluate-v1.1.py``.
    """
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _SQUAD_PUNCT)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def squad_exact_match(prediction: str, ground_truth: str) -> bool:
    """SQuAD v1.1 exact match of one prediction against one answer."""
    return normalize_answer(prediction) == normalize_answer(ground_truth)


def squad_f1(prediction: str, ground_truth: str) -> float:
    """SQuAD v1.1 token F1 (0-1) of one prediction against one answer."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(ground_truth).split()
    common = Counter(pred_tokens) & Counter(gold_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = 1.0 * num_same / len(pred_tokens)
    recall = 1.0 * num_same / len(gold_tokens)
    return (2 * precision * recall) / (precision + recall)


def parse_entities(text: str) -> list[tuple[str, str]]:
    """Parses a NER answer such as ``"EU: ORG; German: MISC; Peter Blackburn: PER"``.

    Format: entities separated by ``;`` (or newlines), each ``<entity text>: <TYPE>``; the
    type is what follows the last colon, so the entity text may contain colons. Parsing is
    tolerant: surrounding whitespace is dropped, inner whitespace collapsed, the type is
    uppercased and stripped of trailing ``.``/``,``. A blank answer or one of ``none``,
    ``no entities``, ``n/a``, ``-`` (any case, as the whole answer or as an item) means no
    entity. An item without a colon is kept with an empty type, so a malformed predicted
    entity counts as a false positive rather than vanishing.

    Args:
        text: A prediction or a reference.

    Returns:
        (entity text, TYPE) pairs in order, duplicates kept (F1 is over multisets).
    """
    entities = []
    for item in re.split(r"[;\n]", text):
        item = " ".join(item.split())
        if item.lower().rstrip(".") in _NO_ENTITY:
            continue
        entity, sep, etype = item.rpartition(":")
        if not sep:
            entity, etype = item, ""
        entity = entity.strip()
        etype = etype.strip().rstrip(".,").strip().upper()
        if entity:
            entities.append((entity, etype))
    return entities


def split_sentences(text: str) -> list[str]:
    """Splits a summary into sentences for rougeLsum (which scores one sentence per line).

    Text that already contains newlines is taken as one sentence per line, as rouge-score
    itself does. Otherwise (nltk's sentence tokenizer needs data files we do not ship) the
    text is split after ``.``, ``!`` or ``?`` (optionally followed by a closing quote or
    bracket) and whitespace. This also splits after abbreviations such as "U.S. troops";
    that only changes rougeLsum, never rouge1/2/L.

    Args:
        text: A summary.

    Returns:
        The non-empty sentences, stripped.
    """
    parts = text.split("\n") if "\n" in text else _SENTENCE_END.split(text)
    return [p.strip() for p in parts if p.strip()]


def bootstrap_ci(
    name: str,
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    n: int = 1000,
    seed: int = 0,
    options: Mapping[str, Any] | MetricOptions | None = None,
    key: str | None = None,
    confidence: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of a metric.

    Draws ``n`` resamples of the examples with replacement (``resample_chunks``), recomputes
    the corpus score from the resampled per-example statistics (BLEU/chrF stay corpus-level,
    as in sacreBLEU's own bootstrap) and returns the ``(1 - confidence) / 2`` and
    ``(1 + confidence) / 2`` percentiles.

    Args:
        name: The metric name.
        predictions: One prediction per example.
        references: One list of references per example.
        n: Number of bootstrap resamples.
        seed: Seed of the resampling.
        options: ``MetricOptions`` fields as a dict.
        key: Which reported key (default: the metric's first key, e.g. ``rouge1``).
        confidence: Coverage of the interval.

    Returns:
        (low, high) on the 0-100 scale.
    """
    table = example_stats(name, predictions, references, options)
    samples = bootstrap_table(name, table, n, seed, options)
    return percentile_interval(samples[key or next(iter(samples))], confidence)


def example_stats(
    name: str,
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    options: Mapping[str, Any] | MetricOptions | None = None,
) -> np.ndarray:
    """Per-example statistics of one metric as a numeric table, the input of a bootstrap.

    Count metrics give int64 rows (sacreBLEU's segment statistics, (correct, total), ...),
    mean metrics float64 rows (ROUGE's four F-measures, F1). Tables of consecutive chunks
    concatenate (``np.concatenate``) into the table of the whole corpus, so a caller can
    build it from a stream without holding the texts.

    Args:
        name: The metric name.
        predictions: One prediction per example.
        references: One list of references per example.
        options: ``MetricOptions`` fields as a dict.

    Returns:
        An array of shape (examples, statistics per example); (0, 0) for no example.
    """
    _check_name(name)
    opts = MetricOptions.from_dict(options)
    refs = _check_inputs(predictions, references)
    _, segments = _segment_stats(name, list(predictions), refs, opts)
    dtype = np.int64 if name in _COUNT_METRICS else np.float64
    return np.asarray(segments, dtype=dtype).reshape(len(segments), -1 if segments else 0)


def stats_of_table(
    name: str, table: np.ndarray, options: Mapping[str, Any] | MetricOptions | None = None
) -> MetricStats:
    """The ``metric_stats`` of the examples an ``example_stats`` table holds.

    Args:
        name: The metric name.
        table: ``example_stats(name, ...)`` of some examples.
        options: The ``MetricOptions`` the table was made with.

    Returns:
        Statistics equal to ``metric_stats`` on the same examples.
    """
    _check_name(name)
    params = _metric_params(name, MetricOptions.from_dict(options))
    if name in _COUNT_METRICS:
        counts = tuple(int(c) for c in table.sum(axis=0)) if len(table) else ()
        return MetricStats(name, params, len(table), counts=counts)
    return MetricStats(name, params, len(table), values=tuple(map(tuple, table.tolist())))


def bootstrap_indices(num_examples: int, n: int, seed: int) -> np.ndarray:
    """All resample indices at once: ``n`` rows of ``num_examples`` draws.

    The same rows ``resample_chunks`` yields chunk by chunk; for small test sets and tests
    only (``n * num_examples`` int64s), the bootstrap itself never builds this table.

    Args:
        num_examples: Size of the test set (> 0).
        n: Number of resamples.
        seed: Seed of numpy's ``default_rng``.

    Returns:
        An int64 array of shape ``(n, num_examples)``.
    """
    return np.concatenate(list(resample_chunks(num_examples, n, seed)))


def resample_chunks(
    num_examples: int, n: int, seed: int, max_elements: int = 1 << 22
) -> Iterator[np.ndarray]:
    """Resample indices in chunks of whole resamples, at most ``max_elements`` draws each.

    The draws depend only on (num_examples, n, seed), never on the chunk size: numpy's
    generator fills arrays row by row from one stream. So two systems scored on the same
    test set with the same seed see the same resamples, and their per-resample differences
    form a paired bootstrap of the delta.

    Args:
        num_examples: Size of the test set (> 0).
        n: Number of resamples.
        seed: Seed of numpy's ``default_rng``.
        max_elements: Most indices drawn at once (memory: 8 bytes each, a few times over).

    Yields:
        int64 arrays of shape ``(rows, num_examples)``, ``n`` rows in all.
    """
    if num_examples <= 0:
        raise ValueError("no examples to bootstrap")
    rng = np.random.default_rng(seed)
    rows = max(1, min(n, max_elements // num_examples))
    for start in range(0, n, rows):
        yield rng.integers(0, num_examples, size=(min(rows, n - start), num_examples))


def bootstrap_table(
    name: str,
    table: np.ndarray,
    n: int,
    seed: int,
    options: Mapping[str, Any] | MetricOptions | None = None,
    max_elements: int = 1 << 22,
) -> dict[str, np.ndarray]:
    """Every reported key of a metric on ``n`` bootstrap resamples of ``example_stats``.

    Memory is bounded by ``max_elements`` whatever ``n``: resamples are drawn in chunks
    (``resample_chunks``), each turned into how often it drew each example (a count per
    example), and the resampled statistics are that count matrix times the table. Count
    metrics stay exact (float64 sums of integers below 2**53) and go through ``finalize``
    (BLEU/chrF stay corpus scores, as in sacreBLEU's own bootstrap); mean metrics are the
    weighted mean, equal to averaging the drawn rows up to float rounding (~1e-15).

    Args:
        name: The metric name.
        table: ``example_stats`` of the test set, one row per example.
        n: Number of resamples.
        seed: Seed of the resampling.
        options: ``MetricOptions`` fields as a dict (the settings ``table`` was made with).
        max_elements: Most indices drawn at once.

    Returns:
        Reported key -> float array of ``n`` scores (0-100).
    """
    num = len(table)
    return _weighted_scores(
        name,
        table,
        options,
        (_draw_counts(idx, num) for idx in resample_chunks(num, n, seed, max_elements)),
        n,
    )


def bootstrap_scores(
    name: str,
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    indices: np.ndarray,
    options: Mapping[str, Any] | MetricOptions | None = None,
) -> dict[str, np.ndarray]:
    """Every reported key of a metric on given resamples (rows of ``indices``).

    Args:
        name: The metric name.
        predictions: One prediction per example.
        references: One list of references per example.
        indices: ``(n, num_examples)`` resample indices, e.g. from ``bootstrap_indices``.
        options: ``MetricOptions`` fields as a dict.

    Returns:
        Reported key -> float array of ``n`` scores (0-100).
    """
    table = example_stats(name, predictions, references, options)
    if not len(table):
        raise ValueError("no examples to bootstrap")
    step = max(1, (1 << 22) // len(table))
    chunks = (_draw_counts(indices[i : i + step], len(table)) for i in range(0, len(indices), step))
    return _weighted_scores(name, table, options, chunks, len(indices))


def percentile_interval(samples: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """The ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` percentiles of ``samples``."""
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(samples, [alpha, 1.0 - alpha])
    return float(low), float(high)


# --------------------------------------------------------------------------- helpers

_SQUAD_PUNCT = frozenset(string.punctuation)
_NO_ENTITY = frozenset({"", "none", "no entities", "no entity", "n/a", "-"})
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"'”’)\]])\s+")


def _draw_counts(indices: np.ndarray, num_examples: int) -> np.ndarray:
    """How often each resample (row) drew each example, as float64 (rows, num_examples)."""
    rows = len(indices)
    flat = indices + (np.arange(rows, dtype=np.int64) * num_examples)[:, None]
    counts = np.bincount(flat.ravel(), minlength=rows * num_examples)
    del flat
    return counts.reshape(rows, num_examples).astype(np.float64)


def _weighted_scores(
    name: str,
    table: np.ndarray,
    options: Mapping[str, Any] | MetricOptions | None,
    weights: Iterable[np.ndarray],
    n: int,
) -> dict[str, np.ndarray]:
    """Scores of each resample given as draw counts per example (chunks of rows)."""
    _check_name(name)
    if not len(table):
        raise ValueError("no examples to bootstrap")
    params = _metric_params(name, MetricOptions.from_dict(options))
    num = len(table)
    values = table.astype(np.float64)
    out: dict[str, np.ndarray] = {}
    r = 0
    for w in weights:
        sums = w @ values  # (rows, statistics): exact for integer counts below 2**53
        for row in sums:
            if name in _COUNT_METRICS:
                stats = MetricStats(name, params, num, tuple(int(c) for c in np.rint(row)))
            else:
                stats = MetricStats(name, params, num, sums=tuple(float(x) for x in row))
            for k, v in finalize(name, stats).items():
                out.setdefault(k, np.empty(n, dtype=np.float64))[r] = v
            r += 1
    return out


def _check_name(name: str) -> None:
    if name not in METRIC_NAMES:
        raise ValueError(f"unknown metric {name!r} (known: {', '.join(METRIC_NAMES)})")


def _check_inputs(
    predictions: Sequence[str], references: Sequence[str | Sequence[str]]
) -> list[list[str]]:
    """Validates the inputs and returns the references as one list per example."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference entries")
    refs = []
    for i, (pred, ref) in enumerate(zip(predictions, references, strict=True)):
        if not isinstance(pred, str):
            raise ValueError(f"example {i}: prediction must be a string, got {pred!r}")
        ref_list = [ref] if isinstance(ref, str) else list(ref)
        if not ref_list or not all(isinstance(r, str) for r in ref_list):
            raise ValueError(
                f"example {i}: reference must be a string or a non-empty list of strings, "
                f"got {ref!r}"
            )
        refs.append(ref_list)
    return refs


def _shard_bounds(n: int, num_workers: int) -> list[tuple[int, int]]:
    """Contiguous, nearly equal [start, end) ranges; never an empty shard."""
    shards = max(1, min(num_workers, n))
    edges = [n * k // shards for k in range(shards + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


def _shard_stats(
    names: Sequence[str], predictions: list[str], references: list[list[str]], opts: MetricOptions
) -> dict[str, MetricStats]:
    """Statistics of several metrics on one shard (module level so a process pool can run it)."""
    stats = {}
    for name in names:
        params, segments = _segment_stats(name, predictions, references, opts)
        stats[name] = _stats_from_segments(name, params, segments)
    return stats


def _stats_from_segments(
    name: str, params: tuple[tuple[str, Any], ...], segments: list[tuple[Any, ...]]
) -> MetricStats:
    if name in _COUNT_METRICS:
        # An empty shard has no counts at all (their width depends on the metric's settings).
        counts = tuple(sum(col) for col in zip(*segments, strict=True)) if segments else ()
        return MetricStats(name, params, len(segments), counts=counts)
    return MetricStats(name, params, len(segments), values=tuple(segments))


def _segment_stats(
    name: str, predictions: list[str], references: list[list[str]], opts: MetricOptions
) -> tuple[tuple[tuple[str, Any], ...], list[tuple[Any, ...]]]:
    """Per-example statistics of one metric, plus the settings the score depends on."""
    params = _metric_params(name, opts)
    if name == "bleu":
        return params, _sacrebleu_segments(_make_bleu(dict(params)), predictions, references)
    if name == "chrf":
        return params, _sacrebleu_segments(_make_chrf(dict(params)), predictions, references)
    if name == "rouge":
        return params, _rouge_segments(predictions, references, opts)
    per_example: Callable[[str, list[str]], tuple[Any, ...]]
    if name == "accuracy":

        def per_example(pred: str, refs: list[str]) -> tuple[Any, ...]:
            return (int(any(label_matches(pred, r) for r in refs)), 1)

    elif name == "exact_match":

        def per_example(pred: str, refs: list[str]) -> tuple[Any, ...]:
            return (int(max(squad_exact_match(pred, r) for r in refs)), 1)

    elif name == "f1":

        def per_example(pred: str, refs: list[str]) -> tuple[Any, ...]:
            return (float(max(squad_f1(pred, r) for r in refs)),)

    else:  # entity_f1: one gold annotation per sentence, so only the first reference counts.

        def per_example(pred: str, refs: list[str]) -> tuple[Any, ...]:
            pred_ents, gold_ents = Counter(parse_entities(pred)), Counter(parse_entities(refs[0]))
            tp = sum((pred_ents & gold_ents).values())
            return (tp, sum(pred_ents.values()), sum(gold_ents.values()))

    return params, [per_example(p, r) for p, r in zip(predictions, references, strict=True)]


def _metric_params(name: str, opts: MetricOptions) -> tuple[tuple[str, Any], ...]:
    """The settings a metric's score depends on (shards merge only if they agree)."""
    if name == "bleu":
        return _bleu_params(opts)
    if name == "chrf":
        return _chrf_params(opts)
    if name == "rouge":
        return (
            ("use_stemmer", opts.rouge_use_stemmer),
            ("split_sentences", opts.rouge_split_sentences),
        )
    return ()


def _bleu_params(opts: MetricOptions) -> tuple[tuple[str, Any], ...]:
    return (
        ("tokenize", opts.bleu_tokenize),
        ("lowercase", opts.lowercase),
        ("smooth_method", "exp"),
        ("max_ngram_order", 4),
    )


def _chrf_params(opts: MetricOptions) -> tuple[tuple[str, Any], ...]:
    return (
        ("char_order", opts.chrf_char_order),
        ("word_order", opts.chrf_word_order),
        ("beta", opts.chrf_beta),
        ("lowercase", opts.lowercase),
    )


def _make_bleu(params: dict[str, Any]) -> BLEU:
    from sacrebleu.metrics import BLEU

    return BLEU(
        lowercase=params["lowercase"],
        tokenize=params["tokenize"],
        smooth_method=params["smooth_method"],
        max_ngram_order=params["max_ngram_order"],
    )


def _make_chrf(params: dict[str, Any]) -> CHRF:
    from sacrebleu.metrics import CHRF

    return CHRF(
        char_order=params["char_order"],
        word_order=params["word_order"],
        beta=params["beta"],
        lowercase=params["lowercase"],
    )


def _sacrebleu_segments(
    metric: BLEU | CHRF, predictions: list[str], references: list[list[str]]
) -> list[tuple[int, ...]]:
    """sacreBLEU's own per-segment statistics (what ``corpus_score`` sums before scoring).

    ``corpus_score`` is ``_compute_score_from_stats(sum_of_lists(
    _extract_corpus_statistics(hyps, refs)))``; we call the first step here and the last in
    ``finalize``, so the sum can span shards. Reference streams are padded with None for lines
    with fewer references, which sacreBLEU drops line by line.
    """
    if not predictions:
        return []
    width = max(len(r) for r in references)
    streams: Any = [[r[k] if k < len(r) else None for r in references] for k in range(width)]
    segments = metric._extract_corpus_statistics(predictions, streams)
    return [tuple(int(x) for x in seg) for seg in segments]


def _rouge_segments(
    predictions: list[str], references: list[list[str]], opts: MetricOptions
) -> list[tuple[float, ...]]:
    """Per-example F-measures (rouge1, rouge2, rougeL, rougeLsum) from rouge-score."""
    # Imported here: rouge-score pulls in nltk (about 2 s), which BLEU-only runs never need.
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(
        list(ROUGE_KEYS), tokenizer=_RougeTokenizer(opts.rouge_use_stemmer)
    )

    def prepare(text: str) -> str:
        # rouge-score tokenizes every non-alphanumeric run, newlines included, as a separator,
        # so one sentence per line changes rougeLsum only; rouge1/2/L see the same tokens.
        return "\n".join(split_sentences(text)) if opts.rouge_split_sentences else text

    segments = []
    for pred, refs in zip(predictions, references, strict=True):
        scores = scorer.score_multi([prepare(r) for r in refs], prepare(pred))
        segments.append(tuple(float(scores[k].fmeasure) for k in ROUGE_KEYS))
    return segments


class _RougeTokenizer:
    """rouge-score's DefaultTokenizer with the Porter stemmer memoized.

    Same tokenization function and same stemmer as ``tokenizers.DefaultTokenizer``; stemming
    is pure and dominates ROUGE's run time, and references repeat across systems.
    """

    def __init__(self, use_stemmer: bool) -> None:
        from rouge_score import tokenize

        self._tokenize = tokenize.tokenize
        self._stemmer = _MemoStemmer() if use_stemmer else None

    def tokenize(self, text: str) -> list[str]:
        return list(self._tokenize(text, self._stemmer))


class _MemoStemmer:
    def stem(self, word: str) -> str:
        return _porter_stem(word)


@functools.lru_cache(maxsize=1 << 18)
def _porter_stem(word: str) -> str:
    return str(_porter().stem(word))


@functools.cache
def _porter() -> Any:
    # The same stemmer object rouge-score's DefaultTokenizer(use_stemmer=True) builds.
    from nltk.stem import porter

    return porter.PorterStemmer()


def _mean_percent(stats: MetricStats, column: int, n: int) -> float:
    """100 * mean of one column, adding in corpus order like the official SQuAD script does.

    A plain left-to-right loop rather than ``sum`` (compensated since Python 3.12) or numpy
    (pairwise) so that the result is one fixed, reproducible float; folded totals
    (``fold_stats``) are where that loop left off.
    """
    if n == 0:
        return 0.0
    total = stats.sums[column] if stats.sums else 0.0
    for v in stats.values:
        total += v[column]
    return 100.0 * total / n


__all__ = [
    "METRIC_NAMES",
    "ROUGE_KEYS",
    "MetricOptions",
    "MetricStats",
    "bootstrap_ci",
    "bootstrap_indices",
    "bootstrap_scores",
    "bootstrap_table",
    "compute_metrics",
    "default_metrics",
    "example_stats",
    "finalize",
    "fold_stats",
    "label_matches",
    "merge_stats",
    "metric_stats",
    "normalize_answer",
    "normalize_label",
    "parse_entities",
    "percentile_interval",
    "resample_chunks",
    "split_sentences",
    "squad_exact_match",
    "stats_of_table",
    "squad_f1",
]

"""Split assignment, prompt-masked tokenization and packing, on real samples and tokenizer."""

from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tokenizers import Tokenizer

from data_pipeline.pack import (
    best_fit_decreasing,
    pack_rows,
    packing_efficiency,
    position_ids_from_seq_lens,
)
from data_pipeline.selection import (
    ExemplarPicker,
    exemplar_rows,
    first_occurrences,
    isin128,
)
from data_pipeline.sources import Reject, detect_format, parse_bytes
from data_pipeline.split import SPLITS, assign_split, content_key, record_key, validate_ratios
from data_pipeline.templates import render
from data_pipeline.tokenize import (
    LengthError,
    build_batch,
    build_example,
    prompt_ids_for_generation,
    token_stats,
)

ASSETS = Path(__file__).resolve().parents[1] / "assets"
DATA = ASSETS / "data"
RATIOS = {"train": 0.8, "validation": 0.1, "test": 0.1}
BOS, EOS = 1, 2  # stories260K (Llama SentencePiece): <s>, </s>


def rendered(relative: str, template: str, params: dict[str, Any] | None = None) -> list:
    path = DATA / relative
    parsed = parse_bytes(path.read_bytes(), relative, detect_format(str(path)))
    return [render(template, rec, params) for _, rec in parsed if not isinstance(rec, Reject)]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    tok = Tokenizer.from_file(str(ASSETS / "models" / "stories260K" / "tokenizer.json"))
    tok.no_truncation()
    return tok


def tokenize_turns(tok: Tokenizer, turns: list[tuple[str, str]]) -> tuple[list, list]:
    encodings = tok.encode_batch([t for pair in turns for t in pair], add_special_tokens=False)
    ids = [e.ids for e in encodings]
    return ids[0::2], ids[1::2]


# --- split -----------------------------------------------------------------------------------


def test_record_key_uses_prompts_only_and_content_key_everything() -> None:
    a = [("Review: fine\nSentiment:", "positive")]
    b = [("Review: fine\nSentiment:", "negative")]
    assert record_key(a) == record_key(b)
    assert content_key(a) != content_key(b)
    assert content_key(a) == content_key([("Review: fine\nSentiment:", "positive")])
    # Boundaries between texts matter: no collision by moving characters across them.
    assert record_key([("ab", "x"), ("c", "y")]) != record_key([("a", "x"), ("bc", "y")])
    assert content_key([("ab", "c")]) != content_key([("a", "bc")])
    assert len(record_key(a)) == 32 and int(record_key(a), 16) >= 0


def test_assign_split_is_deterministic_and_order_independent() -> None:
    turns = rendered("sst2/train.tsv", "sst2") + rendered(
        "instruction/alpaca_en_demo.json", "alpaca"
    )
    keys = [record_key(t) for t in turns]
    first = {k: assign_split(k, 7, RATIOS) for k in keys}
    shuffled = keys[:]
    random.Random(0).shuffle(shuffled)
    assert {k: assign_split(k, 7, RATIOS) for k in shuffled} == first
    # The mapping's order does not matter either.
    reordered = {"test": 0.1, "train": 0.8, "validation": 0.1}
    assert {k: assign_split(k, 7, reordered) for k in keys} == first
    # Another seed gives another assignment.
    other = {k: assign_split(k, 8, RATIOS) for k in keys}
    assert sum(first[k] != other[k] for k in keys) > len(keys) // 10
    # Proportions: within 5 standard deviations of the binomial expectation.
    counts = Counter(first[k] for k in set(keys))
    n = len(set(keys))
    for name, share in RATIOS.items():
        assert abs(counts[name] - n * share) < 5 * (n * share * (1 - share)) ** 0.5, name


def test_no_prompt_lands_in_two_splits() -> None:
    turns = (
        rendered("sst2/train.tsv", "sst2")
        + rendered("sst2/test.tsv", "sst2")
        + rendered("instruction/v1_sft_demo.jsonl", "chat")
    )
    # The same prompt with another answer (a relabelled duplicate) must follow its twin.
    turns += [[(p, "positive" if c == "negative" else "negative")] for [(p, c)] in turns[:300]]
    split_of: dict[str, set[str]] = {}
    for t in turns:
        split_of.setdefault(record_key(t), set()).add(assign_split(record_key(t), 0, RATIOS))
    assert all(len(s) == 1 for s in split_of.values())
    assert set().union(*split_of.values()) == set(SPLITS)


def test_split_ratio_validation() -> None:
    with pytest.raises(ValueError, match="sum to 1, got 0.9"):
        assign_split("k", 0, {"train": 0.8, "test": 0.1})
    with pytest.raises(ValueError, match=r"unknown split names \['dev'\]"):
        validate_ratios({"train": 0.9, "dev": 0.1})
    with pytest.raises(ValueError, match="negative"):
        validate_ratios({"train": 1.2, "test": -0.2})
    assert validate_ratios({"train": 0.9, "validation": 0.05, "test": 0.05 + 5e-7})
    keys = [f"key-{i}" for i in range(2000)]
    assert {assign_split(k, 0, {"train": 1.0, "test": 0.0}) for k in keys} == {"train"}
    assert {assign_split(k, 0, {"train": 0.5, "test": 0.5}) for k in keys} == {"train", "test"}


# --- tokenize --------------------------------------------------------------------------------


def test_build_example_layout() -> None:
    ids, labels = build_example(
        [[10, 11], [20]], [[12, 13], [21, 22]], bos_id=1, eos_id=2, max_seq_len=16
    )
    assert ids == [1, 10, 11, 12, 13, 20, 21, 22, 2]
    assert labels == [-100, -100, -100, 12, 13, -100, 21, 22, 2]
    ids, labels = build_example([[10]], [[12]], bos_id=None, eos_id=2, max_seq_len=3)
    assert (ids, labels) == ([10, 12, 2], [-100, 12, 2])
    with pytest.raises(ValueError, match="pair up"):
        build_example([[1]], [], bos_id=None, eos_id=2, max_seq_len=8)
    with pytest.raises(ValueError, match="unknown truncation 'right'"):
        build_example([[1]], [[2]], bos_id=None, eos_id=2, max_seq_len=8, truncation="right")


@pytest.mark.parametrize(
    ("relative", "template", "params"),
    [
        ("instruction/alpaca_en_demo.json", "alpaca", None),
        ("instruction/v1_sft_demo.jsonl", "chat", None),
        ("sst2/test.tsv", "sst2", None),
        ("conll2003/eng.testa", "conll2003", None),
        ("wmt21/newstest2021.de-en.jsonl", "wmt", {"source_lang": "de", "target_lang": "en"}),
    ],
)
def test_masked_label_counts_are_exact(
    tokenizer: Tokenizer, relative: str, template: str, params: dict[str, Any] | None
) -> None:
    for turns in rendered(relative, template, params):
        prompts, completions = tokenize_turns(tokenizer, turns)
        ids, labels = build_example(
            prompts, completions, bos_id=BOS, eos_id=EOS, max_seq_len=100_000
        )
        learned = [i for i, label in enumerate(labels) if label != -100]
        assert len(learned) == sum(len(c) for c in completions) + 1
        assert all(labels[i] == ids[i] for i in learned)
        assert len(ids) == 1 + sum(map(len, prompts)) + sum(map(len, completions)) + 1
        # The learned tokens are exactly the completions followed by eos.
        assert [ids[i] for i in learned] == [t for c in completions for t in c] + [EOS]


def test_masked_labels_of_a_multi_turn_chat(tokenizer: Tokenizer) -> None:
    record = {
        "messages": [
            {"role": "user", "content": "Tell me a story."},
            {"role": "assistant", "content": "Once upon a time there was a cat."},
            {"role": "user", "content": "And then?"},
            {"role": "assistant", "content": "The cat slept.", "loss_weight": 0.0},
            {"role": "user", "content": "Really?"},
            {"role": "assistant", "content": "Yes, all day long."},
        ]
    }
    turns = render("chat", record)
    prompts, completions = tokenize_turns(tokenizer, turns)
    ids, labels = build_example(prompts, completions, bos_id=BOS, eos_id=EOS, max_seq_len=4096)
    learned = [ids[i] for i, label in enumerate(labels) if label != -100]
    assert len(learned) == len(completions[0]) + len(completions[1]) + 1
    assert tokenizer.decode(learned[:-1]) == tokenizer.decode(completions[0] + completions[1])
    assert "The cat slept" not in tokenizer.decode(learned)


def test_truncation_drop_and_left() -> None:
    prompts, completions = [[10, 11, 12, 13], [20, 21]], [[14, 15], [22]]
    kwargs: dict[str, Any] = {"bos_id": 1, "eos_id": 2}
    with pytest.raises(LengthError, match=r"^11 tokens > max_seq_len 10$"):
        build_example(prompts, completions, max_seq_len=10, **kwargs)
    # 11 tokens into 10: the oldest prompt token goes, every completion token stays.
    ids, labels = build_example(prompts, completions, max_seq_len=10, truncation="left", **kwargs)
    assert ids == [1, 11, 12, 13, 14, 15, 20, 21, 22, 2]
    assert labels == [-100, -100, -100, -100, 14, 15, -100, -100, 22, 2]
    # Cutting past the first prompt continues into the second.
    ids, labels = build_example(prompts, completions, max_seq_len=6, truncation="left", **kwargs)
    assert ids == [1, 14, 15, 21, 22, 2]
    assert labels == [-100, 14, 15, -100, 22, 2]
    # Completions (3) + bos + eos = 5 fit exactly; 4 cannot be met by cutting prompts.
    ids, _ = build_example(prompts, completions, max_seq_len=5, truncation="left", **kwargs)
    assert ids == [1, 14, 15, 22, 2]
    with pytest.raises(LengthError, match="completions alone take 5"):
        build_example(prompts, completions, max_seq_len=4, truncation="left", **kwargs)
    # Fits: untouched under both policies.
    full = build_example(prompts, completions, max_seq_len=11, **kwargs)
    assert full == build_example(prompts, completions, max_seq_len=11, truncation="left", **kwargs)


def test_left_truncation_on_real_text(tokenizer: Tokenizer) -> None:
    for turns in rendered("cnn_dailymail/summeval.jsonl", "cnn_dailymail")[:5]:
        prompts, completions = tokenize_turns(tokenizer, turns)
        ids, labels = build_example(
            prompts, completions, bos_id=BOS, eos_id=EOS, max_seq_len=512, truncation="left"
        )
        assert len(ids) == 512
        assert sum(label != -100 for label in labels) == len(completions[0]) + 1
        assert ids[-len(completions[0]) - 1 : -1] == completions[0]
        # The kept prompt is the end of the original prompt.
        assert ids[1 : -len(completions[0]) - 1] == prompts[0][-(512 - 2 - len(completions[0])) :]


def _per_example(ids: list[list[int]], turns: list[int], **build: Any) -> list[Any]:
    """`build_example` on each example of a `build_batch` input: rows or LengthErrors."""
    out: list[Any] = []
    pos = 0
    for n in turns:
        texts, pos = ids[pos : pos + 2 * n], pos + 2 * n
        try:
            out.append(build_example(texts[0::2], texts[1::2], **build))
        except LengthError as e:
            out.append(e)
    return out


def _assert_batch_equals(ids: list[list[int]], turns: list[int], **build: Any) -> None:
    batch = build_batch(ids, turns, **build)
    expected = _per_example(ids, turns, **build)
    kept = [i for i, e in enumerate(expected) if not isinstance(e, LengthError)]
    assert batch.kept.tolist() == kept
    assert {i: str(e) for i, e in batch.errors.items()} == {
        i: str(e) for i, e in enumerate(expected) if isinstance(e, LengthError)
    }
    for row, i in enumerate(kept):
        start, end = batch.offsets[row], batch.offsets[row + 1]
        assert batch.input_ids[start:end].tolist() == expected[i][0]
        assert batch.labels[start:end].tolist() == expected[i][1]
        assert batch.loss_tokens[row] == sum(label != -100 for label in expected[i][1])


def test_build_batch_equals_build_example_per_example() -> None:
    """The vectorized builder the workers use gives build_example's rows and errors exactly:
    random turns, empty prompts and completions, bos or not, both truncation policies, and
    lengths on both sides of max_seq_len."""
    rng = random.Random(0)
    for _ in range(2000):
        turns = [rng.randint(1, 3) for _ in range(rng.randint(0, 6))]
        ids = [
            [rng.randrange(100) for _ in range(rng.randint(0, 7))] for _ in range(2 * sum(turns))
        ]
        _assert_batch_equals(
            ids,
            turns,
            bos_id=rng.choice([None, 500]),
            eos_id=501,
            max_seq_len=rng.randint(1, 30),
            truncation=rng.choice(["drop", "left"]),
        )


def test_build_batch_on_real_text(tokenizer: Tokenizer) -> None:
    # Real chat (multi-turn) and news (long: truncated at 256) examples in one batch.
    examples = rendered("instruction/v1_sft_demo.jsonl", "chat")[:50]
    examples += rendered("cnn_dailymail/summeval.jsonl", "cnn_dailymail")[:20]
    ids: list[list[int]] = []
    for turns in examples:
        prompts, completions = tokenize_turns(tokenizer, turns)
        ids += [t for pair in zip(prompts, completions, strict=True) for t in pair]
    for truncation in ("drop", "left"):
        _assert_batch_equals(
            ids,
            [len(t) for t in examples],
            bos_id=BOS,
            eos_id=EOS,
            max_seq_len=256,
            truncation=truncation,
        )
    with pytest.raises(ValueError, match="turns need"):
        build_batch(ids[:-1], [len(t) for t in examples], bos_id=BOS, eos_id=EOS, max_seq_len=9)


def test_128_bit_key_helpers_equal_plain_python() -> None:
    """Dedupe (first occurrence of each key) and the split-overlap check (key among the held
    ones) on keys whose halves collide often, against dicts and sets of (hi, lo) pairs."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(0, 300))
        hi, lo = (rng.integers(0, 4, n).astype(np.uint64) for _ in range(2))
        pairs = list(zip(hi.tolist(), lo.tolist(), strict=True))
        first: dict[tuple[int, int], int] = {}
        for i, pair in enumerate(pairs):
            first.setdefault(pair, i)
        assert sorted(first_occurrences(hi, lo).tolist()) == sorted(first.values())
        held = rng.random(n) < 0.2
        held_pairs = {p for p, h in zip(pairs, held, strict=True) if h}
        got = isin128(hi, lo, hi[held], lo[held]).tolist()
        assert got == [p in held_pairs for p in pairs]


def test_prompt_ids_for_generation() -> None:
    prompts, completions = [[10, 11], [20, 21]], [[12], [22, 23]]
    assert prompt_ids_for_generation(prompts, completions, 1, 100) == [1, 10, 11, 12, 20, 21]
    assert prompt_ids_for_generation(prompts, completions, None, 100) == [10, 11, 12, 20, 21]
    assert prompt_ids_for_generation(prompts, completions, 1, 3) == [1, 20, 21]
    assert prompt_ids_for_generation(prompts, completions, None, 4) == [11, 12, 20, 21]
    with pytest.raises(ValueError, match="no room"):
        prompt_ids_for_generation(prompts, completions, 1, 1)


def test_token_stats() -> None:
    lengths = list(range(1, 101))
    stats = token_stats(lengths, [n // 2 for n in lengths])
    assert stats == {
        "rows": 100,
        "tokens": 5050,
        "loss_tokens": sum(n // 2 for n in lengths),
        "mean_length": 50.5,
        "p50_length": 50,
        "p99_length": 99,
        "max_length": 100,
    }
    assert token_stats([], [])["rows"] == 0


def test_token_stats_from_a_histogram_equal_sorting_every_length() -> None:
    """Prepare accumulates a length histogram (bounded memory); nearest-rank percentiles from
    it must equal those of the sorted lengths, on random skewed samples."""
    rng = np.random.default_rng(0)
    for _ in range(500):
        n = int(rng.integers(1, 300))
        lengths = rng.integers(1, int(rng.integers(2, 600)), n) ** int(rng.integers(1, 3))
        ordered = np.sort(lengths)

        def rank(q: float, ordered: np.ndarray = ordered) -> int:
            return int(ordered[max(0, -(-int(q * 100) * len(ordered) // 100) - 1)])

        stats = token_stats(lengths, np.ones(n, np.int64))
        assert stats["tokens"] == int(lengths.sum()) and stats["rows"] == n
        assert stats["max_length"] == int(ordered[-1])
        assert (stats["p50_length"], stats["p99_length"]) == (rank(0.50), rank(0.99))
    with pytest.raises(ValueError):
        token_stats([1], [])


# --- pack ------------------------------------------------------------------------------------


def test_best_fit_decreasing_small_cases() -> None:
    assert best_fit_decreasing([], 10) == []
    # Longest first: 7 | 6 | 5, then 3 into the 7 (best fit), 4 into the 6, 2 into the 5.
    assert best_fit_decreasing([5, 7, 3, 6, 4, 2], 10) == [[1, 2], [3, 4], [0, 5]]
    # Ties: equal lengths in index order, equally full bins by age.
    assert best_fit_decreasing([4, 4, 4, 4], 8) == [[0, 1], [2, 3]]
    assert best_fit_decreasing([10, 10], 10) == [[0], [1]]
    with pytest.raises(ValueError, match="item 1 has length 11"):
        best_fit_decreasing([3, 11], 10)
    with pytest.raises(ValueError, match="outside 1..10"):
        best_fit_decreasing([0], 10)


def test_best_fit_decreasing_is_fast_valid_and_tight() -> None:
    rng = random.Random(0)
    # Realistic length mix: many short classification rows, a long tail of instructions.
    lengths = [min(1024, max(4, int(rng.lognormvariate(3.4, 0.9)))) for _ in range(60_000)]
    start = time.perf_counter()
    bins = best_fit_decreasing(lengths, 1024)
    elapsed = time.perf_counter() - start
    assert elapsed < 1.5, elapsed  # O(n log n): about 0.2 s here
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 1024 for b in bins)
    lower_bound = -(-sum(lengths) // 1024)
    assert len(bins) <= lower_bound + 1
    assert best_fit_decreasing(lengths, 1024) == bins  # deterministic


def test_pack_rows_keeps_every_token_and_label(tokenizer: Tokenizer) -> None:
    examples = []
    for path, template in [
        ("sst2/train.tsv", "sst2"),
        ("instruction/alpaca_en_demo.json", "alpaca"),
    ]:
        for turns in rendered(path, template):
            prompts, completions = tokenize_turns(tokenizer, turns)
            try:
                examples.append(
                    build_example(prompts, completions, bos_id=BOS, eos_id=EOS, max_seq_len=512)
                )
            except LengthError:
                continue
    assert len(examples) > 2000
    packed = pack_rows(examples, 512)
    assert Counter(t for row in packed for t in row["input_ids"]) == Counter(
        t for ids, _ in examples for t in ids
    )
    assert Counter(x for row in packed for x in row["labels"]) == Counter(
        x for _, labels in examples for x in labels
    )
    # Each packed row is whole examples, back to back, as seq_lens says.
    originals = Counter((tuple(ids), tuple(labels)) for ids, labels in examples)
    found: Counter = Counter()
    for row in packed:
        assert len(row["input_ids"]) == len(row["labels"]) == sum(row["seq_lens"]) <= 512
        offset = 0
        for n in row["seq_lens"]:
            segment = (
                tuple(row["input_ids"][offset : offset + n]),
                tuple(row["labels"][offset : offset + n]),
            )
            found[segment] += 1
            offset += n
    assert found == originals
    efficiency = packing_efficiency(packed, 512)
    unpacked = packing_efficiency([{"input_ids": ids} for ids, _ in examples], 512)
    assert efficiency > 0.95 > 0.3 > unpacked
    assert efficiency == sum(len(ids) for ids, _ in examples) / (len(packed) * 512)


def test_pack_rows_masks_the_first_label_of_each_example() -> None:
    # Without bos and with an empty prompt, the first token would be learned from the previous
    # example's eos: packing masks it.
    rows = [([5, 6, 2], [5, 6, 2]), ([7, 2], [-100, 2])]
    [packed] = pack_rows(rows, 8)
    assert packed == {
        "input_ids": [5, 6, 2, 7, 2],
        "labels": [-100, 6, 2, -100, 2],
        "seq_lens": [3, 2],
    }
    with pytest.raises(ValueError, match="3 ids but 2 labels"):
        pack_rows([([1, 2, 3], [1, 2])], 8)


def test_position_ids_and_efficiency() -> None:
    assert position_ids_from_seq_lens([3, 1, 2]) == [0, 1, 2, 0, 0, 1]
    assert position_ids_from_seq_lens([]) == []
    assert packing_efficiency([], 8) == 0.0
    assert packing_efficiency([{"input_ids": [1] * 6}, {"input_ids": [1] * 2}], 8) == 0.5


def test_exemplar_rows_lowest_distinct_keys_per_group() -> None:
    hi = np.array([5, 1, 1, 3, 9, 2, 2, 0], np.uint64)
    lo = np.array([0, 7, 7, 0, 0, 1, 0, 4], np.uint64)
    groups = np.array([0, 0, 0, 0, 1, 1, 1, 0], np.int64)
    chosen = exemplar_rows(hi, lo, groups, n_groups=3, k=3)
    # Group 0: keys (0,4) < (1,7) (twice: one exemplar, the first row) < (3,0) < (5,0).
    assert [r.tolist() for r in chosen] == [[7, 1, 3], [6, 5, 4], []]
    # The order of the rows does not matter, only their keys.
    perm = np.array([3, 0, 6, 2, 7, 5, 1, 4])
    again = exemplar_rows(hi[perm], lo[perm], groups[perm], n_groups=3, k=3)
    assert [[(hi[perm][i], lo[perm][i]) for i in r] for r in again] == [
        [(hi[i], lo[i]) for i in r] for r in chosen
    ]
    assert [r.tolist() for r in exemplar_rows(hi, lo, groups, 3, k=0)] == [[], [], []]


def test_exemplar_picker_over_slices_equals_exemplar_rows() -> None:
    """The driver picks exemplars a slice at a time (bounded memory); the result must be
    exemplar_rows on all rows, ties (a key seen twice, also across slices) included."""
    rng = np.random.default_rng(1)
    for _ in range(300):
        n, n_groups, k = int(rng.integers(0, 200)), int(rng.integers(1, 4)), int(rng.integers(1, 6))
        hi, lo = (rng.integers(0, 6, n).astype(np.uint64) for _ in range(2))
        groups = rng.integers(0, n_groups, n)
        expected = exemplar_rows(hi, lo, groups, n_groups, k)
        picker = ExemplarPicker(n_groups, k)
        step = int(rng.integers(1, 50))
        for start in range(0, n, step):
            rows = np.arange(start, min(n, start + step))
            picker.add(rows, hi[rows], lo[rows], groups[rows])
        got = picker.result()
        assert [g.tolist() for g in got] == [e.tolist() for e in expected]


def test_a_folder_without_tokenizer_files_is_refused_not_read_as_an_empty_tokenizer() -> None:
    # transformers 5 turns a config-only folder into a tokenizer of special tokens alone, which
    # would encode every record to nothing; prepare must say so instead.
    from data_pipeline.errors import PrepareError
    from data_pipeline.tokenizer import tokenizer_spec

    folder = Path(__file__).resolve().parents[1] / "assets/models/configs/Qwen2.5-7B"
    assert not (folder / "tokenizer.json").exists()
    with pytest.raises(PrepareError, match="no tokenizer in this folder"):
        tokenizer_spec(str(folder))

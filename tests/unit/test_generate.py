"""Tests for eval.generate (batching, stop strings, padded generation), eval.fewshot (k-shot
prompts) and the result table."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from eval import fewshot
from eval.generate import StopOnText, cut_at_stop, generate, generate_counted, plan_batches
from launcher.pipeline import print_table

ASSETS = Path(__file__).resolve().parents[1] / "assets"
MODEL_DIR = ASSETS / "models" / "stories260K"

# --- plan_batches -----------------------------------------------------------------------------


def test_plan_batches_groups_by_length_with_index_tiebreak() -> None:
    assert plan_batches([5, 1, 3, 1, 5, 2], 2) == [[1, 3], [5, 2], [0, 4]]


def test_plan_batches_covers_every_index_once() -> None:
    lens = [7, 3, 9, 3, 1, 8, 2]
    batches = plan_batches(lens, 3)
    assert [len(b) for b in batches] == [3, 3, 1]
    assert sorted(i for b in batches for i in b) == list(range(len(lens)))


def test_plan_batches_empty() -> None:
    assert plan_batches([], 4) == []


# --- cut_at_stop ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "stops", "expected"),
    [
        (" positive\nnegative", ["\n"], "positive"),
        ("\n\n positive\nmore", ["\n"], "positive"),  # stops are searched after leading space
        ("The cat sat. The dog", ["\n", "."], "The cat sat"),
        ("a STOP b\nc", ["\n", "STOP"], "a"),  # the earliest stop wins, not the first listed
        ("  no stop here  ", ["\n"], "no stop here"),
        ("keep all", [], "keep all"),
        ("keep all", [""], "keep all"),  # an empty stop string is ignored
        ("\n", ["\n"], ""),
    ],
)
def test_cut_at_stop(text: str, stops: list[str], expected: str) -> None:
    assert cut_at_stop(text, stops) == expected


# --- generate with the real tiny model --------------------------------------------------------


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(
        MODEL_DIR, attn_implementation="sdpa", dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(MODEL_DIR)


PROMPTS = [
    "Once upon a time",
    "Lily and Tom went to the park to play with a big red ball. Then",
    "The dog",
    "One day, a little girl named Sue found a shiny",
]


def test_batched_greedy_equals_one_at_a_time(model, tok) -> None:
    prompts = [tok(p).input_ids for p in PROMPTS]
    assert len({len(p) for p in prompts}) == len(prompts)  # every row is padded differently
    batched = generate(model, tok, prompts, max_new_tokens=8)
    single = [generate(model, tok, [p], max_new_tokens=8)[0] for p in prompts]
    assert batched == single
    assert all(text for text in single)


def test_greedy_equals_plain_model_generate(model, tok) -> None:
    prompt = tok(PROMPTS[0]).input_ids
    out = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)
    expected = tok.decode(out[0, len(prompt) :], skip_special_tokens=True).strip()
    assert generate(model, tok, [prompt], max_new_tokens=8) == [expected]


def test_generate_cuts_at_stop(model, tok) -> None:
    prompt = tok(PROMPTS[0]).input_ids
    full = generate(model, tok, [prompt], max_new_tokens=8)[0]
    word = full.split()[1]
    cut = generate(model, tok, [prompt], max_new_tokens=8, stop=[word])[0]
    assert cut == full[: full.index(word)].strip()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_stopping_inside_generation_equals_the_post_hoc_cut(model, tok, temperature) -> None:
    prompts = [tok(p).input_ids for p in PROMPTS]
    args = {"max_new_tokens": 48, "stop": [".", "!"], "temperature": temperature, "seed": 3}
    early, n_early = generate_counted(model, tok, prompts, **args)
    late, n_late = generate_counted(model, tok, prompts, stop_early=False, **args)
    assert early == late
    # Without early stopping every row runs to the limit (this model rarely emits EOS), with it
    # each row stops at its first sentence end: strictly fewer tokens, never more per row.
    assert all(a <= b for a, b in zip(n_early, n_late, strict=True))
    assert sum(n_early) < sum(n_late)
    assert all(text and "." not in text and "!" not in text for text in early)


def test_generated_token_counts_are_exact(model, tok) -> None:
    prompt = tok(PROMPTS[0]).input_ids
    _, counts = generate_counted(model, tok, [prompt], max_new_tokens=7, stop_early=False)
    out = model.generate(torch.tensor([prompt]), max_new_tokens=7, do_sample=False)
    assert counts == [out.shape[1] - len(prompt)]


# --- incremental stop strings: equivalence with the old full re-decode ------------------------


def _old_stop_step(tok, ids: list[int], stops: list[str]) -> int | None:
    """The step at which the previous StopOnText (decode every generated token, every step)
    stopped a row: the first t whose decoded text, after leading whitespace, holds a stop."""
    for t in range(1, len(ids) + 1):
        text = tok.decode(ids[:t], skip_special_tokens=True)
        if any(s in text.lstrip() for s in stops if s):
            return t
    return None


def _new_stop_steps(tok, rows: list[list[int]], stops: list[str], width: int = 3) -> list:
    """Drives StopOnText as `generate` does: one column more per call, after a prompt."""
    criterion = StopOnText(tok, stops, width)
    steps: list[int | None] = [None] * len(rows)
    prompt = torch.zeros((len(rows), width), dtype=torch.long)
    for t in range(1, len(rows[0]) + 1):
        ids = torch.cat([prompt, torch.tensor([r[:t] for r in rows])], dim=1)
        for j, done in enumerate(criterion(ids, None).tolist()):
            if done and steps[j] is None:
                steps[j] = t
    return steps


def _byte_level_tokenizer():
    """A GPT-2-style byte-level BPE (another decoder than stories260K's SentencePiece), trained
    here on real text."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    text = (ASSETS / "summeval" / "summeval.json").read_text(encoding="utf-8")[:200_000]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([text], vocab_size=400, min_frequency=2, show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer)


STOP_POOL = ["\n", "\n\n", ".", "!", " the", "the", "e", " ", "ing", "Once", "\ufffd", '."']


@pytest.mark.parametrize("which", ["sentencepiece", "byte_level"])
def test_incremental_stop_equals_full_redecode(tok, which: str) -> None:
    """Property test: on random token sequences (any id, so split multi-byte characters, runs
    of leading whitespace and special tokens all occur) and random stop sets, the incremental
    check stops every row at exactly the step the old O(T^2) check did."""
    import random

    t = tok if which == "sentencepiece" else _byte_level_tokenizer()
    rng = random.Random(0)
    vocab = len(t)
    space = t.convert_tokens_to_ids(t.tokenize(" \n\n  "))  # whitespace-heavy starts
    checked = stopped = 0
    for _ in range(150):
        length = rng.randint(1, 24)
        rows = []
        for _ in range(4):
            head = [rng.choice(space) for _ in range(rng.randint(0, 3))]
            rows.append((head + [rng.randrange(vocab) for _ in range(length)])[:length])
        text = t.decode(rows[0], skip_special_tokens=True)
        pool = STOP_POOL + ([text[rng.randrange(len(text)) :][:4]] if text else [])
        stops = rng.sample(pool, rng.randint(1, 3))
        got = _new_stop_steps(t, rows, stops)
        want = [_old_stop_step(t, r, stops) for r in rows]
        assert got == want, (rows, stops)
        checked += len(rows)
        stopped += sum(w is not None for w in want)
    assert stopped > checked // 4  # the property was exercised, not vacuous


def test_stop_after_leading_whitespace_only(tok) -> None:
    """cut_at_stop's rule: a stop inside the leading whitespace does not count."""
    nl = tok.convert_tokens_to_ids(tok.tokenize("\n"))[-1]
    word = tok("Once", add_special_tokens=False).input_ids
    rows = [[nl, nl, *word, nl]]
    assert _new_stop_steps(tok, rows, ["\n"]) == [_old_stop_step(tok, rows[0], ["\n"])]
    assert _new_stop_steps(tok, rows, ["\n"]) == [len(rows[0])]


# --- fewshot ----------------------------------------------------------------------------------

POOL = [{"prompt": f"Q{i}:", "completion": f" a{i}"} for i in range(5)]


def test_pick_exemplars_is_deterministic_rotated_and_never_the_record() -> None:
    picks = {rid: fewshot.pick_exemplars(POOL, rid, "Q?", 3) for rid in ("r1", "r2", "r3", "r4")}
    assert picks == {rid: fewshot.pick_exemplars(POOL, rid, "Q?", 3) for rid in picks}
    for got in picks.values():  # k consecutive pool entries, wrapping around
        start = POOL.index(got[0])
        assert got == [POOL[(start + j) % len(POOL)] for j in range(3)]
    assert len({POOL.index(p[0]) for p in picks.values()}) > 1  # records differ in their start
    own = fewshot.pick_exemplars(POOL, "r1", "Q2:", 5)  # the test record is Q2 itself
    assert len(own) == 4 and all(e["prompt"] != "Q2:" for e in own)
    assert fewshot.pick_exemplars([], "r1", "Q", 2) == []


def test_fewshot_ids_drop_exemplars_before_cutting_the_prompt() -> None:
    blocks = [[10, 11, 12], [20, 21], [30]]
    prompt = [1, 7, 8, 9]  # BOS 1, then the test prompt
    assert fewshot.fewshot_ids(blocks, prompt, 1, 100) == ([1, 10, 11, 12, 20, 21, 30, 7, 8, 9], 3)
    # The farthest exemplar goes first: it no longer fits in 9 tokens.
    assert fewshot.fewshot_ids(blocks, prompt, 1, 9) == ([1, 20, 21, 30, 7, 8, 9], 2)
    assert fewshot.fewshot_ids(blocks, prompt, 1, 5) == ([1, 30, 7, 8, 9], 1)
    # No room for any exemplar: the zero-shot prompt, cut from the left as eval always did.
    assert fewshot.fewshot_ids(blocks, prompt, 1, 4) == ([1, 7, 8, 9], 0)
    assert fewshot.fewshot_ids(blocks, prompt, 1, 3) == ([7, 8, 9], 0)
    assert fewshot.fewshot_ids(blocks, [7, 8], None, 4) == ([30, 7, 8], 1)


def test_build_prompts_with_the_real_tokenizer(tok) -> None:
    test = {
        "id": ["sst2-1", "sst2-2"],
        "task": ["sst2", "sst2"],
        "prompt": ["Review: bad\nSentiment:", "Review: good\nSentiment:"],
    }
    test["prompt_ids"] = [
        [tok.bos_token_id, *tok(p, add_special_tokens=False).input_ids] for p in test["prompt"]
    ]
    pools = {"sst2": [{"prompt": "Review: fine\nSentiment:", "completion": " positive"}] * 2}

    def encode(texts: list[str]) -> list[list[int]]:
        return tok(texts, add_special_tokens=False)["input_ids"]

    ids, texts = fewshot.build_prompts(test, pools, 2, encode, tok.bos_token_id, 512)
    block = "Review: fine\nSentiment: positive\n\n"
    assert texts == [2 * block + p for p in test["prompt"]]
    block_ids = encode([block])[0]
    for got, pids in zip(ids, test["prompt_ids"], strict=True):
        # BOS, the exemplar ids, then exactly the zero-shot prompt ids prepare made.
        assert got == [tok.bos_token_id, *block_ids, *block_ids, *pids[1:]]


# --- print_table ------------------------------------------------------------------------------


def test_print_table(capsys: pytest.CaptureFixture[str]) -> None:
    print_table(
        {
            "base": {"sst2/accuracy": 0.5, "wmt/bleu": 10.0, "eval/loss": 2.0},
            "finetuned": {"sst2/accuracy": 0.75, "wmt/bleu": 7.25, "wmt/chrf": 30.0},
        }
    )
    lines = [line for line in capsys.readouterr().out.splitlines() if line]
    cells = [[c.strip() for c in line.split("|")] for line in lines]
    assert cells[0] == ["metric", "base", "fine-tuned", "delta"]
    assert set(lines[1]) <= {"-", "+"}
    assert cells[2:] == [
        ["sst2/accuracy", "0.50", "0.75", "+0.25"],
        ["wmt/bleu", "10.00", "7.25", "-2.75"],
        ["wmt/chrf", "-", "30.00", "-"],
    ]
    assert len({len(line) for line in lines}) == 1  # columns line up


def test_print_table_single_model(capsys: pytest.CaptureFixture[str]) -> None:
    print_table({"base": {"sst2/accuracy": 0.5}})
    out = capsys.readouterr().out
    assert "sst2/accuracy | 0.50 |          - |     -" in out


def test_print_table_with_the_k_shot_base(capsys: pytest.CaptureFixture[str]) -> None:
    print_table(
        {
            "base": {"sst2/accuracy": 0.5},
            "base_fewshot": {"sst2/accuracy": 0.625},
            "finetuned": {"sst2/accuracy": 0.75},
        }
    )
    lines = [line for line in capsys.readouterr().out.splitlines() if line]
    cells = [[c.strip() for c in line.split("|")] for line in lines]
    assert cells[0] == ["metric", "base", "base k-shot", "fine-tuned", "delta"]
    assert cells[2] == ["sst2/accuracy", "0.50", "0.62", "0.75", "+0.25"]  # delta: ft - base

"""Tests for eval.generate (batching, stop strings, padded generation) and the result table."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from eval.generate import cut_at_stop, generate, plan_batches
from launcher.pipeline import print_table

MODEL_DIR = Path(__file__).resolve().parents[1] / "assets" / "models" / "stories260K"

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


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model gains nothing from threads; on a shared CPU they only add contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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

"""Tests for training.data: global-batch layout, epoch order, collation, loss, and packing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, AutoTokenizer

from data_pipeline.pack import pack_rows
from data_pipeline.token_store import from_rows
from data_pipeline.tokenize import build_example
from training import batch as tbatch
from training import loss as tloss
from training.data import (
    Split,
    StaleDataError,
    epoch_order,
    global_batch_indices,
    load_split,
    micro_batch_indices,
    shuffled_rows,
    steps_per_epoch,
    total_steps,
)

MODEL_DIR = Path(__file__).resolve().parents[1] / "assets" / "models" / "stories260K"
IGNORE = -100


def split_of(rows: list[dict[str, list[int]]]) -> Split:
    return from_rows(rows)


# --- step arithmetic --------------------------------------------------------------------------


def test_steps_per_epoch_drops_the_tail() -> None:
    assert steps_per_epoch(17, 4) == 4
    assert steps_per_epoch(16, 4) == 4
    assert steps_per_epoch(3, 4) == 0


def test_total_steps() -> None:
    assert total_steps(17, 4, 2.0, None) == 8
    assert total_steps(17, 4, 1.5, None) == 6
    assert total_steps(17, 4, 0.1, None) == 1  # never zero
    assert total_steps(17, 4, 2.0, 3) == 3  # max_steps wins


# --- global-batch layout ----------------------------------------------------------------------


def step_rows(step: int, n_rows: int, micro: int, accum: int, world: int, seed: int) -> list[int]:
    """Every row that (accum x world) micro-batches of one step see, in visiting order."""
    batch = global_batch_indices(step, n_rows, micro * accum * world, seed)
    rows: list[int] = []
    for a in range(accum):
        for r in range(world):
            rows += micro_batch_indices(batch, micro, a, r, world).tolist()
    return rows


@pytest.mark.parametrize("step", range(8))  # two epochs of 4 steps
def test_one_worker_accum_two_sees_what_two_workers_see(step: int) -> None:
    n, micro, seed = 21, 2, 7
    single = step_rows(step, n, micro, accum=2, world=1, seed=seed)
    double = step_rows(step, n, micro, accum=1, world=2, seed=seed)
    batch = global_batch_indices(step, n, 4, seed)
    assert len(batch) == 4
    assert sorted(single) == sorted(double) == sorted(batch.tolist())
    assert len(set(single)) == 4  # micro-batches do not overlap


@pytest.mark.parametrize(("micro", "accum", "world"), [(1, 4, 2), (2, 2, 2), (4, 1, 2), (8, 1, 1)])
def test_micro_batches_tile_the_global_batch(micro: int, accum: int, world: int) -> None:
    batch = global_batch_indices(3, 50, micro * accum * world, seed=1)
    assert step_rows(3, 50, micro, accum, world, seed=1) == batch.tolist()


def test_rank_takes_interleaved_chunk() -> None:
    batch = np.arange(12)
    assert micro_batch_indices(batch, 3, accum_step=1, rank=0, world=2).tolist() == [6, 7, 8]
    assert micro_batch_indices(batch, 3, accum_step=0, rank=1, world=2).tolist() == [3, 4, 5]


def test_an_epoch_visits_distinct_rows() -> None:
    seen = np.concatenate([global_batch_indices(s, 23, 5, seed=3) for s in range(4)])
    assert len(set(seen.tolist())) == 20


def test_next_epoch_starts_a_new_permutation() -> None:
    assert global_batch_indices(4, 20, 5, seed=0).tolist() == epoch_order(20, 0, 1)[:5].tolist()


def test_epochs_reshuffle_deterministically() -> None:
    e0, e1 = epoch_order(100, 42, 0), epoch_order(100, 42, 1)
    assert sorted(e0.tolist()) == list(range(100))
    assert e0.tolist() != e1.tolist()
    assert epoch_order(100, 42, 0).tolist() == e0.tolist()
    assert epoch_order(100, 43, 0).tolist() != e0.tolist()
    again = global_batch_indices(5, 100, 8, 42)
    assert again.tolist() == global_batch_indices(5, 100, 8, 42).tolist()


# --- the keyed shuffle: a bijection per (seed, epoch), built from positions alone -------------


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(1, 3000),
    seed=st.integers(0, 2**63 - 1),
    epoch=st.integers(0, 10**6),
)
def test_shuffle_is_a_bijection(n: int, seed: int, epoch: int) -> None:
    order = epoch_order(n, seed, epoch)
    assert order.dtype == np.int64
    assert np.array_equal(np.sort(order), np.arange(n))


@settings(max_examples=50, deadline=None)
@given(n=st.integers(50, 5000), seed=st.integers(0, 2**32), epoch=st.integers(0, 1000))
def test_shuffle_differs_per_epoch_and_seed(n: int, seed: int, epoch: int) -> None:
    order = epoch_order(n, seed, epoch)
    for other in (epoch_order(n, seed, epoch + 1), epoch_order(n, seed + 1, epoch)):
        # Two random permutations agree on ~1 position; a weak key would agree on many.
        assert np.count_nonzero(order == other) < 10
    assert np.count_nonzero(order == np.arange(n)) < 10  # not near the identity


def test_shuffle_of_positions_is_a_slice_of_the_epoch_order() -> None:
    """What the step computes from its positions alone is what the full order holds there."""
    n, seed, epoch = 1001, 5, 3
    full = epoch_order(n, seed, epoch)
    pos = np.array([0, 7, 500, 999, 1000, 7])
    assert shuffled_rows(pos, n, seed, epoch).tolist() == full[pos].tolist()
    with pytest.raises(ValueError):
        shuffled_rows(np.array([n]), n, seed, epoch)


def test_shuffle_spreads_rows_evenly() -> None:
    """Each row lands in each tenth of the epoch about equally often over many epochs."""
    n, epochs = 100, 400
    hits = np.zeros((n, 10))
    for e in range(epochs):
        hits[epoch_order(n, 9, e), np.arange(n) // 10] += 1
    assert abs(hits.mean() - epochs / 10) < 1e-9
    assert hits.std() < 2 * np.sqrt(epochs / 10)  # binomial spread is ~sqrt(40) = 6.3


def test_a_step_builds_nothing_of_the_split_size() -> None:
    """10^12 rows: a global batch is still computed from its positions alone (fast, small)."""
    batch = global_batch_indices(123_456_789, 10**12, 64, seed=1)
    assert len(set(batch.tolist())) == 64 and batch.min() >= 0 and batch.max() < 10**12


def test_old_manifest_version_says_to_prepare_again(tmp_path: Path) -> None:
    manifest = {"version": 2, "splits": {"train": {"rows": 4, "files": ["train/part.parquet"]}}}
    with pytest.raises(StaleDataError, match="ift prepare"):
        load_split(str(tmp_path), manifest, "train")


# --- collation --------------------------------------------------------------------------------

PACKED = {
    "input_ids": [1, 5, 6, 2, 1, 7, 2],
    "labels": [IGNORE, IGNORE, 6, 2, IGNORE, 7, 2],
    "seq_lens": [4, 3],
}
SHORT = {"input_ids": [1, 8, 9], "labels": [IGNORE, 8, 9], "seq_lens": [3]}


def test_collate_packed_row_and_padding() -> None:
    b = tbatch.collate(split_of([PACKED, SHORT]).rows([0, 1]), 0, "padded")
    assert b["input_ids"].tolist() == [[1, 5, 6, 2, 1, 7, 2], [1, 8, 9, 0, 0, 0, 0]]
    assert b["labels"].tolist() == [
        [IGNORE, IGNORE, 6, 2, IGNORE, 7, 2],
        [IGNORE, 8, 9, IGNORE, IGNORE, IGNORE, IGNORE],
    ]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2], [0, 1, 2, 0, 1, 2, 3]]
    assert all(t.dtype == torch.long for t in b.values())


def test_collate_follows_index_order() -> None:
    b = tbatch.collate(split_of([PACKED, SHORT]).rows(np.array([1])), 0, "padded")
    assert b["input_ids"].tolist() == [[1, 8, 9]]


def test_loss_tokens_counts_shifted_completion_labels() -> None:
    assert split_of([PACKED, SHORT]).loss_tokens([0, 1]) == 4 + 2


# --- packing never lets attention cross examples (real model) ---------------------------------


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(
        MODEL_DIR, attn_implementation="sdpa", dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module")
def examples() -> list[tuple[list[int], list[int]]]:
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    pairs = [
        ("Once upon a time there was a cat.", " The cat liked to play in the sun."),
        ("Tom had a red ball.", " He gave it to his friend Sam, who smiled."),
    ]
    return [
        build_example(
            [tok(p, add_special_tokens=False).input_ids],
            [tok(c, add_special_tokens=False).input_ids],
            bos_id=tok.bos_token_id,
            eos_id=tok.eos_token_id,
            max_seq_len=128,
        )
        for p, c in pairs
    ]


def summed_loss(model: torch.nn.Module, split: Split, pad_id: int = 0) -> tuple[float, int]:
    """Loss as training computes it: position ids, no attention mask, no cache."""
    b = tbatch.collate(split.rows(range(len(split))), pad_id, "padded")
    with torch.no_grad():
        logits = model(
            input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False
        ).logits
    loss, count, _ = tloss.naive_loss_sum(logits, b["labels"])
    return loss.item(), int(count)


def test_packed_loss_equals_separate_losses(model, examples) -> None:
    packed = pack_rows(examples, capacity=128)
    assert len(packed) == 1 and len(packed[0]["seq_lens"]) == 2
    together, n_together = summed_loss(model, split_of(packed))
    apart = [summed_loss(model, split_of(pack_rows([ex], capacity=128))) for ex in examples]
    assert n_together == sum(n for _, n in apart) > 0
    assert together == pytest.approx(sum(loss for loss, _ in apart), rel=1e-4)


def test_packed_loss_is_sensitive_to_cross_attention(model, examples) -> None:
    """Control: with positions that do not restart, the second example sees the first, and the
    loss changes, so the equality above is not vacuous."""
    row = pack_rows(examples, capacity=128)[0]
    joined = split_of([{**row, "seq_lens": [sum(row["seq_lens"])]}])
    crossed, _ = summed_loss(model, joined)
    separate, _ = summed_loss(model, split_of(pack_rows(examples, capacity=128)))
    assert abs(crossed - separate) > 1e-3 * abs(separate)


def test_padding_does_not_change_the_loss(model, examples) -> None:
    rows = pack_rows([examples[0]], capacity=128) + pack_rows(examples, capacity=128)
    both, _ = summed_loss(model, split_of(rows))
    alone = summed_loss(model, split_of(rows[:1]))[0] + summed_loss(model, split_of(rows[1:]))[0]
    assert both == pytest.approx(alone, rel=1e-4)

"""Tests for training.batch: both layouts keep examples apart under the attention implementations
ift accepts, and the padded layout is exactly what training has always handed the model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers.modeling_flash_attention_utils as fa_utils
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from training import batch as tbatch
from training import loss as tloss

MODEL_DIR = Path(__file__).resolve().parents[1] / "assets" / "models" / "stories260K"
IGNORE = -100


pytestmark = pytest.mark.usefixtures("one_thread")


def make_rows(parts: list[list[tuple[int, int]]], seed: int = 0) -> list[tbatch.Row]:
    """Rows of packed examples, each (prompt length, completion length): ids from the
    stories260K vocabulary, labels -100 on the prompt (its first token included)."""
    rng = np.random.default_rng(seed)
    rows = []
    for row in parts:
        ids, labels = [], []
        for prompt, completion in row:
            x = rng.integers(3, 512, prompt + completion)
            ids.append(x)
            labels.append(np.concatenate([np.full(prompt, IGNORE), x[prompt:]]))
        lens = np.array([p + c for p, c in row])
        rows.append((np.concatenate(ids), np.concatenate(labels), lens))
    return rows


# Three rows of different lengths, two of them packed: a micro-batch with several rows.
PARTS = [[(5, 9), (4, 7)], [(3, 10)], [(6, 6), (2, 8), (4, 4)]]


# --- the tensors ------------------------------------------------------------------------------


def test_positions_restart_per_example() -> None:
    assert tbatch.positions(np.array([3, 2])).tolist() == [0, 1, 2, 0, 1]
    assert tbatch.positions(np.array([1, 1])).tolist() == [0, 0]
    assert tbatch.positions(np.array([], dtype=np.int64)).tolist() == []


def todays_padded(rows: list[tbatch.Row], pad_id: int) -> dict[str, torch.Tensor]:
    """What training handed the model before the layouts (rebuilt independently): rows
    right-padded to the longest with `pad_id` / -100, positions restarting per example and
    counting on from 0 over the padding."""
    pad = torch.nn.utils.rnn.pad_sequence
    pos = [
        torch.cat([torch.arange(int(n)) for n in lens] or [torch.zeros(0, dtype=torch.long)])
        for _, _, lens in rows
    ]
    width = max(len(ids) for ids, _, _ in rows)
    pos = [torch.cat([p, torch.arange(width - len(p))]) for p in pos]
    return {
        "input_ids": pad(
            [torch.tensor(ids.tolist()) for ids, _, _ in rows], True, padding_value=pad_id
        ),
        "labels": pad([torch.tensor(lab.tolist()) for _, lab, _ in rows], True, IGNORE),
        "position_ids": torch.stack(pos),
    }


row_parts = st.lists(
    st.lists(st.tuples(st.integers(1, 6), st.integers(0, 6)), min_size=1, max_size=4),
    min_size=1,
    max_size=5,
)


@settings(max_examples=60, deadline=None)
@given(parts=row_parts, pad_id=st.integers(0, 9), seed=st.integers(0, 99))
def test_padded_layout_is_todays_batch(parts, pad_id, seed) -> None:
    rows = make_rows(parts, seed)
    got = tbatch.collate(rows, pad_id, "padded")
    want = todays_padded(rows, pad_id)
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert isinstance(got[key], torch.Tensor) and got[key].dtype == torch.long
        assert torch.equal(got[key], value), key


@settings(max_examples=60, deadline=None)
@given(parts=row_parts, seed=st.integers(0, 99))
def test_padding_free_layout_flattens_every_row(parts, seed) -> None:
    rows = make_rows(parts, seed)
    b = tbatch.collate(rows, 0, "padding_free")
    lens = [int(n) for _, _, ls in rows for n in ls]
    starts = np.cumsum([0] + lens)
    assert b["input_ids"].tolist() == [np.concatenate([r[0] for r in rows]).tolist()]
    assert b["position_ids"].tolist() == [[i for n in lens for i in range(n)]]
    assert b["cu_seq_lens_q"].tolist() == b["cu_seq_lens_k"].tolist() == starts.tolist()
    assert b["cu_seq_lens_q"].dtype == torch.int32
    assert b["max_length_q"] == b["max_length_k"] == max(lens)
    # Same labels, and no example's first token is a target (prompts are masked already).
    assert b["labels"].tolist() == [np.concatenate([r[1] for r in rows]).tolist()]
    assert all(b["labels"][0, s] == IGNORE for s in starts[:-1])


def test_padding_free_masks_an_unmasked_first_token() -> None:
    """Even rows whose next example starts with a label never train across the boundary."""
    rows = [(np.array([1, 2, 3, 4]), np.array([1, 2, 3, 4]), np.array([2, 2]))]
    # (The label of the very first token is never a target: nothing precedes it.)
    assert tbatch.collate(rows, 0, "padding_free")["labels"].tolist() == [[1, 2, IGNORE, 4]]


def test_layout_per_attention_implementation() -> None:
    assert tbatch.layout_for("flash_attention_2") == "padding_free"
    assert tbatch.layout_for("flash_attention_3") == "padding_free"
    assert tbatch.layout_for("sdpa") == "padded"
    assert tbatch.layout_for("eager") == "padded"
    with pytest.raises(ValueError, match="flex_attention"):
        tbatch.layout_for("flex_attention")
    with pytest.raises(ValueError, match="unknown batch layout"):
        tbatch.collate(make_rows(PARTS), 0, "ragged")  # type: ignore[arg-type]


def test_to_device_on_cpu_copies_nothing() -> None:
    b = tbatch.collate(make_rows(PARTS), 0, "padding_free")
    moved = tbatch.to_device(b, "cpu")
    assert all(moved[k] is v for k, v in b.items())


# --- flash_attention_2: transformers' own packed-sequence handling ----------------------------


def test_flash_attention_2_sees_every_boundary_of_a_multi_row_micro_batch() -> None:
    """What `collate` hands the model under flash_attention_2 is one row: transformers'
    detection (`_is_packed_sequence`) and its position-id path agree with the explicit
    `cu_seq_lens`. The padded layout of the same rows is what transformers misses."""
    rows = make_rows(PARTS)
    b = tbatch.collate(rows, 0, tbatch.layout_for("flash_attention_2"))
    boundaries = np.cumsum([0] + [int(n) for _, _, ls in rows for n in ls]).tolist()
    assert b["cu_seq_lens_q"].tolist() == boundaries
    assert bool(fa_utils._is_packed_sequence(b["position_ids"], b["input_ids"].shape[0]))
    (cu_q, cu_k), (max_q, _) = fa_utils.prepare_fa_kwargs_from_position_ids(b["position_ids"])
    assert cu_q.tolist() == cu_k.tolist() == boundaries
    assert int(max_q) == b["max_length_q"]
    padded = tbatch.collate(rows, 0, "padded")
    assert not fa_utils._is_packed_sequence(padded["position_ids"], len(rows))


def varlen_reference(calls: list):
    """Flash-attention's two entry points in plain torch (CPU), recording how they are called."""

    def sdpa(q, k, v, scale):  # (tokens, heads, dim) -> (tokens, heads, dim)
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
            is_causal=True, scale=scale, enable_gqa=True,
        )  # fmt: skip
        return out.transpose(0, 1)

    def dense(q, k, v, dropout_p=0.0, softmax_scale=None, causal=True):
        calls.append(("dense", None))
        return torch.stack([sdpa(q[i], k[i], v[i], softmax_scale) for i in range(len(q))])

    def varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
               dropout_p=0.0, softmax_scale=None, causal=True):  # fmt: skip
        calls.append(("varlen", cu_seqlens_q.tolist()))
        assert torch.equal(cu_seqlens_q, cu_seqlens_k) and causal
        cu = cu_seqlens_q.tolist()
        spans = list(zip(cu[:-1], cu[1:], strict=True))
        assert max_seqlen_q == max(e - s for s, e in spans)
        return torch.cat([sdpa(q[s:e], k[s:e], v[s:e], softmax_scale) for s, e in spans])

    return dense, varlen


@pytest.fixture
def model() -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(
        MODEL_DIR, attn_implementation="sdpa", dtype=torch.float64
    )


def summed_loss(model: torch.nn.Module, b: tbatch.Batch) -> torch.Tensor:
    inputs = dict(b)
    labels = inputs.pop("labels")
    return model(**inputs, loss_labels=labels, use_cache=False)["loss"]


def test_flash_attention_2_model_keeps_examples_apart(model, monkeypatch) -> None:
    """The whole model under transformers' flash_attention_2 dispatch (flash-attn's kernels
    replaced by a plain-torch reference, so it runs on CPU): the padding-free batch of a
    several-row micro-batch takes the varlen kernel with every example boundary in every layer,
    and its loss is the sdpa loss of the padded layout. Control: the padded layout takes the
    dense kernel, attends across packed examples, and the loss moves."""
    calls: list = []
    dense, varlen = varlen_reference(calls)
    monkeypatch.setattr(
        fa_utils,
        "_lazy_imports",
        lambda *a, **k: (dense, varlen, None, fa_utils._pad_input, fa_utils._unpad_input),
    )
    monkeypatch.setattr(fa_utils, "_loaded_implementation", None)
    rows = make_rows(PARTS)
    tloss.install(model, "chunked", max_tokens=256)
    with torch.no_grad():
        reference = summed_loss(model, tbatch.collate(rows, 0, "padded"))  # sdpa
        monkeypatch.setattr(model.config, "_attn_implementation", "flash_attention_2")
        free = summed_loss(model, tbatch.collate(rows, 0, tbatch.layout_for("flash_attention_2")))
        boundaries = np.cumsum([0] + [int(n) for _, _, ls in rows for n in ls]).tolist()
        assert calls == [("varlen", boundaries)] * model.config.num_hidden_layers
        calls.clear()
        crossed = summed_loss(model, tbatch.collate(rows, 0, "padded"))
        assert {kind for kind, _ in calls} == {"dense"}
    torch.testing.assert_close(free, reference, rtol=1e-9, atol=1e-9)
    assert abs(crossed - reference) > 1e-3 * abs(reference)


# --- sdpa: both layouts train the same ---------------------------------------------------------


def test_sdpa_padding_free_and_padded_train_the_same(model) -> None:
    """Three optimizer steps of the same micro-batches in each layout (float64): the losses
    agree step by step, and they move, so the steps do train."""
    import copy

    micro_batches = [make_rows(PARTS, seed) for seed in range(3)]
    losses = {}
    for layout in ("padded", "padding_free"):
        m = copy.deepcopy(model).train()
        tloss.install(m, "chunked", max_tokens=256)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        losses[layout] = []
        for rows in micro_batches * 2:
            loss = summed_loss(m, tbatch.collate(rows, 0, layout))
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[layout].append(loss.item())
    torch.testing.assert_close(losses["padding_free"], losses["padded"], rtol=1e-9, atol=1e-9)
    first, again = losses["padded"][:3], losses["padded"][3:]
    assert all(b < a - 1e-3 for a, b in zip(first, again, strict=True))

"""Tests for training.loss: the chunked loss equals the full-logits one, value and gradients."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from launcher.config import ConfigError, from_dict
from training import batch as tbatch
from training import loss as tloss

IGNORE = -100
VOCAB = 32000


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """A random float64 Llama, 32k vocabulary, untied head (its gradient is its own)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).double()


def packed_rows(rng: np.random.Generator) -> list[tbatch.Row]:
    """Three rows: two packed examples with a masked prompt each, one example, and one row whose
    labels are all masked (a prompt only)."""

    def example(prompt: int, completion: int) -> tuple[np.ndarray, np.ndarray]:
        ids = rng.integers(3, VOCAB, prompt + completion)
        labels = np.concatenate([np.full(prompt, IGNORE), ids[prompt:]])
        return ids, labels

    rows = []
    for parts in ([(5, 9), (3, 11)], [(4, 20)], [(12, 0)]):
        exs = [example(p, c) for p, c in parts]
        rows.append(
            (
                np.concatenate([e[0] for e in exs]),
                np.concatenate([e[1] for e in exs]),
                np.array([len(e[0]) for e in exs]),
            )
        )
    return rows


def loss_and_grads(
    model: torch.nn.Module, batch: tbatch.Batch, impl: str, max_tokens: int, accuracy: bool = False
) -> tuple[dict, dict[str, torch.Tensor]]:
    tloss.install(model, impl, max_tokens=max_tokens)
    model.zero_grad()
    inputs = dict(batch)
    labels = inputs.pop("labels")
    out = model(**inputs, loss_labels=labels, loss_accuracy=accuracy, use_cache=False)
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def assert_same(a: tuple[dict, dict], b: tuple[dict, dict]) -> None:
    (out_a, grads_a), (out_b, grads_b) = a, b
    torch.testing.assert_close(out_a["loss"], out_b["loss"], rtol=1e-6, atol=1e-9)
    assert int(out_a["loss_tokens"]) == int(out_b["loss_tokens"])
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-6, atol=1e-9, msg=name)


@pytest.mark.parametrize("layout", ["padded", "padding_free"])
@pytest.mark.parametrize("max_tokens", [1, 4 * tloss.CHUNK_TOKENS, 9 * tloss.CHUNK_TOKENS])
def test_chunked_equals_naive_loss_and_gradients(layout: str, max_tokens: int) -> None:
    """1 chunk; 4 chunks of 10 of the 40 loss tokens (boundaries inside examples); 9 chunks,
    the last of them empty."""
    model = tiny_llama()
    batch = tbatch.collate(packed_rows(np.random.default_rng(0)), 0, layout)
    naive = loss_and_grads(model, batch, "naive", max_tokens)
    chunked = loss_and_grads(model, batch, "chunked", max_tokens)
    assert int(naive[0]["loss_tokens"]) == 9 + 11 + 20 == 40
    assert naive[0]["loss"].item() > 1.0  # a random model: far from zero
    assert "lm_head.weight" in chunked[1] and "model.embed_tokens.weight" in chunked[1]
    assert_same(naive, chunked)


def test_all_masked_batch_gives_zero_loss_and_gradients() -> None:
    """Every rank must backpropagate even when its micro-batch has no loss token."""
    model = tiny_llama()
    rows = [(np.arange(3, 20), np.full(17, IGNORE), np.array([17]))]
    batch = tbatch.collate(rows, 0, "padded")
    naive = loss_and_grads(model, batch, "naive", 64)
    chunked = loss_and_grads(model, batch, "chunked", 64)
    assert chunked[0]["loss"].item() == 0.0 and chunked[0]["loss"].requires_grad
    assert int(chunked[0]["loss_tokens"]) == 0
    assert_same(naive, chunked)


def test_head_calls_do_not_depend_on_the_batch() -> None:
    """ZeRO-3 gathers the head's weight on every call, collectively: every rank calls it the
    same number of times, whatever its micro-batch holds (and the backward recomputes each)."""
    calls = []
    head = torch.nn.Linear(4, 11, dtype=torch.float64)
    head.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    for n_loss in (0, 3, 40):
        calls.clear()
        hidden = torch.randn(1, 41, 4, dtype=torch.float64, requires_grad=True)
        labels = torch.full((1, 41), IGNORE)
        labels[0, 1 : n_loss + 1] = 5
        loss, count, _ = tloss.chunked_loss_sum(hidden, labels, head, chunks=3)
        loss.backward()
        assert int(count) == n_loss
        assert len(calls) == 6  # 3 chunks forward, 3 recomputed in the backward
        assert sum(calls) == 2 * n_loss


def test_accuracy_only_when_asked() -> None:
    model = tiny_llama()
    batch = tbatch.collate(packed_rows(np.random.default_rng(1)), 0, "padded")
    naive = loss_and_grads(model, batch, "naive", 3 * tloss.CHUNK_TOKENS, accuracy=True)[0]
    chunked = loss_and_grads(model, batch, "chunked", 3 * tloss.CHUNK_TOKENS, accuracy=True)[0]
    assert int(chunked["correct"]) == int(naive["correct"])
    assert loss_and_grads(model, batch, "chunked", 64)[0]["correct"] is None


def test_naive_loss_matches_manual_cross_entropy() -> None:
    logits = torch.tensor([[[2.0, 0.5, -1.0], [0.0, 1.0, 3.0], [1.5, 1.0, 0.5], [9.0, 0.0, 0.0]]])
    labels = torch.tensor([[IGNORE, 2, IGNORE, 0]])

    def nll(row: list[float], target: int) -> float:
        return math.log(sum(math.exp(x) for x in row)) - row[target]

    # Position t predicts label t+1: positions 0 -> 2 and 2 -> 0 count; position 1 is masked.
    expected = nll([2.0, 0.5, -1.0], 2) + nll([1.5, 1.0, 0.5], 0)
    loss, count, correct = tloss.naive_loss_sum(logits, labels, accuracy=True)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert int(count) == 2
    assert correct is not None and int(correct) == 1  # position 2 predicts 0 right, 0 does not
    # With an identity head the hidden states are the logits.
    chunked, n, right = tloss.chunked_loss_sum(logits, labels, torch.nn.Identity(), 2, True)
    assert chunked.item() == pytest.approx(expected, rel=1e-6)
    assert int(n) == 2 and right is not None and int(right) == 1


def test_chunked_through_peft_lora() -> None:
    """Under a LoRA wrapper the adapters stay in the path: the same loss and adapter grads."""
    from peft import LoraConfig, get_peft_model

    batch = tbatch.collate(packed_rows(np.random.default_rng(2)), 0, "padded")
    results = []
    for impl in ("naive", "chunked"):
        cfg = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        model = get_peft_model(tiny_llama(), cfg).double()
        results.append(loss_and_grads(model, batch, impl, 2 * tloss.CHUNK_TOKENS))
    assert results[0][1] and all("lora_" in n for n in results[0][1])
    assert_same(*results)


def test_liger_is_refused_where_it_cannot_run() -> None:
    if torch.cuda.is_available() and tloss.liger_available():
        pytest.skip("liger can run here")
    with pytest.raises(ValueError, match="train.loss: liger"):
        tloss.install(tiny_llama(), "liger", max_tokens=64)
    with pytest.raises(ValueError, match="unknown loss"):
        tloss.check("fused")


def config(**train: object) -> dict:
    root = Path(__file__).resolve().parents[2]
    return {
        "model": {"name_or_path": str(root / "tests/assets/models/stories260K")},
        "data": {
            "sources": [
                {"path": str(root / "tests/assets/quickstart/sst2_train.tsv"), "template": "sst2"}
            ]
        },
        "train": train,
    }


def test_config_refuses_liger_without_gpu_or_under_zero3() -> None:
    assert from_dict(config()).train.loss == "chunked"
    with pytest.raises(ConfigError, match=r"train\.loss: liger runs on CUDA only"):
        from_dict(config(loss="liger"))
    with pytest.raises(ConfigError, match=r"train\.loss: liger cannot read ZeRO-3"):
        from_dict(config(loss="liger", use_gpu=True, zero_stage=3))
    assert from_dict(config(loss="liger", use_gpu=True, zero_stage=2)).train.loss == "liger"

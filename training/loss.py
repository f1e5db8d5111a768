"""Summed next-token cross-entropy over completion tokens, without a full fp32 logits copy.

    ift train CONFIG train.loss=chunked     # default; or liger (CUDA + liger-kernel), or naive

Three implementations of one quantity (the loss summed over every token whose label is not
-100, after the shift: position t predicts label t + 1):

- "naive": the model's logits for every position, upcast to fp32 whole. At vocabulary 128k x
  4 x 2048 tokens that is ~4 GB, plus its gradient.
- "chunked" (default): only the positions that carry a label go through the output head, in
  chunks of at most `CHUNK_TOKENS` tokens; each chunk's logits are upcast to fp32 inside the
  chunk and recomputed in the backward (activation checkpointing), so no more than one chunk of
  logits lives at once and the full logits tensor is never built. The number of chunks follows
  from the largest micro-batch, not from the batch at hand (see `chunked_loss_sum`).
- "liger": liger-kernel's fused linear cross-entropy (CUDA only; reads the head's weight, so
  not under ZeRO-3, which keeps parameters partitioned outside their module's forward).

`install(model, impl, max_tokens)` makes the causal LM's own forward return these sums when
called with `loss_labels=`. The loss has to come out of the model's forward: DeepSpeed starts
its backward bookkeeping (ZeRO's gradient reduction) from hooks on what `engine(...)` returns,
and ZeRO-3 gathers a module's parameters only inside that module's forward, so the head is
called as a module, chunk by chunk, within the engine's forward.
"""

from __future__ import annotations

import importlib.util
import types
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

IGNORE = -100
CHUNK_TOKENS = 1024
IMPLEMENTATIONS = ("chunked", "liger", "naive")
_INSTALLED = "_ift_loss"


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def naive_loss_sum(
    logits: torch.Tensor, labels: torch.Tensor, accuracy: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Loss sum, loss-token count and (when asked) correct argmaxes from full logits (B, T, V).

    The label of the first token of a packed example is always -100 (prompt or BOS), so the
    shift never trains one example to predict the next one.
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE
    loss = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )
    correct = ((shift_logits.argmax(-1) == shift_labels) & mask).sum() if accuracy else None
    return loss, mask.sum(), correct


def chunked_loss_sum(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    chunks: int = 1,
    accuracy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`naive_loss_sum` from the last hidden states (B, T, H) and the output head.

    Only the positions that carry a label go through the head, split into `chunks` calls of
    about equal size.

    Args:
        hidden: the decoder's final hidden states.
        labels: (B, T), -100 where no loss is taken.
        head: hidden (N, H) -> logits (N, V): the model's output head module, so ZeRO-3 gathers
            its weight on each call.
        chunks: how many times the head is called (empty chunks included). It must not depend
            on the batch: under ZeRO-3 every call is a collective gather that all ranks make
            together. The peak holds one chunk's logits, in fp32.
        accuracy: also count correct argmaxes (another head call per chunk, without gradient).
    """
    targets = labels[:, 1:].reshape(-1)
    keep = (targets != IGNORE).nonzero().squeeze(1)  # prompt positions never reach the head
    states = hidden[:, :-1, :].reshape(-1, hidden.size(-1)).index_select(0, keep)
    targets = targets.index_select(0, keep)
    recompute = torch.is_grad_enabled() and states.requires_grad
    size = -(-len(keep) // chunks)
    losses = []
    correct = torch.zeros((), dtype=torch.long, device=hidden.device) if accuracy else None
    for c in range(chunks):
        h, y = states[c * size : (c + 1) * size], targets[c * size : (c + 1) * size]
        if recompute:  # the backward keeps the chunk's inputs, not its fp32 logits
            losses.append(checkpoint(_chunk_loss, head, h, y, use_reentrant=False))
        else:
            losses.append(_chunk_loss(head, h, y))
        if correct is not None:
            with torch.no_grad():
                correct += (head(h).argmax(-1) == y).sum()
    return torch.stack(losses).sum(), torch.tensor(len(keep), device=hidden.device), correct


def chunks_for(max_tokens: int, chunk_tokens: int = CHUNK_TOKENS) -> int:
    """Head calls per micro-batch of at most `max_tokens` tokens: chunks of <= `chunk_tokens`."""
    return max(1, -(-max_tokens // chunk_tokens))


def _chunk_loss(
    head: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(head(h).float(), y, reduction="sum")


def liger_loss_sum(
    hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Linear
) -> tuple[torch.Tensor, torch.Tensor, None]:
    """`naive_loss_sum` through liger-kernel's fused linear cross-entropy (CUDA only)."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    targets = labels[:, 1:].reshape(-1)
    states = hidden[:, :-1, :].reshape(-1, hidden.size(-1))
    fused = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="sum")
    loss = fused(head.weight, states, targets, head.bias)
    return loss, (targets != IGNORE).sum(), None


def check(impl: str) -> None:
    """Raises ValueError (naming `train.loss`) when `impl` cannot run in this process."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"train.loss: unknown loss {impl!r}; use one of {IMPLEMENTATIONS}")
    if impl == "liger":
        if not torch.cuda.is_available():
            raise ValueError("train.loss: liger needs a CUDA device; use chunked")
        if not liger_available():
            raise ValueError(
                "train.loss: liger needs the liger-kernel package on every GPU worker "
                "(pip install liger-kernel); use chunked"
            )


def install(model: Any, impl: str, max_tokens: int) -> None:
    """Let `model(..., loss_labels=labels, loss_accuracy=bool)` return the loss sums.

    Replaces `forward` on the causal-LM instance (under a peft wrapper, the wrapped model, so
    LoRA layers stay in the path). Called with `loss_labels`, it returns
    `{"loss": sum, "loss_tokens": count, "correct": count or None}`; without, the original
    forward runs unchanged (generation, saving and the Hugging Face loss are untouched).
    Calling it again switches the implementation.

    Args:
        model: a causal LM (Hugging Face, or peft-wrapped), before or after DeepSpeed wraps it.
        impl: one of `IMPLEMENTATIONS`.
        max_tokens: the most tokens a micro-batch holds; fixes the head calls per micro-batch.
    """
    check(impl)
    chunks = chunks_for(max_tokens)
    causal: Any = model.get_base_model() if hasattr(model, "get_base_model") else model
    original = getattr(causal, _INSTALLED, None) or causal.forward
    setattr(causal, _INSTALLED, original)

    def forward(self: Any, *args: Any, loss_labels: Any = None, **kwargs: Any) -> Any:
        if loss_labels is None:
            return original(*args, **kwargs)
        accuracy = bool(kwargs.pop("loss_accuracy", False))
        if impl == "naive":
            logits = original(*args, **kwargs).logits
            loss, count, correct = naive_loss_sum(logits, loss_labels, accuracy)
        else:
            for unused in ("labels", "output_attentions", "output_hidden_states", "return_dict"):
                kwargs.pop(unused, None)  # peft passes them through
            hidden = self.get_decoder()(*args, **kwargs).last_hidden_state
            head = self.get_output_embeddings()
            if impl == "liger" and not accuracy:
                loss, count, correct = liger_loss_sum(hidden, loss_labels, head)
            else:  # liger returns no argmax: the steps that log accuracy take the chunked path
                loss, count, correct = chunked_loss_sum(hidden, loss_labels, head, chunks, accuracy)
        return {"loss": loss, "loss_tokens": count, "correct": correct}

    causal.forward = types.MethodType(forward, causal)

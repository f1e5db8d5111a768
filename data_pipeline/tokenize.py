"""Assemble token ids and loss labels from tokenized (prompt, completion) turns.

The tokenizer itself runs in the prepare job (batched, loaded once per actor); this module
only concatenates ids, so that masking and truncation are pure and exactly testable:

    tokens = [bos] + p1 + c1 + p2 + c2 + ... + [eos]
    labels = -100 on bos and every prompt token, the token id on completion tokens and on eos
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np

IGNORE_INDEX = -100
TRUNCATION = ("drop", "left")


class LengthError(ValueError):
    """The example does not fit in ``max_seq_len`` under the chosen truncation policy."""


def _check_turns(prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> None:
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(
            f"{len(prompt_ids)} prompts but {len(completion_ids)} completions: turns must pair up"
        )
    if not completion_ids:
        raise ValueError("an example needs at least one (prompt, completion) turn")


def build_example(
    prompt_ids: list[list[int]],
    completion_ids: list[list[int]],
    *,
    bos_id: int | None,
    eos_id: int,
    max_seq_len: int,
    truncation: str = "drop",
) -> tuple[list[int], list[int]]:
    """Concatenate turns into ``(input_ids, labels)`` with every prompt token masked.

    Args:
        prompt_ids: Token ids of each turn's prompt.
        completion_ids: Token ids of each turn's completion (same number of turns).
        bos_id: Prepended when not None (masked: nothing predicts it).
        eos_id: Appended after the last completion and learned, so the model learns to stop.
        max_seq_len: The longest allowed example, special tokens included.
        truncation: ``"drop"``: too long is a ``LengthError``. ``"left"``: cut prompt tokens
            from the left, first prompt first, keeping every completion token.

    Returns:
        ``(input_ids, labels)`` of equal length; ``labels`` is ``-100`` on bos and prompts.

    Raises:
        LengthError: If the example is too long under ``"drop"``, or its completions plus the
            special tokens alone exceed ``max_seq_len`` under ``"left"``.
        ValueError: For an unknown truncation policy or unpaired turns.
    """
    if truncation not in TRUNCATION:
        raise ValueError(f"unknown truncation {truncation!r}; expected one of {list(TRUNCATION)}")
    _check_turns(prompt_ids, completion_ids)
    special = 1 + (bos_id is not None)
    completion_total = sum(len(c) for c in completion_ids)
    total = special + completion_total + sum(len(p) for p in prompt_ids)
    prompts = [list(p) for p in prompt_ids]
    if total > max_seq_len:
        if truncation == "drop":
            raise LengthError(f"{total} tokens > max_seq_len {max_seq_len}")
        if special + completion_total > max_seq_len:
            raise LengthError(
                f"{total} tokens > max_seq_len {max_seq_len}, and the completions alone take "
                f"{special + completion_total} with special tokens, so left truncation cannot help"
            )
        excess = total - max_seq_len
        for i, prompt in enumerate(prompts):
            cut = min(excess, len(prompt))
            prompts[i] = prompt[cut:]
            excess -= cut
            if excess == 0:
                break
    input_ids: list[int] = []
    labels: list[int] = []
    if bos_id is not None:
        input_ids.append(bos_id)
        labels.append(IGNORE_INDEX)
    for prompt, completion in zip(prompts, completion_ids, strict=True):
        input_ids.extend(prompt)
        labels.extend([IGNORE_INDEX] * len(prompt))
        input_ids.extend(completion)
        labels.extend(completion)
    input_ids.append(eos_id)
    labels.append(eos_id)
    return input_ids, labels


@dataclass
class Batch:
    """Many examples built at once (`build_batch`): the rows of the examples in `kept`, in
    order, as flat int32 arrays cut by `offsets`."""

    input_ids: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray  # int64, len(kept) + 1
    loss_tokens: np.ndarray  # int32 per kept row: learned labels
    kept: np.ndarray  # int64 indices of the examples built
    errors: dict[int, LengthError]  # example index -> why it was rejected
    text_start: np.ndarray  # int64, n + 1: where each example's texts start in `ids`


def build_batch(
    ids: Sequence[list[int]],
    turns: Sequence[int],
    *,
    bos_id: int | None,
    eos_id: int,
    max_seq_len: int,
    truncation: str = "drop",
) -> Batch:
    """`build_example` for many examples at once, with NumPy instead of a Python loop.

    An example's texts are adjacent in `ids` (p1, c1, p2, c2, ...), so an example that fits is
    `[bos] + its tokens + [eos]` and its labels are the same with the prompt tokens masked:
    one gather for the whole batch. The few that do not fit go through `build_example` itself
    (which truncates or rejects them), so the result is the same as calling it per example.

    Args:
        ids: Token ids of every text, example after example, prompt and completion alternating.
        turns: Number of (prompt, completion) turns of each example (at least 1).
        bos_id, eos_id, max_seq_len, truncation: As for `build_example`.

    Returns:
        A `Batch`; an example either is in `kept` or has its `LengthError` in `errors`.
    """
    if truncation not in TRUNCATION:
        raise ValueError(f"unknown truncation {truncation!r}; expected one of {list(TRUNCATION)}")
    n = len(turns)
    texts_per = 2 * np.asarray(turns, np.int64)
    if n and texts_per.min() < 2:
        raise ValueError("an example needs at least one (prompt, completion) turn")
    text_start = np.zeros(n + 1, np.int64)
    np.cumsum(texts_per, out=text_start[1:])
    if text_start[-1] != len(ids):
        raise ValueError(f"{len(ids)} texts but the turns need {text_start[-1]}")
    text_len = np.fromiter(map(len, ids), np.int64, count=len(ids))
    flat = np.fromiter(chain.from_iterable(ids), np.int32, count=int(text_len.sum()))
    tok_start = np.zeros(len(ids) + 1, np.int64)
    np.cumsum(text_len, out=tok_start[1:])
    special = 1 + (bos_id is not None)
    ex_tokens = tok_start[text_start[1:]] - tok_start[text_start[:-1]]
    fits = ex_tokens + special <= max_seq_len

    # The rest, one by one: truncated or rejected exactly as build_example does.
    errors: dict[int, LengthError] = {}
    built: dict[int, tuple[list[int], list[int]]] = {}
    for i in np.flatnonzero(~fits).tolist():
        texts = ids[int(text_start[i]) : int(text_start[i + 1])]
        try:
            built[i] = build_example(
                list(texts[0::2]),
                list(texts[1::2]),
                bos_id=bos_id,
                eos_id=eos_id,
                max_seq_len=max_seq_len,
                truncation=truncation,
            )
        except LengthError as e:
            errors[i] = e
    ok = fits.copy()
    ok[list(built)] = True
    kept = np.flatnonzero(ok)
    row_len = ex_tokens[kept] + special
    for i, (row_ids, _) in built.items():
        row_len[np.searchsorted(kept, i)] = len(row_ids)
    offsets = np.zeros(len(kept) + 1, np.int64)
    np.cumsum(row_len, out=offsets[1:])
    input_ids = np.empty(int(offsets[-1]), np.int32)
    labels = np.empty_like(input_ids)

    # Fitting examples: token k of an example goes to position k of its row, after bos.
    fit_rows = np.flatnonzero(fits[kept])
    fit_ex = kept[fit_rows]
    count = ex_tokens[fit_ex]
    within = np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count)
    src = np.repeat(tok_start[text_start[fit_ex]], count) + within
    dst = np.repeat(offsets[fit_rows] + special - 1, count) + within
    input_ids[dst] = flat[src]
    is_prompt = np.repeat(np.arange(len(ids)) % 2 == 0, text_len)
    labels[dst] = np.where(is_prompt[src], IGNORE_INDEX, flat[src])
    row_start, row_end = offsets[fit_rows], offsets[fit_rows + 1]
    if bos_id is not None:
        input_ids[row_start] = bos_id
        labels[row_start] = IGNORE_INDEX
    input_ids[row_end - 1] = eos_id
    labels[row_end - 1] = eos_id
    for j in np.flatnonzero(~fits[kept]).tolist():
        row_ids, row_labels = built[int(kept[j])]
        input_ids[offsets[j] : offsets[j + 1]] = row_ids
        labels[offsets[j] : offsets[j + 1]] = row_labels
    learned = (labels != IGNORE_INDEX).astype(np.int64)
    loss_tokens = np.add.reduceat(learned, offsets[:-1]) if len(kept) else np.zeros(0, np.int64)
    return Batch(input_ids, labels, offsets, loss_tokens.astype(np.int32), kept, errors, text_start)


def prompt_ids_for_generation(
    prompt_ids: list[list[int]],
    completion_ids: list[list[int]],
    bos_id: int | None,
    max_prompt_len: int,
) -> list[int]:
    """The ids a model is given to generate the last completion (the test split).

    Args:
        prompt_ids: Token ids of each turn's prompt.
        completion_ids: Token ids of each turn's completion; the last one is left out.
        bos_id: Prepended when not None, and kept when the rest is truncated.
        max_prompt_len: Longest result; older tokens are cut from the left.

    Returns:
        ``[bos] + p1 + c1 + ... + pN`` with its oldest tokens cut to fit ``max_prompt_len``.

    Raises:
        ValueError: For unpaired turns, or a ``max_prompt_len`` with no room past bos.
    """
    _check_turns(prompt_ids, completion_ids)
    room = max_prompt_len - (bos_id is not None)
    if room < 1:
        raise ValueError(f"max_prompt_len {max_prompt_len} leaves no room for a prompt")
    context: list[int] = []
    for prompt, completion in zip(prompt_ids[:-1], completion_ids[:-1], strict=True):
        context.extend(prompt)
        context.extend(completion)
    context.extend(prompt_ids[-1])
    context = context[max(0, len(context) - room) :]
    return ([bos_id] if bos_id is not None else []) + context


def token_stats(
    lengths: Sequence[int] | np.ndarray, label_counts: Sequence[int] | np.ndarray
) -> dict[str, float | int]:
    """Summary statistics of tokenized examples for the manifest and the logs.

    Args:
        lengths: Tokens per example (a NumPy array is not copied into Python ints).
        label_counts: Learned (non ``-100``) labels per example.

    Returns:
        As ``token_stats_from_histogram``.

    Raises:
        ValueError: If the two differ in length.
    """
    if len(lengths) != len(label_counts):
        raise ValueError(f"{len(lengths)} lengths but {len(label_counts)} label counts")
    histogram = np.bincount(np.asarray(lengths, np.int64), minlength=1)
    return token_stats_from_histogram(histogram, int(np.asarray(label_counts, np.int64).sum()))


def token_stats_from_histogram(histogram: np.ndarray, loss_tokens: int) -> dict[str, float | int]:
    """``token_stats`` from the count of examples of each length, which a streaming caller
    accumulates in O(max length) memory however many examples there are.

    Args:
        histogram: ``histogram[n]`` examples have ``n`` tokens.
        loss_tokens: Learned (non ``-100``) labels over all examples.

    Returns:
        ``rows``, ``tokens``, ``loss_tokens``, ``mean_length``, ``p50_length``,
        ``p99_length`` (nearest-rank percentiles) and ``max_length``; zeros when empty.
    """
    rows = int(histogram.sum())
    if not rows:
        return {
            "rows": 0,
            "tokens": 0,
            "loss_tokens": 0,
            "mean_length": 0.0,
            "p50_length": 0,
            "p99_length": 0,
            "max_length": 0,
        }
    tokens = int((histogram * np.arange(len(histogram), dtype=np.int64)).sum())
    below = np.cumsum(histogram)

    def nearest_rank(q: float) -> int:
        # The value at sorted position ceil(q * rows) - 1: the first length whose running
        # count passes that position.
        return int(np.searchsorted(below, max(0, math.ceil(q * rows) - 1), side="right"))

    return {
        "rows": rows,
        "tokens": tokens,
        "loss_tokens": int(loss_tokens),
        "mean_length": tokens / rows,
        "p50_length": nearest_rank(0.50),
        "p99_length": nearest_rank(0.99),
        "max_length": int(np.flatnonzero(histogram)[-1]),
    }

"""Assemble token ids and loss labels from tokenized (prompt, completion) turns.

The tokenizer itself runs in the prepare job (batched, loaded once per actor); this module
only concatenates ids, so that masking and truncation are pure and exactly testable:

    tokens = [bos] + p1 + c1 + p2 + c2 + ... + [eos]
    labels = -100 on bos and every prompt token, the token id on completion tokens and on eos
"""

from __future__ import annotations

import math

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


def _nearest_rank(sorted_values: list[int], q: float) -> int:
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


def token_stats(lengths: list[int], label_counts: list[int]) -> dict[str, float | int]:
    """Summary statistics of tokenized examples for the manifest and the logs.

    Args:
        lengths: Tokens per example.
        label_counts: Learned (non ``-100``) labels per example.

    Returns:
        ``rows``, ``tokens``, ``loss_tokens``, ``mean_length``, ``p50_length``,
        ``p99_length`` (nearest-rank percentiles) and ``max_length``; zeros when empty.

    Raises:
        ValueError: If the two lists differ in length.
    """
    if len(lengths) != len(label_counts):
        raise ValueError(f"{len(lengths)} lengths but {len(label_counts)} label counts")
    if not lengths:
        return {
            "rows": 0,
            "tokens": 0,
            "loss_tokens": 0,
            "mean_length": 0.0,
            "p50_length": 0,
            "p99_length": 0,
            "max_length": 0,
        }
    ordered = sorted(lengths)
    tokens = sum(lengths)
    return {
        "rows": len(lengths),
        "tokens": tokens,
        "loss_tokens": sum(label_counts),
        "mean_length": tokens / len(lengths),
        "p50_length": _nearest_rank(ordered, 0.50),
        "p99_length": _nearest_rank(ordered, 0.99),
        "max_length": ordered[-1],
    }

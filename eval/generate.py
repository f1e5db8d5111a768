"""Batched generation with a Hugging Face causal LM: left padding, KV cache, stop strings.

No Ray here: `eval.evaluate.Generator` wraps these functions in a Ray Data actor.
"""

from __future__ import annotations

from typing import Any


def plan_batches(prompt_lens: list[int], batch_size: int) -> list[list[int]]:
    """Group example indices into batches of similar prompt length (less padding), in a fixed
    order that depends only on the lengths, so sampling seeds per batch are reproducible."""
    order = sorted(range(len(prompt_lens)), key=lambda i: (prompt_lens[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def cut_at_stop(text: str, stops: list[str]) -> str:
    """Text before the first stop string (searched after leading whitespace)."""
    body = text.lstrip()
    cut = len(body)
    for s in stops:
        if s:
            j = body.find(s)
            if j >= 0:
                cut = min(cut, j)
    return body[:cut].strip()


def generate(
    model: Any,
    tok: Any,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    num_beams: int = 1,
    stop: list[str] | None = None,
    seed: int = 0,
    pad_id: int | None = None,
) -> list[str]:
    """Generate continuations for token-id prompts; greedy unless `temperature > 0`.

    Returns the decoded new text of each prompt, cut at the first stop string.
    """
    import torch

    pad = (
        pad_id
        if pad_id is not None
        else (tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    )
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for j, p in enumerate(prompts):  # left padding: every prompt ends where generation starts
        ids[j, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[j, width - len(p) :] = 1
    device = next(model.parameters()).device
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "num_beams": num_beams,
        "pad_token_id": pad,
        "eos_token_id": tok.eos_token_id,
        "use_cache": True,
    }
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
    texts = tok.batch_decode(out[:, width:], skip_special_tokens=True)
    return [cut_at_stop(t, stop or []) for t in texts]

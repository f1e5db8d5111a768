"""Batched generation with a Hugging Face causal LM: left padding, KV cache, stop strings.

A row stops generating as soon as its text contains a stop string (`StopOnText`, the same
test `cut_at_stop` applies afterwards), so a batch ends when its slowest row is done, not after
`max_new_tokens`. No Ray here: `eval.evaluate.Generator` wraps these functions in a Ray Data
actor.
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


class StopOnText:
    """Stopping criterion: a row is done once its decoded new text holds a stop string.

    The test is `cut_at_stop`'s (after leading whitespace), so stopping early never changes a
    prediction: decoding more tokens only appends text after the stop string, which the cut
    removes anyway. Finished rows are padded by `generate` and draw no further tokens that
    matter; other rows' sampling is unchanged, since each step still samples the whole batch.

    Each step costs O(new text) per row, not O(all generated tokens): every row's text is
    detokenized incrementally (`_RowText`) and only its new tail, plus the last characters
    a stop string could begin in, is searched. A hit is confirmed on the full decode once,
    so a tokenizer whose incremental text drifts can only stop a row later, never earlier
    or differently; the final text is always the full decode cut by `cut_at_stop`.
    """

    def __init__(self, tok: Any, stops: list[str], prompt_width: int) -> None:
        self.tok = tok
        self.stops = [s for s in stops if s]
        self.width = prompt_width
        self.rows: list[_RowText] = []

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        if not self.rows:
            self.rows = [_RowText(self.tok, self.stops) for _ in range(input_ids.shape[0])]
        seen = len(self.rows[0].ids)
        new = input_ids[:, self.width + seen :].tolist()  # only the columns not seen yet
        done = [row.extend(ids) for row, ids in zip(self.rows, new, strict=True)]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class _RowText:
    """One row's generated text, detokenized incrementally, and whether it holds a stop.

    Incremental detokenization as in text-generation-inference and vLLM: the text of
    `ids[prefix:]` minus the text of `ids[prefix:read]` is what the newest tokens add, decoded
    with a little context so SentencePiece spaces and multi-byte characters come out right;
    an unfinished character (U+FFFD at the end) waits for its next token.
    """

    def __init__(self, tok: Any, stops: list[str]) -> None:
        self.tok = tok
        self.stops = stops
        self.longest = max((len(s) for s in stops), default=0)
        self.replacement = any("\ufffd" in s for s in stops)
        self.ids: list[int] = []
        self.text = ""
        self.lead = 0  # leading whitespace characters of `text` (cut_at_stop's lstrip)
        self.prefix = 0
        self.read = 0
        self.done = False

    def extend(self, new_ids: list[int]) -> bool:
        """Adds a step's tokens; True once the text (after leading whitespace) holds a stop."""
        self.ids.extend(new_ids)
        if self.done or not new_ids:
            return self.done
        if self.replacement:
            # U+FFFD counts differ between a window's decode and the full one (orphan bytes):
            # such stop strings get the full decode at every step.
            self.done = any(s in self._decode(self.ids).lstrip() for s in self.stops)
            return self.done
        before = self._decode(self.ids[self.prefix : self.read])
        now = self._decode(self.ids[self.prefix :])
        tail = now[len(before) :] if len(now) > len(before) else ""
        # The tail is searched even while it ends in an unfinished character (it is committed
        # only once complete), so a stop is seen at the same step as on the full decode.
        view = self.text + tail
        lead = self.lead + (_leading_space(tail) if self.lead == len(self.text) else 0)
        # A new match ends after the committed text; it starts after the leading whitespace.
        start = max(lead, len(self.text) - self.longest + 1)
        if any(view.find(s, start) >= 0 for s in self.stops):
            full = self._decode(self.ids)
            self.done = any(s in full.lstrip() for s in self.stops)
            if not self.done:  # the incremental text drifted from the full decode: resync
                self.text, self.lead = full, _leading_space(full)
                self.prefix = self.read = len(self.ids)
                return False
        if tail and not now.endswith("\ufffd"):
            self.text, self.lead = view, lead
            self.prefix, self.read = self.read, len(self.ids)
        return self.done

    def _decode(self, ids: list[int]) -> str:
        return str(self.tok.decode(ids, skip_special_tokens=True))


def _leading_space(text: str) -> int:
    return len(text) - len(text.lstrip())


def generate(model: Any, tok: Any, prompts: list[list[int]], **options: Any) -> list[str]:
    """The decoded new text of each prompt, cut at the first stop string: `generate_counted`
    (same keyword options) without the token counts."""
    return generate_counted(model, tok, prompts, **options)[0]


def generate_counted(
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
    stop_early: bool = True,
) -> tuple[list[str], list[int]]:
    """`generate`, also returning the number of tokens generated for each prompt.

    Args:
        model: A Hugging Face causal LM.
        tok: Its tokenizer.
        prompts: Token ids of each prompt (no padding).
        max_new_tokens: Most tokens generated per prompt.
        temperature: 0: greedy; else sampling at this temperature with `top_p`.
        top_p: Nucleus sampling mass.
        num_beams: Beam search width.
        stop: Stop strings: the text is cut at the first (after leading whitespace).
        seed: Torch seed set before generating (sampling).
        pad_id: Padding id (default: the tokenizer's pad, else EOS).
        stop_early: Stop a row once its text holds a stop string (not with beam search,
            where a beam finished early would change which beams win); False generates to
            EOS or `max_new_tokens` and only cuts afterwards.

    Returns:
        (texts, tokens generated per prompt before it stopped: EOS, stop string or limit).
    """
    import torch
    from transformers import StoppingCriteriaList

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
    if stop_early and num_beams == 1 and any(stop or []):
        kwargs["stopping_criteria"] = StoppingCriteriaList([StopOnText(tok, stop or [], width)])
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
    new = out[:, width:]
    texts = tok.batch_decode(new, skip_special_tokens=True)
    return [cut_at_stop(t, stop or []) for t in texts], _generated_lengths(new, pad, tok)


def _generated_lengths(new: Any, pad: int, tok: Any) -> list[int]:
    """Tokens each row generated: up to and including its EOS, else up to the padding that
    `generate` appends once a row is done, else the whole width."""
    ends = {int(pad)} | ({int(tok.eos_token_id)} if tok.eos_token_id is not None else set())
    lengths = []
    for row in new.tolist():
        n = len(row)
        for i, t in enumerate(row):
            if t in ends:
                n = i + (1 if t == tok.eos_token_id else 0)
                break
        lengths.append(n)
    return lengths

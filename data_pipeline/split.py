"""Deterministic train/validation/test assignment and duplicate keys.

A record's split depends only on a hash of its prompt text and the seed: never on file order,
sharding or the number of workers, and an identical prompt always lands in the same split, so
no test prompt is ever seen in training (even when two sources carry the same question).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping

SPLITS = ("train", "validation", "test")
# A split as one int8 in the prepare job's tables (its index in SPLITS).
SPLIT_CODES = {name: code for code, name in enumerate(SPLITS)}
Turns = list[tuple[str, str]]
_TOLERANCE = 1e-6


def _digest(parts: list[str]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        data = part.encode("utf-8")
        # Length-prefix each part so that ("ab", "c") and ("a", "bc") hash differently.
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest()


def record_key(prompt_turns: Turns) -> str:
    """The split key of a rendered example: a hash of its prompt texts only.

    Args:
        prompt_turns: The (prompt, completion) turns; completions are ignored.

    Returns:
        A blake2b hex digest.
    """
    return _digest(["prompt"] + [prompt for prompt, _ in prompt_turns])


def keys(turns: Turns) -> tuple[bytes, bytes]:
    """``record_key`` and ``content_key`` of one example as raw digests, each text encoded once.

    Args:
        turns: The (prompt, completion) turns.

    Returns:
        ``(bytes.fromhex(record_key(turns)), bytes.fromhex(content_key(turns)))``.
    """
    prompt = _PROMPT_KEY.copy()
    content = _CONTENT_KEY.copy()
    for turn_prompt, completion in turns:
        data = turn_prompt.encode("utf-8")
        prefixed = len(data).to_bytes(8, "big") + data
        prompt.update(prefixed)
        content.update(prefixed)
        data = completion.encode("utf-8")
        content.update(len(data).to_bytes(8, "big") + data)
    return prompt.digest(), content.digest()


def _tagged(tag: bytes) -> hashlib.blake2b:
    h = hashlib.blake2b(digest_size=16)
    h.update(len(tag).to_bytes(8, "big"))
    h.update(tag)
    return h


# The hash states after the tag, copied per record rather than rebuilt.
_PROMPT_KEY = _tagged(b"prompt")
_CONTENT_KEY = _tagged(b"content")


def content_key(turns: Turns) -> str:
    """The exact-duplicate key of a rendered example: a hash of prompts and completions.

    Args:
        turns: The (prompt, completion) turns.

    Returns:
        A blake2b hex digest.
    """
    return _digest(["content"] + [text for turn in turns for text in turn])


def validate_ratios(ratios: Mapping[str, float]) -> dict[str, float]:
    """Check split ratios: known names, non-negative, summing to 1 (within 1e-6).

    Args:
        ratios: E.g. ``{"train": 0.9, "validation": 0.05, "test": 0.05}``.

    Returns:
        The ratios as a plain dict.

    Raises:
        ValueError: Naming the problem.
    """
    plain = {str(name): float(value) for name, value in dict(ratios).items()}
    unknown = sorted(set(plain) - set(SPLITS))
    if unknown:
        raise ValueError(f"unknown split names {unknown}; expected some of {list(SPLITS)}")
    negative = sorted(name for name, value in plain.items() if value < 0)
    if negative:
        raise ValueError(f"split ratios must not be negative: {negative}")
    total = sum(plain.values())
    if abs(total - 1.0) > _TOLERANCE:
        raise ValueError(f"split ratios must sum to 1, got {total:g} ({plain})")
    return plain


def assign_split(key: str, seed: int, ratios: Mapping[str, float]) -> str:
    """Pick the split of one record from its key and the seed alone.

    The key and seed are hashed to a number in [0, 1) that falls into one of the cumulative
    ratio intervals, taken in the fixed order of ``SPLITS`` (not the mapping's order, so that
    rewriting a config in another order changes nothing).

    Args:
        key: ``record_key`` of the record.
        seed: The experiment seed; another seed gives an independent assignment.
        ratios: Split name -> fraction, e.g. ``{"train": 0.9, "validation": 0.05,
            "test": 0.05}``; must sum to 1.

    Returns:
        The split name.

    Raises:
        ValueError: If the ratios are invalid.
    """
    return split_chooser(seed, ratios)(key)


def split_chooser(seed: int, ratios: Mapping[str, float]) -> Callable[[str], str]:
    """``assign_split`` with the ratios validated once, for calling on every record.

    Args:
        seed: The experiment seed.
        ratios: Split name -> fraction; must sum to 1.

    Returns:
        A function ``record_key -> split name`` equal to ``assign_split(key, seed, ratios)``.

    Raises:
        ValueError: If the ratios are invalid.
    """
    plain = validate_ratios(ratios)
    # (cumulative upper bound, name) in SPLITS order; the last split with a share absorbs
    # the rounding at the top end.
    bounds: list[tuple[float, str]] = []
    cumulative = 0.0
    for name in SPLITS:
        share = plain.get(name, 0.0)
        if share > 0:
            cumulative += share
            bounds.append((cumulative, name))
    assert bounds  # validate_ratios guarantees a positive share
    last = bounds[-1][1]
    prefix = f"{seed}\x00"

    def choose(key: str) -> str:
        digest = hashlib.blake2b((prefix + key).encode(), digest_size=8).digest()
        point = int.from_bytes(digest, "big") / 2**64
        for bound, name in bounds:
            if point < bound:
                return name
        return last

    return choose

"""k-shot prompts for the `base_fewshot` role: train-split exemplars of the same task first.

    <exemplar 1 prompt><exemplar 1 completion>\\n\\n ... <exemplar k ...>\\n\\n<test prompt>

The exemplars are the ones prepare kept (`<data_dir>/exemplars/<task>.jsonl`, chosen by content
hash). Which k of them a test record gets is a rotation of that list started at a hash of the
record's id: deterministic, independent of the test split's order and of the actor count, and
different records see different exemplars. A pool entry with the test record's own prompt is
never used (prepare splits by prompt, so this only guards pinned or duplicated sources). A
task with fewer than k exemplars (none: a source pinned to test) gets what there is.

Token ids are concatenated, not re-tokenized: the test prompt keeps exactly the ids prepare
made (the zero-shot prompt), preceded by BOS and the tokenized exemplar blocks. Under a length
limit exemplars are dropped first (the farthest from the test prompt first); only a test
prompt that alone is too long is cut, exactly as in zero-shot. No Ray, no model here.
"""

from __future__ import annotations

import errno
import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any

from data_pipeline import storage

SEPARATOR = "\n\n"


def read_exemplars(
    data_dir: str, manifest: dict[str, Any], tasks: Sequence[str]
) -> dict[str, list[dict[str, str]]]:
    """The exemplar pool of each task, in file order.

    Raises:
        FileNotFoundError: A task has no exemplar file (data prepared with data.exemplars=0
            or by an older ift).
    """
    listed = manifest.get("exemplars") or {}
    out: dict[str, list[dict[str, str]]] = {}
    for task in sorted(set(tasks)):
        rel = listed.get(task, {}).get("file", f"exemplars/{task}.jsonl")
        path = storage.join(data_dir, rel)  # local, or under the data's prefix on S3
        if not storage.exists(path):
            raise FileNotFoundError(errno.ENOENT, "no such exemplar file", path)
        lines = storage.read_bytes(path).decode("utf-8").splitlines()
        rows = [json.loads(line) for line in lines if line.strip()]
        out[task] = [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows]
    return out


def pick_exemplars(
    pool: Sequence[dict[str, str]], record_id: str, prompt: str, k: int
) -> list[dict[str, str]]:
    """Up to `k` exemplars for one test record: the pool rotated by a hash of `record_id`,
    skipping any exemplar whose prompt is the record's own."""
    if not pool or k <= 0:
        return []
    start = int.from_bytes(hashlib.sha256(record_id.encode()).digest()[:8], "big") % len(pool)
    rotated = list(pool[start:]) + list(pool[:start])
    return [e for e in rotated if e["prompt"] != prompt][:k]


def block_text(exemplar: dict[str, str]) -> str:
    """One exemplar as it precedes the test prompt."""
    return exemplar["prompt"] + exemplar["completion"] + SEPARATOR


def fewshot_ids(
    block_ids: Sequence[Sequence[int]],
    prompt_ids: Sequence[int],
    bos_id: int | None,
    max_len: int,
) -> tuple[list[int], int]:
    """The generation input with as many exemplar blocks as fit in `max_len` tokens.

    Args:
        block_ids: Token ids of each exemplar block, in prompt order.
        prompt_ids: The zero-shot prompt ids from prepare (starting with `bos_id` if any).
        bos_id: The tokenizer's BOS as prepare used it (None: no BOS).
        max_len: Longest allowed input (`eval.max_prompt_len` or `data.max_seq_len`).

    Returns:
        (ids, number of blocks kept); the kept blocks are the last ones of `block_ids`. With
        no block kept, the ids are the zero-shot prompt cut to `max_len` as the eval job does.
    """
    has_bos = bos_id is not None and len(prompt_ids) > 0 and prompt_ids[0] == bos_id
    head = [int(bos_id)] if has_bos and bos_id is not None else []
    body = list(prompt_ids[1:] if has_bos else prompt_ids)
    used = len(head) + len(body)
    kept = 0
    # The closest exemplars to the test prompt are kept; the farthest go first.
    for block in reversed(block_ids):
        if used + len(block) > max_len:
            break
        used += len(block)
        kept += 1
    if kept == 0:
        return list(prompt_ids)[-max_len:], 0
    context = [int(t) for b in block_ids[len(block_ids) - kept :] for t in b]
    return head + context + body, kept


def build_prompts(
    test: dict[str, list[Any]],
    pools: dict[str, list[dict[str, str]]],
    k: int,
    encode: Callable[[list[str]], list[list[int]]],
    bos_id: int | None,
    max_len: int,
) -> tuple[list[list[int]], list[str]]:
    """k-shot generation inputs and their text for every test record.

    Args:
        test: The test split columns (`id`, `task`, `prompt`, `prompt_ids`).
        pools: Task -> exemplar pool (`read_exemplars`).
        k: Exemplars per prompt.
        encode: Texts -> token ids without special tokens (the prepare tokenizer).
        bos_id: BOS as prepare used it.
        max_len: Longest generation input.

    Returns:
        (ids, prompt text) per record; the text shows only the exemplars kept.
    """
    texts = sorted({block_text(e) for task in set(test["task"]) for e in pools.get(task, [])})
    ids_of = dict(zip(texts, encode(texts), strict=True)) if texts else {}
    out_ids: list[list[int]] = []
    out_text: list[str] = []
    for rid, task, prompt, pids in zip(
        test["id"], test["task"], test["prompt"], test["prompt_ids"], strict=True
    ):
        blocks = [block_text(e) for e in pick_exemplars(pools.get(task, []), rid, prompt, k)]
        ids, kept = fewshot_ids([ids_of[b] for b in blocks], pids, bos_id, max_len)
        out_ids.append(ids)
        out_text.append("".join(blocks[len(blocks) - kept :]) + prompt)
    return out_ids, out_text

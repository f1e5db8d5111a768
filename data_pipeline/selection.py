"""Which rows prepare keeps, and which become k-shot exemplars: array operations on keys.

Every rule is taken in input order over the 128-bit content and prompt keys the workers
computed, so that the result depends on the inputs alone, never on how they were cut into
units or on which worker finished first. Nothing here holds a per-record array of the whole
input: the rules read the spill's key buckets one at a time and its row table a slice at a
time (see `spill`), and mark the rows they drop in `drops.bin`, one byte per row on disk.

With mixing weights (`data.sources[].weight`), `select_rows` also lists each source's kept
train rows in a file of its own and decides from the counts how many train examples each
source gets (`mix`); `mixed_rows` then streams them, repeats included, in place of
`kept_rows`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from data_pipeline import mix, split
from data_pipeline.errors import PrepareError
from data_pipeline.spill import SLICE_ROWS, KeyBuckets, row_slices

# Why a row was dropped (its byte in drops.bin); 0 keeps it.
KEPT, DUPLICATE, CAPPED, OVERLAP = 0, 1, 2, 3


def select_rows(cfg: Any, spilled: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Which good rows are kept: dedupe, per-source caps, then no prompt in two splits; with
    mixing weights, how many train examples each source gets (`mix_plan`).

    Returns:
        The path of drops.bin (a byte per good row in input order, KEPT or why dropped) and
        the counts of each rule, with `mix`: the mixing plan, or None without weights.

    Raises:
        PrepareError: A weighted source is owed train examples but has none kept.
    """
    n = spilled["good"]
    drops_path = os.path.join(os.path.dirname(spilled["rows"]), "drops.bin")
    with open(drops_path, "wb") as f:
        f.truncate(n)  # all KEPT (zero bytes), without writing them
    stats: dict[str, Any] = {"good": n, "duplicates": 0, "capped": 0, "overlap": 0, "mix": None}
    if not n:
        stats["mix"] = mix_plan(cfg, spilled["rows"], drops_path)
        return drops_path, stats
    drops = np.memmap(drops_path, np.uint8, "r+", shape=(n,))
    if cfg.data.dedupe:
        content = KeyBuckets(spilled["ck"], spilled["buckets"])
        for b in range(content.n):
            keys = content.read(b)
            dup = np.ones(len(keys), bool)
            dup[first_occurrences(keys["hi"], keys["lo"])] = False
            drops[keys["row"][dup]] = DUPLICATE
            stats["duplicates"] += int(dup.sum())
    drops.flush()
    del drops
    stats["capped"] = _cap(cfg, spilled["rows"], drops_path)
    # A prompt lands in one split by its hash, but a source pinned to a split can still bring
    # a prompt that another source put elsewhere: test wins over validation over train.
    drops = np.memmap(drops_path, np.uint8, "r+", shape=(n,))
    prompts = KeyBuckets(spilled["pk"], spilled["buckets"])
    for b in range(prompts.n):
        keys = prompts.read(b)
        keep = drops[keys["row"]] == KEPT
        for later in ("test", "validation"):
            code = split.SPLIT_CODES[later]
            held = keep & (keys["split"] == code)
            earlier = keep & (keys["split"] < code)
            if held.any() and earlier.any():
                leak = earlier & isin128(keys["hi"], keys["lo"], keys["hi"][held], keys["lo"][held])
                drops[keys["row"][leak]] = OVERLAP
                stats["overlap"] += int(leak.sum())
                keep &= ~leak
    drops.flush()
    del drops
    stats["mix"] = mix_plan(cfg, spilled["rows"], drops_path)
    return drops_path, stats


def mix_plan(cfg: Any, rows_path: str, drops_path: str) -> dict[str, Any] | None:
    """The mixing plan of the train split, or None when no source has a weight.

    One pass over the row table: each weighted source's kept train rows (as indices into the
    train spill, in input order) go to `mix-<source>.bin` next to drops.bin, O(rows of that
    source) on disk; only the counts stay in memory, and `mix.mix_counts` turns them into
    each source's number of examples. A source pinned to validation or test has no train
    rows: its weight is ignored.

    Returns:
        Per source (lists in source order): `weights` (0 where ignored), `kept`, `targets`,
        `files` (None where ignored); and `total` (N: `data.mix_total`, or the sum of `kept`)
        and `seed`.
    """
    sources = cfg.data.sources
    if all(src.weight is None for src in sources):
        return None
    weights = [
        float(src.weight) if src.weight is not None and src.split in (None, "train") else 0.0
        for src in sources
    ]
    folder = os.path.dirname(drops_path)
    files = [
        os.path.join(folder, f"mix-{i:05d}.bin") if w > 0 else None for i, w in enumerate(weights)
    ]
    kept = [0] * len(sources)
    code = split.SPLIT_CODES["train"]
    outs = {i: open(path, "wb") for i, path in enumerate(files) if path is not None}  # noqa: SIM115
    try:
        base = 0  # train rows before the slice
        for _, meta, drops in row_slices(rows_path, drops_path):
            mine = meta["split"] == code
            train_index = base + np.arange(int(mine.sum()), dtype=np.int64)
            base += len(train_index)
            keep = drops[mine] == KEPT
            src = meta["source"][mine]
            for i, f in outs.items():
                rows = train_index[keep & (src == i)]
                f.write(rows.tobytes())
                kept[i] += len(rows)
    finally:
        for f in outs.values():
            f.close()
    total = sum(kept) if cfg.data.mix_total is None else cfg.data.mix_total
    targets = mix.mix_counts(kept, weights, total)
    empty = [
        f"data.sources.{i} ({src.task_name}): weight {src.weight} asks for {t} train examples "
        "but none is kept"
        for i, (src, k, t) in enumerate(zip(sources, kept, targets, strict=True))
        if t and not k
    ]
    if empty:
        raise PrepareError("; ".join(empty) + " (all in other splits, duplicates or capped)")
    return {
        "weights": weights,
        "kept": kept,
        "targets": targets,
        "files": files,
        "total": total,
        "seed": cfg.experiment.seed,
    }


def mixed_rows(plan: dict[str, Any], size: int) -> Iterator[np.ndarray]:
    """The train rows of the mixture as indices into the train spill, repeats included, in
    arrays of exactly `size` (the last one shorter).

    Source after source, pass after pass: pass p writes the source's kept train rows (in
    input order) whose `mix.multiplicity` exceeds p, i.e. every row in each of the whole
    passes, then the sampled remainder. Each source's rows are read from its file
    (`mix_plan`) SLICE_ROWS at a time, so the work is proportional to the rows written.
    """
    carry = np.zeros(0, np.int64)
    for i, path in enumerate(plan["files"]):
        kept, target = plan["kept"][i], plan["targets"][i]
        if path is None or not target:
            continue
        rows = np.memmap(path, np.int64, "r", shape=(kept,))
        passes, sampled = divmod(target, kept)
        for p in range(passes + (sampled > 0)):
            for start in range(0, kept, SLICE_ROWS):
                part = np.asarray(rows[start : start + SLICE_ROWS])
                if p == passes:  # the remainder
                    ordinals = np.arange(start, start + len(part), dtype=np.int64)
                    part = part[mix.chosen(ordinals, kept, sampled, plan["seed"], i)]
                carry = np.concatenate([carry, part])
                full = len(carry) - len(carry) % size
                for a in range(0, full, size):
                    yield carry[a : a + size]
                carry = carry[full:]
        del rows
    if len(carry):
        yield carry


def _cap(cfg: Any, rows_path: str, drops_path: str) -> int:
    """Per-source caps (`max_records`, then `data.max_test_records`), in input order, a slice
    of rows at a time with running counts: a row's fate depends only on the rows before it."""
    sources = cfg.data.sources
    limits = [src.max_records for src in sources]
    test_limit = cfg.data.max_test_records
    if all(limit is None for limit in limits) and test_limit is None:
        return 0
    seen = np.zeros(len(sources), np.int64)
    seen_test = np.zeros(len(sources), np.int64)
    test_code = split.SPLIT_CODES["test"]
    capped = 0
    for _, meta, drops in row_slices(rows_path, drops_path):
        keep = drops == KEPT
        test = meta["split"] == test_code
        for i, limit in enumerate(limits):
            mine = keep & (meta["source"] == i)
            if limit is not None:
                over = mine & (np.cumsum(mine) + seen[i] > limit)
                seen[i] += int(mine.sum())
                drops[over] = CAPPED
                capped += int(over.sum())
                keep &= ~over
                mine &= ~over
            if test_limit is not None:
                mine_test = mine & test
                over = mine_test & (np.cumsum(mine_test) + seen_test[i] > test_limit)
                seen_test[i] += int(mine_test.sum())
                drops[over] = CAPPED
                capped += int(over.sum())
                keep &= ~over
    return capped


def kept_rows(rows_path: str, drops_path: str, code: int, size: int) -> Iterator[np.ndarray]:
    """The kept rows of one split as indices into its spill (in input order), in arrays of
    exactly `size` (the last one shorter): a pass over rows.bin and drops.bin in slices."""
    carry = np.zeros(0, np.int64)  # fewer than `size` rows left from the slices before
    base = 0
    for _, meta, drops in row_slices(rows_path, drops_path):
        mine = meta["split"] == code
        kept = np.concatenate([carry, base + np.flatnonzero(drops[mine] == KEPT)])
        base += int(mine.sum())
        full = len(kept) - len(kept) % size
        for start in range(0, full, size):
            yield kept[start : start + size]
        carry = kept[full:]
    if len(carry):
        yield carry


def first_occurrences(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """Indices of the first row of each distinct 128-bit key (`hi`, `lo`), in key order.

    A stable lexsort puts equal keys next to each other in row order, so the first of each
    run is its first occurrence (np.unique on a structured array does the same, 20x slower).
    """
    order = np.lexsort((lo, hi))
    h, lo_sorted = hi[order], lo[order]
    new = np.ones(len(order), bool)
    new[1:] = (h[1:] != h[:-1]) | (lo_sorted[1:] != lo_sorted[:-1])
    return order[new]


def isin128(hi: np.ndarray, lo: np.ndarray, held_hi: np.ndarray, held_lo: np.ndarray) -> np.ndarray:
    """Which rows' 128-bit keys (`hi`, `lo`) are among the held ones.

    The high halves narrow it down (np.isin on uint64 is fast; on a structured array it
    sorts 20x slower); the few candidates are then checked whole.
    """
    out = np.zeros(len(hi), bool)
    candidates = np.flatnonzero(np.isin(hi, held_hi))
    if candidates.size:
        held = set(zip(held_hi.tolist(), held_lo.tolist(), strict=True))
        pairs = zip(hi[candidates].tolist(), lo[candidates].tolist(), strict=True)
        out[candidates] = [pair in held for pair in pairs]
    return out


def exemplar_rows(
    ck_hi: np.ndarray, ck_lo: np.ndarray, groups: np.ndarray, n_groups: int, k: int
) -> list[np.ndarray]:
    """Per group, the rows of the `k` lowest distinct content keys, lowest first.

    The keys are hashes of the rendered text, so the choice is a fair sample that depends on
    the content alone (not on file order or the number of workers); a key seen twice (dedupe
    off) is one exemplar.

    Args:
        ck_hi: High 64 bits of each row's content key.
        ck_lo: Low 64 bits.
        groups: Each row's group (task) index in ``[0, n_groups)``.
        n_groups: Number of groups.
        k: Exemplars per group.

    Returns:
        One array of row indices per group, at most ``k`` long.
    """
    order = np.lexsort((ck_lo, ck_hi, groups))
    g, hi, lo = groups[order], ck_hi[order], ck_lo[order]
    new = np.ones(len(order), bool)
    new[1:] = (g[1:] != g[:-1]) | (hi[1:] != hi[:-1]) | (lo[1:] != lo[:-1])
    order, g = order[new], g[new]
    starts = np.searchsorted(g, np.arange(n_groups))
    ends = np.searchsorted(g, np.arange(n_groups), side="right")
    return [order[a : min(b, a + k)] for a, b in zip(starts, ends, strict=True)]


class ExemplarPicker:
    """`exemplar_rows` over rows given a slice at a time (in row order), in bounded memory.

    After each slice only the candidates are kept: a group's k lowest keys overall are among
    the k lowest of the rows seen so far, and the candidates stay in row order, so that of
    equal keys the first occurrence still wins: `result()` equals `exemplar_rows` on all rows.
    """

    def __init__(self, n_groups: int, k: int) -> None:
        self.n_groups, self.k = n_groups, k
        self.rows = np.zeros(0, np.int64)
        self.hi = np.zeros(0, np.uint64)
        self.lo = np.zeros(0, np.uint64)
        self.groups = np.zeros(0, np.int64)

    def add(self, rows: np.ndarray, hi: np.ndarray, lo: np.ndarray, groups: np.ndarray) -> None:
        """Rows after every row added before, with their content keys and groups."""
        self.rows = np.concatenate([self.rows, rows])
        self.hi = np.concatenate([self.hi, hi])
        self.lo = np.concatenate([self.lo, lo])
        self.groups = np.concatenate([self.groups, groups])
        chosen = exemplar_rows(self.hi, self.lo, self.groups, self.n_groups, self.k)
        keep = np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)
        self.rows, self.hi, self.lo = self.rows[keep], self.hi[keep], self.lo[keep]
        self.groups = self.groups[keep]

    def result(self) -> list[np.ndarray]:
        """Per group, the chosen rows, lowest key first (as `exemplar_rows`)."""
        chosen = exemplar_rows(self.hi, self.lo, self.groups, self.n_groups, self.k)
        return [self.rows[c] for c in chosen]

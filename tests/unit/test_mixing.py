"""Weighted mixing: the counts rule, the per-row multiplicities, and the streaming of the
mixture from a row table on disk (`selection.mix_plan`, `selection.mixed_rows`)."""

from __future__ import annotations

import collections
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from data_pipeline import mix, selection, spill, split
from data_pipeline.errors import PrepareError
from data_pipeline.mix import chosen, mix_counts, multiplicity
from data_pipeline.permutation import keyed_permutation

TRAIN, VALIDATION, TEST = (split.SPLIT_CODES[s] for s in ("train", "validation", "test"))


def test_weights_3_to_1_share_the_kept_total() -> None:
    assert mix_counts([100, 40], [3, 1], None) == [105, 35]  # N = 140
    assert mix_counts([100, 40], [3.0, 1.0], 1000) == [750, 250]
    assert mix_counts([10, 10], [0.75, 0.25], None) == [15, 5]  # only the ratio counts


def test_rounding_is_per_source_halves_to_even() -> None:
    assert mix_counts([5, 5], [3, 1], None) == [8, 2]  # 7.5 -> 8, 2.5 -> 2
    assert mix_counts([3, 0, 0], [1, 1, 1], None) == [1, 1, 1]  # N = 3
    # Rounded one by one: the sum may miss N, by at most half a count per source.
    counts = mix_counts([4, 3, 3], [1, 1, 1], None)
    assert counts == [3, 3, 3] and abs(sum(counts) - 10) <= 3 / 2


@pytest.mark.parametrize("total", [None, 1, 17, 999, 12345])
def test_counts_sum_to_total_within_rounding(total: int | None) -> None:
    kept, weights = [120, 7, 0, 55], [2.5, 1.0, 0.0, 0.3]
    counts = mix_counts(kept, weights, total)
    n = sum(kept) if total is None else total
    assert counts[2] == 0  # weight 0: a source pinned to validation or test
    assert abs(sum(counts) - n) <= len(kept) / 2
    for c, w in zip(counts, weights, strict=True):
        assert abs(c - n * w / sum(weights)) <= 0.5


def test_counts_reject_bad_weights() -> None:
    with pytest.raises(ValueError, match="counts but"):
        mix_counts([1, 2], [1.0], None)
    with pytest.raises(ValueError, match="at least one"):
        mix_counts([1, 2], [0.0, 0.0], None)
    with pytest.raises(ValueError, match=">= 0"):
        mix_counts([1, 2], [1.0, -1.0], None)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 64, 100, 1000, 4097])
def test_keyed_permutation_is_a_bijection(n: int) -> None:
    image = keyed_permutation(np.arange(n), n, (7, 1))
    assert sorted(image.tolist()) == list(range(n))
    # Evaluated piece by piece (as the slices of a stream): the same values.
    pieces = [keyed_permutation(np.arange(a, min(n, a + 37)), n, (7, 1)) for a in range(0, n, 37)]
    assert np.concatenate(pieces).tolist() == image.tolist()


def test_keyed_permutation_depends_on_seed_and_source() -> None:
    a = keyed_permutation(np.arange(1000), 1000, (7, 0))
    assert a.tolist() == keyed_permutation(np.arange(1000), 1000, (7, 0)).tolist()
    assert a.tolist() != keyed_permutation(np.arange(1000), 1000, (8, 0)).tolist()
    assert a.tolist() != keyed_permutation(np.arange(1000), 1000, (7, 1)).tolist()
    assert a.tolist() != list(range(1000))
    # A negative seed is a seed like any other (taken modulo 2**64).
    assert sorted(keyed_permutation(np.arange(10), 10, (-3, 0)).tolist()) == list(range(10))
    with pytest.raises(ValueError, match="lie in"):
        keyed_permutation(np.array([10]), 10, (7, 0))


@pytest.mark.parametrize("kept,target", [(10, 0), (10, 3), (10, 10), (10, 25), (7, 70), (1, 5)])
def test_multiplicity_sums_to_target(kept: int, target: int) -> None:
    m = multiplicity(np.arange(kept), kept, target, seed=7, source=0)
    assert int(m.sum()) == target
    passes, sampled = divmod(target, kept)
    assert set(m.tolist()) <= {passes, passes + 1}
    assert int((m == passes + 1).sum()) == sampled


def test_below_the_kept_size_samples_without_repetition() -> None:
    m = multiplicity(np.arange(1000), 1000, 250, seed=7, source=0)
    assert m.max() == 1 and m.sum() == 250
    # A sample across the whole source, not its first rows.
    picked = np.flatnonzero(m)
    assert picked.min() < 100 and picked.max() > 900
    assert (chosen(np.arange(1000), 1000, 250, 7, 0) == (m == 1)).all()


def test_above_the_kept_size_repeats_whole_passes_then_samples() -> None:
    m = multiplicity(np.arange(40), 40, 105, seed=7, source=1)  # 2 passes + 25
    assert m.min() == 2 and m.max() == 3 and int((m == 3).sum()) == 25
    # The remainder is the sample the same source would draw below its size.
    assert ((m == 3) == (multiplicity(np.arange(40), 40, 25, 7, 1) == 1)).all()


def test_multiplicity_is_deterministic_from_seed_and_source() -> None:
    def draw(seed: int, source: int) -> list[int]:
        return multiplicity(np.arange(500), 500, 120, seed, source).tolist()

    assert draw(7, 0) == draw(7, 0)
    assert draw(7, 0) != draw(8, 0)
    assert draw(7, 0) != draw(7, 1)
    # An ordinal's fate does not depend on which others are asked about with it.
    assert multiplicity(np.arange(250, 500), 500, 120, 7, 0).tolist() == draw(7, 0)[250:]
    with pytest.raises(ValueError, match="no kept row"):
        multiplicity(np.arange(0), 0, 3, 7, 0)
    assert multiplicity(np.arange(0), 0, 0, 7, 0).tolist() == []


# --- the mixture streamed from the row table ---------------------------------------------


def _row_table(folder: Path, meta: list[tuple[int, int]], dropped: set[int]) -> tuple[str, str]:
    """rows.bin and drops.bin of good rows given as (split code, source), some dropped."""
    rows = np.array(meta, spill.ROW_META)
    rows_path, drops_path = str(folder / "rows.bin"), str(folder / "drops.bin")
    rows.tofile(rows_path)
    drops = np.zeros(len(rows), np.uint8)
    drops[sorted(dropped)] = selection.DUPLICATE
    drops.tofile(drops_path)
    return rows_path, drops_path


def _cfg(weights: list[float | None], splits: list[str | None], total: int | None = None) -> Any:
    sources = [
        SimpleNamespace(weight=w, split=s, task_name=f"task{i}")
        for i, (w, s) in enumerate(zip(weights, splits, strict=True))
    ]
    return SimpleNamespace(
        data=SimpleNamespace(sources=sources, mix_total=total),
        experiment=SimpleNamespace(seed=7),
    )


def _inputs(seed: int = 0) -> tuple[list[tuple[int, int]], set[int]]:
    """Sources 0 and 1 over all splits (1 interleaved with 0), source 2 pinned to test."""
    rng = np.random.default_rng(seed)
    meta = []
    for _ in range(3000):
        source = int(rng.choice([0, 0, 0, 1]))
        code = int(rng.choice([TRAIN] * 8 + [VALIDATION, TEST]))
        meta.append((code, source))
    meta += [(TEST, 2)] * 50
    dropped = set(rng.choice(len(meta), 200, replace=False).tolist())
    return meta, dropped


def _expected(meta: list[tuple[int, int]], dropped: set[int], plan: dict[str, Any]) -> list[int]:
    """The mixture by the rule, one row at a time: source after source, pass after pass."""
    train_index, per_source = 0, collections.defaultdict(list)
    for row, (code, source) in enumerate(meta):
        if code == TRAIN:
            if row not in dropped:
                per_source[source].append(train_index)
            train_index += 1
    out = []
    for i in range(len(plan["kept"])):
        rows = per_source[i]
        if not plan["targets"][i]:
            continue
        m = multiplicity(np.arange(len(rows)), len(rows), plan["targets"][i], 7, i)
        for p in range(int(m.max())):
            out += [r for r, times in zip(rows, m.tolist(), strict=True) if times > p]
    return out


@pytest.mark.parametrize("total", [None, 500, 9000])
def test_mixed_rows_follow_the_rule_whatever_the_slices(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, total: int | None
) -> None:
    meta, dropped = _inputs()
    rows_path, drops_path = _row_table(tmp_path, meta, dropped)
    # Source 2 is pinned to test: its weight is ignored.
    cfg = _cfg([3.0, 1.0, 5.0], [None, None, "test"], total)
    plan = selection.mix_plan(cfg, rows_path, drops_path)
    assert plan is not None
    kept = [
        sum(1 for r, (c, s) in enumerate(meta) if c == TRAIN and s == i and r not in dropped)
        for i in range(3)
    ]
    assert plan["kept"] == kept and kept[2] == 0
    n = sum(kept) if total is None else total
    assert plan["total"] == n
    assert plan["weights"] == [3.0, 1.0, 0.0] and plan["files"][2] is None
    assert plan["targets"] == [round(n * 3 / 4), round(n / 4), 0]

    expected = _expected(meta, dropped, plan)
    assert len(expected) == sum(plan["targets"])
    windows = list(selection.mixed_rows(plan, 64))
    assert all(len(w) == 64 for w in windows[:-1]) and 0 < len(windows[-1]) <= 64
    assert np.concatenate(windows).tolist() == expected

    # Slices of other sizes (the cuts of the passes over the row table and the source files):
    # the same plan and the same rows.
    for size in (100, 7):
        monkeypatch.setattr(spill, "SLICE_ROWS", size)
        monkeypatch.setattr(selection, "SLICE_ROWS", size)
        other = selection.mix_plan(cfg, rows_path, drops_path)
        assert other is not None and other["targets"] == plan["targets"]
        assert np.concatenate(list(selection.mixed_rows(other, 1000))).tolist() == expected


def test_mixed_counts_per_source_and_repeats(tmp_path: Path) -> None:
    meta, dropped = _inputs(1)
    rows_path, drops_path = _row_table(tmp_path, meta, dropped)
    plan = selection.mix_plan(_cfg([1.0, 3.0, None], [None, None, "test"]), rows_path, drops_path)
    assert plan is not None
    rows = np.concatenate(list(selection.mixed_rows(plan, 500)))
    sources = np.array([s for c, s in meta if c == TRAIN])[rows]
    counts = np.bincount(sources, minlength=3).tolist()
    assert counts == plan["targets"]
    # Source 1 (a quarter of the rows, three quarters of the mixture) repeats: every kept row
    # at least twice; source 0 is a sample without repetition.
    per_row = collections.Counter(rows.tolist())
    assert min(per_row[int(r)] for r in rows[sources == 1]) >= 2
    assert max(per_row[int(r)] for r in rows[sources == 0]) == 1


def test_no_weights_no_plan(tmp_path: Path) -> None:
    meta, dropped = _inputs()
    rows_path, drops_path = _row_table(tmp_path, meta, dropped)
    assert (
        selection.mix_plan(_cfg([None, None, None], [None, None, "test"]), rows_path, drops_path)
        is None
    )
    assert not any(name.startswith("mix-") for name in os.listdir(tmp_path))


def test_a_weighted_source_without_kept_train_rows_is_an_error(tmp_path: Path) -> None:
    meta, _ = _inputs()
    dropped = {r for r, (c, s) in enumerate(meta) if s == 1 and c == TRAIN}  # all duplicates
    rows_path, drops_path = _row_table(tmp_path, meta, dropped)
    with pytest.raises(PrepareError, match=r"data.sources.1 \(task1\): weight 1.0 asks for"):
        selection.mix_plan(_cfg([3.0, 1.0, None], [None, None, "test"]), rows_path, drops_path)


def test_the_rule_module_is_in_the_code_fingerprint(monkeypatch: pytest.MonkeyPatch) -> None:
    from data_pipeline import fingerprint

    hashed: list[str] = []
    read_bytes = Path.read_bytes

    def recording(self: Path) -> bytes:
        hashed.append(self.name)
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", recording)
    fingerprint._code_fingerprint()
    assert {os.path.basename(mix.__file__), "selection.py", "write.py"} <= set(hashed)

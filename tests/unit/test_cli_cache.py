"""`ift cache` lists a node's cache folders and prunes them on demand (real files and flocks)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from data_pipeline import local_cache
from launcher.cli import main
from tests.unit.test_local_cache import MIB, used_at, user


def test_cache_lists_entries_and_prunes_what_nobody_uses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for key in "ab":
        user(tmp_path, key, MIB).wait()
    used_at(tmp_path, "a", time.time() - 100)
    holder = user(tmp_path, "c", MIB, wait=True)
    try:
        assert main(["cache", "--dir", str(tmp_path)]) == 0
        out = capsys.readouterr().out
        assert f"{tmp_path}: 3 entries" in out
        # The most recently used first; only the held one is marked.
        lines = [line.split()[0] for line in out.splitlines()[1:]]
        assert lines == ["c", "b", "a"]
        assert [line.endswith("in use") for line in out.splitlines()[1:]] == [True, False, False]
        # A budget of 1.5 MiB: the least recently used unheld entry, a, goes first; then b
        # is enough (c, in use, stays even over the budget).
        assert (
            main(["cache", "prune", "--dir", str(tmp_path), "--max-gb", str(1.5 * MIB / 2**30)])
            == 0
        )
        assert "removed 2 entries (a, b)" in capsys.readouterr().out
        assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    finally:
        holder.communicate("\n")
    assert main(["cache", "prune", "--dir", str(tmp_path), "--max-gb", "0"]) == 0
    assert local_cache.entries(str(tmp_path)) == []


def test_cache_rejects_a_bad_budget_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["cache", "prune", "--dir", str(tmp_path), "--max-gb", "-1"]) == 2
    assert "--max-gb" in capsys.readouterr().err
    monkeypatch.setenv(local_cache.BUDGET_ENV, "lots")
    assert main(["cache", "prune", "--dir", str(tmp_path)]) == 2
    assert local_cache.BUDGET_ENV in capsys.readouterr().err

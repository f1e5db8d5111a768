"""data_pipeline.local_cache: entries filled once, held by their users, least recently used ones
removed to fit the budget; with real processes holding real flocks."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from data_pipeline import local_cache

ROOT = Path(__file__).resolve().parents[2]
MIB = 2**20

# A child process that fills (or uses) an entry and then waits for a line on stdin before it
# exits: while it waits it holds the entry, as a rank holds its token store.
USER = textwrap.dedent(
    """
    import os, sys, time
    from data_pipeline import local_cache
    base, key, size, wait = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "wait"

    def fill(tmp):
        with open(os.path.join(tmp, "data.bin"), "wb") as f:
            f.write(key.encode()[:1] * size)

    path = local_cache.cached(base, key, fill)
    time.sleep(0.01)  # widen the window in which a removal could pull the entry away
    data = open(os.path.join(path, "data.bin"), "rb").read()
    assert data == key.encode()[:1] * size, (key, len(data))
    print("ready", flush=True)
    if wait:
        sys.stdin.readline()
    """
)


def user(base: Path, key: str, size: int, wait: bool = False) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", USER, str(base), key, str(size), "wait" if wait else "exit"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    return proc


def used_at(base: Path, key: str, t: float) -> None:
    os.utime(base / key / local_cache.LOCK, (t, t))


def writer(size: int, calls: list[str]):
    def fill(tmp: str) -> None:
        calls.append(tmp)
        Path(tmp, "data.bin").write_bytes(b"x" * size)

    return fill


def test_an_entry_is_filled_once_and_held_by_its_user(tmp_path: Path) -> None:
    calls: list[str] = []
    path = local_cache.cached(str(tmp_path), "k", writer(100, calls))
    assert path == str(tmp_path / "k") and Path(path, "data.bin").read_bytes() == b"x" * 100
    assert local_cache.cached(str(tmp_path), "k", writer(100, calls)) == path
    assert local_cache.cached(str(tmp_path), "k", None) == path
    assert len(calls) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k"]  # no temporary left
    # Held: no other open of the lock can take it exclusively (what a removal needs).
    fd = os.open(Path(path, local_cache.LOCK), os.O_RDWR)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
    assert local_cache.prune(str(tmp_path), 0) == []
    with pytest.raises(FileNotFoundError, match="not in the cache"):
        local_cache.cached(str(tmp_path), "other", None)


def test_a_failed_fill_leaves_nothing(tmp_path: Path) -> None:
    def broken(tmp: str) -> None:
        Path(tmp, "half.bin").write_bytes(b"x" * 10)
        raise ConnectionError("lost the object store")

    with pytest.raises(ConnectionError):
        local_cache.cached(str(tmp_path), "k", broken)
    assert list(tmp_path.iterdir()) == []


def test_least_recently_used_entries_go_first_until_the_cache_fits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in "abc":  # filled by processes that have ended: nobody holds them
        user(tmp_path, key, MIB).wait()
    now = time.time()
    used_at(tmp_path, "b", now - 300)  # b: least recently used, then a, then c
    used_at(tmp_path, "a", now - 200)
    used_at(tmp_path, "c", now - 100)
    monkeypatch.setenv(local_cache.BUDGET_ENV, str(2.5 * MIB / 2**30))
    local_cache.cached(str(tmp_path), "d", writer(MIB, []))
    # 4 MiB over a 2.5 MiB budget: b and a removed, c and the new d kept.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "d"]


def test_an_entry_in_use_is_never_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    holder = user(tmp_path, "a", MIB, wait=True)
    try:
        used_at(tmp_path, "a", time.time() - 3600)  # the oldest, but held
        monkeypatch.setenv(local_cache.BUDGET_ENV, "0")
        local_cache.cached(str(tmp_path), "b", writer(MIB, []))
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
    finally:
        holder.communicate("\n")
    assert holder.returncode == 0
    # Its user has ended: now it goes, and this process's own entry stays.
    assert local_cache.prune(str(tmp_path), 0) == ["a"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_processes_racing_fills_and_removals_always_read_whole_entries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 4 lanes of 12 short-lived users over 3 keys, with a budget of one entry: nearly every
    # fill removes another entry while other processes look it up, lock it or read it.
    monkeypatch.setenv(local_cache.BUDGET_ENV, str(1.5 * 256 * 1024 / 2**30))
    lanes = []
    for lane in range(4):
        keys = [("pqr"[(lane + i) % 3]) for i in range(12)]
        script = "; ".join(
            f"subprocess.run([sys.executable, '-c', USER, {str(tmp_path)!r}, {k!r}, "
            "'262144', 'exit'], check=True, stdout=subprocess.DEVNULL)"
            for k in keys
        )
        lanes.append(
            subprocess.Popen(
                [sys.executable, "-c", f"import subprocess, sys; USER = {USER!r}; {script}"],
                env={**os.environ, "PYTHONPATH": str(ROOT)},
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    errors = [lane.communicate()[1] for lane in lanes]
    assert [lane.returncode for lane in lanes] == [0, 0, 0, 0], errors
    left = sorted(p.name for p in tmp_path.iterdir())
    assert all(len(name) == 1 for name in left), left  # no temporary or removal left behind


def test_what_dead_processes_left_is_cleaned_up(tmp_path: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    old = time.time() - local_cache.STALE_S - 60
    for name in (f"k{local_cache.TMP_MARK}{dead}-aaaa", f"{local_cache.TRASH}k-bbbb"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "part.bin").write_bytes(b"x")
        os.utime(tmp_path / name, (old, old))
    fresh = tmp_path / f"k{local_cache.TMP_MARK}{dead}-cccc"  # dead, but recent: left alone
    alive = tmp_path / f"k{local_cache.TMP_MARK}{os.getpid()}-dddd"  # a fill in progress
    fresh.mkdir()
    alive.mkdir()
    os.utime(alive, (old, old))
    (tmp_path / "not-ours").mkdir()  # no lock file: never touched
    assert local_cache.prune(str(tmp_path), 0) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [fresh.name, alive.name, "not-ours"]
    )


def test_the_budget_comes_from_the_environment_or_the_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(local_cache.BUDGET_ENV, raising=False)
    assert (
        local_cache.max_bytes(str(tmp_path))
        == os.statvfs(tmp_path).f_frsize * os.statvfs(tmp_path).f_blocks // 2
    )
    monkeypatch.setenv(local_cache.BUDGET_ENV, "1.5")
    assert local_cache.max_bytes(str(tmp_path)) == 3 * 2**29
    for bad in ("lots", "-1", "nan"):
        monkeypatch.setenv(local_cache.BUDGET_ENV, bad)
        with pytest.raises(ValueError, match=local_cache.BUDGET_ENV):
            local_cache.max_bytes(str(tmp_path))


def test_entries_are_listed_by_last_use_with_size_and_whether_in_use(tmp_path: Path) -> None:
    assert local_cache.entries(str(tmp_path / "missing")) == []
    user(tmp_path, "a", MIB).wait()
    holder = user(tmp_path, "b", 2 * MIB, wait=True)
    try:
        used_at(tmp_path, "a", time.time() - 100)
        (tmp_path / "not-an-entry").mkdir()  # no lock file: not this module's, not listed
        listed = local_cache.entries(str(tmp_path))
        assert [(e.key, e.bytes, e.held) for e in listed] == [
            ("a", MIB, False),
            ("b", 2 * MIB, True),
        ]
        assert listed[0].last_used < listed[1].last_used
    finally:
        holder.communicate("\n")
    assert [e.held for e in local_cache.entries(str(tmp_path))] == [False, False]


@pytest.mark.skipif(os.geteuid() != 0, reason="acting as another user needs root")
def test_another_users_copy_from_before_locks_is_used_read_only() -> None:
    """A copy without `.ift-lock` (made before locks) in a folder this user cannot write: it is
    used as it is, neither filled again nor locked (nobody can remove it). A real second user:
    the child drops to `nobody` once its modules are imported."""
    top = Path(tempfile.mkdtemp(dir="/tmp"))  # pytest's folders are private to root
    try:
        base = top / "cache"
        (base / "m").mkdir(parents=True)
        (base / "m" / "data.bin").write_bytes(b"m" * 10)
        for path in (top, base, base / "m"):
            path.chmod(0o755)  # readable by all, writable by root only
        code = textwrap.dedent(
            """
            import os, sys
            from data_pipeline import local_cache
            os.setgid(65534)
            os.setuid(65534)
            def fill(tmp):
                raise AssertionError("filled again")
            path = local_cache.cached(sys.argv[1], "m", fill)
            print(open(os.path.join(path, "data.bin")).read())
            """
        )
        out = subprocess.run(
            [sys.executable, "-c", code, str(base)],
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout == "m" * 10 + "\n"
        assert not (base / "m" / local_cache.LOCK).exists()
    finally:
        shutil.rmtree(top)

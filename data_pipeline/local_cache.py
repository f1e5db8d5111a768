"""Node-local copies of remote folders (a model on an object store, a token store), each filled
once per node and kept within a disk budget.

An entry `<base>/<key>` is named by what it holds (the callers' keys change whenever the source
does). One process fills it into a private temporary name and renames that into place, so no one
sees a half-filled entry, and processes that race use whichever copy landed first.

A cache that only grows fills a node's disk at scale: every prepared dataset a run reads from
S3 leaves a copy of its token store on each node, 4 to 8 bytes per token. So every process that
uses an entry holds a shared `flock` on the entry's `.ift-lock` for the rest of its life (a rank
maps its token store for the whole run; the kernel drops the lock when the process ends, even on
SIGKILL) and stamps that file's mtime: the entry's last use. After each fill, the least recently
used entries that no process holds are removed until the cache fits its budget:
`$IFT_CACHE_MAX_GB` GiB, by default half the size of the filesystem the cache is on. The entry
in use is never removed, even when it alone is over the budget.

Removal takes the entry's lock exclusively (without waiting), renames the entry out of the way,
and only then deletes it. A process about to use an entry either gets its shared lock first (the
entry stays), or finds it renamed and fills it again. Only folders this module made are ever
removed: entries with a `.ift-lock` (copies made before it, or anything else in the folder, stay
as they are), temporary fills left by a process that died, and removals cut short.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

LOCK = ".ift-lock"
BUDGET_ENV = "IFT_CACHE_MAX_GB"
TMP_MARK = ".tmp-"  # <key>.tmp-<pid>-<random>: a fill in progress (or left by a dead process)
TRASH = ".trash-"  # .trash-<key>-<random>: an entry being removed
# A temporary fill is left alone for this long even when its process seems gone: in a container
# the pid may belong to another PID namespace sharing the folder.
STALE_S = 24 * 3600


class NotCached(FileNotFoundError):
    """`cached` without a `fill`, for an entry that is not there."""


_held: dict[str, int] = {}  # entry folder -> its lock's descriptor, kept until the process ends
_held_guard = threading.Lock()


def cached(base: str, key: str, fill: Callable[[str], None] | None) -> str:
    """The folder `<base>/<key>`, filled once per node by `fill(folder)`, held by this process.

    Args:
        base: the cache folder (created if missing).
        key: the entry's name; must change whenever what `fill` writes would.
        fill: writes the entry's files into the (existing, empty) folder it is given; raises to
            leave nothing behind. None: only an entry already there.

    Raises:
        NotCached: `fill` is None and the entry is not there.
    """
    dest = os.path.join(base, key)
    filled = False
    for _ in range(3):
        if os.path.isdir(dest) and _hold(dest):
            if filled:
                prune(base, max_bytes(base))
            return dest
        if fill is None:
            raise NotCached(f"{dest}: not in the cache")
        _fill(dest, fill)
        filled = True
    # Only if other processes removed the new entry three times between its rename and our lock.
    raise OSError(f"{dest}: removed from the cache each time it was filled")


def _fill(dest: str, fill: Callable[[str], None]) -> None:
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    tmp = f"{dest}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        os.makedirs(tmp)
        fill(tmp)
        open(os.path.join(tmp, LOCK), "a").close()
        try:
            os.rename(tmp, dest)
        except OSError:  # another process was first: use its copy
            if not os.path.isdir(dest):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _hold(dest: str) -> bool:
    """Take (or keep) a shared lock on the entry and stamp its use; False if the entry was
    removed meanwhile."""
    lock = os.path.join(dest, LOCK)
    with _held_guard:
        fd = _held.get(dest)
        if fd is None:
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # the entry was renamed away since we looked
                return False
            except PermissionError:  # another user's entry: read-only use, no stamp
                try:
                    fd = os.open(lock, os.O_RDONLY)
                except FileNotFoundError:
                    # Their copy from before locks: used as it is, unheld. Nothing removes
                    # it (removal takes an entry's lock), so it has nothing to guard against.
                    return os.path.isdir(dest)
            fcntl.flock(fd, fcntl.LOCK_SH)  # waits only while a remover renames it
        if not _same_file(fd, lock):  # removed (or removed and filled again) meanwhile
            os.close(fd)
            _held.pop(dest, None)
            return False
        _held[dest] = fd
        try:
            os.utime(fd)  # the entry's last use
        except PermissionError:
            pass
        return True


def _same_file(fd: int, path: str) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def max_bytes(base: str) -> int:
    """The cache's budget: `$IFT_CACHE_MAX_GB` GiB, else half the size of its filesystem."""
    raw = os.environ.get(BUDGET_ENV)
    if raw is None:
        return shutil.disk_usage(base).total // 2
    try:
        gib = float(raw)
    except ValueError:
        gib = -1.0
    if not gib >= 0:  # also NaN
        raise ValueError(f"{BUDGET_ENV}={raw!r}: expected a number of GiB >= 0")
    return int(gib * 2**30)


@dataclass(frozen=True)
class Entry:
    key: str
    bytes: int
    last_used: float  # seconds since the epoch
    held: bool  # some process uses it now (as of the listing)


def entries(base: str) -> list[Entry]:
    """The entries of the cache folder `base`, least recently used first (none if it is
    missing). Only reads: a held entry is told apart by trying its lock without waiting."""
    if not os.path.isdir(base):
        return []
    found = []
    for name in os.listdir(base):
        path = os.path.join(base, name)
        if name.startswith(TRASH) or TMP_MARK in name:
            continue
        try:
            used = os.stat(os.path.join(path, LOCK)).st_mtime
        except (FileNotFoundError, NotADirectoryError):
            continue  # not an entry, or removed by another process just now
        found.append(Entry(name, _size(path), used, _in_use(os.path.join(path, LOCK))))
    return sorted(found, key=lambda e: (e.last_used, e.key))


def _in_use(lock: str) -> bool:
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released at close, below
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def prune(base: str, budget: int) -> list[str]:
    """Remove least recently used entries nobody holds until the entries fit in `budget` bytes,
    and what dead processes left behind; returns the keys of the entries removed."""
    for name in os.listdir(base):
        path = os.path.join(base, name)
        if name.startswith(TRASH):
            shutil.rmtree(path, ignore_errors=True)  # a removal cut short: nobody holds it
        elif TMP_MARK in name and _abandoned(name, path):
            shutil.rmtree(path, ignore_errors=True)
    listed = entries(base)
    total = sum(e.bytes for e in listed)
    removed = []
    for entry in listed:
        if total <= budget:
            break
        if not entry.held and _remove(base, entry.key):
            total -= entry.bytes
            removed.append(entry.key)
    return removed


def _remove(base: str, name: str) -> bool:
    path = os.path.join(base, name)
    lock = os.path.join(path, LOCK)
    try:
        fd = os.open(lock, os.O_RDONLY)
    except (FileNotFoundError, PermissionError):
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # in use (by this process too: its own lock is another descriptor)
        if not _same_file(fd, lock):
            return False  # another process removed it first
        trash = os.path.join(base, f"{TRASH}{name}-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(path, trash)
        except PermissionError:
            return False  # another user's entry in a shared folder
    finally:
        os.close(fd)  # releases the lock: waiting users find the lock file moved and fill again
    shutil.rmtree(trash, ignore_errors=True)
    return True


def _abandoned(name: str, path: str) -> bool:
    """A temporary fill whose process is gone and that has not changed for STALE_S."""
    pid = name.rpartition(TMP_MARK)[2].split("-")[0]
    try:
        os.kill(int(pid), 0)
        return False  # still running
    except ProcessLookupError:
        pass
    except (ValueError, PermissionError):
        return False  # not our name, or another user's live process
    try:
        return time.time() - os.stat(path).st_mtime > STALE_S
    except FileNotFoundError:
        return False


def _size(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except FileNotFoundError:
                pass
    return total

"""What `ift prepare/train/eval/run` print: a few lines a person reads; the rest in a log file.

    with console.session("runs/quickstart/logs/ift.log") as con:
        con.line("== prepare")
        bar = con.progress("[prepare]", total=12, unit="units")
        bar.update(5, "3400 records")
        bar.close()

Inside `session`, file descriptors 1 and 2 point at the log file: whatever libraries write
(MLflow's INFO lines, FutureWarnings, DeepSpeed), Ray's own C++ logs and the worker output
Ray forwards to the driver all land there, whoever wrote them. The console writes to a copy
of the original stdout. On a terminal a stage's progress is one bar redrawn in place;
otherwise (a pipe, CI) it is a line every `PROGRESS_EVERY_S` seconds or more (each a tenth
of the stage further on) and one at the end.

Workers cannot call the console: rank 0 of training prints `[train] step N/T loss ...` as it
always did, and `on_worker_lines` hands each line Ray forwards to the driver to a callback
(Ray 2.60's driver-side stream dispatcher), which turns it into progress or a console line.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import IO, Any

# A non-terminal console prints a stage's progress at most this often, and only once it
# moved by a tenth of the stage since the last line: at most ~10 lines a stage.
PROGRESS_EVERY_S = 15.0
PROGRESS_STEP = 0.1
BAR_WIDTH = 24
# What rank 0 of training prints after each logged step (training/train.py).
TRAIN_STEP = re.compile(r"^\[train\] step (\d+)/(\d+) loss (\S+) .*tok/s (\d+) eta (\S+)")
TRAIN_LABEL = "[train]"
# ift's own lines, among everything a worker prints, shown on the console: progress and the
# warnings of rank 0's MLflow logger ("[mlflow] logging failed, buffering ...").
IFT_PREFIX = re.compile(r"^\[(prepare|train|eval|mlflow)\b")


class Console:
    """Lines and progress bars on the user's console, each also appended to the log file."""

    def __init__(self, out: IO[str], log: IO[str] | None = None, tty: bool | None = None) -> None:
        self.out = out
        self.log = log
        self.tty = out.isatty() if tty is None else tty
        self.lock = threading.RLock()
        self.bar: Bar | None = None

    def line(self, text: str) -> None:
        """Print `text` (one or more lines); a bar being drawn is redrawn below it, or closed
        first when it is complete (the stage's summary line then follows its bar)."""
        with self.lock:
            if self.bar is not None and self.bar.total and self.bar.done >= self.bar.total:
                self.bar.close()
            if self.bar is not None and self.tty:
                self.out.write("\r\033[K")
            self.out.write(text + "\n")
            if self.bar is not None and self.tty:
                self.out.write(self.bar.render())
            self.out.flush()
            self._to_log(text)

    def progress(self, label: str, total: int, unit: str) -> Bar:
        """A new progress bar (the previous one, if any, is closed)."""
        with self.lock:
            if self.bar is not None:
                self.bar.close()
            self.bar = Bar(self, label, total, unit)
            return self.bar

    def _to_log(self, text: str) -> None:
        if self.log is not None:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            self.log.write("".join(f"{stamp} ift | {t}\n" for t in text.splitlines() or [""]))
            self.log.flush()


class Bar:
    """One stage's progress: `done` of `total` `unit` and a free-text status."""

    def __init__(self, con: Console, label: str, total: int, unit: str) -> None:
        self.con, self.label, self.total, self.unit = con, label, max(total, 0), unit
        self.done, self.status = 0, ""
        self.shown, self.drawn = time.monotonic(), 0.0
        self.shown_done = -1

    def render(self) -> str:
        if self.con.tty:
            filled = BAR_WIDTH * self.done // self.total if self.total else 0
            bar = f" [{'#' * filled}{'.' * (BAR_WIDTH - filled)}]"
        else:
            bar = ""
        text = f"{self.label}{bar} {self.done}/{self.total} {self.unit}"
        return f"{text}  {self.status}" if self.status else text

    def update(self, done: int, status: str = "", total: int | None = None) -> None:
        with self.con.lock:
            if self.con.bar is not self or done < self.done:  # a late line: already shown
                return
            self.done, self.status = done, status
            self.total = self.total if total is None else total
            now = time.monotonic()
            if self.con.tty:
                if now - self.drawn >= 0.1 or done == self.total:
                    self.con.out.write("\r\033[K" + self.render())
                    self.con.out.flush()
                    self.drawn = now
            elif (
                now - self.shown >= PROGRESS_EVERY_S
                and done - max(self.shown_done, 0) >= PROGRESS_STEP * self.total
            ):
                self._show(now)

    def close(self) -> None:
        """End the bar: its last state stays on the console (and goes to the log)."""
        with self.con.lock:
            if self.con.bar is not self:
                return
            self.con.bar = None
            if self.con.tty:
                self.con.out.write("\r\033[K")
                self.con.line(self.render())
            elif self.shown_done != self.done:
                self.con.line(self.render())

    def _show(self, now: float) -> None:
        self.shown, self.shown_done = now, self.done
        self.con.line(self.render())


@contextlib.contextmanager
def session(log_path: str) -> Iterator[Console]:
    """Send file descriptors 1 and 2 to `log_path` (appended) and yield the user's console.

    The descriptors are restored on the way out, so a traceback raised through here still
    reaches the terminal. Where stdout is no real file (a test capturing it in memory) nothing
    is redirected and the console writes to `sys.stdout`.
    """
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    log = open(log_path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - closed below
    try:
        fds = (sys.stdout.fileno(), sys.stderr.fileno())
    except (AttributeError, OSError, ValueError):
        fds = None
    if fds != (1, 2):
        try:
            yield Console(sys.stdout, log)
        finally:
            log.close()
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    out = os.fdopen(os.dup(saved[0]), "w", encoding="utf-8", errors="replace", buffering=1)
    # Ray prints forwarded worker output with ANSI colours unless told not to.
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    try:
        yield Console(out, log)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        out.close()
        log.close()


def on_worker_lines(callback: Callable[[str], None]) -> Callable[[], None]:
    """Call `callback` with every line a Ray worker prints (as Ray forwards them to this
    driver, which also writes them to its stdout: the log file); returns the unsubscriber.

    Ray's public API only turns the forwarding on or off (`ray.init(log_to_driver=...)`); the
    dispatcher it prints through is internal, so on a Ray without it this does nothing and
    progress is shown when a stage ends.
    """
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return lambda: None
    name = f"ift-console-{id(callback)}"

    def handle(data: dict[str, Any]) -> None:
        for text in data.get("lines", []):
            try:
                callback(text)
            except Exception:  # noqa: BLE001 - never break Ray's log thread
                pass

    dispatcher.add_handler(name, handle)
    return lambda: dispatcher.remove_handler(name)


class WorkerLines:
    """Worker output forwarded by Ray (`on_worker_lines`) -> the console: ift's own lines are
    shown as they are ("[train] resumed from step 3"); rank 0's step lines move the train
    stage's bar (loss, tokens/s, ETA) while `steps` is on."""

    def __init__(self, con: Console) -> None:
        self.con = con
        self.steps = False
        self.last = 0.0

    def __call__(self, text: str) -> None:
        self.last = time.monotonic()
        m = TRAIN_STEP.match(text)
        if m:
            if self.steps:
                status = f"loss {m[3]}  {int(m[4]):,} tok/s  ETA {m[5]}"
                advance(self.con, TRAIN_LABEL, "steps", int(m[1]), int(m[2]), status)
        elif IFT_PREFIX.match(text):
            self.con.line(text)

    def drain(self, quiet: float = 1.0, limit: float = 5.0) -> None:
        """Wait until no line came for `quiet` seconds (at most `limit`): what a worker printed
        last reaches the driver a moment after the worker returned."""
        start = time.monotonic()
        while time.monotonic() - start < limit and time.monotonic() - max(self.last, start) < quiet:
            time.sleep(0.05)


def advance(con: Console, label: str, unit: str, done: int, total: int, status: str = "") -> None:
    """Move the bar `label` to `done` of `total`; its first call starts it (so a stage that
    reuses its outputs, and calls nothing, shows no bar)."""
    with con.lock:
        bar = con.bar if con.bar is not None and con.bar.label == label else None
        (bar or con.progress(label, total, unit)).update(done, status, total=total)


def progress_callback(con: Console, label: str, unit: str) -> Callable[..., None]:
    """A stage's `progress(done, total, status="")` callback, drawing the bar `label`."""

    def progress(done: int, total: int, status: str = "") -> None:
        advance(con, label, unit, done, total, status)

    return progress


def fmt_seconds(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"

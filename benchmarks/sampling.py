"""The benchmarks' samplers (memory, CPU) run on one pattern: a thread of the benchmark process
calls `sample()` right away and then every `interval` seconds while a `with` block runs."""

from __future__ import annotations

import threading
from typing import Self


class Periodic:
    """Calls `self.sample()` on a daemon thread, first on entering the block, then every
    `interval` seconds until the block ends."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.interval):
                return

    def sample(self) -> None:
        raise NotImplementedError

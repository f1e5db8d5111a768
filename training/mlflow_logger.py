"""Metric logging to MLflow from one process, buffered so that a flaky server loses nothing and
a slow one never holds up a step.

Metrics are queued with their step and timestamp; a background thread sends them with
`log_batch` every `flush_seconds` (sooner once `flush_every` points wait), so the training loop
only appends to a list: a synchronous send costs tens of milliseconds on SQLite and a network
round trip on a server, during which every other rank would wait at the next collective. A
failed send keeps the queue and is retried at the next flush; `close()` retries until
`close_timeout` before it gives up, and then it says how many points were lost instead of
failing the run.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any


class MetricLogger:
    """Buffered `MlflowClient.log_batch` for one run. No-op when `run_id` is None."""

    def __init__(
        self,
        tracking_uri: str | None,
        run_id: str | None,
        flush_every: int = 50,
        flush_seconds: float = 2.0,
        close_timeout: float = 120.0,
    ) -> None:
        self.run_id = run_id
        self.flush_every = flush_every
        self.flush_seconds = flush_seconds
        self.close_timeout = close_timeout
        self._queue: list[Any] = []
        self._queue_lock = threading.Lock()
        self._send_lock = threading.Lock()  # one sender at a time: the thread or close()
        self._wake = threading.Event()
        self._closing = False
        self._client: Any = None
        self._sender: threading.Thread | None = None
        self._warned = False
        if run_id is not None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=tracking_uri)
            self._sender = threading.Thread(target=self._send_loop, name="ift-mlflow", daemon=True)
            self._sender.start()

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.run_id is None:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        points = [Metric(k, float(v), ts, step) for k, v in metrics.items()]
        with self._queue_lock:
            self._queue += points
            due = len(self._queue) >= self.flush_every
        if due:
            self._wake.set()

    def pending(self) -> int:
        """Points queued and not yet sent."""
        with self._queue_lock:
            return len(self._queue)

    def flush(self) -> bool:
        """Send what is queued, keeping it on failure for the next try. True when all is sent."""
        with self._send_lock:
            while True:
                with self._queue_lock:
                    batch = self._queue[:1000]  # MLflow's per-request limit
                if not batch:
                    return True
                try:
                    self._client.log_batch(self.run_id, metrics=batch, synchronous=True)
                except Exception as e:  # the server may be restarting: keep the points
                    if not self._warned:
                        print(
                            f"[mlflow] logging failed, buffering {self.pending()} point(s): "
                            f"{type(e).__name__}: {str(e)[:200]}",
                            file=sys.stderr,
                        )
                        self._warned = True
                    return False
                with self._queue_lock:
                    del self._queue[: len(batch)]
                self._warned = False

    def _send_loop(self) -> None:
        # Points reach the UI within seconds, and a long outage is retried at every flush.
        while not self._closing:
            self._wake.wait(self.flush_seconds)
            self._wake.clear()
            if not self._closing:
                self.flush()

    def close(self) -> None:
        if self._sender is None:
            return
        self._closing = True
        self._wake.set()
        self._sender.join()
        deadline = time.monotonic() + self.close_timeout
        delay = 0.5
        while not self.flush():
            if time.monotonic() > deadline:
                print(
                    f"[mlflow] gave up: {self.pending()} metric point(s) not logged",
                    file=sys.stderr,
                )
                return
            time.sleep(delay)
            delay = min(delay * 2, 10.0)

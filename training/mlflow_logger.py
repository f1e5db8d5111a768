"""Metric logging to MLflow from one process, buffered so that a flaky server loses nothing.

Metrics are queued with their step and timestamp and sent with `log_batch`. A failed send keeps
the queue and is retried at the next flush; `close()` retries until `close_timeout` before it
gives up, and then it says how many points were lost instead of failing the run.
"""

from __future__ import annotations

import sys
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
        self._last_flush = time.monotonic()
        self.close_timeout = close_timeout
        self._queue: list[Any] = []
        self._client: Any = None
        if run_id is not None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=tracking_uri)
        self._warned = False

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.run_id is None:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self._queue += [Metric(k, float(v), ts, step) for k, v in metrics.items()]
        # Points reach the UI within seconds, and a long outage is retried at every flush.
        due = time.monotonic() - self._last_flush >= self.flush_seconds
        if len(self._queue) >= self.flush_every or due:
            self._last_flush = time.monotonic()
            self.flush()

    def flush(self) -> bool:
        """Send what is queued, keeping it on failure for the next try. True when all is sent."""
        while self._queue:
            batch = self._queue[:1000]  # MLflow's per-request limit
            try:
                self._client.log_batch(self.run_id, metrics=batch, synchronous=True)
            except Exception as e:  # the server may be restarting: keep the points
                if not self._warned:
                    print(
                        f"[mlflow] logging failed, buffering {len(self._queue)} point(s): "
                        f"{type(e).__name__}: {str(e)[:200]}",
                        file=sys.stderr,
                    )
                    self._warned = True
                return False
            del self._queue[: len(batch)]
            self._warned = False
        return True

    def close(self) -> None:
        deadline = time.monotonic() + self.close_timeout
        delay = 0.5
        while not self.flush():
            if time.monotonic() > deadline:
                print(
                    f"[mlflow] gave up: {len(self._queue)} metric point(s) not logged",
                    file=sys.stderr,
                )
                return
            time.sleep(delay)
            delay = min(delay * 2, 10.0)

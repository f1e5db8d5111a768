"""training.mlflow_logger: the step loop never waits for MLflow, and nothing is lost.

A real MLflow store (SQLite in tmp_path); only the slowness of a remote server is simulated, by
delaying the real client's `log_batch`.
"""

from __future__ import annotations

import time

import pytest

from training.mlflow_logger import MetricLogger


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """One SQLite store for the module (creating its schema takes seconds), one experiment."""
    import mlflow

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    return uri, mlflow.MlflowClient(tracking_uri=uri).create_experiment("t")


def _run(store: tuple[str, str]) -> tuple[str, str]:
    import mlflow

    uri, experiment = store
    return uri, mlflow.MlflowClient(tracking_uri=uri).create_run(experiment).info.run_id


def test_log_never_waits_for_a_slow_server_and_close_sends_everything(
    store: tuple[str, str],
) -> None:
    import mlflow

    uri, run_id = _run(store)
    logger = MetricLogger(uri, run_id, flush_every=10, flush_seconds=0.05)
    real, sends = logger._client.log_batch, []

    def slow(*args: object, **kwargs: object) -> None:
        time.sleep(0.3)  # a server round trip
        sends.append(len(kwargs["metrics"]))  # type: ignore[arg-type]
        real(*args, **kwargs)

    logger._client.log_batch = slow
    t0 = time.perf_counter()
    for step in range(1, 101):
        logger.log({"train/loss": 1.0 / step, "train/lr": 0.1}, step=step)
    logging_s = time.perf_counter() - t0
    # 100 steps of logging took far less than one send: the sends happened on the thread.
    assert logging_s < 0.3, logging_s
    logger.close()
    assert logger.pending() == 0 and sum(sends) == 200
    history = mlflow.MlflowClient(tracking_uri=uri).get_metric_history(run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(s, 1.0 / s) for s in range(1, 101)]


def test_failed_sends_keep_the_points_until_the_server_is_back(
    store: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    import mlflow

    uri, run_id = _run(store)
    logger = MetricLogger(uri, run_id, flush_every=1, flush_seconds=0.01, close_timeout=30)
    real, down = logger._client.log_batch, [True]

    def flaky(*args: object, **kwargs: object) -> None:
        if down[0]:
            raise ConnectionError("server restarting")
        real(*args, **kwargs)

    logger._client.log_batch = flaky
    for step in range(1, 21):
        logger.log({"train/loss": float(step)}, step=step)
    time.sleep(0.2)  # several flushes fail meanwhile
    assert logger.pending() == 20
    down[0] = False
    logger.close()
    assert logger.pending() == 0
    assert "logging failed, buffering" in capsys.readouterr().err
    history = mlflow.MlflowClient(tracking_uri=uri).get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, 21))

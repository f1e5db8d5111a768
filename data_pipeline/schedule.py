"""Where the prepare job's units run: ordered Ray tasks on a fixed number of CPUs."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from data_pipeline.inputs import GzRanges
from data_pipeline.worker import process_unit, worker_key


def run_units(
    units: list[dict[str, Any]],
    worker_args: dict[str, Any],
    n_workers: int,
    cpus: float,
    start: int = 0,
) -> Iterator[tuple[int, pa.Table | None]]:
    """The units' tables, in unit order, computed by Ray tasks on at most `n_workers` CPUs.

    Plain Ray tasks rather than Ray Data: its streaming executor polls for finished tasks
    and hands out the next unit only after a round trip, which left each worker idle 0.3 to
    0.5 s between units (the benchmark's worker phase took 2.5 s instead of 1.7 s). Here a
    slot is refilled as soon as a task ends. Tasks, not actors: Ray runs them in its already
    started worker processes, where the built ShardWorker stays cached (`process_unit`), so
    a prepare does not start processes and rebuild the tokenizer.

    Each task is a streaming generator: a unit's output leaves the worker in tables of about
    OUTPUT_BYTES. At most 2 x `n_workers` + 1 units are in flight or finished and waiting
    for their turn in the object store, so memory is bounded. A task whose worker dies is
    retried by Ray (which replays the generator and skips what was already delivered); an
    exception in one fails the prepare.
    """
    import ray

    remote = ray.remote(process_unit).options(num_cpus=cpus, max_retries=3, num_returns="streaming")
    key, args_ref = worker_key(worker_args), ray.put(worker_args)
    # Whole files (those that cannot be cut into ranges), biggest first, are submitted
    # before the ranges, so that a big one is not the last task, run by one worker while the
    # others idle; the results still come back in unit order.
    size = [u["end"] - u["start"] if u.get("whole") else -1 for u in units]
    order = deque(sorted(range(start, len(units)), key=lambda i: -size[i]))
    streams: dict[int, Any] = {}  # submitted and not yet taken whole
    running: set[Any] = set()  # the completion refs of tasks still running
    gz = GzRanges()

    def submit(i: int) -> None:
        order.popleft() if order[0] == i else order.remove(i)
        unit = {**units[i], "data": gz.read(units[i])} if units[i].get("gz") else units[i]
        streams[i] = remote.remote(unit, key, args_ref)
        running.add(streams[i].completed())

    try:
        for head in range(start, len(units)):
            while True:
                # Fill the free CPU slots: the unit to yield next first, then the rest in
                # order while the window has room.
                while len(running) < n_workers and (head not in streams or order):
                    if head not in streams:
                        submit(head)
                    elif len(streams) < 2 * n_workers:
                        submit(order[0])
                    else:
                        break
                stream = streams.get(head)
                if stream is not None:
                    while stream.next_ready() and (ref := next(stream, None)) is not None:
                        yield head, ray.get(ref)
                    if stream.is_finished():
                        break
                    if stream.completed() not in running:  # ended: the rest is on its way
                        yield from ((head, ray.get(ref)) for ref in stream)
                        break
                # Until the head has more output or any task ends (a slot to refill).
                waitables = list(running) + ([stream] if stream is not None else [])
                done, _ = ray.wait(waitables, num_returns=1)
                running.difference_update(done)
            del streams[head]
            yield head, None  # the unit is complete
    finally:
        gz.close()

"""The local Ray that ift starts when it joins no cluster (`start`), and the set-up of each of its
worker processes (`quiet_workers`).

Ray imports this module in each worker as it starts (`worker_process_setup_hook`), prepare's
included, so it imports nothing heavy at the top.
"""

from __future__ import annotations

import logging
import os

# Ray Train's PlacementGroupCleaner asks Ray's state API, which needs the dashboard, whether the
# train controller is still alive. The local Ray runs without a dashboard, so every check fails
# and logs a warning, once a second: 101 of ift.log's 262 lines in the mixture recipe's run. What it
# guards against, a placement group left behind by a controller that died, cannot outlive a
# local Ray, which ends with the ift process. Its errors still show.
PG_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"

# Ray Train settings for a run on the local Ray only (set unless the user set them). Its
# PreemptionWatcher is one more actor polling the GCS every 5 s for nodes being drained by a
# cloud autoscaler (spot reclaims, scale-down), which a single local node never is; on 2 cores
# each idle actor costs ~0.4% of the machine (benchmarks/train.py's `ift_cpu`).
LOCAL_TRAIN_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def quiet_workers() -> None:
    logging.getLogger(PG_CLEANER_LOGGER).setLevel(logging.ERROR)


def start(num_cpus: int | None, logging_level: int = logging.WARNING, **kwargs: object) -> None:
    """Start a new local Ray, as every local ift run (and its tests and benchmarks) does.

    A new one, never one `ray start` left running on this host; on loopback without a dashboard
    (Ray 2.60 has no loopback-only mode: it swaps 127.0.0.1 for the host IP and its gRPC servers
    listen on all interfaces, so its token authentication and the host firewall guard the
    ports); each worker set up by `quiet_workers`. `kwargs` go to `ray.init` as they are.
    """
    import ray

    for key, value in LOCAL_TRAIN_ENV.items():
        os.environ.setdefault(key, value)  # read by the train controller this process creates
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        logging_level=logging_level,
        _node_ip_address="127.0.0.1",
        runtime_env={"worker_process_setup_hook": "launcher.local_ray.quiet_workers"},
        **kwargs,  # type: ignore[arg-type]
    )

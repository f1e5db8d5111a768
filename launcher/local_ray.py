"""Set-up of every worker process of the local Ray that ift starts (`pipeline.ensure_ray`).

Ray imports this in each worker as it starts (`worker_process_setup_hook`), prepare's included,
so it imports nothing heavy.
"""

from __future__ import annotations

import logging

# Ray Train's PlacementGroupCleaner asks Ray's state API, which needs the dashboard, whether the
# train controller is still alive. The local Ray runs without a dashboard, so every check fails
# and logs a warning, once a second: 101 of ift.log's 262 lines in the mixture recipe's run. What it
# guards against, a placement group left behind by a controller that died, cannot outlive a
# local Ray, which ends with the ift process. Its errors still show.
PG_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def quiet_workers() -> None:
    logging.getLogger(PG_CLEANER_LOGGER).setLevel(logging.ERROR)

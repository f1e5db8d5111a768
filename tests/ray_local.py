"""The local Ray the integration and reliability tests start."""

from __future__ import annotations

import logging


def start_local_ray(logging_level: int = logging.ERROR) -> None:
    """A new 2-CPU local Ray as ift starts one (`launcher.local_ray.start`); never joins a
    cluster someone else started on this machine (tests/integration/conftest.py starts one)."""
    from launcher import local_ray

    local_ray.start(2, logging_level)

"""Shared fixtures of the reliability suite: one small local Ray per test module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "tests" / "assets"
TINY_MODEL = ASSETS / "models" / "stories260K"


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """A fresh local Ray on loopback with 2 CPUs, shut down when the module is done."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():  # a module before this one left its Ray running
        ray.shutdown()
    ray.init(
        address="local",  # never join a cluster someone else started on this machine
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        logging_level="ERROR",
    )
    yield
    ray.shutdown()

"""Shared fixtures of the reliability suite: one small local Ray per test module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ray_local import start_local_ray

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "tests" / "assets"
TINY_MODEL = ASSETS / "models" / "stories260K"


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """A fresh local Ray on loopback with 2 CPUs, shut down when the module is done."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():  # a module before this one left its Ray running
        ray.shutdown()
    start_local_ray()
    yield
    ray.shutdown()

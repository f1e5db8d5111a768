"""The local Ray the integration and reliability tests start."""

from __future__ import annotations


def start_local_ray(logging_level: str = "ERROR") -> None:
    """A new 2-CPU local Ray on loopback without dashboard; never joins a cluster someone else
    started on this machine (tests/integration/conftest.py starts one)."""
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        logging_level=logging_level,
    )

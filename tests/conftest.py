"""Shared fixtures: one local Ray session for the whole run, seeded torch."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

SHARED_DATA_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


@pytest.fixture(autouse=True)
def _seed_torch():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray with 2 CPUs, shared by every test that needs it."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def shared_data_dir() -> str:
    """The machine's offline copy of the benchmark datasets (../shared/data)."""
    path = os.path.abspath(os.environ.get("AUTODROPOUT_DATA_DIR", SHARED_DATA_DIR))
    if not os.path.isdir(path):
        pytest.skip(f"no shared data directory at {path}")
    return path

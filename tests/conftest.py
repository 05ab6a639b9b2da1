"""Shared fixtures. Tests that need the real data in ../shared/data take its path from here."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _shared_data_root() -> Path:
    env = os.environ.get("SIAMAE_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of ../shared/data (or $SIAMAE_SHARED_DATA); skips the test where it is absent."""
    root = _shared_data_root()
    if not root.is_dir():
        pytest.skip(
            f"real data not found at {root}; set SIAMAE_SHARED_DATA to the shared/data folder"
        )
    return root


# The one place that sets the suite's threads: 1 per process, so that loader workers, DDP
# processes and the CLI subprocesses tests start (which inherit this environment and whose
# thread policy honours OMP_NUM_THREADS) never ask for more threads than the machine has free,
# and the suite's time does not depend on what else runs there.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"


@pytest.fixture(autouse=True)
def _few_threads() -> None:
    torch.set_num_threads(1)

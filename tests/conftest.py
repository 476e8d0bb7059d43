"""Shared test fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest-xdist runs one worker per core: one intra-op thread each, so workers do not oversubscribe.
    # (torch is imported here, not above: the controlling process starts the workers without it, 2-3 s sooner.)
    import torch

    torch.set_num_threads(1)

SHARED = Path(os.environ.get("HUB_CCROP_SHARED", Path(__file__).resolve().parents[2] / "shared"))


@pytest.fixture(scope="session")
def cifar10_parquet() -> Path:
    """The local CIFAR-10 train parquet from ../shared (skips when absent)."""
    files = sorted((SHARED / "data" / "cifar10" / "plain_text").glob("train-*.parquet"))
    if not files:
        pytest.skip(f"CIFAR-10 parquet not found under {SHARED}/data/cifar10")
    return files[0]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread is as fast and far steadier on a busy 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

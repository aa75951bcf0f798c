"""Shared fixtures: the real datasets beside the checkout, and small fast audit settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fairrecon import runners

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    """../shared/datasets (FashionMNIST, MNIST in torchvision's layout). CI has it; elsewhere it may be absent."""
    if not (SHARED_DATASETS / "FashionMNIST" / "raw").is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"CI must have the shared datasets at {SHARED_DATASETS}")
        pytest.skip(f"no shared datasets at {SHARED_DATASETS}")
    return SHARED_DATASETS


# Settings for audits that must finish in a few seconds on two CPU cores.
FAST = dict(seeds=2, epochs=3, batch_size=64, latent=8, hidden=64, device="cpu")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread is as fast, and far faster on a shared, loaded machine.
    A module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    with runners.one_thread():
        yield


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """The CLI entry point in-process (no interpreter start-up): exit status, stdout, stderr."""
    from fairrecon.cli import main

    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return exit_.value.code, out, err

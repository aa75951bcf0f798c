"""Shared fixtures: the real datasets beside the checkout, small fast audit settings, and the one cache of
small trained audits that test modules share (`trained`)."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fairrecon import AuditResult, run_audit, runners

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

# The audits `trained` shares between test modules. SMALL: digits (600 training images, all 359 test
# images), the four default losses, FAST with 3 seeds (so every interval exists), still learning after
# 3 epochs: reports, figures, curves, the browser. TINY: a finished folder in a second (64 images, 1 seed):
# the CLI, bad inputs, folder identity.
SMALL_AUDIT: dict[str, Any] = dict(dataset="digits", limit=600, **{**FAST, "seeds": 3})
TINY_AUDIT: dict[str, Any] = dict(
    dataset="digits", limit=64, test_limit=64, losses=("l2", "l1"), seeds=1, epochs=1, latent=4, hidden=16, device="cpu"
)
# TINY_AUDIT as `fairrecon audit` flags: the same spec, so a run with them into a copy of its folder resumes it.
TINY_AUDIT_FLAGS = [
    *("--dataset", "digits", "--limit", "64", "--test-limit", "64", "--losses", "l2,l1", "--seeds", "1"),
    *("--epochs", "1", "--latent", "4", "--hidden", "16", "--device", "cpu"),
]


@dataclass(frozen=True)
class TrainedAudit:
    """A finished audit: its result, its results folder and its log lines. The folder is shared by every
    test that asks for the same settings: read it, or `copy_to` a folder of the test's own to change it."""

    result: AuditResult
    folder: Path
    log: tuple[str, ...]

    def copy_to(self, folder: Path) -> Path:
        shutil.copytree(self.folder, folder)
        return folder


class AuditCache:
    """`trained(**settings)`: run_audit(**settings) with a results folder, once per distinct settings per
    test session. Results do not depend on which test asks first: an audit is deterministic on the CPU.
    Each call gets its own copy of the result, so a test that changes it changes nobody else's."""

    def __init__(self, root: Path):
        self.root = root
        self.audits: dict[str, TrainedAudit] = {}
        self.digests: dict[Path, str] = {}

    def __call__(self, **settings: Any) -> TrainedAudit:
        key = repr(sorted(settings.items()))
        if key not in self.audits:
            folder = self.root / f"audit{len(self.audits)}"
            log: list[str] = []
            result = run_audit(**settings, out=str(folder), log=log.append)
            self.audits[key] = TrainedAudit(result, folder, tuple(log))
            self.digests[folder] = _digest(folder)
        return dataclasses.replace(self.audits[key], result=copy.deepcopy(self.audits[key].result))

    def changed(self) -> list[str]:
        """The shared folders some test wrote into (it should have copied them)."""
        return [str(folder) for folder, digest in self.digests.items() if _digest(folder) != digest]


def _digest(folder: Path) -> str:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return hashlib.sha256(b"".join(str(p).encode() + p.read_bytes() for p in files)).hexdigest()


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """The one cache of small trained audits shared by the test modules (see AuditCache). At the end of the
    session it checks that no test wrote into a shared folder."""
    cache = AuditCache(tmp_path_factory.mktemp("trained"))
    yield cache
    changed = cache.changed()
    assert not changed, f"tests wrote into shared audit folders (copy them first): {changed}"


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

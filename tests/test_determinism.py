"""Determinism: the same spec and seeds on CPU give bit-identical per-sample numbers.

(Across processes, and across an interruption, tests/test_resume.py checks the same.)
On CUDA, cuBLAS/cuDNN may pick non-deterministic kernels: fairrecon does not force
torch.use_deterministic_algorithms, so GPU reruns agree to float tolerance, not bits.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fairrecon import run_audit

TINY = dict(dataset="digits", limit=128, test_limit=64, epochs=1, batch_size=32, latent=8, hidden=32, device="cpu")
ALL_LOSSES = ("l1", "l2", "log-mse", "learned-sigma")


@pytest.fixture(scope="module")
def twice():
    return [run_audit(**TINY, losses=ALL_LOSSES, seeds=2) for _ in range(2)]


@pytest.mark.slow
def test_same_spec_same_bits_on_cpu(twice):
    a, b = twice
    for name in ("samples", "cells", "history", "groups"):
        pd.testing.assert_frame_equal(getattr(a, name), getattr(b, name), check_exact=True)


def test_same_spec_same_bits_on_cpu_conv():
    a, b = (run_audit(**TINY, model="conv", losses=("learned-sigma",), seeds=1) for _ in range(2))
    pd.testing.assert_frame_equal(a.samples, b.samples, check_exact=True)


@pytest.mark.slow
def test_seeds_and_split_seed_change_the_numbers(twice):
    """The comparisons above can fail: another seed, or another split, gives other per-sample numbers."""
    samples = twice[0].samples
    for loss in ALL_LOSSES:
        by_seed = [samples.loc[(samples["loss"] == loss) & (samples["seed"] == s), "mse"].to_numpy() for s in (0, 1)]
        assert not np.array_equal(*by_seed)
    split = run_audit(**{**TINY, "epochs": 1}, losses=("l2",), seeds=1, split_seed=1)
    assert not np.array_equal(
        split.samples["index"].to_numpy(), samples.loc[samples["loss"] == "l2", "index"].to_numpy()[:64]
    )

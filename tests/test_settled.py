"""The notion of "settled" (fairrecon/settled.py), against closed forms and independent computations (scipy's
linregress and t quantiles), on constructed curves: a power law, a planted trend with known noise, a plateau
followed by a fall, and the old rules' misleading cases."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO
from scipy import stats as sps

from fairrecon import settled
from fairrecon.errors import ExitCode


def _old_rules():
    """benchmarks/settled.py: the stopping rule before this version, kept there for the comparison."""
    spec = importlib.util.spec_from_file_location("benchmarks_settled", REPO / "benchmarks" / "settled.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_an_exact_power_law_projects_its_own_fall():
    """error = c x step^-p: the trend's slope is -p with no scatter, so as much training again lowers it by
    exactly 1 - 2^-p, and it is settled exactly when that is at most DROP."""
    steps = np.arange(1, 41) * 30.0
    for p in (0.0, 0.05, 0.07, 0.08, 0.3):
        v = 0.02 * steps**-p
        tr = settled.trend(steps, v)
        assert tr.slope == pytest.approx(-p, abs=1e-12) and tr.se == pytest.approx(0.0, abs=1e-12)
        assert settled.projected_fall(steps, v) == pytest.approx(1 - 2**-p, abs=1e-12)
        assert settled.error_settled(steps, v) == (1 - 2**-p <= settled.DROP)  # 0.07: 4.7%, 0.08: 5.4%
    rising = 0.02 * steps**0.2  # more training would not lower it: settled
    assert settled.projected_fall(steps, rising) < 0 and settled.error_settled(steps, rising)
    assert not settled.error_settled(steps[:2], steps[:2])  # too few points to judge


def test_the_fit_uses_the_last_half_of_training_in_log_steps():
    """Only points with step >= half the last step count: what happened before cannot change the trend."""
    steps = np.arange(1, 21) * 10.0
    late = 0.01 * (steps / 200) ** -0.2
    early_junk = np.where(steps < 100, 5.0 * np.exp(-steps / 7), late)
    assert settled.window_start(steps) == 9  # step 100 of 200
    assert settled.trend(steps, early_junk).slope == pytest.approx(-0.2, abs=1e-12)


def test_a_planted_trend_with_noise_gives_the_regression_bound():
    """log(error) = a + b log(step) + noise: the fall bound is 1 - exp((b_hat - t_{k-2, 0.95} se_hat) log 2)
    with b_hat, se_hat from scipy's linregress on the last half."""
    rng = np.random.default_rng(3)
    steps = np.arange(1, 31) * 50.0
    for b, noise in ((-0.02, 0.01), (-0.1, 0.02), (0.0, 0.05)):
        v = np.exp(-3.0 + b * np.log(steps) + rng.normal(0, noise, len(steps)))
        k = steps >= steps[-1] / 2
        fit = sps.linregress(np.log(steps[k]), np.log(v[k]))
        bound = 1 - np.exp((fit.slope - sps.t.ppf(0.95, k.sum() - 2) * fit.stderr) * np.log(2))
        assert settled.fall_bound(steps, v) == pytest.approx(bound, rel=1e-9)
        assert settled.error_settled(steps, v) == (bound <= 0.05)
    # columns are fitted independently, as each group's error is
    two = np.stack([0.01 * steps**-0.3, 0.02 * steps**-0.01], axis=1)
    np.testing.assert_allclose(settled.projected_fall(steps, two), [1 - 2**-0.3, 1 - 2**-0.01], atol=1e-12)


def _plateau_then_fall(epochs: int, *, fall_at: int) -> np.ndarray:
    """A validation error that falls (power law) to epoch 20, stays flat (a plateau, with 0.2% noise), and falls
    again from `fall_at` on, as Adam at a constant learning rate does."""
    rng = np.random.default_rng(0)
    e = np.arange(1, epochs + 1, dtype=float)
    v = 0.05 * np.minimum(e, 20) ** -0.5
    v = np.where(e > fall_at, v * (e / fall_at) ** -0.4, v)
    return v * np.exp(rng.normal(0, 0.002, epochs))


def test_stopping_waits_out_a_plateau_when_the_fall_follows_within_the_horizon():
    """A plateau from epoch 20 to 30, then the error falls again (as Adam at a constant learning rate does):
    the rule before this version (every last-quarter trend within 5%, after 16 epochs) stopped at epoch 24,
    though the fall followed within as much training again; the new rule never stops on this plateau, whose
    epochs never make up most of the last half of training. A plateau that lasts does stop it, once the last
    half of training holds at most a 5% fall (at epoch 35: 15 flat epochs)."""
    steps = np.arange(1, 61) * 20.0  # 20 steps per epoch: the plateau is past AUTO_MIN_STEPS (500)

    def first_stop(val, old: bool = False) -> int | None:
        if old:
            rule = _old_rules().old_rule
            return next((e for e in range(1, len(val) + 1) if rule(steps[:e], val[:e], np.ones((e, 1)), e)), None)
        return next((e for e in range(1, len(val) + 1) if settled.stops(steps[:e], val[:e, None], e)[0]), None)

    resumes = _plateau_then_fall(60, fall_at=30)[:, None]  # (epochs, groups)
    assert first_stop(resumes, old=True) == 24  # the old rule stopped on the plateau
    stop = first_stop(resumes)
    assert stop is None or stop > 30
    lasts = _plateau_then_fall(60, fall_at=1000)[:, None]
    assert first_stop(lasts, old=True) == 24
    assert first_stop(lasts) == 35


def test_stops_needs_every_group_settled_and_the_minimum_epochs():
    steps = np.arange(1, 41) * 20.0
    flat, falling = 0.01 * steps**-0.01, 0.01 * steps**-0.4
    val = np.stack([np.stack([flat, flat], 1), np.stack([flat, falling], 1)], 1)  # (T, 2 cells, 2 groups)
    assert settled.stops(steps, val, 40).tolist() == [True, False]
    assert settled.stops(steps[:10], val[:10], 10).tolist() == [False, False]  # before AUTO_MIN_EPOCHS


def test_stopping_waits_for_the_minimum_steps():
    """A settled flat curve does not stop a cell before AUTO_MIN_STEPS optimizer steps (the last point's step),
    whatever the epoch: at 11 steps an epoch (digits) the first epoch that may stop is 46 (506 steps), not 16."""
    assert settled.AUTO_MIN_STEPS == 500
    steps = np.arange(1, 61) * 11.0
    val = (0.01 * steps**-0.001)[:, None, None]  # one cell, one group, flat: settled from the start
    first = next(e for e in range(1, 61) if settled.stops(steps[:e], val[:e], e)[0])
    assert first == 46 and steps[first - 1] >= 500 > steps[first - 2]


def test_seed_drift_is_the_t_interval_of_the_mean_slope():
    rng = np.random.default_rng(5)
    steps = np.arange(1, 21) * 25.0
    slopes = np.array([0.05, -0.02, 0.08, 0.01, 0.03])
    curves = [(steps, 1.1 * steps**b * np.exp(rng.normal(0, 0.01, 20))) for b in slopes]
    drift = settled.seed_drift(curves)
    k = steps >= steps[-1] / 2
    fitted = np.array([sps.linregress(np.log(steps[k]), np.log(v[k])).slope for _, v in curves])
    np.testing.assert_allclose(drift.slopes, fitted, rtol=1e-9)
    low, high = sps.t.interval(0.90, 4, loc=fitted.mean(), scale=sps.sem(fitted))  # one-sided 95% each side
    assert (drift.low, drift.high) == pytest.approx((low * np.log(2), high * np.log(2)), rel=1e-9)
    assert drift.estimate == pytest.approx(fitted.mean() * np.log(2), rel=1e-12)
    one = settled.seed_drift(curves[:1])
    assert one.seeds == 1 and np.isnan(one.low)  # one seed: no spread to judge by
    assert not settled.could_change(0.1, 0.3, 0.0, one.low, one.high)


@pytest.mark.parametrize(
    "interval, shift, changes",
    [
        ((0.10, 0.30), (0.02, 0.09), False),  # clear, the gap growing away from the boundary: never refused
        ((0.10, 0.30), (-0.12, 0.01), True),  # clear, could fall to 0.10 - 0.12 < 0
        ((0.10, 0.30), (-0.10, 0.01), True),  # reaching the boundary exactly counts
        ((0.10, 0.30), (-0.09, 0.01), False),
        ((-0.05, 0.20), (-0.04, 0.04), False),  # no clear gap, the drift too small to leave "across"
        ((-0.05, 0.20), (-0.01, 0.06), True),  # could become clear
        ((-0.25, 0.03), (-0.05, 0.01), True),  # the other side could become clear
        ((-0.30, -0.10), (-0.01, 0.12), True),  # below: could rise to it
        ((0.10, 0.30), (np.nan, np.nan), False),  # a drift that cannot be judged refuses nothing
    ],
)
def test_could_change_on_each_side_of_the_boundary(interval, shift, changes):
    assert settled.could_change(*interval, 0.0, *shift) == changes


def test_settled_imports_no_torch():
    """settled.py is numpy and scipy only, so the statistics can use the notion without importing training."""
    code = (
        "import importlib.util, sys; "
        f"spec = importlib.util.spec_from_file_location('settled', {str(REPO / 'fairrecon' / 'settled.py')!r}); "
        "m = sys.modules['settled'] = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
        "print('torch' in sys.modules, 'numpy' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]


@pytest.mark.parametrize("per_doubling, code", [(0.10, 1), (-0.25, 3), (0.0, 1)])
def test_the_gate_refuses_a_ratio_decision_that_more_training_could_reverse(per_doubling, code):
    """`check --max-ratio R` fails a loss whose ratio lower end is above R, unless the ratio's drift could take
    that lower end back to R within as much training again (then: insufficient data, exit 3); a gap growing
    away from R fails as before. The verdict (at ratio 1) is a clear gap in every case."""
    from test_stats import _curves, simulate, synthetic_result

    from fairrecon import gate, stats

    rng = np.random.default_rng(21)
    values, codes = simulate(rng, seeds=4, n=(80, 80), means=(0.010, 0.016), seed_sd=0.0003)
    result = synthetic_result({"l1": values}, codes)
    result.curves = _curves(result, per_doubling / np.log(2) + np.array([-0.01, 0.005, 0.01, -0.005]), noise=0.004)
    row = stats.analyse(result).disparities.iloc[0]
    assert row.verdict == stats.CLEAR and row.ratio_lcb > 1.3
    outcome = gate.check(result, max_ratio=1.3)
    assert outcome.code == code, outcome.message
    expected = row.ratio_lcb * row.drift_low <= 1.3
    assert (code == ExitCode.INSUFFICIENT) == expected
    if code == ExitCode.INSUFFICIENT:
        assert "the decision at --max-ratio 1.3 had not settled" in outcome.message


@pytest.mark.parametrize("per_doubling, code", [(0.10, 3), (0.0, 0), (-0.10, 0)])
def test_the_gate_refuses_a_pass_that_more_training_could_reverse(per_doubling, code):
    """A pass (every upper end below R) that the ratio's drift could carry up to R within as much training again is
    insufficient data (exit 3): U x drift_high >= R; a ratio steady or falling away from R passes. Closed form:
    the outcome is exactly the computed projection of the row's upper end."""
    from test_stats import _curves, simulate, synthetic_result

    from fairrecon import gate, stats

    rng = np.random.default_rng(21)
    values, codes = simulate(rng, seeds=4, n=(80, 80), means=(0.010, 0.016), seed_sd=0.0003)
    result = synthetic_result({"l1": values}, codes)
    result.curves = _curves(result, per_doubling / np.log(2) + np.array([-0.01, 0.005, 0.01, -0.005]), noise=0.004)
    row = stats.analyse(result).disparities.iloc[0]
    assert row.verdict == stats.CLEAR
    threshold = round(float(row.ratio_ucb) * 1.05, 3)  # the upper end is 5% below R: a drift of +10% reaches it
    outcome = gate.check(result, max_ratio=threshold)
    assert outcome.code == code, outcome.message
    assert (code == ExitCode.INSUFFICIENT) == (row.ratio_ucb * row.drift_high >= threshold)
    if code == ExitCode.INSUFFICIENT:
        assert f"the decision at --max-ratio {threshold:g} had not settled" in outcome.message
        assert "its upper end" in outcome.message


def test_a_verdict_unsettled_at_ratio_1_leaves_a_loose_threshold_to_its_own_rule():
    """No clear gap whose ratio is rising: the verdict waits (its lower end could pass 1 in as much training again),
    but `check --max-ratio R` with R well above the upper end, which that drift cannot reach (U x drift_high < R),
    passes; a threshold the drift can reach (U x drift_high >= R) is insufficient data; --max-gap, whose drift is
    not judged, keeps the verdict's refusal."""
    from test_stats import _curves, simulate, synthetic_result

    from fairrecon import gate, stats

    rng = np.random.default_rng(5)
    values, codes = simulate(rng, seeds=4, n=(80, 80), means=(0.010, 0.0101), seed_sd=0.0003)
    result = synthetic_result({"l1": values}, codes)
    result.curves = _curves(result, 0.10 / np.log(2) + np.array([-0.01, 0.005, 0.01, -0.005]), noise=0.004)
    row = stats.analyse(result).disparities.iloc[0]
    assert row.verdict == stats.INSUFFICIENT and row.unsettled and "had not settled" in row.warnings
    assert row.ratio_lcb <= 1 < row.ratio_lcb * row.drift_high  # the verdict's own rule, by hand
    loose = round(float(row.ratio_ucb * row.drift_high) * 1.05, 3)
    assert gate.check(result, max_ratio=loose).code == ExitCode.PASS
    reachable = round(float(row.ratio_ucb * row.drift_high) * 0.99, 3)
    assert row.ratio_ucb < reachable
    outcome = gate.check(result, max_ratio=reachable)
    assert outcome.code == ExitCode.INSUFFICIENT and f"--max-ratio {reachable:g} had not settled" in outcome.message
    assert gate.check(result, max_ratio=loose, max_gap=1.0).code == ExitCode.INSUFFICIENT

"""What the terminal and the reports print, where it used to mislead (issue 20 items 7 and 9): the total time,
the not-converged noise before the answer, fractional epochs."""

from __future__ import annotations

import re
import time

import pandas as pd
from conftest import FAST, run_cli

from fairrecon.dynamics import GAP_COLUMNS, epoch_text, worse_group_changes


def test_the_audit_prints_its_answer_first_and_one_convergence_line_per_loss(tmp_path, capsys):
    """3 epochs: every cell is still learning. stderr used to carry a line per cell (20 by default) before the
    answer; now the statistics' warnings say it once per loss, after the table, naming the cells. The total
    time counts the statistics and writing the results too (it used to stop before them)."""
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in FAST.items()]
    start = time.perf_counter()
    code, out, err = run_cli(capsys, "audit", *flags, "--threads", "1", "--out", tmp_path / "results")
    wall = time.perf_counter() - start
    assert code == 0, err
    assert "not converged" not in err
    lines = out.splitlines()
    said = [i for i, line in enumerate(lines) if "not converged" in line]
    losses = ("l1", "l2", "log-mse", "learned-sigma")
    assert len(said) == len(losses)
    table = next(i for i, line in enumerate(lines) if "worst group" in line)
    assert table < min(said)  # after the answer, not before it
    for loss, i in zip(losses, said):
        assert lines[i].startswith(f"warning: {loss}:") and all(f"{loss}/seed{s}" in lines[i] for s in range(2))
    total = re.search(
        r"^total ([\d.]+) s \(audit ([\d.]+) s, statistics ([\d.]+) s, writing results ([\d.]+) s\) on cpu", err, re.M
    )
    assert total, err
    whole, audit, stats, writing = map(float, total.groups())
    assert writing > 0 and audit + stats + writing <= whole + 0.15 <= wall + 0.2  # each printed to 0.1 s


def test_epochs_read_as_people_write_them():
    """Curve points fall at steps, so their epochs are fractions: 22 steps at 3 per epoch is 7.333... It used to
    print as 'epoch 7.33333'."""
    assert [epoch_text(e) for e in (22 / 3, 2.5, 12.0, 49.96, 0.04, 1 / 3)] == [
        "7.3",
        "2.5",
        "12",
        "50",
        "0.04",
        "0.33",
    ]
    steps = [3, 22, 41, 60]
    gaps = pd.DataFrame(
        [
            dict(zip(GAP_COLUMNS, ["l1", s, s / 3, "a", "b", 2, 10, gap, gap, gap, "a" if gap > 0 else "b"]))
            for s, gap in zip(steps, (-0.1, 0.2, 0.2, 0.3))
        ]
    )
    (sentence,) = worse_group_changes(gaps).values()
    assert sentence == "l1: the b group was worse until epoch 1, the a group from epoch 7.3 on"
    assert not re.search(r"\d\.\d{2,}", sentence)

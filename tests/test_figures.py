"""Figure layout that can be measured: the frontier's labels (issue 20 item 9: at 1280 px they overlapped)."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
from matplotlib.text import Text

from fairrecon.figures import _renderer, frontier_figure, label_points
from fairrecon.html_report import _png


def frontier(points: dict[str, tuple[float, float]]) -> pd.DataFrame:
    """A frontier table as stats.Analysis.frontier has it, for the given (overall, ratio) per loss."""
    rows = []
    for loss, (overall, ratio) in points.items():
        rows.append(
            dict(loss=loss, metric="mse", overall=overall, overall_low=overall * 0.9, overall_high=overall * 1.1,
                 ratio=ratio, ratio_low=ratio - 0.1, ratio_high=ratio + 0.1, pareto=True, verdict="no clear gap")
        )  # fmt: skip
    return pd.DataFrame(rows)


def label_boxes(fig):
    _png(fig)  # lay out and draw, as the report does
    renderer = _renderer(fig)
    ax = fig.axes[0]
    return ax, {t.get_text(): Text.get_window_extent(t, renderer) for t in ax.texts}  # the text, not its leader


@pytest.mark.parametrize(
    "points",
    [
        # the audit of issue 20: learned-sigma and log-mse 2% apart on both axes
        {
            "l1": (0.00269, 1.087),
            "l2": (0.00316, 1.033),
            "log-mse": (0.00145, 1.175),
            "learned-sigma": (0.00141, 1.181),
        },
        # eight losses in a tight cluster, and one far away that stretches the axes
        {**{f"mix:{a / 10:g}": (0.0014 + a * 1e-6, 1.1 + a * 1e-3) for a in range(8)}, "l2": (0.01, 2.0)},
    ],
)
def test_frontier_labels_do_not_overlap_each_other_or_the_points(points):
    fig = frontier_figure(frontier(points), 0.95)
    ax, boxes = label_boxes(fig)
    assert sorted(boxes) == sorted(points)  # every loss is labelled once
    for (a, box_a), (b, box_b) in itertools.combinations(boxes.items(), 2):
        assert not box_a.overlaps(box_b), (a, b)
    pixels = ax.transData.transform(np.array(list(points.values())))
    for name, box in boxes.items():
        assert ax.get_window_extent().contains(box.x0, box.y0) and ax.get_window_extent().contains(box.x1, box.y1)
        for x, y in pixels:  # no label covers a marker's centre, its own included
            assert not box.contains(x, y), name


def test_a_label_goes_beside_its_point_when_there_is_room():
    """Alone, a label sits next to its point (the first ring), without a leader line."""
    fig = frontier_figure(frontier({"l1": (0.002, 1.1), "l2": (0.004, 1.3)}), 0.95)
    ax, boxes = label_boxes(fig)
    pixels = dict(zip(["l1", "l2"], ax.transData.transform([(0.002, 1.1), (0.004, 1.3)])))
    for name, box in boxes.items():
        x, y = pixels[name]
        distance = max(box.x0 - x, x - box.x1, box.y0 - y, y - box.y1, 0)
        assert distance < 10 * fig.dpi / 72  # within 10 points
    assert all(t.arrow_patch is None for t in ax.texts)


def test_label_points_keeps_labels_apart_on_any_axes():
    """The placement itself, on a plain scatter: many labels on nearly one spot come out disjoint."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100, layout="constrained")
    ax = fig.subplots()
    xs, ys = np.linspace(0, 0.02, 6), np.linspace(0, 0.02, 6)
    ax.scatter(xs, ys)
    ax.set_xlim(-1, 1)
    ax.set_ylim(-1, 1)
    placed = label_points(ax, xs, ys, [f"label {i}" for i in range(6)])
    renderer = _renderer(fig)
    fig.canvas.draw()  # an annotation's place is worked out when it is drawn
    boxes = [Text.get_window_extent(t, renderer) for t in placed]
    assert not any(a.overlaps(b) for a, b in itertools.combinations(boxes, 2))

"""seaborn/matplotlib figures of an audit's results. Each function returns a matplotlib Figure.

Readable in grayscale and by colour-blind readers: seaborn's colorblind palette, and every group
also has its own marker, line style and hatch, so groups separate without colour. Figures are
built on `matplotlib.figure.Figure` (no pyplot state), so they work headless and in notebooks.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg, RendererAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter
from matplotlib.transforms import Bbox
from matplotlib.typing import LineStyleType

from . import metrics
from .dynamics import gap_over_training, group_curves

if TYPE_CHECKING:
    from .results import AuditResult
    from .stats import Analysis

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES: tuple[LineStyleType, ...] = (
    "-",
    "--",
    ":",
    "-.",
    (0, (5, 1, 1, 1)),
    (0, (1, 3)),
    (0, (8, 2)),
    (0, (3, 1, 1, 1, 1, 1)),
)
HATCHES = ("", "///", "...", "xx", "\\\\", "++", "oo", "--")
WIDTH = 11.0  # inches; at DPI 110 about 1200 px, the report's content width
DPI = 110


@dataclass(frozen=True)
class GroupStyle:
    color: tuple[float, float, float]
    marker: str
    linestyle: LineStyleType
    hatch: str


def group_styles(groups: Iterable[object]) -> dict[str, GroupStyle]:
    """One colour (colorblind palette), marker, line style and hatch per group, in the given order."""
    names = [str(g) for g in groups]
    colors = sns.color_palette("colorblind", max(len(names), 1))
    return {
        n: GroupStyle(
            tuple(colors[i % len(colors)]),
            MARKERS[i % len(MARKERS)],
            LINESTYLES[i % len(LINESTYLES)],
            HATCHES[i % len(HATCHES)],
        )
        for i, n in enumerate(names)
    }


def _dashes(linestyle: LineStyleType) -> tuple[float, ...] | str:
    """A matplotlib line style as the dash tuple seaborn's `dashes=` wants ("" = solid)."""
    named: dict[str, tuple[float, ...] | str] = {"-": "", "--": (4, 1.5), ":": (1, 1.5), "-.": (4, 1.5, 1, 1.5)}
    return named[linestyle] if isinstance(linestyle, str) else tuple(linestyle[1])


def _renderer(fig: Figure) -> RendererAgg:
    """A renderer to measure text with (a Figure built without pyplot has no canvas that draws)."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    return canvas.get_renderer()


def _figure(height: float, width: float = WIDTH) -> Figure:
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _style(ax: Axes) -> None:
    ax.grid(True, axis="y", color="0.88", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def group_error_figure(intervals: pd.DataFrame, metric: str = "mse", method: str = "") -> Figure:
    """Per-group mean error with its 95% interval, one panel per loss (own y scale, so gaps are visible)."""
    losses = list(dict.fromkeys(intervals["loss"]))
    groups = list(dict.fromkeys(intervals["group"].astype(str)))
    styles = group_styles(groups)
    fig = _figure(3.2)
    axes = fig.subplots(1, max(len(losses), 1), squeeze=False)[0]
    for ax, loss in zip(axes, losses):
        part = intervals[intervals["loss"] == loss]
        part = part.set_index(part["group"].astype(str))
        for i, g in enumerate(groups):
            if g not in part.index:
                continue
            r, st = part.loc[g], styles[g]
            err = [[r["mean"] - r["ci_low"]], [r["ci_high"] - r["mean"]]]
            ax.errorbar(
                [i],
                [r["mean"]],
                yerr=np.nan_to_num(err),
                color=st.color,
                marker=st.marker,
                markersize=8,
                capsize=6,
                linewidth=2,
                linestyle="none",
                label=g,
            )
        ax.plot(
            range(len(groups)),
            [part["mean"].get(g, np.nan) for g in groups],
            color="0.6",
            linewidth=1,
            linestyle=":",
            zorder=0,
        )
        ax.set_xticks(range(len(groups)), groups)
        ax.set_xlim(-0.6, len(groups) - 0.4)
        ax.set_title(loss, fontweight="bold")
        ax.set_xlabel("group")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
        _style(ax)
    better = "lower" if metrics.get(metric).higher_is_worse else "higher"
    axes[0].set_ylabel(f"held-out {metrics.label(metric)}\n({better} is better)")
    fig.suptitle(
        f"Per-group held-out {metrics.label(metric)} with 95% intervals" + (f"  ({method})" if method else ""),
        fontsize=11,
    )
    return fig


def _loss_panels(
    df: pd.DataFrame, height: float
) -> tuple[Figure, np.ndarray, list[str], list[str], dict[str, GroupStyle]]:
    """A figure with one panel per loss (shared y), and the groups in order with their styles."""
    losses = list(dict.fromkeys(df["loss"]))
    groups = list(dict.fromkeys(df["group"]))
    fig = _figure(height)
    axes = fig.subplots(1, max(len(losses), 1), squeeze=False, sharey=True)[0]
    return fig, axes, losses, groups, group_styles(groups)


def grad_share_figure(grad_shares: pd.DataFrame, share: str = "projection_share") -> Figure:
    """Each group's share of the gradient over training (mean and range over seeds), against its share of samples."""
    df = grad_shares.copy()
    df["group"] = df["group"].astype(str)
    fig, axes, losses, groups, styles = _loss_panels(df, 3.2)
    for ax, loss in zip(axes, losses):
        part = df[df["loss"] == loss]
        sns.lineplot(
            data=part,
            x="step",
            y=share,
            hue="group",
            style="group",
            hue_order=groups,
            style_order=groups,
            palette={g: styles[g].color for g in groups},
            dashes={g: _dashes(styles[g].linestyle) for g in groups},
            markers={g: styles[g].marker for g in groups},
            markersize=5,
            linewidth=2,
            errorbar=("pi", 100),
            estimator="mean",
            ax=ax,
            legend=False,
        )  # band: range over seeds
        for g in groups:
            ax.axhline(
                part.loc[part["group"] == g, "sample_share"].mean(),
                color=styles[g].color,
                linestyle=(0, (1, 2)),
                linewidth=1.4,
            )
        ax.set_title(loss, fontweight="bold")
        ax.set_xlabel("training step")
        _style(ax)
    axes[0].set_ylabel(share.replace("_", " "))
    handles = []
    for g in groups:
        st = styles[g]
        handles.append(
            Line2D(
                [],
                [],
                color=st.color,
                linestyle=st.linestyle,
                marker=st.marker,
                linewidth=2,
                label=f"{g}: gradient share",
            )
        )
        handles.append(
            Line2D([], [], color=st.color, linestyle=(0, (1, 2)), linewidth=1.4, label=f"{g}: share of samples")
        )
    fig.legend(handles=handles, loc="outside lower center", ncol=min(4, len(handles)), frameon=False)
    fig.suptitle(
        "Whose error drives the updates? Gradient share per group over training (dotted: the group's share of samples)",
        fontsize=11,
    )
    return fig


def error_distribution_figure(samples: pd.DataFrame, metric: str = "mse") -> Figure:
    """Per-group distribution of per-image error (averaged over seeds), one panel per loss, log scale."""
    df = samples.groupby(["loss", "group", "index"], observed=True, sort=False)[metric].mean().reset_index()
    df["group"] = df["group"].astype(str)
    fig, axes, losses, groups, styles = _loss_panels(df, 3.2)
    for ax, loss in zip(axes, losses):
        part = df[df["loss"] == loss]
        values = [part.loc[part["group"] == g, metric].to_numpy() for g in groups]
        boxes = ax.boxplot(
            values,
            positions=range(len(groups)),
            widths=0.6,
            patch_artist=True,
            flierprops={"marker": ".", "markersize": 3, "markerfacecolor": "0.3", "markeredgecolor": "none"},
            medianprops={"color": "0.1", "linewidth": 1.6},
            whiskerprops={"color": "0.25"},
            capprops={"color": "0.25"},
        )
        for patch, g in zip(boxes["boxes"], groups):
            patch.set(facecolor=(*styles[g].color, 0.85), edgecolor="0.15", hatch=styles[g].hatch)
        ax.set_xticks(range(len(groups)), groups)
        ax.set_xlabel("group")
        if metrics.get(metric).ratio:  # a positive error on a linear scale (not psnr, a log scale already)
            ax.set_yscale("log")
        ax.set_title(loss, fontweight="bold")
        ax.set_ylabel("")
        _style(ax)
    axes[0].set_ylabel(f"per-image {metric} (mean over seeds)")
    fig.suptitle(
        f"Distribution of per-image held-out {metrics.label(metric)} by group (box: quartiles, line: median)",
        fontsize=11,
    )
    return fig


def reconstruction_figure(examples: dict[str, np.ndarray], per_group: int = 6) -> Figure:
    """Originals (top row) and each loss's reconstructions (seed 0), a block of columns per group."""
    names = [str(n) for n in examples["group_names"]]
    losses = [str(n) for n in examples["losses"]]
    rows = ["original", *losses]
    images, recon, codes = examples["images"], examples["recon"], examples["group"]
    blocks = []
    for g in range(len(names)):
        idx = np.flatnonzero(codes == g)[:per_group]
        stack = [images[idx]] + [recon[k][idx] for k in range(len(losses))]  # each (k, C, H, W)
        blocks.append(_mosaic(stack))
    cols = len(blocks)
    h, w = blocks[0].shape[:2]
    fig = _figure(min(0.55 * len(rows) * (1 + 0.1 * len(rows)), 7.5) + 0.6)
    axes = fig.subplots(1, cols, squeeze=False)[0]
    for ax, block, name in zip(axes, blocks, names):
        ax.imshow(block, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(f"group {name}", fontweight="bold")
        pitch = block.shape[0] / len(rows)
        ax.set_yticks([pitch * (i + 0.5) for i in range(len(rows))], rows)
        ax.set_xticks([])
        for side in ax.spines.values():
            side.set_visible(False)
    fig.suptitle(
        f"Held-out images and their reconstructions (seed {int(examples['seed'])}, one row per loss)", fontsize=11
    )
    return fig


def _mosaic(stack: list[np.ndarray], pad: int = 1) -> np.ndarray:
    """Rows of (k, C, H, W) uint8 images -> one (rows*(H+pad), k*(W+pad)[, 3]) image with light separators."""
    k, c, h, w = stack[0].shape
    out = np.full((len(stack) * (h + pad) - pad, k * (w + pad) - pad, c), 255, dtype=np.uint8)
    for r, imgs in enumerate(stack):
        for j in range(len(imgs)):
            out[r * (h + pad) : r * (h + pad) + h, j * (w + pad) : j * (w + pad) + w] = imgs[j].transpose(1, 2, 0)
    return out[..., 0] if c == 1 else out


def brightness_contrast_figure(examples: dict[str, np.ndarray]) -> Figure:
    """Histograms of each held-out image's brightness (mean pixel) and contrast (pixel std), per group."""
    names = [str(n) for n in examples["group_names"]]
    styles = group_styles(names)
    codes = examples["test_group"]
    fig = _figure(3.0)
    axes = fig.subplots(1, 2, squeeze=False)[0]
    for ax, key, label in zip(
        axes, ("test_brightness", "test_contrast"), ("brightness (mean pixel value)", "contrast (std of pixel values)")
    ):
        values = examples[key].astype(np.float64)
        bins = np.histogram_bin_edges(values, bins=40)
        for g, name in enumerate(names):
            st = styles[name]
            ax.hist(
                values[codes == g],
                bins=bins,
                histtype="stepfilled",
                color=(*st.color, 0.25),
                hatch=st.hatch,
                edgecolor=st.color,
                linewidth=1.8,
                linestyle=st.linestyle,
                label=f"group {name}",
            )
        ax.set_xlabel(label)
        ax.set_ylabel("held-out images")
        _style(ax)
    axes[0].legend(frameon=False)
    fig.suptitle("Groups as the models see them: per-image brightness and contrast of the held-out images", fontsize=11)
    return fig


def over_training_figure(curves: pd.DataFrame, gaps: pd.DataFrame, metric: str = "mse") -> Figure:
    """Per loss: each group's held-out error over training (top, mean over seeds, log scale) and the relative
    gap of the final worst group over the final best (bottom, mean over seeds with its seed-level 95% t interval)."""
    losses = list(dict.fromkeys(curves["loss"]))
    groups = list(dict.fromkeys(curves["group"].astype(str)))
    styles = group_styles(groups)
    fig = _figure(5.8)
    axes = fig.subplots(2, max(len(losses), 1), squeeze=False, sharex="col")
    for j, loss in enumerate(losses):
        top, bottom = axes[0, j], axes[1, j]
        part = curves[curves["loss"] == loss]
        for g in groups:
            p, st = part[part["group"].astype(str) == g].sort_values("step"), styles[g]
            top.plot(
                p["epoch"],
                p[metric],
                color=st.color,
                linestyle=st.linestyle,
                marker=st.marker,
                markersize=3.5,
                linewidth=1.8,
            )
        top.set_yscale("log")
        top.set_title(loss, fontweight="bold")
        _style(top)
        gp = gaps[gaps["loss"] == loss].sort_values("step")
        if len(gp):
            bottom.fill_between(
                gp["epoch"], 100 * gp["gap_low"], 100 * gp["gap_high"], color="0.7", alpha=0.55, linewidth=0
            )
            bottom.plot(gp["epoch"], 100 * gp["gap"], color="0.1", linewidth=2, marker="o", markersize=3)
            bottom.set_title(f"gap of {gp['worst'].iloc[0]} over {gp['best'].iloc[0]}", fontsize=9.5)
        bottom.axhline(0, color="0.35", linestyle=":", linewidth=1.3)
        bottom.set_xlabel("epoch")
        if j:
            bottom.sharey(axes[1, 0])
        _style(bottom)
    axes[0, 0].set_ylabel(f"held-out {metric}\n(mean over seeds)")
    axes[1, 0].set_ylabel("relative gap (%)\n(> 0: worse group at the end is worse)")
    handles: list[Artist] = [
        Line2D(
            [],
            [],
            color=styles[g].color,
            linestyle=styles[g].linestyle,
            marker=styles[g].marker,
            linewidth=1.8,
            label=f"group {g}",
        )
        for g in groups
    ]
    handles += [
        Line2D([], [], color="0.1", linewidth=2, marker="o", markersize=3, label="gap, mean over seeds"),
        Patch(color="0.7", alpha=0.55, label="95% t interval over seeds"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), frameon=False)
    fig.suptitle("The answer over training: each group's held-out error, and the gap between the groups", fontsize=11)
    return fig


def frontier_figure(frontier: pd.DataFrame, confidence: float | None = None) -> Figure:
    """The fairness-accuracy frontier: each loss at (overall held-out error, worst/best ratio), with both
    intervals as bars; Pareto-optimal losses filled and joined by a line, the others hollow; labelled by loss.

    The axes span the points and the finite ends of their intervals (an error's interval is positive, made
    on the log scale); a ratio interval with no upper bound is drawn to the top of the axis and ends in an
    arrow, labelled "no upper bound", so one unbounded interval never squashes the others."""
    df = frontier[np.isfinite(frontier["overall"].astype(float)) & np.isfinite(frontier["ratio"].astype(float))]
    metric = str(frontier["metric"].iloc[0]) if len(frontier) else metrics.DEFAULT
    fig = _figure(4.6)
    ax = fig.subplots()
    dark = sns.color_palette("colorblind")[0]
    ys = np.concatenate([df["ratio"], df["ratio_low"], df["ratio_high"], [1.0]]).astype(float)
    ys = ys[np.isfinite(ys)]
    low_y, high_y = (ys.min(), ys.max()) if len(ys) else (0.9, 1.1)
    unbounded = ~np.isfinite(df["ratio_high"].astype(float))
    pad = 0.08 * max(high_y - low_y, 0.05 * high_y)
    top = high_y + (3 if unbounded.any() else 1) * pad
    for row, open_top in zip(df.itertuples(index=False), unbounded):
        high = top if open_top else row.ratio_high
        xerr = [[row.overall - row.overall_low], [row.overall_high - row.overall]]
        yerr = [[row.ratio - row.ratio_low], [high - row.ratio]]
        ax.errorbar(
            [row.overall],
            [row.ratio],
            xerr=np.nan_to_num(xerr),
            yerr=np.nan_to_num(yerr),
            color="0.45",
            linewidth=1.2,
            capsize=3,
            linestyle="none",
            zorder=1,
        )
        if open_top:
            ax.plot([row.overall], [top], marker="^", color="0.45", markersize=7, zorder=1)
            ax.annotate(
                "no upper bound",
                (row.overall, top),
                xytext=(6, -4),
                textcoords="offset points",
                fontsize=8,
                color="0.3",
            )
    pareto = df[df["pareto"].astype(bool)].sort_values("overall")
    others = df[~df["pareto"].astype(bool)]
    sns.scatterplot(
        data=pareto,
        x="overall",
        y="ratio",
        ax=ax,
        s=70,
        color=dark,
        marker="o",
        edgecolor="0.1",
        label="Pareto-optimal",
        zorder=3,
    )
    sns.scatterplot(
        data=others,
        x="overall",
        y="ratio",
        ax=ax,
        s=70,
        facecolor="white",
        edgecolor="0.2",
        marker="s",
        linewidth=1.4,
        label="dominated",
        zorder=3,
    )
    if len(pareto) > 1:
        ax.plot(pareto["overall"], pareto["ratio"], color=dark, linewidth=1.2, linestyle="--", zorder=2)
    ax.axhline(1.0, color="0.35", linestyle=":", linewidth=1.2)
    ax.set_ylim(max(low_y - pad, 0.0), top + pad)
    xs = np.concatenate([df["overall"], df["overall_low"], df["overall_high"]]).astype(float)
    xs = xs[np.isfinite(xs)]
    if len(xs):
        span = max(xs.max() - xs.min(), 0.05 * xs.max())
        ax.set_xlim(max(xs.min() - 0.12 * span, 0.0), xs.max() + 0.25 * span)  # room for the labels on the right
    level = f"{100 * confidence:.4g}% " if confidence is not None else ""
    ax.set_xlabel(f"overall held-out {metrics.label(metric)} (lower is more accurate)")
    ax.set_ylabel("worst / best group (lower is fairer; 1: equal)")
    ax.legend(frameon=False, loc="best")
    _style(ax)
    fig.suptitle(
        f"Fairness-accuracy frontier: each loss's overall error and worst/best ratio ({level}intervals)", fontsize=11
    )
    label_points(ax, df["overall"], df["ratio"], df["loss"])
    return fig


# Where a point's label may go, in points from the point: right, left, above, below, then the diagonals.
_LABEL_DIRECTIONS = ((1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (-1, 1), (1, -1), (-1, -1))


def label_points(
    ax: Axes,
    xs: Sequence[float],
    ys: Sequence[float],
    labels: Sequence[str],
    *,
    fontsize: float = 9,
    gap: float = 7.0,
    rings: int = 6,
) -> list:
    """Label each point (data coordinates) so that no two labels overlap and no label covers a point, the
    legend or the axes' edge, and, where there is room, no drawn line (error bars, the frontier, y = 1)
    either. Each label takes the first free place among eight directions around its point, at distances
    gap, 2 gap, ... (rings, in points); past the first ring a thin line joins it to its point. Placed once
    the figure's layout is solved (the points' pixel positions are final), and left out of the layout.

    Returns the labels (matplotlib Annotations), in the order given.
    """
    fig = ax.get_figure(root=True)
    assert isinstance(fig, Figure)  # an Axes drawn here always belongs to a Figure
    engine = fig.get_layout_engine()
    if engine is not None:
        engine.execute(fig)
    renderer = _renderer(fig)
    to_pixels = fig.dpi / 72.0
    box = ax.get_window_extent(renderer)
    data = np.column_stack([np.asarray(xs, float), np.asarray(ys, float)])
    points = ax.transData.transform(data)
    radius = 6 * to_pixels  # a scatter marker of size s=70 is about 8.4 points across
    taken = [Bbox.from_extents(x - radius, y - radius, x + radius, y + radius) for x, y in points]
    legend = ax.get_legend()
    if legend is not None:
        taken.append(legend.get_window_extent(renderer))
    lines = _drawn_segments(ax)
    placed = []
    for (x, y), (px, py), label in zip(data, points, labels):
        probe = fig.text(0, 0, str(label), fontsize=fontsize)  # only to measure the text
        extent = probe.get_window_extent(renderer)
        probe.remove()
        w, h = extent.width, extent.height
        candidates = [
            (ring, Bbox.from_bounds(x0, y0, w, h))
            for ring in range(1, rings + 1)
            for dx, dy in _LABEL_DIRECTIONS
            for x0, y0 in [
                (
                    px + dx * ring * gap * to_pixels - (w if dx < 0 else w / 2 if dx == 0 else 0),
                    py + dy * ring * gap * to_pixels - (h if dy < 0 else h / 2 if dy == 0 else 0),
                )
            ]
        ]
        free = [
            (ring, c)
            for ring, c in candidates
            if box.x0 <= c.x0
            and c.x1 <= box.x1
            and box.y0 <= c.y0
            and c.y1 <= box.y1
            and not any(c.overlaps(t) for t in taken)
        ]
        clear = [(ring, c) for ring, c in free if not _crosses(c, lines)]
        ring, where = (clear or free or candidates)[0]  # no room at all: right of the point, overlapping
        taken.append(where)
        annotation = ax.annotate(
            str(label),
            (x, y),
            xytext=((where.x0 - px) / to_pixels, (where.y0 - py) / to_pixels),
            textcoords="offset points",
            fontsize=fontsize,
            ha="left",
            va="bottom",
            arrowprops=dict(arrowstyle="-", color="0.5", linewidth=0.6, shrinkA=0, shrinkB=5) if ring > 1 else None,
        )
        annotation.set_in_layout(False)
        placed.append(annotation)
    return placed


def _drawn_segments(ax: Axes) -> np.ndarray:
    """Every straight segment the axes draw (lines, error bars, their caps), as rows x0, y0, x1, y1 in pixels."""
    segments = []
    for line in ax.lines:
        xy = line.get_transform().transform(np.asarray(line.get_xydata(), float))
        xy = xy[np.isfinite(xy).all(axis=1)]
        if len(xy):
            segments.append(np.column_stack([xy[:-1], xy[1:]]) if len(xy) > 1 else np.hstack([xy, xy]))
    for collection in ax.collections:
        if hasattr(collection, "get_segments"):
            for seg in collection.get_segments():
                xy = collection.get_transform().transform(np.asarray(seg, float))
                if len(xy) > 1:
                    segments.append(np.column_stack([xy[:-1], xy[1:]]))
    return np.vstack(segments) if segments else np.empty((0, 4))


def _crosses(box: Bbox, segments: np.ndarray) -> bool:
    """Whether any segment meets the box (Liang-Barsky clipping, all segments at once)."""
    if not len(segments):
        return False
    x0, y0 = segments[:, 0], segments[:, 1]
    dx, dy = segments[:, 2] - x0, segments[:, 3] - y0
    low, high = np.zeros(len(segments)), np.ones(len(segments))
    inside = np.ones(len(segments), dtype=bool)
    for p, q in ((-dx, x0 - box.x0), (dx, box.x1 - x0), (-dy, y0 - box.y0), (dy, box.y1 - y0)):
        parallel = p == 0
        inside &= ~(parallel & (q < 0))
        with np.errstate(divide="ignore", invalid="ignore"):
            r = q / np.where(parallel, 1.0, p)
        low = np.where(~parallel & (p < 0), np.maximum(low, r), low)
        high = np.where(~parallel & (p > 0), np.minimum(high, r), high)
    return bool((inside & (low <= high)).any())


def audit_figures(result: AuditResult, analysis: Analysis) -> dict[str, Figure]:
    """Every figure the result supports, by name (those needing absent data are left out); the
    intervals come from `analysis` (a stats.Analysis), computed once by the caller.

    Examples
    --------
    >>> from fairrecon import analyse, audit_figures, run_audit
    >>> result = run_audit(dataset="digits", losses="l1,l2", seeds=2, epochs=1, hidden=32, limit=200, test_limit=80)
    >>> figures = audit_figures(result, analyse(result))  # matplotlib Figures: a notebook shows them
    >>> list(figures)
    ['group_error', 'frontier', 'grad_shares', 'over_training', 'error_distribution', 'reconstructions',
     'brightness_contrast']
    """
    figs = {"group_error": group_error_figure(analysis.intervals, analysis.metric)}
    if analysis.frontier["pareto"].astype(bool).any():  # at least one loss has a place on it
        figs["frontier"] = frontier_figure(analysis.frontier, analysis.confidence)
    shares = getattr(result, "grad_shares", None)
    if shares is not None and len(shares):
        figs["grad_shares"] = grad_share_figure(shares)
    curves = group_curves(result)
    if curves is not None and len(curves):
        figs["over_training"] = over_training_figure(curves, gap_over_training(result))
    figs["error_distribution"] = error_distribution_figure(result.ok_samples, analysis.metric)
    examples = getattr(result, "examples", None)
    if examples is not None:
        figs["reconstructions"] = reconstruction_figure(examples)
        figs["brightness_contrast"] = brightness_contrast_figure(examples)
    return figs

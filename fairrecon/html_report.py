"""report.html: one self-contained page (figures as base64 PNG, inline CSS, no scripts, no network).

Its first screen answers the audit's question: which group each loss favours, by how much, and
how sure we are; the figures and full tables follow for whoever wants to check.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
from collections.abc import Callable

import pandas as pd

from . import metrics
from .bymetric import ByMetric
from .dynamics import convergence_warnings, gap_over_training, worse_group_changes
from .figures import audit_figures
from .report import (
    BY_METRIC_TITLE,
    EFFECTS_TITLE,
    FRONTIER_TITLE,
    by_metric_note,
    by_metric_table,
    contrast_table,
    describe_audit,
    effects_table,
    error_table,
    frontier_sentence,
    frontier_table,
    headline,
    loss_warnings,
    metric_caveat,
    vae_tables,
    verdict_table,
)
from .settled import DROP
from .stats import CLEAR, FAIRER, INSUFFICIENT, LESS_FAIR, NO_CLEAR, NOT_DIFFERENT, Analysis, positive_metric

CSS = """
*{box-sizing:border-box}
html{-webkit-text-size-adjust:100%;text-size-adjust:100%}
body{margin:0;font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:#1d2329;background:#fff}
main{max-width:1240px;margin:0 auto;padding:14px 20px 40px}
header{border-bottom:2px solid #1d2329;padding-bottom:6px;margin-bottom:10px}
h1{font-size:22px;margin:0 0 2px}
h2{font-size:18px;margin:26px 0 6px;border-bottom:1px solid #d0d7de;padding-bottom:3px}
h2.first{margin-top:8px}
.meta{color:#57606a;font-size:13px;margin:0}
.headline{font-size:16px;margin:4px 0 6px}
.scroll{overflow:auto;max-width:100%;max-height:85vh;width:max-content;margin:6px 0 4px;border:1px solid #d8dee4;border-radius:4px}
table{border-collapse:separate;border-spacing:0;font-size:13.5px;font-variant-numeric:tabular-nums}
th,td{padding:4px 10px;white-space:nowrap;border-bottom:1px solid #d8dee4;text-align:left;vertical-align:top;background:#fff}
tr:last-child td{border-bottom:0}
th{background:#f3f5f7;font-weight:600;position:sticky;top:0;z-index:1}
tr:nth-child(even) td{background:#fafbfc}
th:first-child,td:first-child{position:sticky;left:0;z-index:1;box-shadow:inset -1px 0 0 #d8dee4}
th:first-child{z-index:2}
td.num{text-align:right}
td.long{white-space:normal;min-width:18em;max-width:40em}
.sure{font-weight:600}
.sure.clear{color:#0b5394}.sure.unclear{color:#7a4b00}.sure.insufficient{color:#9a3412}
.note{color:#57606a;font-size:12.5px;margin:2px 0 8px}
.warn{background:#fdeceb;border:1px solid #d1242f;padding:6px 10px;font-size:13px;margin:6px 0}
figure{margin:8px 0 4px}
.fig{overflow-x:auto}
.fig img{display:block;max-width:100%;height:auto}
figure:target .fig img{max-width:none}
figcaption{color:#57606a;font-size:13px;margin-top:2px}
.size{font-size:12.5px;margin-left:6px;white-space:nowrap}
.size .fit,figure:target .size .full{display:none}
figure:target .size .fit{display:inline}
details{margin:8px 0}summary{cursor:pointer;font-weight:600}
.warnings summary{color:#9a3412;font-size:13.5px}.warnings li{font-size:13px}
code{background:#f3f5f7;padding:0 3px;border-radius:3px}
@media (min-width:1250px){.size{display:none}}
@media (max-width:640px){
main{padding:10px 10px 30px}
h1{font-size:19px}
figure{margin-left:-10px;margin-right:-10px}
figcaption{padding:0 10px}
th,td{padding:4px 7px}
}
"""


def html_report(result, analysis: Analysis, by_metric: ByMetric | None = None) -> str:
    """The whole page as a string; with `by_metric`, the metric caveat first and every metric side by side (arms in
    place of losses, where cells differ by objective: AuditResult.arms)."""
    result = result.arms()
    figs = {name: _png(fig) for name, fig in audit_figures(result, analysis).items()}
    verdict = verdict_table(analysis)
    metric = metrics.get(analysis.metric)
    caveat = metric_caveat(by_metric) if by_metric is not None else None
    spec = result.spec
    when = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>fairrecon audit: {_e(spec.dataset)}</title>",
        f"<style>{CSS}</style></head><body><main>",
        "<header><h1>fairrecon audit: which group does each loss favour?</h1>",
        f'<p class="warn" id="metric-caveat">{_e(caveat)}</p>' if caveat else "",
        f'<p class="headline">{_e(headline(analysis))}</p>',
        f'<p class="meta">{_e(describe_audit(result).replace("`", ""))} Numbers are {_e(metric.label)} ({metric.name}), '
        f"{'lower' if metric.higher_is_worse else 'higher'} is better. "
        f"{_e(_run_line(result))} Generated {when}.</p></header>",
        '<h2 class="first" id="answer">The answer in numbers</h2>',
        _contrast_html(analysis),
        _verdict_html(verdict),
        f'<p class="note">{_e(analysis.method)}</p>',
        _warnings_html(analysis),
        _failed_html(result),
        _figure(
            figs,
            "group_error",
            f"Each point is a group's mean error over {'test images' if analysis.external else 'seeds and test images'}; "
            f"bars: the interval of each group's mean ({1 - analysis.policy.alpha:.0%}, one group at a time"
            + ("; on the log scale, as errors are positive). " if positive_metric(analysis.metric) else "). ")
            + "Panels have their own y scale so that the gap between groups is visible; compare losses in the table. "
            "Overlapping bars do not rule out a gap: both groups share each seed's model, so read the gap's "
            "own interval in the table.",
        ),
    ]
    if by_metric is not None and len(by_metric.compared) > 1:
        parts += [
            f"<h2 id='metrics'>{BY_METRIC_TITLE}</h2>",
            f'<p class="note">{_e(by_metric_note(by_metric).replace("`", ""))}</p>',
            _table(by_metric_table(by_metric)),
        ]
    if len(analysis.frontier) > 1:
        parts += [
            f"<h2 id='frontier'>{FRONTIER_TITLE}</h2>",
            f'<p class="note">{_e(frontier_sentence(analysis))}</p>',
            _figure(
                figs,
                "frontier",
                "Each loss at its overall held-out error (x) and the ratio of its worst "
                "group's error to its best group's (y), both with intervals at the verdicts' level; filled "
                "and joined: Pareto-optimal. Down and left is better on both.",
            ),
            _verdict_html(frontier_table(analysis)),
        ]
    parts += _over_training_html(result, figs)
    if "grad_shares" in figs:
        parts += [
            "<h2 id='gradients'>Gradient shares during training</h2>",
            _figure(
                figs,
                "grad_shares",
                "A group whose gradient share (solid) stays above its share of samples "
                "(dotted) pulls the updates towards itself: the loss spends its effort there.",
            ),
        ]
    parts += _vae_html(result)
    parts += [
        "<h2 id='distributions'>Error distributions</h2>",
        _figure(
            figs,
            "error_distribution",
            "Per-image error averaged over seeds. A gap in the means can come from a "
            "few hard images (long whisker) or from the whole group (shifted box).",
        ),
    ]
    if "reconstructions" in figs:
        parts += [
            "<h2 id='reconstructions'>Reconstructions</h2>",
            _figure(
                figs,
                "reconstructions",
                "The same held-out images under every loss. Stored as 8-bit images for "
                "display; the errors above use the full-precision reconstructions.",
            ),
        ]
    else:
        parts += [
            "<h2 id='reconstructions'>Reconstructions</h2>",
            '<p class="note">This results folder has no examples.npz (saved by an older fairrecon), '
            "so there are no reconstructions or per-image brightness histograms to show.</p>",
        ]
    parts += ["<h2 id='groups'>The groups</h2>"]
    if "brightness_contrast" in figs:
        parts.append(
            _figure(
                figs,
                "brightness_contrast",
                "If the groups differ in contrast as well as brightness, "
                "a gap may be about contrast (easier images), not brightness.",
            )
        )
    parts += [
        _table(result.groups, digits=4),
        "<h2 id='tables'>Tables</h2>",
        f"<h3>Per-group {_e(metric.label)}: mean [{1 - analysis.policy.alpha:.0%} interval]</h3>",
        _table(error_table(analysis)),
        "<h3>Gap of the worst group, all columns</h3>",
        _table(analysis.disparities, digits=4),
        *(
            ["<h3>Each loss against the reference loss, all columns</h3>", _table(analysis.contrasts, digits=4)]
            if len(analysis.contrasts)
            else []
        ),
        *(
            ["<h3>Each objective against erm, all columns</h3>", _table(analysis.effects, digits=4)]
            if len(analysis.effects)
            else []
        ),
        "<h3>All metrics: mean over seeds (± std across seeds)</h3>",
        _table(result.by_group(), digits=4),
        "<h3>Cells (one model per loss and seed)</h3>",
        _table(result.cells, digits=5),
        "<details><summary>Audit spec (re-run with these values)</summary>",
        _table(pd.DataFrame({"field": list(spec.to_dict()), "value": [str(v) for v in spec.to_dict().values()]})),
        "</details>",
        "</main></body></html>",
    ]
    return "\n".join(p for p in parts if p)


def _vae_html(result) -> list[str]:
    """The VAE section: per-group KL and generated_share, the effective KL weight over training (report.vae_tables)."""
    by_group, kl_weight = vae_tables(result)
    if by_group is None:
        return []
    gen = result.info.get("generation")
    parts = [
        "<h2 id='vae'>VAEs: KL per group and whom the generator produces</h2>",
        f'<p class="note">beta = {result.spec.beta:g}. kl: mean KL(q(z|x) || N(0, I)) of the group\'s held-out '
        "images (nats: which group gets latent capacity); nll: the loss's NLL at one draw z ~ q(z|x); "
        "means over seeds."
        + (
            f" generated_share: share of {gen['n']} images decoded from the prior per cell that fall in the group "
            f"(assigned by {_e(gen['method'])}), beside its share of the training images."
            if gen
            else ""
        )
        + "</p>",
    ]
    if gen and gen.get("near_chance"):
        parts.append('<p class="warn">The group classifier is near chance, so generated_share is not reliable.</p>')
    parts.append(_table(by_group, digits=4))
    if kl_weight is not None:
        parts += [
            '<p class="note">Effective KL weight over training, ||grad beta KL_g|| / ||grad NLL_g|| over the '
            "weights at the gradient snapshots (means over seeds); drift = last / first (&lt; 1: the KL's pull "
            "fell relative to the likelihood's).</p>",
            _table(kl_weight, digits=4),
        ]
    return parts


def _over_training_html(result, figs: dict[str, str]) -> list[str]:
    """The answer over training: when the worse group changes, cells not converged, the curves figure."""
    warnings = convergence_warnings(result)
    if "over_training" not in figs and not warnings:
        return []
    gaps = gap_over_training(result)
    changes = list(worse_group_changes(gaps).values())
    out = ["<h2 id='training'>The answer over training</h2>"]
    if warnings:
        items = "".join(f"<li>{_e(w)}</li>" for w in warnings)
        out.append(
            f'<div class="warn"><b>{len(warnings)} of {len(result.cells)} cells not converged: their errors could '
            f"still fall by more than {DROP:.0%} in as much training again (the verdict reads whether the gap itself had "
            f"settled).</b><details><summary>Which, and how far their error could still fall</summary><ul>{items}</ul>"
            f"</details></div>"
        )
    if "over_training" in figs:
        out.append(
            "<ul>" + "".join(f"<li>{_e(c)}.</li>" for c in changes) + "</ul>"
            if changes
            else '<p class="note">The worse group did not change during training under any loss.</p>'
        )
        curves = result.curves
        first = curves[curves["step"] == curves["step"].min()]
        subset = int(first.drop_duplicates(["loss", "seed", "group"]).groupby(["loss", "seed"])["n"].sum().max())
        out.append(
            _figure(
                figs,
                "over_training",
                "Top: each group's held-out MSE at the curve points, mean over "
                f"seeds; points before a cell's last use a fixed stratified subset of {subset} test images, "
                "the last point all of them (it equals the table above). Bottom: the relative gap of the "
                "group that is worse at the end over the best one; band: 95% t interval over seeds "
                "(training randomness only, test images fixed; the verdict's interval also counts the "
                "test sample).",
            )
        )
    return out


def _contrast_html(analysis: Analysis) -> str:
    """Each loss against the reference loss, then each objective against erm (empty with one loss and only erm)."""
    parts = []
    if len(analysis.contrasts):
        parts.append(
            f"<h3>Each loss against {_e(analysis.reference_loss)} by {_e(analysis.metric)} (paired by seed and test "
            "image)</h3>" + _verdict_html(contrast_table(analysis))
        )
    if len(analysis.effects):
        parts.append(
            f"<h3>{EFFECTS_TITLE} by {_e(analysis.metric)} (paired by seed and test image)</h3>"
            + _verdict_html(effects_table(analysis))
        )
    return "".join(parts) + ("<h3>Which group does each loss favour?</h3>" if parts else "")


def _verdict_html(verdict: pd.DataFrame) -> str:
    """A table with a "how sure" column (verdicts, or loss contrasts): in colour and in words (never colour
    alone), beside the loss."""
    classes = {
        CLEAR: "clear",
        NO_CLEAR: "unclear",
        INSUFFICIENT: "insufficient",
        LESS_FAIR: "clear",
        FAIRER: "clear",
        NOT_DIFFERENT: "unclear",
    }
    return _table(verdict, cell_class={"how sure": lambda text: f"sure {classes.get(text, 'unclear')}"})


def _warnings_html(analysis: Analysis) -> str:
    """The statistics' warnings (insufficient data, low power, ...), folded unless a verdict is
    "insufficient data": then they are the reason and stay open."""
    rows = loss_warnings(analysis)
    if not rows:
        return ""
    items = "".join(f"<li><b>{_e(loss)}</b>: {_e(w)}</li>" for loss, w in rows)
    is_open = " open" if (analysis.disparities["verdict"] == INSUFFICIENT).any() else ""
    return (
        f'<details class="warnings"{is_open}><summary>Warnings from the statistics for {len(rows)} loss(es): '
        f"read before trusting a verdict</summary><ul>{items}</ul></details>"
    )


def _failed_html(result) -> str:
    failed = result.cells[result.cells["status"] != "ok"]
    if failed.empty:
        return ""
    items = "".join(f"<li>{_e(r.loss)} seed {r.seed}: {_e(r.status)}</li>" for r in failed.itertuples())
    return f'<div class="warn"><b>Failed cells, left out of every number above:</b><ul>{items}</ul></div>'


def _run_line(result) -> str:
    info = result.info or {}
    total = (info.get("timings") or {}).get("total_s")
    return (
        f"Ran on {info.get('device', '?')}"
        + (f" in {total:.1f} s" if total else "")
        + f", fairrecon {info.get('fairrecon_version', '?')}."
    )


def _figure(figs: dict[str, str], name: str, caption: str) -> str:
    """A figure at the page's width (the whole screen's on a phone) with a link to its full size: the same
    image at its own pixels, scrolling sideways in its box (CSS :target, no script, no second copy)."""
    if name not in figs:
        return ""
    return (
        f'<span id="fit-{name}"></span>'  # "fit to width" leads here: the figure is no longer the :target
        f'<figure id="fig-{name}"><div class="fig"><img alt="{_e(name.replace("_", " "))}" '
        f'src="data:image/png;base64,{figs[name]}"></div>'
        f'<figcaption>{_e(caption)}<span class="size"><a class="full" href="#fig-{name}">full size</a>'
        f'<a class="fit" href="#fit-{name}">fit to width</a></span></figcaption></figure>'
    )


# Columns that say the verdict: shown right after the first column (the loss), so that the answer is in view
# on a narrow screen without scrolling the table sideways.
VERDICT_COLUMNS = ("how sure", "verdict")
LONG_TEXT = 40  # characters: a text cell longer than this wraps instead of widening its table


def _table(
    df: pd.DataFrame, digits: int | None = None, *, cell_class: dict[str, Callable[[str], str]] | None = None
) -> str:
    """A DataFrame as a table in its own box, which scrolls sideways (and down, for a long table) with the
    header row and the first column held in view; the verdict column second; numbers right-aligned; long
    text wrapped. `digits`: significant digits of float columns. `cell_class`: column -> each cell's class."""
    first, rest = list(df.columns[:1]), list(df.columns[1:])
    df = df[first + [c for c in rest if c in VERDICT_COLUMNS] + [c for c in rest if c not in VERDICT_COLUMNS]]
    numeric = {c for c in df.columns if pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c])}
    classes = cell_class or {}

    def shown(value, column) -> str:
        if value is None or (not isinstance(value, str) and pd.isna(value)):
            return ""
        if digits is not None and pd.api.types.is_float_dtype(df[column]):
            return f"{value:.{digits}g}"
        return str(value)

    head = "".join(f'<th scope="col">{_e(c).replace("_", "_<wbr>")}</th>' for c in df.columns)
    rows = []
    for values in df.itertuples(index=False):
        cells = []
        for column, value in zip(df.columns, values):
            text = shown(value, column)
            if column in classes:
                kind = classes[column](text)
            else:
                kind = "num" if column in numeric else "long" if len(text) > LONG_TEXT else ""
            cells.append(f'<td class="{kind}">{_e(text)}</td>' if kind else f"<td>{_e(text)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'


def _png(fig) -> str:
    """A Figure as base64 PNG text. Its constrained layout is solved once and then fixed: savefig would
    solve it twice (a layout pass, then again while rendering) for the same pixels (tests/test_report.py)."""
    engine = fig.get_layout_engine()
    if engine is not None:
        engine.execute(fig)
        fig.set_layout_engine(None)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi, metadata={"Software": None})
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _e(text) -> str:
    return html.escape(str(text), quote=True)

"""Tables from results, for the terminal and for pull requests. Computes nothing new."""

from __future__ import annotations

import pandas as pd

from .losses import get_loss


def error_table(result, metric: str = "mse") -> pd.DataFrame:
    """Rows: losses; columns: groups ('mean +- seed std'), then the worst group and worst/best ratio."""
    bg = result.by_group()
    rows = []
    for loss, part in bg.groupby("loss", sort=False):
        row = {"loss": loss}
        for _, r in part.iterrows():
            row[str(r["group"])] = f"{r[metric]:.4g} ± {r[metric + '_seed_std']:.2g}" if r["seeds"] > 1 else f"{r[metric]:.4g}"
        higher_is_worse = metric != "psnr"
        worst = part.loc[part[metric].idxmax() if higher_is_worse else part[metric].idxmin()]
        best = part.loc[part[metric].idxmin() if higher_is_worse else part[metric].idxmax()]
        row["worst group"] = str(worst["group"])
        row["worst/best"] = f"{worst[metric] / best[metric]:.3g}"
        rows.append(row)
    return pd.DataFrame(rows)


def markdown_report(result) -> str:
    """A short report.md: the question, per-group error per loss, the groups as measured, cell status."""
    spec = result.spec
    lines = [
        "# fairrecon audit",
        "",
        f"Dataset `{spec.dataset}`, groups by `{spec.group_method}`"
        + (f" (contrast `{spec.contrast}`)" if spec.group_method == "transform" else "")
        + f", model `{spec.model}` (latent {spec.latent}), {spec.seeds} seed(s), {spec.epochs} epoch(s).",
        "",
        "## Held-out MSE per pixel, by loss and group (mean over seeds ± std across seeds)",
        "",
        _markdown(error_table(result, "mse")),
        "",
        "## Groups as measured",
        "",
        _markdown(result.groups.round(4)),
        "",
        "## Cells",
        "",
        _markdown(result.cells.assign(likelihood=[get_loss(n).likelihood for n in result.cells["loss"]]).round(6)),
        "",
    ]
    return "\n".join(lines)


def _markdown(df: pd.DataFrame) -> str:
    cols = [str(c) for c in df.columns]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(out)


def _cell(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)

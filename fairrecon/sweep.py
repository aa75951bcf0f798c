"""`fairrecon sweep SWEEP.toml`: one audit per setting of a grid, every task through one executor queue, and a
report that answers "does the verdict hold across settings?".

A sweep file (audits/sweeps/findings.toml is the findings grid of the README and docs/findings.md):

    [sweep]
    out = "results/findings"     # the sweep folder (default: results/<the file's name>)
    spec = "base.toml"           # optional: a spec file every setting starts from (else the defaults)

    [audit]                      # spec fields for every setting
    data_root = "datasets"

    [grid]                       # every combination of these values, in this order
    spec = ["../mnist-balanced.toml", "../mnist-minority.toml"]   # spec files, as an axis
    epochs = [20, "auto"]
    # or, an axis of tables: fields set together (max_epochs applies only to epochs = "auto")
    # training = [{epochs = 20}, {epochs = "auto", max_epochs = 100}]

A setting's spec is its spec file (paths relative to the sweep file), then [audit], then `--set KEY=VALUE`,
then its grid values; a field may be an axis (or in an axis's tables) or a common value, not both. Every setting is built and checked
before anything runs, and a bad one is refused naming it. Its audit goes to OUT/<setting>/, a results folder
like any other (`fairrecon report`, `fairrecon check` read it); the setting's name says its grid values
("mnist-minority_epochs-auto"). Running the sweep again resumes every audit from its checkpoints.

The report (OUT/sweep.md, sweep.csv, sweep.png, sweep.json) gives, per loss and setting, the worst/best
ratio, its interval and the verdict exactly as that setting's audit decides them (`stats.analyse` on its
result: the one in its summary.json), a figure, and one line per loss: "l2: bright group worse in 7 of 8
settings, clear in 5". Beside it, "is L1 fairer than L2?": per setting, each loss against the audit's
reference loss (its `loss_contrasts`: the paired ratio of worst/best ratios, interval, verdict), and one
line per loss: "l1 vs l2: less fair (its gap larger) in 5 of 7 settings, clearly less fair in 2; clearly
fairer in 0". Nothing is recomputed or corrected across settings: each verdict is its own audit's.
"""

from __future__ import annotations

import io
import itertools
import json
import re
import time
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .audit import Executor, finish_audit, prepare_audit
from .errors import TasksFailed, UserError
from .executor import LocalExecutor
from .figures import DPI, WIDTH
from .fileio import atomic_write, json_default, write_files
from .groups import names_for_targets
from .losses import check_settings
from .outputs import save_results
from .resultsdir import LOCK, MARKER, Identity, check_out, input_paths, writing
from .spec import FIELDS, AuditSpec, load_spec, read_toml
from .stats import CLEAR, FAIRER, INSUFFICIENT, LESS_FAIR, NO_CLEAR, Analysis, analyse
from .version import __version__

SWEEP_MARKER = "fairrecon-sweep.json"  # marks a sweep folder (an audit's folder has resultsdir.MARKER)
SECTIONS = ("sweep", "audit", "grid")
SWEEP_KEYS = ("out", "spec")


@dataclass(frozen=True)
class Setting:
    """One point of the grid: its name (its folder), its grid values and its audit's spec."""

    name: str
    values: dict[str, Any]
    spec: AuditSpec
    spec_file: Path | None


@dataclass(frozen=True)
class Sweep:
    path: Path
    out: Path
    axes: dict[str, list[Any]]
    settings: list[Setting]


def load_sweep(path: str | Path, *, out: str | Path | None = None, sets: dict[str, str] | None = None) -> Sweep:
    """Read a sweep file and build every setting's spec (each checked; a bad one is refused by name)."""
    path = Path(path)
    where = str(path)
    raw = read_toml(path, "sweep file")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown or not all(isinstance(raw.get(s, {}), dict) for s in SECTIONS):
        raise UserError(f"{where}: a sweep file has the tables [sweep], [audit] and [grid] only; found {sorted(raw)}")
    head, common, grid = (dict(raw.get(s, {})) for s in SECTIONS)
    for key in sorted(set(head) - set(SWEEP_KEYS)):
        raise UserError(f"{where}: unknown key '{key}' in [sweep]; allowed: {', '.join(SWEEP_KEYS)}")
    if not grid:
        raise UserError(f'{where}: [grid] is empty; give at least one field and its values, e.g. epochs = [20, "auto"]')
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise UserError(f"{where}: [grid] {key} must be a non-empty list of values, got {values!r}")
    together = [key for key, values in grid.items() if key not in FIELDS and all(isinstance(v, dict) for v in values)]
    named = [(key, "") for key in (*common, *(sets or {}))] + [(key, "") for key in grid if key not in together]
    named += [(field, key) for key in together for table in grid[key] for field in table]
    for key, axis in named:
        if key == "out":
            raise UserError(
                f"{where}: 'out' is the sweep's ([sweep] out or --out); each setting's audit goes to OUT/<setting>"
            )
        if key not in FIELDS and (key != "spec" or axis):
            raise UserError(
                f"{where}: unknown spec field '{key}'" + (f" in [grid] {axis}" if axis else "") + f"; allowed: "
                f"{', '.join(FIELDS)} (or an axis of tables of fields set together, e.g. "
                'training = [{epochs = 20}, {epochs = "auto", max_epochs = 100}])'
            )
    if "spec" in common or (sets and "spec" in sets):
        raise UserError(f"{where}: a spec file for every setting goes in [sweep] spec; in [grid] spec, one per setting")
    if "spec" in grid and "spec" in head:
        raise UserError(f"{where}: 'spec' is both in [sweep] and an axis of [grid]; keep one")
    for key in sorted(set(grid) & (set(common) | set(sets or {}))):
        given = "[audit]" if key in common else "--set"
        raise UserError(f"{where}: '{key}' is an axis of [grid] and also given in {given}; keep one")
    given = {key: "[audit]" for key in common} | {key: "--set" for key in sets or {}}
    given |= {key: "an axis of [grid]" for key in grid if key not in together}
    for field, axis in named:
        if axis and (said := given.setdefault(field, f"[grid] {axis}")) != f"[grid] {axis}":
            raise UserError(f"{where}: '{field}' is set by [grid] {axis} and also by {said}; keep one")
    base = dict(common)
    for key, text in (sets or {}).items():
        base[key] = text
    out = Path(out) if out is not None else Path(head.get("out", Path("results") / path.stem))
    settings = []
    for combo in itertools.product(*grid.values()):
        values = dict(zip(grid, combo))
        name = setting_name(values)
        spec_file = values.get("spec", head.get("spec"))
        spec_path = (path.parent / spec_file) if spec_file is not None else None
        changes = {k: v for k, v in {**base, **values}.items() if k != "spec" and k not in together}
        for key in together:  # an axis of tables: each table's fields set together
            changes.update(values[key])
        try:
            start = load_spec(spec_path) if spec_path is not None else AuditSpec()
            spec = start.replace(**changes, out=str(out / name))
            check_settings(spec)
        except UserError as e:
            raise UserError(f"{where}: setting {name}: {e}") from None
        settings.append(Setting(name, values, spec, spec_path))
    names = [s.name for s in settings]
    doubled = sorted({n for n in names if names.count(n) > 1})
    if doubled:
        raise UserError(f"{where}: two settings share the folder name {doubled[0]}; make the grid's values differ")
    return Sweep(path, out, grid, settings)


def setting_name(values: dict[str, Any]) -> str:
    """'mnist-minority_epochs-auto': a spec file by its name, another field as field-value (lists joined by +),
    a table of fields set together as its fields ('epochs-auto_max_epochs-100')."""

    def text(value: Any) -> str:
        if isinstance(value, (list, tuple)):
            return "+".join(map(text, value))
        return f"{value:g}" if isinstance(value, float) else str(value)

    def part(key: str, value: Any) -> str:
        if key == "spec":
            return Path(str(value)).stem
        if isinstance(value, dict):
            return "_".join(f"{k}-{text(v)}" for k, v in value.items())
        return f"{key}-{text(value)}"

    parts = [part(k, v) for k, v in values.items()]
    return re.sub(r"[^A-Za-z0-9._+-]", "-", "_".join(parts)).lstrip(".") or "setting"


@dataclass
class SweepReport:
    """The sweep's answer: a row per (setting, loss), a row per (setting, loss against the reference loss), the
    one-line summaries per loss (the verdicts', then the contrasts'), and the interval levels they were made at."""

    sweep: Sweep
    table: pd.DataFrame
    summary: list[str]
    confidence: list[float]
    contrasts: pd.DataFrame
    contrast_confidence: list[float]

    def files(self) -> dict[str, bytes]:
        """sweep.csv, sweep-contrasts.csv, sweep.png, sweep.md, then sweep.json (the last: the report is complete)."""
        return {
            "sweep.csv": self.table.to_csv(index=False).encode(),
            "sweep-contrasts.csv": self.contrasts.to_csv(index=False).encode(),
            "sweep.png": png(sweep_figure(self.table)),
            "sweep.md": markdown(self).encode(),
            "sweep.json": (json.dumps(self.record(), indent=2, default=json_default) + "\n").encode(),
        }

    def record(self) -> dict[str, Any]:
        return {
            "written_by": "fairrecon",
            "version": __version__,
            "sweep": str(self.sweep.path),
            "axes": self.sweep.axes,
            "settings": [{"name": s.name, "values": s.values, "out": s.spec.out} for s in self.sweep.settings],
            "summary": self.summary,
            "rows": json.loads(self.table.to_json(orient="records")),
            "contrasts": json.loads(self.contrasts.to_json(orient="records")),
        }


def run_sweep(
    path: str | Path,
    *,
    executor: Executor | None = None,
    threads: int | None = None,
    out: str | Path | None = None,
    sets: dict[str, str] | None = None,
    force: bool = False,
    log: Callable[[str], None] | None = None,
) -> SweepReport:
    """Run (or resume) every setting's audit, its seeds as tasks through one executor (default: this process,
    at `threads`), save each audit's results folder, and write the report. Raises TasksFailed after saving
    every audit that finished when some tasks failed (the same call then trains the rest)."""
    log = log or (lambda message: None)
    if executor is not None and threads is not None:
        raise UserError("threads are the executor's when one is given (LocalExecutor(threads), RayExecutor(threads=))")
    sweep = load_sweep(path, out=out, sets=sets)
    runner = executor if executor is not None else LocalExecutor(threads)
    for s in sweep.settings:  # every folder is checked (reads only) before any is written
        files, folders = input_paths(s.spec)
        identity = Identity.of(s.spec, runner.device_type(s.spec))
        inputs = [*files, sweep.path, *([s.spec_file] if s.spec_file else [])]
        check_out(s.spec.out, identity, files=inputs, folders=folders, force=force)
    with ExitStack() as held:
        held.enter_context(writing(sweep.out))
        claim_sweep(sweep)
        runs = []
        for s in sweep.settings:
            say = lambda message, name=s.name: log(f"{name}: {message}")  # noqa: E731
            inputs = [sweep.path, *([s.spec_file] if s.spec_file else [])]
            runs.append(prepare_audit(s.spec, log=say, force=force, inputs=inputs, executor=runner, held=held))
            runs[-1].name = s.name
        tasks = sum(len(run.todo) for run in runs)
        log(f"{len(sweep.settings)} settings, {tasks} tasks (one per seed to train) on {runner.describe()}")
        failed = None
        try:
            runner.run(runs, log=log)
        except TasksFailed as e:
            failed = e
        results = {}
        for s, run in zip(sweep.settings, runs):
            if any(cell not in run.tables for cell in run.cells):
                continue  # a failed task's audit: finished by the next run
            result = finish_audit(run, lambda message, name=s.name: log(f"{name}: {message}"))
            result.info["threads"], result.info["threads_chosen"] = runner.threads, runner.threads_chosen
            result.info["executor"] = runner.record()
            start = time.perf_counter()
            analysis = analyse(result)  # by the default metric, as `fairrecon audit` without --metric
            result.info["timings"]["stats_s"] = time.perf_counter() - start
            save_results(result, s.spec.out, analysis)
            results[s.name] = analysis
        if failed is not None:
            raise failed
        report = sweep_report(sweep, results)
        write_files(sweep.out, report.files())
        claim_sweep(sweep, complete=True)
    return report


def claim_sweep(sweep: Sweep, complete: bool = False) -> None:
    """Refuse a folder that is not a sweep's (empty, or marked by SWEEP_MARKER); mark it as this sweep's."""
    out = sweep.out
    entries = [p.name for p in out.iterdir() if p.name != LOCK] if out.is_dir() else []
    if MARKER in entries:
        raise UserError(f"{out} holds an audit's results ({MARKER}), not a sweep's; pass another --out for the sweep")
    if entries and SWEEP_MARKER not in entries:
        raise UserError(
            f"sweep folder {out} is not empty and was not written by fairrecon sweep (no {SWEEP_MARKER}); "
            "pass a new or empty folder as --out"
        )
    marker = {
        "written_by": "fairrecon",
        "kind": "sweep",
        "version": __version__,
        "sweep": str(sweep.path),
        "settings": {s.name: s.spec.to_dict() for s in sweep.settings},
        "complete": complete,
    }
    atomic_write(out / SWEEP_MARKER, json.dumps(marker, indent=2, default=json_default) + "\n")


# ---------------------------------------------------------------- the answer


def worse_group(spec: AuditSpec, group: Any) -> str:
    """Which group is worse, in words: "bright group" / "dark group" for the brightest / darkest of brightness
    groups with distinct targets, else "group NAME"."""
    if not isinstance(group, str):
        return "no result"
    if spec.group_method in ("transform", "select") and len(set(spec.targets)) == len(spec.targets):
        names = names_for_targets(spec.targets)
        if group in names:
            target = spec.targets[names.index(group)]
            if target == max(spec.targets):
                return "bright group"
            if target == min(spec.targets):
                return "dark group"
    return f"group {group}"


COLUMNS = ["setting", "loss", "worse", "worst", "reference", "ratio", "ratio_low", "ratio_high", "gap", "verdict"]
# a loss against the reference loss, as the setting's audit has it (stats.CONTRAST_COLUMNS; by mse: a ratio)
CONTRAST_COLUMNS = ["loss", "reference", "metric", "loss_ratio", "reference_ratio", "ratio", "low", "high"]
CONTRAST_COLUMNS += ["p_corrected", "seeds", "verdict", "warnings"]


def sweep_report(sweep: Sweep, analyses: dict[str, Analysis]) -> SweepReport:
    """Per (setting, loss): the audit's own decided row; per (setting, loss against the reference loss): the
    audit's own loss contrast; per loss: the one-line summaries."""
    rows, contrasts = [], []
    for s in sweep.settings:
        analysis = analyses[s.name]
        axes = {f"axis_{k}": Path(v).stem if k == "spec" else _shown(v) for k, v in s.values.items()}
        for c in analysis.contrasts.to_dict("records"):
            contrasts.append({"setting": s.name, **axes, **{k: c.get(k) for k in CONTRAST_COLUMNS}})
        for d in analysis.disparities.to_dict("records"):
            worst = d.get("worst")
            rows.append(
                {
                    "setting": s.name,
                    **axes,
                    "loss": d["loss"],
                    "worse": worse_group(s.spec, worst if isinstance(worst, str) else None),
                    **{k: d.get(k) for k in COLUMNS[3:]},
                }
            )
    table = pd.DataFrame(rows)
    confidence = sorted({round(a.confidence, 6) for a in analyses.values()})
    contrast_table = pd.DataFrame(contrasts, columns=["setting", *[f"axis_{k}" for k in sweep.axes], *CONTRAST_COLUMNS])
    contrast_confidence = sorted({round(a.contrast_confidence, 6) for a in analyses.values() if len(a.contrasts)})
    summary = summary_lines(sweep, table) + contrast_lines(contrast_table)
    return SweepReport(sweep, table, summary, confidence, contrast_table, contrast_confidence)


def _shown(value: Any) -> Any:
    """An axis value in the report's table: a list joined by +, a table of fields as 'epochs=auto max_epochs=100'."""
    if isinstance(value, dict):
        return " ".join(f"{k}={_shown(v)}" for k, v in value.items())
    return "+".join(map(str, value)) if isinstance(value, (list, tuple)) else value


def summary_lines(sweep: Sweep, table: pd.DataFrame) -> list[str]:
    """Per loss: "l2: bright group worse in 7 of 8 settings, clear in 5", then any clear gap the other way,
    verdicts withheld (insufficient data) and settings without the loss."""
    lines = []
    losses = list(dict.fromkeys(loss for s in sweep.settings for loss in s.spec.losses))
    for loss in losses:
        having = sum(loss in s.spec.losses for s in sweep.settings)
        part = table[table["loss"] == loss]
        counts = Counter(w for w in part["worse"] if w != "no result")
        if not counts:
            lines.append(f"{loss}: no result in any of {having} settings")
            continue
        top, n_top = counts.most_common(1)[0]
        clear = part["verdict"] == CLEAR
        line = f"{loss}: {top} worse in {n_top} of {having} settings, clear in {int((clear & (part['worse'] == top)).sum())}"
        for other in counts:
            n_other = int((clear & (part["worse"] == other)).sum())
            if other != top and n_other:
                line += f"; {other} clearly worse in {n_other}"
        withheld = int((part["verdict"] == INSUFFICIENT).sum())
        if withheld:
            line += f"; insufficient data (no verdict) in {withheld}"
        if len(part) < having:
            line += f"; no result in {having - len(part)}"
        lines.append(line)
    return lines


def contrast_lines(contrasts: pd.DataFrame) -> list[str]:
    """Per loss against its reference loss: "l1 vs l2: less fair (its gap larger) in 5 of 7 settings, clearly
    less fair in 2; clearly fairer in 0", the direction most settings' ratios point first (a tie: both),
    in the audits' own verdict words; then verdicts withheld (insufficient data). "of N": the settings whose
    audit compared the two."""
    lines = []
    pairs = contrasts[["loss", "reference"]].drop_duplicates().itertuples(index=False)
    for loss, reference in pairs:
        part = contrasts[(contrasts["loss"] == loss) & (contrasts["reference"] == reference)]
        ratio = part["ratio"].to_numpy(dtype=float)
        above, below = int((ratio > 1).sum()), int((ratio < 1).sum())
        less, fairer = int((part["verdict"] == LESS_FAIR).sum()), int((part["verdict"] == FAIRER).sum())
        head = f"{loss} vs {reference}: "
        if not np.isfinite(ratio).any():
            line = head + f"no ratio in any of {len(part)} settings"
        elif above >= below:
            tie = f" and fairer (its gap smaller) in {below}" if above == below else ""
            line = head + f"less fair (its gap larger) in {above} of {len(part)} settings{tie}, {LESS_FAIR} in {less}"
            line += f"; {FAIRER} in {fairer}"
        else:
            line = head + f"fairer (its gap smaller) in {below} of {len(part)} settings, {FAIRER} in {fairer}"
            line += f"; {LESS_FAIR} in {less}"
        withheld = int((part["verdict"] == INSUFFICIENT).sum())
        if withheld:
            line += f"; insufficient data (no verdict) in {withheld}"
        lines.append(line)
    return lines


def _contrast_text(row: pd.Series) -> str:
    if not np.isfinite(row["ratio"]):
        return f"{row['verdict']}"
    return f"{row['ratio']:.2f} [{row['low']:.2f}, {row['high']:.2f}] {row['verdict']}"


def _ratio_text(row: pd.Series) -> str:
    if not np.isfinite(row["ratio"]):
        return f"{row['verdict']}"
    worse = str(row["worse"]).removesuffix(" group")
    return f"{row['ratio']:.2f} [{row['ratio_low']:.2f}, {row['ratio_high']:.2f}] {row['verdict']}, {worse} worse"


def markdown(report: SweepReport) -> str:
    """sweep.md: the question, the summary lines, the table (a row per setting, a column per loss), the figure."""
    sweep, table = report.sweep, report.table
    levels = ", ".join(f"{100 * c:.4g}%" for c in report.confidence)
    lines = [
        f"# Sweep {sweep.path.name}: does the verdict hold across settings?",
        "",
        f"{len(sweep.settings)} settings ({' x '.join(f'{k}: {len(v)}' for k, v in sweep.axes.items())}). "
        "Per loss and setting: the worst/best group ratio of held-out MSE per pixel, its interval and the verdict, "
        "each exactly as that setting's audit decides it (its summary.json and report; intervals simultaneous "
        f"over its losses, each at {levels}). Nothing is corrected across settings.",
        "",
        *[f"- {line}" for line in report.summary],
        "",
    ]
    losses = list(dict.fromkeys(table["loss"]))
    axes = [f"axis_{k}" for k in sweep.axes]
    header = ["setting", *[a.removeprefix("axis_") for a in axes], *losses]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in sweep.settings:
        part = table[table["setting"] == s.name].set_index("loss")
        cells = [_ratio_text(part.loc[loss]) if loss in part.index else "" for loss in losses]
        values = [str(part[a].iloc[0]) for a in axes] if len(part) else [""] * len(axes)
        lines.append(f"| [{s.name}]({s.name}/report.md) | " + " | ".join([*values, *cells]) + " |")
    lines += ["", "![Ratio per setting and loss](sweep.png)", ""]
    contrasts = report.contrasts
    if len(contrasts):
        levels = ", ".join(f"{100 * c:.4g}%" for c in report.contrast_confidence)
        pairs = list(dict.fromkeys(zip(contrasts["loss"], contrasts["reference"])))
        header = ["setting", *[a.removeprefix("axis_") for a in axes], *[f"{a} vs {b}" for a, b in pairs]]
        lines += [
            "## Loss against loss: is it fairer?",
            "",
            "Per setting, each loss against that audit's reference loss, paired by seed and test image: its "
            "worst/best ratio over the reference loss's (above 1: less fair, its gap larger), the interval and the "
            f"verdict, each exactly as that setting's audit decides it (its summary.json `loss_contrasts`; "
            f"intervals simultaneous over its comparisons, each at {levels}). Nothing is recomputed or corrected "
            "across settings.",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
        ]
        for s in sweep.settings:
            part = contrasts[contrasts["setting"] == s.name].set_index(["loss", "reference"])
            cells = [_contrast_text(part.loc[p]) if p in part.index else "" for p in pairs]
            values = [str(part[a].iloc[0]) for a in axes] if len(part) else [""] * len(axes)
            lines.append(f"| [{s.name}]({s.name}/report.md) | " + " | ".join([*values, *cells]) + " |")
        lines.append("")
    return "\n".join(lines)


VERDICT_STYLE = {CLEAR: "full", NO_CLEAR: "none", INSUFFICIENT: "none"}


def sweep_figure(table: pd.DataFrame) -> Figure:
    """A panel per loss: each setting's worst/best ratio with its interval; colour and marker say which group is
    worse, a filled marker a clear gap, a hollow one no clear gap, grey insufficient data."""
    losses = list(dict.fromkeys(table["loss"]))
    settings = list(dict.fromkeys(table["setting"]))
    roles = sorted({w for w in table["worse"] if w != "no result"}, key=lambda w: (w != "bright group", w))
    colors = dict(zip(roles, sns.color_palette("colorblind", max(len(roles), 1))))
    markers = dict(zip(roles, ("o", "s", "^", "D", "v", "P", "X", "*") * 4))
    cols = min(len(losses), 4)
    rows = -(-len(losses) // cols)
    fig = Figure(figsize=(WIDTH, 0.9 + rows * (0.35 * len(settings) + 0.8)), dpi=DPI, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharey=True)
    y = {name: i for i, name in enumerate(settings)}
    for ax, loss in zip(axes.flat, losses):
        part = table[table["loss"] == loss]
        ends = part[["ratio", "ratio_high"]].to_numpy(dtype=float)
        right = 1.1 * max(np.nanmax(np.where(np.isfinite(ends), ends, np.nan), initial=1.0), 1.0)
        for row in part.itertuples(index=False):
            if not np.isfinite(row.ratio):
                continue
            grey = row.verdict == INSUFFICIENT
            color = "0.6" if grey else colors[row.worse]
            high = row.ratio_high if np.isfinite(row.ratio_high) else right  # no upper end: to the edge, an arrow
            ax.plot([row.ratio_low, high], [y[row.setting]] * 2, color=color, linewidth=1.6)
            if not np.isfinite(row.ratio_high):
                ax.plot(high, y[row.setting], marker=">", color=color, markersize=5)
            ax.plot(
                row.ratio,
                y[row.setting],
                marker=markers.get(row.worse, "o"),
                color=color,
                markerfacecolor=color if row.verdict == CLEAR else "white",
                markersize=7,
                linestyle="none",
            )
        ax.axvline(1.0, color="0.3", linewidth=0.8, linestyle="--")
        ax.set_xlim(left=0, right=right)
        ax.set_title(loss)
        ax.set_xlabel("worst / best group MSE")
        ax.grid(True, axis="x", color="0.9")
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    for ax in list(axes.flat)[len(losses) :]:
        ax.set_visible(False)
    axes[0, 0].set_yticks(range(len(settings)), settings)
    axes[0, 0].invert_yaxis()
    handles = [
        Line2D([], [], color=colors[r], marker=markers[r], linestyle="none", label=f"{r} worse") for r in roles
    ] + [
        Line2D([], [], color="0.3", marker="o", linestyle="none", label="clear gap (filled)"),
        Line2D([], [], color="0.3", marker="o", markerfacecolor="white", linestyle="none", label="no clear gap"),
        Line2D([], [], color="0.6", marker="o", markerfacecolor="white", linestyle="none", label="insufficient data"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 5), frameon=False)
    return fig


def png(fig: Figure) -> bytes:
    """A figure as PNG bytes (no timestamp or software tag: the same figure gives the same bytes)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi, metadata={"Software": None})
    return buf.getvalue()


def terminal(report: SweepReport) -> str:
    """The summary lines and the table, for the terminal."""
    table = report.table
    losses = list(dict.fromkeys(table["loss"]))
    wide = table.pivot(index="setting", columns="loss", values="ratio").reindex(
        [s.name for s in report.sweep.settings]
    )[losses]
    verdicts = table.pivot(index="setting", columns="loss", values="verdict").reindex(wide.index)[losses]
    shown = wide.map(lambda r: f"{r:.2f}" if np.isfinite(r) else "-") + verdicts.map(
        {CLEAR: " clear", NO_CLEAR: "", INSUFFICIENT: " insuff."}.get
    )
    return "\n".join([*report.summary, "", "worst/best ratio per setting (clear: a clear gap):", shown.to_string()])

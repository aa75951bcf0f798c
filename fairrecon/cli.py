"""`fairrecon` command line: a thin layer over the Python API.

Exit status, the same for every command:
  0  pass (or done)
  1  the gate failed: a group gap is above the threshold with confidence (`check` only)
  2  usage or input error: one line on stderr (UserError, click usage errors)
  3  insufficient data to judge (`check`: an interval contains the threshold, a failed cell, a group
     under 30 test images)
  4  internal error, a bug in fairrecon: the traceback goes to a log file (in the results folder
     when there is one), and one line on stderr says where

With --json, `audit`, `check` and `report` print only JSON on stdout (the verdict per loss);
progress, notes and warnings go to stderr.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import click

from . import metrics
from .errors import ExitCode, UserError
from .fileio import json_default
from .spec import DATASETS, SCOPE_COMMANDS, AuditSpec, field_type, load_spec, parse_losses
from .version import __version__

ERROR_LOG = "fairrecon-error.log"
_results_folder: Path | None = None  # where a command writes or reads results: its internal-error log goes there


def spec_options(command_name: str) -> Callable[[Callable], Callable]:
    """Click options for the AuditSpec fields that `command_name` uses (their scope, spec.SCOPE_COMMANDS),
    built from the spec itself: help text, allowed values (click.Choice) and the default all come from
    spec.py. Every option defaults to None, meaning "not given": the spec file's value (or the spec
    default) stands."""

    def decorate(command):
        for f in reversed(dataclasses.fields(AuditSpec)):
            if command_name not in SCOPE_COMMANDS[f.metadata["scope"]]:
                continue
            flag, kind, choices = "--" + f.name.replace("_", "-"), field_type(f.name), f.metadata["choices"]
            shown = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
            kw = {"default": None, "help": f.metadata["help"] + ("" if f.default is None else f"  [default: {shown}]")}
            if choices:
                kw["type"] = click.Choice(choices)
            elif kind is bool:
                flag = f"{flag}/--no-{flag[2:]}"
            elif kind in (int, float):
                kw["type"] = kind
            if f.metadata["metavar"] and not choices:
                kw["metavar"] = f.metadata["metavar"]
            command = click.option(flag, f.name, **kw)(command)
        return command

    return decorate


def with_defaults(command: Callable) -> Callable:
    """Fill a command's help with the spec's defaults ({seeds}, {losses}, ...): numbers in help come from
    spec.py, never from prose that can fall behind it."""
    defaults = AuditSpec()
    command.__doc__ = command.__doc__.format(
        **{
            f.name: ", ".join(map(str, v)) if isinstance(v := getattr(defaults, f.name), tuple) else v
            for f in dataclasses.fields(AuditSpec)
        }
    )
    return command


def json_option(command):
    return click.option(
        "--json",
        "as_json",
        is_flag=True,
        help="Print only JSON on stdout (the verdict per loss); progress and notes go to stderr.",
    )(command)


def reference_loss_option(command):
    return click.option(
        "--reference-loss",
        metavar="LOSS",
        help="The loss every other loss is compared with, paired by seed and test image.  "
        "[default: the one the audit recorded, else l2 when audited, else the first loss]",
    )(command)


def metric_option(default: str | None, help_text: str):
    """--metric: the metrics a verdict may use, from the registry (metrics.py imports no torch, so --help
    stays fast)."""
    return click.option(
        "--metric",
        type=click.Choice(metrics.VERDICT_METRICS),
        default=default,
        show_default=default is not None,
        help=help_text + " Definitions: `fairrecon metrics`.",
    )


def spec_from(spec_file: str | None, flags: dict) -> AuditSpec:
    """The spec file (or the defaults) with the flags that were given (lists arrive as 'a,b')."""
    return load_spec(spec_file, **flags) if spec_file else AuditSpec().override(**flags)


def note(message: str) -> None:
    """A note or warning for the person at the terminal: always on stderr."""
    click.echo(message, err=True)


def print_json(payload: dict) -> None:
    click.echo(json.dumps(payload, indent=2, default=json_default))


def verdict_records(disparities) -> list[dict]:
    """The statistics' verdict per loss as JSON records, whatever columns `stats.disparities` has."""
    from .results import records

    return [] if disparities is None else records(disparities)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="fairrecon")
def cli() -> None:
    """Audit reconstruction losses for per-group fairness.

    \b
    Exit status: 0 pass, 1 the gate failed (check), 2 usage or input error,
    3 insufficient data, 4 internal error (traceback saved to a log file).
    """


@cli.command()
@with_defaults
@click.argument("spec_file", required=False, type=click.Path(dir_okay=False))
@spec_options("audit")
@click.option(
    "--force",
    is_flag=True,
    help="Replace an --out folder that holds an audit of a different spec or "
    "different inputs (never a folder that is not fairrecon's).",
)
@click.option("--quiet", is_flag=True, help="No progress bars or log lines: only the final table.")
@metric_option(metrics.DEFAULT, "Metric of the verdicts (every metric is measured and compared).")
@reference_loss_option
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="CPU threads for torch (default: every CPU this process may use: its affinity, capped by a cgroup "
    "quota). Changes speed, not results.",
)
@json_option
def audit(spec_file, quiet, force, as_json, threads, metric, reference_loss, **flags) -> int:
    """Train autoencoders under each loss and measure per-group error on held-out images.

    With no arguments: the {dataset} dataset, groups at mean brightness {targets}, the
    losses {losses}, {seeds} seeds of {epochs} epochs each. Flags override SPEC_FILE. With --out,
    finished cells are kept in OUT/cells: run the same command again after an interruption to resume.

    \b
    Examples:
      fairrecon audit
      fairrecon audit audits/fashion-mnist-minority.toml --data-root ../shared/datasets --out results/fm
      fairrecon audit --dataset folder --data-root faces/images --labels faces/groups.csv --out results/faces
      fairrecon audit --epochs 5 --seeds 2 --json > verdict.json
      fairrecon audit --metric rel_mse --out results/relative
    """
    from .audit import run_audit
    from .bymetric import by_metric
    from .outputs import save_results
    from .progress import Progress
    from .report import headline, metric_caveat, terminal_summary, vae_terminal
    from .stats import analyse

    global _results_folder
    begun = time.perf_counter()  # the command's own clock: the total it prints includes statistics and writing
    spec = spec_from(spec_file, flags)
    _results_folder = Path(spec.out) if spec.out else None
    with Progress(quiet=quiet or as_json) as progress:
        result = run_audit(
            spec,
            log=progress.log,
            on_epoch=progress.on_epoch,
            force=force,
            save=False,
            inputs=[spec_file] if spec_file else [],
            threads=threads,
        )
        start = time.perf_counter()
        if reference_loss:
            result.info["reference_loss"] = reference_loss  # recorded, so `report` compares with it too
        analysis = analyse(result, metric=metric, reference_loss=reference_loss)
        compared = by_metric(result, analysis)
        result.info["timings"]["stats_s"] = time.perf_counter() - start
        if spec.out:
            progress.log(f"writing {spec.out}/ (tables, summary.json, report.md, report.html)")
            start = time.perf_counter()
            save_results(result, spec.out, analysis, compared)
            written = time.perf_counter() - start
    failed = result.arms().cells.query("status != 'ok'")  # named by arm: loss, with its objective unless erm
    if as_json:
        print_json(
            {
                "command": "audit",
                "out": spec.out,
                "metric_caveat": metric_caveat(compared),
                "verdict": headline(analysis),
                "disparities": verdict_records(analysis.disparities),
                "loss_contrasts": verdict_records(analysis.contrasts),
                "objective_effects": verdict_records(analysis.effects),
                "warnings": _warnings(result),
            }
        )
    else:
        click.echo("\n" + terminal_summary(analysis, compared))
        if result.vae:
            click.echo("\n" + vae_terminal(result))
    for row in failed.itertuples():
        note(f"warning: cell {row.loss}/seed{row.seed} {row.status}")
    if len(failed) == len(result.cells):
        note("warning: every cell failed; the table above is empty (see the cells' status in summary.json)")
    for warning in result.info.get("warnings", []):
        note(f"warning: {warning}")
    timings = result.info["timings"]
    note(
        f"total {time.perf_counter() - begun:.1f} s (audit {timings['total_s']:.1f} s, statistics "
        f"{timings['stats_s']:.1f} s" + (f", writing results {written:.1f} s" if spec.out else "") + ") on "
        f"{result.info['device']}, {result.info['threads']} thread(s)"
        + (f"; results in {spec.out}/ (open {spec.out}/report.html)" if spec.out else "")
    )
    return ExitCode.PASS


@cli.command()
@click.argument("result_dir", type=click.Path(file_okay=False))
@click.option("--out", help="Folder for report.md and report.html (default: RESULT_DIR).")
@metric_option(None, "Metric of the verdicts.  [default: the one RESULT_DIR's verdicts are by, else mse]")
@reference_loss_option
@json_option
def report(result_dir, out, metric, reference_loss, as_json) -> int:
    """Re-render report.html and report.md from a saved results folder, without retraining.

    \b
    Examples:
      fairrecon report results/fm
      fairrecon report results/fm --out reports/fm
      fairrecon report results/fm --metric ssim_error --out reports/fm-ssim
      fairrecon report results/fm --json
    """
    from .bymetric import by_metric
    from .outputs import write_reports
    from .report import headline, metric_caveat, terminal_summary, vae_terminal
    from .results import AuditResult, saved_verdict_metric
    from .stats import analyse, choose_reference_loss

    global _results_folder
    _results_folder = Path(result_dir)
    result = AuditResult.load(result_dir)
    analysis = analyse(
        result, metric=metric or saved_verdict_metric(result_dir) or metrics.DEFAULT, reference_loss=reference_loss
    )
    recorded = choose_reference_loss(result, analysis.losses, None)
    if analysis.reference_loss != recorded and Path(out or result_dir).resolve() == Path(result_dir).resolve():
        raise UserError(
            f"--reference-loss {reference_loss}: the reports in {result_dir} would compare with {reference_loss} while "
            f"its summary.json compares with {recorded}; write them elsewhere with --out"
        )
    compared = by_metric(result, analysis)
    paths = write_reports(result, analysis, out or result_dir, compared, source=result_dir)
    if as_json:
        print_json(
            {
                "command": "report",
                "results": result_dir,
                "metric_caveat": metric_caveat(compared),
                "verdict": headline(analysis),
                "disparities": verdict_records(analysis.disparities),
                "loss_contrasts": verdict_records(analysis.contrasts),
                "objective_effects": verdict_records(analysis.effects),
                "warnings": _warnings(result),
            }
        )
    else:
        click.echo(terminal_summary(analysis, compared))
        if result.vae:
            click.echo("\n" + vae_terminal(result))
    note(f"wrote {paths['html']} and {paths['md']}")
    return ExitCode.PASS


@cli.command()
@click.argument("result_dir", required=False, type=click.Path(file_okay=False))
@metric_option(metrics.DEFAULT, "Metric to gate on.")
@click.option(
    "--max-ratio",
    type=float,
    help="Threshold on worst/reference error: pass only if every interval's upper end is below it, "
    "fail if a lower end is above it, else exit 3.",
)
@click.option("--max-gap", type=float, help="The same on worst - reference error (metric units; dB for psnr).")
@click.option(
    "--max-contrast",
    type=float,
    help="Threshold on each loss's worst/best ratio over the reference loss's (1: as fair as it): pass only "
    "if the upper end is below it, fail if the lower end is above it.",
)
@click.option("--adjusted", is_flag=True, help="Gate the gap in excess of each group's own rank-k PCA error.")
@click.option(
    "--alpha",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=0.05,
    show_default=True,
    help="1 - confidence of all the gate's intervals together.",
)
@click.option("--reference", default="best", show_default=True, help="Reference group name, or 'best'.")
@reference_loss_option
@click.option("--losses", metavar="L,L,...", help="Only these losses (comma-separated).  [default: all]")
@click.option(
    "--weights",
    type=click.Path(dir_okay=False),
    help="Audit a trained model instead of RESULT_DIR: a state_dict (with --model-factory), "
    "a TorchScript or a torch.export file.",
)
@click.option(
    "--model-factory", metavar="MODULE:FUNCTION", help="package.module:function returning the nn.Module for --weights."
)
@click.option(
    "--trained-on",
    metavar="all|CSV",
    help="With --weights: what the model was trained on, 'all' images or a CSV with a file column "
    "(e.g. split.csv: only its train rows count); the gate refuses when test images are among them.",
)
@click.option(
    "--allow-trained-on-test",
    is_flag=True,
    help="Gate a model scored on test images it was trained on (--trained-on all or an overlap) anyway.",
)
@click.option(
    "--spec", "spec_file", type=click.Path(dir_okay=False), help="Spec TOML for the test images (with --weights)."
)
@spec_options("check")
@json_option
def check(
    result_dir,
    metric,
    max_ratio,
    max_gap,
    max_contrast,
    adjusted,
    alpha,
    reference,
    reference_loss,
    losses,
    weights,
    model_factory,
    trained_on,
    allow_trained_on_test,
    spec_file,
    as_json,
    **data_flags,
) -> int:
    """Gate: exit 0 only if every gap is shown to be below its threshold, 1 if one is shown to be above,
    3 if the data cannot tell (an interval contains the threshold, or the data are insufficient).

    Checks a results folder (from `fairrecon audit --out`), or with --weights a trained
    autoencoder on the spec's grouped test images, without training.

    \b
    Examples:
      fairrecon check results/default --max-ratio 1.2
      fairrecon check results/default --max-contrast 1.0 --reference-loss l2
      fairrecon check results/default --max-gap 0.002 --adjusted --json
      fairrecon check --weights ae.pt --model-factory mymodels:build --dataset folder \\
          --data-root faces/images --labels faces/groups.csv --trained-on split.csv --max-ratio 1.2
    """
    from .gate import check as gate_check
    from .results import AuditResult

    global _results_folder
    if (result_dir is None) == (weights is None):
        raise UserError("give either RESULT_DIR or --weights FILE (a trained model), not both or neither")
    given = sorted(k.replace("_", "-") for k, v in data_flags.items() if v is not None)
    if result_dir is not None:
        extra = (
            given
            + ["model-factory"] * bool(model_factory)
            + ["spec"] * bool(spec_file)
            + ["trained-on"] * bool(trained_on)
            + ["allow-trained-on-test"] * bool(allow_trained_on_test)
        )
        if extra:
            raise UserError(f"--{extra[0]} applies only with --weights")
        _results_folder = Path(result_dir)
        result = AuditResult.load(result_dir)
    else:
        from .external import audit_model, load_model
        from .groups import read_file_list

        device = data_flags.pop("device") or "cpu"
        spec = spec_from(spec_file, data_flags)
        seen = None if trained_on is None else "all" if trained_on == "all" else read_file_list(trained_on)
        model = load_model(weights, model_factory)
        result = audit_model(model, spec, name="model", device=device, trained_on=seen)
        if spec.dataset == "folder" and trained_on is None:
            note(
                f"note: the model is scored on {result.samples['index'].nunique()} held-out images (`fairrecon split` "
                "with the same data options lists them); if it was trained on any, say so with --trained-on"
            )
    outcome = gate_check(
        result,
        metric=metric,
        max_ratio=max_ratio,
        max_gap=max_gap,
        max_contrast=max_contrast,
        adjusted=adjusted,
        alpha=alpha,
        reference=reference,
        reference_loss=reference_loss,
        losses=list(parse_losses(losses)) if losses else None,
        allow_trained_on_test=allow_trained_on_test,
    )
    if as_json:
        print_json(
            {
                "command": "check",
                **outcome.record(),
                "passed": outcome.passed,
                "message": outcome.message,
                "disparities": verdict_records(outcome.table),
                "loss_contrasts": verdict_records(outcome.contrasts),
                "warnings": _warnings(result),
            }
        )
    else:
        click.echo(outcome.message)
    for warning in result.info.get("warnings", []):
        note(f"warning: {warning}")
    return outcome.code


@cli.command()
@click.argument("spec_file", required=False, type=click.Path(dir_okay=False))
@spec_options("split")
def split(spec_file, **flags) -> int:
    """Print the train/test split as CSV (file, group, split), without training.

    For an image folder: every file with its group and whether it is trained on, held out
    (test) or left out by a limit (unused). Train your own model on the train files only,
    then score it with `fairrecon check --weights ... --trained-on split.csv`.

    \b
    Examples:
      fairrecon split --dataset folder --data-root faces/images --labels faces/groups.csv > split.csv
    """
    from .data import load_images_for
    from .groups import make_groups, split_table

    spec = spec_from(spec_file, flags)
    images = load_images_for(spec)
    table = split_table(images, make_groups(images, spec))
    if table is None:
        raise UserError(
            f"split: dataset '{spec.dataset}' has no files to list; its test split is "
            + ("its own test set" if spec.dataset != "digits" else f"20% of the images (split_seed {spec.split_seed})")
        )
    click.echo(table.to_csv(index=False), nl=False)
    counts = table["split"].value_counts()
    note(f"{counts.get('train', 0)} train, {counts.get('test', 0)} test, {counts.get('unused', 0)} unused images")
    return ExitCode.PASS


@cli.command()
@json_option
def losses(as_json) -> int:
    """List the registered losses and loss families, and the likelihood each one is.

    \b
    Examples:
      fairrecon losses
      fairrecon losses --json
    """
    from .losses import FAMILIES, LOSSES

    rows = [{"name": loss.name, "likelihood": loss.likelihood} for loss in LOSSES.values()]
    rows += [
        {"name": family.pattern, "likelihood": f"{family.likelihood}; {family.symbol} in {family.allowed}"}
        for family in FAMILIES.values()
    ]
    if as_json:
        print_json({"command": "losses", "losses": rows})
    else:
        width = max(len(r["name"]) for r in rows)
        for r in rows:
            click.echo(f"{r['name']:<{width}}  {r['likelihood']}")
    return ExitCode.PASS


@cli.command(name="metrics")
@json_option
def list_metrics(as_json) -> int:
    """List the per-image metrics: direction, whether a verdict may use them (--metric), and definition.

    \b
    Examples:
      fairrecon metrics
      fairrecon metrics --json
    """
    rows = [
        {
            "name": m.name,
            "label": m.label,
            "direction": m.direction,
            "ratio": m.ratio,
            "verdicts": m.verdicts,
            "definition": m.definition,
            **({"why_not": m.why_not} if not m.verdicts else {}),
        }
        for m in metrics.METRICS.values()
    ]
    if as_json:
        print_json({"command": "metrics", "metrics": rows})
    else:
        for r in rows:
            use = "--metric" if r["verdicts"] else f"no verdicts: {r['why_not']}"
            ratio = "" if r["ratio"] else ", no ratio"
            click.echo(f"{r['name']:<11} {r['label']}: {r['direction']}{ratio}; {use}\n{'':<12}{r['definition']}")
    return ExitCode.PASS


@cli.command()
@click.option("--data-root", default="datasets", show_default=True, metavar="DIR", help="Where to look for the files.")
@json_option
def datasets(data_root, as_json) -> int:
    """List the datasets, where their files are looked for, and whether they are there.

    \b
    Examples:
      fairrecon datasets
      fairrecon datasets --data-root ../shared/datasets
    """
    from .data import dataset_files, where_files_are

    rows = [
        {
            "name": name,
            "files": where_files_are(name, data_root),
            "found": name == "digits" or bool(dataset_files(name, data_root)),
        }
        for name in DATASETS
    ]
    if as_json:
        print_json({"command": "datasets", "data_root": data_root, "datasets": rows})
    else:
        width = max(len(r["name"]) for r in rows)
        for r in rows:
            click.echo(f"{r['name']:<{width}}  {'found  ' if r['found'] else 'missing'}  {r['files']}")
    return ExitCode.PASS


def _warnings(result) -> list[str]:
    """The data warnings of a result (skipped images, a model scored on its own training images)."""
    return list(result.info.get("warnings", []))


def main(argv: list[str] | None = None) -> None:
    """Entry point: the exit status of the module docstring."""
    global _results_folder
    _results_folder = None  # set by the command once it knows its results folder
    try:
        code = cli.main(args=argv, prog_name="fairrecon", standalone_mode=False)
    except (UserError, click.ClickException) as e:  # a usage error, a bad option value, a missing file
        message = e.format_message() if isinstance(e, click.ClickException) else str(e)
        click.echo(f"fairrecon: error: {message}", err=True)
        sys.exit(ExitCode.USAGE)
    except (click.Abort, KeyboardInterrupt):
        click.echo("fairrecon: interrupted; with --out, run the same command again to resume", err=True)
        sys.exit(ExitCode.INTERRUPTED)
    except Exception as e:  # a bug in fairrecon: keep the traceback, say one line
        log = _save_traceback()
        click.echo(
            f"fairrecon: internal error ({type(e).__name__}), a bug in fairrecon, not in your input; "
            f"traceback saved to {log}; please report it with that file",
            err=True,
        )
        sys.exit(ExitCode.INTERNAL)
    sys.exit(code if isinstance(code, int) else ExitCode.PASS)


def _save_traceback() -> Path:
    """Write the current exception's traceback to ERROR_LOG in the results folder when it is fairrecon's,
    else to a temporary file; return its path."""
    text = traceback.format_exc()
    folder = _results_folder
    if folder is not None and ((folder / "fairrecon.json").is_file() or (folder / "summary.json").is_file()):
        try:
            path = folder / ERROR_LOG
            path.write_text(text)
            return path
        except OSError:
            pass
    fd, name = tempfile.mkstemp(prefix="fairrecon-error-", suffix=".log")
    with open(fd, "w") as f:
        f.write(text)
    return Path(name)

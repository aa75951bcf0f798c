"""`fairrecon` command line: a thin layer over the Python API.

Exit status, the same for every command:
  0  pass (or done)
  1  the gate failed: a group gap is above the threshold with confidence (`check` only)
  2  usage or input error: one line on stderr (UserError, click usage errors)
  3  insufficient data to judge (`check`: an interval contains the threshold, a failed cell, a group
     under 30 test images)
  4  internal error, a bug in fairrecon: the traceback goes to a log file (in the results folder
     when there is one), and one line on stderr says where; or training tasks that failed on Ray after
     their retries (`--executor ray`): one line names the cells not trained, the finished ones are
     saved, and the same command trains the rest

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
from contextlib import ExitStack
from pathlib import Path

import click

from . import metrics
from .errors import ExitCode, TasksFailed, UserError
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


EXECUTORS = ("in-process", "ray")


def executor_options(command):
    """--executor and the options of --executor ray (docs/scale.md)."""
    options = [
        click.option(
            "--executor",
            type=click.Choice(EXECUTORS),
            default="in-process",
            show_default=True,
            help='Where the cells train: in this process, or as tasks (one per seed) on Ray (pip install "fairrecon[ray]").',
        ),
        click.option(
            "--ray-address",
            metavar="auto|HOST:PORT",
            help="With --executor ray: join this Ray cluster (auto: the one `ray start` began on this machine).  "
            "[default: start a local Ray that listens on 127.0.0.1 only]",
        ),
        click.option(
            "--cpus-per-task",
            type=click.IntRange(min=1),
            metavar="N",
            help="With --executor ray: CPUs each task asks Ray for.  [default: 1]",
        ),
        click.option(
            "--gpus-per-task",
            type=click.FloatRange(min=0),
            metavar="G",
            help="With --executor ray: GPUs each task asks Ray for (a fraction shares one).  [default: 0]",
        ),
        click.option(
            "--task-retries",
            type=click.IntRange(min=0),
            metavar="N",
            help="With --executor ray: how often Ray retries a task whose worker died.  [default: 2]",
        ),
        click.option(
            "--ray-dashboard",
            is_flag=True,
            default=None,
            help="With --executor ray and no --ray-address: start the local Ray's dashboard (on 127.0.0.1).",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def make_executor(executor: str, threads: int | None, quiet: bool, **given):
    """The executor the options ask for: None for in-process (an option of Ray's with it is refused)."""
    if executor == "in-process":
        extra = [name for name, value in given.items() if value is not None]
        if extra:
            raise UserError(f"--{extra[0].replace('_', '-')} applies only with --executor ray")
        return None
    from .executor import RayExecutor

    names = {"cpus_per_task": "cpus_per_task", "gpus_per_task": "gpus_per_task", "task_retries": "retries"}
    chosen = {names[k]: v for k, v in given.items() if k in names and v is not None}  # else RayExecutor's defaults
    return RayExecutor(
        given.get("ray_address"), threads=threads, dashboard=bool(given.get("ray_dashboard")), quiet=quiet, **chosen
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
    3 insufficient data, 4 internal error (traceback saved to a log file) or
    training tasks that failed on Ray after their retries (the same command resumes).
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
    "quota); with --executor ray, in each task (default: its CPUs). Changes speed, not results.",
)
@executor_options
@json_option
def audit(
    spec_file,
    quiet,
    force,
    as_json,
    threads,
    metric,
    reference_loss,
    executor,
    ray_address,
    cpus_per_task,
    gpus_per_task,
    task_retries,
    ray_dashboard,
    **flags,
) -> int:
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
      fairrecon audit --executor ray --seeds 10 --out results/seeds-10
      fairrecon audit --executor ray --ray-address auto --cpus-per-task 4 --out results/cluster
    """
    from .audit import run_audit
    from .bymetric import by_metric
    from .outputs import save_results
    from .progress import Progress
    from .report import headline, metric_caveat, terminal_summary, vae_terminal
    from .resultsdir import writing
    from .stats import analyse

    global _results_folder
    begun = time.perf_counter()  # the command's own clock: the total it prints includes statistics and writing
    spec = spec_from(spec_file, flags)
    _results_folder = Path(spec.out) if spec.out else None
    runner = make_executor(
        executor,
        threads,
        quiet or as_json,
        ray_address=ray_address,
        cpus_per_task=cpus_per_task,
        gpus_per_task=gpus_per_task,
        task_retries=task_retries,
        ray_dashboard=ray_dashboard,
    )
    with ExitStack() as held, Progress(quiet=quiet or as_json) as progress:
        if spec.out:
            held.enter_context(writing(spec.out))  # one run at a time in OUT, from training to the last file
        if runner is not None:
            held.enter_context(runner)
        result = run_audit(
            spec,
            log=progress.log,
            on_epoch=progress.on_epoch,
            force=force,
            save=False,
            inputs=[spec_file] if spec_file else [],
            threads=threads if runner is None else None,
            executor=runner,
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
    failed = result.cells[result.cells["status"] != "ok"]
    if as_json:
        print_json(
            {
                "command": "audit",
                "out": spec.out,
                "metric_caveat": metric_caveat(compared),
                "verdict": headline(analysis),
                "disparities": verdict_records(analysis.disparities),
                "loss_contrasts": verdict_records(analysis.contrasts),
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
@click.argument("sweep_file", type=click.Path(dir_okay=False))
@click.option("--out", metavar="DIR", help="The sweep folder.  [default: the file's [sweep] out, else results/NAME]")
@click.option(
    "--set",
    "sets",
    multiple=True,
    metavar="KEY=VALUE",
    help="A spec field for every setting, over the file's [audit] (not a [grid] axis); repeatable.",
)
@click.option("--force", is_flag=True, help="Replace a setting's folder that holds an audit of another spec or inputs.")
@click.option("--quiet", is_flag=True, help="No log lines: only the summary and the table.")
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="CPU threads for torch in each task (default: in-process every usable CPU; with --executor ray its CPUs).",
)
@executor_options
@json_option
def sweep(
    sweep_file,
    out,
    sets,
    force,
    quiet,
    threads,
    executor,
    ray_address,
    cpus_per_task,
    gpus_per_task,
    task_retries,
    ray_dashboard,
    as_json,
) -> int:
    """Run one audit per setting of a grid (all their tasks through one queue) and report whether the
    verdict holds across settings.

    Each setting's audit goes to OUT/SETTING/ (a results folder like any other); OUT/sweep.md, sweep.csv,
    sweep.png and sweep.json hold, per loss and setting, the ratio with its interval and the audit's own
    verdict, and one line per loss. Run the same command again to resume. The file's format: docs/scale.md.

    \b
    Examples:
      fairrecon sweep audits/sweeps/findings.toml --set data_root=../shared/datasets
      fairrecon sweep audits/sweeps/findings.toml --executor ray --ray-address auto --cpus-per-task 2
    """
    from .progress import Progress
    from .sweep import load_sweep, run_sweep, terminal

    global _results_folder
    given = {}
    for item in sets:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise UserError(f"--set {item}: write KEY=VALUE, e.g. --set data_root=../shared/datasets")
        given[key.strip().replace("-", "_")] = _flag_value(key.strip().replace("-", "_"), value.strip())
    folder = load_sweep(sweep_file, out=out, sets=given).out  # a bad file or setting: refused before Ray starts
    _results_folder = folder
    runner = make_executor(
        executor,
        threads,
        quiet or as_json,
        ray_address=ray_address,
        cpus_per_task=cpus_per_task,
        gpus_per_task=gpus_per_task,
        task_retries=task_retries,
        ray_dashboard=ray_dashboard,
    )
    with ExitStack() as held, Progress(quiet=quiet or as_json) as progress:
        if runner is not None:
            held.enter_context(runner)
        report = run_sweep(
            sweep_file,
            executor=runner,
            threads=threads if runner is None else None,
            out=out,
            sets=given,
            force=force,
            log=progress.log,
        )
    if as_json:
        print_json({"command": "sweep", **report.record()})
    else:
        click.echo(terminal(report))
    note(f"results in {folder}/ (open {folder}/sweep.md; each setting's audit in {folder}/SETTING/)")
    return ExitCode.PASS


def _flag_value(key: str, text: str):
    """A --set value as the field wants it: true/false for a yes/no field, else the text (the spec parses it)."""
    from .spec import FIELDS

    if key in FIELDS and field_type(key) is bool:
        if text.lower() not in ("true", "false"):
            raise UserError(f"--set {key}={text}: {key} is true or false")
        return text.lower() == "true"
    return text


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
    except TasksFailed as e:  # work lost on the cluster, not a bug: the finished cells are saved
        click.echo(f"fairrecon: error: {e}; each failure in full: {_save_log(e.details)}", err=True)
        sys.exit(ExitCode.INTERNAL)
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
    return _save_log(traceback.format_exc())


def _save_log(text: str) -> Path:
    """Write `text` to ERROR_LOG in the results folder when it is fairrecon's, else to a temporary file."""
    folder = _results_folder
    markers = ("fairrecon.json", "summary.json", "fairrecon-sweep.json")  # an audit's or a sweep's folder
    if folder is not None and any((folder / name).is_file() for name in markers):
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

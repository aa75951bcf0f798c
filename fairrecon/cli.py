"""`fairrecon` command line: a thin layer over the Python API.

User mistakes (UserError, click usage errors) print one line on stderr and exit 2.
"""

from __future__ import annotations

import dataclasses
import sys

import click

from .errors import UserError
from .spec import AuditSpec, field_type, load_spec, parse_list

EXIT_USAGE = 2


def spec_options(*scopes: str):
    """Click options for the AuditSpec fields of the given scopes, built from the spec itself:
    help text, allowed values (click.Choice) and the default all come from spec.py. Every option
    defaults to None, meaning "not given": the spec file's value (or the spec default) stands."""
    def decorate(command):
        for f in reversed(dataclasses.fields(AuditSpec)):
            if f.metadata["scope"] not in scopes:
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


def spec_from(spec_file: str | None, flags: dict) -> AuditSpec:
    """The spec file (or the defaults) with the flags that were given (lists arrive as 'a,b')."""
    return load_spec(spec_file, **flags) if spec_file else AuditSpec().override(**flags)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fairrecon")
def cli() -> None:
    """Audit reconstruction losses for per-group fairness."""


@cli.command()
@click.argument("spec_file", required=False, type=click.Path(dir_okay=False))
@spec_options("data", "audit")
@click.option("--force", is_flag=True, help="Write into an --out folder that holds an audit of a different spec.")
@click.option("--quiet", is_flag=True, help="No progress bars or log lines: only the final table.")
def audit(spec_file, quiet, force, **flags) -> None:
    """Train autoencoders under each loss and measure per-group error on held-out images.

    With no arguments: the bundled digits, groups at mean brightness 0.3 and 0.9,
    four losses, three seeds. Flags override SPEC_FILE. With --out, finished cells are
    kept in OUT/cells: run the same command again after an interruption to resume.
    """
    from .audit import run_audit
    from .outputs import save_results
    from .progress import Progress
    from .report import terminal_summary
    from .stats import analyse

    spec = spec_from(spec_file, flags)
    with Progress(quiet=quiet) as progress:
        result = run_audit(spec, log=progress.log, on_epoch=progress.on_epoch, force=force, save=False)
        analysis = analyse(result)
        if spec.out:
            progress.log(f"writing {spec.out}/ (tables, summary.json, report.md, report.html)")
            save_results(result, spec.out, analysis)
    click.echo("\n" + terminal_summary(analysis))
    failed = result.cells[result.cells["status"] != "ok"]
    for row in failed.itertuples():
        click.echo(f"warning: cell {row.loss}/seed{row.seed} {row.status}", err=True)
    if len(failed) == len(result.cells):
        click.echo("warning: every cell failed; the table above is empty (see the cells' status in summary.json)", err=True)
    click.echo(f"\ntotal {result.info['timings']['total_s']:.1f} s on {result.info['device']}"
               + (f"; results in {spec.out}/ (open {spec.out}/report.html)" if spec.out else ""))


@cli.command()
@click.argument("result_dir", type=click.Path(file_okay=False))
@click.option("--out", help="Folder for report.md and report.html (default: RESULT_DIR).")
def report(result_dir, out) -> None:
    """Re-render report.html and report.md from a saved results folder, without retraining."""
    from .outputs import write_reports
    from .report import terminal_summary
    from .results import AuditResult
    from .stats import analyse

    result = AuditResult.load(result_dir)
    analysis = analyse(result)
    paths = write_reports(result, analysis, out or result_dir)
    click.echo(terminal_summary(analysis))
    click.echo(f"\nwrote {paths['html']} and {paths['md']}")


@cli.command()
@click.argument("result_dir", required=False, type=click.Path(file_okay=False))
@click.option("--metric", default="mse", show_default=True, help="mse, mae or psnr.")
@click.option("--max-ratio", type=float, help="Fail if worst/reference error exceeds this (with confidence 1 - alpha).")
@click.option("--max-gap", type=float, help="Fail if worst - reference error exceeds this (metric units; dB for psnr).")
@click.option("--adjusted", is_flag=True, help="Gate the gap in excess of each group's own rank-k PCA error.")
@click.option("--alpha", type=float, default=0.05, show_default=True, help="1 - confidence of the lower bound.")
@click.option("--reference", default="best", show_default=True, help="Reference group name, or 'best'.")
@click.option("--losses", help="Only these losses (comma-separated).")
@click.option("--weights", type=click.Path(dir_okay=False),
              help="Audit a trained model instead of RESULT_DIR: a state_dict (with --model-factory), "
                   "a TorchScript or a torch.export file.")
@click.option("--model-factory", help="package.module:function returning the nn.Module for --weights.")
@click.option("--spec", "spec_file", type=click.Path(dir_okay=False), help="Spec TOML for the test images (with --weights).")
@spec_options("data")
def check(result_dir, metric, max_ratio, max_gap, adjusted, alpha, reference, losses, weights, model_factory,
          spec_file, **data_flags) -> int:
    """Gate: exit 1 if a group gap exceeds a threshold with confidence, 0 if not, 3 if data are insufficient.

    Checks a results folder (from `fairrecon audit --out`), or with --weights a trained
    autoencoder on the spec's grouped test images, without training.
    """
    from .gate import check as gate_check
    from .results import AuditResult

    if (result_dir is None) == (weights is None):
        raise UserError("give either RESULT_DIR or --weights FILE (a trained model), not both or neither")
    given = sorted(k.replace("_", "-") for k, v in data_flags.items() if v is not None)
    if result_dir is not None:
        if model_factory or spec_file or given:
            raise UserError(f"--{(given or ['model-factory' if model_factory else 'spec'])[0]} applies only with --weights")
        result = AuditResult.load(result_dir)
    else:
        from .external import audit_model, load_model

        device = data_flags.pop("device") or "cpu"
        spec = spec_from(spec_file, data_flags)
        model = load_model(weights, model_factory)
        result = audit_model(model, spec, name="model", device=device)
    outcome = gate_check(result, metric=metric, max_ratio=max_ratio, max_gap=max_gap, adjusted=adjusted,
                         alpha=alpha, reference=reference, losses=parse_list(losses, str) if losses else None)
    click.echo(outcome.message)
    return outcome.code


def main(argv: list[str] | None = None) -> None:
    """Entry point: map user mistakes to one line and exit status 2."""
    try:
        code = cli.main(args=argv, prog_name="fairrecon", standalone_mode=False)
    except (UserError, click.UsageError) as e:
        message = e.format_message() if isinstance(e, click.UsageError) else str(e)
        click.echo(f"fairrecon: error: {message}", err=True)
        sys.exit(EXIT_USAGE)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except (click.Abort, KeyboardInterrupt):
        click.echo("fairrecon: interrupted; with --out, run the same command again to resume", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)

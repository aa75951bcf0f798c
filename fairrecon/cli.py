"""`fairrecon` command line: a thin layer over the Python API.

User mistakes (UserError, click usage errors) print one line on stderr and exit 2.
"""

from __future__ import annotations

import sys

import click

from .errors import UserError
from .spec import AuditSpec, load_spec, parse_list

EXIT_USAGE = 2


def data_options(command):
    """The options that say which images and groups: shared by `audit` and `check --weights`."""
    options = [
        click.option("--dataset", help="digits (bundled, default), mnist, fashion-mnist, kmnist, cifar10, folder."),
        click.option("--data-root", help="Folder holding the dataset files (default: ./datasets)."),
        click.option("--test-limit", type=int, help="Cap on the number of held-out images."),
        click.option("--split-seed", type=int, help="Seed of the train/test split and the group assignment."),
        click.option("--targets", help="Target mean pixel value per group, e.g. 0.3,0.9."),
        click.option("--proportions", help="Share of images per group, e.g. 0.9,0.1 (default: balanced)."),
        click.option("--group-method", help="transform (default), select, or labels."),
        click.option("--contrast", help="For transform: matched (default) or squeeze."),
        click.option("--labels", help="CSV mapping image files (or indices) to groups, for --dataset folder."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def spec_from(spec_file: str | None, flags: dict) -> AuditSpec:
    """The spec file (or the defaults) with the flags that were given; list flags parsed from 'a,b'."""
    for key, kind in (("targets", float), ("proportions", float), ("losses", str)):
        if flags.get(key) is not None:
            flags[key] = parse_list(flags[key], kind)
    return load_spec(spec_file, **flags) if spec_file else AuditSpec().override(**flags)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fairrecon")
def cli() -> None:
    """Audit reconstruction losses for per-group fairness."""


@cli.command()
@click.argument("spec_file", required=False, type=click.Path(dir_okay=False))
@data_options
@click.option("--download/--no-download", default=None, help="Let torchvision download missing files (off by default).")
@click.option("--limit", type=int, help="Cap on the number of training images.")
@click.option("--losses", help="Comma-separated: l1, l2, log-mse, learned-sigma.")
@click.option("--model", help="mlp (default) or conv.")
@click.option("--latent", type=int, help="Latent size of the autoencoder (the PCA rank for --adjusted gaps).")
@click.option("--seeds", type=int, help="Number of seeds per loss (default 3).")
@click.option("--epochs", type=int, help="Training epochs per cell.")
@click.option("--batch-size", type=int, help="Training batch size.")
@click.option("--lr", type=float, help="Adam learning rate.")
@click.option("--device", help="auto (default: CUDA when present), cpu, or cuda.")
@click.option("--out", help="Folder for the results: tables, summary.json, examples.npz, report.md and report.html.")
@click.option("--force", is_flag=True, help="Write into an --out folder that holds an audit of a different spec.")
@click.option("--quiet", is_flag=True, help="No progress bars or log lines: only the final table.")
def audit(spec_file, quiet, force, **flags) -> None:
    """Train autoencoders under each loss and measure per-group error on held-out images.

    With no arguments: the bundled digits, groups at mean brightness 0.3 and 0.9,
    four losses, three seeds. Flags override SPEC_FILE. With --out, finished cells are
    kept in OUT/cells: run the same command again after an interruption to resume.
    """
    from .audit import run_audit
    from .progress import Progress
    from .report import terminal_summary, uncertainty, write_reports

    spec = spec_from(spec_file, flags)
    with Progress(quiet=quiet) as progress:
        result = run_audit(spec, log=progress.log, on_epoch=progress.on_epoch, force=force)
        unc = uncertainty(result, "mse")
        if spec.out:
            progress.log(f"writing {spec.out}/report.html")
            write_reports(result, spec.out, unc)
    click.echo("\n" + terminal_summary(result, unc))
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
    from .report import terminal_summary, uncertainty, write_reports
    from .results import AuditResult

    result = AuditResult.load(result_dir)
    unc = uncertainty(result, "mse")
    paths = write_reports(result, out or result_dir, unc)
    click.echo(terminal_summary(result, unc))
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
@data_options
@click.option("--limit", type=int, help="With --weights: cap on training images (used by --adjusted).")
@click.option("--latent", type=int, help="With --weights: the model's latent size, the PCA rank for --adjusted.")
@click.option("--device", help="With --weights: auto, cpu or cuda.")
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

"""Run an audit: data -> groups -> train every (loss, seed) cell -> per-sample errors -> (with
`out`) statistics and the results folder. The orchestrator, at the top of the layers.

`run_audit` is the one call behind `fairrecon audit`; notebooks use it directly:

    >>> from fairrecon import run_audit, analyse
    >>> result = run_audit(dataset="digits", seeds=3)
    >>> result.by_group()          # one row per (loss, group)
    >>> analyse(result).disparities  # one row per loss: gap, ratio, intervals
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from . import __version__
from .data import ImageSet, load_images
from .errors import UserError
from .fileio import atomic_write, npz_bytes
from .generate import Assigner, generated_shares
from .gradshare import GradShareRecorder
from .grid import Cell, TrainConfig
from .groups import GroupedData, make_groups, split_table
from .losses import check_settings
from .measure import CurveRecorder, convergence, curve_table, example_reconstructions, sample_errors, train_mse
from .memory import resolve_device
from .outputs import save_results
from .results import EXAMPLES_FILE, METRICS, AuditResult, load_examples
from .resultsdir import Identity, check_out, input_paths
from .resume import CellStore
from .settled import rule as settled_rule
from .spec import AuditSpec, load_spec
from .train import train_cells


def run_audit(
    spec: AuditSpec | str | Path | None = None,
    *,
    log: Callable[[str], None] | None = None,
    on_epoch: Callable[..., None] | None = None,
    force: bool = False,
    save: bool = True,
    inputs: Iterable[str | Path] = (),
    threads: int | None = None,
    **overrides: Any,
) -> AuditResult:
    """Run the audit a spec (object or TOML path) describes, with keyword overrides.

    `log` gets one line per stage; `on_epoch(epoch, epochs, seed_number, seed_count)` is called after
    each training epoch of a seed's cells (progress bars: see progress.py); without it, each epoch is
    a `log` line.

    With `spec.out` set, every finished cell is checkpointed in OUT/cells, and a run
    into a folder that holds some of this audit's cells trains only the others.
    A folder holding an audit of a different spec or different inputs (its identity: see
    resultsdir.py) is refused unless `force`; a folder that is not fairrecon's, or that holds the
    inputs (the labels CSV, the images, the spec file and any other path in `inputs`), always is.
    Nothing is written before the data and groups are built. At the end the whole results folder
    is written (`outputs.save_results`), unless `save` is False: callers that compute the
    statistics themselves (the CLI) then save with them.

    `threads`: torch's intra-op threads for this audit (default `default_threads()`), put back
    afterwards; conv models on the CPU use them as worker threads, a cell each (runners.LoopedRunner).
    Recorded in info["threads"]. Not part of the audit's identity: it changes speed only.
    """
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise UserError(f"threads must be a whole number >= 1, got {threads!r}")
    chosen, why = (threads, "given") if threads is not None else default_threads()
    before = torch.get_num_threads()
    torch.set_num_threads(chosen)
    try:
        result = _run_audit(spec, log=log, on_epoch=on_epoch, force=force, inputs=inputs, **overrides)
        result.info["threads"], result.info["threads_chosen"] = chosen, why
        if result.spec.out and save:
            save_results(result, result.spec.out)
    finally:
        torch.set_num_threads(before)
    return result


def default_threads() -> tuple[int, str]:
    """Intra-op threads for an audit, and why: every CPU this process may use (`usable_cpus`).

    Not the CPUs left idle by the 1-minute load average (the rule before 0.2): that average still counts
    work that has just finished (a previous audit, a pip install), so an audit started right after one
    ran at half speed on an idle machine (issue 22). Pass `threads` to choose yourself.
    """
    n, why = usable_cpus()
    return n, f"auto: {why}"


CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "QUOTA PERIOD" or "max PERIOD"


def usable_cpus(cpu_max: Path = CGROUP_CPU_MAX) -> tuple[int, str]:
    """The CPUs this process may use: its CPU affinity, capped by a cgroup v2 CPU quota (rounded down, at
    least 1), and the words that say which limit decided."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    why = f"{cores} CPUs in this process's affinity"
    try:
        quota, period = cpu_max.read_text().split()[:2]
    except (OSError, ValueError):
        return cores, why
    if quota != "max" and int(period) > 0 and int(quota) // int(period) < cores:
        return max(1, int(quota) // int(period)), f"{why}, cgroup quota {int(quota) / int(period):g} CPUs"
    return cores, why


def _run_audit(
    spec: AuditSpec | str | Path | None, *, log, on_epoch, force: bool, inputs: Iterable[str | Path], **overrides: Any
) -> AuditResult:
    """run_audit at the threads it chose; saves nothing (run_audit saves once info is complete)."""
    if spec is None:
        spec = AuditSpec()
    elif isinstance(spec, (str, Path)):
        inputs = [*inputs, spec]
        spec = load_spec(spec)
    spec = spec.replace(**overrides)
    check_settings(spec)  # unknown losses, and settings no loss uses, fail here, before any work
    device = resolve_device(spec.device)
    log = log or (lambda message: None)
    identity = Identity.of(spec, device.type)
    store = CellStore(spec.out, identity) if spec.out else None
    if store is not None:  # reads only; nothing is written before the data and groups are good
        files, folders = input_paths(spec)
        check_out(spec.out, identity, files=[*files, *map(Path, inputs)], folders=folders, force=force)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    images = load_images(spec.dataset, spec.data_root, spec.download, spec.split_seed, skip_bad=spec.skip_bad_images)
    timings["load_s"] = time.perf_counter() - t0
    data = make_groups(images, spec)
    timings["groups_s"] = time.perf_counter() - t0 - timings["load_s"]
    described = data.describe()
    log(f"{spec.dataset}: {len(data.train_x)} train / {len(data.test_x)} test images, groups {', '.join(data.names)}")
    warnings = data_warnings(images)
    for warning in warnings:
        log(f"warning: {warning}")

    cells = [Cell(loss, seed) for loss in spec.losses for seed in range(spec.seeds)]
    config = TrainConfig.from_spec(spec)
    generation = None
    if config.vae and spec.generate > 0:  # how generated images get a group (a classifier for labelled groups)
        assign = Assigner.for_data(data)
        generation = (assign, spec.generate)
        if assign.warning():
            warnings.append(assign.warning())
            log(f"warning: {assign.warning()}")
    tables: dict[Cell, dict[str, pd.DataFrame]] = {}
    if store is not None:
        store.open()
        tables = {cell: store.load(cell) for cell in cells if store.done(cell)}
        if tables:
            log(f"resuming: {len(tables)} of {len(cells)} cells already done in {store.folder}")
    todo = [group for group in by_seed(cells) if any(cell not in tables for cell in group)]
    log(f"training {sum(map(len, todo))} cells ({len(spec.losses)} losses x {spec.seeds} seeds) on {device}")
    timings["train_s"] = timings["measure_s"] = timings["curves_s"] = 0.0
    examples: dict[str, Any] = {}

    def keep_examples(stacked) -> None:  # seed 0: a few test images and each loss's reconstruction
        if min(c.seed for c in stacked.cells) == 0:
            examples.update(example_reconstructions(stacked, data, device=device))
            if store is not None:  # kept with the checkpoints, so a resumed audit still has them
                atomic_write(store.folder / EXAMPLES_FILE, npz_bytes(examples))

    for k, seed_cells in enumerate(todo):
        epoch_hook = (lambda e, n, k=k: on_epoch(e, n, k + 1, len(todo))) if on_epoch else None
        for cell, cell_tables in train_and_measure(
            data, seed_cells, config, device, log, timings, epoch_hook, keep_examples, generation=generation
        ).items():
            if store is not None:
                store.save(cell, cell_tables)  # the moment this seed's cells are done
            tables[cell] = cell_tables
        log(f"done: {', '.join(c.key for c in seed_cells)}")

    samples, cell_table, history = (
        _concat([tables[c][name] for c in cells]) for name in ("samples", "cells", "history")
    )
    samples["group"] = pd.Categorical(samples["group"].astype(str), categories=list(data.names))
    timings["total_s"] = time.perf_counter() - t0
    info = {
        "fairrecon_version": __version__,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "contrast_factor": data.contrast_factor,
        "train_config": asdict(config),
        "resumed_cells": len(cells) - sum(map(len, todo)),
        "timings": timings,
        "inputs": identity.inputs,
        "warnings": warnings,
        "convergence": settled_rule(),
        **({"generation": {**generation[0].record(), "n": spec.generate}} if generation else {}),
    }
    shares = [tables[c]["grad_shares"] for c in cells if "grad_shares" in tables[c]]
    curves = [tables[c]["curves"] for c in cells if "curves" in tables[c]]
    generated = [tables[c]["generated"] for c in cells if "generated" in tables[c]]
    result = AuditResult(
        spec,
        samples,
        cell_table,
        described,
        history,
        info,
        examples=examples or (load_examples(store.folder) if store is not None else None),
        grad_shares=_concat(shares) if len(shares) == len(cells) else None,
        split=split_table(images, data),
        curves=_concat(curves) if len(curves) == len(cells) else None,
        generated=_concat(generated) if generation and len(generated) == len(cells) else None,
    )
    return result  # cells not converged: in the statistics' warnings, one line per loss (stats.unconverged)


def data_warnings(images: ImageSet) -> list[str]:
    """Warnings about the data an audit ran on (kept in result.info["warnings"] and summary.json)."""
    if not images.skipped:
        return []
    shown = ", ".join(images.skipped[:3]) + (f" and {len(images.skipped) - 3} more" if len(images.skipped) > 3 else "")
    return [f"skipped {len(images.skipped)} unreadable image(s) (--skip-bad-images): {shown}"]


def by_seed(cells: list[Cell]) -> list[list[Cell]]:
    """The unit of training and checkpointing in an audit: a seed's cells (all its losses).

    Cells of a seed share initial weights and batch order, and seeds are independent, so a
    resumed audit trains exactly the seeds an uninterrupted one would.
    """
    by_seed: dict[int, list[Cell]] = {}
    for cell in cells:
        by_seed.setdefault(cell.seed, []).append(cell)
    return list(by_seed.values())


def train_and_measure(
    data: GroupedData,
    cells: list[Cell],
    config: TrainConfig,
    device: torch.device,
    log: Callable[[str], None],
    timings: dict[str, float],
    on_epoch: Callable[[int, int], None] | None = None,
    on_trained: Callable[[Any], None] | None = None,
    *,
    generation: tuple[Assigner, int] | None = None,
) -> dict[Cell, dict[str, pd.DataFrame]]:
    """Train cells together and measure them: per cell, its samples, cells (one row), history and curves tables
    (and, with `generation` = (assigner, n) for a VAE, its generated table: generate.generated_shares).

    `on_trained(stacked)` sees the trained cells before they are dropped (to keep example reconstructions).
    """
    recorder = GradShareRecorder(data.names) if config.grad_points > 0 else None
    epochs_per_point = 1.0 if config.auto else config.epoch_cap / config.eval_points
    curves = CurveRecorder(data, epochs_per_point=epochs_per_point, device=device)
    validation = (data.val_x, data.val_g) if config.auto else None
    trained = train_cells(
        data.train_x,
        data.train_g,
        cells,
        config,
        device,
        on_snapshot=recorder,
        on_epoch=on_epoch or (lambda e, n: log(f"epoch {e}/{n}")),
        on_eval=curves,
        validation=validation,
        n_groups=len(data.names),
    )
    shares = _float64(recorder.frame()) if recorder is not None else None
    timings["train_s"] += trained.seconds
    timings["curves_s"] += curves.seconds
    t1 = time.perf_counter()
    samples = _float64(sample_errors(trained.stacked, data, device))
    generated = generated_shares(trained.stacked, *generation, device) if generation else None
    if on_trained is not None:
        on_trained(trained.stacked)
    learned = {name: v.double() for name, v in trained.stacked.learned().items()}
    nan = torch.full((len(cells),), torch.nan, dtype=torch.float64)
    sigma = learned.pop("sigma", nan)
    learned = {"scale": nan, "dof": nan, **learned}  # these two always, so cells.csv keeps one schema
    fit_mse = train_mse(trained.stacked, data.train_x, device).double()
    history = _float64(trained.history)
    points = curves.frame()
    converged = convergence(points).set_index(["loss", "seed"])
    curve = curve_table(points, samples, dict(zip(cells, trained.steps)))
    out = {}
    for c, cell in enumerate(cells):
        own = lambda df, cell=cell: df[(df["loss"] == cell.loss) & (df["seed"] == cell.seed)].reset_index(drop=True)
        own_history, own_samples = own(history), own(samples)
        status = trained.status[c]
        if status == "ok" and not np.isfinite(own_samples[list(METRICS)].to_numpy()).all():
            status = "failed: non-finite reconstruction error on held-out images"  # trained, but blew up
        conv = converged.loc[(cell.loss, cell.seed)]
        out[cell] = {
            "samples": own_samples,
            "cells": pd.DataFrame(
                {
                    "loss": [cell.loss],
                    "seed": [cell.seed],
                    "status": [status],
                    "sigma": [sigma[c].item()],
                    "sigma_squared": [sigma[c].item() ** 2],
                    **{name: [value[c].item()] for name, value in learned.items()},
                    "train_mse": [fit_mse[c].item()],
                    "train_nll": [own_history["train_nll"].iloc[-1]],
                    "epochs": [trained.epochs[c]],
                    "converged": [bool(conv["converged"])],
                    "last_drop": [float(conv["last_drop"])],
                    "last_drop_of": [conv["last_drop_of"]],
                }
            ),
            "history": own_history,
            "curves": own(curve),
        }
        if generated is not None:
            out[cell]["generated"] = own(generated)
        if shares is not None:  # checkpointed with the cell like its other tables; only steps of its own result
            out[cell]["grad_shares"] = own(shares[shares["step"] < trained.steps[c]])
    timings["measure_s"] += time.perf_counter() - t1
    return out


def _float64(df: pd.DataFrame) -> pd.DataFrame:
    """float32 columns as float64, so a checkpoint read back from CSV is bit-identical."""
    return df.astype({c: "float64" for c in df.columns if df[c].dtype == "float32"})


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    return pd.concat(frames, ignore_index=True)

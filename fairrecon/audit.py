"""Run an audit: data -> groups -> train every (loss, objective, seed) cell -> per-sample errors -> (with
`out`) statistics and the results folder. The orchestrator, at the top of the layers.

`run_audit` is the one call behind `fairrecon audit`; notebooks use it directly (its docstring has
an example).
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import pandas as pd
import torch

from . import provenance
from .data import ImageSet, load_images_for
from .errors import UserError
from .fileio import atomic_write, npz_bytes
from .generate import Assigner, generated_shares
from .gradshare import GradShareRecorder
from .grid import CELL_KEY, Cell, TrainConfig, plain, without_objectives
from .groups import GroupedData, make_groups, split_table
from .losses import check_settings
from .measure import CurveRecorder, convergence, curve_table, example_reconstructions, sample_errors, train_mse
from .memory import resolve_device
from .outputs import save_results
from .results import EXAMPLES_FILE, AuditResult, load_examples
from .resultsdir import Identity, check_out, input_paths, writing
from .resume import CellStore
from .settled import rule as settled_rule
from .spec import AuditSpec, load_spec
from .threads import default_threads
from .train import train_cells
from .version import __version__


class Executor(Protocol):
    """The seam: what run_audit (and a sweep) needs of an executor; executor.py has LocalExecutor and
    RayExecutor. `run` trains the seeds each AuditRun still has to train, handing each finished seed to
    `AuditRun.accept`, and raises errors.TasksFailed after the others when some fail."""

    name: str
    threads: int  # torch threads in each task
    threads_chosen: str  # why that many

    def device_type(self, spec: AuditSpec) -> str: ...  # where the tasks train: the identity's device type

    def describe(self) -> str: ...

    def record(self) -> dict[str, Any]: ...  # info["executor"]

    def run(self, runs: list[AuditRun], log: Callable[[str], None]) -> None: ...


def run_audit(
    spec: AuditSpec | str | Path | None = None,
    *,
    log: Callable[[str], None] | None = None,
    on_epoch: Callable[..., None] | None = None,
    force: bool = False,
    save: bool = True,
    inputs: Iterable[str | Path] = (),
    threads: int | None = None,
    executor: Executor | None = None,
    **overrides: Any,
) -> AuditResult:
    """Run the audit a spec describes: train every (loss, seed) cell, measure every held-out image.

    With `spec.out` set, every finished cell is checkpointed in OUT/cells, and a run
    into a folder that holds some of this audit's cells trains only the others.
    A folder holding an audit of a different spec, different inputs or another results version (its
    identity: see resultsdir.py) is refused unless `force`; a folder that is not fairrecon's, or that
    holds the inputs (the labels CSV, the images, the spec file and any other path in `inputs`),
    always is. Nothing is written before the data and groups are built. At the end the whole results
    folder is written (`outputs.save_results`), unless `save` is False: callers that compute the
    statistics themselves (the CLI) then save with them. While it writes OUT, the audit holds OUT's
    lock (`resultsdir.writing`): a second run there is refused.

    Parameters
    ----------
    spec : AuditSpec, str or Path, optional
        The audit, or the path of a TOML spec file (default: `AuditSpec()`, the teaching question:
        digits, groups at mean brightness 0.3 and 0.9, four losses, five seeds).
    log : callable, optional
        Gets one line per stage.
    on_epoch : callable, optional
        ``on_epoch(epoch, epochs, seed_number, seed_count)`` after each training epoch of a seed's
        cells (progress bars: see progress.py); without it, each epoch is a `log` line.
    force : bool
        Replace an `out` folder that holds another audit (never one that is not fairrecon's).
    save : bool
        Write the results folder at the end (when `spec.out` is set).
    inputs : iterable of str or Path
        More paths the audit reads, which `out` must not hold.
    threads : int, optional
        torch's intra-op threads for this audit (default `default_threads()`), put back afterwards;
        on the CPU the cells use them as worker threads, each cell on one thread (runners.LoopedRunner:
        conv a cell at a time, MLP a part of the cells per worker under one vmap), so results do not
        depend on it.
        Recorded in ``info["threads"]``. Not part of the audit's identity: it changes speed only.
    executor : Executor, optional
        Where the seeds train. None (the default) trains them here, one after another. An executor
        (executor.py: `LocalExecutor`, `RayExecutor`) runs each seed's cells as a task; this process
        alone writes OUT, as each task finishes. The threads of its tasks are the executor's (`threads`
        then sets this process's only; ``info["threads"]`` and ``info["executor"]`` record the tasks').
        When tasks fail after the executor's retries, the finished cells are kept and
        `errors.TasksFailed` names the others (the CLI exits 4; the same command trains the rest).
    **overrides
        Any `AuditSpec` field, applied over `spec` (e.g. ``seeds=3``).

    Returns
    -------
    AuditResult
        One row per (loss, seed, test image) in `samples`, with the tables beside it; where each
        cell trained is in ``info["provenance"]``.

    Examples
    --------
    >>> from fairrecon import run_audit
    >>> result = run_audit(dataset="digits", losses="l1,l2", seeds=2, epochs=1, hidden=32, limit=200, test_limit=80)
    >>> result.spec.losses, len(result.samples)  # 2 losses x 2 seeds x 80 test images
    (('l1', 'l2'), 320)
    >>> result.by_group()[["loss", "group", "n", "seeds"]]
      loss group   n  seeds
    0   l1   0.3  40      2
    1   l1   0.9  40      2
    2   l2   0.3  40      2
    3   l2   0.9  40      2
    """
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise UserError(f"threads must be a whole number >= 1, got {threads!r}")
    chosen, why = (threads, "given") if threads is not None else default_threads()
    before = torch.get_num_threads()
    torch.set_num_threads(chosen)
    try:
        with ExitStack() as held:  # OUT's lock, from the first write to the last
            result = _run_audit(
                spec, log=log, on_epoch=on_epoch, force=force, inputs=inputs, executor=executor, held=held, **overrides
            )
            result.info["threads"], result.info["threads_chosen"] = chosen, why
            result.info["executor"] = {"name": "in-process", "threads": chosen}  # as LocalExecutor records it
            if executor is not None:
                result.info["threads"], result.info["threads_chosen"] = executor.threads, executor.threads_chosen
                result.info["executor"] = executor.record()
            if result.spec.out and save:
                save_results(result, result.spec.out)
    finally:
        torch.set_num_threads(before)
    return result


@dataclass
class AuditRun:
    """An audit between its preparation (data, groups, checkpoints: `prepare_audit`) and its result
    (`finish_audit`): the seeds still to train (`todo`) and the tables of the cells done so far."""

    spec: AuditSpec
    images: ImageSet
    data: GroupedData
    described: pd.DataFrame
    identity: Identity
    store: CellStore | None
    device: torch.device | None  # None: the executor's tasks resolve it (`device_type` is the identity's)
    device_type: str
    config: TrainConfig
    generation: tuple[Assigner, int] | None
    cells: list[Cell]
    tables: dict[Cell, dict[str, pd.DataFrame]]
    todo: list[list[Cell]]
    warnings: list[str]
    t0: float
    timings: dict[str, float]
    name: str  # in messages (a task's label): its results folder, or its setting in a sweep
    examples: dict[str, Any] = field(default_factory=dict)

    def keep_examples(self, examples: dict[str, Any]) -> None:
        """Seed 0's example reconstructions, kept with the checkpoints so a resumed audit still has them."""
        self.examples.update(examples)
        if self.store is not None:
            atomic_write(self.store.folder / EXAMPLES_FILE, npz_bytes(self.examples))

    def keep(self, tables: dict[Cell, dict[str, pd.DataFrame]]) -> None:
        """A finished seed's cells: checkpointed the moment they arrive, then kept for the result."""
        for cell, cell_tables in tables.items():
            if self.store is not None:
                self.store.save(cell, cell_tables)
            self.tables[cell] = cell_tables

    def accept(
        self, tables: dict[Cell, dict[str, pd.DataFrame]], timings: dict[str, float], examples: dict[str, Any]
    ) -> None:
        """What an executor's task returns for this audit: its cells, timings and (seed 0) examples."""
        if examples:
            self.keep_examples(examples)
        self.keep(tables)
        for key, seconds in timings.items():
            self.timings[key] = self.timings.get(key, 0.0) + seconds


def _run_audit(
    spec: AuditSpec | str | Path | None,
    *,
    log: Callable[[str], None] | None,
    on_epoch: Callable[..., None] | None,
    force: bool,
    inputs: Iterable[str | Path],
    executor: Executor | None = None,
    held: ExitStack | None = None,
    **overrides: Any,
) -> AuditResult:
    """run_audit at the threads it chose; saves nothing (run_audit saves once info is complete)."""
    log = log or (lambda message: None)
    run = prepare_audit(spec, log=log, force=force, inputs=inputs, executor=executor, held=held, **overrides)
    if executor is not None:  # the seeds as tasks; each comes back through run.accept
        executor.run([run], log=log)
        return finish_audit(run, log)
    device, data, config, generation, todo = run.device, run.data, run.config, run.generation, run.todo
    assert device is not None  # resolved by prepare_audit when there is no executor

    def keep_examples(stacked: Any) -> None:  # seed 0: a few test images and each loss's reconstruction
        if min(c.seed for c in stacked.cells) == 0:
            run.keep_examples(example_reconstructions(stacked, data, device=device))

    for k, seed_cells in enumerate(todo):
        epoch_hook = (lambda e, n, k=k: on_epoch(e, n, k + 1, len(todo))) if on_epoch else None
        trained = train_and_measure(
            data, seed_cells, config, device, log, run.timings, epoch_hook, keep_examples, generation=generation
        )
        where = provenance.here(device, torch.get_num_threads(), "in-process")
        for cell in seed_cells:
            trained[cell]["provenance"] = provenance.table(cell, where, objective=not plain(seed_cells))
        run.keep(trained)  # checkpointed the moment this seed's cells are done
        log(f"done: {', '.join(c.key for c in seed_cells)}")
    return finish_audit(run, log)


def prepare_audit(
    spec: AuditSpec | str | Path | None,
    *,
    log: Callable[[str], None],
    force: bool = False,
    inputs: Iterable[str | Path] = (),
    executor: Executor | None = None,
    held: ExitStack | None = None,
    **overrides: Any,
) -> AuditRun:
    """Everything before training: the spec, checks of OUT, data, groups, the cells done and the seeds to train.

    With `held` (an ExitStack), OUT's lock is taken into it once OUT has passed its checks, so it is held
    until the caller's stack closes.
    """
    if spec is None:
        spec = AuditSpec()
    elif isinstance(spec, (str, Path)):
        inputs = [*inputs, spec]
        spec = load_spec(spec)
    spec = spec.replace(**overrides)
    check_settings(spec)  # unknown losses, and settings no loss uses, fail here, before any work
    device = resolve_device(spec.device) if executor is None else None  # else resolved where each task runs
    device_type = device.type if device is not None else cast(Executor, executor).device_type(spec)
    identity = Identity.of(spec, device_type)
    store = CellStore(spec.out, identity) if spec.out else None
    if store is not None:  # reads only; nothing is written before the data and groups are good
        files, folders = input_paths(spec)
        paths = [*files, *map(Path, inputs)]
        check_out(store.out, identity, files=paths, folders=folders, force=force)
        if held is not None:
            held.enter_context(writing(store.out))
            check_out(store.out, identity, files=paths, folders=folders, force=force)  # as it is now we hold it
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    images = load_images_for(spec)
    timings["load_s"] = time.perf_counter() - t0
    data = make_groups(images, spec)
    timings["groups_s"] = time.perf_counter() - t0 - timings["load_s"]
    described = data.describe()
    log(f"{spec.dataset}: {len(data.train_x)} train / {len(data.test_x)} test images, groups {', '.join(data.names)}")
    warnings = data_warnings(images)
    for warning in warnings:
        log(f"warning: {warning}")

    cells = [Cell(loss, seed, o) for loss in spec.losses for o in spec.objectives for seed in range(spec.seeds)]
    config = TrainConfig.from_spec(spec)
    generation = None
    if config.vae and spec.generate > 0:  # how generated images get a group (a classifier for labelled groups)
        assign = Assigner.for_data(data)
        generation = (assign, spec.generate)
        if caveat := assign.warning():
            warnings.append(caveat)
            log(f"warning: {caveat}")
    tables: dict[Cell, dict[str, pd.DataFrame]] = {}
    if store is not None:
        store.open()
        tables = {cell: store.load(cell) for cell in cells if store.done(cell)}
        if tables:
            log(f"resuming: {len(tables)} of {len(cells)} cells already done in {store.folder}")
    todo = [group for group in by_seed(cells) if any(cell not in tables for cell in group)]
    where = device if executor is None else executor.describe()
    objectives = f" x {len(spec.objectives)} objectives" if not plain(cells) else ""
    log(f"training {sum(map(len, todo))} cells ({len(spec.losses)} losses{objectives} x {spec.seeds} seeds) on {where}")
    timings["train_s"] = timings["measure_s"] = timings["curves_s"] = 0.0
    return AuditRun(
        spec=spec,
        images=images,
        data=data,
        described=described,
        identity=identity,
        store=store,
        device=device,
        device_type=device_type,
        config=config,
        generation=generation,
        cells=cells,
        tables=tables,
        todo=todo,
        warnings=warnings,
        t0=t0,
        timings=timings,
        name=str(spec.out) if spec.out else "audit",
    )


def finish_audit(run: AuditRun, log: Callable[[str], None]) -> AuditResult:
    """The audit's result from its cells' tables (every cell must be done): tables, info, warnings."""
    spec, cells, tables, data, store, timings = run.spec, run.cells, run.tables, run.data, run.store, run.timings
    samples, cell_table, history = (
        _concat([tables[c][name] for c in cells]) for name in ("samples", "cells", "history")
    )
    samples["group"] = pd.Categorical(samples["group"].astype(str), categories=list(data.names))
    timings["total_s"] = time.perf_counter() - run.t0
    where = [tables[c]["provenance"] for c in cells if "provenance" in tables[c]]
    trained_on = _concat(where) if where else pd.DataFrame(columns=list(provenance.COLUMNS))
    warnings = run.warnings
    mixed = provenance.mixed_warning(trained_on)
    if mixed:
        warnings.append(mixed)
        log(f"warning: {mixed}")
    device = run.device
    info = {
        "fairrecon_version": __version__,
        "results_version": run.identity.results_version,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "device": str(device) if device is not None else run.device_type,
        "device_name": provenance.device_name(device)
        if device is not None
        else ", ".join(map(str, trained_on["device_name"].unique())),
        "threads": torch.get_num_threads(),
        "contrast_factor": data.contrast_factor,
        "train_config": asdict(run.config),
        "resumed_cells": len(cells) - sum(map(len, run.todo)),
        "timings": timings,
        "inputs": run.identity.inputs,
        "warnings": warnings,
        "convergence": settled_rule(),
        **({"generation": {**run.generation[0].record(), "n": spec.generate}} if run.generation else {}),
        "provenance": json.loads(trained_on.to_json(orient="records")),
    }
    shares = [tables[c]["grad_shares"] for c in cells if "grad_shares" in tables[c]]
    curves = [tables[c]["curves"] for c in cells if "curves" in tables[c]]
    generated = [tables[c]["generated"] for c in cells if "generated" in tables[c]]
    result = AuditResult(
        spec,
        samples,
        cell_table,
        run.described,
        history,
        info,
        examples=run.examples or (load_examples(store.folder) if store is not None else None),
        grad_shares=_concat(shares) if len(shares) == len(cells) else None,
        split=split_table(run.images, data),
        curves=_concat(curves) if len(curves) == len(cells) else None,
        generated=_concat(generated) if run.generation and len(generated) == len(cells) else None,
    )
    return result  # cells not converged: in the statistics' warnings, one line per loss (stats.unconverged)


def data_warnings(images: ImageSet) -> list[str]:
    """Warnings about the data an audit ran on (kept in result.info["warnings"] and summary.json)."""
    if not images.skipped:
        return []
    shown = ", ".join(images.skipped[:3]) + (f" and {len(images.skipped) - 3} more" if len(images.skipped) > 3 else "")
    return [f"skipped {len(images.skipped)} unreadable image(s) (--skip-bad-images): {shown}"]


def by_seed(cells: list[Cell]) -> list[list[Cell]]:
    """The unit of training and checkpointing in an audit: a seed's cells (all its losses and objectives).

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
    (and, with `generation` = (assigner, n) for a VAE, its generated table: generate.generated_shares). Each table
    names the cell by loss, objective and seed, and by loss and seed alone when every cell is erm (grid.plain).

    `on_trained(stacked)` sees the trained cells before they are dropped (to keep example reconstructions).
    """
    recorder = GradShareRecorder(data.names) if config.grad_points > 0 else None
    epochs_per_point = 1.0 if config.auto else config.epoch_cap / config.eval_points
    curves = CurveRecorder(data, epochs_per_point=epochs_per_point, device=device)
    validation = None
    if config.auto:  # make_groups holds out a validation split under epochs=auto
        assert data.val_x is not None and data.val_g is not None
        validation = (data.val_x, data.val_g)
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
    converged = convergence(points).set_index(CELL_KEY)
    curve = curve_table(points, samples, dict(zip(cells, trained.steps)))
    tidy = without_objectives if plain(cells) else (lambda df: df)

    def own(df: pd.DataFrame, cell: Cell) -> pd.DataFrame:
        mine = (df["loss"] == cell.loss) & (df["objective"] == cell.objective) & (df["seed"] == cell.seed)
        return tidy(df[mine].reset_index(drop=True))

    out = {}
    for c, cell in enumerate(cells):
        own_history, own_samples = own(history, cell), own(samples, cell)
        status = trained.status[c]
        # a non-finite reconstruction makes its mse non-finite; the other metrics follow mse (floors, SSIM's
        # constants), except ssim_error, which is NaN by definition on images too small for its window
        if status == "ok" and not np.isfinite(own_samples["mse"].to_numpy()).all():
            status = "failed: non-finite reconstruction error on held-out images"  # trained, but blew up
        conv = converged.loc[(cell.loss, cell.objective, cell.seed)]
        out[cell] = {
            "samples": own_samples,
            "cells": tidy(
                pd.DataFrame(
                    {
                        "loss": [cell.loss],
                        "objective": [cell.objective],
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
                )
            ),
            "history": own_history,
            "curves": own(curve, cell),
        }
        if generated is not None:
            out[cell]["generated"] = own(generated, cell)
        if shares is not None:  # checkpointed with the cell like its other tables; only steps of its own result
            out[cell]["grad_shares"] = own(shares[shares["step"] < trained.steps[c]], cell)
    timings["measure_s"] += time.perf_counter() - t1
    return out


def _float64(df: pd.DataFrame) -> pd.DataFrame:
    """float32 columns as float64, so a checkpoint read back from CSV is bit-identical."""
    return df.astype({c: "float64" for c in df.columns if df[c].dtype == "float32"})


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    return pd.concat(frames, ignore_index=True)

"""Training a grid of (loss, objective, seed) cells together, as stacked models (stacked.py). No file I/O.

`train_cells` cuts the grid into chunks that fit in memory (memory.cells_per_chunk; cells of per-pixel
losses, whose models have a scale head, in chunks of their own), trains each chunk with a `ChunkTraining`
and puts the chunks back together in cell order. A ChunkTraining is the epoch loop in named stages over
one `ChunkState`:

    setup         __init__: seeded initial weights, Adam, each seed's generators, the objectives' group
                  weights (objectives.GroupWeights), the `Schedule`
    per epoch     `start_epoch`: each seed's batch order
      per batch   `step`: one update of every cell on its own batch, each sample weighted by its cell's
                  objective (a gradient-share snapshot first, where the schedule has one); `curve_point`
                  where the schedule has one
    epoch end     `end_epoch`: failed cells, history rows, and (epochs="auto") `stopping_check`
    finish        `finish`: stopped cells' weights back, each cell's status -> a TrainResult

Each cell sees only its own loss and its own objective's weights (updated from its own batch only), and Adam
is elementwise, so every cell keeps its own gradient and optimizer state and the result equals training the
cells one by one (see tests/test_train.py).

Randomness: a cell's seed fixes its initial weights and its batch order (and, for a VAE, its noise
eps: noise.py, drawn per step and seed on the CPU, outside vmap); cells that share a seed differ only
in their loss and objective. Every cell trains on the same split.

Curves and convergence: at `eval_points` evenly spaced steps (with epochs="auto": at every epoch end)
`on_eval` gets an EvalPoint (hooks.py): the cells, each group's mean training MSE over the batches
since the previous point (free: the step computes it anyway) and each group's weight in the cells' objectives.
measure.CurveRecorder adds each group's held-out error there. Whether a cell's error has settled is settled.py's
notion.

epochs="auto": after every epoch each cell's per-group error on a validation split (carved from
the training images, groups.with_validation) is checked with that notion; a cell whose validation
error has settled in every group (settled.stops: as much training again would, with 95% confidence,
not lower it by more than 5%) stops there: its weights at that epoch are kept and put back at the
end, so its result is exactly what it would be trained alone (cells are independent). The stack
trains on until every cell has stopped or failed, or `max_epochs` is reached; cells not settled
then keep the cap's weights and are reported as not converged.

Speed: the data stays on the device as one tensor and each step gathers the C batches
with one index; the per-loss slices of the cell dimension are worked out once; Adam is
the fused kernel where torch has one; nothing in the step loop waits for the device
(the only host syncs are once per epoch). Since cells are independent and each seed's batch
order comes from its own generator, chunking does not change the result.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from .grid import Cell, TrainConfig
from .hooks import EvalPoint, Snapshot
from .memory import cells_per_chunk
from .noise import draw_eps, eps_generators
from .objectives import GroupWeights, ObjectiveKind, pca_reference
from .settled import stops
from .stacked import (
    StackedCells,
    concat_stacked,
    group_errors,
    init_cells,
    input_stats,
    needs_scale_head,
    reorder_stacked,
)

SNAPSHOT_SPACING = 20  # at most one snapshot per 20 steps: a snapshot costs ~1.3 steps, so <= ~7% of training


@dataclass
class TrainResult:
    """Trained cells (all of train_cells' grid, or one chunk's) with what training recorded of each."""

    stacked: StackedCells
    history: pd.DataFrame  # one row per cell and epoch it trained
    status: list[str] = field(default_factory=list)  # "ok" or "failed: <reason>" per cell
    seconds: float = 0.0
    epochs: list[int] = field(default_factory=list)  # epochs each cell trained (its own stop with epochs="auto")
    steps: list[int] = field(default_factory=list)  # updates each cell's result had


def train_cells(
    x: torch.Tensor,
    group: torch.Tensor,
    cells: list[Cell],
    config: TrainConfig,
    device: torch.device | str = "cpu",
    on_snapshot: Callable[[Snapshot], None] | None = None,
    on_epoch: Callable[[int, int], None] | None = None,
    *,
    on_eval: Callable[[EvalPoint], None] | None = None,
    validation: tuple[torch.Tensor, torch.Tensor] | None = None,
    n_groups: int | None = None,
    max_cells: int | None = None,
    fused: bool | None = None,
) -> TrainResult:
    """Train every cell on images x (N, C, H, W) in [0, 1] with group codes `group` (N,).

    Cells are trained together in chunks of at most `max_cells` (default: as many as fit
    in memory, `cells_per_chunk`), cells of per-pixel losses (a scale head) in chunks of their
    own; the results are concatenated in cell order, and
    `on_snapshot` / `on_epoch` / `on_eval` are called per chunk (their `stacked.cells` says
    which). `validation` (x, group) is required for epochs="auto" and used for nothing else.
    `n_groups` defaults to max(group) + 1. `fused` picks torch's fused Adam kernel (default:
    on CPU and CUDA).
    """
    start = time.perf_counter()
    device = torch.device(device)
    if config.auto and validation is None:
        raise ValueError("epochs='auto' needs a validation split (groups.with_validation)")
    if max_cells is not None and max_cells < 1:
        raise ValueError(f"max_cells must be >= 1, got {max_cells}")
    relative = any(ObjectiveKind.of(c.objective).name == "relative" for c in cells)
    data = TrainData.on(
        device,
        x,
        group,
        validation,
        n_groups,
        standardize=config.input_norm == "standardize",
        reference_rank=config.latent if relative else None,
    )
    hooks = TrainHooks(on_snapshot, on_epoch, on_eval)
    fused = device.type in ("cpu", "cuda") if fused is None else fused
    parts = [ChunkTraining(chunk, config, data, hooks, fused).run() for chunk in chunks(cells, config, data, max_cells)]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return in_cell_order(parts, cells, time.perf_counter() - start)


def in_cell_order(parts: list[TrainResult], cells: list[Cell], seconds: float) -> TrainResult:
    """The chunks' results as one, in the order of `cells`: the stacked cells (concat_stacked, reorder_stacked),
    the per-cell lists, and the history epoch-major as a single chunk's would be."""
    done = [c for p in parts for c in p.stacked.cells]
    stacked = reorder_stacked(concat_stacked([p.stacked for p in parts]), cells)
    back = [done.index(c) for c in cells]
    history = pd.concat([p.history for p in parts], ignore_index=True)
    if len(parts) > 1:  # one row per cell and epoch, epoch-major as for a single chunk
        order = {cell: i for i, cell in enumerate(cells)}
        history = (
            history.assign(
                _c=[order[Cell(*key)] for key in zip(history["loss"], history["seed"], history["objective"])]
            )
            .sort_values(["epoch", "_c"], kind="stable")
            .drop(columns="_c")
            .reset_index(drop=True)
        )
    flat = lambda key: [v for p in parts for v in getattr(p, key)]
    return TrainResult(
        stacked,
        history,
        [flat("status")[i] for i in back],
        seconds,
        [flat("epochs")[i] for i in back],
        [flat("steps")[i] for i in back],
    )


def chunks(cells: list[Cell], config: TrainConfig, data: TrainData, max_cells: int | None) -> Iterator[list[Cell]]:
    """The chunks the grid trains in, in order: the cells without a scale head, then those with one (the two
    weight shapes train apart), each kind cut into chunks of `max_cells`, or of as many as fit in the memory
    free when that kind's chunks start (a generator: the second kind is sized after the first has trained)."""
    for head in (False, True):
        kind = [c for c in cells if needs_scale_head([c]) == head]
        size = max_cells or cells_per_chunk(config, tuple(data.x.shape[1:]), len(data.x), data.device, scale_head=head)
        yield from (kind[i : i + size] for i in range(0, len(kind), size))


@dataclass(frozen=True)
class TrainData:
    """What every chunk trains on, on the device."""

    device: torch.device
    x: torch.Tensor  # (N, C_img, H, W) in [0, 1]
    group: torch.Tensor  # (N,) group codes
    n_groups: int
    validation: tuple[torch.Tensor, torch.Tensor] | None  # epochs="auto": the validation split's (x, group)
    stats: tuple[torch.Tensor, torch.Tensor] | None  # input_norm="standardize": the images' per-pixel (mean, std)
    reference: torch.Tensor | None = None  # relative objectives: each group's own PCA error (objectives.pca_reference)

    @classmethod
    def on(
        cls,
        device: torch.device,
        x: torch.Tensor,
        group: torch.Tensor,
        validation: tuple[torch.Tensor, torch.Tensor] | None,
        n_groups: int | None,
        *,
        standardize: bool,
        reference_rank: int | None = None,
    ) -> TrainData:
        """The data moved to `device`; n_groups defaults to max(group) + 1. With `reference_rank` k, each group's
        rank-k PCA error on these images (for relative objectives)."""
        n_groups = int(group.max()) + 1 if n_groups is None else n_groups
        reference = pca_reference(x, group, n_groups, reference_rank) if reference_rank is not None else None
        x, group = x.to(device), group.to(device)
        if validation is not None:
            validation = (validation[0].to(device), validation[1].to(device))
        return cls(device, x, group, n_groups, validation, input_stats(x) if standardize else None, reference)


@dataclass(frozen=True)
class TrainHooks:
    """Training's measurement hooks: each called with the chunk's cells (see train_cells)."""

    on_snapshot: Callable[[Snapshot], None] | None = None  # a batch before its update, at the schedule's snapshots
    on_epoch: Callable[[int, int], None] | None = None  # (epochs done, the most epochs) at every epoch end
    on_eval: Callable[[EvalPoint], None] | None = None  # the cells at every curve point


def snapshot_count(wanted: int, total_steps: int) -> int:
    """How many snapshots a cell gets: `wanted`, but at most one per SNAPSHOT_SPACING steps (at least 2)."""
    return min(wanted, max(2, total_steps // SNAPSHOT_SPACING))


def eval_steps(points: int, total_steps: int) -> set[int]:
    """The steps (updates done) of `points` evenly spaced curve points, the last one at the end of training."""
    return set(np.unique(np.round(np.linspace(total_steps / points, total_steps, points)).astype(int)).tolist())


@dataclass(frozen=True)
class Schedule:
    """When things happen in a chunk's training, in steps (updates done so far)."""

    steps_per_epoch: int
    epochs: int  # the most epochs (epochs="auto": its cap)
    snapshots: set[int]  # steps whose batch goes to on_snapshot before its update
    curve_points: set[int]  # steps after whose update on_eval gets a point (epochs="auto": none, see end_epoch)

    @classmethod
    def plan(cls, config: TrainConfig, n_images: int, *, curves: bool) -> Schedule:
        """Fixed epochs: `grad_points` snapshots spread over training (`snapshot_count`) and, with `curves`,
        `eval_points` curve points (`eval_steps`). epochs="auto" (length unknown in advance): snapshots at epoch
        starts, at least SNAPSHOT_SPACING steps apart; curve points at every epoch end instead, where the
        stopping rule looks."""
        steps_per_epoch = math.ceil(n_images / config.batch_size)
        cap = config.epoch_cap
        if config.auto:
            every = max(1, math.ceil(SNAPSHOT_SPACING / steps_per_epoch))
            snapshots = set(range(0, steps_per_epoch * cap, every * steps_per_epoch)) if config.grad_points else set()
            return cls(steps_per_epoch, cap, snapshots, set())
        total = steps_per_epoch * cap
        snapshots = set(torch.linspace(0, total - 1, snapshot_count(config.grad_points, total)).round().long().tolist())
        return cls(steps_per_epoch, cap, snapshots, eval_steps(config.eval_points, total) if curves else set())


@dataclass
class ChunkState:
    """Everything that changes while a chunk trains; the stages of ChunkTraining read and update it."""

    alive: torch.Tensor  # (C,) bool, on the device: no non-finite loss so far
    active: torch.Tensor  # (C,) bool, on the CPU: not stopped yet (epochs="auto")
    epoch_sums: torch.Tensor  # (3, C): this epoch's summed training NLL and MSE, and the samples they sum over
    group_sums: torch.Tensor  # (2, C, G): each group's summed training MSE and samples since the last curve point
    failed: list[str | None]  # per cell: why it failed (a non-finite loss), else None
    stopped_at: list[int | None]  # per cell: the epoch it stopped after (epochs="auto"), else None
    kept: dict[int, tuple[dict[str, torch.Tensor], torch.Tensor]] = field(default_factory=dict)  # their weights
    checks: list[tuple[int, np.ndarray]] = field(default_factory=list)  # epochs="auto": (step, val (C, G)) per epoch
    history: list[dict] = field(default_factory=list)  # one row per active cell and epoch
    step: int = 0  # updates done
    epoch: int = 0  # epochs done

    @classmethod
    def start(cls, n_cells: int, n_groups: int, device: torch.device) -> ChunkState:
        return cls(
            alive=torch.ones(n_cells, dtype=torch.bool, device=device),
            active=torch.ones(n_cells, dtype=torch.bool),
            epoch_sums=torch.zeros(3, n_cells, device=device),
            group_sums=torch.zeros(2, n_cells, n_groups, device=device),
            failed=[None] * n_cells,
            stopped_at=[None] * n_cells,
        )


class ChunkTraining:
    """One chunk of cells trained together: `run` is the whole loop, each stage a method (module docstring)."""

    def __init__(self, cells: list[Cell], config: TrainConfig, data: TrainData, hooks: TrainHooks, fused: bool):
        """Setup: seeded initial weights; Adam over the weights and the losses' learned parameters, each at its
        own learning rate; each seed's batch-order generator (and VAE noise generator), on the CPU; the schedule."""
        self.cells, self.config, self.data, self.hooks = cells, config, data, hooks
        self.stacked = init_cells(cells, tuple(data.x.shape[1:]), config, data.device, data.stats)
        self.opt = torch.optim.Adam(
            [
                {"params": list(self.stacked.params.values()), "lr": config.lr},
                {"params": [self.stacked.loss_params], "lr": config.sigma_lr},
            ],
            fused=fused,
        )
        self.orders = {s: torch.Generator().manual_seed(s) for s in sorted({c.seed for c in cells})}
        self.noise = eps_generators(cells) if config.vae else None
        self.weights = GroupWeights(cells, data.group, data.n_groups, data.reference)
        self.schedule = Schedule.plan(config, len(data.x), curves=hooks.on_eval is not None)
        self.state = ChunkState.start(len(cells), data.n_groups, data.device)

    def run(self) -> TrainResult:
        """The whole loop: the stages in order, until the last epoch or until every cell has stopped."""
        start = time.perf_counter()
        for _ in range(self.schedule.epochs):
            for batch in self.start_epoch():
                self.step(batch)
                if self.state.step in self.schedule.curve_points:
                    self.curve_point()
            if self.end_epoch():
                break
        return self.finish(time.perf_counter() - start)

    def start_epoch(self) -> list[torch.Tensor]:
        """This epoch's batches, as indices (C, B): each seed's own permutation of the images, cut into
        batch_size pieces; the epoch's sums start at zero."""
        perms = {s: torch.randperm(len(self.data.x), generator=g) for s, g in self.orders.items()}
        order = torch.stack([perms[c.seed] for c in self.cells]).to(self.data.device, non_blocking=True)  # (C, N)
        self.state.epoch_sums = torch.zeros(3, len(self.cells), device=self.data.device)
        return list(order.split(self.config.batch_size, dim=1))

    def step(self, idx: torch.Tensor) -> None:
        """One update of every cell on its own batch idx (C, B), the snapshot hook first where scheduled (with the
        objectives' weights as they stand before this step): the objective per sample, the stepped objectives'
        group weights updated from this batch's per-sample MSE, each cell's weighted batch mean (a plain mean
        for erm), one backward pass of the summed loss of the cells still finite (cells are independent), Adam;
        then the sums behind the history and the curve points."""
        s, stacked = self.state, self.stacked
        xb, gb = self.data.x[idx], self.data.group[idx]  # (C, B, C_img, H, W), (C, B)
        eps = None
        if self.noise is not None:
            eps = draw_eps(self.noise, self.cells, idx.shape[1], self.config.latent, self.data.device)
        if s.step in self.schedule.snapshots and self.hooks.on_snapshot is not None:
            weights = self.weights.sample_weights(gb)
            self.hooks.on_snapshot(Snapshot(s.step, s.epoch, stacked, xb, gb, eps, weights))
        objective = stacked.objective(xb, eps)  # (C, B) each
        with torch.no_grad():
            sample_mse = objective.mse  # (C, B): each cell's, computed where its forward ran (one thread)
        self.weights.update(gb, sample_mse)
        weights = self.weights.sample_weights(gb)
        per_cell = objective.value.mean(1) if weights is None else (objective.value * weights).mean(1)
        finite = torch.isfinite(per_cell) & s.alive
        loss = torch.where(finite, per_cell, torch.zeros_like(per_cell)).sum()
        self.opt.zero_grad(set_to_none=True)
        stacked.backward(loss, objective.graph)
        self.opt.step()
        with torch.no_grad():
            s.alive &= finite
            s.epoch_sums[0] += torch.nan_to_num(objective.nll.detach(), nan=0.0, posinf=0.0).sum(1)
            s.epoch_sums[1] += sample_mse.sum(1)
            s.epoch_sums[2] += idx.shape[1]
            s.group_sums[0].scatter_add_(1, gb, sample_mse)
            s.group_sums[1].scatter_add_(1, gb, torch.ones_like(sample_mse))
        s.step += 1

    def curve_point(self, val_mse: torch.Tensor | None = None) -> torch.Tensor:
        """A curve point: each group's mean training MSE since the last one (C, G; NaN for a group with no
        sample since), handed to on_eval with the cells (and epochs="auto": each group's validation MSE);
        returns it."""
        s = self.state
        train_mse = s.group_sums[0] / s.group_sums[1]
        s.group_sums.zero_()
        if self.hooks.on_eval is not None:
            epoch = s.step / self.schedule.steps_per_epoch
            self.hooks.on_eval(
                EvalPoint(
                    s.step, epoch, self.stacked, s.active.clone(), train_mse, val_mse, self.weights.group_weights()
                )
            )
        return train_mse

    def end_epoch(self) -> bool:
        """An epoch's end: cells whose loss went non-finite fail; each active cell's history row; epochs="auto":
        the stopping check; on_epoch. Whether every cell has stopped."""
        s, epoch = self.state, self.state.epoch + 1
        alive = s.alive.tolist()  # one host sync per epoch
        for c, ok in enumerate(alive):
            if not ok and s.failed[c] is None:
                s.failed[c] = f"failed: non-finite loss in epoch {epoch}"
        means = (s.epoch_sums[:2] / s.epoch_sums[2]).cpu()
        for c, cell in enumerate(self.cells):
            if s.active[c]:
                s.history.append(
                    {
                        "loss": cell.loss,
                        "objective": cell.objective,
                        "seed": cell.seed,
                        "epoch": epoch,
                        "train_nll": means[0, c].item(),
                        "train_mse": means[1, c].item(),
                    }
                )
        if self.config.auto:
            self.stopping_check(alive, epoch)
        s.epoch = epoch
        if self.hooks.on_epoch is not None:
            self.hooks.on_epoch(epoch, self.schedule.epochs)
        return bool(self.config.auto and not s.active.any())

    def stopping_check(self, alive: list[bool], epoch: int) -> None:
        """epochs="auto", after `epoch` epochs: a curve point with each group's validation error, then the active
        cells that stop: failed ones, and those whose validation error has settled in every group (settled.stops).
        A cell that stops alive keeps its weights of this epoch, put back by `finish`."""
        s = self.state
        val_mse = group_errors(self.stacked, *self.data.validation, self.data.n_groups)[0]
        self.curve_point(val_mse)
        s.checks.append((s.step, val_mse.cpu().numpy()))
        done = stops([c[0] for c in s.checks], np.stack([c[1] for c in s.checks]), epoch)
        for c in range(len(self.cells)):
            if s.active[c] and (not alive[c] or done[c]):
                s.stopped_at[c] = epoch
                s.active[c] = False
                if alive[c]:  # failed cells need no weights
                    s.kept[c] = (
                        {k: v[c].detach().clone() for k, v in self.stacked.params.items()},
                        self.stacked.loss_params[c].detach().clone(),
                    )

    def finish(self, seconds: float) -> TrainResult:
        """Cells that stopped early get their weights of that epoch back; each cell's status ("ok", or why it
        failed: a non-finite loss, a learned scale collapsed to its floor), epochs and steps."""
        s, stacked = self.state, self.stacked
        with torch.no_grad():
            for c, (params, loss_params) in s.kept.items():
                for k, v in params.items():
                    stacked.params[k][c] = v
                stacked.loss_params[c] = loss_params
        epochs = [e if e is not None else s.epoch for e in s.stopped_at]
        status = []
        for c, scale in enumerate(stacked.collapsed()):
            if s.failed[c]:
                status.append(s.failed[c])
            elif scale is not None:
                status.append(f"failed: learned {scale} collapsed to its floor {self.config.sigma_floor:g}")
            else:
                status.append("ok")
        history = pd.DataFrame(s.history)
        return TrainResult(
            stacked, history, status, seconds, epochs, [e * self.schedule.steps_per_epoch for e in epochs]
        )

"""StackedCells: a chunk of cells' weights stacked along a leading cell dimension, and how to run them: what
training (train.py), measurement (measure.py, gradshare.py) and generation (generate.py) all use.

Why stacked: the models are small, so one model at a time leaves most of the machine idle. The cells' weights
are stacked (`torch.func.stack_module_state`) and run by a runner (runners.py): on the CPU each cell on one
thread, the cells side by side in worker threads, its loss computed there too (`StackedCells.looped`), so no
number depends on the thread count; on a GPU every cell at once under vmap. Each cell sees only its own loss, so
the gradient of the summed loss with respect to cell c's weights is exactly cell c's own gradient.

Per-pixel likelihoods (losses.Loss.pixel_scale): their cells' models have the decoder's scale head (models.py),
so their stacked weights differ in shape from the others'; train.py trains them in chunks of their own and
`concat_stacked` gives the other cells a zero head (which they never use) so that one StackedCells holds the
whole grid. A StackedCells with a head outputs (C, B, 2 C_img, H, W); `mean` and `split` take it apart,
`reconstruct` returns the mean only.

VAEs (models.VAE_MODELS): the objective per sample is the loss's NLL of x given decode(mu + sigma * eps) plus
beta * KL(q(z|x) || N(0, I)), with eps from outside (noise.py), so the batch loss stays an exact sum of
per-sample parts and a cell trained in a batch equals the cell trained alone.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn
from torch.func import stack_module_state

from .grid import Cell, TrainConfig
from .losses import get_loss, pixel_log_scale
from .memory import inference_batch
from .models import CONV_MODELS, split_output
from .runners import Graph, LoopedRunner, Outputs, VmapRunner, side_by_side

SIGMA_COLLAPSE_FACTOR = 1.01  # a learned scale within 1% of its floor counts as collapsed


@dataclass
class Objective:
    """A training forward pass of every cell on its own batch: the objective per sample (C, B), its likelihood
    part (C, B), each sample's reconstruction MSE per pixel (C, B; no gradient), and what `StackedCells.backward`
    needs."""

    value: torch.Tensor
    nll: torch.Tensor
    mse: torch.Tensor
    graph: Graph


@dataclass
class StackedCells:
    """C cells' weights stacked along dim 0, and how to run them (`runner`)."""

    cells: list[Cell]
    base: nn.Module  # an uninitialised template (meta device) for functional_call; runners copy it
    params: dict[str, torch.Tensor]  # each (C, ...)
    buffers: dict[str, torch.Tensor]
    loss_params: torch.Tensor  # (C, K): the losses' learned parameters as logs, 0 at the start (losses.Param)
    loss_param_names: tuple[str, ...]  # the K columns; each cell uses those its loss declares, the rest stay 0
    config: TrainConfig

    @property
    def scale_head(self) -> bool:
        """Whether the models have the per-pixel log-scale head (their output has twice the image channels)."""
        return getattr(self.base, "scale_head", None) is not None

    def split(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A forward output (..., k C_img, H, W) -> (mean, raw per-pixel log-scale or None)."""
        return split_output(out, self.base.shape[0])

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        """The reconstruction (the predicted mean) in a forward output."""
        return self.split(out)[0]

    def forward(
        self, x: torch.Tensor, params: dict[str, torch.Tensor] | None = None, eps: torch.Tensor | None = None
    ) -> Outputs:
        """x (C, B, ...) -> outputs (C, B, ...), each cell on its own batch: the reconstructions, with the
        raw log-scale channels after them when the models have a scale head (`split`).

        `params` may hold k copies of each cell's weights, cell-major (C*k, ...), as gradshare.py makes
        them; x is then (C*k, B, ...) and each cell's buffers (input statistics) go with its copies.
        VAEs with `eps` (C, B, latent): (reconstructions from z = mu + sigma * eps, KL per sample (C, B)).
        """
        params = self.params if params is None else params
        copies = len(next(iter(params.values()))) // len(self.cells)
        buffers = (
            {k: v.repeat_interleave(copies, dim=0) for k, v in self.buffers.items()} if copies > 1 else self.buffers
        )
        return self.runner(params, buffers, [x] if eps is None else [x, eps])

    @torch.no_grad()
    def sample_posterior(
        self, x: torch.Tensor, eps: torch.Tensor, batch: int = 2048
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """VAEs: the same images x (N, ...) through every cell at z = mu + sigma * eps (C, N, latent),
        `batch` images at a time -> (decoded (C, N, ...), KL per sample (C, N))."""
        parts = [
            self.runner(self.params, self.buffers, [x[i : i + batch], eps[:, i : i + batch]], shared=(True, False))
            for i in range(0, len(x), batch)
        ]
        return torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts], dim=1)

    @torch.no_grad()
    def decode(self, z: torch.Tensor, batch: int = 2048) -> torch.Tensor:
        """VAEs: each cell's codes z (C, N, latent) through its decoder, `batch` at a time -> (C, N, ...)."""
        return torch.cat(
            [
                self.runner(self.params, self.buffers, [z[:, i : i + batch]], decode=True)
                for i in range(0, z.shape[1], batch)
            ],
            dim=1,
        )

    def objective(self, x: torch.Tensor, eps: torch.Tensor | None = None) -> Objective:
        """The training objective per sample on batches x (C, B, ...) (VAEs: at noise eps (C, B, latent)): NLL
        for an autoencoder, NLL + beta * KL for a VAE, from a forward pass whose graph `backward` takes."""
        args = [x] if eps is None else [x, eps]
        (value, nll, mse), graph = self.runner.forward(self.params, self.buffers, args, self._score, self.loss_params)
        return Objective(value, nll, mse, graph)

    def _score(
        self, c: int | slice | None, out: Outputs, args: list[torch.Tensor], loss_params: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """runners.Score for `objective`: (objective, NLL, MSE per pixel) per sample of cell c on its batch (every
        cell's at once when c is None, a part's when c is a slice)."""
        x = args[0]
        x_hat, kl = (out, None) if len(args) == 1 else out
        if c is None:
            nll = self.per_sample_nll(x, x_hat)
        elif isinstance(c, slice):
            nll = self.part_nll(c, x, x_hat, loss_params)
        else:
            nll = self.cell_nll(c, x, x_hat, loss_params)
        with torch.no_grad():
            mse = (self.mean(x_hat.detach()) - x).pow(2).flatten(-3).mean(-1)
        return (nll if kl is None else nll + self.config.beta * kl), nll, mse

    def backward(self, loss: torch.Tensor, graph: Graph) -> None:
        """loss.backward() into the .grad of params and loss_params, by the runner whose forward made `graph`
        (an Objective's): looped cells go back side by side in worker threads, each cell's gradients the same
        to the bit as one loss.backward() at one thread (runners.LoopedRunner.backward)."""
        self.runner.backward(loss, graph, self.loss_params)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, batch: int | None = None) -> torch.Tensor:
        """The same images x (N, ...) through every cell, `batch` images at a time (default
        `inference_batch`) -> the means (C, N, ...). Each image's output does not depend on `batch`."""
        batch = batch or self.inference_batch
        return torch.cat([self.mean(self._run_all(x[i : i + batch])) for i in range(0, len(x), batch)], dim=1)

    @cached_property
    def inference_batch(self) -> int:
        """Images per forward pass when measuring (memory.inference_batch): all cells run at once under vmap,
        one cell per worker thread when `looped`."""
        return inference_batch(self.config, self.base.shape, 1 if self.looped else len(self.cells))

    @torch.no_grad()
    def pixel_scales(self, x: torch.Tensor, batch: int | None = None) -> torch.Tensor:
        """Each image's mean predicted per-pixel scale (sigma or b, floored as the loss floors it) under
        every cell: (C, N); NaN for cells whose loss predicts none."""
        pixel = torch.tensor([get_loss(c.loss).pixel_scale for c in self.cells], device=x.device)
        if not self.scale_head or not pixel.any():
            return torch.full((len(self.cells), len(x)), torch.nan, device=x.device)
        batch = batch or self.inference_batch
        floor = self.config.sigma_floor
        scale = lambda out: pixel_log_scale(self.split(out)[1], floor).exp().flatten(-3).mean(-1)  # where it ran
        parts = [self._run_all(x[i : i + batch], then=scale) for i in range(0, len(x), batch)]
        return torch.where(pixel[:, None], torch.cat(parts, dim=1), torch.nan)

    def _run_all(self, x: torch.Tensor, then=None) -> torch.Tensor:
        """The same images x (n, ...) through every cell's model -> (C, n, ...) raw outputs (or what `then` makes
        of each cell's, runners.Then)."""
        return self.runner(self.params, self.buffers, [x], shared=(True,), then=then)

    @cached_property
    def looped(self) -> bool:
        """Whether the cells run each on one thread, side by side, rather than all at once under vmap: on the CPU
        (runners.py)."""
        return self.loss_params.device.type == "cpu"

    @cached_property
    def runner(self) -> VmapRunner | LoopedRunner:
        """How these cells run (runners.py): with its own copy of `base`, since other StackedCells may share it.
        Looped MLP cells run a part per worker under one vmap: the same arithmetic as all at once."""
        if self.looped:
            return LoopedRunner(self.base, batched_rows=self.config.model not in CONV_MODELS)
        return VmapRunner(self.base)

    def cell_nll(self, c: int, x: torch.Tensor, out: torch.Tensor, loss_params: torch.Tensor) -> torch.Tensor:
        """Cell c's own loss on its batch x (B, ...) and forward output (B, ...; with the log-scale channels for a
        per-pixel loss), with its learned parameters `loss_params` (K,; a row of self.loss_params) -> (B,)."""
        x_hat, raw_scale = self.split(out)
        loss = get_loss(self.cells[c].loss)
        raw = {p.name: loss_params[self.loss_param_names.index(p.name), None, None] for p in loss.params}  # (1, 1)
        scale = raw_scale.flatten(1) if loss.pixel_scale and raw_scale is not None else None
        return loss.per_sample(x.flatten(1), x_hat.flatten(1), raw, self.config.sigma_floor, raw_scale=scale)

    def part_nll(self, rows: slice, x: torch.Tensor, out: torch.Tensor, loss_params: torch.Tensor) -> torch.Tensor:
        """Cells rows.start .. rows.stop - 1's own losses on their batches x (k, B, ...) and forward outputs (k, B,
        ...), with their learned parameters `loss_params` (k, K; those rows of self.loss_params) -> (k, B): each
        loss once over its cells in the part (contiguous runs), as `per_sample_nll` does over all cells."""
        x_hat, raw_scale = self.split(out)
        x, x_hat = x.flatten(2), x_hat.flatten(2)
        raw_scale = raw_scale.flatten(2) if raw_scale is not None else None
        cells, parts, lo = self.cells[rows], [], 0
        while lo < len(cells):
            hi = lo + 1
            while hi < len(cells) and cells[hi].loss == cells[lo].loss:
                hi += 1
            loss, i = get_loss(cells[lo].loss), slice(lo, hi)
            raw = {p.name: loss_params[i, self.loss_param_names.index(p.name), None, None] for p in loss.params}
            scale = raw_scale[i] if loss.pixel_scale and raw_scale is not None else None
            parts.append(loss.per_sample(x[i], x_hat[i], raw, self.config.sigma_floor, raw_scale=scale))
            lo = hi
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def per_sample_nll(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Each cell's own loss, with its own learned parameters, on its own batch: x (C, B, ...) and the
        forward output (with the log-scale channels, for a per-pixel loss) -> (C, B). Looped: each cell's in a
        worker thread (`cell_nll`)."""
        if self.looped:
            rows = self.loss_params.unbind(0)
            jobs = [(c, x[c], out[c], rows[c]) for c in range(len(self.cells))]
            return torch.stack(
                side_by_side(lambda w, *job: self.cell_nll(*job), jobs, min(torch.get_num_threads(), len(jobs)))
            )
        x_hat, raw_scale = self.split(out)
        x, x_hat = x.flatten(2), x_hat.flatten(2)  # (C, B, M)
        raw_scale = raw_scale.flatten(2) if raw_scale is not None else None
        floor = self.config.sigma_floor
        parts = []
        for name, i in self._loss_index:
            loss = get_loss(name)
            raw = {p.name: self.loss_params[i, self.loss_param_names.index(p.name), None, None] for p in loss.params}
            scale = raw_scale[i] if loss.pixel_scale and raw_scale is not None else None
            parts.append(loss.per_sample(x[i], x_hat[i], raw, floor, raw_scale=scale))  # raw: (C_loss, 1, 1) each
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        return out if self._loss_restore is None else out[self._loss_restore]  # back to cell order

    def cells_by_loss(self) -> dict[str, list[int]]:
        groups: dict[str, list[int]] = {}
        for i, cell in enumerate(self.cells):
            groups.setdefault(cell.loss, []).append(i)
        return groups

    @cached_property
    def _loss_index(self) -> list[tuple[str, slice | torch.Tensor]]:
        """Per loss, its cells as a slice (a view, no copy) when they are contiguous, else an index tensor.

        Built once, not every step: rebuilding index tensors per step costs host work and,
        on a GPU, a host-to-device copy per step.
        """
        device = self.loss_params.device
        out = []
        for name, idx in self.cells_by_loss().items():
            contiguous = idx == list(range(idx[0], idx[-1] + 1))
            out.append((name, slice(idx[0], idx[-1] + 1) if contiguous else torch.tensor(idx, device=device)))
        return out

    @cached_property
    def _loss_restore(self) -> torch.Tensor | None:
        """The permutation from loss-grouped order back to cell order (None when it is the identity)."""
        order = [i for idx in self.cells_by_loss().values() for i in idx]
        if order == list(range(len(order))):
            return None
        return torch.tensor(order).argsort().to(self.loss_params.device)

    def learned(self) -> dict[str, torch.Tensor]:
        """Each learned loss parameter in its natural units as the loss uses it (scales floored):
        name -> (C,), NaN for cells whose loss does not learn it."""
        out = {name: torch.full((len(self.cells),), torch.nan) for name in self.loss_param_names}
        raw = self.loss_params.detach().cpu()
        for c, cell in enumerate(self.cells):
            loss = get_loss(cell.loss)
            own = {p.name: raw[c, self.loss_param_names.index(p.name)] for p in loss.params}
            for name, value in loss.log_params(own, self.config.sigma_floor).items():
                out[name][c] = value.exp()
        return out

    def collapsed(self) -> list[str | None]:
        """Per cell: the name of a learned scale that ended within 1% of its floor, else None."""
        values, floor = self.learned(), self.config.sigma_floor
        return [
            next(
                (
                    p.name
                    for p in get_loss(cell.loss).params
                    if p.scale and values[p.name][c] <= floor * SIGMA_COLLAPSE_FACTOR
                ),
                None,
            )
            for c, cell in enumerate(self.cells)
        ]

    def module(self, c: int) -> nn.Module:
        """Cell c as an ordinary nn.Module (to save, share or inspect)."""
        model = self.config.build(self.base.shape, scale_head=self.scale_head)
        model.load_state_dict({k: v[c].detach().cpu() for k, v in {**self.params, **self.buffers}.items()})
        return model


def input_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel mean and (population) std of the training images, for input_norm='standardize'."""
    return x.mean(0), x.std(0, correction=0)


def init_cells(
    cells: list[Cell],
    shape: tuple[int, int, int],
    config: TrainConfig,
    device: torch.device,
    stats: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> StackedCells:
    """Seeded initial weights, the same for a seed whatever the loss or the batch of cells.

    `stats`: the training images' per-pixel (mean, std), required for input_norm='standardize'.
    """
    if config.input_norm == "standardize" and stats is None:
        raise ValueError("input_norm='standardize' needs the training images' (mean, std)")
    scale_head = needs_scale_head(cells)
    models = []
    for cell in cells:
        torch.manual_seed(cell.seed)
        model = config.build(shape, scale_head=scale_head)
        if config.input_norm == "standardize":
            model.set_input_stats(*stats)
        models.append(model.to(device))
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    names = tuple(dict.fromkeys(p.name for cell in cells for p in get_loss(cell.loss).params))
    loss_params = torch.zeros(len(cells), len(names), device=device, requires_grad=True)
    return StackedCells(cells, base, params, buffers, loss_params, names, config)


def needs_scale_head(cells: list[Cell]) -> bool:
    """Whether any of the cells' losses reads a per-pixel log-scale from the decoder."""
    return any(get_loss(cell.loss).pixel_scale for cell in cells)


def concat_stacked(parts: list[StackedCells]) -> StackedCells:
    """Chunks of cells trained apart -> one StackedCells in the chunks' order. When some chunks have the
    scale head and others not, the others get a zero head (their losses never read it): one shape for all."""
    if len(parts) == 1:
        return parts[0]
    if len({p.scale_head for p in parts}) > 1:
        parts = [_with_zero_head(p) if not p.scale_head else p for p in parts]
    cat = lambda name: {k: torch.cat([getattr(p, name)[k] for p in parts]) for k in getattr(parts[0], name)}
    names = tuple(dict.fromkeys(n for p in parts for n in p.loss_param_names))  # chunks may learn different ones
    loss_params = parts[0].loss_params.new_zeros(sum(len(p.cells) for p in parts), len(names))
    row = 0
    for p in parts:
        for k, name in enumerate(p.loss_param_names):
            loss_params[row : row + len(p.cells), names.index(name)] = p.loss_params.detach()[:, k]
        row += len(p.cells)
    loss_params.requires_grad_()
    return StackedCells(
        [c for p in parts for c in p.cells],
        parts[0].base,
        cat("params"),
        cat("buffers"),
        loss_params,
        names,
        parts[0].config,
    )


def _with_zero_head(part: StackedCells) -> StackedCells:
    """A chunk without the scale head as one with a zero head: the same means, weights laid out as a head chunk's."""
    with torch.device("meta"):
        base = part.config.build(part.base.shape, scale_head=True)
    params = {
        k: part.params[k].detach()
        if k in part.params
        else torch.zeros(len(part.cells), *v.shape, device=part.loss_params.device)
        for k, v in base.named_parameters()
    }
    return StackedCells(part.cells, base, params, part.buffers, part.loss_params, part.loss_param_names, part.config)


def reorder_stacked(stacked: StackedCells, cells: list[Cell]) -> StackedCells:
    """The same trained cells in the order `cells` (a permutation of stacked.cells)."""
    if list(stacked.cells) == list(cells):
        return stacked
    where = {cell: i for i, cell in enumerate(stacked.cells)}
    order = torch.tensor([where[c] for c in cells], device=stacked.loss_params.device)
    take = lambda d: {k: v.detach()[order] for k, v in d.items()}
    return StackedCells(
        list(cells),
        stacked.base,
        take(stacked.params),
        take(stacked.buffers),
        stacked.loss_params.detach()[order].requires_grad_(),
        stacked.loss_param_names,
        stacked.config,
    )


@torch.no_grad()
def residual_chunks(stacked: StackedCells, x: torch.Tensor, chunk: int, device: torch.device | str | None = None):
    """Every per-image error's source: for each `chunk` images of x (N, ...), moved to `device` a chunk at a
    time (default: where x is), yield (its first index, the residuals reconstruction - image (C, b, M))."""
    for lo in range(0, len(x), chunk):
        xb = x[lo : lo + chunk].to(device if device is not None else x.device)
        yield lo, (stacked.reconstruct(xb) - xb).flatten(2)


@torch.no_grad()
def group_errors(
    stacked: StackedCells, x: torch.Tensor, g: torch.Tensor, n_groups: int, batch: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each cell's per-group mean MSE and MAE per pixel on images x (N, ...) with group codes g: two (C, G)."""
    sums = torch.zeros(2, len(stacked.cells), n_groups, dtype=torch.float64, device=x.device)
    for lo, r in residual_chunks(stacked, x, batch):
        gb = g[lo : lo + batch].expand(len(stacked.cells), -1)
        sums[0].scatter_add_(1, gb, r.pow(2).mean(2).double())
        sums[1].scatter_add_(1, gb, r.abs().mean(2).double())
    count = torch.bincount(g, minlength=n_groups).to(sums)
    return sums[0] / count, sums[1] / count

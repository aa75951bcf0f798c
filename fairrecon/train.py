"""Training a grid of (loss, seed) cells together, as one batched model. No file I/O.

Why batched: the models are small, so one model at a time leaves most of the machine
idle. The cells' weights are stacked along a leading cell dimension
(`torch.func.stack_module_state`) and run with `vmap` (conv models on the CPU: each cell on its
own, the cells shared out between worker threads, `StackedCells.looped`); each cell sees only its
own loss, so the gradient of the summed loss with respect to cell c's weights is exactly cell c's
own gradient. Adam is elementwise, so every cell keeps its own optimizer state and the result
equals training the cells one by one (see tests/test_train.py).

Randomness: a cell's seed fixes its initial weights and its batch order (and, for a VAE,
its noise eps); cells that share a seed differ only in their loss. Every cell trains on the
same split.

VAEs (models.VAE_MODELS): each step draws eps (B, latent) per seed from that seed's own
generator on the CPU, outside vmap, and the objective per sample is the loss's NLL of x given
decode(mu + sigma * eps) plus beta * KL(q(z|x) || N(0, I)), so the batch loss stays an exact
sum of per-sample parts and a cell trained in a batch equals the cell trained alone.

Curves and convergence: at `eval_points` evenly spaced steps (with epochs="auto": at every
epoch end) `on_eval` gets an EvalPoint: the cells, and each group's mean training MSE over the
batches since the previous point (free: the step computes it anyway). measure.CurveRecorder
adds each group's held-out error there. A cell whose per-group error still falls by more than
CONVERGED_DROP over the last CONVERGED_WINDOW of training (or rises by as much) has not
converged (`last_drop`, `settled`).

epochs="auto": after every epoch each cell's per-group error on a validation split (carved from
the training images, groups.with_validation) and its per-group training error are checked with
that same rule; a cell whose curves have flattened (after at least AUTO_MIN_EPOCHS) stops there:
its weights at that epoch are kept and put back at the end, so its result is exactly what it
would be trained alone (cells are independent). The stack trains on until every cell has
stopped or failed, or `max_epochs` is reached; cells still not flat then keep the cap's weights
and are reported as not converged.

Speed: the data stays on the device as one tensor and each step gathers the C batches
with one index; the per-loss slices of the cell dimension are worked out once; Adam is
the fused kernel where torch has one; nothing in the step loop waits for the device
(the only host syncs are once per epoch). When the grid does not fit in memory,
`train_cells` trains it in chunks of cells (see `cells_per_chunk`); since cells are
independent and each seed's batch order comes from its own generator, chunking does not
change the result.

Per-pixel likelihoods (losses.Loss.pixel_scale): their cells' models have the decoder's scale head
(models.py), so their stacked weights differ in shape from the others'; `train_cells` trains them
in chunks of their own and `concat_stacked` gives the other cells a zero head (which they never
use) so that one StackedCells holds the whole grid. A StackedCells with a head outputs
(C, B, 2 C_img, H, W); `mean` and `split` take it apart, `reconstruct` returns the mean only.
"""

from __future__ import annotations

import copy
import math
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from functools import cached_property

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from .errors import UserError
from .losses import get_loss, pixel_log_scale
from .models import CONV_MODELS, VAE_MODELS, build_model, split_output
from .spec import AuditSpec

SIGMA_COLLAPSE_FACTOR = 1.01  # a learned scale within 1% of its floor counts as collapsed
EPS_STREAM = 0x5EED  # a VAE seed's noise generator is seeded with seed * 2**16 + EPS_STREAM: apart from its batch order


def resolve_device(name: str) -> torch.device:
    """'auto' takes CUDA when present; asking for CUDA without it is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(
            "device 'cuda' requested but no CUDA GPU is available (torch.cuda.is_available() is False); "
            "use --device cpu or auto"
        )
    return torch.device(name)


@dataclass(frozen=True)
class Cell:
    loss: str
    seed: int

    @property
    def key(self) -> str:
        return f"{self.loss}/seed{self.seed}"


@dataclass(frozen=True)
class TrainConfig:
    """The spec fields training needs; no defaults here: AuditSpec is their one home (`from_spec`)."""

    model: str
    latent: int
    hidden: int
    output: str  # linear | sigmoid (models.py)
    input_norm: str  # none | standardize
    epochs: int | str  # a number, or "auto": until the validation and training curves flatten
    max_epochs: int  # the cap of epochs="auto"
    batch_size: int
    lr: float
    sigma_lr: float
    sigma_floor: float
    grad_points: int  # how many batches per cell to hand to `on_snapshot`
    eval_points: int  # how many curve points per cell to hand to `on_eval` (fixed epochs)
    beta: float  # VAEs: the KL term's weight

    @property
    def vae(self) -> bool:
        return self.model in VAE_MODELS

    @property
    def auto(self) -> bool:
        return self.epochs == "auto"

    @property
    def epoch_cap(self) -> int:
        """The most epochs a cell can train: `epochs`, or `max_epochs` for epochs="auto"."""
        return self.max_epochs if self.auto else int(self.epochs)

    def build(self, shape: tuple[int, int, int], *, scale_head: bool = False) -> nn.Module:
        """One untrained autoencoder of this configuration (with the per-pixel log-scale head if asked)."""
        return build_model(
            self.model,
            shape,
            self.latent,
            self.hidden,
            output=self.output,
            input_norm=self.input_norm,
            scale_head=scale_head,
        )

    @classmethod
    def from_spec(cls, spec: AuditSpec, **changes) -> TrainConfig:
        """The training settings of a spec (with `changes` applied to the spec first, checked)."""
        spec = spec.replace(**changes) if changes else spec
        return cls(**{f.name: getattr(spec, f.name) for f in fields(cls)})


@dataclass
class StackedCells:
    """C cells' weights stacked along dim 0, and how to run them."""

    cells: list[Cell]
    base: nn.Module  # an uninitialised template (meta device) for functional_call
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
        self,
        x: torch.Tensor,
        params: dict[str, torch.Tensor] | None = None,
        eps: torch.Tensor | None = None,
        keep: list | None = None,
    ):
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
        return self._each(params, buffers, [x] if eps is None else [x, eps], keep=keep)

    @torch.no_grad()
    def sample_posterior(
        self, x: torch.Tensor, eps: torch.Tensor, batch: int = 2048
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """VAEs: the same images x (N, ...) through every cell at z = mu + sigma * eps (C, N, latent),
        `batch` images at a time -> (decoded (C, N, ...), KL per sample (C, N))."""
        parts = [
            self._each(self.params, self.buffers, [x[i : i + batch], eps[:, i : i + batch]], shared=(True, False))
            for i in range(0, len(x), batch)
        ]
        return torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts], dim=1)

    @torch.no_grad()
    def decode(self, z: torch.Tensor, batch: int = 2048) -> torch.Tensor:
        """VAEs: each cell's codes z (C, N, latent) through its decoder, `batch` at a time -> (C, N, ...)."""
        return torch.cat(
            [
                self._each(self.params, self.buffers, [z[:, i : i + batch]], decode=True)
                for i in range(0, z.shape[1], batch)
            ],
            dim=1,
        )

    def objective(
        self, x: torch.Tensor, eps: torch.Tensor | None = None, keep: list | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The training objective per sample (C, B) on batches x (C, B, ...), with its likelihood part
        (C, B) and the reconstruction it scored: NLL for an autoencoder; NLL + beta * KL for a VAE.
        `keep`: a list for the looped forward's graph, which `backward` then takes."""
        if eps is None:
            x_hat = self.forward(x, keep=keep)
            nll = self.per_sample_nll(x, x_hat)
            return nll, nll, x_hat
        x_hat, kl = self.forward(x, eps=eps, keep=keep)
        nll = self.per_sample_nll(x, x_hat)
        return nll + self.config.beta * kl, nll, x_hat

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, batch: int | None = None) -> torch.Tensor:
        """The same images x (N, ...) through every cell, `batch` images at a time (default
        `inference_batch`) -> the means (C, N, ...). Each image's output does not depend on `batch`."""
        batch = batch or self.inference_batch
        return torch.cat([self.mean(self._run_all(x[i : i + batch])) for i in range(0, len(x), batch)], dim=1)

    @cached_property
    def inference_batch(self) -> int:
        """Images per forward pass when measuring: as many as keep the widest layer's output within
        INFERENCE_BYTES, so it stays in cache: for all cells at once under vmap, for one cell when `looped`
        (each worker thread runs one cell at a time, so each has that budget). Measured: conv under vmap,
        4 cells, 2048 images at once ran 4x slower than 128 at a time; looped conv, 128 to 668 images per
        pass ran within run-to-run noise of each other and ~1.6x faster than 2048; the outputs are
        bit-identical at any batch."""
        widest = max(activation_sizes(self.config, self.base.shape))
        at_once = 1 if self.looped else len(self.cells)
        return max(16, min(2048, INFERENCE_BYTES // (4 * widest * at_once)))

    @torch.no_grad()
    def pixel_scales(self, x: torch.Tensor, batch: int | None = None) -> torch.Tensor:
        """Each image's mean predicted per-pixel scale (sigma or b, floored as the loss floors it) under
        every cell: (C, N); NaN for cells whose loss predicts none."""
        pixel = torch.tensor([get_loss(c.loss).pixel_scale for c in self.cells], device=x.device)
        if not self.scale_head or not pixel.any():
            return torch.full((len(self.cells), len(x)), torch.nan, device=x.device)
        batch = batch or self.inference_batch
        parts = []
        for i in range(0, len(x), batch):
            raw = self.split(self._run_all(x[i : i + batch]))[1]
            parts.append(pixel_log_scale(raw, self.config.sigma_floor).exp().flatten(2).mean(2))
        return torch.where(pixel[:, None], torch.cat(parts, dim=1), torch.nan)

    def _run_all(self, x: torch.Tensor) -> torch.Tensor:
        """The same images x (n, ...) through every cell's model -> (C, n, ...) raw outputs."""
        return self._each(self.params, self.buffers, [x], shared=(True,))

    @cached_property
    def looped(self) -> bool:
        """Whether the cells run each on its own rather than under vmap: conv models on the CPU. vmap turns
        each convolution of stacked weights into a grouped convolution, which torch's CPU backend runs on a
        slow path (transposed ones above all); a loop calls the ordinary kernels (benchmarks/stacking.py),
        a cell per worker thread (`cell_workers`), forward and backward."""
        return self.config.model in CONV_MODELS and self.loss_params.device.type == "cpu"

    def _each(
        self,
        params: dict[str, torch.Tensor],
        buffers: dict[str, torch.Tensor],
        args: list[torch.Tensor],
        shared: tuple[bool, ...] = (),
        keep: list | None = None,
        **kwargs,
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The base model with each stacked row of params and buffers (k, ...) on args -> outputs stacked (k, ...):
        an arg marked True in `shared` goes to every row as it is, the others are split along dim 0. Under vmap,
        or as a loop over rows (`looped`: side by side in `cell_workers`); either way each row computes only with
        its own weights. A list `keep` gets the loop's (row params, row outputs), for `backward`."""
        shared = tuple(shared) + (False,) * (len(args) - len(shared))

        def one(p, b, *a):
            return functional_call(self._thread_base(), (p, b), a, kwargs)

        if not self.looped:
            return vmap(one, in_dims=(0, 0, *(None if s else 0 for s in shared)))(params, buffers, *args)
        rows = lambda d: [dict(zip(d, vs)) for vs in zip(*(v.unbind(0) for v in d.values()))] if d else None
        p_rows = rows(params)
        b_rows = rows(buffers) or [{}] * len(p_rows)
        split = [[a] * len(p_rows) if s else a.unbind(0) for a, s in zip(args, shared)]
        outs = cell_workers(one, list(zip(p_rows, b_rows, *split)))
        if keep is not None:
            keep.append((p_rows, outs))
        return tuple(map(torch.stack, zip(*outs))) if isinstance(outs[0], tuple) else torch.stack(outs)

    def _thread_base(self) -> nn.Module:
        """`base`, or in a worker thread its own copy: functional_call swaps the weights into the module it
        runs, so two threads on one module would see each other's."""
        if threading.current_thread() is threading.main_thread():
            return self.base
        local = self.__dict__.setdefault("_bases", threading.local())
        if not hasattr(local, "base"):
            local.base = copy.deepcopy(self.base)
        return local.base

    def backward(self, loss: torch.Tensor, graph: list | None = None) -> None:
        """loss.backward() into the .grad of params and loss_params. Looped cells (`graph`: the `keep` of the
        step's forward) go through the loss to each cell's output first, then through each cell's own graph in
        `cell_workers`, everything at one intra-op thread: oneDNN's ordinary convolutions split a weight
        gradient's sum over the batch between threads, so its rounding would depend on the thread count
        (forward passes and input gradients do not; tests/test_threads.py). Per cell it is the same
        arithmetic as one backward pass, so the gradients are the same to the bit; the cores share the cells."""
        if not graph:
            loss.backward()
            return
        ((p_rows, outs),) = graph
        outs = [o if isinstance(o, tuple) else (o,) for o in outs]
        threads = torch.get_num_threads()
        with one_thread():
            *out_grads, lp_grad = torch.autograd.grad(
                loss, [o for out in outs for o in out] + [self.loss_params], allow_unused=True
            )
            width = len(outs[0])

            def one(p, out, grads):
                used = [(o, g) for o, g in zip(out, grads) if g is not None]
                return torch.autograd.grad([o for o, _ in used], list(p.values()), [g for _, g in used])

            grads = cell_workers(
                one,
                [(p, out, out_grads[c * width : (c + 1) * width]) for c, (p, out) in enumerate(zip(p_rows, outs))],
                threads,
            )
        for k, name in enumerate(p_rows[0]):
            self.params[name].grad = torch.stack([g[k] for g in grads])
        if lp_grad is not None:
            self.loss_params.grad = lp_grad

    def per_sample_nll(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Each cell's own loss, with its own learned parameters, on its own batch: x (C, B, ...) and the
        forward output (with the log-scale channels, for a per-pixel loss) -> (C, B)."""
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


@contextmanager
def one_thread():
    """torch's intra-op threads set to 1 inside, put back after: for sums whose rounding would otherwise
    depend on how many threads share them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


_POOLS: dict[int, ThreadPoolExecutor] = {}


def cell_workers(fn: Callable, rows: list[tuple], threads: int | None = None) -> list:
    """[fn(*row) for row in rows], side by side in worker threads, as many as `threads` (default torch's
    intra-op threads, --threads), each at one intra-op thread, in this thread's grad mode; in this thread
    when that is one. For the looped cells: a cell per core keeps the cores busy where one cell's small
    kernels do not (and a backward pass at one thread rounds the same everywhere)."""
    workers = min(threads or torch.get_num_threads(), len(rows))
    if workers <= 1:
        return [fn(*row) for row in rows]
    if workers not in _POOLS:
        _POOLS[workers] = ThreadPoolExecutor(
            workers, thread_name_prefix="fairrecon-cell", initializer=torch.set_num_threads, initargs=(1,)
        )
    grad = torch.is_grad_enabled()

    def run(row):
        with torch.set_grad_enabled(grad):
            return fn(*row)

    return list(_POOLS[workers].map(run, rows))


INFERENCE_BYTES = 16 * 2**20  # see StackedCells.inference_batch


def activation_sizes(config: TrainConfig, shape: tuple[int, ...]) -> list[int]:
    """Elements of every leaf layer's output for one image, from a forward pass on the meta device."""
    with torch.device("meta"):
        model = config.build(tuple(shape))
        sizes: list[int] = []
        hooks = [
            m.register_forward_hook(lambda m, i, o: sizes.append(o[0].numel()))
            for m in model.modules()
            if not list(m.children())
        ]
        model(torch.empty(1, *shape))
        for h in hooks:
            h.remove()
    return sizes


SNAPSHOT_SPACING = 20  # at most one snapshot per 20 steps: a snapshot costs ~1.3 steps, so <= ~7% of training


def snapshot_count(wanted: int, total_steps: int) -> int:
    """How many snapshots a cell gets: `wanted`, but at most one per SNAPSHOT_SPACING steps (at least 2)."""
    return min(wanted, max(2, total_steps // SNAPSHOT_SPACING))


@dataclass
class Snapshot:
    """One training batch handed to a measurement hook (e.g. gradient shares) before the update."""

    step: int
    epoch: int
    stacked: StackedCells
    x: torch.Tensor  # (C, B, ...)
    group: torch.Tensor  # (C, B) group code of each sample
    eps: torch.Tensor | None = None  # VAEs: (C, B, latent), the noise this step's update uses


@dataclass
class EvalPoint:
    """The cells at a curve point, handed to `on_eval` right after the update that ends `step`."""

    step: int  # updates done so far
    epoch: float  # step / steps per epoch
    stacked: StackedCells
    active: torch.Tensor  # (C,) bool: cells this point belongs to (with epochs="auto", stopped cells do not)
    train_mse: torch.Tensor  # (C, G): each group's mean per-sample training MSE over the batches since the last point
    val_mse: torch.Tensor | None = None  # (C, G): each group's validation MSE (epochs="auto"), else None


# Convergence: one rule for the warning (audit) and for the stopping of epochs="auto". A group's error whose
# fitted trend still changes by more than CONVERGED_DROP (5%) over the last CONVERGED_WINDOW (quarter) of
# training, falling or rising, has not converged. Why 5%: with Adam at a constant learning rate these models
# keep improving slowly for hundreds of epochs (digits: -10% per last quarter at 600 epochs; Fashion-MNIST 10k:
# -5 to -10% at 100), so a tighter bound flags every practical run forever; runs still in their fast phase fall
# 10-30% (digits at 50 epochs, Fashion-MNIST at 20). Rising counts too: an error that jumped at the end (Adam
# can spike the error by 20-100% for an epoch or two) is no settled answer either.
CONVERGED_DROP = 0.05
CONVERGED_WINDOW = 0.25
# epochs="auto" never stops before this many epochs: its last-quarter window then holds at least 5 epoch-end
# points, so the trend is not fitted to 2 or 3 (with 5, a learned-sigma cell on Fashion-MNIST stopped at epoch
# 11 on a short plateau, while the other cells of its seed ran 38-69 epochs).
AUTO_MIN_EPOCHS = 16


def settled(drop) -> np.ndarray:
    """The convergence rule on `last_drop` values: |change| <= CONVERGED_DROP (NaN: not settled)."""
    return np.abs(np.asarray(drop, dtype=float)) <= CONVERGED_DROP


def last_drop(steps, values, *, window: float = CONVERGED_WINDOW) -> np.ndarray:
    """Relative fall over the last `window` of training, per column of values (T,) or (T, K).

    A straight line is fitted to log(value) against step over the points in the window (step >=
    (1 - window) * last step; at least 3, else the 3 latest), and its fall over the window is
    returned: 1 - exp(slope * window * last step). A fit, not two end points, so that one spiky
    point (learned sigma can jump) does not decide. A rise gives a negative drop; NaN where there
    are fewer than 3 points or a value is not positive and finite.
    """
    steps, values = np.asarray(steps, dtype=float), np.asarray(values, dtype=float)
    shape = values.shape[1:]
    if len(steps) < 3:
        return np.full(shape, np.nan)
    first = min(int(np.searchsorted(steps, (1 - window) * steps[-1])), len(steps) - 3)
    s, v = steps[first:], values[first:].reshape(len(steps) - first, -1)
    ok = np.isfinite(v).all(0) & (v > 0).all(0)
    logv = np.log(np.where(ok, v, 1.0))
    centred = s - s.mean()
    slope = centred @ (logv - logv.mean(0)) / (centred @ centred)
    return np.where(ok, 1 - np.exp(slope * window * steps[-1]), np.nan).reshape(shape)


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


@dataclass
class TrainResult:
    stacked: StackedCells
    history: pd.DataFrame  # one row per cell and epoch it trained
    status: list[str] = field(default_factory=list)  # "ok" or "failed: <reason>" per cell
    seconds: float = 0.0
    epochs: list[int] = field(default_factory=list)  # epochs each cell trained (its own stop with epochs="auto")
    steps: list[int] = field(default_factory=list)  # updates each cell's result had


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


def cell_bytes(config: TrainConfig, shape: tuple[int, int, int], *, scale_head: bool = False) -> int:
    """Estimated training memory of one cell, in bytes (float32).

    Weights: parameter, gradient and Adam's two moments (4 copies). Activations: every
    layer's output for a batch, measured by a forward pass on the meta device (no memory
    used), counted 3x (saved for backward, its gradient, a temporary). Images: the
    gathered batch, the reconstruction and the loss's elementwise temporaries, ~8 copies
    of a batch of images. An estimate on the safe side, not a measurement.
    """
    with torch.device("meta"):
        model = config.build(shape, scale_head=scale_head)
        n_params = sum(p.numel() for p in model.parameters())
        sizes: list[int] = []
        hooks = [
            m.register_forward_hook(lambda m, i, o: sizes.append(o.numel()))
            for m in model.modules()
            if not list(m.children())
        ]
        model(torch.empty(config.batch_size, *shape))
        for h in hooks:
            h.remove()
    image = config.batch_size * math.prod(shape)
    return 4 * (4 * n_params + 3 * sum(sizes) + 8 * image)


def available_bytes(device: torch.device | str) -> int:
    """Free memory on the device: CUDA's free memory, or the host's MemAvailable."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def cells_per_chunk(
    config: TrainConfig,
    shape: tuple[int, int, int],
    n_images: int,
    device: torch.device | str = "cpu",
    budget: float = 0.5,
    free: int | None = None,
    *,
    scale_head: bool = False,
) -> int:
    """How many cells to train together: as many as fit in `budget` of the free memory
    after the resident dataset (at least 1)."""
    free = available_bytes(device) if free is None else free
    room = budget * free - 4 * n_images * math.prod(shape)
    return max(1, int(room // cell_bytes(config, shape, scale_head=scale_head)))


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
    x, group = x.to(device), group.to(device)
    if config.auto and validation is None:
        raise ValueError("epochs='auto' needs a validation split (groups.with_validation)")
    if validation is not None:
        validation = (validation[0].to(device), validation[1].to(device))
    n_groups = int(group.max()) + 1 if n_groups is None else n_groups
    stats = input_stats(x) if config.input_norm == "standardize" else None
    if max_cells is not None and max_cells < 1:
        raise ValueError(f"max_cells must be >= 1, got {max_cells}")
    if fused is None:
        fused = device.type in ("cpu", "cuda")
    parts = []
    for head in (False, True):  # the two weight shapes train apart (the scale head's cells second)
        kind = [c for c in cells if needs_scale_head([c]) == head]
        size = max_cells or cells_per_chunk(config, tuple(x.shape[1:]), len(x), device, scale_head=head)
        parts += [
            _train_chunk(
                x,
                group,
                kind[i : i + size],
                config,
                device,
                on_snapshot,
                on_epoch,
                on_eval,
                validation,
                n_groups,
                stats,
                fused,
            )
            for i in range(0, len(kind), size)
        ]
    done = [c for p in parts for c in p["stacked"].cells]
    stacked = reorder_stacked(concat_stacked([p["stacked"] for p in parts]), cells)
    back = [done.index(c) for c in cells]
    history = pd.concat([p["history"] for p in parts], ignore_index=True)
    if len(parts) > 1:  # one row per cell and epoch, epoch-major as for a single chunk
        order = {cell: i for i, cell in enumerate(cells)}
        history = (
            history.assign(_c=[order[Cell(loss, s)] for loss, s in zip(history["loss"], history["seed"])])
            .sort_values(["epoch", "_c"], kind="stable")
            .drop(columns="_c")
            .reset_index(drop=True)
        )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    flat = lambda key: [v for p in parts for v in p[key]]
    return TrainResult(
        stacked,
        history,
        [flat("status")[i] for i in back],
        time.perf_counter() - start,
        [flat("epochs")[i] for i in back],
        [flat("steps")[i] for i in back],
    )


def eps_generators(cells: list[Cell], stream: int = EPS_STREAM) -> dict[int, torch.Generator]:
    """Each seed's own VAE noise generator (CPU), apart from its batch-order generator; measurements
    use other streams (measure.py), so they never replay training's noise."""
    return {s: torch.Generator().manual_seed(s * 2**16 + stream) for s in sorted({c.seed for c in cells})}


def draw_eps(
    generators: dict[int, torch.Generator], cells: list[Cell], batch: int, latent: int, device: torch.device
) -> torch.Tensor:
    """One step's VAE noise (C, batch, latent): one draw per seed, shared by that seed's cells."""
    eps = {s: torch.randn(batch, latent, generator=g) for s, g in generators.items()}
    return torch.stack([eps[c.seed] for c in cells]).to(device, non_blocking=True)


def eval_steps(points: int, total_steps: int) -> set[int]:
    """The steps (updates done) of `points` evenly spaced curve points, the last one at the end of training."""
    return set(np.unique(np.round(np.linspace(total_steps / points, total_steps, points)).astype(int)).tolist())


def _train_chunk(x, group, cells, config, device, on_snapshot, on_epoch, on_eval, validation, n_groups, stats, fused):
    """Train one chunk of cells together; x, group and validation are already on the device."""
    n, n_cells = len(x), len(cells)
    stacked = init_cells(cells, tuple(x.shape[1:]), config, device, stats)
    opt = torch.optim.Adam(
        [
            {"params": list(stacked.params.values()), "lr": config.lr},
            {"params": [stacked.loss_params], "lr": config.sigma_lr},
        ],
        fused=fused,
    )
    orders = {s: torch.Generator().manual_seed(s) for s in sorted({c.seed for c in cells})}  # on the CPU
    noise = eps_generators(cells) if config.vae else None
    steps_per_epoch = math.ceil(n / config.batch_size)
    cap = config.epoch_cap
    if config.auto:  # the length is not known in advance: snapshots at epoch starts, >= SNAPSHOT_SPACING apart
        snap_every = max(1, math.ceil(SNAPSHOT_SPACING / steps_per_epoch))
        snap_at = set(range(0, steps_per_epoch * cap, snap_every * steps_per_epoch)) if config.grad_points else set()
        eval_at: set[int] = set()  # curve points at every epoch end instead, where the stopping rule looks
    else:
        total = steps_per_epoch * cap
        snap_at = set(torch.linspace(0, total - 1, snapshot_count(config.grad_points, total)).round().long().tolist())
        eval_at = eval_steps(config.eval_points, total) if on_eval is not None else set()
    alive = torch.ones(n_cells, dtype=torch.bool, device=device)
    active = torch.ones(n_cells, dtype=torch.bool)  # not yet stopped (epochs="auto"); on the CPU
    stopped_at: list[int | None] = [None] * n_cells
    kept: dict[int, tuple[dict[str, torch.Tensor], torch.Tensor]] = {}  # weights of cells stopped early
    failed_at = [None] * n_cells
    group_sums = torch.zeros(2, n_cells, n_groups, device=device)  # per-group training MSE since the last point
    checks: list[tuple[int, np.ndarray, np.ndarray]] = []  # epochs="auto": (step, val (C, G), train (C, G))
    rows, step = [], 0

    def point(val_mse=None):
        train_mse = group_sums[0] / group_sums[1]  # NaN for a group with no sample since the last point
        group_sums.zero_()
        if on_eval is not None:
            on_eval(EvalPoint(step, step / steps_per_epoch, stacked, active.clone(), train_mse, val_mse))
        return train_mse

    for epoch in range(cap):
        perms = {s: torch.randperm(n, generator=g) for s, g in orders.items()}
        perm = torch.stack([perms[c.seed] for c in cells]).to(device, non_blocking=True)  # (C, N)
        sums = torch.zeros(3, n_cells, device=device)  # nll, mse, count
        for lo in range(0, n, config.batch_size):
            idx = perm[:, lo : lo + config.batch_size]  # (C, B)
            xb, gb = x[idx], group[idx]  # (C, B, C_img, H, W), (C, B)
            eps = draw_eps(noise, cells, idx.shape[1], config.latent, device) if noise is not None else None
            if step in snap_at and on_snapshot is not None:
                on_snapshot(Snapshot(step, epoch, stacked, xb, gb, eps))
            graph: list = []
            objective, nll, x_hat = stacked.objective(xb, eps, keep=graph)  # (C, B) each
            per_cell = objective.mean(1)
            finite = torch.isfinite(per_cell) & alive
            loss = torch.where(finite, per_cell, torch.zeros_like(per_cell)).sum()  # cells are independent
            opt.zero_grad(set_to_none=True)
            stacked.backward(loss, graph)
            opt.step()
            with torch.no_grad():
                alive &= finite
                sample_mse = (stacked.mean(x_hat.detach()) - xb).pow(2).flatten(2).mean(2)  # (C, B)
                sums[0] += torch.nan_to_num(nll.detach(), nan=0.0, posinf=0.0).sum(1)
                sums[1] += sample_mse.sum(1)
                sums[2] += idx.shape[1]
                group_sums[0].scatter_add_(1, gb, sample_mse)
                group_sums[1].scatter_add_(1, gb, torch.ones_like(sample_mse))
            step += 1
            if step in eval_at:
                point()
        alive_now = alive.tolist()  # one host sync per epoch
        for c, ok in enumerate(alive_now):
            if not ok and failed_at[c] is None:
                failed_at[c] = f"failed: non-finite loss in epoch {epoch + 1}"
        means = (sums[:2] / sums[2]).cpu()
        for c, cell in enumerate(cells):
            if active[c]:
                rows.append(
                    {
                        "loss": cell.loss,
                        "seed": cell.seed,
                        "epoch": epoch + 1,
                        "train_nll": means[0, c].item(),
                        "train_mse": means[1, c].item(),
                    }
                )
        if config.auto:
            val_mse = group_errors(stacked, *validation, n_groups)[0]
            train_mse = point(val_mse)
            checks.append((step, val_mse.cpu().numpy(), train_mse.double().cpu().numpy()))
            for c in _newly_flat(checks, active, alive_now, epoch + 1):
                stopped_at[c] = epoch + 1
                active[c] = False
                if alive_now[c]:  # keep the weights it has now; failed cells need none
                    kept[c] = (
                        {k: v[c].detach().clone() for k, v in stacked.params.items()},
                        stacked.loss_params[c].detach().clone(),
                    )
        if on_epoch is not None:
            on_epoch(epoch + 1, cap)
        if config.auto and not active.any():
            break
    with torch.no_grad():  # cells that stopped early get their weights of that epoch back
        for c, (params, loss_params) in kept.items():
            for k, v in params.items():
                stacked.params[k][c] = v
            stacked.loss_params[c] = loss_params
    epochs = [e if e is not None else epoch + 1 for e in stopped_at]
    status = []
    for c, scale in enumerate(stacked.collapsed()):
        if failed_at[c]:
            status.append(failed_at[c])
        elif scale is not None:
            status.append(f"failed: learned {scale} collapsed to its floor {config.sigma_floor:g}")
        else:
            status.append("ok")
    return {
        "stacked": stacked,
        "history": pd.DataFrame(rows),
        "status": status,
        "epochs": epochs,
        "steps": [e * steps_per_epoch for e in epochs],
    }


def _newly_flat(
    checks: list[tuple[int, np.ndarray, np.ndarray]], active: torch.Tensor, alive: list[bool], epoch: int
) -> list[int]:
    """epochs="auto": the active cells that stop now: failed ones, and those whose every group's validation
    and training error has `settled` (changed by at most CONVERGED_DROP over the last CONVERGED_WINDOW)."""
    steps = [c[0] for c in checks]
    val = last_drop(steps, np.stack([c[1] for c in checks]))  # (C, G)
    train = last_drop(steps, np.stack([c[2] for c in checks]))
    flat = (epoch >= AUTO_MIN_EPOCHS) & settled(val).all(1) & settled(train).all(1)
    return [c for c in range(len(alive)) if active[c] and (not alive[c] or flat[c])]

"""How stacked weights run: one model, k rows of weights (k, ...) and inputs -> outputs stacked (k, ...).

Two runners with one interface; stacked.StackedCells picks one (`StackedCells.looped`):

* `LoopedRunner` (every model on the CPU): each row on its own, the rows shared out between worker threads
  (`side_by_side`), each worker at one intra-op thread. A row's whole computation runs on one thread: its forward
  pass, what `score` makes of its output (its loss), and its backward pass. So no number depends on how many
  threads there are or on which rows run beside it (threads.py says why torch's kernels would otherwise round
  differently; tests/test_threads.py). Rows run with the ordinary kernels through functional_call (conv models:
  under vmap a convolution of stacked weights becomes a grouped convolution, which torch's CPU backend runs on a
  slow path; benchmarks/stacking.py), or, with `batched_rows` (MLPs), a contiguous part of the rows per worker
  under one vmap: at one thread a batched matrix product computes each matrix as it would alone, so this is the
  arithmetic of VmapRunner at one thread, bit for bit, whatever the part's size (one vmap per worker, not one per
  row: fewer Python round trips per step).
* `VmapRunner` (any model on a GPU): every row at once under torch.func.vmap.

Each row computes only with its own weights. Calling a runner (`runner(params, buffers, args)`) gives the outputs
(with `then`, what a function of each row's output gives, computed where the row ran); `forward(params, buffers,
args, score, loss_params)` gives the scores of a training forward pass with the graph that `backward(loss, graph,
loss_params)` takes, which puts loss's gradient into the .grad of the params and of loss_params (the losses'
learned parameters, which `score` reads).

functional_call swaps the weights into the module it runs, so a module runs one row at a time: each runner
has its own template modules (copies of the meta-device model it is given), one per worker thread, and a lock
so that two threads calling one runner take turns.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vmap

from .threads import one_thread

Outputs = torch.Tensor | tuple[torch.Tensor, ...]  # a model's output: a tensor, or a tuple (VAEs: x_hat, kl)
Weights = dict[str, torch.Tensor]
# score(row, outputs, args, loss_params) -> per-sample tensors, the first the objective (differentiated), the rest
# measured alongside without gradient; row is None for all rows at once (stacked outputs, args and loss_params)
# or a row's index (its own outputs, args and loss_params row), or a slice of rows (a part: their outputs, args and
# loss_params rows, stacked)
Score = Callable[[int | slice | None, Outputs, Sequence[torch.Tensor], torch.Tensor], tuple[torch.Tensor, ...]]
Then = Callable[[Outputs], Outputs]  # a function of a row's outputs (or of all rows' at once, under vmap)


def side_by_side(fn: Callable[..., Any], rows: Sequence[tuple], workers: int) -> list:
    """[fn(w, *row) for row in rows], where w is the worker that runs it: rows dealt out round-robin to
    `workers` threads (worker w takes rows w, w + workers, ...), each at one intra-op thread and in this thread's
    grad mode, in a pool that lives for this call only; in this thread, as worker 0 at one intra-op thread,
    when `workers` <= 1."""
    if workers <= 1:
        with one_thread():
            return [fn(0, *row) for row in rows]
    grad = torch.is_grad_enabled()

    def work(w: int) -> list:
        torch.set_num_threads(1)  # this worker thread's own setting
        with torch.set_grad_enabled(grad):
            return [fn(w, *row) for row in rows[w::workers]]

    with ThreadPoolExecutor(workers, thread_name_prefix="fairrecon-cell") as pool:
        parts = list(pool.map(work, range(workers)))
    out: list = [None] * len(rows)
    for w, part in enumerate(parts):
        out[w::workers] = part
    return out


def _pad(shared: Sequence[bool], n: int) -> tuple[bool, ...]:
    return tuple(shared) + (False,) * (n - len(shared))


def _cat(outs: list[Any]) -> Outputs:
    """Parts' outputs (k, ...) each -> all rows' (sum of k, ...)."""
    return tuple(map(torch.cat, zip(*outs))) if isinstance(outs[0], tuple) else torch.cat(outs)


@dataclass(frozen=True)
class VmapGraph:
    """What VmapRunner.backward needs besides the loss: nothing (autograd holds the whole graph)."""


@dataclass(frozen=True)
class LoopedGraph:
    """What LoopedRunner.backward needs: the stacked params the forward ran; per part (a worker's rows lo:hi) its
    range and its params (views of those rows, (hi - lo, ...) each); per row its loss-parameter row (a view of
    loss_params) and its objective per sample (the first score)."""

    params: Weights
    ranges: list[tuple[int, int]]
    parts: list[Weights]
    loss_params: list[torch.Tensor]
    values: list[torch.Tensor]


Graph = VmapGraph | LoopedGraph  # what a runner's forward returns for its backward


class VmapRunner:
    """Every row at once under vmap."""

    def __init__(self, base: nn.Module):
        self._template = copy.deepcopy(base)
        self._lock = threading.Lock()

    def __call__(
        self,
        params: Weights,
        buffers: Weights,
        args: Sequence[torch.Tensor],
        shared: Sequence[bool] = (),
        then: Then | None = None,
        **kwargs,
    ) -> Outputs:
        """The model with each row of params and buffers (k, ...) on args -> outputs (k, ...): an arg marked True in
        `shared` goes to every row as it is, the others are split along dim 0; with `then`, then(outputs).
        kwargs go to the model's forward."""
        shared = _pad(shared, len(args))

        def one(p, b, *a):
            return functional_call(self._template, (p, b), a, kwargs)

        with self._lock:
            out = vmap(one, in_dims=(0, 0, *(None if s else 0 for s in shared)))(params, buffers, *args)
        return out if then is None else then(out)

    def forward(
        self, params: Weights, buffers: Weights, args: Sequence[torch.Tensor], score: Score, loss_params: torch.Tensor
    ) -> tuple[tuple[torch.Tensor, ...], VmapGraph]:
        """A training forward pass (every arg split by row): score(None, outputs, args, loss_params), and what
        `backward` needs."""
        return score(None, self(params, buffers, args), args, loss_params), VmapGraph()

    def backward(self, loss: torch.Tensor, graph: Graph, loss_params: torch.Tensor) -> None:
        """loss.backward(): into the .grad of every leaf, params and loss_params alike."""
        if not isinstance(graph, VmapGraph):
            raise TypeError(f"VmapRunner.backward needs the VmapGraph of its forward, got {type(graph).__name__}")
        loss.backward()


class LoopedRunner:
    """Each row on one thread, the rows side by side in worker threads, forward and backward."""

    def __init__(self, base: nn.Module, *, batched_rows: bool = False):
        """`batched_rows`: each worker runs its rows (a contiguous part, one per worker) as one batch under vmap
        (the arithmetic of VmapRunner at one thread, bit for bit, whatever the part's size), rather than one row
        at a time with the module's ordinary kernels."""
        self._templates = [copy.deepcopy(base)]  # one per worker thread, made as needed
        self._lock = threading.Lock()
        self.batched_rows = batched_rows

    def __call__(
        self,
        params: Weights,
        buffers: Weights,
        args: Sequence[torch.Tensor],
        shared: Sequence[bool] = (),
        then: Then | None = None,
        **kwargs,
    ) -> Outputs:
        """As VmapRunner.__call__, the rows shared out between worker threads (as many as torch's intra-op
        threads), `then` applied to each part's outputs (k, ...) in the thread that ran it."""
        shared = _pad(shared, len(args))
        run = self._model(shared, kwargs)
        fn = run if then is None else (lambda w, p, b, *a: then(run(w, p, b, *a)))
        return _cat(self._side_by_side(fn, params, buffers, args, shared)[2])

    def forward(
        self, params: Weights, buffers: Weights, args: Sequence[torch.Tensor], score: Score, loss_params: torch.Tensor
    ) -> tuple[tuple[torch.Tensor, ...], LoopedGraph]:
        """A training forward pass (every arg split by row): each row's scores, score(row, its outputs, its args,
        its loss_params row), computed in the thread that ran the row, stacked; and what `backward` needs."""
        shared = _pad((), len(args))
        run = self._model(shared, {})
        lp_rows = loss_params.unbind(0)

        def part(w, lo, p, b, *a):
            out, hi = run(w, p, b, *a), lo + len(a[0])
            if self.batched_rows:  # the part's scores at once: one call per part, not per row
                lps = torch.stack(lp_rows[lo:hi])  # from the rows' views, through which backward takes their grads
                return list(zip(*score(slice(lo, hi), out, list(a), lps)))
            row = lambda i: tuple(o[i] for o in out) if isinstance(out, tuple) else out[i]
            return [tuple(score(lo + i, row(i), [x[i] for x in a], lp_rows[lo + i])) for i in range(len(a[0]))]

        ranges, parts, scores = self._side_by_side(part, params, buffers, args, shared, start=True)
        scores = [s for part_scores in scores for s in part_scores]
        graph = LoopedGraph(params, ranges, parts, list(lp_rows), [s[0] for s in scores])
        return tuple(map(torch.stack, zip(*scores))), graph

    def backward(self, loss: torch.Tensor, graph: Graph, loss_params: torch.Tensor) -> None:
        """loss.backward() into the .grad of graph.params and loss_params: through the loss to each row's objective
        at one thread (a few small sums), then through each part's own graph (its rows' losses, their model) in
        `side_by_side`. Per row it is the same arithmetic as one backward pass at one thread, so the gradients are
        the same to the bit; the cores share the parts."""
        if not isinstance(graph, LoopedGraph):
            raise TypeError(f"LoopedRunner.backward needs the LoopedGraph of its forward, got {type(graph).__name__}")
        with one_thread():
            value_grads = torch.autograd.grad(loss, graph.values)

        def one(w, lo, hi, p):
            lps = graph.loss_params[lo:hi]
            grads = torch.autograd.grad(graph.values[lo:hi], [*p.values(), *lps], value_grads[lo:hi], allow_unused=True)
            return grads[: len(p)], grads[len(p) :]

        jobs = [(lo, hi, p) for (lo, hi), p in zip(graph.ranges, graph.parts)]
        grads = side_by_side(one, jobs, min(torch.get_num_threads(), len(jobs)))
        for k, name in enumerate(graph.parts[0]):
            graph.params[name].grad = torch.cat([g[0][k] for g in grads])
        lp_grads = [lp for g in grads for lp in g[1]]
        if any(g is not None for g in lp_grads):
            loss_params.grad = torch.stack(
                [g if g is not None else torch.zeros_like(lp) for g, lp in zip(lp_grads, graph.loss_params)]
            )

    def _model(self, shared: tuple[bool, ...], kwargs: dict) -> Callable[..., Outputs]:
        """(worker, a part's params and buffers (k, ...), its args) -> its outputs (k, ...), on the worker's
        template module: under vmap (`batched_rows`), or row by row (a part of one row: conv models)."""
        if not self.batched_rows:

            def row(w, p, b, *a):
                first = lambda d: {k: v[0] for k, v in d.items()}
                out = functional_call(
                    self._templates[w], (first(p), first(b)), tuple(x if s else x[0] for x, s in zip(a, shared)), kwargs
                )
                return tuple(o[None] for o in out) if isinstance(out, tuple) else out[None]

            return row
        in_dims = (0, 0, *(None if s else 0 for s in shared))

        def run(w, p, b, *a):
            one = lambda p, b, *a: functional_call(self._templates[w], (p, b), a, kwargs)
            return vmap(one, in_dims=in_dims)(p, b, *a)

        return run

    def _side_by_side(
        self,
        fn: Callable[..., Any],
        params: Weights,
        buffers: Weights,
        args: Sequence[torch.Tensor],
        shared,
        start: bool = False,
    ) -> tuple[list[tuple[int, int]], list[Weights], list]:
        """(the parts' ranges, their params, [fn(worker, [lo,] its params, its buffers, *its args) for each part]) in
        `side_by_side` (`start`: with lo, the part's first row): the rows cut into parts, one row each, or
        (`batched_rows`) one contiguous part per worker; an arg marked True in `shared` goes to every part as it
        is, the others are cut along dim 0."""
        n = len(next(iter(params.values())))
        workers = min(torch.get_num_threads(), n)
        if self.batched_rows:
            bounds = [n * w // workers for w in range(workers + 1)]
            ranges = list(zip(bounds, bounds[1:]))
        else:
            ranges = [(c, c + 1) for c in range(n)]
        cut = lambda d, lo, hi: {k: v[lo:hi] for k, v in d.items()}
        parts = [cut(params, lo, hi) for lo, hi in ranges]
        jobs = [
            ((lo,) if start else ()) + (p, cut(buffers, lo, hi), *(a if s else a[lo:hi] for a, s in zip(args, shared)))
            for (lo, hi), p in zip(ranges, parts)
        ]
        with self._lock:
            while len(self._templates) < workers:
                self._templates.append(copy.deepcopy(self._templates[0]))
            return ranges, parts, side_by_side(fn, jobs, workers)

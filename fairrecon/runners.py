"""How stacked weights run: one model, k rows of weights (k, ...) and inputs -> outputs stacked (k, ...).

Two runners with one interface; stacked.StackedCells picks one (`StackedCells.looped`):

* `VmapRunner`: every row at once under torch.func.vmap. Fast where the stacked operations are (matmuls:
  MLPs; any model on a GPU).
* `LoopedRunner`: each row on its own, with the ordinary kernels, the rows shared out between worker
  threads, each at one intra-op thread (`side_by_side`). For conv models on the CPU: vmap turns each
  convolution of stacked weights into a grouped convolution, which torch's CPU backend runs on a slow path
  (transposed ones above all); a loop calls the ordinary kernels (benchmarks/stacking.py), and a row per core
  keeps the cores busy where one row's small kernels do not.

Either way each row computes only with its own weights. Calling a runner (`runner(params, buffers, args)`)
gives the outputs; `forward` gives them with the graph that `backward` needs, and `backward(loss, graph,
loss_params)` puts loss's gradient into the .grad of the params and of loss_params (the losses' learned
parameters, which the rows' outputs do not depend on).

functional_call swaps the weights into the module it runs, so a module runs one row at a time: each runner
has its own template modules (copies of the meta-device model it is given), one per worker thread, and a lock
so that two threads calling one runner take turns.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vmap

Outputs = torch.Tensor | tuple[torch.Tensor, ...]  # a model's output: a tensor, or a tuple (VAEs: x_hat, kl)
Weights = dict[str, torch.Tensor]


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


def side_by_side(fn: Callable[..., Any], rows: Sequence[tuple], workers: int) -> list:
    """[fn(w, *row) for row in rows], where w is the worker that runs it: rows dealt out round-robin to
    `workers` threads (worker w takes rows w, w + workers, ...), each at one intra-op thread and in this thread's
    grad mode, in a pool that lives for this call only; in this thread, as worker 0, when `workers` <= 1."""
    if workers <= 1:
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


def _rows(stacked: Weights) -> list[Weights]:
    """Stacked weights (k, ...) each -> k rows of views, one dict per row ([] for no weights)."""
    return [dict(zip(stacked, vs)) for vs in zip(*(v.unbind(0) for v in stacked.values()))]


@dataclass(frozen=True)
class VmapGraph:
    """What VmapRunner.backward needs besides the loss: nothing (autograd holds the whole graph)."""


@dataclass(frozen=True)
class LoopedGraph:
    """What LoopedRunner.backward needs: the stacked params the forward ran, each row's params (views of them)
    and each row's outputs."""

    params: Weights
    rows: list[Weights]
    outs: list[Outputs]


Graph = VmapGraph | LoopedGraph  # what a runner's forward returns for its backward


class VmapRunner:
    """Every row at once under vmap."""

    def __init__(self, base: nn.Module):
        self._template = copy.deepcopy(base)
        self._lock = threading.Lock()

    def __call__(
        self, params: Weights, buffers: Weights, args: Sequence[torch.Tensor], shared: Sequence[bool] = (), **kwargs
    ) -> Outputs:
        """The model with each row of params and buffers (k, ...) on args -> outputs (k, ...): an arg marked True in
        `shared` goes to every row as it is, the others are split along dim 0. kwargs go to the model's forward."""
        shared = _pad(shared, len(args))

        def one(p, b, *a):
            return functional_call(self._template, (p, b), a, kwargs)

        with self._lock:
            return vmap(one, in_dims=(0, 0, *(None if s else 0 for s in shared)))(params, buffers, *args)

    def forward(self, params: Weights, buffers: Weights, args: Sequence[torch.Tensor]) -> tuple[Outputs, VmapGraph]:
        """A training forward pass (every arg split by row): the outputs, and what `backward` needs."""
        return self(params, buffers, args), VmapGraph()

    def backward(self, loss: torch.Tensor, graph: Graph, loss_params: torch.Tensor) -> None:
        """loss.backward(): into the .grad of every leaf, params and loss_params alike."""
        if not isinstance(graph, VmapGraph):
            raise TypeError(f"VmapRunner.backward needs the VmapGraph of its forward, got {type(graph).__name__}")
        loss.backward()


class LoopedRunner:
    """Each row on its own with the ordinary kernels, the rows side by side in worker threads, forward and
    backward."""

    def __init__(self, base: nn.Module):
        self._templates = [copy.deepcopy(base)]  # one per worker thread, made as needed
        self._lock = threading.Lock()

    def __call__(
        self, params: Weights, buffers: Weights, args: Sequence[torch.Tensor], shared: Sequence[bool] = (), **kwargs
    ) -> Outputs:
        """As VmapRunner.__call__, each row in a worker thread (as many as torch's intra-op threads)."""
        return self._stack(self._run(params, buffers, args, shared, kwargs)[1])

    def forward(self, params: Weights, buffers: Weights, args: Sequence[torch.Tensor]) -> tuple[Outputs, LoopedGraph]:
        """A training forward pass (every arg split by row): the outputs, and what `backward` needs."""
        rows, outs = self._run(params, buffers, args, (), {})
        return self._stack(outs), LoopedGraph(params, rows, outs)

    def backward(self, loss: torch.Tensor, graph: Graph, loss_params: torch.Tensor) -> None:
        """loss.backward() into the .grad of graph.params and loss_params: through the loss to each row's outputs
        first, then through each row's own graph in `side_by_side`, everything at one intra-op thread: oneDNN's
        ordinary convolutions split a weight gradient's sum over the batch between threads, so its rounding would
        depend on the thread count (forward passes and input gradients do not; tests/test_threads.py). Per row it
        is the same arithmetic as one backward pass, so the gradients are the same to the bit; the cores share
        the rows."""
        if not isinstance(graph, LoopedGraph):
            raise TypeError(f"LoopedRunner.backward needs the LoopedGraph of its forward, got {type(graph).__name__}")
        outs = [o if isinstance(o, tuple) else (o,) for o in graph.outs]
        threads = torch.get_num_threads()
        with one_thread():
            *out_grads, lp_grad = torch.autograd.grad(
                loss, [o for out in outs for o in out] + [loss_params], allow_unused=True
            )
            width = len(outs[0])

            def one(w, p, out, grads):
                used = [(o, g) for o, g in zip(out, grads) if g is not None]
                return torch.autograd.grad([o for o, _ in used], list(p.values()), [g for _, g in used])

            jobs = [
                (p, out, out_grads[c * width : (c + 1) * width]) for c, (p, out) in enumerate(zip(graph.rows, outs))
            ]
            grads = side_by_side(one, jobs, min(threads, len(jobs)))
        for k, name in enumerate(graph.rows[0]):
            graph.params[name].grad = torch.stack([g[k] for g in grads])
        if lp_grad is not None:
            loss_params.grad = lp_grad

    def _run(
        self, params: Weights, buffers: Weights, args: Sequence[torch.Tensor], shared: Sequence[bool], kwargs: dict
    ) -> tuple[list[Weights], list[Outputs]]:
        """(each row's params, each row's outputs)."""
        shared = _pad(shared, len(args))
        p_rows = _rows(params)
        b_rows = _rows(buffers) or [{}] * len(p_rows)
        split = [[a] * len(p_rows) if s else a.unbind(0) for a, s in zip(args, shared)]
        jobs = list(zip(p_rows, b_rows, *split))
        with self._lock:
            workers = min(torch.get_num_threads(), len(jobs))
            while len(self._templates) < workers:
                self._templates.append(copy.deepcopy(self._templates[0]))
            templates = self._templates

            def one(w, p, b, *a):
                return functional_call(templates[w], (p, b), a, kwargs)

            return p_rows, side_by_side(one, jobs, workers)

    @staticmethod
    def _stack(outs: list[Any]) -> Outputs:
        return tuple(map(torch.stack, zip(*outs))) if isinstance(outs[0], tuple) else torch.stack(outs)

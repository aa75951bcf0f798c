"""The runners (runners.py): rows side by side in worker threads, in order, each worker at one intra-op thread
with its own template module; pools that end with their call; one runner safe to call from two threads; each
runner's backward takes only its own forward's graph."""

from __future__ import annotations

import threading

import pytest
import torch

from fairrecon.grid import Cell, TrainConfig
from fairrecon.runners import LoopedGraph, LoopedRunner, VmapGraph, VmapRunner, side_by_side
from fairrecon.spec import AuditSpec
from fairrecon.stacked import init_cells

SHAPE = (1, 28, 28)
CELLS = [Cell("l2", 0), Cell("l1", 1), Cell("learned-sigma", 2)]


def stacked_cells(model: str):
    config = TrainConfig.from_spec(AuditSpec(model=model, latent=4, hidden=32))
    return init_cells(CELLS, SHAPE, config, torch.device("cpu"))


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def cell_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("fairrecon-cell")]


def test_side_by_side_keeps_row_order_and_deals_rows_round_robin(two_threads):
    seen = side_by_side(
        lambda w, i: (w, i, threading.current_thread().name, torch.get_num_threads()), [(i,) for i in range(5)], 2
    )
    assert [s[1] for s in seen] == list(range(5))  # results in row order
    assert [s[0] for s in seen] == [0, 1, 0, 1, 0]  # worker w took rows w, w + 2, ...
    assert all(s[2].startswith("fairrecon-cell") and s[3] == 1 for s in seen)  # worker threads, one intra-op thread
    alone = side_by_side(lambda w, i: (w, threading.current_thread().name), [(0,), (1,)], 1)
    assert alone == [(0, threading.current_thread().name)] * 2  # one worker: this thread
    assert torch.get_num_threads() == 2  # the workers' setting is their own


def test_worker_threads_end_with_the_call(two_threads):
    """Pools live for one call: after a looped forward and backward no worker thread is left running."""
    stacked = stacked_cells("conv")
    assert stacked.looped
    x = torch.rand(len(CELLS), 8, *SHAPE, generator=torch.Generator().manual_seed(0))
    objective = stacked.objective(x)
    stacked.backward(objective.value.mean(1).sum(), objective.graph)
    assert all(p.grad is not None for p in stacked.params.values())
    assert not cell_threads()


@pytest.mark.parametrize("model", ["mlp", "conv"])
def test_one_stacked_cells_called_from_two_threads_at_once_gives_the_same_bits(two_threads, model):
    """Each runner has its own template modules and a lock: two threads reconstructing through one StackedCells
    at once get exactly what one call gets (functional_call swaps weights into the module it runs)."""
    stacked = stacked_cells(model)
    x = torch.rand(64, *SHAPE, generator=torch.Generator().manual_seed(1))
    want = stacked.reconstruct(x, batch=16)
    got: list[torch.Tensor] = [None, None]
    barrier = threading.Barrier(2)

    def work(k: int) -> None:
        barrier.wait()
        got[k] = stacked.reconstruct(x, batch=16)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(g, want) for g in got)


def test_each_runner_takes_only_its_own_forwards_graph():
    base = stacked_cells("mlp").base
    loss, loss_params = torch.zeros((), requires_grad=True), torch.zeros(1, requires_grad=True)
    with pytest.raises(TypeError, match="VmapRunner.backward needs the VmapGraph"):
        VmapRunner(base).backward(loss, LoopedGraph({}, [], [], [], []), loss_params)
    with pytest.raises(TypeError, match="LoopedRunner.backward needs the LoopedGraph"):
        LoopedRunner(base).backward(loss, VmapGraph(), loss_params)


@pytest.mark.parametrize("model, ranges", [("mlp", [(0, 1), (1, 3)]), ("conv", [(0, 1), (1, 2), (2, 3)])])
def test_mlp_rows_run_as_one_part_per_worker_conv_rows_one_by_one(two_threads, model, ranges):
    """MLP cells: a contiguous part of the rows per worker under one vmap (one Python round trip per worker, not per
    row); conv cells one row at a time. Either way each row's gradient equals the row's alone at one thread."""
    stacked = stacked_cells(model)
    x = torch.rand(len(CELLS), 8, *SHAPE, generator=torch.Generator().manual_seed(2))
    objective = stacked.objective(x)
    assert objective.graph.ranges == ranges
    stacked.backward(objective.value.mean(1).sum(), objective.graph)
    for c in range(len(CELLS)):
        torch.set_num_threads(1)
        alone = init_cells([CELLS[c]], SHAPE, stacked.config, torch.device("cpu"))
        one = alone.objective(x[c : c + 1])
        alone.backward(one.value.mean(1).sum(), one.graph)
        for name, p in alone.params.items():
            assert torch.equal(stacked.params[name].grad[c], p.grad[0]), (model, c, name)

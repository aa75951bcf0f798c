"""Batched cell training equals training each cell alone, and chunking the grid changes nothing.

The reference is an independent, plain training loop: one nn.Module, one torch Adam
(the default for-loop kernel), the cell's loss on its own batches, the same seeded
initial weights and batch order. Tolerance: float32 throughout; the batched run may sum
in a different order (bmm under vmap instead of mm, fused instead of for-loop Adam), so
results agree to rounding only. Measured on digits (14 steps): weights differ by <= 3e-8,
outputs by <= 6e-8, while training moves weights by ~1.4e-2. ATOL = 1e-5 sits ~300x above
the rounding we see and ~1000x below the effect of training, so a real difference (a
wrong batch, a shared optimizer state, another cell's loss) cannot hide under it.
"""

from __future__ import annotations

import math

import pytest
import torch

from fairrecon import memory
from fairrecon.data import load_images
from fairrecon.grid import Cell, TrainConfig
from fairrecon.losses import get_loss, pixel_log_scale
from fairrecon.memory import cell_bytes, cells_per_chunk
from fairrecon.models import build_model
from fairrecon.noise import EPS_STREAM
from fairrecon.spec import AuditSpec
from fairrecon.stacked import init_cells
from fairrecon.train import train_cells

ATOL = 1e-5
CONFIG = TrainConfig.from_spec(AuditSpec(latent=8, hidden=32, epochs=2, batch_size=64, grad_points=0))
# l2 appears twice, apart, so the per-loss index path (not only slices) is exercised; learned-sigma,
# student-t (two learned parameters) and barron:1 (a family member with a learned scale) share the
# learned-parameter matrix, each using its own columns.
CELLS = [
    Cell("l2", 0),
    Cell("learned-sigma", 1),
    Cell("log-mse", 0),
    Cell("student-t", 2),
    Cell("l1", 2),
    Cell("barron:1", 1),
    Cell("l2", 1),
]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one intra-op thread


@pytest.fixture(scope="module")
def digits():
    images = load_images("digits")
    return images.train[:400], images.test[:200]


def plain_train(x: torch.Tensor, cell: Cell, config: TrainConfig):
    """One cell, the textbook way."""
    torch.manual_seed(cell.seed)
    loss = get_loss(cell.loss)
    model = build_model(
        config.model,
        tuple(x.shape[1:]),
        config.latent,
        config.hidden,
        output=config.output,
        input_norm=config.input_norm,
        scale_head=loss.pixel_scale,
    )
    channels = x.shape[1]
    if config.input_norm == "standardize":  # the whole training set's per-pixel statistics, computed here
        model.set_input_stats(x.mean(0), x.std(0, correction=0))
    raw = {p.name: torch.zeros((), requires_grad=True) for p in loss.params}  # logs, 0 at the start
    opt = torch.optim.Adam(
        [{"params": model.parameters(), "lr": config.lr}, {"params": list(raw.values()), "lr": config.sigma_lr}],
        foreach=False,
    )
    order = torch.Generator().manual_seed(cell.seed)
    steps = 0
    for _ in range(config.epochs):
        perm = torch.randperm(len(x), generator=order)
        for lo in range(0, len(x), config.batch_size):
            xb = x[perm[lo : lo + config.batch_size]]
            out = model(xb)  # a per-pixel loss's model: the mean's channels, then the raw log-scale's
            nll = loss.per_sample(
                xb.flatten(1),
                out[:, :channels].flatten(1),
                raw,
                config.sigma_floor,
                raw_scale=out[:, channels:].flatten(1) if loss.pixel_scale else None,
            )
            opt.zero_grad()
            nll.mean().backward()
            opt.step()
            steps += 1
    return model, raw, steps


def assert_same_cell(stacked, c: int, model, raw, test_x, config=CONFIG):
    ref = model.state_dict()
    got = stacked.module(c).state_dict()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=0, atol=ATOL, msg=f"{stacked.cells[c].key} {name}")
    for name in set(got) - set(ref):  # a cell without a per-pixel loss, in a grid with one: its head stays zero
        assert name.startswith("scale_head.") and not got[name].any()
    with torch.no_grad():
        torch.testing.assert_close(
            stacked.reconstruct(test_x)[c], model(test_x)[:, : test_x.shape[1]], rtol=0, atol=ATOL
        )
    learned = stacked.learned()
    want = get_loss(stacked.cells[c].loss).log_params({k: v.detach() for k, v in raw.items()}, config.sigma_floor)
    for name, log_value in want.items():  # learned parameters (natural units) agree to rounding, like the weights
        torch.testing.assert_close(
            learned[name][c], log_value.exp(), rtol=0, atol=ATOL, msg=f"{stacked.cells[c].key} {name}"
        )
    assert all(torch.isnan(v[c]) for name, v in learned.items() if name not in want)  # other losses' columns: NaN


def test_batched_cells_match_plain_loop_and_alone(digits):
    x, test_x = digits
    group = torch.zeros(len(x), dtype=torch.long)
    together = train_cells(x, group, CELLS, CONFIG)
    assert together.status == ["ok"] * len(CELLS)
    learned = together.stacked.learned()
    moved = [abs(learned[p.name][c].item() - 1.0) for c, cell in enumerate(CELLS) for p in get_loss(cell.loss).params]
    assert (
        len(moved) == 4 and min(moved) > 100 * ATOL
    )  # learned parameters left their start (1), so agreeing means something
    for c, cell in enumerate(CELLS):
        model, raw, steps = plain_train(x, cell, CONFIG)
        assert steps == CONFIG.epochs * math.ceil(len(x) / CONFIG.batch_size)
        assert_same_cell(together.stacked, c, model, raw, test_x)
        alone = train_cells(x, group, [cell], CONFIG)
        for name, p in alone.stacked.params.items():
            torch.testing.assert_close(together.stacked.params[name][c], p[0], rtol=0, atol=ATOL)
        # the per-sample losses, too, agree
        xb = test_x[:32].expand(1, *test_x[:32].shape)
        with torch.no_grad():
            mine = together.stacked.per_sample_nll(
                xb.expand(len(CELLS), *xb.shape[1:]), together.stacked.reconstruct(test_x[:32])
            )[c]
            ref = get_loss(cell.loss).per_sample(
                test_x[:32].flatten(1), model(test_x[:32]).flatten(1), raw, CONFIG.sigma_floor
            )
        torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-2)  # sums over 64 pixels of NLL terms


@pytest.mark.parametrize("model", ["mlp", "conv"])
def test_sigmoid_output_and_standardized_input_match_the_plain_loop(digits, model):
    """The ablations change the architecture, not the batching: batched cells still equal the textbook loop."""
    x, test_x = digits
    config = TrainConfig.from_spec(
        AuditSpec(
            model=model,
            latent=8,
            hidden=32,
            epochs=1,
            batch_size=64,
            grad_points=0,
            output="sigmoid",
            input_norm="standardize",
        )
    )
    cells = [Cell("l2", 0), Cell("l1", 1)]
    together = train_cells(x, torch.zeros(len(x), dtype=torch.long), cells, config)
    for c, cell in enumerate(cells):
        model_, log_sigma, _ = plain_train(x, cell, config)
        assert_same_cell(together.stacked, c, model_, log_sigma, test_x, config)
    # the statistics stay the training images' (buffers are not trained)
    torch.testing.assert_close(together.stacked.buffers["input_mean"][0], x.mean(0), rtol=0, atol=0)
    # copies of each cell's weights (as gradient shares make them, cell-major) take the cell's statistics along
    stacked = together.stacked
    copies = {k: v.repeat_interleave(3, dim=0) for k, v in stacked.params.items()}
    xb = test_x[:5].expand(len(cells) * 3, *test_x[:5].shape)
    with torch.no_grad():
        out = stacked.forward(xb, copies).unflatten(0, (len(cells), 3))
        for c in range(len(cells)):
            for k in range(3):
                torch.testing.assert_close(out[c, k], stacked.module(c)(test_x[:5]), rtol=0, atol=ATOL)


PIXEL_CELLS = [
    Cell("gaussian-pixel", 0),
    Cell("l2", 0),
    Cell("laplace-pixel", 1),
    Cell("gaussian-pixel:0.5", 1),
    Cell("learned-sigma", 1),
]


def test_pixel_losses_train_apart_and_match_the_plain_loop(digits):
    """Cells whose decoder predicts a per-pixel log-scale train in their own chunk (their weights have a second
    head), yet the grid comes back in cell order, each cell equal to the textbook loop and to training it alone;
    the other cells' results are unchanged by the head (a zero head, never read)."""
    x, test_x = digits
    group = torch.zeros(len(x), dtype=torch.long)
    together = train_cells(x, group, PIXEL_CELLS, CONFIG)
    stacked = together.stacked
    assert stacked.cells == PIXEL_CELLS and stacked.scale_head and together.status == ["ok"] * len(PIXEL_CELLS)
    assert list(together.history["loss"][: len(PIXEL_CELLS)]) == [
        c.loss for c in PIXEL_CELLS
    ]  # epoch-major, cell order
    for c, cell in enumerate(PIXEL_CELLS):
        model, raw, _ = plain_train(x, cell, CONFIG)
        assert_same_cell(stacked, c, model, raw, test_x)
        if get_loss(cell.loss).pixel_scale:  # the head moved (it starts at zero), so agreeing means something
            assert stacked.params["scale_head.weight"][c].abs().max() > 100 * ATOL
            with torch.no_grad():
                scales = (
                    pixel_log_scale(model(test_x)[:, 1:].flatten(1), CONFIG.sigma_floor).exp().mean(1)
                )  # the floored scale
            torch.testing.assert_close(stacked.pixel_scales(test_x)[c], scales, rtol=1e-4, atol=0)  # float32 rounding
        else:
            assert stacked.pixel_scales(test_x)[c].isnan().all()
    alone = train_cells(x, group, PIXEL_CELLS[:1], CONFIG)
    for name, p in alone.stacked.params.items():
        torch.testing.assert_close(stacked.params[name][0], p[0], rtol=0, atol=ATOL)


def test_training_moves_the_weights(digits):
    """Guard against a vacuous comparison: trained weights are far from initial ones (>> ATOL)."""
    x, _ = digits
    cfg = CONFIG
    trained = train_cells(x, torch.zeros(len(x), dtype=torch.long), CELLS[:1], cfg)
    torch.manual_seed(CELLS[0].seed)
    init = build_model(cfg.model, tuple(x.shape[1:]), cfg.latent, cfg.hidden).state_dict()
    moved = max((trained.stacked.module(0).state_dict()[k] - v).abs().max().item() for k, v in init.items())
    assert moved > 100 * ATOL  # ~1.4e-2 measured


def test_chunks_give_the_same_result(digits, monkeypatch):
    x, test_x = digits
    group = torch.zeros(len(x), dtype=torch.long)
    whole = train_cells(x, group, CELLS, CONFIG, max_cells=len(CELLS))
    # too little memory for more than two cells -> the automatic split must chunk
    two = 2 * cell_bytes(CONFIG, tuple(x.shape[1:])) + 4 * x.numel()
    monkeypatch.setattr(memory, "available_bytes", lambda device: int(two / 0.5))
    assert cells_per_chunk(CONFIG, tuple(x.shape[1:]), len(x)) == 2
    chunked = train_cells(x, group, CELLS, CONFIG)
    assert [c.key for c in chunked.stacked.cells] == [c.key for c in CELLS]
    assert chunked.status == whole.status
    for name, p in whole.stacked.params.items():
        torch.testing.assert_close(chunked.stacked.params[name], p, rtol=0, atol=ATOL)
    torch.testing.assert_close(
        chunked.stacked.reconstruct(test_x), whole.stacked.reconstruct(test_x), rtol=0, atol=ATOL
    )
    # chunks learn different parameter columns (student-t: scale, dof; l1: none); put together, they line up by name
    assert set(chunked.stacked.loss_param_names) == set(whole.stacked.loss_param_names) == {"sigma", "scale", "dof"}
    for name, value in whole.stacked.learned().items():
        torch.testing.assert_close(chunked.stacked.learned()[name], value, rtol=0, atol=ATOL, equal_nan=True)
    cols = ["loss", "seed", "epoch"]
    assert chunked.history[cols].equals(whole.history[cols])
    torch.testing.assert_close(
        torch.tensor(chunked.history["train_nll"].to_numpy()),
        torch.tensor(whole.history["train_nll"].to_numpy()),
        rtol=1e-5,
        atol=1e-5,
    )


def test_cell_bytes_counts_weights_and_grows_with_batch():
    shape = (1, 28, 28)
    small, big = (TrainConfig.from_spec(AuditSpec(hidden=64, latent=8, batch_size=b)) for b in (32, 64))
    n_params = sum(p.numel() for p in build_model("mlp", shape, 8, 64).parameters())
    # at batch size b: 16 bytes per parameter + a part linear in b
    per_batch = cell_bytes(big, shape) - cell_bytes(small, shape)
    assert per_batch > 0
    assert cell_bytes(small, shape) - per_batch == 16 * n_params
    assert cells_per_chunk(small, shape, 1000, free=0) == 1  # never zero cells


def test_fused_and_plain_adam_agree(digits):
    x, _ = digits
    group = torch.zeros(len(x), dtype=torch.long)
    a = train_cells(x, group, CELLS[:3], CONFIG, fused=True)
    b = train_cells(x, group, CELLS[:3], CONFIG, fused=False)
    for name, p in a.stacked.params.items():
        torch.testing.assert_close(p, b.stacked.params[name], rtol=0, atol=ATOL)


def test_any_learned_scale_at_its_floor_fails_its_cell_only(digits):
    """A floor above every optimum (0.5, while residuals are ~0.1) and a fast sigma_lr drive each learned scale to
    the floor: those cells are marked failed, naming the parameter; l1 and student-t's dof (not a scale) are not."""
    x, _ = digits
    cells = [
        Cell("l1", 0),
        Cell("learned-sigma", 0),
        Cell("laplace-learned", 0),
        Cell("student-t", 0),
        Cell("barron:1", 0),
    ]
    config = TrainConfig.from_spec(
        AuditSpec(latent=8, hidden=32, epochs=2, batch_size=64, grad_points=0, sigma_floor=0.5, sigma_lr=1.0)
    )
    trained = train_cells(x, torch.zeros(len(x), dtype=torch.long), cells, config)
    assert (
        trained.status
        == ["ok", "failed: learned sigma collapsed to its floor 0.5"]
        + ["failed: learned scale collapsed to its floor 0.5"] * 3
    )
    learned = trained.stacked.learned()
    torch.testing.assert_close(learned["scale"][2:], torch.full((3,), 0.5))  # reported as the likelihood used it
    assert torch.isnan(learned["dof"][[0, 1, 2, 4]]).all() and 0 < learned["dof"][3] < math.inf


def plain_vae_train(x: torch.Tensor, cell: Cell, config: TrainConfig):
    """One VAE cell, the textbook way: its own noise generator (seeded as noise.py documents),
    one draw of eps per step, objective NLL(x | decode(mu + sigma eps)) + beta * KL, written out here."""
    torch.manual_seed(cell.seed)
    model = build_model(config.model, tuple(x.shape[1:]), config.latent, config.hidden)
    loss = get_loss(cell.loss)
    raw = {p.name: torch.zeros((), requires_grad=True) for p in loss.params}
    opt = torch.optim.Adam(
        [{"params": model.parameters(), "lr": config.lr}, {"params": list(raw.values()), "lr": config.sigma_lr}],
        foreach=False,
    )
    order = torch.Generator().manual_seed(cell.seed)
    noise = torch.Generator().manual_seed(cell.seed * 2**16 + EPS_STREAM)
    for _ in range(config.epochs):
        perm = torch.randperm(len(x), generator=order)
        for lo in range(0, len(x), config.batch_size):
            xb = x[perm[lo : lo + config.batch_size]]
            eps = torch.randn(len(xb), config.latent, generator=noise)
            mu, logvar = model.posterior(xb)
            x_hat = model.decode(mu + torch.exp(0.5 * logvar) * eps, xb.shape)
            kl = 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(1)
            nll = loss.per_sample(xb.flatten(1), x_hat.flatten(1), raw, config.sigma_floor)
            opt.zero_grad()
            (nll + config.beta * kl).mean().backward()
            opt.step()
    return model, raw


@pytest.mark.slow
@pytest.mark.parametrize("model", ["vae", "conv-vae"])
def test_vae_cells_batched_match_plain_loop_and_alone(digits, model):
    """VAE cells (noise drawn per seed outside vmap) trained together equal the textbook loop and each cell
    trained alone; cells sharing a seed share their noise, so a cell's result does not depend on its batch."""
    x, test_x = digits
    config = TrainConfig.from_spec(
        AuditSpec(model=model, beta=0.5, latent=4, hidden=64, epochs=2, batch_size=64, grad_points=0)
    )
    cells = [Cell("l1", 0), Cell("log-mse", 1), Cell("learned-sigma", 0), Cell("l2", 1)]
    group = torch.zeros(len(x), dtype=torch.long)
    together = train_cells(x, group, cells, config)
    assert together.status == ["ok"] * len(cells)
    for c, cell in enumerate(cells):
        model_, raw = plain_vae_train(x, cell, config)
        assert_same_cell(together.stacked, c, model_, raw, test_x, config)  # reconstruct() = decode(mu)
        alone = train_cells(x, group, [cell], config)
        for name, p in alone.stacked.params.items():
            torch.testing.assert_close(together.stacked.params[name][c], p[0], rtol=0, atol=ATOL)


@pytest.mark.parametrize("model", ["conv", "conv-vae"])
def test_looped_backward_in_workers_equals_one_backward_pass(model):
    """StackedCells.backward (through the loss once, then each cell's graph in a worker thread, each at one
    intra-op thread) gives exactly the gradients of loss.backward() at one thread: the same sums, not close."""
    config = TrainConfig.from_spec(AuditSpec(model=model, latent=8, hidden=64))
    cells = [Cell("l2", 0), Cell("learned-sigma", 1), Cell("log-mse", 0), Cell("l1", 2)]
    stacked = init_cells(cells, (1, 28, 28), config, torch.device("cpu"))
    assert stacked.looped
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(len(cells), 32, 1, 28, 28, generator=generator)
    eps = torch.randn(len(cells), 32, config.latent, generator=generator) if config.vae else None

    def gradients(workers: int | None) -> list[torch.Tensor]:
        for t in [*stacked.params.values(), stacked.loss_params]:
            t.grad = None
        objective = stacked.objective(x, eps)
        loss = objective.value.mean(1).sum()
        if workers:
            torch.set_num_threads(workers)
            try:
                stacked.backward(loss, objective.graph)
            finally:
                torch.set_num_threads(1)
        else:
            loss.backward()  # the reference: one backward pass, at one thread (the module's fixture)
        return [t.grad.clone() for t in [*stacked.params.values(), stacked.loss_params]]

    reference = gradients(None)
    assert any(g.abs().sum() > 0 for g in reference)
    for workers in (1, 2):
        for got, want in zip(gradients(workers), reference):
            assert torch.equal(got, want)

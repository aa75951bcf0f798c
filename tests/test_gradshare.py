"""Gradient shares against independent computations: torch.func per-sample gradients,
closed forms for the output-space share, and training left untouched by the recorder."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
from conftest import FAST
from torch.func import functional_call, grad, vmap

from fairrecon import analyse, outputs
from fairrecon.audit import run_audit
from fairrecon.gradshare import SHARES, GradShareRecorder, group_gradients
from fairrecon.grid import Cell, TrainConfig
from fairrecon.losses import get_loss
from fairrecon.results import AuditResult
from fairrecon.spec import AuditSpec
from fairrecon.stacked import init_cells
from fairrecon.train import SNAPSHOT_SPACING, snapshot_count, train_cells

CONFIG = TrainConfig.from_spec(AuditSpec(latent=4, hidden=16, sigma_floor=1e-3))
SHAPE = (1, 6, 6)
LOSS_NAMES = ("l1", "l2", "log-mse", "learned-sigma")
LEARNING = ("learned-sigma", "laplace-learned", "student-t", "barron:0.5")  # losses with learned parameters
FAMILY = ("mix:0.3", "huber:0.1")
START = {"sigma": -1.3, "scale": -1.3, "dof": math.log(3.0)}  # above the floor, so scales get a gradient


def make_batch(n_cells: int, b: int = 24, n_groups: int = 3, seed: int = 0):
    """Images in [0, 1] with a third of the pixels exactly 0, and uneven group codes per cell."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand((n_cells, b) + SHAPE, generator=gen)
    x = torch.where(torch.rand(x.shape, generator=gen) < 0.33, torch.zeros_like(x), x)
    group = torch.randint(0, n_groups, (n_cells, b), generator=gen)
    return x, group


def stacked_cells(cells, log_scale: float | None = None):
    """Cells with their learned parameters set to START (every scale to `log_scale` when given)."""
    stacked = init_cells(cells, SHAPE, CONFIG, torch.device("cpu"))
    with torch.no_grad():
        for k, name in enumerate(stacked.loss_param_names):
            stacked.loss_params[:, k] = START[name] if log_scale is None or name == "dof" else log_scale
    return stacked


def independent_nll(loss: str, r: torch.Tensor, logs: dict[str, torch.Tensor], batch_mse: torch.Tensor) -> torch.Tensor:
    """One sample's NLL up to constants, written from the likelihoods, r = x_hat - x (M,); logs: the
    stored log parameters (name -> scalar). Terms that depend on a learned parameter are all kept."""
    floored = {k: v.clamp_min(math.log(CONFIG.sigma_floor)) if k != "dof" else v for k, v in logs.items()}
    if loss == "l1":
        return r.abs().sum()
    if loss == "l2":
        return 0.5 * r.pow(2).sum()
    if loss == "log-mse":  # the batch MSE is a fixed common weight (losses.py)
        return 0.5 * r.pow(2).sum() / batch_mse
    if loss == "mix:0.3":
        return (0.3 * r.abs() + 0.7 * r.pow(2) / 2).sum()
    if loss == "huber:0.1":
        return torch.where(r.abs() <= 0.1, r.pow(2) / 2, 0.1 * (r.abs() - 0.05)).sum()
    if loss == "learned-sigma":
        sigma = floored["sigma"].exp()
        return (0.5 * r.pow(2) / sigma**2 + torch.log(sigma)).sum()
    b = floored["scale"].exp()
    if loss == "laplace-learned":
        return (r.abs() / b + torch.log(b)).sum()
    if loss == "student-t":  # with its normaliser, which depends on the dof
        nu = floored["dof"].exp()
        return (
            torch.lgamma(nu / 2)
            - torch.lgamma((nu + 1) / 2)
            + 0.5 * torch.log(nu)
            + torch.log(b)
            + (nu + 1) / 2 * torch.log(1 + (r / b).pow(2) / nu)
        ).sum()
    if loss == "barron:0.5":  # rho(x, 1/2, c) = 3 ((x^2 / (1.5 c^2) + 1)^(1/4) - 1), plus log c
        return (3 * (((r / b).pow(2) / 1.5 + 1) ** 0.25 - 1) + torch.log(b)).sum()
    raise KeyError(loss)


@pytest.mark.parametrize(
    "losses",
    [*[(name,) for name in LOSS_NAMES + LEARNING[1:] + FAMILY], LEARNING + FAMILY],
    ids=[*LOSS_NAMES, *LEARNING[1:], *FAMILY, "mixed"],
)
def test_group_gradients_equal_summed_per_sample_gradients(losses):
    """Against torch.func per-sample gradients of independently written NLLs, for the weights and
    every learned loss parameter; 'mixed' puts losses with different learned parameters in one batch."""
    cells = [Cell(loss, s) for loss in losses for s in (0, 1)]
    stacked = stacked_cells(cells)
    x, group = make_batch(len(cells))
    n_groups, b = 3, x.shape[1]
    got = group_gradients(stacked, x, group, n_groups)
    for c, cell in enumerate(cells):
        module = stacked.module(c)
        params = {k: v.detach() for k, v in module.named_parameters()}
        logs = {n: stacked.loss_params[c, k].detach() for k, n in enumerate(stacked.loss_param_names)}
        with torch.no_grad():
            batch_mse = (module(x[c]) - x[c]).pow(2).mean()

        def one(p, lp, xi):
            x_hat = functional_call(module, p, (xi[None],))[0]
            return independent_nll(cell.loss, (x_hat - xi).flatten(), lp, batch_mse)

        per_sample_p, per_sample_lp = vmap(grad(one, argnums=(0, 1)), in_dims=(None, None, 0))(params, logs, x[c])
        for g in range(n_groups):
            member = (group[c] == g).float()
            for name, per_sample in per_sample_p.items():
                want = torch.einsum("b,b...->...", member, per_sample) / b
                torch.testing.assert_close(got.params[name][c, g], want, rtol=1e-4, atol=1e-6)
            for k, name in enumerate(stacked.loss_param_names):
                want_lp = (member * per_sample_lp[name]).sum() / b  # 0 for a parameter the cell's loss does not use
                torch.testing.assert_close(got.loss_params[c, g, k], want_lp, rtol=1e-4, atol=1e-6)
            assert got.count[c, g] == member.sum()
        used = [stacked.loss_param_names.index(p.name) for p in get_loss(cell.loss).params]
        assert torch.all(got.loss_params[c][:, used] != 0)  # learned parameters really are measured
        assert torch.all(got.loss_params[c][:, [k for k in range(len(stacked.loss_param_names)) if k not in used]] == 0)


def test_shares_sum_to_one_and_projection_matches_flat_gradients():
    cells = [Cell(loss, s) for loss in LOSS_NAMES + LEARNING[1:] for s in range(2)]
    stacked = stacked_cells(cells)
    x, group = make_batch(len(cells))
    got = group_gradients(stacked, x, group, 3)
    shares = got.shares()  # (4, C, G)
    torch.testing.assert_close(shares.sum(2), torch.ones(4, len(cells)))
    # projection and norm shares from plainly flattened gradient vectors
    flat = torch.cat([g.flatten(2) for g in got.params.values()] + [got.loss_params], dim=2)  # (C, G, P)
    total = flat.sum(1)
    for c in range(len(cells)):
        proj = flat[c] @ total[c] / total[c].dot(total[c])
        norms = flat[c].norm(dim=1)
        torch.testing.assert_close(shares[SHARES.index("projection_share"), c], proj, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(shares[SHARES.index("norm_share"), c], norms / norms.sum(), rtol=1e-4, atol=1e-6)
    counts = torch.stack([(group == g).sum(1) for g in range(3)], dim=1).float()
    torch.testing.assert_close(shares[SHARES.index("sample_share")], counts / group.shape[1])


def test_output_shares_closed_forms():
    cells = [Cell(loss, 0) for loss in LOSS_NAMES]
    stacked = stacked_cells(cells, log_scale=0.7)
    with torch.no_grad():  # the last layer outputs exactly 0, so residual pixels are exactly 0 where x is
        for name in ("decoder.2.weight", "decoder.2.bias"):
            stacked.params[name].zero_()
    x, group = make_batch(1)
    x, group = x.expand(len(cells), *x.shape[1:]), group.expand(len(cells), -1)  # one batch for every cell
    with torch.no_grad():
        x_hat = stacked.forward(x)
    assert torch.all(x_hat == 0)
    output = group_gradients(stacked, x, group, 3).shares()[SHARES.index("output_share")].T  # (G, C)
    residual = (x_hat - x).flatten(2)
    members = torch.stack([group == g for g in range(3)]).float()  # (G, C, B)
    sse = (members * residual.pow(2).sum(-1)).sum(-1)
    nonzero = (members * (residual != 0).sum(-1)).sum(-1)
    col = {loss: i for i, loss in enumerate(LOSS_NAMES)}
    torch.testing.assert_close(output[:, col["l2"]], sse[:, col["l2"]] / sse[:, col["l2"]].sum())
    torch.testing.assert_close(output[:, col["l1"]], nonzero[:, col["l1"]] / nonzero[:, col["l1"]].sum())
    assert not torch.allclose(output[:, col["l1"]], output[:, col["l2"]])  # the two closed forms differ here
    for loss in ("log-mse", "learned-sigma"):  # a sigma shared by the batch rescales every residual alike
        torch.testing.assert_close(output[:, col[loss]], output[:, col["l2"]])


def test_output_shares_of_shared_sigma_losses_match_l2_on_a_trained_model():
    cells = [Cell(loss, 0) for loss in ("l2", "log-mse", "learned-sigma")]
    stacked = stacked_cells(cells, log_scale=-2.0)
    x, group = make_batch(len(cells), seed=3)
    output = group_gradients(stacked, x, group, 3).shares()[SHARES.index("output_share")].T  # (G, C)
    x_hat = stacked.forward(x).detach()
    members = torch.stack([group == g for g in range(3)]).float()
    sse = (members * (x_hat - x).flatten(2).pow(2).sum(-1)).sum(-1)  # (G, C), each cell on its own batch
    for c in range(3):
        torch.testing.assert_close(output[:, c], sse[:, c] / sse[:, c].sum())


def test_recorder_leaves_training_unchanged():
    gen = torch.Generator().manual_seed(1)
    x = torch.rand((90,) + SHAPE, generator=gen)
    group = torch.randint(0, 2, (90,), generator=gen)
    cells = [Cell(loss, s) for loss in LOSS_NAMES + ("student-t",) for s in range(2)]
    config = TrainConfig.from_spec(AuditSpec(latent=4, hidden=16, epochs=3, batch_size=32, grad_points=5))
    plain = train_cells(x, group, cells, config)
    recorder = GradShareRecorder(["a", "b"])
    recorded = train_cells(x, group, cells, config, on_snapshot=recorder)
    for name, value in plain.stacked.params.items():
        assert torch.equal(value, recorded.stacked.params[name]), name
    assert torch.equal(plain.stacked.loss_params, recorded.stacked.loss_params)
    pd.testing.assert_frame_equal(plain.history, recorded.history)
    frame = recorder.frame()
    n = snapshot_count(5, 3 * 3)  # 90 images in batches of 32: 3 steps per epoch
    assert len(frame) == n * len(cells) * 2
    assert frame["step"].nunique() == n and set(frame["group"]) == {"a", "b"}
    sums = frame.groupby(["loss", "seed", "step"])[list(SHARES)].sum()
    assert (sums - 1).abs().to_numpy().max() < 1e-4


@pytest.mark.slow
def test_audit_records_saves_and_summarises_grad_shares(tmp_path):
    result = run_audit(dataset="digits", limit=300, test_limit=100, grad_points=4, out=str(tmp_path), **FAST)
    frame = result.grad_shares
    assert list(frame.columns) == ["loss", "seed", "step", "epoch", "group", *SHARES, "kl_weight"]
    assert frame["kl_weight"].isna().all()  # autoencoders have no KL term
    steps = FAST["epochs"] * -(-300 // FAST["batch_size"])  # 300 training images
    assert len(frame) == snapshot_count(4, steps) * len(result.spec.losses) * FAST["seeds"] * 2
    loaded = AuditResult.load(tmp_path)
    pd.testing.assert_frame_equal(loaded.grad_shares, frame, check_dtype=False)
    summary = pd.DataFrame(json.loads((tmp_path / "summary.json").read_text())["grad_shares"])
    want = frame.groupby(["loss", "group"], sort=False)["projection_share"].mean()
    got = summary.set_index(["loss", "group"])["projection_share"]
    pd.testing.assert_series_equal(got, want, check_names=False)
    ratio = (
        (frame["projection_share"] / frame["sample_share"]).groupby([frame["loss"], frame["group"]], sort=False).mean()
    )
    pd.testing.assert_series_equal(summary.set_index(["loss", "group"])["projection_ratio"], ratio, check_names=False)
    off = run_audit(dataset="digits", limit=300, test_limit=100, grad_points=0, **FAST)
    assert off.grad_shares is None and "grad_shares" not in outputs.summary_json(off, analyse(off))


def test_snapshots_are_spaced_so_that_they_cost_little():
    """At most one snapshot per SNAPSHOT_SPACING steps, at least two, never more than asked."""
    assert SNAPSHOT_SPACING == 20
    assert [snapshot_count(20, steps) for steps in (600, 400, 200, 10)] == [20, 20, 10, 2]
    assert snapshot_count(0, 600) == 0 and snapshot_count(1, 600) == 1


@pytest.mark.parametrize("loss", ["gaussian-pixel", "laplace-pixel", "gaussian-pixel:0.5"])
def test_group_gradients_of_per_pixel_losses_equal_summed_per_sample_gradients(loss):
    """A decoder with a per-pixel log-scale head: group gradients still sum per-sample torch.func gradients
    of an independently written NLL (soft floor log f + softplus(raw - log f); beta-NLL's weight detached).
    The head starts at zero; it is set to random values so its gradient and the scale's path are exercised."""
    cells = [Cell(loss, s) for s in (0, 1)]
    stacked = stacked_cells(cells)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(4)
        for name in ("scale_head.weight", "scale_head.bias"):
            stacked.params[name].copy_(0.3 * torch.randn(stacked.params[name].shape, generator=gen) - 1.0)
    x, group = make_batch(len(cells))
    n_groups, b = 3, x.shape[1]
    got = group_gradients(stacked, x, group, n_groups)
    log_floor, beta = math.log(CONFIG.sigma_floor), float(loss.partition(":")[2] or 0.0)
    for c in range(len(cells)):
        module = stacked.module(c)
        params = {k: v.detach() for k, v in module.named_parameters()}

        def one(p, xi):
            out = functional_call(module, p, (xi[None],))[0]
            r, log_s = (out[:1] - xi).flatten(), log_floor + torch.nn.functional.softplus(out[1:].flatten() - log_floor)
            if loss == "laplace-pixel":
                return (r.abs() / log_s.exp() + log_s).sum()
            return ((2 * beta * log_s).detach().exp() * (0.5 * r.pow(2) / (2 * log_s).exp() + log_s)).sum()

        per_sample = vmap(grad(one), in_dims=(None, 0))(params, x[c])
        for g in range(n_groups):
            member = (group[c] == g).float()
            for name, ps in per_sample.items():
                want = torch.einsum("b,b...->...", member, ps) / b
                # float32 sums over the batch in two orders (one batched backward vs per-sample gradients summed):
                # at 2 threads one of 576 elements differed by 2e-5 on a value of 0.1
                torch.testing.assert_close(got.params[name][c, g], want, rtol=1e-3, atol=1e-5)
        assert got.params["scale_head.weight"][c].abs().max() > 1e-3  # the head's gradient is really measured

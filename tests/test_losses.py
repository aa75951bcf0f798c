"""Losses against independent computations: scipy.stats densities, normalisers by numerical
integration (scipy quad) and in closed form (Bessel, Barron's Meijer-G formula via mpmath),
maximum-likelihood scales, autograd gradchecks; and loss names (families, canonical spelling,
checkpoint file names). r = x_hat - x, M pixels, each NLL summed over pixels.

Tolerances: unless a comment says otherwise, comparisons run in float64 at torch's default
float64 tolerance (rtol 1e-7): the implementations and the references are both closed forms, so
they agree to rounding (~1e-15) and any mistake (a missing normaliser term, a wrong power)
is off by far more than 1e-7.
"""

import json
import math

import mpmath
import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate, optimize, special, stats

from fairrecon.audit import run_audit
from fairrecon.cli import main
from fairrecon.errors import UserError
from fairrecon.grid import Cell
from fairrecon.losses import (
    FAMILIES,
    LOSSES,
    Loss,
    barron_log_normaliser,
    get_loss,
    huber_log_normaliser,
    l1_nll,
    mix_log_normaliser,
    pixel_log_scale,
    register,
)
from fairrecon.resume import cell_name
from fairrecon.spec import AuditSpec, canonical_number, parse_losses

M = 50
FLOOR = 1e-3

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny tensors, one intra-op thread


@pytest.fixture(autouse=True)
def float64():
    """Closed forms are compared at float64 precision; restore the default afterwards."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture
def pair():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, M, generator=g)
    x_hat = (x + 0.2 * torch.randn(4, M, generator=g)).requires_grad_()
    return x, x_hat


def raw_params(name, **logs):
    """A loss's stored log parameters: the given ones, 0 for the rest (as at the start of training)."""
    return {p.name: torch.tensor(float(logs.get(p.name, 0.0))) for p in get_loss(name).params}


def nll_and_grad(name, x, x_hat, raw=None, floor=FLOOR):
    nll = get_loss(name).per_sample(x, x_hat, raw_params(name) if raw is None else raw, floor)
    (g,) = torch.autograd.grad(nll.sum(), x_hat)
    return nll, g


# ---- the fixed losses (unchanged behaviour) ----


def test_l1_is_laplace_nll_with_sign_gradient(pair):
    x, x_hat = pair
    nll, g = nll_and_grad("l1", x, x_hat)
    r = (x_hat - x).detach()
    torch.testing.assert_close(nll.detach(), r.abs().sum(1) + M * math.log(2.0))
    torch.testing.assert_close(g, torch.sign(r))


def test_l2_is_gaussian_nll_with_residual_gradient(pair):
    x, x_hat = pair
    nll, g = nll_and_grad("l2", x, x_hat)
    r = (x_hat - x).detach()
    torch.testing.assert_close(nll.detach(), 0.5 * r.pow(2).sum(1) + 0.5 * M * math.log(2 * math.pi))
    torch.testing.assert_close(g, r)


def test_log_mse_single_sample_gradient_is_m_r_over_norm_squared(pair):
    x, x_hat = pair
    x, x_hat = x[:1], x_hat[:1].detach().requires_grad_()
    nll, g = nll_and_grad("log-mse", x, x_hat)
    r = (x_hat - x).detach()
    torch.testing.assert_close(g, M * r / r.pow(2).sum())


def test_log_mse_batch_gradient_equals_log_of_mse_objective(pair):
    """Detaching the shared MSE inside each term gives the exact gradient of (B*M/2) log MSE (envelope theorem)."""
    x, x_hat = pair
    nll, g = nll_and_grad("log-mse", x, x_hat)
    x_hat2 = x_hat.detach().clone().requires_grad_()
    objective = 0.5 * x.numel() * torch.log((x_hat2 - x).pow(2).mean())
    (g_ref,) = torch.autograd.grad(objective, x_hat2)
    torch.testing.assert_close(g, g_ref)
    mse = (x_hat - x).pow(2).mean().item()  # value: Gaussian NLL at sigma^2 = MSE
    torch.testing.assert_close(nll.sum().detach(), torch.tensor(0.5 * x.numel() * (1 + math.log(2 * math.pi * mse))))


def test_learned_sigma_gradient_is_residual_over_sigma_squared(pair):
    x, x_hat = pair
    _, g = nll_and_grad("learned-sigma", x, x_hat, raw_params("learned-sigma", sigma=-1.3))
    torch.testing.assert_close(g, (x_hat - x).detach() / math.exp(2 * -1.3))


def test_leading_cell_dimensions_are_independent(pair):
    """Losses accept (cells, B, M); each cell's values equal computing it alone (log-mse: its own MSE)."""
    x, x_hat = pair
    x_hat = x_hat.detach()
    stacked = get_loss("log-mse").per_sample(torch.stack([x, x]), torch.stack([x_hat, x]), {}, FLOOR)
    torch.testing.assert_close(stacked[0], get_loss("log-mse").per_sample(x, x_hat, {}, FLOOR))
    logs = torch.tensor([-1.0, 0.5])[:, None, None]  # (cells, 1, 1), as stacked.StackedCells passes them
    both = get_loss("student-t").per_sample(
        torch.stack([x, x]), torch.stack([x_hat, x_hat]), {"scale": logs, "dof": logs}, FLOOR
    )
    for c in range(2):
        alone = get_loss("student-t").per_sample(x, x_hat, {"scale": logs[c], "dof": logs[c]}, FLOOR)
        torch.testing.assert_close(both[c], alone)


# ---- every likelihood against an independent density ----


def barron1_logpdf(x, loc, c):
    """Charbonnier / pseudo-Huber density exp(-(sqrt(1 + z^2) - 1)) / (c Z), Z = 2 e K1(1) (a Bessel integral)."""
    z = (x - loc) / c
    return -(np.sqrt(1 + z**2) - 1) - np.log(c * 2 * np.e * special.k1(1.0))


# name, stored log parameters, reference log density f(x, loc)
DENSITIES = [
    ("l1", {}, lambda x, m: stats.laplace.logpdf(x, m, 1.0)),
    ("l2", {}, lambda x, m: stats.norm.logpdf(x, m, 1.0)),
    ("learned-sigma", {"sigma": -1.2}, lambda x, m: stats.norm.logpdf(x, m, math.exp(-1.2))),
    ("laplace-learned", {"scale": -2.0}, lambda x, m: stats.laplace.logpdf(x, m, math.exp(-2.0))),
    ("student-t", {"scale": -1.5, "dof": 0.9}, lambda x, m: stats.t.logpdf(x, math.exp(0.9), m, math.exp(-1.5))),
    ("student-t", {"scale": 0.3, "dof": 9.0}, lambda x, m: stats.t.logpdf(x, math.exp(9.0), m, math.exp(0.3))),
    ("barron:2", {"scale": -1.1}, lambda x, m: stats.norm.logpdf(x, m, math.exp(-1.1))),
    # Barron's alpha = 0 is exp(-log(1 + z^2 / 2)): scipy's Cauchy with scale sqrt(2) c
    ("barron:0", {"scale": -1.1}, lambda x, m: stats.cauchy.logpdf(x, m, math.sqrt(2) * math.exp(-1.1))),
    ("barron:1", {"scale": -0.4}, lambda x, m: barron1_logpdf(x, m, math.exp(-0.4))),
    ("mix:1", {}, lambda x, m: stats.laplace.logpdf(x, m, 1.0)),
    ("mix:0", {}, lambda x, m: stats.norm.logpdf(x, m, 1.0)),
]


@pytest.mark.parametrize("name, logs, logpdf", DENSITIES, ids=[f"{d[0]}{list(d[1].values())}" for d in DENSITIES])
def test_nll_equals_an_independent_density(pair, name, logs, logpdf):
    x, x_hat = pair
    nll = get_loss(name).per_sample(x, x_hat.detach(), raw_params(name, **logs), FLOOR)
    want = -logpdf(x.numpy(), x_hat.detach().numpy()).sum(1)
    torch.testing.assert_close(nll, torch.from_numpy(want))


# stored log parameters for the normalisation check: scales well above the floor, a heavy and a light t
NORMALISED = [
    ("l1", {}),
    ("l2", {}),
    ("learned-sigma", {"sigma": -1.0}),
    ("laplace-learned", {"scale": -1.5}),
    ("student-t", {"scale": -1.0, "dof": -0.5}),
    ("student-t", {"scale": -1.0, "dof": 3.0}),
    *[(f"mix:{a}", {}) for a in ("0", "0.25", "0.5", "0.999", "1")],
    *[(f"huber:{d}", {}) for d in ("0.05", "0.5", "1", "3")],
    *[(f"barron:{a}", {"scale": -0.7}) for a in ("0", "0.01", "0.5", "1", "1.5", "1.99", "2")],
]


@pytest.mark.parametrize("name, logs", NORMALISED, ids=[f"{n}{list(p.values())}" for n, p in NORMALISED])
def test_every_nll_is_a_normalised_density(name, logs):
    """exp(-NLL) of one pixel integrates to 1 over x (scipy quad): the normaliser is right, whatever the parameters.

    Tolerance 1e-7: quad's own error estimate is below 1e-9 here, also for the Cauchy-like
    tails (barron:0, student-t with dof 0.6); a normaliser off by any term is off by far more.
    """
    loss, raw, loc = get_loss(name), raw_params(name, **logs), 0.3

    def density(x):
        return math.exp(-loss.per_sample(torch.tensor([[x]]), torch.tensor([[loc]]), raw, FLOOR).item())

    total = sum(
        integrate.quad(density, a, b, epsabs=1e-12, epsrel=1e-11, limit=500)[0]
        for a, b in ((-math.inf, loc), (loc, math.inf))
    )
    assert total == pytest.approx(1.0, abs=1e-7)


@pytest.mark.parametrize("a", [0.0, 1e-6, 0.1, 0.5, 0.9, 0.999999, 1.0])
def test_mix_normaliser_closed_form_matches_quad(a):
    """Z(a) = 2 sqrt(pi / 2b) erfcx(a / sqrt 2b), b = 1 - a, against direct integration; log 2 at a = 1, log sqrt(2 pi) at 0.

    Tolerance 1e-10: quad's error estimate on these smooth integrands is ~1e-13.
    """
    z, _ = integrate.quad(lambda r: math.exp(-(a * r + (1 - a) * r * r / 2)), 0, math.inf, epsabs=0, epsrel=1e-13)
    assert mix_log_normaliser(a) == pytest.approx(math.log(2 * z), abs=1e-10)
    assert mix_log_normaliser(1.0) == math.log(2.0) and mix_log_normaliser(0.0) == pytest.approx(
        0.5 * math.log(2 * math.pi)
    )


@pytest.mark.parametrize("delta", [1e-3, 0.05, 0.5, 1.0, 3.0, 40.0])
def test_huber_normaliser_closed_form_matches_quad(delta):
    """Z(delta) = 2 (sqrt(pi/2) erf(delta / sqrt 2) + exp(-delta^2 / 2) / delta), against integrating
    torch's huber_loss itself; tolerance 1e-10 (quad's estimate ~1e-13, split at the kink)."""

    def f(r):
        return math.exp(-torch.nn.functional.huber_loss(torch.tensor(r), torch.tensor(0.0), delta=delta).item())

    z = sum(integrate.quad(f, a, b, epsabs=0, epsrel=1e-13, limit=200)[0] for a, b in ((0, delta), (delta, math.inf)))
    assert huber_log_normaliser(delta) == pytest.approx(math.log(2 * z), abs=1e-10)


def barron_z_meijer_g(numer: int, denom: int) -> float:
    """Barron (2019), after eq. 18: Z(alpha) for rational alpha = numer / denom as a Meijer G-function."""
    a_p = [i / numer for i in range(1, numer)]
    b_q = [(i - 0.5) / numer for i in range(numer)] + [i / (2 * denom) for i in range(1, 2 * denom)]
    z = (1 / numer - 1 / (2 * denom)) ** (2 * denom)
    mult = math.exp(abs(2 * denom / numer - 1)) * math.sqrt(abs(2 * denom / numer - 1)) * (2 * math.pi) ** (1 - denom)
    return mult * float(mpmath.meijerg([[], a_p], [b_q, []], z))


@pytest.mark.parametrize("numer, denom", [(1, 2), (1, 1), (3, 2), (1, 4), (7, 4)])
def test_barron_normaliser_matches_the_analytical_partition_function(numer, denom):
    """log Z(alpha) from quad against Barron's Meijer-G closed form (mpmath); tolerance 1e-8: mpmath's
    value is good to ~1e-9 (Barron's note), quad to ~1e-12."""
    assert barron_log_normaliser(numer / denom) == pytest.approx(math.log(barron_z_meijer_g(numer, denom)), abs=1e-8)
    assert barron_log_normaliser(1.0) == pytest.approx(math.log(2 * math.e * special.k1(1.0)), abs=1e-10)  # Bessel form


# ---- gradients ----


def test_mix_endpoints_are_l1_and_l2_exactly(pair):
    """mix:1 is l1 and mix:0 is l2: the same values and gradients, bit for bit."""
    for dtype in (torch.float64, torch.float32):  # float32: the training precision
        x, x_hat = (t.detach().to(dtype) for t in pair)
        for member, plain in (("mix:1", "l1"), ("mix:0", "l2")):
            got, got_g = nll_and_grad(member, x, x_hat.clone().requires_grad_())
            want, want_g = nll_and_grad(plain, x, x_hat.clone().requires_grad_())
            assert torch.equal(got, want) and torch.equal(got_g, want_g), (member, dtype)


def closed_form_gradient(name, r, logs):
    """dNLL/dx_hat per pixel, written from each likelihood."""
    if name.startswith("mix:"):
        a = float(name[4:])
        return a * torch.sign(r) + (1 - a) * r
    if name.startswith("huber:"):
        d = float(name[6:])
        return r.clamp(-d, d)
    if name.startswith("barron:"):
        alpha, c = float(name[7:]), math.exp(logs["scale"])
        if alpha == 0:
            return r / (c**2 + r**2 / 2)
        if alpha == 2:
            return r / c**2
        return r / c**2 * ((r / c) ** 2 / abs(alpha - 2) + 1) ** (alpha / 2 - 1)
    if name == "laplace-learned":
        return torch.sign(r) / math.exp(logs["scale"])
    if name == "student-t":
        nu, s = math.exp(logs["dof"]), math.exp(logs["scale"])
        return (nu + 1) * r / (nu * s**2 + r**2)
    raise KeyError(name)


GRADIENTS = [
    ("mix:0.3", {}),
    ("mix:0.9", {}),
    ("huber:0.1", {}),
    ("huber:2", {}),
    ("laplace-learned", {"scale": -1.0}),
    ("student-t", {"scale": -1.7, "dof": 1.1}),
    *[(f"barron:{a}", {"scale": -1.6}) for a in (0, 0.5, 1, 1.5, 2)],
]


@pytest.mark.parametrize("name, logs", GRADIENTS, ids=[g[0] for g in GRADIENTS])
def test_gradient_wrt_reconstruction_matches_closed_form(pair, name, logs):
    x, x_hat = pair
    _, g = nll_and_grad(name, x, x_hat, raw_params(name, **logs))
    torch.testing.assert_close(g, closed_form_gradient(name, (x_hat - x).detach(), logs))


GRADCHECKED = [
    "learned-sigma",
    "laplace-learned",
    "student-t",
    "mix:0.4",
    "huber:0.1",
    "barron:0",
    "barron:0.5",
    "barron:1",
    "barron:1.99",
    "barron:2",
]


@pytest.mark.parametrize("name", GRADCHECKED)
def test_gradients_pass_gradcheck(pair, name):
    """torch.autograd.gradcheck (float64 finite differences) w.r.t. the reconstruction and every learned parameter."""
    x, x_hat = pair
    loss = get_loss(name)
    names = [p.name for p in loss.params]
    start = [torch.tensor(v, requires_grad=True) for v in (-1.2, 0.8)[: len(names)]]  # log scale, log dof

    def f(x_hat, *raw):
        return loss.per_sample(x, x_hat, dict(zip(names, raw)), FLOOR)

    assert torch.autograd.gradcheck(f, (x_hat.detach().requires_grad_(), *start))


# ---- learned parameters ----


def fit(name, r, floor=1e-6, **start):
    """Minimise the total NLL of fixed residuals r over the loss's log parameters with LBFGS."""
    loss = get_loss(name)
    raw = {p.name: torch.tensor(float(start.get(p.name, 0.0)), requires_grad=True) for p in loss.params}
    opt = torch.optim.LBFGS(
        list(raw.values()),
        lr=1,
        max_iter=500,
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        total = loss.per_sample(torch.zeros_like(r), r, raw, floor).sum()
        total.backward()
        return total

    opt.step(closure)
    return {k: math.exp(v.item()) for k, v in raw.items()}


@pytest.fixture
def residuals():
    g = torch.Generator().manual_seed(3)
    return 0.1 * torch.randn(8, 40, generator=g) * torch.rand(8, 40, generator=g).pow(2) * 3  # heavy-ish tails


def test_optimal_scales_are_the_closed_form_mles(residuals):
    """b* = mean |r| (Laplace), sigma*^2 = c*^2 = mean r^2 (Gaussian: learned-sigma and barron:2).
    Tolerance rel 1e-6: LBFGS on a smooth 1-d problem converges to ~1e-9."""
    r = residuals
    assert fit("laplace-learned", r)["scale"] == pytest.approx(r.abs().mean().item(), rel=1e-6)
    assert fit("learned-sigma", r)["sigma"] ** 2 == pytest.approx(r.pow(2).mean().item(), rel=1e-6)
    assert fit("barron:2", r)["scale"] ** 2 == pytest.approx(r.pow(2).mean().item(), rel=1e-6)


def test_cauchy_scale_solves_the_likelihood_equation(residuals):
    """barron:0 is a Cauchy with scale gamma = sqrt(2) c, whose MLE (location known) solves
    sum r^2 / (r^2 + gamma^2) = n / 2 (brentq); tolerance rel 1e-6 as above."""
    r = residuals.flatten().numpy()
    gamma = optimize.brentq(lambda g: np.sum(r**2 / (r**2 + g**2)) - len(r) / 2, 1e-8, 10, xtol=1e-15)
    assert math.sqrt(2) * fit("barron:0", residuals)["scale"] == pytest.approx(gamma, rel=1e-6)


def test_student_t_fit_matches_maximising_scipys_density(residuals):
    """Both learned parameters of student-t: LBFGS on our NLL against Nelder-Mead on scipy.stats.t.logpdf.
    Tolerance rel 1e-4: Nelder-Mead stops at xatol 1e-9 in log space, but the likelihood is flat
    along dof (the optimum is determined to ~1e-6 relative by 320 residuals)."""
    r = residuals.flatten().numpy()

    def scipy_nll(logs):
        return -stats.t.logpdf(r, math.exp(logs[1]), 0.0, math.exp(logs[0])).sum()

    ref = optimize.minimize(
        scipy_nll, [-2.0, 1.0], method="Nelder-Mead", options={"xatol": 1e-10, "fatol": 1e-13, "maxiter": 20000}
    )
    got = fit("student-t", residuals)
    assert got["scale"] == pytest.approx(math.exp(ref.x[0]), rel=1e-4)
    assert got["dof"] == pytest.approx(math.exp(ref.x[1]), rel=1e-4)
    assert 0.5 < got["dof"] < 20  # heavy tails: a genuinely interior optimum, not the Gaussian limit


@pytest.mark.parametrize("name", ["learned-sigma", "laplace-learned", "student-t", "barron:1"])
def test_scale_floor_stops_the_nll_and_its_gradient(pair, name):
    x, x_hat = pair
    floor, loss = 0.05, get_loss(name)
    key = next(p.name for p in loss.params if p.scale)
    below = raw_params(name, **{key: math.log(floor) - 3.0})
    below[key].requires_grad_()
    at = raw_params(name, **{key: math.log(floor)})
    nll_below = loss.per_sample(x, x_hat.detach(), below, floor)
    torch.testing.assert_close(nll_below, loss.per_sample(x, x_hat.detach(), at, floor))
    (g,) = torch.autograd.grad(nll_below.sum(), below[key])
    assert g.item() == 0.0
    assert [p.name for p in loss.params if not p.scale] == (["dof"] if name == "student-t" else [])  # dof: no floor


# ---- names: families, canonical spelling, errors, registry, file names ----


def test_families_expand_and_names_are_canonical():
    assert parse_losses("mix:0,0.25,0.5,0.75,1") == ("mix:0", "mix:0.25", "mix:0.5", "mix:0.75", "mix:1")
    assert parse_losses("l1,l2,huber:0.1,1") == ("l1", "l2", "huber:0.1", "huber:1")
    assert parse_losses(" mix:.50 , 1. ,barron:2,student-t") == ("mix:0.5", "mix:1", "barron:2", "student-t")
    assert parse_losses(["huber:1e-3", 2.0, "-0.0"]) == ("huber:0.001", "huber:2", "huber:0")  # a TOML list
    assert [canonical_number(v) for v in (0.5, 1.0, 1e16, 1e-5, -0.0, 0.1 + 0.2)] == [
        "0.5",
        "1",
        "1e16",
        "1e-05",
        "0",
        "0.30000000000000004",
    ]  # shortest round-trip repr: no two values merge
    spec = AuditSpec(losses="mix:0,.5,1")
    assert spec.losses == ("mix:0", "mix:0.5", "mix:1") and AuditSpec.from_dict(spec.to_dict()) == spec  # stable
    with pytest.raises(UserError, match=r"\['mix:0.5', 'mix:0.5'\] has duplicates"):
        AuditSpec(losses="mix:.5,0.50")
    for text in ("0.5,l1", "l1,0.5"):
        with pytest.raises(UserError, match="'0.5' has no family to extend; write NAME:VALUE first"):
            parse_losses(text)


@given(st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=1, max_size=5))
@settings(max_examples=50, deadline=None)
def test_canonical_names_read_back_to_the_same_values(values):
    names = parse_losses(["mix:" + repr(values[0]), *map(repr, values[1:])])
    assert [float(n.split(":")[1]) for n in names] == [v + 0.0 for v in values]
    assert parse_losses(names) == names  # idempotent


@pytest.mark.parametrize(
    "name, message",
    [
        ("mix:1.5", r"^loss 'mix:1.5': a must be a number in \[0, 1\], got '1.5'$"),
        ("huber:0", r"^loss 'huber:0': delta must be a number in \(0, inf\), got '0'$"),
        ("barron:2.5", r"^loss 'barron:2.5': alpha must be a number in \[0, 2\], got '2.5'$"),
        ("barron:x", r"alpha must be a number in \[0, 2\], got 'x'"),
        ("huber", r"^loss 'huber' is a family, not one loss: name a member as huber:DELTA with delta in \(0, inf\)"),
        ("barron", r"^loss 'barron' is a family, not one loss: .* barron:ALPHA with alpha in \[0, 2\], e.g. barron:1$"),
        ("gauss:1", r"^unknown loss 'gauss:1'; allowed: .*mix:A with a in \[0, 1\]"),
    ],
)
def test_bad_loss_names_are_one_line_errors_naming_the_range(name, message):
    with pytest.raises(UserError, match=message) as e:
        get_loss(name)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=message):  # and before an audit does any work
        run_audit(losses=name, dataset="folder", data_root="/nonexistent")


def test_registry_resolves_family_members_and_accepts_new_losses():
    assert "mix:0.5" in LOSSES and LOSSES["mix:0.5"] is get_loss("mix:0.5")
    assert LOSSES["mix:.5"].name == "mix:0.5"  # any spelling finds the canonical member
    assert "mix:2" not in LOSSES and LOSSES.get("mix:2") is None and "huber" not in LOSSES
    assert set(FAMILIES) == {"mix", "huber", "barron", "gaussian-pixel"} and "mix:0.5" not in list(
        LOSSES
    )  # listing: plain losses
    descriptions = [LOSSES[n].likelihood for n in ("mix:0.5", "huber:0.1", "barron:1", *LOSSES)]
    descriptions += [f.likelihood for f in FAMILIES.values()]
    assert not any("|" in d or "\n" in d for d in descriptions)  # one line each, safe in a markdown table cell
    with pytest.raises(UserError, match="unknown loss 'l3'.*l1, l2"):
        get_loss("l3")
    custom = register(Loss("l1-copy", l1_nll, "Laplace NLL, b = 1"))
    try:
        assert get_loss("l1-copy") is custom
    finally:
        LOSSES.pop("l1-copy")
    for bad in ("L1", "l1_copy", "l1:copy", ""):
        with pytest.raises(UserError, match="lowercase letters, digits"):
            register(Loss(bad, l1_nll, "x"))


def decode_cell_name(name: str) -> tuple[str, int]:
    """The inverse of resume.cell_name, written from its docstring: its existence proves that no two cells share a file."""
    stem, _, seed = name.rpartition("-seed")
    out, i = bytearray(), 0
    while i < len(stem):
        if stem[i] == "+":
            out.append(int(stem[i + 1 : i + 3], 16))
            i += 3
        else:
            out += b":" if stem[i] == "_" else stem[i].encode()
            i += 1
    return out.decode(), int(seed)


@pytest.mark.slow
@given(st.text(max_size=12), st.integers(0, 10**6))
@settings(max_examples=300, deadline=None)
def test_checkpoint_names_decode_back_to_their_cell(loss, seed):
    """Any loss name (any unicode) and seed read back from the file name, so no two cells share one; no capitals,
    so a case-insensitive file system cannot merge two either; only characters safe in file names and globs."""
    name = cell_name(Cell(loss, seed))
    assert decode_cell_name(name) == (loss, seed)
    assert set(name) <= set("abcdefghijklmnopqrstuvwxyz0123456789.-_+")


def test_checkpoint_names_of_loss_families():
    names = parse_losses(
        "l1,l2,log-mse,learned-sigma,student-t,laplace-learned,mix:0,0.25,0.5,1,huber:0.1,1,barron:0,1e-05,2"
    )
    files = [cell_name(Cell(n, s)) for n in names for s in range(12)]
    assert len(set(files)) == len(files)
    assert (
        cell_name(Cell("mix:0.5", 2)) == "mix_0.5-seed2"
        and cell_name(Cell("learned-sigma", 0)) == "learned-sigma-seed0"
    )
    assert cell_name(Cell("mix_0.5", 2)) == "mix+5f0.5-seed2"  # an underscore cannot pose as the colon


@pytest.mark.slow
def test_family_audit_end_to_end(tmp_path):
    """`--losses l1,l2,mix:0,1,student-t` through the CLI: the family expands, mix:1 and mix:0 train exactly as l1 and l2
    (same seed, identical losses and gradients: bit-identical errors), checkpoints are written under
    the canonical names, and a second run resumes every cell from them."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)  # an audit in its own precision
    try:
        args = [
            "audit",
            "--dataset",
            "digits",
            "--limit",
            "256",
            "--test-limit",
            "64",
            "--losses",
            "l1,l2,mix:0,1,student-t",
            "--seeds",
            "1",
            "--epochs",
            "2",
            "--latent",
            "4",
            "--hidden",
            "32",
            "--device",
            "cpu",
            "--out",
            str(tmp_path),
            "--quiet",
        ]
        with pytest.raises(SystemExit) as exit_:
            main(args)
        assert exit_.value.code == 0
        summary = json.loads((tmp_path / "summary.json").read_text())
        assert summary["spec"]["losses"] == ["l1", "l2", "mix:0", "mix:1", "student-t"]
        cells = {c["loss"]: c for c in summary["cells"]}  # learned values in the cells table; NaN (null) where none
        assert list(summary["cells"][0])[:9] == [
            "loss",
            "seed",
            "status",
            "sigma",
            "sigma_squared",
            "scale",
            "dof",
            "train_mse",
            "train_nll",
        ]  # then the convergence columns (dynamics)
        assert cells["student-t"]["scale"] > 0 and cells["student-t"]["dof"] > 0 and cells["student-t"]["sigma"] is None
        assert all(cells[n]["scale"] is None and cells[n]["dof"] is None for n in ("l1", "l2", "mix:0", "mix:1"))
        assert sorted(p.name for p in (tmp_path / "cells").glob("mix*.json")) == [
            "mix_0-seed0.json",
            "mix_1-seed0.json",
        ]
        result = run_audit(AuditSpec.from_dict(summary["spec"]), save=False)  # the same spec, into the same folder
        errors = {loss: part["mse"].to_numpy() for loss, part in result.samples.groupby("loss", observed=True)}
        assert np.array_equal(errors["mix:1"], errors["l1"]) and np.array_equal(errors["mix:0"], errors["l2"])
        assert not np.array_equal(errors["l1"], errors["l2"])
        assert result.info["resumed_cells"] == 5  # every cell read back from the canonical checkpoint names
    finally:
        torch.set_default_dtype(old)


# ---- per-pixel likelihoods: the decoder predicts each pixel's log-scale ----


def soft_floor_reference(raw: np.ndarray, floor: float) -> np.ndarray:
    """sigma-VAE's softclip, written independently in numpy: log(floor) + log(1 + exp(raw - log(floor)))."""
    return math.log(floor) + np.logaddexp(0.0, raw - math.log(floor))


@pytest.fixture
def raw_scale():
    """Raw per-pixel log-scales from well above the floor to well below it."""
    return torch.linspace(-9.0, 1.0, 4 * M, dtype=torch.float64).reshape(4, M)[:, torch.randperm(M)]


@pytest.mark.parametrize(
    "name, logpdf",
    [
        ("gaussian-pixel", stats.norm.logpdf),
        ("laplace-pixel", stats.laplace.logpdf),
        ("gaussian-pixel:0", stats.norm.logpdf),
    ],
)
def test_pixel_nll_equals_scipy_density_with_the_predicted_scale(pair, raw_scale, name, logpdf):
    x, x_hat = pair
    nll = get_loss(name).per_sample(x, x_hat.detach(), {}, FLOOR, raw_scale=raw_scale)
    scale = np.exp(soft_floor_reference(raw_scale.numpy(), FLOOR))
    torch.testing.assert_close(nll, torch.from_numpy(-logpdf(x.numpy(), x_hat.detach().numpy(), scale).sum(1)))


def test_pixel_scale_floor_is_soft_and_bounds_the_nll(pair):
    """Never below the floor, with a gradient everywhere; well above it the raw value passes through.
    0.5 log(2 pi) + log(floor) per pixel bounds the Gaussian NLL below, however low the raw scale."""
    x, _ = pair
    raw = torch.linspace(-40.0, 2.0, 200, requires_grad=True)
    log_s = pixel_log_scale(raw, FLOOR)
    assert torch.all(log_s > math.log(FLOOR))
    (g,) = torch.autograd.grad(log_s.sum(), raw)
    assert torch.all(g > 0)  # a soft floor: unlike the scalar scales' clamp, the gradient never vanishes exactly
    high = raw > -2.0  # 2 nats above log(floor) = -6.9: softplus(t) - t = log1p(exp(-t)) < exp(-4.9) ~ 7e-3
    torch.testing.assert_close(log_s[high], raw[high], rtol=0, atol=8e-3)
    nll = get_loss("gaussian-pixel").per_sample(x, x, {}, FLOOR, raw_scale=torch.full_like(x, -50.0))
    assert torch.all(nll >= M * (0.5 * math.log(2 * math.pi) + math.log(FLOOR)))


def test_pixel_loss_without_a_scale_head_is_refused(pair):
    x, x_hat = pair
    with pytest.raises(ValueError, match="scale_head"):
        get_loss("laplace-pixel").per_sample(x, x_hat, {}, FLOOR)


@pytest.mark.parametrize("beta", [0.0, 0.25, 0.5, 1.0])
def test_beta_nll_gradients_are_the_closed_form(pair, raw_scale, beta):
    """With w = sigma^(2 beta) held fixed: d/dmu = w (mu - x) / sigma^2 and d/d(log sigma) = w (1 - r^2 / sigma^2),
    times d(log sigma)/d(raw) = sigmoid(raw - log floor) (the soft floor's derivative)."""
    x, x_hat = pair
    raw = raw_scale.clone().requires_grad_()
    nll = get_loss(f"gaussian-pixel:{beta}").per_sample(x, x_hat, {}, FLOOR, raw_scale=raw)
    g_mu, g_raw = torch.autograd.grad(nll.sum(), [x_hat, raw])
    log_s = torch.from_numpy(soft_floor_reference(raw_scale.numpy(), FLOOR))
    sigma2, r = (2 * log_s).exp(), (x_hat - x).detach()
    w = sigma2**beta
    torch.testing.assert_close(g_mu, w * r / sigma2)
    torch.testing.assert_close(g_raw, w * (1 - r**2 / sigma2) * torch.sigmoid(raw_scale - math.log(FLOOR)))
    if beta == 1.0:  # beta = 1: the mean gets L2's gradient, whatever sigma is
        torch.testing.assert_close(g_mu, r)


def test_beta_zero_is_gaussian_pixel_exactly(pair, raw_scale):
    x, x_hat = pair
    out = []
    for name in ("gaussian-pixel", "gaussian-pixel:0"):
        raw = raw_scale.clone().requires_grad_()
        nll = get_loss(name).per_sample(x, x_hat, {}, FLOOR, raw_scale=raw)
        out.append((nll, *torch.autograd.grad(nll.sum(), [x_hat, raw])))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["gaussian-pixel", "laplace-pixel"])
def test_pixel_losses_pass_gradcheck(pair, raw_scale, name):
    """float64 finite differences w.r.t. the mean and the raw per-pixel log-scale. (beta-NLL's gradient is by
    design not the derivative of its value, its weight being detached: the closed-form test covers it.)"""
    x, x_hat = pair
    loss = get_loss(name)

    def f(x_hat, raw):
        return loss.per_sample(x, x_hat, {}, FLOOR, raw_scale=raw)

    x_hat = (x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(5)) + 0.05).requires_grad_()
    assert torch.autograd.gradcheck(f, (x_hat, raw_scale.clone().requires_grad_()))


@pytest.mark.parametrize("name", ["laplace-pixel", "gaussian-pixel"])
def test_free_pixel_scales_fit_each_residual(name):
    """A planted case: a free raw log-scale per pixel on fixed residuals, NLL minimised with LBFGS. The
    optimum is b = |r| per pixel (Laplace: log b + |r| / b) and sigma^2 = r^2 (Gaussian: log sigma +
    r^2 / 2 sigma^2). Residuals are >= 0.01, far above the floor (1e-6). Tolerance rel 1e-5: LBFGS on
    separable smooth 1-d problems converges to ~1e-8; the soft floor moves the optimum by < 1e-10."""
    g = torch.Generator().manual_seed(7)
    r = (0.01 + 0.5 * torch.rand(6, 30, generator=g)) * torch.sign(torch.randn(6, 30, generator=g))
    loss, floor = get_loss(name), 1e-6
    raw = torch.zeros_like(r, requires_grad=True)
    opt = torch.optim.LBFGS(
        [raw], lr=1, max_iter=1000, tolerance_grad=1e-14, tolerance_change=1e-16, line_search_fn="strong_wolfe"
    )

    def closure():
        opt.zero_grad()
        total = loss.per_sample(torch.zeros_like(r), r, {}, floor, raw_scale=raw).sum()
        total.backward()
        return total

    opt.step(closure)
    torch.testing.assert_close(pixel_log_scale(raw.detach(), floor).exp(), r.abs(), rtol=1e-5, atol=0)


@pytest.mark.slow
def test_pixel_audit_end_to_end(tmp_path):
    """`--losses l2,gaussian-pixel,laplace-pixel,gaussian-pixel:0.5` through the CLI: samples.csv gets each held-out
    image's mean predicted scale (`pred_scale`, NaN for l2), l2 trains exactly as it does alone (its chunk has no
    head), and a resumed run reads every cell back with the same pred_scale."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)  # an audit in its own precision
    try:
        common = [
            "--dataset",
            "digits",
            "--limit",
            "256",
            "--test-limit",
            "64",
            "--seeds",
            "1",
            "--epochs",
            "2",
            "--latent",
            "4",
            "--hidden",
            "32",
            "--device",
            "cpu",
            "--quiet",
        ]
        with pytest.raises(SystemExit) as exit_:
            main(
                [
                    "audit",
                    *common,
                    "--losses",
                    "l2,gaussian-pixel,laplace-pixel,gaussian-pixel:0.5",
                    "--out",
                    str(tmp_path / "a"),
                ]
            )
        assert exit_.value.code == 0
        samples = pd.read_csv(tmp_path / "a" / "samples.csv")
        scale = samples.groupby("loss")["pred_scale"]
        assert scale.apply(lambda s: s.isna().all())["l2"]
        for name in ("gaussian-pixel", "laplace-pixel", "gaussian-pixel:0.5"):
            assert scale.min()[name] > 1e-3 and scale.apply(lambda s: s.notna().all())[name]  # above the soft floor
        with pytest.raises(SystemExit):
            main(["audit", *common, "--losses", "l2", "--out", str(tmp_path / "b")])
        alone = pd.read_csv(tmp_path / "b" / "samples.csv")
        assert np.array_equal(alone["mse"].to_numpy(), samples[samples["loss"] == "l2"]["mse"].to_numpy())
        summary = json.loads((tmp_path / "a" / "summary.json").read_text())
        result = run_audit(AuditSpec.from_dict(summary["spec"]), save=False)
        assert result.info["resumed_cells"] == 4
        np.testing.assert_array_equal(result.samples["pred_scale"].to_numpy(), samples["pred_scale"].to_numpy())
    finally:
        torch.set_default_dtype(old)

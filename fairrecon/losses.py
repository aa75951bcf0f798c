"""Reconstruction losses written as negative log-likelihoods, per sample, summed over pixels.

Every loss maps x, x_hat of shape (..., B, M) (B samples of M pixels; leading dims are
cells trained together) to per-sample NLLs of shape (..., B). Reduction happens later,
so per-group statistics and gradient shares can use the unreduced values, and a batch
loss is always an exact sum of per-sample parts. Each NLL includes its normaliser, so
values are true NLLs (nats per sample) and learned scales cannot cheat.

Gradients with respect to x_hat, with r = x_hat - x and M pixels per sample:
  l1               Laplace(b = 1)                         sign(r)
  l2               Normal(sigma = 1)                      r
  log-mse          Normal(sigma^2 = batch MSE)            r / MSE
  learned-sigma    Normal(sigma learned)                  r / sigma^2
  laplace-learned  Laplace(b learned)                     sign(r) / b
  student-t        Student-t(dof nu, scale s learned)     (nu + 1) r / (nu s^2 + r^2)
  mix:a            exp(-(a|r| + (1 - a) r^2 / 2)) / Z(a)  a sign(r) + (1 - a) r
  huber:delta      exp(-huber_delta(r)) / Z(delta)        clip(r, -delta, delta)
  barron:alpha     Barron (2019), scale c learned         (r / c^2) (r^2 / (c^2 |alpha - 2|) + 1)^(alpha/2 - 1)
  gaussian-pixel   Normal(sigma_ij from the decoder)      r / sigma^2
  gaussian-pixel:beta  beta-NLL (Seitzer et al. 2022)     sg(sigma^(2 beta)) r / sigma^2
  laplace-pixel    Laplace(b_ij from the decoder)         sign(r) / b
For log-mse the batch MSE is a shared weight held fixed (detached) inside each sample's
term: by the envelope theorem this gives exactly the gradient of (B*M/2) log MSE, and it
makes the batch loss an exact sum of per-sample (hence per-group) parts.

Learned parameters: a loss declares the scalars it learns with the weights (`Loss.params`),
one per cell, each stored as its log (positive by construction) and starting at 0 (value 1).
A scale is floored at `sigma_floor` (hard: no gradient below), so the NLL cannot run to minus
infinity; a cell whose scale ends at its floor has collapsed (train.py reports it as failed).
`Loss.per_sample` applies the floors and hands `Loss.nll` the log values, broadcastable against
x: (..., 1, 1) for a learned scalar.

Per-pixel scales (`Loss.pixel_scale`): the decoder has a second output head (models.py, `scale_head`)
that predicts a raw log-scale per pixel; `per_sample` floors it softly, as sigma-VAE does (Rybkin et
al. 2021, `softclip`): log s = log(floor) + softplus(raw - log(floor)), smooth, never below log(floor),
and the identity (to within floor) well above it. The NLL gets it as p["scale"], shape (..., B, M).
beta-NLL (`gaussian-pixel:beta`, beta in [0, 1]) weights each pixel's Gaussian NLL by the
stop-gradient factor sigma^(2 beta) (Seitzer et al., ICLR 2022, as their reference code does,
normaliser inside the weighted term): beta = 0 is gaussian-pixel exactly; beta = 1 gives the mean
the gradient r, as L2 has. For beta > 0 the value is the weighted objective, not a density's NLL.

Families: `mix:a`, `huber:delta`, `barron:alpha` name one loss per value of a shape parameter
(`FAMILIES`); members are built on lookup, so LOSSES["mix:0.5"] works like LOSSES["l1"].
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import integrate, special
from torch.distributions import Laplace, Normal

from .errors import UserError
from .spec import AuditSpec, canonical_number

LossFn = Callable[[torch.Tensor, torch.Tensor, Mapping[str, torch.Tensor], float], torch.Tensor]


@dataclass(frozen=True)
class Param:
    """A scalar a loss learns per cell, stored as its log (0 at the start: value 1)."""

    name: str  # its column in cells.csv, in natural units
    scale: bool = True  # a scale: floored at sigma_floor; ending at the floor means the cell collapsed


@dataclass(frozen=True)
class Loss:
    name: str
    nll: LossFn  # (x, x_hat, log_params, sigma_floor) -> per-sample NLL (..., B)
    likelihood: str  # one line: the density, for tables and `fairrecon losses`
    params: tuple[Param, ...] = ()  # what it learns (log values, keyed by Param.name)
    pixel_scale: bool = False  # the decoder predicts a per-pixel log-scale, handed to nll as p["scale"]

    def per_sample(
        self,
        x: torch.Tensor,
        x_hat: torch.Tensor,
        raw: Mapping[str, torch.Tensor],
        floor: float,
        *,
        raw_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The NLL (..., B), from the stored (unfloored) log parameters `raw`, each broadcastable to x,
        and, for a per-pixel loss, the decoder's raw log-scale `raw_scale` (the shape of x)."""
        p = self.log_params(raw, floor)
        if self.pixel_scale:
            if raw_scale is None:
                raise ValueError(
                    f"loss '{self.name}' needs the decoder's per-pixel log-scale (a model with scale_head)"
                )
            p["scale"] = pixel_log_scale(raw_scale, floor)
        return self.nll(x, x_hat, p, floor)

    def log_params(self, raw: Mapping[str, torch.Tensor], floor: float) -> dict[str, torch.Tensor]:
        """The log parameters the likelihood uses: scales floored at log(floor), the rest as stored."""
        return {p.name: raw[p.name].clamp_min(math.log(floor)) if p.scale else raw[p.name] for p in self.params}


def pixel_log_scale(raw: torch.Tensor, floor: float) -> torch.Tensor:
    """The decoder's raw per-pixel log-scale, softly floored (sigma-VAE's softclip):
    log(floor) + softplus(raw - log(floor)) > log(floor), with a gradient everywhere."""
    log_floor = math.log(floor)
    return log_floor + F.softplus(raw - log_floor)


# ---- fixed-scale and learned-scale likelihoods ----


def l1_nll(x, x_hat, p, floor):
    return -Laplace(x_hat, 1.0, validate_args=False).log_prob(x).sum(-1)


def l2_nll(x, x_hat, p, floor):
    return -Normal(x_hat, 1.0, validate_args=False).log_prob(x).sum(-1)


def log_mse_nll(x, x_hat, p, floor):
    mse = (x_hat - x).pow(2).mean(dim=(-2, -1), keepdim=True).detach().clamp_min(floor**2)  # (..., 1, 1)
    return -Normal(x_hat, mse.sqrt(), validate_args=False).log_prob(x).sum(-1)


def learned_sigma_nll(x, x_hat, p, floor):
    return -Normal(x_hat, p["sigma"].exp(), validate_args=False).log_prob(x).sum(-1)


def laplace_learned_nll(x, x_hat, p, floor):
    return -Laplace(x_hat, p["scale"].exp(), validate_args=False).log_prob(x).sum(-1)


def student_t_nll(x, x_hat, p, floor):
    """Student-t with dof nu and scale s. The normaliser is taken in float64: in float32 its two
    lgamma terms cancel badly once nu is large (lgamma(nu / 2) ~ 1e5 at nu = 1e4)."""
    log_s, log_nu = p["scale"], p["dof"]
    nu64 = log_nu.double().exp()
    log_norm = (torch.lgamma((nu64 + 1) / 2) - torch.lgamma(nu64 / 2) - 0.5 * torch.log(nu64 * math.pi)).to(x.dtype)
    nu = log_nu.exp()
    z2 = ((x - x_hat) / log_s.exp()).pow(2)
    return (0.5 * (nu + 1) * torch.log1p(z2 / nu) + log_s - log_norm).sum(-1)


def gaussian_pixel_nll(x, x_hat, p, floor):
    return -Normal(x_hat, p["scale"].exp(), validate_args=False).log_prob(x).sum(-1)


def laplace_pixel_nll(x, x_hat, p, floor):
    return -Laplace(x_hat, p["scale"].exp(), validate_args=False).log_prob(x).sum(-1)


# ---- families: one loss per value of a shape parameter ----


def mix_log_normaliser(a: float) -> float:
    """log of Z(a) = integral of exp(-(a|r| + (1 - a) r^2 / 2)) dr, in closed form:
    2 sqrt(pi / 2b) erfcx(a / sqrt(2b)) with b = 1 - a (2 / a at b = 0: Laplace)."""
    b = 1.0 - a
    if b == 0.0:
        return math.log(2.0)
    return math.log(2.0) + 0.5 * math.log(math.pi / (2 * b)) + math.log(special.erfcx(a / math.sqrt(2 * b)))


def mix_loss(name: str, a: float) -> Loss:
    log_z = mix_log_normaliser(a)

    def nll(x, x_hat, p, floor):
        r = x_hat - x
        # log Z added per pixel, as torch's Laplace and Normal do: mix:1 and mix:0 are l1 and l2 bit for bit
        return (a * r.abs() + (1.0 - a) * (0.5 * r.pow(2)) + log_z).sum(-1)

    return Loss(name, nll, f"p(r) = exp(-({canonical_number(a)} abs(r) + {canonical_number(1 - a)} r^2 / 2)) / Z")


def huber_log_normaliser(delta: float) -> float:
    """log of Z(delta) = integral of exp(-huber_delta(r)) dr, in closed form:
    2 (sqrt(pi / 2) erf(delta / sqrt 2) + exp(-delta^2 / 2) / delta)."""
    return math.log(2.0 * (math.sqrt(math.pi / 2) * math.erf(delta / math.sqrt(2)) + math.exp(-(delta**2) / 2) / delta))


def huber_loss(name: str, delta: float) -> Loss:
    log_z = huber_log_normaliser(delta)

    def nll(x, x_hat, p, floor):
        return (F.huber_loss(x_hat, x, reduction="none", delta=delta) + log_z).sum(-1)

    return Loss(
        name, nll, f"p(r) = exp(-huber(r)) / Z: Gaussian for abs(r) <= {canonical_number(delta)}, Laplace tails beyond"
    )


def barron_rho(z2, alpha: float):
    """Barron's rho(x, alpha, c) as a function of z2 = (x / c)^2 (torch or numpy), alpha in [0, 2].

    alpha = 2: z2 / 2; alpha = 0: log(1 + z2 / 2); else |alpha - 2| / alpha ((z2 / |alpha - 2| + 1)^(alpha/2) - 1),
    written with expm1/log1p so it stays accurate for small z2 and for alpha near 0 or 2.
    """
    lib = torch if isinstance(z2, torch.Tensor) else np
    if alpha == 2.0:
        return 0.5 * z2
    if alpha == 0.0:
        return lib.log1p(0.5 * z2)
    b = abs(alpha - 2.0)
    return (b / alpha) * lib.expm1(0.5 * alpha * lib.log1p(z2 / b))


def barron_log_normaliser(alpha: float) -> float:
    """log Z(alpha), Z = integral of exp(-rho(x, alpha, 1)) dx: closed forms at alpha = 0 (Cauchy,
    pi sqrt 2) and 2 (Gaussian, sqrt(2 pi)), numerical integration (scipy quad) in between."""
    if alpha == 0.0:
        return math.log(math.pi * math.sqrt(2.0))
    if alpha == 2.0:
        return 0.5 * math.log(2 * math.pi)
    half, _ = integrate.quad(
        lambda t: math.exp(-barron_rho(np.float64(t * t), alpha)), 0.0, math.inf, epsabs=0.0, epsrel=1e-12, limit=200
    )
    return math.log(2.0 * half)


def barron_loss(name: str, alpha: float) -> Loss:
    log_z = barron_log_normaliser(alpha)

    def nll(x, x_hat, p, floor):
        log_c = p["scale"]
        return (barron_rho(((x_hat - x) / log_c.exp()).pow(2), alpha) + log_c + log_z).sum(-1)

    kind = {0.0: "Cauchy", 1.0: "Charbonnier/pseudo-Huber", 2.0: "Gaussian"}.get(alpha, "general")
    return Loss(
        name,
        nll,
        f"Barron's general robust density, alpha = {canonical_number(alpha)} ({kind}), learned scale c",
        (Param("scale"),),
    )


def beta_nll_loss(name: str, beta: float) -> Loss:
    def nll(x, x_hat, p, floor):
        weight = (2 * beta * p["scale"]).detach().exp()  # sigma^(2 beta), held fixed: only the gradient changes
        return (weight * -Normal(x_hat, p["scale"].exp(), validate_args=False).log_prob(x)).sum(-1)

    return Loss(
        name,
        nll,
        f"beta-NLL, beta = {canonical_number(beta)}: per-pixel Gaussian NLL (sigma from the "
        "decoder) weighted by stop-gradient sigma^(2 beta)",
        pixel_scale=True,
    )


@dataclass(frozen=True)
class Interval:
    """The values a family allows: from low to high, each end closed unless marked open."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, v: float) -> bool:
        above = self.low < v if self.low_open else self.low <= v
        return above and (v < self.high if self.high_open else v <= self.high)

    def __str__(self) -> str:
        return (
            f"{'(' if self.low_open else '['}{canonical_number(self.low)}, "
            f"{canonical_number(self.high) if math.isfinite(self.high) else 'inf'}{')' if self.high_open else ']'}"
        )


@dataclass(frozen=True)
class Family:
    """Losses NAME:VALUE, one per value of a shape parameter, e.g. mix:0.5."""

    name: str
    symbol: str  # the value's name in messages: a, delta, alpha
    allowed: Interval
    make: Callable[[str, float], Loss]  # (canonical name, value) -> the member
    likelihood: str  # one line, for the whole family

    @property
    def pattern(self) -> str:
        return f"{self.name}:{self.symbol.upper()}"


# ---- the registry ----


class Registry(dict):
    """name -> Loss. Iterating gives the plain losses (see FAMILIES for the families); a family
    member such as 'mix:0.5' is built on lookup, so `name in LOSSES` and `LOSSES[name]` hold for
    every valid name."""

    def __missing__(self, name: str) -> Loss:
        try:
            return _member(name)
        except UserError:
            raise KeyError(name) from None

    def __contains__(self, name: object) -> bool:
        try:
            self[name]
        except (KeyError, TypeError):
            return False
        return True

    def get(self, name, default=None):
        return self[name] if name in self else default


LOSSES: Registry = Registry()
FAMILIES: dict[str, Family] = {}


def register(loss: Loss) -> Loss:
    """Add a loss to the registry (for users' own likelihoods)."""
    _check_name(loss.name)
    LOSSES[loss.name] = loss
    return loss


def register_family(family: Family) -> Family:
    """Add a family NAME:VALUE to the registry."""
    _check_name(family.name)
    FAMILIES[family.name] = family
    _member.cache_clear()
    return family


def _check_name(name: str) -> None:
    """Names become file names (resume.cell_name) and list items: lowercase letters, digits, '.' and '-'."""
    if not name or any(not (c.isascii() and (c.islower() or c.isdigit() or c in ".-")) for c in name):
        raise UserError(f"loss name '{name}': use lowercase letters, digits, '.' and '-' only")


def get_loss(name: str) -> Loss:
    """A loss by name: a plain loss, or a family member NAME:VALUE (a one-line UserError otherwise)."""
    return dict.get(LOSSES, name) or _member(name)


@functools.cache
def _member(name: str) -> Loss:
    family_name, colon, text = name.partition(":")
    family = FAMILIES.get(family_name)
    if family is not None and not colon:
        raise UserError(
            f"loss '{name}' is a family, not one loss: name a member as {family.pattern} with {family.symbol} in "
            f"{family.allowed}, e.g. {family.name}:{canonical_number(_example(family.allowed))}"
        )
    if not colon or family is None:
        raise UserError(
            f"unknown loss '{name}'; allowed: {', '.join(dict.keys(LOSSES))}, "
            + ", ".join(f"{f.pattern} with {f.symbol} in {f.allowed}" for f in FAMILIES.values())
        )
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value not in family.allowed:
        raise UserError(f"loss '{name}': {family.symbol} must be a number in {family.allowed}, got '{text}'")
    return family.make(f"{family.name}:{canonical_number(value)}", value)


def _example(allowed: Interval) -> float:
    """A value inside `allowed`, for messages: its midpoint, or a point past its open or infinite end."""
    if math.isfinite(allowed.high):
        return (allowed.low + allowed.high) / 2
    return allowed.low + 1


def check_settings(spec: AuditSpec) -> list[Loss]:
    """The spec's losses (a one-line UserError for an unknown one), after refusing the settings that act
    only on learned parameters when no loss has any: they would be ignored yet counted in the audit's
    identity (as spec.APPLIES_ONLY refuses the settings that depend on other fields)."""
    losses = [get_loss(name) for name in spec.losses]
    default = AuditSpec()
    uses = {
        "sigma_lr": (any(loss.params for loss in losses), "losses with learned parameters"),
        "sigma_floor": (
            any(loss.params or loss.pixel_scale for loss in losses),
            "losses with a learned or predicted scale",
        ),
    }
    for name, (applies, where) in uses.items():
        value = getattr(spec, name)
        if value != getattr(default, name) and not applies:
            raise UserError(
                f"{name} {value:g} applies only to {where} (e.g. learned-sigma), not losses "
                f"{','.join(spec.losses)}; drop it"
            )
    return losses


for _loss in (
    Loss("l1", l1_nll, "Laplace, b = 1"),
    Loss("l2", l2_nll, "Gaussian, sigma = 1"),
    Loss("log-mse", log_mse_nll, "Gaussian, shared sigma = sqrt(batch MSE)"),
    Loss("learned-sigma", learned_sigma_nll, "Gaussian, learned scalar sigma (floored)", (Param("sigma"),)),
    Loss("laplace-learned", laplace_learned_nll, "Laplace, learned scalar b (floored)", (Param("scale"),)),
    Loss(
        "student-t",
        student_t_nll,
        "Student-t, learned degrees of freedom and scale (floored)",
        (Param("scale"), Param("dof", scale=False)),
    ),
    Loss(
        "gaussian-pixel",
        gaussian_pixel_nll,
        "Gaussian, per-pixel sigma predicted by the decoder (soft floor)",
        pixel_scale=True,
    ),
    Loss(
        "laplace-pixel",
        laplace_pixel_nll,
        "Laplace, per-pixel b predicted by the decoder (soft floor)",
        pixel_scale=True,
    ),
):
    register(_loss)

for _family in (
    Family(
        "mix",
        "a",
        Interval(0.0, 1.0),
        mix_loss,
        "p(r) = exp(-(a abs(r) + (1 - a) r^2 / 2)) / Z(a): l1 at a = 1, l2 at a = 0",
    ),
    Family(
        "huber",
        "delta",
        Interval(0.0, math.inf, low_open=True, high_open=True),
        huber_loss,
        "p(r) = exp(-huber_delta(r)) / Z(delta): Gaussian core, Laplace tails beyond abs(r) = delta",
    ),
    Family(
        "barron",
        "alpha",
        Interval(0.0, 2.0),
        barron_loss,
        "Barron's general robust density with a learned scale c: Cauchy at alpha = 0, pseudo-Huber at 1, Gaussian at 2",
    ),
    Family(
        "gaussian-pixel",
        "beta",
        Interval(0.0, 1.0),
        beta_nll_loss,
        "beta-NLL (Seitzer et al. 2022): per-pixel Gaussian NLL weighted by stop-gradient sigma^(2 beta); "
        "beta = 0 is gaussian-pixel",
    ),
):
    register_family(_family)

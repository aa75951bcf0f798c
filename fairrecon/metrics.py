"""The per-image error metrics: one registry that measurement, results, statistics, reports, figures and the
command line all ask (name, label, unit, direction, whether a verdict may use it, whether a ratio is defined).

A leaf beneath everything (no torch, no pandas), so `fairrecon --help` can list the choices without importing
torch. measure.sample_errors computes each metric per test image (the columns of samples.csv); the one-line
definitions here are what the reports and docs/metrics.md say.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError

PSNR_FLOOR_MSE = 1e-10  # a perfect reconstruction reads as 100 dB rather than infinity
# The least signal a stored 8-bit image can be said to have: the variance of quantisation noise, (1/255)^2 / 12.
# nmse floors the image's pixel variance at it (a flat image), rel_mse its mean squared pixel (a black image).
QUANTISATION_VAR = (1 / 255) ** 2 / 12
SSIM_SIGMA = 1.5  # SSIM's Gaussian window (Wang et al. 2004): sigma 1.5 pixels, 11 taps (torchmetrics' default)
SSIM_MIN_SIDE = 6  # torchmetrics mirrors 5 pixels at each border, which needs an image at least 6 pixels a side


@dataclass(frozen=True)
class Metric:
    """One per-image error metric, as every surface names and reads it."""

    name: str  # the samples.csv column and the --metric value
    label: str  # the one text every surface shows (terminal, report.md, report.html, figures)
    unit: str  # "" for a pure number
    higher_is_worse: bool  # False: higher is better (psnr)
    ratio: bool  # whether worst/best is defined (not on a log scale: psnr)
    verdicts: bool  # whether a verdict (and `--metric`) may use it
    definition: str  # one line: what the number is
    why_not: str = ""  # when a verdict may not use it: why
    undefined: str = ""  # when it can be empty (NaN) for every image: when
    pca: bool = False  # whether stats.pca_errors scores it, so `check --adjusted` can use it

    @property
    def direction(self) -> str:
        return "higher is worse" if self.higher_is_worse else "higher is better"


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric(
            name="mse",
            label="MSE per pixel",
            unit="",
            higher_is_worse=True,
            ratio=True,
            verdicts=True,
            definition="mean over pixels of (reconstruction - image)^2",
            pca=True,
        ),
        Metric(
            name="mae",
            label="MAE per pixel",
            unit="",
            higher_is_worse=True,
            ratio=True,
            verdicts=True,
            definition="mean over pixels of |reconstruction - image|",
            pca=True,
        ),
        Metric(
            name="psnr",
            label="PSNR in dB",
            unit="dB",
            higher_is_worse=False,
            ratio=False,
            verdicts=True,
            definition=f"-10 log10(mse) for data range 1 (mse floored at {PSNR_FLOOR_MSE:g}, so at most 100 dB); "
            "a log scale: gaps are in dB, and no ratio is defined",
            pca=True,
        ),
        Metric(
            name="nmse",
            label="MSE over the image's variance",
            unit="",
            higher_is_worse=True,
            ratio=True,
            verdicts=True,
            definition="mse / the image's own pixel variance (population; floored at 8-bit quantisation noise): "
            "the error relative to the image's contrast; 1 is no better than the image's mean everywhere",
        ),
        Metric(
            name="ssim_error",
            label="structural error 1 - SSIM",
            unit="",
            higher_is_worse=True,
            ratio=True,
            verdicts=True,
            definition="1 - SSIM (Wang et al. 2004) by torchmetrics' structural_similarity_index_measure: Gaussian "
            f"window of sigma {SSIM_SIGMA} (11 taps), data range 1, borders mirrored, the mean over every pixel's "
            "window and channel; 0 for a perfect reconstruction",
            undefined=f"SSIM is not defined for images under {SSIM_MIN_SIDE} pixels a side (its mirrored window does "
            "not fit)",
        ),
        Metric(
            name="rel_mse",
            label="MSE over the image's mean squared pixel",
            unit="",
            higher_is_worse=True,
            ratio=True,
            verdicts=True,
            definition="mse / the image's own mean squared pixel, its energy (brightness^2 + contrast^2; floored "
            "at 8-bit quantisation noise): the error relative to the image's brightness, unchanged when an image "
            "and its reconstruction are scaled together",
        ),
        Metric(
            name="nll",
            label="the loss's NLL in nats per image",
            unit="nats",
            higher_is_worse=True,
            ratio=False,
            verdicts=False,
            definition="VAEs: the cell's own loss as a negative log-likelihood of the image at one posterior draw",
            why_not="each loss is its own likelihood, so the same reconstruction scores differently under "
            "different losses (comparing losses' gaps would compare units), and a density's NLL can be negative",
            undefined="only VAEs have it",
        ),
    )
}
DEFAULT = "mse"
NAMES = tuple(METRICS)  # every metric samples.csv stores, in its column order
VERDICT_METRICS = tuple(name for name, m in METRICS.items() if m.verdicts)  # `--metric` choices, by_group's columns


def get(name: str) -> Metric:
    """The metric called `name`, or a one-line UserError naming the allowed ones."""
    if name not in METRICS:
        raise UserError(f"unknown metric '{name}'; allowed: {', '.join(VERDICT_METRICS)}")
    return METRICS[name]


def for_verdicts(name: str, *, adjusted: bool = False) -> Metric:
    """The metric `name`, checked for use in a verdict: known, allowed to carry verdicts and, when `adjusted`,
    scored by the PCA baseline. Each refusal is one line saying what is allowed. (Whether a result has the
    metric's values is results.AuditResult.require_metric's question.)"""
    metric = get(name)
    if not metric.verdicts:
        raise UserError(
            f"metric '{name}' cannot carry a verdict: {metric.why_not}; allowed: {', '.join(VERDICT_METRICS)}"
        )
    if adjusted and not metric.pca:
        raise UserError(
            f"--adjusted has no PCA baseline for '{name}'; adjusted metrics: "
            + ", ".join(m for m in VERDICT_METRICS if METRICS[m].pca)
        )
    return metric


def label(name: str) -> str:
    """The metric's label (the name itself for a column outside the registry)."""
    return METRICS[name].label if name in METRICS else name

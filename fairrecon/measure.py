"""Held-out reconstruction errors: per sample at the end of training, and per group during it.

`sample_errors`: one row per (loss, objective, seed, test image), the unit every later statistic resamples.
`CurveRecorder`: each group's held-out MSE and MAE at the training loop's curve points
(hooks.EvalPoint), on a fixed stratified subset of the test images sized so that the points cost
at most CURVE_BUDGET of training, but never fewer than MIN_CURVE_IMAGES per group (or the whole group:
`curve_subset`), so short runs pay more (1 epoch on 5,000 images, two groups: 20 x 512 forwards per cell,
two thirds of training's);
`curve_table` puts the full test set at each cell's last point, so that point equals the final
per-group numbers.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import torch

from .grid import CELL_KEY, Cell, cell_key
from .groups import GroupedData
from .hooks import EvalPoint
from .metrics import PSNR_FLOOR_MSE, QUANTISATION_VAR, SSIM_MIN_SIDE, SSIM_SIGMA
from .noise import HELDOUT_EPS_STREAM, draw_eps, eps_generators
from .settled import DROP, fall_bound, projected_fall
from .stacked import StackedCells, group_errors, residual_chunks

SAMPLE_CHUNK = 2048  # test images whose residuals sample_errors holds at once (reconstruct batches within it)


@torch.no_grad()
def sample_errors(stacked: StackedCells, data: GroupedData, device: torch.device | str = "cpu") -> pd.DataFrame:
    """Every metric of the registry (metrics.py: mse, mae, psnr, nmse, ssim_error, rel_mse) of every test image
    under every cell, and for VAEs its nll and kl (NaN for autoencoders, so samples.csv has one schema).

    Each image's row is reduced alone; the reconstruction is scored as the model outputs it (not clamped).
    For a VAE the metrics score the posterior mean's reconstruction decode(mu), as for an autoencoder; `kl` is
    KL(q(z|x) || N(0, I)) in nats and `nll` the cell's loss NLL of x given decode(z) at one draw
    z ~ q(z|x) (a fixed generator per seed), so nll + kl is a one-sample estimate of the negative ELBO
    (for log-mse the "batch" MSE is the cell's over the whole test set).
    """
    x = data.test_x.to(device)
    n_cells = len(stacked.cells)
    nll = kl = torch.full((n_cells, len(x)), torch.nan)
    if isinstance(stacked, StackedCells) and stacked.config.vae:  # external.py's one user model is never a VAE
        eps = draw_eps(
            eps_generators(stacked.cells, HELDOUT_EPS_STREAM), stacked.cells, len(x), stacked.config.latent, x.device
        )
        x_hat, kl = stacked.sample_posterior(x, eps)
        nll = stacked.per_sample_nll(x.expand(n_cells, *x.shape), x_hat).cpu()
        kl = kl.cpu()
        del x_hat
    mse, mae, ssim = [], [], []
    for lo, residual in residual_chunks(stacked, x, SAMPLE_CHUNK):  # residual: (C, b, M)
        xb = x[lo : lo + residual.shape[1]]
        ssim.append(torch.stack([ssim_per_image(r.view(xb.shape) + xb, xb) for r in residual]))
        mse.append(residual.pow(2).mean(2))
        mae.append(residual.abs_().mean(2))
    mse, mae, ssim = torch.cat(mse, dim=1).cpu(), torch.cat(mae, dim=1).cpu(), torch.cat(ssim, dim=1).cpu()
    psnr = -10.0 * torch.log10(mse.clamp_min(PSNR_FLOOR_MSE))
    flat = x.flatten(1)
    nmse = mse / flat.var(1, correction=0).clamp_min(QUANTISATION_VAR).cpu()
    rel_mse = mse / flat.pow(2).mean(1).clamp_min(QUANTISATION_VAR).cpu()
    pixel_scales = getattr(stacked, "pixel_scales", None)  # a user's model (external.py) predicts no scale
    pred_scale = pixel_scales(x).cpu() if pixel_scales is not None else torch.full(mse.shape, torch.nan)
    names = pd.Categorical.from_codes(data.test_g.cpu().numpy(), categories=list(data.names))
    frames = [
        pd.DataFrame(
            {
                "loss": cell.loss,
                "objective": cell.objective,
                "seed": cell.seed,
                "group": names,
                "index": data.test_index.numpy(),
                "mse": mse[c].numpy(),
                "mae": mae[c].numpy(),
                "psnr": psnr[c].numpy(),
                "nmse": nmse[c].numpy(),
                "ssim_error": 1.0 - ssim[c].numpy(),
                "rel_mse": rel_mse[c].numpy(),
                "pred_scale": pred_scale[c].numpy(),
                "nll": nll[c].numpy(),
                "kl": kl[c].numpy(),
            }
        )
        for c, cell in enumerate(stacked.cells)
    ]
    return pd.concat(frames, ignore_index=True)


SSIM_BATCH = 512  # images per torchmetrics call: its five padded copies of them stay a few MB


def ssim_per_image(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """SSIM of each reconstruction x_hat (b, ch, H, W) against its image x (b, ch, H, W): (b,), float32.

    torchmetrics' structural_similarity_index_measure (data range 1, Gaussian window of sigma SSIM_SIGMA, 11
    taps): the mean over every pixel's window and channel, the image mirrored at its borders. The images are
    handed over as the channels of one image, whose SSIM map torchmetrics returns (return_full_image): it
    filters each channel alone, so the map is every image's own, and one depthwise convolution makes it ~3x
    faster on the CPU than a batch of one-channel images (measured on 28x28 at one thread); each image's value
    is its map's mean, what reduction="none" returns, to the bit (tests/test_metrics.py checks both, and the
    values against scikit-image). NaN for images under SSIM_MIN_SIDE pixels a side, where the mirror does not fit.
    """
    if min(x.shape[-2:]) < SSIM_MIN_SIDE:
        return torch.full((len(x),), torch.nan, device=x.device)
    from torchmetrics.functional.image import structural_similarity_index_measure

    parts = []
    for i in range(0, len(x), SSIM_BATCH):
        pred, target = (t[i : i + SSIM_BATCH] for t in (x_hat, x))
        _, maps = structural_similarity_index_measure(
            pred.reshape(1, -1, *x.shape[-2:]),
            target.reshape(1, -1, *x.shape[-2:]),
            gaussian_kernel=True,
            sigma=SSIM_SIGMA,
            data_range=1.0,
            return_full_image=True,
        )
        parts.append(maps.reshape(len(pred), -1).mean(1))
    return torch.cat(parts)


CURVE_BUDGET = 0.05  # curve points may cost at most 5% of training's forward passes (a step is ~3: forward + backward)
# ... but never fewer test images per group than this (or the whole group, if smaller): the verdict's drift is
# measured on these images, whose sampling error every seed shares; at 256 per group it is 0.008-0.013 on the log
# drift per doubling, below the seed SE in 7 of 8 rows measured (docs/method/settled.md, the curve subset's size)
MIN_CURVE_IMAGES = 256
CURVE_COLUMNS = [
    *("loss", "objective", "seed", "step", "epoch", "group", "n"),
    *("mse", "mae", "train_mse", "val_mse", "group_weight"),
]


def curve_subset_size(n_test: int, n_train: int, epochs_per_point: float) -> int:
    """Test images per curve point that the budget pays for: CURVE_BUDGET of the ~3 forward passes per training
    image and epoch between two points, at most the whole test set (`curve_subset` adds each group's minimum)."""
    return min(n_test, int(CURVE_BUDGET * 3 * n_train * epochs_per_point))


def curve_subset(groups: torch.Tensor, n_train: int, epochs_per_point: float) -> torch.Tensor:
    """Sorted positions of the curve points' test images: `curve_subset_size` of them stratified by group, with
    at least MIN_CURVE_IMAGES of every group (all of a smaller group)."""
    return stratified_subset(groups, curve_subset_size(len(groups), n_train, epochs_per_point), MIN_CURVE_IMAGES)


def stratified_subset(groups: torch.Tensor, size: int, minimum: int = 1, seed: int = 0) -> torch.Tensor:
    """Sorted positions of about `size` items, each group in its share of `groups`, but at least `minimum` (and
    at least one) of each group, or all of a smaller one."""
    codes = groups.numpy()
    if size >= len(codes):
        return torch.arange(len(codes))
    rng = np.random.default_rng(seed)
    picks = []
    for g in np.unique(codes):
        members = np.flatnonzero(codes == g)
        k = min(len(members), max(1, minimum, round(size * len(members) / len(codes))))
        picks.append(rng.choice(members, size=k, replace=False))
    return torch.from_numpy(np.sort(np.concatenate(picks)))


class CurveRecorder:
    """An `on_eval` hook for train.train_cells: each active cell's per-group held-out MSE and MAE at every curve
    point, on a fixed stratified subset of the test images, with its training MSE, validation MSE (epochs="auto")
    and the group's weight in its objective there; `seconds` is the time spent inside the hook."""

    def __init__(self, data: GroupedData, *, epochs_per_point: float, device: torch.device | str = "cpu"):
        self.positions = curve_subset(data.test_g, len(data.train_x), epochs_per_point)
        self.names = data.names
        self.x = data.test_x[self.positions].to(device)
        self.g = data.test_g[self.positions].to(device)
        self.counts = torch.bincount(data.test_g[self.positions], minlength=len(data.names)).tolist()
        self.rows: list[dict] = []
        self.seconds = 0.0

    def __call__(self, point: EvalPoint) -> None:
        start = time.perf_counter()
        mse, mae = (v.cpu().numpy() for v in group_errors(point.stacked, self.x, self.g, len(self.names)))
        train = point.train_mse.double().cpu().numpy()
        val = point.val_mse.double().cpu().numpy() if point.val_mse is not None else None
        weight = point.weights.double().cpu().numpy() if point.weights is not None else None
        for c, cell in enumerate(point.stacked.cells):
            if not point.active[c]:
                continue
            for g, name in enumerate(self.names):
                self.rows.append(
                    {
                        "loss": cell.loss,
                        "objective": cell.objective,
                        "seed": cell.seed,
                        "step": point.step,
                        "epoch": point.epoch,
                        "group": name,
                        "n": self.counts[g],
                        "mse": mse[c, g],
                        "mae": mae[c, g],
                        "train_mse": train[c, g],
                        "val_mse": val[c, g] if val is not None else np.nan,
                        "group_weight": weight[c, g] if weight is not None else np.nan,
                    }
                )
        self.seconds += time.perf_counter() - start

    def frame(self) -> pd.DataFrame:
        """Every recorded point, on the subset (the last point of a cell included)."""
        return pd.DataFrame(self.rows, columns=CURVE_COLUMNS)


def curve_table(points: pd.DataFrame, samples: pd.DataFrame, final_steps: dict[Cell, int]) -> pd.DataFrame:
    """curves.csv: the recorded points, with each cell's last point measured on the full test set instead
    (the group means of `samples`, so it equals the final per-group numbers) and n the group's test images."""
    parts = []
    for (loss, objective, seed), part in points.groupby(CELL_KEY, sort=False):
        final = final_steps[Cell(loss, seed, objective)]
        last = part[part["step"] == final].set_index("group")
        own = samples[(samples["loss"] == loss) & (samples["objective"] == objective) & (samples["seed"] == seed)]
        full = own.groupby(own["group"].astype(str), sort=False)[["mse", "mae"]].agg(["mean", "size"])
        last = last.assign(
            n=full[("mse", "size")].reindex(last.index).to_numpy(),
            mse=full[("mse", "mean")].reindex(last.index).to_numpy(),
            mae=full[("mae", "mean")].reindex(last.index).to_numpy(),
        )
        parts += [part[part["step"] < final], last.reset_index()[CURVE_COLUMNS]]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=CURVE_COLUMNS)


def convergence(points: pd.DataFrame) -> pd.DataFrame:
    """Per cell (loss, [objective,] seed), whether its held-out error had settled at the end of training (settled.py, the notion that
    stops --epochs auto): each group's validation MSE where the points have one (--epochs auto, so `converged`
    is exactly "stopped before the cap"), else its held-out MSE on the fixed curve subset (the same images at
    every point). `converged`: in every group, with 95% confidence, as much training again would not lower it
    by more than 5% (False when training was too short to judge); `last_drop`: the projected fall over as much
    training again (> 0 falling, < 0 rising) of the group whose bound is highest, `last_drop_of` which one."""
    rows = []
    for key, part in points.groupby(cell_key(points), sort=False):
        column, kind = ("val_mse", "validation") if part["val_mse"].notna().all() else ("mse", "held-out")
        wide = part.pivot(index="step", columns="group", values=column)
        bound = fall_bound(wide.index, wide.to_numpy())
        fall = projected_fall(wide.index, wide.to_numpy())
        judged = np.isfinite(bound)
        at = int(np.argmax(np.where(judged, bound, -np.inf))) if judged.any() else 0
        rows.append(
            {
                **dict(zip(cell_key(points), key)),
                "converged": bool(judged.all() and (bound <= DROP).all()),
                "last_drop": float(fall[at]) if judged.all() else float("nan"),
                "last_drop_of": f"{kind} MSE of group {wide.columns[at]}"
                if judged.all()
                else "too few points to judge",
            }
        )
    return pd.DataFrame(rows, columns=[*cell_key(points), "converged", "last_drop", "last_drop_of"])


@torch.no_grad()
def train_mse(stacked: StackedCells, x: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """Each cell's MSE per pixel over the whole training set (C,), to set beside its learned sigma^2: the mean
    (float64) of every image's MSE, SAMPLE_CHUNK images at a time, so memory stays one chunk's residuals."""
    total = torch.zeros(len(stacked.cells), dtype=torch.float64)
    for _, residual in residual_chunks(stacked, x, SAMPLE_CHUNK, device):
        total += residual.pow_(2).mean(2).double().sum(1).cpu()
    return total / len(x)


EXAMPLES_PER_GROUP = 8  # test images per group kept, with their reconstructions, for the report's grids


@torch.no_grad()
def example_reconstructions(
    stacked: StackedCells, data: GroupedData, per_group: int = EXAMPLES_PER_GROUP, device: torch.device | str = "cpu"
) -> dict[str, np.ndarray]:
    """A few test images per group and each arm's reconstruction of them (lowest seed), for a results folder:
    `losses` names each arm (Cell.arm: the loss, with its objective unless erm).

    Images are stored as uint8 (display only: the errors live in samples.csv), so a results folder stays
    small; each held-out image's brightness and contrast (float16) come along for the report's histograms.
    """
    pick = torch.cat([torch.nonzero(data.test_g == g).flatten()[:per_group] for g in range(len(data.names))])
    seed = min(c.seed for c in stacked.cells)
    chosen = [i for i, c in enumerate(stacked.cells) if c.seed == seed]  # one cell per arm
    recon = stacked.reconstruct(data.test_x[pick].to(device))[chosen].clamp(0, 1).cpu()
    flat = data.test_x.flatten(1)

    def to_uint8(x: torch.Tensor) -> np.ndarray:
        return (x * 255).round().to(torch.uint8).numpy()

    return {
        "images": to_uint8(data.test_x[pick]),
        "group": data.test_g[pick].numpy(),
        "index": data.test_index[pick].numpy(),
        "recon": to_uint8(recon),
        "losses": np.array([stacked.cells[i].arm for i in chosen]),
        "seed": np.array(seed),
        "group_names": np.array([str(n) for n in data.names]),
        "test_group": data.test_g.numpy().astype(np.int16),
        "test_brightness": flat.mean(1).numpy().astype(np.float16),
        "test_contrast": flat.std(1).numpy().astype(np.float16),
    }

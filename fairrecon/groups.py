"""Groups of images: brightness splits (the teaching question) or the user's own labels.

Three ways to form groups, all giving the same proportions in the train and test splits:

* ``transform``: a random split, each image mapped to its group's target brightness.
  - ``contrast="squeeze"``: the plain affine squeeze towards 0 or 1. Exact mean, no
    clipping, but contrast shrinks by t/mu or (1-t)/(1-mu): a group squeezed towards 1
    becomes low-contrast and easy to reconstruct, which masquerades as a loss effect.
  - ``contrast="matched"`` (default): y = b + c*(z - mean z), with z the image or its
    negative 1 - x (whichever leaves more room), one contrast factor c shared by every
    image of every group, and b set per image so the mean hits the target exactly.
    All groups keep the same contrast distribution; the price is that c is set by the
    hardest target (c = the smallest, over targets, of the 5th percentile of what that
    target's images could carry unclipped), so every group loses some contrast, and at
    most ~5% of any group's images clip a few pixels, whatever the proportions.
* ``select``: real images picked by their own brightness, pixels untouched.
* ``labels``: a CSV mapping image-folder files (or their indices) to group names.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .data import ImageSet
from .errors import UserError
from .spec import AuditSpec

MATCHED_QUANTILE = 0.05  # share of each group's images allowed to clip under contrast="matched"


@dataclass(frozen=True)
class GroupedData:
    """Train and test images with an integer group code per image; `names[code]` is the group."""

    names: tuple[str, ...]
    train_x: torch.Tensor  # (N, C, H, W) in [0, 1]
    train_g: torch.Tensor  # (N,) int64
    train_index: torch.Tensor  # (N,) index into the original dataset
    test_x: torch.Tensor
    test_g: torch.Tensor
    test_index: torch.Tensor
    targets: tuple[float, ...] | None = None
    contrast_factor: float | None = None  # c, for contrast="matched"

    def describe(self) -> pd.DataFrame:
        """Measured brightness (mean pixel) and contrast (mean per-image pixel std) per split and group."""
        rows = []
        for split, x, g in (("train", self.train_x, self.train_g), ("test", self.test_x, self.test_g)):
            flat = x.flatten(1)
            for code, name in enumerate(self.names):
                members = flat[g == code]
                rows.append({
                    "split": split, "group": name, "n": len(members), "share": len(members) / len(flat),
                    "target": self.targets[code] if self.targets else float("nan"),
                    "brightness": members.mean().item(), "contrast": members.std(dim=1).mean().item(),
                })
        return pd.DataFrame(rows)


def group_names(targets: tuple[float, ...]) -> tuple[str, ...]:
    """'0.3', '0.9'; a repeated target (a null audit) gets '#2', '#3'."""
    names: list[str] = []
    for t in targets:
        base = f"{t:g}"
        names.append(base if base not in names else f"{base}#{sum(n.split('#')[0] == base for n in names) + 1}")
    return tuple(names)


def group_sizes(n: int, proportions: tuple[float, ...]) -> list[int]:
    """Largest-remainder rounding of n * proportions; every group gets at least one image."""
    raw = np.asarray(proportions) * n
    sizes = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - sizes), kind="stable")[: n - sizes.sum()]:
        sizes[i] += 1
    if sizes.min() < 1:
        raise UserError(f"{n} images cannot be split into proportions {list(proportions)}: a group would be empty")
    return sizes.tolist()


def make_groups(images: ImageSet, spec: AuditSpec) -> GroupedData:
    """Form the groups the spec asks for."""
    if spec.group_method == "labels":
        return labelled_groups(images, spec.labels)
    if spec.group_method == "select":
        return selected_groups(images, spec)
    return transformed_groups(images, spec)


def transformed_groups(images: ImageSet, spec: AuditSpec) -> GroupedData:
    rng = np.random.default_rng(spec.split_seed)
    split = {}
    for name, x, index, cap in (("train", images.train, images.train_index, spec.limit),
                                ("test", images.test, images.test_index, spec.test_limit)):
        order = torch.from_numpy(rng.permutation(len(x))[: min(cap or len(x), len(x))])
        sizes = group_sizes(len(order), spec.group_proportions)
        codes = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
        split[name] = (x[order], codes, index[order])
    targets = torch.tensor(spec.targets)
    all_x = torch.cat([split["train"][0], split["test"][0]])
    all_t = targets[torch.cat([split["train"][1], split["test"][1]])]
    if spec.contrast == "squeeze":
        out, c = squeeze_to(all_x, all_t), None
    else:
        out, c = match_to(all_x, all_t)
    n_train = len(split["train"][0])
    return GroupedData(group_names(spec.targets), out[:n_train], split["train"][1], split["train"][2],
                       out[n_train:], split["test"][1], split["test"][2], tuple(spec.targets), c)


def squeeze_to(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Plain affine squeeze: scale towards 0 (t <= mean) or towards 1 (t > mean); exact mean, no clipping."""
    shape = (-1,) + (1,) * (x.ndim - 1)
    mu, t = x.flatten(1).mean(1).view(shape), t.view(shape).to(x.dtype)
    down = x * (t / mu.clamp_min(1e-12))
    up = 1 - (1 - x) * ((1 - t) / (1 - mu).clamp_min(1e-12))
    return torch.where(t <= mu, down, up).clamp_(0, 1)


def match_to(x: torch.Tensor, t: torch.Tensor, quantile: float = MATCHED_QUANTILE) -> tuple[torch.Tensor, float]:
    """Contrast-matched brightness map y = clip(b + c (z - mean z)), one c for all images.

    z is x or its negative 1 - x, whichever can carry more contrast at the target;
    b is found per image by bisection so that mean(y) == t despite clipping.
    """
    flat = x.flatten(1).double()
    t = t.double()
    mu, lo, hi = flat.mean(1), flat.min(1).values, flat.max(1).values

    def room(mu, lo, hi):  # the largest c that keeps y in [0, 1] without clipping
        below = torch.where(mu - lo > 1e-12, t / (mu - lo).clamp_min(1e-12), torch.full_like(mu, torch.inf))
        above = torch.where(hi - mu > 1e-12, (1 - t) / (hi - mu).clamp_min(1e-12), torch.full_like(mu, torch.inf))
        return torch.minimum(below, above)

    keep, flip = room(mu, lo, hi), room(1 - mu, 1 - hi, 1 - lo)
    use_flip = flip > keep
    z = torch.where(use_flip[:, None], 1 - flat, flat)
    room_best = torch.minimum(torch.maximum(keep, flip), torch.tensor(1e6, dtype=flat.dtype))
    # per target, so that at most `quantile` of any group's images clip, whatever the group proportions
    c = min(torch.quantile(room_best[t == target], quantile).item() for target in torch.unique(t))
    centred = c * (z - z.mean(1, keepdim=True))  # (N, M)
    lo_b, hi_b = -centred.max(1).values, 1 - centred.min(1).values  # mean(clip(b + centred)) is 0 at lo_b, 1 at hi_b
    for _ in range(50):  # bisection: mean(clip(b + centred)) is nondecreasing in b
        mid = (lo_b + hi_b) / 2
        too_dark = (mid[:, None] + centred).clamp(0, 1).mean(1) < t
        lo_b, hi_b = torch.where(too_dark, mid, lo_b), torch.where(too_dark, hi_b, mid)
    y = ((lo_b + hi_b)[:, None] / 2 + centred).clamp(0, 1)
    return y.to(x.dtype).view_as(x), c


def selected_groups(images: ImageSet, spec: AuditSpec) -> GroupedData:
    """Real images chosen by their own brightness: for each target, the unused images closest to it."""
    parts = {}
    for split, x, index, cap in (("train", images.train, images.train_index, spec.limit),
                                 ("test", images.test, images.test_index, spec.test_limit)):
        brightness = x.flatten(1).mean(1).double()
        n = min(cap or len(x), len(x))
        free = torch.ones(len(x), dtype=torch.bool)
        chosen, codes = [], []
        for code, (t, size) in enumerate(zip(spec.targets, group_sizes(n, spec.group_proportions))):
            distance = torch.where(free, (brightness - t).abs(), torch.inf)
            pick = torch.argsort(distance, stable=True)[:size]
            got = brightness[pick].mean().item()
            if len(pick) < size or torch.isinf(distance[pick]).any() or abs(got - t) > spec.tolerance:
                raise UserError(
                    f"select: target {t:g} cannot be reached with {size} {split} images of {images.name}: the "
                    f"closest {size} average {got:.3f} (allowed +-{spec.tolerance:g}; image brightness ranges "
                    f"{brightness.min():.2f}..{brightness.max():.2f}); lower --limit, move the target, "
                    "or use --group-method transform")
            free[pick] = False
            chosen.append(pick)
            codes.append(torch.full((size,), code))
        pick = torch.cat(chosen)
        parts[split] = (x[pick], torch.cat(codes), index[pick])
    return GroupedData(group_names(spec.targets), *parts["train"], *parts["test"], targets=tuple(spec.targets))


def read_labels(path: str | Path) -> dict[str, str]:
    """CSV with a header: a key column ('file' or 'index') and a 'group' column."""
    path = Path(path)
    try:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        raise UserError(f"{path}: labels CSV not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{path}: cannot read labels CSV ({e})") from None
    header = set(rows[0]) if rows else set()
    key = "file" if "file" in header else "index" if "index" in header else None
    if key is None or "group" not in header:
        raise UserError(f"{path}: labels CSV needs a header with 'file' (or 'index') and 'group' columns, "
                        f"got {sorted(header) or 'no rows'}")
    labels: dict[str, str] = {}
    for line, row in enumerate(rows, start=2):
        k, g = (row.get(key) or "").strip(), (row.get("group") or "").strip()
        if not k or not g:
            raise UserError(f"{path}:{line}: empty {key} or group")
        if k in labels and labels[k] != g:
            raise UserError(f"{path}:{line}: {key} '{k}' is labelled twice ('{labels[k]}' and '{g}')")
        labels[k] = g
    return labels


def labelled_groups(images: ImageSet, labels_csv: str | Path | None) -> GroupedData:
    """Groups from a user's CSV, for the image-folder dataset."""
    if images.files is None:
        raise UserError(f"labels: group labels from a CSV need --dataset folder, not '{images.name}'")
    labels = read_labels(labels_csv)
    files = images.files
    by_index = {str(i): f for i, f in enumerate(files)}
    keyed = {by_index.get(k, k): g for k, g in labels.items()}
    unknown = sorted(set(keyed) - set(files))
    if unknown:
        raise UserError(f"{labels_csv}: {len(unknown)} label(s) name no image in the folder, e.g. '{unknown[0]}'")
    missing = [f for f in files if f not in keyed]
    if missing:
        raise UserError(f"{labels_csv}: {len(missing)} image(s) have no label, e.g. '{missing[0]}'")
    names = tuple(sorted(set(keyed.values())))
    if len(names) < 2:
        raise UserError(f"{labels_csv}: all images are in one group '{names[0]}'; need two or more groups")
    code = {n: i for i, n in enumerate(names)}
    g_train = torch.tensor([code[keyed[files[i]]] for i in images.train_index.tolist()])
    g_test = torch.tensor([code[keyed[files[i]]] for i in images.test_index.tolist()])
    for i, name in enumerate(names):
        if not (g_test == i).any() or not (g_train == i).any():
            split = "test" if not (g_test == i).any() else "train"
            raise UserError(f"{labels_csv}: group '{name}' has no {split} images after the 80/20 split; "
                            "label more images in that group")
    return GroupedData(names, images.train, g_train, images.train_index, images.test, g_test, images.test_index)

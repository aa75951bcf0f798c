"""Groups of images: brightness splits (the teaching question) or the user's own labels.

Three ways to form groups, all giving the same proportions in the train and test splits:

* ``transform``: a random split, each image mapped to its group's target brightness.
  - ``contrast="squeeze"``: the plain affine squeeze towards 0 or 1. Exact mean, no
    clipping, but contrast shrinks by t/mu or (1-t)/(1-mu): a group squeezed towards 1
    becomes low-contrast and easy to reconstruct, which masquerades as a loss effect.
  - ``contrast="matched"`` (default): y = clip(b + c*(z - mean z)), with z the image or its
    negative 1 - x, one contrast factor c shared by every image of every group, and b set
    per image so the mean hits the target exactly. All groups keep the same contrast
    distribution; the price is that c is set by the hardest target (c = the smallest, over
    targets, of the 5th percentile of what that target's images could carry unclipped), so
    every group loses some contrast, and at most ~5% of any group's images clip a few pixels.
  - ``polarity``: which z. ``auto`` (default) takes, per image, whichever of x and 1 - x leaves
    more room at its target, so bright-group images are often negatives; ``keep`` never flips
    (both groups positive: lower contrast), ``invert`` always flips (both groups negative).
  What the transform did is recorded per image (`negative`, `clipped` pixels) and reported per
  split and group by `GroupedData.describe` (`negative_share`, `clipped_share`), beside the
  brightness and contrast it produced.
* ``select``: real images picked by their own brightness, pixels untouched.
* ``labels``: a CSV mapping image-folder files (or their indices) to group names.

With ``epochs = "auto"`` a validation split is carved from the training images
(`with_validation`): stratified by group, VALIDATION_FRACTION of each group, seeded by split_seed.
Training never sees it; the stopping rule reads it (train.py). The test split is never used for that.
"""

from __future__ import annotations

import csv
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .data import ImageSet
from .errors import UserError
from .spec import AuditSpec

MATCHED_QUANTILE = 0.05  # share of each group's images allowed to clip under contrast="matched"
VALIDATION_FRACTION = 0.1  # of each group's training images, held out for epochs="auto"
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class GroupedData:
    """Train and test images with an integer group code per image; `names[code]` is the group.

    `*_negative` (bool) and `*_clipped` (pixel counts) say, per image, what the brightness transform
    did: None when pixels are untouched (select, labels), i.e. no image flipped and no pixel clipped.
    `val_*` is the validation split carved from the training images (None unless epochs="auto").
    """

    names: tuple[str, ...]
    train_x: torch.Tensor  # (N, C, H, W) in [0, 1]
    train_g: torch.Tensor  # (N,) int64
    train_index: torch.Tensor  # (N,) index into the original dataset
    test_x: torch.Tensor
    test_g: torch.Tensor
    test_index: torch.Tensor
    targets: tuple[float, ...] | None = None
    contrast_factor: float | None = None  # c, for contrast="matched"
    train_negative: torch.Tensor | None = None  # (N,) bool: the image was replaced by its negative 1 - x
    train_clipped: torch.Tensor | None = None  # (N,) int64: pixels the transform clipped to 0 or 1
    test_negative: torch.Tensor | None = None
    test_clipped: torch.Tensor | None = None
    val_x: torch.Tensor | None = None
    val_g: torch.Tensor | None = None
    val_index: torch.Tensor | None = None
    val_negative: torch.Tensor | None = None
    val_clipped: torch.Tensor | None = None

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None:
        """(x, g, negative, clipped) of split 'train', 'validation' or 'test'; None for an absent validation split."""
        prefix = {"train": "train", "validation": "val", "test": "test"}[name]
        x = getattr(self, f"{prefix}_x")
        if x is None:
            return None
        return x, getattr(self, f"{prefix}_g"), getattr(self, f"{prefix}_negative"), getattr(self, f"{prefix}_clipped")

    def describe(self) -> pd.DataFrame:
        """Per split and group, as measured: brightness (mean pixel), contrast (mean per-image pixel std),
        negative_share (images flipped to their negative) and clipped_share (pixels clipped by the transform)."""
        rows = []
        for split in SPLITS:
            parts = self.split(split)
            if parts is None:
                continue
            x, g, negative, clipped = parts
            flat = x.flatten(1)
            for code, name in enumerate(self.names):
                member = g == code
                members = flat[member]
                n = len(members)
                rows.append({
                    "split": split, "group": name, "n": n, "share": n / len(flat),
                    "target": self.targets[code] if self.targets else float("nan"),
                    "brightness": members.mean().item(), "contrast": members.std(dim=1).mean().item(),
                    "negative_share": negative[member].double().mean().item() if negative is not None else 0.0,
                    "clipped_share": (clipped[member].sum().item() / max(members.numel(), 1)) if clipped is not None else 0.0,
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
    """Form the groups the spec asks for (and, for epochs="auto", carve the validation split)."""
    if spec.group_method == "labels":
        data = labelled_groups(images, spec.labels)
    elif spec.group_method == "select":
        data = selected_groups(images, spec)
    else:
        data = transformed_groups(images, spec)
    return with_validation(data, seed=spec.split_seed) if spec.epochs == "auto" else data


def with_validation(data: GroupedData, *, fraction: float = VALIDATION_FRACTION, seed: int = 0) -> GroupedData:
    """Move `fraction` of each group's training images (at least one, at most all but one) to a validation split.

    Stratified by group, so the validation split has the training proportions; seeded, so it is the same
    split every time the spec is run (its own stream, apart from the group assignment's).
    """
    rng = np.random.default_rng([seed, 1])
    g = data.train_g.numpy()
    val = []
    for code, name in enumerate(data.names):
        members = np.flatnonzero(g == code)
        if len(members) < 2:
            raise UserError(f"epochs auto: group '{name}' has {len(members)} training image(s); a validation split "
                            "needs at least 2 per group (raise --limit or give a number of epochs)")
        k = min(max(1, round(fraction * len(members))), len(members) - 1)
        val.append(np.sort(rng.choice(members, size=k, replace=False)))
    is_val = np.zeros(len(g), dtype=bool)
    is_val[np.concatenate(val)] = True
    keep, held = torch.from_numpy(np.flatnonzero(~is_val)), torch.from_numpy(np.flatnonzero(is_val))

    def pick(t: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor | None:
        return None if t is None else t[idx]

    return dataclasses.replace(
        data, train_x=data.train_x[keep], train_g=data.train_g[keep], train_index=data.train_index[keep],
        train_negative=pick(data.train_negative, keep), train_clipped=pick(data.train_clipped, keep),
        val_x=data.train_x[held], val_g=data.train_g[held], val_index=data.train_index[held],
        val_negative=pick(data.train_negative, held), val_clipped=pick(data.train_clipped, held))


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
        flip = spec.polarity == "invert"
        out = squeeze_to(1 - all_x if flip else all_x, all_t)
        c, negative, clipped = None, torch.full((len(all_x),), flip), torch.zeros(len(all_x), dtype=torch.long)
    else:
        matched = match_to(all_x, all_t, polarity=spec.polarity)
        out, c, negative, clipped = matched.y, matched.c, matched.negative, matched.clipped
    n = len(split["train"][0])
    return GroupedData(group_names(spec.targets), out[:n], split["train"][1], split["train"][2],
                       out[n:], split["test"][1], split["test"][2], tuple(spec.targets), c,
                       train_negative=negative[:n], train_clipped=clipped[:n],
                       test_negative=negative[n:], test_clipped=clipped[n:])


def squeeze_to(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Plain affine squeeze: scale towards 0 (t <= mean) or towards 1 (t > mean); exact mean, no clipping."""
    shape = (-1,) + (1,) * (x.ndim - 1)
    mu, t = x.flatten(1).mean(1).view(shape), t.view(shape).to(x.dtype)
    down = x * (t / mu.clamp_min(1e-12))
    up = 1 - (1 - x) * ((1 - t) / (1 - mu).clamp_min(1e-12))
    return torch.where(t <= mu, down, up).clamp_(0, 1)


POLARITIES = ("auto", "keep", "invert")


@dataclass(frozen=True)
class Matched:
    """The result of `match_to`: the images, the shared contrast factor, and per image what was done."""

    y: torch.Tensor  # like x: clip(b + c (z - mean z)), in x's dtype
    c: float  # the one contrast factor
    offset: torch.Tensor  # (N,) float64: b, solved so that mean(y) = t
    negative: torch.Tensor  # (N,) bool: z = 1 - x (the image's negative)
    clipped: torch.Tensor  # (N,) int64: pixels of b + c (z - mean z) outside [0, 1]


def match_to(x: torch.Tensor, t: torch.Tensor, quantile: float = MATCHED_QUANTILE, *, polarity: str = "auto",
             block: int = 1024) -> Matched:
    """Contrast-matched brightness map y = clip(b + c (z - mean z)), one c for all images.

    z is x or its negative 1 - x (`polarity`: per image whichever can carry more contrast at its
    target, never the negative, or always). c is the largest factor that at most `quantile` of each
    target's images cannot carry unclipped. b solves mean(clip(b + centred)) = t exactly: an image
    that does not clip at b = t has b = t (centred has mean 0; whether it clips follows from the
    image's min and max); the few others are solved on the exact linear piece of that monotone
    piecewise-linear function (`_solve_offsets`). Float64 inside, `block` images at a time (a few MB
    that stay in cache); y is rounded once to x's dtype.
    """
    if polarity not in POLARITIES:
        raise UserError(f"unknown polarity '{polarity}'; allowed: {', '.join(POLARITIES)}")
    flat = x.flatten(1)
    n = len(flat)
    t = t.double()
    # in blocks: float64 copies of a few MB stay in cache, where one of all images (70,000 x 784) does not
    mu = torch.cat([flat[i:i + block].double().mean(1) for i in range(0, n, block)])
    lo, hi = flat.amin(1).double(), flat.amax(1).double()  # (8x faster than torch.aminmax here, measured)

    def room(mu, lo, hi):  # the largest c that keeps y in [0, 1] without clipping
        below = torch.where(mu - lo > 1e-12, t / (mu - lo).clamp_min(1e-12), torch.full_like(mu, torch.inf))
        above = torch.where(hi - mu > 1e-12, (1 - t) / (hi - mu).clamp_min(1e-12), torch.full_like(mu, torch.inf))
        return torch.minimum(below, above)

    keep, flip = room(mu, lo, hi), room(1 - mu, 1 - hi, 1 - lo)
    negative = {"auto": flip > keep, "keep": torch.zeros(n, dtype=torch.bool),
                "invert": torch.ones(n, dtype=torch.bool)}[polarity]
    room_used = torch.minimum(torch.where(negative, flip, keep), torch.tensor(1e6, dtype=torch.float64))
    # per target, so that at most `quantile` of any group's images clip, whatever the group proportions
    c = min(torch.quantile(room_used[t == target], quantile).item() for target in torch.unique(t))
    # centred = c (z - mean z) = slope (x - mu), slope = -c for a negative: its range follows from lo and hi
    slope = torch.full((n,), c, dtype=torch.float64).masked_fill_(negative, -c)  # float64: c must not round
    ends = torch.stack([slope * (lo - mu), slope * (hi - mu)])
    clips = torch.nonzero((t + ends.min(0).values < 0) | (t + ends.max(0).values > 1)).flatten()  # b = t would clip
    offset = t.clone()
    clipped = torch.zeros(n, dtype=torch.long)
    if len(clips):  # solved exactly (few: at most `quantile` of each group)
        centred = slope[clips, None] * (flat[clips].double() - mu[clips, None])
        offset[clips] = _solve_offsets(centred, t[clips])
        v = offset[clips, None] + centred
        clipped[clips] = ((v < 0) | (v > 1)).sum(1)
    y = torch.empty_like(flat)
    shift = offset - slope * mu  # y = clip(shift + slope x), in float64, then rounded once to x's dtype
    for start in range(0, n, block):
        part = slice(start, start + block)
        y[part] = torch.addcmul(shift[part, None], flat[part].double(), slope[part, None]).clamp_(0, 1)
    return Matched(y.view_as(x), c, offset, negative, clipped)


def _solve_offsets(centred: torch.Tensor, t: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """b with mean(clip(b + v)) = t per row of v = `centred` (n, M), exactly (float64 rounding).

    f(b) = mean(clip(b + v)) is continuous, nondecreasing and linear between its knots {-v_j} and
    {1 - v_j}: f is evaluated at every knot from the sorted pixels and their prefix sums, the piece
    where f crosses t is found by a binary search, and on that piece (fixed sets of pixels at 0,
    at 1 and in between) f(b) = t is solved in closed form. f = 0 at the lowest knot and 1 at the
    highest, so every t in (0, 1) has a piece.
    """
    out = torch.empty(len(centred), dtype=torch.float64)
    m = centred.shape[1]
    for start in range(0, len(centred), block):
        v = centred[start:start + block].sort(1).values  # (n, M) ascending
        prefix = torch.nn.functional.pad(v.cumsum(1), (1, 0))  # prefix[:, k] = sum of the k smallest
        tb = t[start:start + block, None]

        def pieces(b):  # per candidate b (n, K): pixels at 0, the index past the in-between ones, f(b)
            n0 = torch.searchsorted(v, -b, right=True)  # v_j <= -b: clipped to 0
            n_below_1 = torch.searchsorted(v, 1 - b)  # v_j < 1 - b: below 1; the rest sit at 1
            inside = prefix.gather(1, n_below_1) - prefix.gather(1, n0)
            return n0, n_below_1, (m - n_below_1 + (n_below_1 - n0) * b + inside) / m

        knots = torch.cat([-v, 1 - v], 1).sort(1).values  # (n, 2M)
        f = pieces(knots)[2]
        k = torch.searchsorted(f, tb).clamp_(1, 2 * m - 1)  # first knot with f >= t; the piece is [k-1, k]
        mid = (knots.gather(1, k - 1) + knots.gather(1, k)) / 2
        n0, n_below_1, _ = pieces(mid)
        inside = prefix.gather(1, n_below_1) - prefix.gather(1, n0)
        count = (n_below_1 - n0).double()
        # on the piece: (M - n_below_1) + count * b + inside = t M
        exact = (tb * m - (m - n_below_1) - inside) / count.clamp_min(1)
        out[start:start + block] = torch.where(count > 0, exact, knots.gather(1, k)).squeeze(1)
    return out


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

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
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .data import TEST_FRACTION, ImageSet
from .errors import UserError
from .spec import POLARITIES, AuditSpec

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
                rows.append(
                    {
                        "split": split,
                        "group": name,
                        "n": n,
                        "share": n / len(flat),
                        "target": self.targets[code] if self.targets else float("nan"),
                        "brightness": members.mean().item(),
                        "contrast": members.std(dim=1).mean().item(),
                        "negative_share": negative[member].double().mean().item() if negative is not None else 0.0,
                        "clipped_share": (clipped[member].sum().item() / max(members.numel(), 1))
                        if clipped is not None
                        else 0.0,
                    }
                )
        return pd.DataFrame(rows)


def names_for_targets(targets: tuple[float, ...]) -> tuple[str, ...]:
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
        data = labelled_groups(images, spec)
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
            raise UserError(
                f"epochs auto: group '{name}' has {len(members)} training image(s); a validation split "
                "needs at least 2 per group (raise --limit or give a number of epochs)"
            )
        k = min(max(1, round(fraction * len(members))), len(members) - 1)
        val.append(np.sort(rng.choice(members, size=k, replace=False)))
    is_val = np.zeros(len(g), dtype=bool)
    is_val[np.concatenate(val)] = True
    keep, held = torch.from_numpy(np.flatnonzero(~is_val)), torch.from_numpy(np.flatnonzero(is_val))

    def pick(t: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor | None:
        return None if t is None else t[idx]

    return dataclasses.replace(
        data,
        train_x=data.train_x[keep],
        train_g=data.train_g[keep],
        train_index=data.train_index[keep],
        train_negative=pick(data.train_negative, keep),
        train_clipped=pick(data.train_clipped, keep),
        val_x=data.train_x[held],
        val_g=data.train_g[held],
        val_index=data.train_index[held],
        val_negative=pick(data.train_negative, held),
        val_clipped=pick(data.train_clipped, held),
    )


def transformed_groups(images: ImageSet, spec: AuditSpec) -> GroupedData:
    rng = np.random.default_rng(spec.split_seed)
    split = {}
    for name, x, index, cap in (
        ("train", images.train, images.train_index, spec.limit),
        ("test", images.test, images.test_index, spec.test_limit),
    ):
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
    return GroupedData(
        names_for_targets(spec.targets),
        out[:n],
        split["train"][1],
        split["train"][2],
        out[n:],
        split["test"][1],
        split["test"][2],
        tuple(spec.targets),
        c,
        train_negative=negative[:n],
        train_clipped=clipped[:n],
        test_negative=negative[n:],
        test_clipped=clipped[n:],
    )


def squeeze_to(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Plain affine squeeze: scale towards 0 (t <= mean) or towards 1 (t > mean); exact mean, no clipping."""
    shape = (-1,) + (1,) * (x.ndim - 1)
    mu, t = x.flatten(1).mean(1).view(shape), t.view(shape).to(x.dtype)
    down = x * (t / mu.clamp_min(1e-12))
    up = 1 - (1 - x) * ((1 - t) / (1 - mu).clamp_min(1e-12))
    return torch.where(t <= mu, down, up).clamp_(0, 1)


@dataclass(frozen=True)
class Matched:
    """The result of `match_to`: the images, the shared contrast factor, and per image what was done."""

    y: torch.Tensor  # like x: clip(b + c (z - mean z)), in x's dtype
    c: float  # the one contrast factor
    offset: torch.Tensor  # (N,) float64: b, solved so that mean(y) = t
    negative: torch.Tensor  # (N,) bool: z = 1 - x (the image's negative)
    clipped: torch.Tensor  # (N,) int64: pixels of b + c (z - mean z) outside [0, 1]


def match_to(
    x: torch.Tensor, t: torch.Tensor, quantile: float = MATCHED_QUANTILE, *, polarity: str = "auto", block: int = 1024
) -> Matched:
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
    mu = torch.cat([flat[i : i + block].double().mean(1) for i in range(0, n, block)])
    lo, hi = flat.amin(1).double(), flat.amax(1).double()  # (8x faster than torch.aminmax here, measured)

    def room(mu, lo, hi):  # the largest c that keeps y in [0, 1] without clipping
        below = torch.where(mu - lo > 1e-12, t / (mu - lo).clamp_min(1e-12), torch.full_like(mu, torch.inf))
        above = torch.where(hi - mu > 1e-12, (1 - t) / (hi - mu).clamp_min(1e-12), torch.full_like(mu, torch.inf))
        return torch.minimum(below, above)

    keep, flip = room(mu, lo, hi), room(1 - mu, 1 - hi, 1 - lo)
    negative = {
        "auto": flip > keep,
        "keep": torch.zeros(n, dtype=torch.bool),
        "invert": torch.ones(n, dtype=torch.bool),
    }[polarity]
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
        v = centred[start : start + block].sort(1).values  # (n, M) ascending
        prefix = torch.nn.functional.pad(v.cumsum(1), (1, 0))  # prefix[:, k] = sum of the k smallest
        tb = t[start : start + block, None]

        def pieces(
            b, v=v, prefix=prefix
        ):  # per candidate b (n, K): pixels at 0, the index past the in-between ones, f(b)
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
        out[start : start + block] = torch.where(count > 0, exact, knots.gather(1, k)).squeeze(1)
    return out


def selected_groups(images: ImageSet, spec: AuditSpec) -> GroupedData:
    """Real images chosen by their own brightness: for each target, the unused images closest to it."""
    parts = {}
    for split, x, index, cap in (
        ("train", images.train, images.train_index, spec.limit),
        ("test", images.test, images.test_index, spec.test_limit),
    ):
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
                    "or use --group-method transform"
                )
            free[pick] = False
            chosen.append(pick)
            codes.append(torch.full((size,), code))
        pick = torch.cat(chosen)
        parts[split] = (x[pick], torch.cat(codes), index[pick])
    return GroupedData(names_for_targets(spec.targets), *parts["train"], *parts["test"], targets=tuple(spec.targets))


LABEL_DELIMITERS = (",", ";", "\t")
LABEL_SPLITS = ("train", "test")  # what a labels CSV split column may say


@dataclass(frozen=True)
class Label:
    """One row of a labels CSV: the image it names (a path or an index, as written), its group and split."""

    key: str
    group: str
    split: str | None  # 'train' / 'test' from a split column, else None
    line: int

    def said(self) -> str:
        """What the row says, in a message: "group 'a'" or "group 'a', split test"."""
        return f"group '{self.group}'" + (f", split {self.split}" if self.split is not None else "")


def _twice(path: Path | str, label: Label, first: Label, key: str) -> UserError:
    """A file labelled on two rows: one line naming both. An exact duplicate is refused too: every row of a
    labels CSV names one image, so a repeated row means the file is not what its author thinks (two exports
    pasted together, a row copied instead of edited), and group sizes counted from the CSV would be wrong."""
    if (first.group, first.split) == (label.group, label.split):
        return UserError(
            f"{path}:{label.line}: {key} '{label.key}' is listed twice, the same way on line {first.line} "
            f"({label.said()}); each image takes one row: delete one of the two"
        )
    return UserError(
        f"{path}:{label.line}: {key} '{label.key}' is labelled twice (line {first.line}: {first.said()}; "
        f"here: {label.said()})"
    )


def read_labels(path: str | Path) -> list[Label]:
    """A labels CSV as spreadsheets write them: UTF-8 with or without a byte-order mark, CRLF or LF,
    ',' ';' or tab between fields (read from the header line), headers in any case.

    Columns: 'file' (or 'index') and 'group', optionally 'split' (train/test); others are ignored.
    """
    path = Path(path)
    header, rows = read_csv(path, "labels CSV")
    key = "file" if "file" in header else "index" if "index" in header else None
    if key is None or "group" not in header:
        raise UserError(
            f"{path}: labels CSV needs a header with 'file' (or 'index') and 'group' columns "
            f"(any case; ',' ';' or tab between them), got {header or 'an empty file'}"
        )
    col = {name: header.index(name) for name in (key, "group", "split") if name in header}
    labels: list[Label] = []
    seen: dict[str, Label] = {}
    for line, row in rows:
        cells = {name: (row[i].strip() if i < len(row) else "") for name, i in col.items()}
        if not cells[key] or not cells["group"]:
            raise UserError(f"{path}:{line}: empty {key} or group")
        split = cells.get("split")
        if split is not None:
            split = split.lower()
            if split not in LABEL_SPLITS:
                raise UserError(f"{path}:{line}: split '{cells['split']}' is not train or test")
        label = Label(cells[key], cells["group"], split, line)
        first = seen.setdefault(label.key, label)
        if first is not label:
            raise _twice(path, label, first, key)
        labels.append(label)
    if not labels:
        raise UserError(f"{path}: labels CSV has a header but no rows")
    return labels


def read_csv(path: Path, what: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """A CSV as spreadsheets write it: (lower-case header, [(line number, cells)]), blank lines skipped.

    UTF-8 with or without a byte-order mark (anything else is refused with the line it fails on),
    CRLF or LF, and ',' ';' or tab between fields, whichever the header line uses most.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: {what} not found") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read {what} ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(
            f"{path}:{line}: not UTF-8 (byte 0x{raw[e.start]:02x}); save it as 'CSV UTF-8' "
            "(e.g. in a spreadsheet: Save As, CSV UTF-8)"
        ) from None
    header_line = text.splitlines()[0] if text.strip() else ""
    delimiter = max(LABEL_DELIMITERS, key=header_line.count)
    try:
        rows = list(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter))
    except csv.Error as e:
        raise UserError(f"{path}: cannot read {what} ({e})") from None
    header = [h.strip().lower() for h in rows[0]] if rows else []
    return header, [(line, row) for line, row in enumerate(rows[1:], start=2) if any(c.strip() for c in row)]


def read_file_list(path: str | Path) -> list[str]:
    """The images a model was trained on: a CSV with a 'file' (or 'index') column, e.g. fairrecon's
    split.csv or a labels CSV; with a 'split' column only its 'train' rows count."""
    path = Path(path)
    header, rows = read_csv(path, "file list")
    key = "file" if "file" in header else "index" if "index" in header else None
    if key is None:
        raise UserError(f"{path}: needs a header with a 'file' (or 'index') column, got {header or 'an empty file'}")
    k, split = header.index(key), header.index("split") if "split" in header else None
    return [
        row[k].strip().replace("\\", "/")
        for _, row in rows
        if k < len(row) and (split is None or (split < len(row) and row[split].strip().lower() == "train"))
    ]


def resolve_labels(
    labels: list[Label], images: ImageSet, labels_csv: str | Path, data_root: str | Path
) -> dict[str, Label]:
    """Each image file (relative to the data root) -> its label. A file may be written relative to
    the data root ('face_000.png') or to the CSV's folder ('images/face_000.png'), or by index."""
    files, csv_path = images.files, Path(labels_csv)
    known, skipped = set(files), set(images.skipped)
    named = known | skipped
    root = Path(data_root).resolve()
    by_file: dict[str, Label] = {}
    unknown = []
    for label in labels:
        key = label.key.replace("\\", "/")
        name = files[int(key)] if key.isdigit() and int(key) < len(files) else key
        if name not in named:
            beside_csv = (csv_path.parent / key).resolve()
            if beside_csv.is_relative_to(root):
                name = beside_csv.relative_to(root).as_posix()
        if name in skipped:
            continue  # an unreadable image left out with --skip-bad-images: its label goes with it
        if name not in known:
            unknown.append(label)
            continue
        if name in by_file:  # the same image named two ways ('a.png', 'images/a.png', its index)
            raise _twice(csv_path, label, by_file[name], "image")
        by_file[name] = label
    if unknown:
        raise UserError(
            f"{csv_path}:{unknown[0].line}: {len(unknown)} label(s) name no image in the folder "
            f"{data_root}, e.g. '{unknown[0].key}' (paths may be relative to the folder or to the CSV)"
        )
    missing = [f for f in files if f not in by_file]
    if missing:
        raise UserError(f"{csv_path}: {len(missing)} image(s) have no label, e.g. '{missing[0]}'")
    return by_file


def labelled_groups(images: ImageSet, spec: AuditSpec) -> GroupedData:
    """Groups from a user's CSV, for the image-folder dataset.

    The held-out split is the CSV's `split` column when it has one (the user decides); otherwise
    `TEST_FRACTION` of each group, drawn with `split_seed` (stratified, so every group is held out in
    the same proportion). `limit` and `test_limit` then keep a stratified subset of each split.
    """
    if images.files is None:
        raise UserError(f"labels: group labels from a CSV need --dataset folder, not '{images.name}'")
    by_file = resolve_labels(read_labels(spec.labels), images, spec.labels, spec.data_root)
    files = images.files
    x = torch.cat([images.train, images.test])[torch.cat([images.train_index, images.test_index]).argsort()]
    names = tuple(sorted({label.group for label in by_file.values()}))
    if len(names) < 2:
        raise UserError(f"{spec.labels}: all images are in one group '{names[0]}'; need two or more groups")
    code = {n: i for i, n in enumerate(names)}
    g = torch.tensor([code[by_file[f].group] for f in files])
    given = [by_file[f].split for f in files]
    if any(s is not None for s in given):
        is_test = torch.tensor([s == "test" for s in given])
    else:
        is_test = _stratified_test(g, len(names), spec.split_seed, spec.labels, names)
    rng = np.random.default_rng(spec.split_seed)
    parts = []
    for split, members, cap in (("train", ~is_test, spec.limit), ("test", is_test, spec.test_limit)):
        index = torch.nonzero(members).flatten()
        if cap is not None and cap < len(index):
            index = _stratified_subset(index, g[index], cap, rng, split, names)
        for i, name in enumerate(names):
            if not (g[index] == i).any():
                raise UserError(
                    f"{spec.labels}: group '{name}' has no {split} images"
                    + (
                        " (see its split column)"
                        if given[0] is not None
                        else f" after holding out {TEST_FRACTION:.0%} of each group"
                    )
                    + "; label more images in it"
                )
        parts.append((x[index], g[index], index))
    return GroupedData(names, *parts[0], *parts[1])


def _stratified_test(g: torch.Tensor, n_groups: int, seed: int, labels_csv, names) -> torch.Tensor:
    """TEST_FRACTION of each group (rounded, at least one) held out, chosen by a seeded permutation."""
    rng = np.random.default_rng(seed)
    is_test = torch.zeros(len(g), dtype=torch.bool)
    for i in range(n_groups):
        members = torch.nonzero(g == i).flatten().numpy()
        if len(members) < 2:
            raise UserError(
                f"{labels_csv}: group '{names[i]}' has {len(members)} image(s); a group needs at "
                "least 2, one to train on and one to hold out"
            )
        n_test = max(1, int(round(len(members) * TEST_FRACTION)))
        is_test[rng.permutation(members)[:n_test]] = True
    return is_test


def _stratified_subset(
    index: torch.Tensor, g: torch.Tensor, cap: int, rng: np.random.Generator, split: str, names
) -> torch.Tensor:
    """`cap` of `index`, each group keeping its share (largest remainder), drawn by a seeded permutation."""
    counts = torch.bincount(g, minlength=len(names)).numpy()
    try:
        sizes = group_sizes(cap, tuple(counts / counts.sum()))
    except UserError:
        raise UserError(
            f"--{'limit' if split == 'train' else 'test-limit'} {cap} is too small to keep every "
            f"group in the {split} split ({dict(zip(names, counts.tolist()))} images)"
        ) from None
    keep = [rng.permutation(index[g == i].numpy())[:size] for i, size in enumerate(sizes)]
    return torch.from_numpy(np.sort(np.concatenate(keep)))


def split_table(images: ImageSet, data: GroupedData) -> pd.DataFrame | None:
    """For an image folder: every file with its group and split ('train', 'validation' for epochs=auto's
    stopping rule, 'test', or 'unused' when a limit left it out), so users can train their own model on the
    files the audit's models saw (train and validation) and never on the test files (split.csv)."""
    if images.files is None:
        return None
    rows = {f: ("", "unused") for f in images.files}
    splits = [("train", data.train_index, data.train_g), ("test", data.test_index, data.test_g)]
    if data.val_index is not None:
        splits.append(("validation", data.val_index, data.val_g))
    for split, index, g in splits:
        for i, code in zip(index.tolist(), g.tolist()):
            rows[images.files[i]] = (data.names[code], split)
    return pd.DataFrame([(f, group, split) for f, (group, split) in rows.items()], columns=["file", "group", "split"])

"""Group builders: sizes, brightness and contrast as measured, and the labels CSV."""

import numpy as np
import pytest
import torch
from scipy.optimize import brentq
from torchvision.io import write_png

from fairrecon.data import load_folder, load_images
from fairrecon.errors import UserError
from fairrecon.groups import group_sizes, make_groups, match_to, names_for_targets, squeeze_to, with_validation
from fairrecon.spec import AuditSpec


@pytest.fixture(scope="module")
def digits():
    return load_images("digits")


def image_stats(x):
    flat = x.flatten(1)
    return flat.mean(1), flat.std(1)


def test_group_sizes_follow_proportions_and_sum_to_n():
    assert group_sizes(10, (0.5, 0.5)) == [5, 5]
    assert group_sizes(1437, (0.9, 0.1)) == [1293, 144]  # 1293.3 / 143.7: largest remainder goes to the second
    assert sum(group_sizes(1001, (0.2, 0.3, 0.5))) == 1001
    with pytest.raises(UserError, match="empty"):
        group_sizes(5, (0.95, 0.05))


def test_group_names_are_the_targets_and_stay_unique():
    assert names_for_targets((0.3, 0.9)) == ("0.3", "0.9")
    assert names_for_targets((0.5, 0.5, 0.5)) == ("0.5", "0.5#2", "0.5#3")


def test_squeeze_hits_the_target_and_scales_contrast_by_the_closed_form(digits):
    x = digits.train[:200]
    mu, sd = image_stats(x)
    for t in (0.1, 0.9):
        y = squeeze_to(x, torch.full((200,), t))
        y_mu, y_sd = image_stats(y)
        assert y.min() >= 0 and y.max() <= 1
        torch.testing.assert_close(y_mu, torch.full_like(y_mu, t), atol=1e-5, rtol=0)
        factor = torch.where(torch.tensor(t) <= mu, t / mu, (1 - t) / (1 - mu))
        torch.testing.assert_close(y_sd, sd * factor, atol=1e-5, rtol=1e-4)


def test_matched_contrast_hits_targets_and_keeps_contrast_equal_across_groups(digits):
    x = digits.train
    t = torch.where(torch.arange(len(x)) % 2 == 0, 0.3, 0.9)
    matched = match_to(x, t)
    y, c = matched.y, matched.c
    y_mu, y_sd = image_stats(y)
    assert y.min() >= 0 and y.max() <= 1
    torch.testing.assert_close(y_mu, t.float(), atol=1e-4, rtol=0)  # exact in float64, stored in float32
    dark, bright = y_sd[t == 0.3].mean().item(), y_sd[t == 0.9].mean().item()
    assert abs(dark - bright) / dark < 0.03
    # the plain squeeze, by contrast, leaves the bright group with a fraction of the dark group's contrast
    sq_sd = image_stats(squeeze_to(x, t))[1]
    assert sq_sd[t == 0.9].mean() < 0.5 * sq_sd[t == 0.3].mean()
    # unclipped images are an exact affine map of the image or its negative: contrast = c * original
    _, sd = image_stats(x)
    ratio = y_sd / sd
    assert (ratio <= c + 1e-4).all() and (ratio - c).abs().lt(1e-4).float().mean() > 0.9


def test_matched_contrast_does_not_depend_on_group_proportions(digits):
    """A 10% bright minority gets the same contrast factor and contrast as a balanced split.

    (Regression: a quantile over all images let c rise with a small bright group, so half of it clipped.)
    """
    balanced = make_groups(digits, AuditSpec(limit=1000))
    minority = make_groups(digits, AuditSpec(limit=1000, proportions=(0.9, 0.1)))
    assert minority.contrast_factor == pytest.approx(balanced.contrast_factor, rel=0.05)
    described = minority.describe().query("split == 'train'").set_index("group")["contrast"]
    assert abs(described["0.9"] - described["0.3"]) / described["0.3"] < 0.03


@pytest.mark.parametrize("contrast", ["matched", "squeeze"])
def test_transform_groups_sizes_brightness_and_same_proportions_in_both_splits(digits, contrast):
    spec = AuditSpec(targets=(0.3, 0.9), proportions=(0.9, 0.1), contrast=contrast, limit=1000)
    data = make_groups(digits, spec)
    assert torch.bincount(data.train_g).tolist() == [900, 100]
    assert torch.bincount(data.test_g).tolist() == group_sizes(len(digits.test), (0.9, 0.1))
    described = data.describe()
    assert (described["brightness"] - described["target"]).abs().max() <= spec.tolerance
    for _, row in described.iterrows():  # describe() against an independent computation
        x = data.train_x if row["split"] == "train" else data.test_x
        g = data.train_g if row["split"] == "train" else data.test_g
        members = x[g == data.names.index(row["group"])].numpy().reshape(int(row["n"]), -1)
        assert row["brightness"] == pytest.approx(members.mean(), abs=1e-6)
        assert row["contrast"] == pytest.approx(members.std(axis=1, ddof=1).mean(), abs=1e-6)


def test_three_groups_are_supported(digits):
    data = make_groups(digits, AuditSpec(targets=(0.2, 0.5, 0.8)))
    assert data.names == ("0.2", "0.5", "0.8")
    assert (data.describe()["brightness"] - data.describe()["target"]).abs().max() <= 0.01


def test_select_keeps_real_pixels_and_reaches_reachable_targets(shared_datasets):
    images = load_images("fashion-mnist", shared_datasets)
    spec = AuditSpec(dataset="fashion-mnist", group_method="select", targets=(0.15, 0.45), limit=2000, test_limit=500)
    data = make_groups(images, spec)
    assert torch.bincount(data.train_g).tolist() == [1000, 1000]
    assert (data.describe()["brightness"] - data.describe()["target"]).abs().max() <= 0.01
    torch.testing.assert_close(data.train_x, images.train[data.train_index], rtol=0, atol=0)  # untouched pixels
    assert len(set(data.train_index.tolist())) == 2000  # no image in two groups


def test_select_explains_an_unreachable_target(digits):
    with pytest.raises(
        UserError, match=r"target 0.9 cannot be reached with 500 train images.*--group-method transform"
    ):
        make_groups(digits, AuditSpec(group_method="select", limit=1000))


def write_folder(tmp_path, n=20, shape=(1, 6, 5)):
    tmp_path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        write_png(torch.randint(0, 256, shape, dtype=torch.uint8, generator=g), str(tmp_path / f"img{i:02d}.png"))
    return tmp_path


def test_labels_csv_assigns_the_users_groups(tmp_path):
    folder = write_folder(tmp_path / "imgs")
    rows = ["file,group"] + [f"img{i:02d}.png,{'a' if i % 2 else 'b'}" for i in range(20)]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    images = load_folder(folder)
    data = make_groups(images, AuditSpec(dataset="folder", group_method="labels", labels=str(tmp_path / "labels.csv")))
    assert data.names == ("a", "b")
    for idx, code in zip(
        data.train_index.tolist() + data.test_index.tolist(), data.train_g.tolist() + data.test_g.tolist()
    ):
        assert data.names[code] == ("a" if idx % 2 else "b")  # file imgNN is index NN in sorted order


def test_labels_csv_may_use_indices_and_must_cover_every_image(tmp_path):
    folder = write_folder(tmp_path / "imgs")
    images = load_folder(folder)
    (tmp_path / "by_index.csv").write_text("index,group\n" + "".join(f"{i},{i % 2}\n" for i in range(20)))
    data = make_groups(
        images, AuditSpec(dataset="folder", group_method="labels", labels=str(tmp_path / "by_index.csv"))
    )
    assert data.names == ("0", "1")
    (tmp_path / "short.csv").write_text("file,group\n" + "".join(f"img{i:02d}.png,x{i % 2}\n" for i in range(19)))
    with pytest.raises(UserError, match="1 image.*no label.*img19.png"):
        make_groups(images, AuditSpec(dataset="folder", group_method="labels", labels=str(tmp_path / "short.csv")))


# --- labels CSVs as people produce them (issue 10, item 5) ---------------------------------------


def _labels_spec(folder, csv_path, **kw):
    return AuditSpec(dataset="folder", data_root=str(folder), group_method="labels", labels=str(csv_path), **kw)


@pytest.mark.parametrize(
    "encoding, newline, sep, header",
    [
        ("utf-8-sig", "\r\n", ";", "File;Group"),  # a spreadsheet's "CSV UTF-8" in a ';' locale
        ("utf-8", "\n", "\t", "FILE\tGROUP"),  # tab-separated, shouted header
        ("utf-8", "\r\n", ",", " file , group "),  # spaces around names
    ],
)
def test_spreadsheet_csvs_read_the_same_as_a_plain_one(tmp_path, encoding, newline, sep, header):
    folder = write_folder(tmp_path / "imgs")
    rows = [f"img{i:02d}.png{sep}{'dark' if i < 10 else 'bright'}" for i in range(20)]
    (tmp_path / "plain.csv").write_text("file,group\n" + "".join(r.replace(sep, ",") + "\n" for r in rows))
    (tmp_path / "sheet.csv").write_bytes((header + newline + newline.join(rows) + newline + newline).encode(encoding))
    images = load_folder(folder)
    plain = make_groups(images, _labels_spec(folder, tmp_path / "plain.csv"))
    sheet = make_groups(images, _labels_spec(folder, tmp_path / "sheet.csv"))
    assert sheet.names == plain.names == ("bright", "dark")
    assert torch.equal(sheet.train_index, plain.train_index) and torch.equal(sheet.test_g, plain.test_g)


def test_latin1_names_are_refused_with_the_line_and_what_to_do(tmp_path):
    folder = write_folder(tmp_path / "imgs", n=4)
    (folder / "img01.png").rename(folder / "caf\u00e9.png")
    (tmp_path / "l.csv").write_bytes("file,group\nimg00.png,a\ncaf\u00e9.png,b\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"l.csv:3: not UTF-8 \(byte 0xe9\); save it as 'CSV UTF-8'"):
        make_groups(load_folder(folder), _labels_spec(folder, tmp_path / "l.csv"))
    (tmp_path / "l.csv").write_bytes("file,group\nimg00.png,a\ncaf\u00e9.png,b\nimg02.png,a\nimg03.png,b\n".encode())
    data = make_groups(load_folder(folder), _labels_spec(folder, tmp_path / "l.csv"))  # the same names in UTF-8 work
    assert data.names == ("a", "b")


def test_paths_relative_to_the_csv_and_nested_folders(tmp_path):
    """faces/groups.csv names 'images/men/a.png'; the data root is faces/images: the same file."""
    root = tmp_path / "faces" / "images"
    for sub in ("men", "women"):
        write_folder(root / sub, n=10)
    lines = ["file,group"] + [f"images/{sub}/img{i:02d}.png,{sub}" for sub in ("men", "women") for i in range(10)]
    (tmp_path / "faces" / "groups.csv").write_text("\n".join(lines) + "\n")
    images = load_folder(root)
    assert images.files[:2] == ("men/img00.png", "men/img01.png") and len(images.files) == 20
    data = make_groups(images, _labels_spec(root, tmp_path / "faces" / "groups.csv"))
    for index, code in zip(data.test_index.tolist(), data.test_g.tolist()):
        assert images.files[index].split("/")[0] == data.names[code]  # the group is the subfolder, as labelled


def test_without_a_split_column_the_split_is_stratified_and_seeded(tmp_path):
    """30 'a' and 10 'b': 20% of each group is held out (6 and 2), whatever the seed; seeds differ in which."""
    folder = write_folder(tmp_path / "imgs", n=40)
    (tmp_path / "l.csv").write_text(
        "file,group\n" + "".join(f"img{i:02d}.png,{'b' if i % 4 == 0 else 'a'}\n" for i in range(40))
    )
    images = load_folder(folder)
    tests = []
    for seed in (0, 1):
        data = make_groups(images, _labels_spec(folder, tmp_path / "l.csv", split_seed=seed))
        assert torch.bincount(data.test_g).tolist() == [6, 2] and torch.bincount(data.train_g).tolist() == [24, 8]
        assert set(data.train_index.tolist()).isdisjoint(data.test_index.tolist())
        tests.append(set(data.test_index.tolist()))
    assert tests[0] != tests[1]


def test_a_split_column_decides_and_limits_keep_group_shares(tmp_path):
    folder = write_folder(tmp_path / "imgs", n=40)
    rows = [f"img{i:02d}.png,{'b' if i % 4 == 0 else 'a'},{'Test' if i >= 30 else 'train'}" for i in range(40)]
    (tmp_path / "l.csv").write_text("file,group,split\n" + "\n".join(rows) + "\n")
    images = load_folder(folder)
    data = make_groups(images, _labels_spec(folder, tmp_path / "l.csv"))
    assert sorted(data.test_index.tolist()) == list(range(30, 40))  # exactly the user's test rows
    limited = make_groups(images, _labels_spec(folder, tmp_path / "l.csv", limit=12, test_limit=4))
    # train: 30 images, 22 'a' and 8 'b'; 12 of them by largest remainder: 8.8 -> 9 'a', 3.2 -> 3 'b'
    assert torch.bincount(limited.train_g).tolist() == [9, 3]
    assert torch.bincount(limited.test_g).tolist() == [3, 1]  # test: 8 'a', 2 'b'; 4 of them: 3.2 -> 3, 0.8 -> 1
    assert set(limited.test_index.tolist()) <= set(range(30, 40))  # a limit never moves an image across splits


def bisection_match_to(x, t, quantile=0.05):
    """The previous implementation of match_to (per-image polarity, 50 bisection steps on every image):
    the reference the exact solver must reproduce."""
    flat, t = x.flatten(1).double(), t.double()
    mu, lo, hi = flat.mean(1), flat.min(1).values, flat.max(1).values

    def room(mu, lo, hi):
        below = torch.where(mu - lo > 1e-12, t / (mu - lo).clamp_min(1e-12), torch.full_like(mu, torch.inf))
        above = torch.where(hi - mu > 1e-12, (1 - t) / (hi - mu).clamp_min(1e-12), torch.full_like(mu, torch.inf))
        return torch.minimum(below, above)

    keep, flip = room(mu, lo, hi), room(1 - mu, 1 - hi, 1 - lo)
    z = torch.where((flip > keep)[:, None], 1 - flat, flat)
    room_best = torch.minimum(torch.maximum(keep, flip), torch.tensor(1e6, dtype=flat.dtype))
    c = min(torch.quantile(room_best[t == target], quantile).item() for target in torch.unique(t))
    centred = c * (z - z.mean(1, keepdim=True))
    lo_b, hi_b = -centred.max(1).values, 1 - centred.min(1).values
    for _ in range(50):
        mid = (lo_b + hi_b) / 2
        too_dark = (mid[:, None] + centred).clamp(0, 1).mean(1) < t
        lo_b, hi_b = torch.where(too_dark, mid, lo_b), torch.where(too_dark, hi_b, mid)
    return ((lo_b + hi_b)[:, None] / 2 + centred).clamp(0, 1).to(x.dtype).view_as(x), c


@pytest.fixture(scope="module")
def digits_all(digits):
    x = torch.cat([digits.train, digits.test])
    return x, torch.where(torch.arange(len(x)) % 2 == 0, 0.3, 0.9)


def test_exact_offsets_equal_the_old_bisection_and_a_per_image_root_finder(digits_all):
    x, t = digits_all
    matched = match_to(x, t)
    old_y, old_c = bisection_match_to(x, t)
    assert matched.c == old_c
    # float32 output: both are within float64 rounding of the same b, so y agrees to one float32 ulp (6e-8 at 1)
    torch.testing.assert_close(matched.y, old_y, rtol=0, atol=1.2e-7)
    # images that clip at b = t are solved on their linear piece; scipy's brentq solves them independently
    clipping = torch.nonzero(matched.clipped > 0).flatten()
    assert 0 < len(clipping) < 0.05 * len(x)  # at most the matched quantile of each group clips
    flat = x.flatten(1).double().numpy()
    for i in clipping.tolist():
        z = 1 - flat[i] if matched.negative[i] else flat[i]
        v = matched.c * (z - z.mean())
        ref = brentq(lambda b: np.clip(b + v, 0, 1).mean() - float(t[i]), -v.max(), 1 - v.min(), xtol=1e-15)
        assert matched.offset[i].item() == pytest.approx(ref, abs=1e-12)  # brentq's xtol plus float64 rounding
    # an image that does not clip keeps b = t exactly, since its centred pixels have mean 0
    unclipped = matched.clipped == 0
    assert torch.equal(matched.offset[unclipped], t.double()[unclipped])


def recount(original, y, c):
    """Independent recount from the images alone: flipped when y falls as x rises; clipped pixels where the
    image's own affine map y = a + s c x (fitted on its unclipped pixels, 0 < y < 1) leaves [0, 1].
    Returns (negative, clipped at a 1e-6 margin outside, clipped at a 1e-6 margin inside)."""
    x, y = original.flatten(1).double().numpy(), y.flatten(1).double().numpy()
    negative, strict, loose = [], [], []
    for xi, yi in zip(x, y):
        s = -1.0 if np.corrcoef(xi, yi)[0, 1] < 0 else 1.0
        interior = (yi > 0) & (yi < 1)
        a = np.median(yi[interior] - s * c * xi[interior])
        pred = a + s * c * xi
        negative.append(s < 0)
        strict.append(((pred < -1e-6) | (pred > 1 + 1e-6)).sum())  # 1e-6 >> float32 rounding of y (6e-8)
        loose.append(((pred < 1e-6) | (pred > 1 - 1e-6)).sum())
    return np.array(negative), np.array(strict), np.array(loose)


@pytest.mark.parametrize("polarity", ["auto", "keep", "invert"])
def test_negative_and_clipped_shares_match_a_recount_from_the_images(digits, polarity):
    data = make_groups(digits, AuditSpec(polarity=polarity))
    position = {int(i): k for k, i in enumerate(digits.train_index)}
    original = digits.train[[position[int(i)] for i in data.train_index]]
    negative, strict, loose = recount(original, data.train_x, data.contrast_factor)
    assert np.array_equal(negative, data.train_negative.numpy())
    got = data.train_clipped.numpy()
    assert (strict <= got).all() and (got <= loose).all()
    described = data.describe().query("split == 'train'").set_index("group")
    pixels = original[0].numel()
    for code, name in enumerate(data.names):
        member = (data.train_g == code).numpy()
        assert described.loc[name, "negative_share"] == pytest.approx(negative[member].mean(), abs=1e-12)
        assert strict[member].sum() / (member.sum() * pixels) <= described.loc[name, "clipped_share"] + 1e-12
        assert described.loc[name, "clipped_share"] <= loose[member].sum() / (member.sum() * pixels) + 1e-12
    share = described["negative_share"]
    if polarity == "auto":  # measured: every bright digit is a negative, no dark one
        assert share["0.9"] > 0.9 and share["0.3"] < 0.1
    else:
        assert (share == (1.0 if polarity == "invert" else 0.0)).all()


def test_keeping_polarity_costs_contrast_but_still_hits_the_targets(digits):
    auto = make_groups(digits, AuditSpec())
    keep = make_groups(digits, AuditSpec(polarity="keep"))
    assert keep.contrast_factor < auto.contrast_factor  # auto picks, per image, the polarity with more room
    described = keep.describe()
    assert (described["brightness"] - described["target"]).abs().max() <= 1e-4
    contrast = described.query("split == 'train'").set_index("group")["contrast"]
    assert abs(contrast["0.9"] - contrast["0.3"]) / contrast["0.3"] < 0.03  # still matched between groups


def test_polarity_is_refused_where_pixels_are_not_transformed():
    with pytest.raises(UserError, match="polarity keep applies only to group method transform, not 'select'"):
        AuditSpec(group_method="select", polarity="keep")


def test_squeeze_of_the_negative_for_polarity_invert(digits):
    data = make_groups(digits, AuditSpec(contrast="squeeze", polarity="invert", limit=200))
    assert data.train_negative.all() and (data.train_clipped == 0).all()
    position = {int(i): k for k, i in enumerate(digits.train_index)}
    original = digits.train[[position[int(i)] for i in data.train_index]]
    t = torch.tensor([0.3, 0.9])[data.train_g]
    torch.testing.assert_close(data.train_x, squeeze_to(1 - original, t), rtol=0, atol=0)


def test_validation_split_is_stratified_disjoint_and_seeded(digits):
    data = make_groups(digits, AuditSpec(limit=1000, proportions=(0.9, 0.1)))
    carved = with_validation(data, fraction=0.1, seed=3)
    assert torch.bincount(carved.val_g).tolist() == [90, 10]
    assert torch.bincount(carved.train_g).tolist() == [810, 90]
    together = torch.cat([carved.train_index, carved.val_index])
    assert sorted(together.tolist()) == sorted(data.train_index.tolist())  # a partition of the training images
    assert torch.equal(carved.test_index, data.test_index)  # the test split is never touched
    again = with_validation(data, fraction=0.1, seed=3)
    assert torch.equal(again.val_index, carved.val_index)
    assert not torch.equal(with_validation(data, fraction=0.1, seed=4).val_index, carved.val_index)
    auto = make_groups(digits, AuditSpec(limit=1000, proportions=(0.9, 0.1), epochs="auto"))
    assert set(auto.describe()["split"]) == {"train", "validation", "test"}

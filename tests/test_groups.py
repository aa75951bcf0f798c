"""Group builders: sizes, brightness and contrast as measured, and the labels CSV."""

import pytest
import torch
from torchvision.io import write_png

from fairrecon.data import load_folder, load_images
from fairrecon.errors import UserError
from fairrecon.groups import group_names, group_sizes, make_groups, match_to, squeeze_to
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
    assert group_names((0.3, 0.9)) == ("0.3", "0.9")
    assert group_names((0.5, 0.5, 0.5)) == ("0.5", "0.5#2", "0.5#3")


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
    y, c = match_to(x, t)
    y_mu, y_sd = image_stats(y)
    assert y.min() >= 0 and y.max() <= 1
    torch.testing.assert_close(y_mu, t.float(), atol=1e-4, rtol=0)  # bisection to ~1e-15, stored in float32
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
    with pytest.raises(UserError, match=r"target 0.9 cannot be reached with 500 train images.*--group-method transform"):
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
    for idx, code in zip(data.train_index.tolist() + data.test_index.tolist(), data.train_g.tolist() + data.test_g.tolist()):
        assert data.names[code] == ("a" if idx % 2 else "b")  # file imgNN is index NN in sorted order


def test_labels_csv_may_use_indices_and_must_cover_every_image(tmp_path):
    folder = write_folder(tmp_path / "imgs")
    images = load_folder(folder)
    (tmp_path / "by_index.csv").write_text("index,group\n" + "".join(f"{i},{i % 2}\n" for i in range(20)))
    data = make_groups(images, AuditSpec(dataset="folder", group_method="labels", labels=str(tmp_path / "by_index.csv")))
    assert data.names == ("0", "1")
    (tmp_path / "short.csv").write_text("file,group\n" + "".join(f"img{i:02d}.png,x{i % 2}\n" for i in range(19)))
    with pytest.raises(UserError, match="1 image.*no label.*img19.png"):
        make_groups(images, AuditSpec(dataset="folder", group_method="labels", labels=str(tmp_path / "short.csv")))

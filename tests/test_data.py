"""Datasets as tensors, checked against the raw files read independently."""

import json
import os

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torchvision.io import write_png

from fairrecon.data import load_folder, load_images
from fairrecon.errors import UserError


def read_idx_images(path):
    """The IDX format by hand: 16-byte header (magic, n, rows, cols, big-endian), then uint8 pixels."""
    raw = np.fromfile(path, dtype=np.uint8)
    n, rows, cols = (int.from_bytes(raw[i : i + 4].tobytes(), "big") for i in (4, 8, 12))
    return raw[16:].reshape(n, rows, cols)


def test_digits_are_the_bundled_sklearn_images_in_unit_range():
    images = load_images("digits")
    assert images.train.shape[1:] == (1, 8, 8) and len(images.train) + len(images.test) == 1797
    assert set(images.train_index.tolist()).isdisjoint(images.test_index.tolist())
    raw = load_digits().images / 16.0
    np.testing.assert_allclose(images.test[:, 0].numpy(), raw[images.test_index.numpy()], rtol=0, atol=1e-7)


@pytest.mark.parametrize("name, folder", [("fashion-mnist", "FashionMNIST"), ("mnist", "MNIST")])
def test_torchvision_datasets_match_the_raw_idx_files(shared_datasets, name, folder):
    images = load_images(name, shared_datasets)
    assert images.train.shape == (60000, 1, 28, 28) and images.test.shape == (10000, 1, 28, 28)
    raw = read_idx_images(shared_datasets / folder / "raw" / "t10k-images-idx3-ubyte")
    np.testing.assert_array_equal((images.test[:, 0] * 255).round().numpy().astype(np.uint8), raw)


def test_missing_files_say_where_they_were_looked_for_and_how_to_get_them(tmp_path):
    with pytest.raises(UserError) as e:
        load_images("kmnist", tmp_path)
    message = str(e.value)
    assert str(tmp_path / "KMNIST") in message and "--download" in message and "\n" not in message


def test_image_folder_reads_pngs_and_rejects_mixed_sizes(tmp_path):
    for i in range(5):
        write_png(torch.full((1, 4, 4), 50 * i, dtype=torch.uint8), str(tmp_path / f"{i}.png"))
    images = load_folder(tmp_path)
    assert images.files == tuple(f"{i}.png" for i in range(5))
    both = torch.cat([images.train, images.test])[torch.cat([images.train_index, images.test_index]).argsort()]
    torch.testing.assert_close(both.flatten(1).mean(1), torch.arange(5) * 50 / 255.0)
    write_png(torch.zeros((1, 5, 4), dtype=torch.uint8), str(tmp_path / "odd.png"))
    with pytest.raises(UserError, match=r"odd.png: 4x5 grey differs from 0.png 4x4 grey"):
        load_folder(tmp_path)


def test_a_corrupt_image_is_one_whole_line_or_skipped_and_counted(tmp_path):
    """An interrupted copy leaves half a PNG: named in one line with torchvision's whole reason, or skipped."""
    g = torch.Generator().manual_seed(0)
    for i in range(5):
        write_png(torch.randint(0, 256, (1, 32, 32), dtype=torch.uint8, generator=g), str(tmp_path / f"img{i}.png"))
    bad = tmp_path / "img2.png"
    bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) // 2])
    with pytest.raises(UserError) as e:
        load_folder(tmp_path)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{bad}: not a readable image (")
    assert "Probably, the input image is corrupted)" in message and ".cpp" not in message  # whole, no C++ location
    assert message.endswith("pass --skip-bad-images to go on without it")
    images = load_folder(tmp_path, skip_bad=True)
    assert images.skipped == ("img2.png",) and images.files == ("img0.png", "img1.png", "img3.png", "img4.png")
    assert len(images.train) + len(images.test) == 4


def test_nested_folders_are_keyed_by_relative_path_and_hidden_ones_skipped(tmp_path):
    for sub in ("b", "a/deeper", ".thumbnails"):
        (tmp_path / sub).mkdir(parents=True)
        write_png(torch.zeros((1, 4, 4), dtype=torch.uint8), str(tmp_path / sub / "x.png"))
    write_png(torch.zeros((1, 4, 4), dtype=torch.uint8), str(tmp_path / "top.png"))
    assert load_folder(tmp_path).files == ("a/deeper/x.png", "b/x.png", "top.png")


def test_fingerprint_changes_with_any_file_and_names_the_files_read(tmp_path, shared_datasets):
    from fairrecon.data import fingerprint

    for i in range(3):
        write_png(torch.zeros((1, 4, 4), dtype=torch.uint8), str(tmp_path / f"{i}.png"))
    before = fingerprint("folder", tmp_path)
    assert before["files"] == 3 and before == fingerprint("folder", tmp_path)
    stat = (tmp_path / "1.png").stat()
    os.utime(tmp_path / "1.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # edited a second later, same size
    assert fingerprint("folder", tmp_path)["listing_sha256"] != before["listing_sha256"]
    mnist = fingerprint("mnist", shared_datasets)
    assert mnist["files"] == 4 and mnist["bytes"] == 54_950_048  # the four raw files of the shared README


def test_check_adjusted_reads_the_images_the_audit_read_with_skip_bad_images(tmp_path, capsys):
    """`check --adjusted` recomputes each group's PCA baseline from the result's spec; an audit of a folder
    with an unreadable image, run with --skip-bad-images, must be recomputed the same way (it used to stop
    at the bad image, exit 2: the baseline read the folder without skip_bad)."""
    from conftest import run_cli

    from fairrecon import AuditResult, analyse, stats
    from fairrecon.groups import make_groups

    folder = tmp_path / "digits"
    folder.mkdir()
    pixels = np.round(load_digits().images[:120] * (255 / 16)).astype(np.uint8)  # real images, as PNG files
    for i, image in enumerate(pixels):
        write_png(torch.from_numpy(image)[None], str(folder / f"{i:03d}.png"))
    bad = folder / "007.png"
    bad.write_bytes(bad.read_bytes()[:20])  # an interrupted copy
    out = tmp_path / "results"
    flags = ["--dataset", "folder", "--data-root", folder, "--skip-bad-images", "--losses", "l2", "--seeds", "2"]
    flags += ["--epochs", "1", "--latent", "4", "--hidden", "16", "--device", "cpu", "--quiet", "--out", out]
    code, _, err = run_cli(capsys, "audit", *flags)
    assert code == 0 and "skipped 1 unreadable image(s)" in err, err

    code, stdout, err = run_cli(capsys, "check", out, "--adjusted", "--max-gap", "1", "--json")
    assert code in (0, 3), err  # a verdict (pass, or insufficient data for a 2-seed audit), not a usage error
    row = json.loads(stdout)["disparities"][0]
    # independently: the 119 readable images, their groups, and each group's own rank-k PCA error
    result = AuditResult.load(out)
    data = make_groups(load_folder(folder, skip_bad=True), result.spec)
    assert len(data.train_x) + len(data.test_x) == 119
    expected = analyse(result, pca=stats.pca_errors(data, result.spec.latent)).disparities.iloc[0]
    assert np.isfinite(row["adjusted_gap"])
    for column in ("adjusted_gap", "adjusted_gap_lcb"):  # JSON carries 10 significant digits
        assert row[column] == pytest.approx(expected[column], rel=1e-9, abs=0), column

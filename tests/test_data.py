"""Datasets as tensors, checked against the raw files read independently."""

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
    n, rows, cols = (int.from_bytes(raw[i:i + 4].tobytes(), "big") for i in (4, 8, 12))
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

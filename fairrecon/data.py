"""Datasets as tensors: images in [0, 1], shape (N, C, H, W), float32.

Whole datasets are read straight from torchvision's `.data` arrays (no per-item
Python, no DataLoader): the MNIST family is 55 MB and fits in memory many times
over, and training later indexes it on the device.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import UserError
from .spec import IMAGE_SUFFIXES, TEST_FRACTION, AuditSpec

# name -> (torchvision class name, files torchvision needs, how to get them)
_TORCHVISION = {
    "mnist": ("MNIST", "MNIST/raw/train-images-idx3-ubyte"),
    "fashion-mnist": ("FashionMNIST", "FashionMNIST/raw/train-images-idx3-ubyte"),
    "kmnist": ("KMNIST", "KMNIST/raw/train-images-idx3-ubyte"),
    "cifar10": ("CIFAR10", "cifar-10-batches-py/data_batch_1"),
}


@dataclass(frozen=True)
class ImageSet:
    """A dataset's train and test pools; `*_index` are positions in the original dataset."""

    name: str
    train: torch.Tensor  # (N, C, H, W) float32 in [0, 1]
    test: torch.Tensor
    train_index: torch.Tensor  # (N,) int64
    test_index: torch.Tensor
    files: tuple[str, ...] | None = None  # image-folder only: relative path of each original index
    skipped: tuple[str, ...] = ()  # image-folder only: unreadable files left out (--skip-bad-images)


def load_images(
    name: str, root: str | Path = "datasets", download: bool = False, split_seed: int = 0, *, skip_bad: bool = False
) -> ImageSet:
    """Load a dataset by name. Missing files give a one-line UserError saying where and how."""
    if name == "digits":
        return _digits(split_seed)
    if name == "folder":
        return load_folder(root, split_seed, skip_bad=skip_bad)
    if name not in _TORCHVISION:
        raise UserError(f"unknown dataset '{name}'")
    return _torchvision(name, Path(root), download)


def load_images_for(spec: AuditSpec) -> ImageSet:
    """The images an audit of `spec` reads: every caller (the audit, `fairrecon split`, a model scored by
    `check --weights`, the PCA baseline of `check --adjusted`) reads them this one way."""
    return load_images(spec.dataset, spec.data_root, spec.download, spec.split_seed, skip_bad=spec.skip_bad_images)


def where_files_are(name: str, root: str | Path = "datasets") -> str:
    """Where a dataset's files are looked for (for `fairrecon datasets` and messages)."""
    root = Path(root)
    if name == "digits":
        return "bundled with scikit-learn: no files, nothing to download"
    if name == "folder":
        return f"{root}/ and its subfolders: every {'/'.join(s[1:] for s in IMAGE_SUFFIXES)} image (--data-root DIR)"
    return f"{(root / _TORCHVISION[name][1]).parent}/ (torchvision's layout; --download fetches it)"


def dataset_files(name: str, root: str | Path = "datasets") -> list[Path]:
    """The files a dataset is read from (none for digits, which ships inside scikit-learn)."""
    root = Path(root)
    if name == "folder":
        return image_files(root) if root.is_dir() else []
    if name in _TORCHVISION:
        folder = (root / _TORCHVISION[name][1]).parent
        return sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    return []


def fingerprint(name: str, root: str | Path = "datasets") -> dict[str, Any]:
    """What identifies a dataset's content without reading it: the listing (relative path, size,
    modification time) of the files it is read from, or scikit-learn's version for digits.

    Two audits with the same spec but a different fingerprint ran on different data.
    """
    if name == "digits":
        import sklearn

        return {"dataset": name, "scikit-learn": sklearn.__version__}
    root = Path(root)
    files = dataset_files(name, root)
    listing = [(p.relative_to(root).as_posix(), (st := p.stat()).st_size, st.st_mtime_ns) for p in files]
    digest = hashlib.sha256(repr(listing).encode()).hexdigest()[:16]
    return {
        "dataset": name,
        "files": len(listing),
        "bytes": sum(size for _, size, _ in listing),
        "listing_sha256": digest,
    }


def file_sha256(path: str | Path) -> str | None:
    """The first 16 hex digits of a file's SHA-256 (None when it cannot be read: the reader says why later)."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    except OSError:
        return None


def split_indices(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded train/test split for datasets that ship without one."""
    order = np.random.default_rng(seed).permutation(n)
    n_test = max(1, int(round(n * test_fraction)))
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def _digits(split_seed: int) -> ImageSet:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, UCI), scaled from 0..16 to [0, 1]."""
    from sklearn.datasets import load_digits

    images = torch.from_numpy(load_digits().images.astype(np.float32) / 16.0).unsqueeze(1)  # (1797, 1, 8, 8)
    train, test = split_indices(len(images), TEST_FRACTION, split_seed)
    return ImageSet("digits", images[train], images[test], torch.from_numpy(train), torch.from_numpy(test))


def _torchvision(name: str, root: Path, download: bool) -> ImageSet:
    import torchvision.datasets as tvd

    class_name, probe = _TORCHVISION[name]
    cls = getattr(tvd, class_name)
    missing = UserError(
        f"{name}: no dataset files under {root / probe.split('/')[0]} (looked for {root / probe}); "
        f"pass --download to fetch them, or --data-root DIR where they are (see datasets/{name}.md)"
    )
    if probe.endswith("-ubyte") and not download:
        raw = (root / probe).parent
        if not raw.is_dir():
            raise missing
        for split in ("train", "t10k"):
            n_images, n_labels = (
                _idx_count(raw / f"{split}-images-idx3-ubyte"),
                _idx_count(raw / f"{split}-labels-idx1-ubyte"),
            )
            if n_images != n_labels:
                raise UserError(
                    f"{name}: {raw} has {n_images} {split} images but {n_labels} labels; "
                    "re-download the dataset (--download into an empty --data-root)"
                )
    try:
        train, test = cls(str(root), train=True, download=download), cls(str(root), train=False, download=download)
    except RuntimeError as e:
        if "not found" not in str(e).lower() and "corrupted" not in str(e).lower():
            raise UserError(f"{name}: cannot read dataset files under {root}: {str(e).splitlines()[0]}") from None
        raise missing from None
    except (OSError, ValueError, EOFError) as e:  # truncated or malformed files
        raise UserError(
            f"{name}: cannot read dataset files under {root}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None
    return ImageSet(
        name, _to_float(train.data), _to_float(test.data), torch.arange(len(train.data)), torch.arange(len(test.data))
    )


def _describe(img: torch.Tensor) -> str:
    """'28x28 grey' / '32x32 RGB': an image's size and mode, for messages."""
    modes = {1: "grey", 2: "grey+alpha", 3: "RGB", 4: "RGBA"}
    return f"{img.shape[2]}x{img.shape[1]} {modes.get(img.shape[0], f'{img.shape[0]}-channel')}"


def _idx_count(path: Path) -> int:
    """Number of items in an idx file (MNIST's format), after checking its header and length."""
    try:
        with path.open("rb") as f:
            head = f.read(4)
            if len(head) < 4 or head[:2] != b"\0\0" or head[2] != 0x08 or not 1 <= head[3] <= 4:
                raise UserError(
                    f"{path}: not an idx file of unsigned bytes (header {head.hex() or 'empty'}); "
                    "re-download the dataset (--download into an empty --data-root)"
                )
            dims_raw = f.read(4 * head[3])
            size = path.stat().st_size
    except FileNotFoundError:
        raise UserError(
            f"{path}: dataset file missing; pass --download to fetch the dataset, or --data-root DIR where it is"
        ) from None
    except OSError as e:
        raise UserError(f"{path}: cannot read dataset file ({e.strerror or e})") from None
    if len(dims_raw) < 4 * head[3]:
        raise UserError(f"{path}: truncated ({size} bytes, header incomplete); re-download the dataset")
    dims = np.frombuffer(dims_raw, dtype=">u4").astype(np.int64)
    expected = 4 + 4 * head[3] + int(np.prod(dims))
    if size != expected:
        raise UserError(
            f"{path}: {'truncated' if size < expected else 'too long'} ({size} bytes, header says "
            f"{expected}); re-download the dataset (--download into an empty --data-root)"
        )
    return int(dims[0])


def _to_float(data) -> torch.Tensor:
    """uint8 (N, H, W) or (N, H, W, C) -> float32 (N, C, H, W) in [0, 1]."""
    t = torch.as_tensor(np.asarray(data))
    t = t.unsqueeze(1) if t.ndim == 3 else t.permute(0, 3, 1, 2)
    return t.contiguous().float().div_(255.0)


# Image files that are not read (decode_image cannot): found all the same, so that each is refused by name
# (or skipped with --skip-bad-images, and counted), never silently left out of the audit.
UNREAD_SUFFIXES = (".bmp", ".tif", ".tiff")


def image_files(root: Path) -> list[Path]:
    """Every image under `root`, in subfolders too (hidden files and folders skipped), sorted by relative path."""
    found = [
        p
        for p in root.rglob("*")
        if p.is_file()
        and p.suffix.lower() in IMAGE_SUFFIXES + UNREAD_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    ]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def load_folder(
    root: str | Path, split_seed: int = 0, test_fraction: float = TEST_FRACTION, *, skip_bad: bool = False
) -> ImageSet:
    """A folder of the user's own images (subfolders included; all the same size and mode), split
    80/20 with a seed (`split_indices`: a seeded permutation of the sorted files, the first 20% held out).

    Images are keyed by their path relative to `root` ('a.png', 'men/b.png'): `ImageSet.files[i]` is
    image i, which a labels CSV names by path or by index. An unreadable image is a one-line
    UserError naming it; with `skip_bad` it is left out and listed in `ImageSet.skipped`.
    """
    from torchvision.io import decode_image

    root = Path(root)
    if not root.is_dir():
        raise UserError(f"image folder {root} does not exist; pass --data-root DIR with your images")
    files = image_files(root)
    images: list[torch.Tensor] = []
    kept: list[str] = []
    skipped: list[str] = []
    for path in files:
        name = path.relative_to(root).as_posix()
        try:
            if path.suffix.lower() in UNREAD_SUFFIXES:
                raise ValueError(f"{path.suffix[1:].upper()} is not read, only {', '.join(IMAGE_SUFFIXES)}")
            img = decode_image(str(path))  # (C, H, W) uint8, or uint16 for 16-bit PNGs
        except (RuntimeError, OSError, ValueError) as e:
            if skip_bad:
                skipped.append(name)
                continue
            raise UserError(
                f"{path}: not a readable image ({_first_line(e)}); fix or remove it, or pass "
                "--skip-bad-images to go on without it"
            ) from None
        if img.ndim != 3 or img.dtype not in (torch.uint8, torch.uint16):
            raise UserError(
                f"{path}: unsupported image ({img.dtype}, shape {tuple(img.shape)}); "
                "use 8- or 16-bit grey, RGB or RGBA images"
            )
        if images and img.shape != images[0].shape:
            raise UserError(
                f"{path}: {_describe(img)} differs from {kept[0]} {_describe(images[0])}; "
                "all images must have the same size and mode (grey, RGB or RGBA)"
            )
        images.append(img.float().div_(255.0 if img.dtype == torch.uint8 else 65535.0))  # [0, 1] at any bit depth
        kept.append(name)
    if len(images) < 2:
        bad = f", {len(skipped)} unreadable" if skipped else ""
        raise UserError(
            f"image folder {root} has {len(images)} readable image(s){bad}; need at least 2 "
            f"({', '.join(IMAGE_SUFFIXES)}, subfolders included)"
        )
    data = torch.stack(images)  # (N, C, H, W)
    train, test = split_indices(len(data), test_fraction, split_seed)
    return ImageSet(
        "folder",
        data[train],
        data[test],
        torch.from_numpy(train),
        torch.from_numpy(test),
        files=tuple(kept),
        skipped=tuple(skipped),
    )


def _first_line(e: BaseException) -> str:
    """An exception's first non-empty line, whole (never cut mid-word), or its type's name."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    # torchvision prefixes its C++ errors with "function, path/to/file.cpp:79, ": not for users
    return re.sub(r"^[\w():~]+, \S+\.(?:cpp|h):\d+, ", "", lines[0]) if lines else type(e).__name__

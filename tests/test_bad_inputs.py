"""A gallery of bad inputs: each gives one line on stderr, exit status 2, and damages nothing.

Every entry runs `fairrecon audit ... --force --out FOLDER` on a copy of a finished
results folder and checks that the folder is byte-for-byte unchanged afterwards
(`--force` so that the spec check does not stop the run before the bad input is met).
The entries run the CLI's `main` in-process (importing torch per subprocess would cost
~3 s each); `test_gallery_as_subprocesses` runs a sample of them as real processes.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_AUDIT
from PIL import Image

from fairrecon import run_audit
from fairrecon.cli import main
from fairrecon.data import split_indices

REPO = Path(__file__).resolve().parents[1]
TINY = ["--seeds", "1", "--epochs", "1", "--latent", "4", "--losses", "l2", "--device", "cpu", "--quiet"]


# --- fake inputs -----------------------------------------------------------------


def write_idx(path: Path, data: np.ndarray) -> None:
    """An idx file as torchvision's MNIST reads it: magic (0, 0, 0x08 = uint8, ndim), big-endian dims, bytes."""
    path.write_bytes(bytes([0, 0, 0x08, data.ndim]) + struct.pack(f">{data.ndim}I", *data.shape) + data.tobytes())


def fake_mnist(root: Path, n_train: int = 40, n_test: int = 10) -> Path:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(raw / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(raw / f"{split}-labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8))
    return raw


def image_folder(root: Path, n: int = 10, size: tuple[int, int] = (8, 8), mode: str = "L") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(n):
        shape = size[::-1] + ((len(mode),) if mode != "L" else ())
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / f"img{i:02d}.png")
    return root


def labels_csv(path: Path, rows: list[tuple[str, ...]], header: str = "file,group") -> Path:
    path.write_text(header + "\n" + "".join(",".join(row) + "\n" for row in rows))
    return path


def _latin1_labels(tmp: Path) -> list[str]:
    """A spreadsheet's 'CSV' in Latin-1: an accented file name is one byte (0xe9), not UTF-8's two."""
    args = _folder(tmp, image_folder, half_and_half())
    (tmp / "images" / "img01.png").rename(tmp / "images" / "caf\u00e9.png")
    rows = [("caf\u00e9.png" if f == "img01.png" else f, g) for f, g in half_and_half()]
    (tmp / "labels.csv").write_bytes(("file,group\n" + "".join(f"{f},{g}\n" for f, g in rows)).encode("latin-1"))
    return args


def _skewed(n: int) -> list[tuple[str, str]]:
    """Nine in ten images in group 'a': a tiny --limit cannot keep group 'b' in the train split."""
    return [(f"img{i:02d}.png", "b" if i % 10 == 0 else "a") for i in range(n)]


def _truncated_png(folder: Path) -> None:
    """A PNG cut in half, as an interrupted copy leaves it."""
    image_folder(folder, 3, (64, 64))
    path = folder / "img01.png"
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def half_and_half(n: int = 10) -> list[tuple[str, str]]:
    return [(f"img{i:02d}.png", "a" if i % 2 else "b") for i in range(n)]


# --- the gallery: id -> (make the arguments in tmp, the message's telling part) ----------------------


def _mnist(tmp: Path, hurt: Callable[[Path], None]) -> list[str]:
    raw = fake_mnist(tmp / "data")
    hurt(raw)
    return ["--dataset", "mnist", "--data-root", str(tmp / "data")]


def _truncate(raw: Path) -> None:
    path = raw / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:5000])


def _folder(
    tmp: Path, make: Callable[[Path], None], labels: list[tuple[str, str]] | None = None, header: str = "file,group"
) -> list[str]:
    folder = tmp / "images"
    folder.mkdir()
    make(folder)
    args = ["--dataset", "folder", "--data-root", str(folder)]
    if labels is not None:
        args += ["--group-method", "labels", "--labels", str(labels_csv(tmp / "labels.csv", labels, header))]
    return args


def _mixed_sizes(folder: Path) -> None:
    image_folder(folder, 5, (8, 8))
    image_folder(folder / "x", 1, (9, 8))
    (folder / "x" / "img00.png").rename(folder / "img99.png")


def _mixed_modes(folder: Path) -> None:
    image_folder(folder, 5, (8, 8), "L")
    image_folder(folder / "x", 1, (8, 8), "RGB")
    (folder / "x" / "img00.png").rename(folder / "img99.png")


def _no_test_images(folder: Path) -> None:
    image_folder(folder, 10)


def _train_only_labels() -> list[tuple[str, str]]:
    _, test = split_indices(10, 0.2, 0)
    lonely = next(i for i in range(10) if i not in set(test.tolist()))
    return [(f"img{i:02d}.png", "rare" if i == lonely else "common") for i in range(10)]


def _spec_file(tmp: Path, text: str) -> list[str]:
    path = tmp / "audit.toml"
    path.write_text(text)
    return [str(path)]


GALLERY: dict[str, tuple[Callable[[Path], list[str]], str]] = {
    "dataset files missing": (lambda t: ["--dataset", "mnist", "--data-root", str(t)], "mnist: no dataset files under"),
    "dataset file truncated": (lambda t: _mnist(t, _truncate), "train-images-idx3-ubyte: truncated (5000 bytes"),
    "dataset file deleted": (
        lambda t: _mnist(t, lambda r: (r / "t10k-labels-idx1-ubyte").unlink()),
        "t10k-labels-idx1-ubyte: dataset file missing",
    ),
    "dataset file not idx": (
        lambda t: _mnist(t, lambda r: (r / "train-labels-idx1-ubyte").write_text("hello")),
        "train-labels-idx1-ubyte: not an idx file",
    ),
    "dataset labels do not match images": (
        lambda t: _mnist(t, lambda r: write_idx(r / "train-labels-idx1-ubyte", np.zeros(39, np.uint8))),
        "has 40 train images but 39 labels",
    ),
    "image folder missing": (lambda t: ["--dataset", "folder", "--data-root", str(t / "nowhere")], "does not exist"),
    "image folder empty": (
        lambda t: _folder(t, lambda f: (f / "notes.txt").write_text("no images")),
        "has 0 readable image(s)",
    ),
    "non-image file": (
        lambda t: _folder(t, lambda f: (image_folder(f, 3), (f / "img01.png").write_text("not a png"))),
        "img01.png: not a readable image",
    ),
    "images of mixed sizes": (
        lambda t: _folder(t, _mixed_sizes),
        "img99.png: 9x8 grey differs from img00.png 8x8 grey",
    ),
    "images of mixed modes": (lambda t: _folder(t, _mixed_modes), "img99.png: 8x8 RGB differs from img00.png 8x8 grey"),
    "labels name unknown files": (
        lambda t: _folder(t, image_folder, half_and_half() + [("ghost.png", "a")]),
        "1 label(s) name no image in the folder",
    ),
    "labels missing rows": (
        lambda t: _folder(t, image_folder, half_and_half()[:-1]),
        "1 image(s) have no label, e.g. 'img09.png'",
    ),
    "labels one group": (
        lambda t: _folder(t, image_folder, [(f, "a") for f, _ in half_and_half()]),
        "all images are in one group 'a'",
    ),
    "labels without header": (
        lambda t: _folder(t, image_folder, half_and_half(), header="name,kind"),
        "needs a header with 'file'",
    ),
    "labels CSV missing": (
        lambda t: [
            "--dataset",
            "folder",
            "--data-root",
            str(image_folder(t / "i")),
            "--group-method",
            "labels",
            "--labels",
            str(t / "none.csv"),
        ],
        "none.csv: labels CSV not found",
    ),
    "group too small to hold out": (
        lambda t: _folder(t, _no_test_images, _train_only_labels()),
        "group 'rare' has 1 image(s); a group needs at least 2",
    ),
    "group with no train images in its split column": (
        lambda t: _folder(
            t,
            image_folder,
            [(f, g, "test" if g == "a" else "train") for f, g in half_and_half()],
            header="file,group,split",
        ),
        "group 'a' has no train images (see its split column)",
    ),
    "labels contradict the group method": (
        lambda t: _folder(t, image_folder, half_and_half()) + ["--group-method", "select"],
        "gives the groups from a CSV, which contradicts group method 'select'",
    ),
    "labels with brightness targets": (
        lambda t: _folder(t, image_folder, half_and_half()) + ["--targets", "0.2,0.8"],
        "targets 0.2,0.8 applies only to group method transform or select",
    ),
    "labels for another dataset": (
        lambda t: ["--labels", str(labels_csv(t / "l.csv", half_and_half()))],
        "use --dataset folder --data-root DIR, not dataset 'digits'",
    ),
    "labels not UTF-8": (lambda t: _latin1_labels(t), "labels.csv:3: not UTF-8 (byte 0xe9); save it as 'CSV UTF-8'"),
    "labels split not train or test": (
        lambda t: _folder(
            t, image_folder, [(f, g, "validation") for f, g in half_and_half()], header="file,group,split"
        ),
        "labels.csv:2: split 'validation' is not train or test",
    ),
    "labels limit too small": (
        lambda t: _folder(t, lambda f: image_folder(f, 40), _skewed(40)) + ["--limit", "4"],
        "--limit 4 is too small to keep every group in the train split",
    ),
    "corrupt image": (
        lambda t: _folder(t, _truncated_png),
        "img01.png: not a readable image (Out of bound read in decode_png. Probably, the input image is "
        "corrupted); fix or remove it, or pass --skip-bad-images",
    ),
    "target out of range": (lambda t: ["--targets", "0.3,1.2"], "target 1.2 is outside (0, 1)"),
    "target unreachable by select": (
        lambda t: ["--group-method", "select", "--targets", "0.05,0.95"],
        "select: target 0.05 cannot be reached",
    ),
    "proportions do not sum to 1": (lambda t: ["--proportions", "0.5,0.6"], "sum to 1.1, not 1"),
    "proportions count mismatch": (lambda t: ["--proportions", "0.2,0.3,0.5"], "3 values for 2 targets"),
    "list not numbers": (
        lambda t: ["--targets", "0.3,bright"],
        "cannot read '0.3,bright' as a comma-separated list of float",
    ),
    "unknown loss": (lambda t: ["--losses", "l2,hubber"], "unknown loss 'hubber'; allowed: l1, l2"),
    "unknown model": (lambda t: ["--model", "transformer"], "'transformer' is not one of 'mlp', 'conv'"),
    "unknown device": (lambda t: ["--device", "tpu"], "'tpu' is not one of 'auto', 'cpu', 'cuda'"),
    "unknown dataset": (lambda t: ["--dataset", "imagenet"], "'imagenet' is not one of 'digits', 'mnist'"),
    "cuda without a GPU": (lambda t: ["--device", "cuda"], "device 'cuda' requested but no CUDA GPU is available"),
    "invalid TOML": (lambda t: _spec_file(t, "epochs = = 3\n"), "audit.toml: invalid TOML"),
    "spec key typo": (lambda t: _spec_file(t, "epocs = 3\n"), "unknown key 'epocs' (did you mean 'epochs'?)"),
    "spec wrong type": (lambda t: _spec_file(t, 'batch_size = "three"\n'), "'batch_size' = 'three' is not a valid int"),
    "spec file missing": (lambda t: [str(t / "nope.toml")], "nope.toml: spec file not found"),
    "spec negative epochs": (lambda t: _spec_file(t, "[audit]\nepochs = 0\n"), "epochs must be >= 1, got 0"),
    # issue 20 item 6: a setting that acts only under another is refused where it would be ignored
    "max epochs with a fixed epoch count": (
        lambda t: ["--max-epochs", "30"],
        "max_epochs 30 applies only to --epochs auto, not epochs 1; drop it",
    ),
    "data root for the bundled digits": (
        lambda t: ["--data-root", str(t)],
        "data_root {} applies only to datasets read from files, not dataset 'digits'",
    ),
    "download for an image folder": (
        lambda t: _folder(t, image_folder, half_and_half()) + ["--download"],
        "download applies only to datasets torchvision fetches (mnist, fashion-mnist, kmnist, cifar10), "
        "not dataset 'folder'",
    ),
    "skip bad images for mnist": (
        lambda t: _mnist(t, lambda r: None) + ["--skip-bad-images"],
        "skip_bad_images applies only to dataset folder, not dataset 'mnist'",
    ),
    "tolerance without select": (
        lambda t: _spec_file(t, "tolerance = 0.05\n"),
        "tolerance 0.05 applies only to group method select, not 'transform'",
    ),
    "eval points with --epochs auto": (
        lambda t: _spec_file(t, "eval_points = 5\n") + ["--epochs", "auto"],
        "eval_points 5 applies only to a fixed number of epochs, not epochs 'auto'",
    ),
    "grad points count with --epochs auto": (
        lambda t: _spec_file(t, "grad_points = 5\n") + ["--epochs", "auto"],
        "grad_points 5 applies only to a fixed number of epochs (with --epochs auto, only 0 = off)",
    ),
    "sigma lr with no learned parameter": (
        lambda t: _spec_file(t, "sigma_lr = 0.1\n"),
        "sigma_lr 0.1 applies only to losses with learned parameters (e.g. learned-sigma), not losses l2",
    ),
    # issue 20 item 7: messages that said the wrong thing
    "loss family without its value": (
        lambda t: ["--losses", "barron"],
        "loss 'barron' is a family, not one loss: name a member as barron:ALPHA with alpha in [0, 2], e.g. barron:1",
    ),
    "labels row repeated exactly": (
        lambda t: _folder(t, image_folder, half_and_half() + [half_and_half()[3]]),
        "labels.csv:12: file 'img03.png' is listed twice, the same way on line 5 (group 'a'); each image takes one "
        "row: delete one of the two",
    ),
    "labels row contradicting another": (
        lambda t: _folder(t, image_folder, half_and_half() + [("img03.png", "b")]),
        "labels.csv:12: file 'img03.png' is labelled twice (line 5: group 'a'; here: group 'b')",
    ),
    "labels naming one image two ways": (
        lambda t: _folder(t, image_folder, half_and_half() + [("images/img03.png", "a")]),
        "labels.csv:12: image 'images/img03.png' is listed twice, the same way on line 5 (group 'a')",
    ),
}


@pytest.fixture(scope="module")
def finished(trained) -> Path:
    """A finished audit's results folder: the thing a bad run must not damage (shared: each test copies it)."""
    return trained(**TINY_AUDIT).folder


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def command(name: str, tmp: Path, out: Path) -> list[str]:
    make, _ = GALLERY[name]
    args = make(tmp)
    spec_first = args[:1] if args and args[0].endswith(".toml") else []
    return [
        "audit",
        *spec_first,
        *TINY,
        *args[len(spec_first) :],
        "--force",
        "--out",
        str(out),
    ]  # the entry's flags win


def run_in_process(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    return exit_.value.code, capsys.readouterr().err


@pytest.mark.parametrize("name", list(GALLERY))
def test_bad_input_is_one_line_exit_2_and_damages_nothing(name, finished, tmp_path, capsys, monkeypatch):
    if name == "cuda without a GPU":
        monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    out = tmp_path / "results"
    shutil.copytree(finished, out)
    before = snapshot(out)
    code, err = run_in_process(command(name, tmp_path, out), capsys)
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("fairrecon: error: "), err
    assert GALLERY[name][1].replace("{}", str(tmp_path)) in err
    assert "None" not in err  # Python's spelling of a missing value is never a message's
    assert snapshot(out) == before


def test_output_folder_that_is_a_file(tmp_path, capsys):
    out = tmp_path / "results"
    out.write_text("my notes\n")
    code, err = run_in_process(["audit", *TINY, "--out", str(out)], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "is an existing file, not a folder" in err
    assert out.read_text() == "my notes\n"


def test_output_folder_that_cannot_be_created(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, err = run_in_process(["audit", *TINY, "--limit", "64", "--out", str(tmp_path / "file" / "results")], capsys)
    assert code == 2 and err.count("\n") == 1
    assert f"cannot write to output folder {tmp_path / 'file' / 'results'}" in err


def _permissions_bind() -> bool:
    """False where this user (root, or one with CAP_DAC_OVERRIDE) writes into read-only folders anyway."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp).chmod(0o555)
        try:
            (Path(tmp) / "probe").write_text("x")
        except PermissionError:
            return True
        finally:
            Path(tmp).chmod(0o755)
    return False


PERMISSIONS = pytest.mark.skipif(not _permissions_bind(), reason="this user ignores file permissions (root)")


@PERMISSIONS
def test_output_folder_without_write_permission(finished, tmp_path, capsys):
    out = tmp_path / "results"
    shutil.copytree(finished, out)
    before = snapshot(out)
    for path in (out, out / "cells"):
        path.chmod(0o555)
    try:
        code, err = run_in_process(["audit", *TINY, "--limit", "64", "--force", "--out", str(out)], capsys)
    finally:
        for path in (out, out / "cells"):
            path.chmod(0o755)
    assert code == 2 and err.count("\n") == 1 and "cannot write to output folder" in err
    assert snapshot(out) == before


@PERMISSIONS
def test_unreadable_image_file(tmp_path, capsys):
    folder = image_folder(tmp_path / "images", 3)
    (folder / "img01.png").chmod(0)
    code, err = run_in_process(["audit", "--dataset", "folder", "--data-root", str(folder), *TINY], capsys)
    assert code == 2 and err.count("\n") == 1 and "img01.png: not a readable image" in err


def test_sixteen_bit_images_are_scaled_to_unit_range(tmp_path):
    """Not an error: 16-bit PNGs are read as [0, 1] like 8-bit ones (a value of 65535 is white)."""
    from fairrecon.data import load_folder

    folder = tmp_path / "images"
    folder.mkdir()
    values = np.array([[0, 65535], [32768, 1000]], dtype=np.uint16)
    for i in range(3):
        Image.fromarray(values).save(folder / f"img{i}.png")
    images = load_folder(folder)
    pixels = np.concatenate([images.train.numpy().ravel(), images.test.numpy().ravel()])
    np.testing.assert_allclose(np.sort(np.unique(pixels)), np.sort(values.ravel() / 65535.0), rtol=1e-6)


SUBPROCESS_SAMPLE = ("invalid TOML", "dataset file truncated", "cuda without a GPU")


@pytest.mark.slow
def test_gallery_as_subprocesses(finished, tmp_path):
    """A sample of the gallery through `python -m fairrecon`, as a user runs it, started side by side."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU visible, whatever this machine has
    runs = []
    for i, name in enumerate(SUBPROCESS_SAMPLE):
        tmp = tmp_path / str(i)
        tmp.mkdir()
        out = tmp / "results"
        shutil.copytree(finished, out)
        before = snapshot(out)
        proc = subprocess.Popen(
            [sys.executable, "-m", "fairrecon", *command(name, tmp, out)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        runs.append((name, proc, out, before))
    for name, proc, out, before in runs:
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 2, (name, stderr)
        assert stdout == "" and stderr.count("\n") == 1 and stderr.startswith("fairrecon: error: "), (name, stderr)
        assert GALLERY[name][1] in stderr and "Traceback" not in stderr
        assert snapshot(out) == before


@pytest.mark.slow
def test_skip_bad_images_goes_on_with_a_warning_and_a_count(tmp_path, capsys):
    args = _folder(
        tmp_path,
        lambda f: (image_folder(f, 40, (64, 64)), _truncated_png(f)),
        [(f"img{i:02d}.png", "ab"[i % 2]) for i in range(40)],
    )
    code, err = run_in_process(["audit", *TINY, *args], capsys)
    assert code == 2 and "img01.png: not a readable image" in err
    out = tmp_path / "results"
    code, err = run_in_process(["audit", *TINY, *args, "--skip-bad-images", "--out", str(out)], capsys)
    assert code == 0, err
    warning = "skipped 1 unreadable image(s) (--skip-bad-images): img01.png"
    assert f"warning: {warning}" in err
    import json

    summary = json.loads((out / "summary.json").read_text())
    assert summary["info"]["warnings"] == [warning] and summary["spec"]["skip_bad_images"] is True
    assert sum(r["n"] for r in summary["groups"]) == 39  # its label went with it


# --- issue 20 items 5 and 7: outputs over another audit, messages that misled ------------------------------


def test_report_never_writes_into_another_audits_folder(finished, tmp_path, capsys):
    """`report A --out B`, B a different complete audit: refused, one line, B byte for byte as it was (it used to
    get A's report.md beside its own summary.json). A new folder, the same one again and A itself are fine."""
    a = tmp_path / "a"
    shutil.copytree(finished, a)
    b = tmp_path / "b"
    run_audit(dataset="digits", limit=64, test_limit=32, losses=("l2",), seeds=1, epochs=2, latent=4, hidden=16,
              device="cpu", out=str(b))  # fmt: skip
    before = snapshot(b)
    code, err = run_in_process(["report", str(a), "--out", str(b)], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert f"{b} holds an audit with a different spec (epochs 2 -> 1" in err and "pass a new or empty --out" in err
    assert snapshot(b) == before
    reports = tmp_path / "reports"
    for argv in (
        ["report", str(a), "--out", str(reports)],
        ["report", str(a), "--out", str(reports)],
        ["report", str(a)],
    ):
        code, err = run_in_process(argv, capsys)
        assert code == 0, err
    code, err = run_in_process(["report", str(b), "--out", str(reports)], capsys)  # a folder of A's reports only
    assert code == 2 and "holds an audit with a different spec (epochs 1 -> 2" in err


def test_check_and_report_on_a_folder_that_is_not_results(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for command in ("check", "report"):
        code, err = run_in_process([command, str(tmp_path / "nowhere")], capsys)
        assert code == 2 and err.count("\n") == 1 and f"{tmp_path / 'nowhere'}: no such folder" in err, err
        code, err = run_in_process([command, str(tmp_path / "empty")], capsys)
        assert code == 2 and "empty: not a fairrecon results folder (it has no summary.json)" in err, err
        assert "summary.json missing" not in err


class TinyAutoencoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(64, 64)

    def forward(self, x):
        return self.layer(x.flatten(1)).view_as(x)


def test_a_model_pickled_whole_is_told_how_to_save_it(tmp_path, capsys):
    """torch.save(model) pickles the class itself: refused without unpickling, with the two ways that work
    (it used to be asked "a state_dict?", then shown a cut-off torch message)."""
    path = tmp_path / "model.pt"
    torch.save(TinyAutoencoder(), path)
    for extra in ([], ["--model-factory", "nowhere:build"]):
        code, err = run_in_process(["check", "--weights", str(path), *extra, "--max-ratio", "2"], capsys)
        assert code == 2 and err.count("\n") == 1, err
        assert f"pickles a {TinyAutoencoder.__module__}.TinyAutoencoder object" in err
        assert "torch.save(model.state_dict(), FILE)" in err and "torch.export.save" in err and "TorchScript" in err
        assert "state_dict?" not in err and "weights_only" not in err and "..." not in err
    checkpoint = tmp_path / "checkpoint.pt"
    torch.save({"model": TinyAutoencoder().state_dict(), "epoch": 3}, checkpoint)
    code, err = run_in_process(
        ["check", "--weights", str(checkpoint), "--model-factory", "x:y", "--max-ratio", "2"], capsys
    )
    assert (
        code == 2 and "a checkpoint dict (keys model, epoch)" in err and "torch.save(checkpoint['model'], FILE)" in err
    )

"""Help that agrees with the code (issue 20 item 8): every command's options are the settings it uses, and
the numbers and lists its help states come from the code, not from prose.

The spec-built options of a command are the spec fields of the scopes it takes (spec.SCOPE_COMMANDS); these
tests measure, by changing one field at a time on real images, that `split`'s options are exactly the fields
that decide the split, and that the further options of `check --weights` change its numbers.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import run_cli
from PIL import Image

from fairrecon.cli import cli
from fairrecon.data import load_folder, load_images
from fairrecon.errors import UserError
from fairrecon.groups import make_groups, split_table
from fairrecon.spec import DEFAULT_LOSSES, FIELDS, IMAGE_SUFFIXES, SCOPE_COMMANDS, TEST_FRACTION, AuditSpec

SPEC_FIELDS = {f.name: f for f in dataclasses.fields(AuditSpec)}


def options(command: str) -> set[str]:
    """The long options a command's --help lists, as spec field names (--split-seed -> split_seed)."""
    return {p.name for p in cli.commands[command].params}


# Options of a command's own that share a spec field's name: check --losses picks which audited losses to gate.
OWN = {"check": {"losses"}}


def spec_options(command: str) -> set[str]:
    """The options a command builds from spec fields."""
    return (options(command) & set(FIELDS)) - OWN.get(command, set())


def help_text(*argv: str) -> str:
    return " ".join(CliRunner().invoke(cli, [*argv, "--help"], terminal_width=200).output.split())


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """60 grey 8x8 images whose mean brightness runs evenly from 0.05 to 0.95 (so select can reach 0.3 and 0.9),
    the same with one unreadable file, another folder, and a labels CSV."""
    root = tmp_path_factory.mktemp("split")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i, level in enumerate(np.linspace(0.05, 0.95, 60)):
        pixels = np.clip(level + rng.normal(0, 0.03, (8, 8)), 0, 1)
        pixels += level - pixels.mean()  # the mean exactly at the level (the noise stays inside [0, 1] here)
        Image.fromarray(np.round(pixels * 255).astype(np.uint8)).save(images / f"img{i:02d}.png")
    broken = root / "broken"
    shutil.copytree(images, broken)
    (broken / "broken.png").write_bytes(b"not a png")
    other = root / "other"
    other.mkdir()
    for i in range(30):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(other / f"o{i:02d}.png")
    labels = root / "labels.csv"
    labels.write_text("file,group\n" + "".join(f"img{i:02d}.png,{'ab'[i % 2]}\n" for i in range(60)))
    return root


def split_of(spec: AuditSpec):
    """What `fairrecon split` prints for a spec: each file's group and whether it is held out (a validation
    split, carved from the training images for --epochs auto, is training data to whoever trains their own
    model), or the one-line error it stops with."""
    try:
        images = load_images(
            spec.dataset, spec.data_root, spec.download, spec.split_seed, skip_bad=spec.skip_bad_images
        )
        table = split_table(images, make_groups(images, spec))
    except UserError as e:
        return f"error: {e}"
    if table is None:
        return "no files to list"
    return tuple(table.replace({"split": {"validation": "train"}}).itertuples(index=False, name=None))


def test_split_options_are_exactly_the_fields_that_decide_the_split(folder):
    base = dict(dataset="folder", data_root=str(folder / "images"))
    changes = {  # field -> (other settings it needs, its value); every field of the spec, one at a time
        "dataset": ({}, "mnist"),
        "data_root": ({}, str(folder / "other")),
        "download": ({}, True),
        "limit": ({}, 20),
        "test_limit": ({}, 5),
        "split_seed": ({}, 1),
        "skip_bad_images": ({"data_root": str(folder / "broken")}, True),
        "group_method": ({}, "select"),
        "targets": ({}, (0.2, 0.5, 0.8)),
        "proportions": ({}, (0.7, 0.3)),
        "contrast": ({}, "squeeze"),
        "polarity": ({}, "keep"),
        "tolerance": ({"group_method": "select"}, 1e-6),
        "labels": ({}, str(folder / "labels.csv")),
        "losses": ({}, ("l1",)),
        "objectives": ({}, ("erm", "dro:0.1")),
        "model": ({}, "conv"),
        "beta": ({"model": "vae"}, 2.0),
        "generate": ({"model": "vae"}, 10),
        "output": ({}, "sigmoid"),
        "input_norm": ({}, "standardize"),
        "latent": ({}, 8),
        "hidden": ({}, 32),
        "seeds": ({}, 2),
        "epochs": ({}, "auto"),
        "max_epochs": ({"epochs": "auto"}, 30),
        "batch_size": ({}, 16),
        "lr": ({}, 0.01),
        "sigma_lr": ({}, 0.5),
        "sigma_floor": ({}, 0.1),
        "device": ({}, "cpu"),
        "grad_points": ({}, 5),
        "eval_points": ({}, 5),
        "out": ({}, "elsewhere"),
    }
    assert set(changes) == set(FIELDS)  # a new spec field is measured here too
    deciders = set()
    for name, (needs, value) in changes.items():
        try:
            before = AuditSpec().replace(**{**base, **needs})
            after = before.replace(**{name: value})
        except UserError as e:  # a setting refused for an image folder cannot decide its split
            assert "applies only to" in str(e), (name, e)
            continue
        if split_of(before) != split_of(after):
            deciders.add(name)
    spec_only = {n for n, f in SPEC_FIELDS.items() if f.metadata["scope"] == "spec"}
    assert spec_options("split") == deciders - spec_only
    assert deciders & spec_only == {"tolerance"}  # decides whether select succeeds; set in spec files only


class Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(64, 64)

    def forward(self, x):
        return self.layer(x.flatten(1)).view_as(x)


def test_the_further_options_of_check_change_what_it_measures(folder, tmp_path, capsys, monkeypatch):
    """check --weights takes the split's options (which images are scored) and the fields that change how
    they look or are scored: each of those changes its numbers, or (device) the hardware it asks for."""
    torch.manual_seed(0)
    path = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(Linear().eval(), (torch.zeros(4, 1, 8, 8),)), path)
    data = ["--dataset", "folder", "--data-root", str(folder / "images")]

    def numbers(*extra):
        code, out, err = run_cli(capsys, "check", "--weights", path, *data, "--max-gap", "100", "--json", *extra)
        assert code in (0, 1, 3), err
        return json.loads(out)["disparities"]

    base = numbers("--adjusted")
    further = spec_options("check") - spec_options("split")
    assert further == {"contrast", "polarity", "latent", "device"}
    for flag, value in (("--contrast", "squeeze"), ("--polarity", "keep"), ("--latent", "4")):
        assert numbers("--adjusted", flag, value) != base, flag  # latent: the rank of the PCA the gap is adjusted by
    if not torch.cuda.is_available():
        monkeypatch.setattr("torch.cuda.is_available", lambda: False)
        code, _, err = run_cli(capsys, "check", "--weights", path, *data, "--max-ratio", "2", "--device", "cuda")
        assert code == 2 and "cuda" in err.lower()


def test_every_command_lists_only_the_options_it_uses():
    """Spec-built options by scope: audit takes every field with a flag, check the split's and the data's,
    split only the split's; fields set in spec files only are in no command."""
    for command in ("audit", "check", "split"):
        wanted = {n for n, f in SPEC_FIELDS.items() if command in SCOPE_COMMANDS[f.metadata["scope"]]}
        assert spec_options(command) == wanted, command
        shown = set(re.findall(r"--([a-z][a-z-]+)", help_text(command)))
        assert {n.replace("_", "-") for n in wanted} <= shown
    spec_only = {n for n, f in SPEC_FIELDS.items() if f.metadata["scope"] == "spec"}
    for command in cli.commands:
        assert not spec_options(command) & spec_only, command
    assert spec_options("audit") == set(FIELDS) - spec_only
    assert "latent" not in spec_options("split") and "device" not in spec_options("split")  # issue 20 item 8


def test_help_numbers_and_lists_come_from_the_code():
    """audit --help once said three seeds when the default was 5: its defaults are now read from the spec."""
    spec = AuditSpec()
    text = help_text("audit")
    assert f"{spec.seeds} seeds of {spec.epochs} epochs" in text
    assert f"the losses {', '.join(DEFAULT_LOSSES)}," in text and "0.3, 0.9" in text
    words = r"\b(?:two|three|four|five|six|seven|eight|nine|ten)\b"  # counts belong to the code, not to prose
    for command in ("", *cli.commands):
        assert not re.search(words, help_text(*([command] if command else [])), re.I), command
    assert f"({TEST_FRACTION:.0%} held out" in help_text("split")


def test_image_types_are_one_list_that_loads(tmp_path, capsys):
    """The image files a folder dataset reads: one tuple (spec.IMAGE_SUFFIXES) behind the loader, `--dataset`'s
    help and `fairrecon datasets`; every type in it really loads (written here with Pillow), and an image of a
    type it does not read (it once listed bmp and tif, which never loaded) is refused by name, not left out."""
    rng = np.random.default_rng(0)
    for i, suffix in enumerate(IMAGE_SUFFIXES):
        image = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))  # RGB: webp has no grey
        image.save(tmp_path / f"img{i}{suffix.upper() if i % 2 else suffix}", format="JPEG" if "jp" in suffix else None)
    (tmp_path / "notes.txt").write_text("not an image")
    images = load_folder(tmp_path)
    assert sorted(images.files) == sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".txt")
    listed = ", ".join(s[1:] for s in IMAGE_SUFFIXES)
    assert f"({listed}; subfolders included)" in help_text("audit") and listed in help_text("split")
    code, out, _ = run_cli(capsys, "datasets", "--data-root", tmp_path)
    assert code == 0 and "/".join(s[1:] for s in IMAGE_SUFFIXES) in out
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "scan.tif")
    with pytest.raises(UserError, match=r"scan.tif: not a readable image \(TIF is not read, only .png"):
        load_folder(tmp_path)
    assert list(load_folder(tmp_path, skip_bad=True).skipped) == ["scan.tif"]


def test_every_option_of_its_own_is_read_by_its_command():
    """The options a command declares itself (not built from the spec, which go to the spec as a whole) are
    each read in the command's body, not only declared."""
    import ast
    import inspect
    import textwrap

    for name, command in cli.commands.items():
        tree = ast.parse(textwrap.dedent(inspect.getsource(command.callback)))
        function = tree.body[0]
        read = {
            node.id for node in ast.walk(ast.Module(body=function.body, type_ignores=[])) if isinstance(node, ast.Name)
        }
        spec_built = spec_options(name) if name in SCOPE_COMMANDS["split"] + SCOPE_COMMANDS["audit"] else set()
        for param in command.params:
            if param.name not in spec_built:
                assert param.name in read, (name, param.name)

"""A results folder is fairrecon's own (issue 10, items 2 and 3): changed inputs are never answered with
stale cells, results never overwrite inputs or a folder that is not fairrecon's, and a run that fails
leaves the old results as they were, byte for byte."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_AUDIT, TINY_AUDIT_FLAGS
from conftest import run_cli as run
from PIL import Image

from fairrecon.cli import ERROR_LOG
from fairrecon.resultsdir import FIRST_RESULTS_VERSION, MARKER, read_marker
from fairrecon.version import RESULTS_VERSION, __version__

TINY = [
    "--seeds",
    "1",
    "--epochs",
    "1",
    "--latent",
    "4",
    "--hidden",
    "16",
    "--losses",
    "l2",
    "--device",
    "cpu",
    "--quiet",
]


def faces(root: Path, n: int = 40) -> Path:
    """n small grey images, the first half dark and the second half bright, and a labels CSV beside them."""
    images = root / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        base = 60 if i < n // 2 else 190
        Image.fromarray(np.clip(base + rng.normal(0, 20, (8, 8)), 0, 255).astype(np.uint8)).save(
            images / f"face_{i:03d}.png"
        )
    write_labels(root / "groups.csv", {f"face_{i:03d}.png": "darker" if i < n // 2 else "brighter" for i in range(n)})
    return root


def write_labels(path: Path, groups: dict[str, str]) -> None:
    path.write_text("file,group\n" + "".join(f"{f},{g}\n" for f, g in groups.items()))


def labels_of(path: Path) -> dict[str, str]:
    return dict(line.split(",") for line in path.read_text().splitlines()[1:])


def folder_args(root: Path) -> list[str]:
    return ["--dataset", "folder", "--data-root", str(root / "images"), "--labels", str(root / "groups.csv")]


def snapshot(folder: Path, leave_out: tuple[str, ...] = ()) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in leave_out
    }


@pytest.mark.slow
def test_labels_edited_in_place_are_refused_then_retrained_with_force(tmp_path, capsys):
    """The issue's failure: labels edited in place, the same --out, and the old cells were reused."""
    root, out = faces(tmp_path), tmp_path / "results"
    code, _, err = run(capsys, "audit", *TINY, *folder_args(root), "--out", out)
    assert code == 0, err
    assert json.loads((out / "summary.json").read_text())["inputs"]["labels"]["file"] == str(root / "groups.csv")
    before = snapshot(out)

    groups = labels_of(root / "groups.csv")
    groups["face_000.png"] = "brighter"  # one photo moved to the other group
    write_labels(root / "groups.csv", groups)
    code, _, err = run(capsys, "audit", *TINY, *folder_args(root), "--out", out)
    assert code == 2 and err.count("\n") == 1
    assert f"{root / 'groups.csv'} changed since {out} was written (sha256 " in err and "--force" in err
    assert snapshot(out) == before

    code, _, err = run(capsys, "audit", *TINY, *folder_args(root), "--out", out, "--force")
    assert code == 0, err
    groups_table = json.loads((out / "summary.json").read_text())["groups"]
    n = {(r["split"], r["group"]): r["n"] for r in groups_table}
    assert n[("train", "brighter")] + n[("test", "brighter")] == 21  # the edit is in the new results
    split = (out / "split.csv").read_text().splitlines()
    assert any(line.startswith("face_000.png,brighter,") for line in split)


@pytest.mark.slow
def test_a_third_group_is_refused_without_touching_anything(tmp_path, capsys):
    """The issue's failure: a third group added gave a traceback after half the files were rewritten."""
    root, out = faces(tmp_path), tmp_path / "results"
    assert run(capsys, "audit", *TINY, *folder_args(root), "--out", out)[0] == 0
    before = snapshot(out)
    groups = labels_of(root / "groups.csv")
    groups.update({f"face_{i:03d}.png": "middle" for i in range(15, 25)})
    write_labels(root / "groups.csv", groups)
    code, _, err = run(capsys, "audit", *TINY, *folder_args(root), "--out", out)
    assert code == 2 and "changed since" in err and snapshot(out) == before
    code, _, err = run(capsys, "audit", *TINY, *folder_args(root), "--out", out, "--force")
    assert code == 0, err
    assert {r["group"] for r in json.loads((out / "summary.json").read_text())["groups"]} == {
        "brighter",
        "darker",
        "middle",
    }


@pytest.mark.slow
def test_an_image_added_to_the_folder_is_a_changed_input(tmp_path, capsys):
    root, out = faces(tmp_path), tmp_path / "results"
    assert run(capsys, "audit", *TINY, *folder_args(root), "--out", out)[0] == 0
    shutil.copy(root / "images" / "face_000.png", root / "images" / "face_999.png")
    groups = labels_of(root / "groups.csv")
    write_labels(root / "groups.csv", {**groups, "face_999.png": "darker"})
    code, _, err = run(capsys, "audit", *TINY, *folder_args(root), "--out", out)
    assert code == 2 and "the image folder changed since" in err and "40 files" in err and "41 files" in err


def test_out_holding_the_users_labels_is_refused_even_with_force(tmp_path, capsys):
    """The issue's failure: --out at the folder holding the user's groups.csv overwrote it."""
    root = faces(tmp_path)
    mine = (root / "groups.csv").read_bytes()
    for extra in ([], ["--force"]):
        code, _, err = run(capsys, "audit", *TINY, *folder_args(root), "--out", root, *extra)
        assert code == 2 and err.count("\n") == 1
        assert f"output folder {root} holds this run's input {root / 'groups.csv'}" in err
    assert (root / "groups.csv").read_bytes() == mine and sorted(p.name for p in root.iterdir()) == [
        "groups.csv",
        "images",
    ]


def test_out_inside_the_image_folder_is_refused(tmp_path, capsys):
    root = faces(tmp_path)
    code, _, err = run(capsys, "audit", *TINY, *folder_args(root), "--out", root / "images" / "results")
    assert code == 2 and "is inside the image folder" in err and not (root / "images" / "results").exists()


def test_a_folder_that_is_not_fairrecons_is_never_written(tmp_path, capsys):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "summary.json").write_text('{"my": "own file"}\n')  # a name fairrecon also writes
    for extra in ([], ["--force"]):
        code, _, err = run(capsys, "audit", *TINY, "--limit", "64", "--out", notes, *extra)
        assert code == 2 and f"output folder {notes} is not empty and was not written by fairrecon" in err
    assert snapshot(notes) == {"summary.json": b'{"my": "own file"}\n'}


def test_the_marker_is_written_first_and_says_complete_last(tmp_path, monkeypatch, capsys):
    import fairrecon.fileio as fileio

    order = []
    real = fileio.atomic_write
    monkeypatch.setattr(fileio, "atomic_write", lambda path, data: (order.append(Path(path).name), real(path, data))[1])
    for module in ("fairrecon.resultsdir", "fairrecon.resume", "fairrecon.audit"):
        monkeypatch.setattr(f"{module}.atomic_write", fileio.atomic_write)
    out = tmp_path / "results"
    assert run(capsys, "audit", *TINY, "--limit", "64", "--out", out)[0] == 0
    assert order[0] == MARKER and order[-1] == MARKER and order[-2] == "summary.json"
    marker = read_marker(out)
    assert marker["complete"] is True and marker["identity"]["inputs"]["data"]["dataset"] == "digits"


# --- failures after the inputs are validated leave the old results intact ------------------------


@pytest.fixture(scope="module")
def finished(trained) -> Path:
    """A finished tiny audit's folder (shared: each test copies it); `SAME` runs the same audit again."""
    return trained(**TINY_AUDIT).folder


SAME = [*TINY_AUDIT_FLAGS, "--quiet"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "where",
    [
        "fairrecon.stats.analyse",
        "fairrecon.outputs.html_report",
        "fairrecon.outputs.markdown_report",
        "fairrecon.outputs.summary_json",
    ],
)
def test_a_crash_after_training_leaves_the_old_folder_byte_for_byte(where, finished, tmp_path, monkeypatch, capsys):
    """The same audit again (all cells done) or another one (--force, retrained): either way, a crash in
    the statistics or a report changes no result file, and the crash is exit 4 with the traceback logged."""
    for extra, name in (([], "same"), (["--epochs", "2", "--force"], "forced")):
        out = tmp_path / name
        shutil.copytree(finished, out)
        before = snapshot(out)

        def boom(*args, **kwargs):
            raise RuntimeError("forced failure")

        monkeypatch.setattr(where, boom)
        code, stdout, err = run(capsys, "audit", *SAME, "--out", out, *extra)
        monkeypatch.undo()
        assert code == 4 and err.count("\n") == 1 and f"traceback saved to {out / ERROR_LOG}" in err
        assert "forced failure" in (out / ERROR_LOG).read_text()
        after = snapshot(out, leave_out=(ERROR_LOG,))
        for file in (
            "samples.csv",
            "cells.csv",
            "groups.csv",
            "summary.json",
            "report.md",
            "report.html",
            "examples.npz",
        ):
            assert after[file] == before[file], (name, file)
        if name == "same":
            assert after == before  # nothing was written at all
        else:  # the new audit's cells are checkpointed, and the folder says its files are not theirs yet
            assert read_marker(out)["complete"] is False
            code, _, err = run(capsys, "report", out)
            assert code == 2 and "did not finish" in err
            code, _, err = run(capsys, "audit", *SAME, "--out", out, *extra[:2])
            assert code == 0 and read_marker(out)["complete"] is True  # finishing it resumes the checkpoints


def test_a_bad_input_on_a_new_folder_creates_nothing(tmp_path, capsys):
    root = faces(tmp_path)
    write_labels(root / "groups.csv", {"face_000.png": "a"})  # 39 images without a label
    code, _, err = run(capsys, "audit", *TINY, *folder_args(root), "--out", tmp_path / "new")
    assert code == 2 and "have no label" in err and not (tmp_path / "new").exists()


# --- folders written before the marker existed ---------------------------------------------------


@pytest.mark.slow
def test_an_older_folder_is_still_read_and_written_only_for_the_same_spec(finished, tmp_path, capsys):
    old = tmp_path / "old"
    shutil.copytree(finished, old)
    (old / MARKER).unlink()  # as an older fairrecon left it: summary.json and cells/, no marker
    summary = json.loads((old / "summary.json").read_text())
    summary.pop("inputs")
    (old / "summary.json").write_text(json.dumps(summary))
    code, out, err = run(capsys, "check", old, "--max-ratio", "100")
    assert code == 3 and "only 1 trained seed" in out, out + err  # read: the verdict of a 1-seed audit
    code, _, err = run(capsys, "report", old)
    assert code == 0, err
    code, _, err = run(capsys, "audit", *SAME, "--epochs", "2", "--out", old)
    assert code == 2 and "different spec (epochs 1 -> 2)" in err
    code, _, err = run(capsys, "audit", *SAME, "--out", old)
    assert code == 0, err  # the same spec: retrained (the old cells carry no input fingerprint) and marked
    assert read_marker(old)["complete"] is True


# --- results versions: numbers computed by a fairrecon whose numbers differ are never resumed ------


def test_a_folder_of_another_results_version_is_refused_naming_both_then_retrained_with_force(
    finished, tmp_path, capsys, monkeypatch
):
    folder = tmp_path / "older"
    shutil.copytree(finished, folder)
    assert read_marker(folder)["identity"]["results_version"] == RESULTS_VERSION
    assert json.loads((folder / "summary.json").read_text())["info"]["results_version"] == RESULTS_VERSION
    monkeypatch.setattr("fairrecon.resultsdir.RESULTS_VERSION", RESULTS_VERSION + 1)  # a fairrecon whose numbers moved
    before = snapshot(folder)
    same = ["audit", *SAME, "--out", folder]
    code, _, err = run(capsys, *same)
    assert code == 2 and err.count("\n") == 1, err
    assert (
        f"{folder} holds results version {RESULTS_VERSION} (written by fairrecon {__version__}); this fairrecon "
        f"{__version__} computes results version {RESULTS_VERSION + 1}, whose numbers differ: pass another --out "
        "folder, or --force to replace it (and retrain)"
    ) in err
    assert snapshot(folder) == before
    code, _, err = run(capsys, *same, "--force")
    assert code == 0, err
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["info"]["resumed_cells"] == 0  # retrained: no checkpointed cell of the older numbers was reused
    assert (
        summary["info"]["results_version"] == read_marker(folder)["identity"]["results_version"] == RESULTS_VERSION + 1
    )


def test_a_folder_from_before_results_versions_is_version_1_and_resumes_as_before(finished, tmp_path, capsys):
    """fairrecon 0.1.0 recorded no results version: its folders hold results version 1, and their identity
    hash (which left the version out) is unchanged, so their checkpointed cells are resumed, not retrained."""
    folder = tmp_path / "v0.1.0"
    shutil.copytree(finished, folder)
    marker = read_marker(folder)
    marker["identity"].pop("results_version")
    (folder / MARKER).write_text(json.dumps(marker))
    summary = json.loads((folder / "summary.json").read_text())
    summary["info"].pop("results_version")
    (folder / "summary.json").write_text(json.dumps(summary))
    code, _, err = run(capsys, "audit", *SAME, "--out", folder)
    if RESULTS_VERSION == FIRST_RESULTS_VERSION:
        assert code == 0, err
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["info"]["resumed_cells"] == len(summary["cells"]) == 2  # none retrained
    else:  # once the numbers have moved, such a folder is refused like any other of an older results version
        assert code == 2 and f"holds results version {FIRST_RESULTS_VERSION} (written by" in err, err

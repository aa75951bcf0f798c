"""The README's walkthrough "Your own photos and a CSV from a spreadsheet", step by step on the real
Yale faces in ../shared/datasets/yalefaces (164 photos), with fast training settings."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
from PIL import Image

from conftest import SHARED_DATASETS
from fairrecon.cli import main

YALE = SHARED_DATASETS / "yalefaces"
FAST = ["--batch-size", "16", "--epochs", "2", "--seeds", "1", "--losses", "l2", "--hidden", "32", "--device", "cpu",
        "--quiet"]


@pytest.fixture
def faces(tmp_path, monkeypatch):
    """Steps 1 and 2: a copy of the photos, shrunk, and groups.csv as a spreadsheet saves it."""
    if not (YALE / "faces.csv").is_file():
        pytest.skip(f"no Yale faces at {YALE}")
    monkeypatch.chdir(tmp_path)
    shutil.copytree(YALE, "faces")
    for path in sorted((tmp_path / "faces" / "images").glob("*.png")):
        Image.open(path).resize((80, 61), Image.LANCZOS).save(path)
    t = pd.read_csv("faces/faces.csv")
    t["group"] = (t.brightness >= t.brightness.median()).map({True: "brighter", False: "darker"})
    t["file"] = "images/" + t["file"]
    t.to_csv("faces/groups.csv", sep=";", encoding="utf-8-sig", lineterminator="\r\n", index=False,
             columns=["file", "group"])
    return tmp_path / "faces"


def fairrecon(capsys, *argv):
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


DATA = ["--dataset", "folder", "--data-root", "faces/images", "--labels", "faces/groups.csv"]


def test_the_walkthrough_on_the_real_photos(faces, capsys):
    raw = (faces / "groups.csv").read_bytes()
    assert raw.startswith(b"\xef\xbb\xbffile;group\r\nimages/subject01_glasses.png;brighter\r\n")  # as a spreadsheet saves it

    # 3. the split: 20% of each group held out
    code, out, err = fairrecon(capsys, "split", *DATA)
    assert code == 0 and "132 train, 32 test, 0 unused images" in err
    split = pd.read_csv(pd.io.common.StringIO(out))
    assert split.groupby(["group", "split"]).size().to_dict() == {
        ("brighter", "test"): 16, ("brighter", "train"): 66, ("darker", "test"): 16, ("darker", "train"): 66}

    # 4. the audit: per-group errors, and a results folder that records what it ran on
    code, out, err = fairrecon(capsys, "audit", *DATA, *FAST, "--out", "results/faces")
    assert code == 0, err
    assert "brighter" in out and "darker" in out
    summary = json.loads((faces.parent / "results/faces/summary.json").read_text())
    assert summary["inputs"]["data"]["files"] == 164 and summary["inputs"]["labels"]["file"] == "faces/groups.csv"
    assert (faces.parent / "results/faces/split.csv").read_text() == split.to_csv(index=False)

    # 5. the gate: 16 test photos per group are too few to judge
    code, out, err = fairrecon(capsys, "check", "results/faces", "--max-ratio", "1.2")
    assert code == 3 and "fewer than 30 test images" in out

    # 6. mistakes fairrecon refuses: results over the inputs, a changed labels file with the same --out
    code, out, err = fairrecon(capsys, "audit", *DATA, *FAST, "--out", "faces")
    assert code == 2 and "holds this run's input faces/groups.csv" in err
    (faces / "groups.csv").write_bytes(raw.replace(b"subject01_glasses.png;brighter", b"subject01_glasses.png;darker"))
    code, out, err = fairrecon(capsys, "audit", *DATA, *FAST, "--out", "results/faces")
    assert code == 2 and "faces/groups.csv changed since results/faces was written" in err

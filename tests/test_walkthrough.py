"""The walkthrough "Your own photos and a CSV from a spreadsheet" (docs/guide/own-data.md), step by step on the
real Yale faces in ../shared/datasets/yalefaces (164 photos), with fast training settings. The page's own
`shrink.py`, `make_csv.py` and `mymodel.py` run as written there, so the page and the test cannot drift apart."""

from __future__ import annotations

import importlib
import io
import json
import re
import shutil

import pandas as pd
import pytest
import torch
from conftest import REPO, SHARED_DATASETS
from conftest import run_cli as fairrecon
from PIL import Image

pytestmark = pytest.mark.slow  # the walkthrough on the real face photos

YALE = SHARED_DATASETS / "yalefaces"
FAST = [
    "--batch-size",
    "16",
    "--epochs",
    "2",
    "--seeds",
    "2",
    "--losses",
    "l2",
    "--hidden",
    "32",
    "--device",
    "cpu",
    "--quiet",
]


PAGE = REPO / "docs" / "guide" / "own-data.md"


def page_code(name: str) -> str:
    """The page's Python block that starts with the comment `# NAME`."""
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(), re.S)
    return next(b for b in blocks if b.startswith(f"# {name}"))


@pytest.fixture
def faces(tmp_path, monkeypatch):
    """Steps 1 and 2: a copy of the photos, shrunk, and groups.csv as a spreadsheet saves it (the page's code)."""
    if not (YALE / "faces.csv").is_file():
        pytest.skip(f"no Yale faces at {YALE}")
    monkeypatch.chdir(tmp_path)
    shutil.copytree(YALE, "faces")
    exec(page_code("shrink.py"), {})
    exec(page_code("make_csv.py"), {})
    with Image.open(next((tmp_path / "faces" / "images").glob("*.png"))) as shrunk:
        assert shrunk.size == (80, 61)
    return tmp_path / "faces"


DATA = ["--dataset", "folder", "--data-root", "faces/images", "--labels", "faces/groups.csv"]


def test_the_walkthrough_on_the_real_photos(faces, capsys, monkeypatch):
    raw = (faces / "groups.csv").read_bytes()
    assert raw.startswith(b"\xef\xbb\xbffile;group;split\r\nimages/subject01_glasses.png;brighter;train\r\n")

    # 3. the split: the CSV's split column decides (30 photos of each group held out)
    code, out_split, err = fairrecon(capsys, "split", *DATA)
    out = out_split
    assert code == 0 and "104 train, 60 test, 0 unused images" in err
    split = pd.read_csv(io.StringIO(out))
    assert split.groupby(["group", "split"]).size().to_dict() == {
        ("brighter", "test"): 30,
        ("brighter", "train"): 52,
        ("darker", "test"): 30,
        ("darker", "train"): 52,
    }
    sheet = pd.read_csv(faces / "groups.csv", sep=";", encoding="utf-8-sig")
    assert dict(zip("images/" + split["file"], split["split"])) == dict(zip(sheet["file"], sheet["split"]))

    # 4. the audit: per-group errors, and a results folder that records what it ran on
    code, out, err = fairrecon(capsys, "audit", *DATA, *FAST, "--out", "results/faces")
    assert code == 0, err
    assert "brighter" in out and "darker" in out
    summary = json.loads((faces.parent / "results/faces/summary.json").read_text())
    assert summary["inputs"]["data"]["files"] == 164 and summary["inputs"]["labels"]["file"] == "faces/groups.csv"
    assert (faces.parent / "results/faces/split.csv").read_text() == split.to_csv(index=False)

    # 5. the gate: a verdict (pass or fail, never "insufficient": 30 test photos per group)
    code, out, err = fairrecon(capsys, "check", "results/faces", "--max-ratio", "1.2")
    assert code in (0, 1) and "l2: group " in out and ("darker vs brighter" in out or "brighter vs darker" in out)

    # 6. a model of your own, trained on the split's train photos (a few steps here), scored on the held-out ones
    (faces.parent / "mymodel.py").write_text(page_code("mymodel.py"))
    monkeypatch.syspath_prepend(str(faces.parent))
    torch.manual_seed(0)
    model = importlib.import_module("mymodel").build()  # untrained: the test checks the plumbing, not the model
    torch.save(model.state_dict(), "ae.pt")
    (faces / "split.csv").write_text(out_split)
    weights = ["check", "--weights", "ae.pt", "--model-factory", "mymodel:build", *DATA, "--max-ratio", "1.2"]
    code, out, err = fairrecon(capsys, *weights, "--trained-on", "faces/split.csv")
    assert code in (0, 1) and "model: group " in out and "warning: the model was trained on" not in err
    code, out, err = fairrecon(capsys, *weights, "--trained-on", "all")  # the gate will not judge on seen images
    assert code == 2 and "trained on 60 of the test images" in err and "--allow-trained-on-test" in err
    code, out, err = fairrecon(capsys, *weights, "--trained-on", "all", "--allow-trained-on-test")
    assert "warning: the model was trained on 60 of the 60 test images it is scored on" in err

    # 7. mistakes fairrecon refuses: results over the inputs, a changed labels file with the same --out
    code, out, err = fairrecon(capsys, "audit", *DATA, *FAST, "--out", "faces")
    assert code == 2 and "holds this run's input faces/groups.csv" in err
    (faces / "groups.csv").write_bytes(raw.replace(b"subject01_glasses.png;brighter", b"subject01_glasses.png;darker"))
    code, out, err = fairrecon(capsys, "audit", *DATA, *FAST, "--out", "results/faces")
    assert code == 2 and "faces/groups.csv changed since results/faces was written" in err

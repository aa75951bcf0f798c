"""Property-based tests (hypothesis) for the parsers and the group builder.

Few examples each (max_examples=25): they cover shapes of input a hand-written case
would miss, while keeping the suite fast.
"""

from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fairrecon import AuditSpec, UserError, load_spec
from fairrecon.data import ImageSet, load_images
from fairrecon.groups import group_sizes, read_labels, transformed_groups
from fairrecon.spec import FIELDS, parse_list

FEW = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

finite = st.floats(allow_nan=False, allow_infinity=False)


# --- spec: parse_list and TOML --------------------------------------------------------------


@FEW
@given(st.lists(finite, max_size=6), st.sampled_from([",", ", ", " ,", " , "]))
def test_parse_list_reads_back_any_floats(values, sep):
    assert parse_list(sep.join(repr(v) for v in values)) == tuple(values)


@FEW
@given(st.lists(st.text(alphabet="abcdefghij-_0123456789", min_size=1, max_size=8), max_size=5))
def test_parse_list_reads_back_any_names(names):
    assert parse_list(" , ".join(names), str) == tuple(names)


@FEW
@given(st.lists(finite, min_size=1, max_size=4), st.text(alphabet="xyz!", min_size=1, max_size=4))
def test_parse_list_rejects_non_numbers_in_one_line(values, junk):
    text = ",".join([*map(repr, values), junk])
    with pytest.raises(UserError, match="comma-separated list of float") as e:
        parse_list(text)
    assert "\n" not in str(e.value)


def _toml(value) -> str:
    """A Python value as a TOML value (json's strings, numbers and arrays are valid TOML)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return (
            repr(value) if math.isfinite(value) else ("nan" if math.isnan(value) else ("inf" if value > 0 else "-inf"))
        )
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(value)


@st.composite
def spec_values(draw) -> dict:
    """A valid subset of spec fields, as a user might write them."""
    n = draw(st.integers(2, 4))
    targets = draw(st.lists(st.floats(0.01, 0.99), min_size=n, max_size=n))
    weights = draw(st.lists(st.floats(0.1, 10.0), min_size=n, max_size=n))
    candidates = {
        "dataset": st.sampled_from(["digits", "mnist", "fashion-mnist"]),
        "targets": st.just(targets),
        "proportions": st.just([w / sum(weights) for w in weights]),
        "contrast": st.sampled_from(["matched", "squeeze"]),
        "losses": st.lists(
            st.sampled_from(["l1", "l2", "log-mse", "learned-sigma"]), min_size=1, max_size=4, unique=True
        ),
        "model": st.sampled_from(["mlp", "conv"]),
        "epochs": st.integers(1, 1000),
        "seeds": st.integers(1, 20),
        "limit": st.integers(2, 10**6),
        "lr": st.floats(1e-6, 10.0),
        "tolerance": st.floats(1e-6, 0.5),
        "download": st.booleans(),
        "data_root": st.text(alphabet="abc/._- ", min_size=1, max_size=12),
    }
    keys = draw(st.lists(st.sampled_from(sorted(candidates)), unique=True, max_size=len(candidates)))
    values = {k: draw(candidates[k]) for k in keys}
    if "proportions" in values and "targets" not in values:
        values["targets"] = targets  # proportions must match the number of targets
    # settings that act only under another (spec.APPLIES_ONLY) come with it
    if values.get("download") or "data_root" in values:
        values["dataset"] = draw(st.sampled_from(["mnist", "fashion-mnist"]))
    if "tolerance" in values:
        values.pop("contrast", None)
        values["group_method"] = "select"
    return values


@FEW
@given(values=spec_values(), table=st.booleans())
def test_toml_spec_reads_back_as_written(values, table, tmp_path):
    text = ("[audit]\n" if table else "") + "".join(f"{k} = {_toml(v)}\n" for k, v in values.items())
    path = tmp_path / "audit.toml"
    path.write_text(text)
    expected = AuditSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
    assert load_spec(path) == expected


@FEW
@given(key=st.sampled_from([f for f in FIELDS if len(f) >= 5]), data=st.data())
def test_toml_typo_names_the_key_and_suggests_the_right_one(key, data, tmp_path):
    i = data.draw(st.integers(0, len(key) - 1))
    typo = key[:i] + key[i + 1 :]  # one letter dropped
    assume(typo not in FIELDS)
    path = tmp_path / "audit.toml"
    path.write_text(f"{typo} = 1\n")
    with pytest.raises(UserError) as e:
        load_spec(path)
    message = str(e.value)
    assert "\n" not in message and f"unknown key '{typo}'" in message and f"did you mean '{key}'?" in message


# --- labels CSV -------------------------------------------------------------------------------

names = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=["Cs", "Cc", "Zl", "Zp"]), min_size=1, max_size=12
).filter(lambda s: s.strip() == s)  # inner spaces, none around


@FEW
@given(
    labels=st.dictionaries(names, names, min_size=1, max_size=8),
    key=st.sampled_from(["file", "index"]),
    extra=st.booleans(),
)
def test_labels_csv_reads_back_as_written(labels, key, extra, tmp_path):
    """Any names (commas, quotes, non-ASCII, inner spaces), either key column, extra columns ignored."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([key, "group"] + (["note"] if extra else []))
    for k, g in labels.items():
        writer.writerow([k, g] + (["x, y"] if extra else []))
    path = tmp_path / "labels.csv"
    path.write_text(buffer.getvalue(), encoding="utf-8")
    assert {label.key: label.group for label in read_labels(path)} == labels  # read_labels returns rows since issue 10


@FEW
@given(labels=st.dictionaries(names, names, min_size=1, max_size=6), data=st.data())
def test_labels_csv_refuses_conflicting_rows_in_one_line(labels, data, tmp_path):
    file = data.draw(st.sampled_from(sorted(labels)))
    other = labels[file] + "-other"
    rows = [*labels.items(), (file, other)]
    buffer = io.StringIO()
    csv.writer(buffer).writerows([("file", "group"), *rows])
    path = tmp_path / "labels.csv"
    path.write_text(buffer.getvalue(), encoding="utf-8")
    with pytest.raises(UserError, match="is labelled twice") as e:
        read_labels(path)
    assert "\n" not in str(e.value) and f":{len(rows) + 1}:" in str(e.value)  # names the offending line


# --- group builder ----------------------------------------------------------------------------


@FEW
@given(n=st.integers(1, 10_000), weights=st.lists(st.floats(0.01, 1.0), min_size=1, max_size=6))
def test_group_sizes_add_up_and_round_fairly(n, weights):
    proportions = tuple(w / sum(weights) for w in weights)
    exact = np.asarray(proportions) * n
    try:
        sizes = group_sizes(n, proportions)
    except UserError:
        assert exact.min() < 1  # refused only when some group is due less than one image
        return
    assert sum(sizes) == n and min(sizes) >= 1
    assert np.all(np.abs(np.asarray(sizes) - exact) < 1)  # largest remainder: never more than one off


@pytest.fixture(scope="module")
def small_digits() -> ImageSet:
    """120 train / 40 test digits: enough for several groups, quick to transform."""
    full = load_images("digits")
    return ImageSet("digits", full.train[:120], full.test[:40], full.train_index[:120], full.test_index[:40])


@st.composite
def groupings(draw) -> tuple[tuple[float, ...], tuple[float, ...]]:
    n = draw(st.integers(2, 4))
    targets = tuple(draw(st.lists(st.floats(0.001, 0.999), min_size=n, max_size=n)))
    weights = draw(st.lists(st.floats(0.2, 1.0), min_size=n, max_size=n))
    return targets, tuple(w / sum(weights) for w in weights)


@pytest.mark.slow
@FEW
@given(grouping=groupings(), contrast=st.sampled_from(["matched", "squeeze"]))
def test_transform_gives_asked_sizes_and_brightness(grouping, contrast, small_digits):
    targets, proportions = grouping
    spec = AuditSpec(targets=targets, proportions=proportions, contrast=contrast)
    data = transformed_groups(small_digits, spec)
    for split, x, g in (("train", data.train_x, data.train_g), ("test", data.test_x, data.test_g)):
        assert torch.bincount(g, minlength=len(targets)).tolist() == group_sizes(len(x), proportions), split
        assert x.min() >= 0 and x.max() <= 1
        for code, target in enumerate(targets):
            assert abs(x[g == code].mean().item() - target) <= spec.tolerance, (split, target)

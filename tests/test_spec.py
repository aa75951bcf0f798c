"""The spec: defaults, TOML loading, overrides and validation."""

import math
from pathlib import Path

import pytest

from fairrecon.errors import UserError
from fairrecon.spec import AuditSpec, load_spec, parse_list

AUDITS = sorted((Path(__file__).resolve().parents[1] / "audits").glob("*.toml"))


def test_default_spec_is_the_teaching_question():
    spec = AuditSpec()
    assert spec.dataset == "digits" and spec.targets == (0.3, 0.9)
    assert spec.losses == ("l1", "l2", "log-mse", "learned-sigma") and spec.seeds >= 3
    assert spec.group_proportions == (0.5, 0.5)


def test_toml_is_loaded_and_overrides_win(tmp_path):
    f = tmp_path / "a.toml"
    f.write_text('dataset = "mnist"\ntargets = [0.2, 0.8]\nproportions = [0.9, 0.1]\nseeds = 5\n')
    spec = load_spec(f, seeds=2, limit=None)  # CLI-style: None means the flag was not given
    assert (spec.dataset, spec.targets, spec.proportions, spec.seeds) == ("mnist", (0.2, 0.8), (0.9, 0.1), 2)


def test_unknown_keys_are_caught_with_a_suggestion(tmp_path):
    f = tmp_path / "typo.toml"
    f.write_text('lossses = ["l1"]\n')
    with pytest.raises(UserError, match=r"typo.toml: unknown key 'lossses' \(did you mean 'losses'\?\)"):
        load_spec(f)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(targets=(0.3, 1.0)), "target 1.0 is outside"),
        (dict(targets=(0.3,)), "two or more"),
        (dict(proportions=(0.5, 0.6)), "sum to 1.1, not 1"),
        (dict(proportions=(1.0,)), "1 values for 2 targets"),
        (dict(seeds=0), "seeds must be >= 1"),
        (dict(model="resnet"), "unknown model 'resnet'"),
        (dict(group_method="labels"), "needs a labels CSV"),
        (dict(beta=2.0), r"beta 2 applies only to a VAE \(--model vae or conv-vae\), not model 'mlp'"),
        (dict(model="conv", generate=10), "generate 10 applies only to a VAE"),
        (dict(model="vae", beta=-1.0), "beta must be a number >= 0"),
        (dict(model="vae", beta=math.nan), "beta must be a number >= 0"),
        (dict(model="conv-vae", generate=-1), "generate must be >= 0"),
    ],
)
def test_invalid_values_give_one_line_errors(kwargs, message):
    with pytest.raises(UserError, match=message):
        AuditSpec(**kwargs)


def test_wrong_types_and_bad_lists_are_user_errors(tmp_path):
    f = tmp_path / "t.toml"
    f.write_text('seeds = "three"\n')
    with pytest.raises(UserError, match="'seeds' = 'three'"):
        load_spec(f)
    with pytest.raises(UserError, match="comma-separated"):
        parse_list("0.3,x")


@pytest.mark.parametrize("path", AUDITS, ids=[p.stem for p in AUDITS])
def test_shipped_audit_specs_load(path):
    spec = load_spec(path)
    assert spec.targets == ((0.3, 0.3) if "null" in path.stem else (0.3, 0.9))


def test_spec_round_trips_through_its_dict():
    spec = AuditSpec(proportions=(0.9, 0.1), limit=100)
    again = AuditSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec.to_dict().items()})
    assert again == spec


def test_replace_is_strict_and_override_skips_flags_not_given():
    spec = AuditSpec(out="r", limit=100)
    assert spec.replace(out=None).out is None
    assert spec.replace(targets=None, seeds=None) == spec  # None is no value for these: left as they are
    assert spec.override(out=None, limit=50) == AuditSpec(out="r", limit=50)
    with pytest.raises(UserError, match="unknown spec field"):
        spec.replace(epoch=3)


def test_labels_alone_mean_label_grouping_and_contradictions_are_refused(tmp_path):
    """The issue's failure: `--labels` without `--group-method labels` was ignored (brightness groups were built)."""
    for spec in (
        AuditSpec().replace(dataset="folder", labels="g.csv"),
        AuditSpec.from_dict({"dataset": "folder", "labels": "g.csv"}),
        AuditSpec().override(dataset="folder", labels="g.csv", group_method=None),
    ):
        assert spec.group_method == "labels"
    f = tmp_path / "faces.toml"
    f.write_text('dataset = "folder"\nlabels = "g.csv"\n')
    assert load_spec(f).group_method == "labels"
    again = AuditSpec.from_dict(AuditSpec(dataset="folder", group_method="labels", labels="g.csv").to_dict())
    assert again.group_method == "labels"  # a saved spec (every field written out) reads back
    with pytest.raises(UserError, match="contradicts group method 'transform'"):
        AuditSpec().replace(dataset="folder", labels="g.csv", group_method="transform")
    with pytest.raises(UserError, match="contradicts group method 'select'"):
        AuditSpec(group_method="select").replace(dataset="folder", labels="g.csv")  # not silently switched
    with pytest.raises(UserError, match="proportions 0.9,0.1 applies only to group method transform or select"):
        AuditSpec().replace(dataset="folder", labels="g.csv", proportions="0.9,0.1")
    with pytest.raises(UserError, match="contrast squeeze applies only to group method transform, not 'select'"):
        AuditSpec(group_method="select", contrast="squeeze")


def test_every_choice_tuple_has_one_home_in_spec():
    """The allowed values of an enumerated field (MODELS, OUTPUTS, POLARITIES, ...) are defined in spec.py
    only: any other module that needs them imports them, so they cannot drift apart."""
    import ast

    from fairrecon import spec

    package = Path(spec.__file__).parent
    choices = {
        name
        for name, value in vars(spec).items()
        if name.isupper() and isinstance(value, tuple) and value and all(isinstance(v, str) for v in value)
    }
    assert {"DATASETS", "MODELS", "VAE_MODELS", "CONV_MODELS", "OUTPUTS", "INPUT_NORMS", "POLARITIES"} <= choices
    defined_elsewhere = [
        f"{path.name}: {target.id}"
        for path in sorted(package.glob("*.py"))
        if path.name != "spec.py"
        for node in ast.parse(path.read_text()).body
        if isinstance(node, ast.Assign | ast.AnnAssign)
        for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
        if isinstance(target, ast.Name) and target.id in choices
    ]
    assert not defined_elsewhere

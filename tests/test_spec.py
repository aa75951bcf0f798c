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


# --- issue 20 item 6: a setting given where it does not act is refused, by one rule -----------------------

# field -> (a value other than its default, settings under which it acts, settings under which it does not)
WHERE_IT_ACTS = {
    "data_root": ("elsewhere", dict(dataset="mnist"), dict(dataset="digits")),
    "download": (True, dict(dataset="fashion-mnist"), dict(dataset="folder")),
    "skip_bad_images": (True, dict(dataset="folder"), dict(dataset="mnist")),
    "targets": ((0.2, 0.8), dict(group_method="select"), dict(dataset="folder", group_method="labels", labels="g.csv")),
    "proportions": ((0.9, 0.1), dict(), dict(dataset="folder", group_method="labels", labels="g.csv")),
    "contrast": ("squeeze", dict(), dict(group_method="select")),
    "polarity": ("keep", dict(), dict(group_method="select")),
    "tolerance": (0.05, dict(group_method="select"), dict()),
    "beta": (2.0, dict(model="vae"), dict(model="conv")),
    "generate": (10, dict(model="conv-vae"), dict(model="mlp")),
    "max_epochs": (30, dict(epochs="auto"), dict(epochs=20)),
    "eval_points": (5, dict(epochs=20), dict(epochs="auto")),
    "grad_points": (5, dict(epochs=20), dict(epochs="auto")),
}


def test_every_conditional_setting_is_refused_where_it_does_not_act_and_only_there():
    from fairrecon.spec import _DEFAULTS, APPLIES_ONLY

    assert set(WHERE_IT_ACTS) == set(APPLIES_ONLY)  # a new rule comes with its case here
    for name, (value, acts, idle) in WHERE_IT_ACTS.items():
        assert value != _DEFAULTS[name]
        AuditSpec(**acts, **{name: value})  # accepted where it acts
        AuditSpec(**idle)  # the default is fine anywhere
        with pytest.raises(UserError, match=rf"^{name}\b.* applies only to .*; drop it$") as refused:
            AuditSpec(**idle, **{name: value})
        assert "\n" not in str(refused.value)
    AuditSpec(epochs="auto", grad_points=0)  # off means off under either kind of epochs
    with pytest.raises(UserError, match="max_epochs 30 applies only to --epochs auto, not epochs 20"):
        load_spec_text("epochs = 20\n", max_epochs=30)  # a flag over a spec file: the same rule


def load_spec_text(text: str, **flags) -> AuditSpec:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "a.toml"
        path.write_text(text)
        return load_spec(path, **flags)


def test_the_refused_settings_are_the_ignored_ones():
    """Measured where it is cheap: the settings refused in a context change nothing there (so refusing them loses
    nothing, and their only effect was on the audit's identity). Specs are built past the check to try it."""
    import dataclasses

    import torch

    from fairrecon.data import load_images
    from fairrecon.grid import Cell, TrainConfig
    from fairrecon.groups import make_groups
    from fairrecon.losses import check_settings
    from fairrecon.train import train_cells

    def unchecked(spec: AuditSpec, **changes) -> AuditSpec:
        other = object.__new__(AuditSpec)
        for f in dataclasses.fields(AuditSpec):
            object.__setattr__(other, f.name, changes.get(f.name, getattr(spec, f.name)))
        return other

    base = AuditSpec(limit=64, test_limit=32, latent=4, hidden=16, epochs=1, batch_size=32, losses=("l2",))
    digits = load_images("digits")
    assert torch.equal(load_images("digits", "elsewhere", True, skip_bad=True).train, digits.train)
    one = make_groups(digits, base)
    other = make_groups(digits, unchecked(base, tolerance=0.05))
    assert torch.equal(one.train_x, other.train_x) and torch.equal(one.test_x, other.test_x)

    def weights(spec):
        trained = train_cells(one.train_x, one.train_g, [Cell("l2", 0)], TrainConfig.from_spec(spec))
        return torch.cat([p.flatten() for p in trained.stacked.params.values()])

    reference = weights(base)
    for changed in (unchecked(base, max_epochs=30), unchecked(base, sigma_lr=0.5), unchecked(base, sigma_floor=0.1)):
        assert torch.equal(weights(changed), reference)
    with pytest.raises(UserError, match=r"sigma_lr 0.5 applies only to losses with learned parameters"):
        check_settings(base.replace(sigma_lr=0.5))
    with pytest.raises(UserError, match=r"sigma_floor 0.1 applies only to losses with a learned or predicted scale"):
        check_settings(base.replace(sigma_floor=0.1))
    check_settings(base.replace(losses=("learned-sigma",), sigma_lr=0.5, sigma_floor=0.1))
    check_settings(base.replace(losses=("gaussian-pixel",), sigma_floor=0.1))


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

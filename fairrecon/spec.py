"""The audit specification: one frozen dataclass, the one home of every default.

A spec is what makes an audit re-runnable: it is loaded from `audits/*.toml`, overridden by CLI
flags, validated once, and saved with every result. Each field also carries its help text and,
for enumerations, its allowed values: the command line builds its options from them (cli.py),
so a new setting is added here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .errors import UserError

DATASETS = ("digits", "mnist", "fashion-mnist", "kmnist", "cifar10", "folder")
DOWNLOADABLE = ("mnist", "fashion-mnist", "kmnist", "cifar10")  # torchvision's: files it can fetch
# The image files a folder dataset reads (any case; those torchvision.io.decode_image decodes): the one list behind
# loading, help and `fairrecon datasets`.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif")
TEST_FRACTION = 0.2  # held out where a dataset ships no split (digits, folder)
MODELS = ("mlp", "conv", "vae", "conv-vae")
VAE_MODELS = ("vae", "conv-vae")
CONV_MODELS = ("conv", "conv-vae")
GROUP_METHODS = ("transform", "select", "labels")
CONTRASTS = ("matched", "squeeze")
POLARITIES = ("auto", "keep", "invert")
OUTPUTS = ("linear", "sigmoid")
INPUT_NORMS = ("none", "standardize")
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_LOSSES = ("l1", "l2", "log-mse", "learned-sigma")
# Training objectives (objectives.py: each one's equation and source). erm and balanced take no value; dro and
# relative take a step size ETA (NAME:ETA, or NAME alone for DRO_STEP, the reference implementation's default).
OBJECTIVES = ("erm", "balanced", "dro", "relative")
STEPPED_OBJECTIVES = ("dro", "relative")
DRO_STEP = 0.01  # GroupDRO's --robust_step_size default (kohpangwei/group_DRO, run_expt.py)

# Where a field's flag appears, so that every command's options are exactly the fields it uses:
#   "split" fields decide which images are in which group and split: `split`, `check --weights` and `audit`;
#   "data"  fields decide how those images look and how a model is scored: `check --weights` and `audit`;
#   "audit" fields only `audit` (training and where results go); "spec" fields are set in a spec file only.
Scope = Literal["split", "data", "audit", "spec"]
# The commands whose options each scope's fields are (cli.spec_options reads this).
SCOPE_COMMANDS: dict[str, tuple[str, ...]] = {
    "split": ("audit", "check", "split"),
    "data": ("audit", "check"),
    "audit": ("audit",),
    "spec": (),
}


def setting(
    default: Any,
    help: str,
    *,
    choices: tuple[str, ...] | None = None,
    scope: Scope = "audit",
    metavar: str | None = None,
    words: tuple[str, ...] = (),
) -> Any:
    """A spec field with its default, its help text and (for enumerations) its allowed values.

    `words`: for a field typed `int | str`, the words it takes besides a number (e.g. epochs "auto").
    """
    return dataclasses.field(
        default=default, metadata={"help": help, "choices": choices, "scope": scope, "metavar": metavar, "words": words}
    )


@dataclass(frozen=True)
class AuditSpec:
    """Everything an audit needs; any field can be set in TOML or by a CLI flag.

    Frozen and validated when made: a bad value is a one-line `UserError`. Each field's help text and
    allowed values are in its metadata (`fairrecon audit --help` lists them).

    Examples
    --------
    >>> from fairrecon import AuditSpec
    >>> spec = AuditSpec(losses="l1, mix:0,0.5", seeds=3)
    >>> spec.losses  # one spelling, family members expanded
    ('l1', 'mix:0', 'mix:0.5')
    >>> spec.replace(epochs="auto").epochs, spec.group_proportions
    ('auto', (0.5, 0.5))
    >>> AuditSpec(targets=(0.3, 1.5))
    Traceback (most recent call last):
    ...
    fairrecon.errors.UserError: target 1.5 is outside (0, 1); targets are mean pixel values
    """

    # data
    dataset: str = setting(
        "digits",
        "Dataset: digits ships with scikit-learn (no download); folder is your own images "
        f"({', '.join(x[1:] for x in IMAGE_SUFFIXES)}; subfolders included).",
        choices=DATASETS,
        scope="split",
    )
    data_root: str = setting(
        "datasets", "Folder holding the dataset files (for folder: the image folder).", scope="split", metavar="DIR"
    )
    download: bool = setting(False, "Let torchvision download missing dataset files.", scope="audit")
    limit: int | None = setting(None, "Cap on training images (default: all).", scope="split", metavar="N")
    test_limit: int | None = setting(None, "Cap on held-out images (default: all).", scope="split", metavar="N")
    split_seed: int = setting(
        0,
        "Seed of the group assignment and, where a dataset has none (digits, folder), the "
        f"train/test split ({TEST_FRACTION:.0%} held out; with --labels stratified by group).",
        scope="split",
        metavar="N",
    )
    skip_bad_images: bool = setting(
        False,
        "folder: skip images that cannot be read (with a warning and a count) instead of stopping.",
        scope="split",
    )
    # groups
    group_method: str = setting(
        "transform",
        "transform: map images to target brightness; select: pick real "
        "images by brightness; labels: groups from --labels.",
        choices=GROUP_METHODS,
        scope="split",
    )
    targets: tuple[float, ...] = setting(
        (0.3, 0.9), "Target mean pixel value per group.", scope="split", metavar="T,T,..."
    )
    proportions: tuple[float, ...] | None = setting(
        None, "Share of images per group, e.g. 0.9,0.1 (default: balanced).", scope="split", metavar="P,P,..."
    )
    contrast: str = setting(
        "matched",
        "For transform: matched keeps every group's contrast the same; squeeze is the plain affine map.",
        choices=CONTRASTS,
        scope="data",
    )
    polarity: str = setting(
        "auto",
        "For transform: auto maps each image or its negative (whichever keeps more "
        "contrast at its target); keep never flips (both groups positive); invert always "
        "flips (both groups negative).",
        choices=POLARITIES,
        scope="data",
    )
    tolerance: float = setting(0.01, "Allowed |group mean brightness - target| for select.", scope="spec")
    labels: str | None = setting(
        None,
        "CSV mapping image files to groups (columns file,group and optionally "
        "split = train/test); implies --group-method labels (needs --dataset folder).",
        scope="split",
        metavar="CSV",
    )
    # models, losses, training
    losses: tuple[str, ...] = setting(
        DEFAULT_LOSSES,
        "Losses to compare (`fairrecon losses` lists them). A family "
        "member is NAME:VALUE, and bare numbers after it add members: mix:0,0.5,1 is "
        "mix:0, mix:0.5, mix:1.",
        metavar="L,L,...",
    )
    objectives: tuple[str, ...] = setting(
        ("erm",),
        "Training objectives, each crossed with every loss (docs/method/objectives.md): erm (the batch mean), "
        "balanced (each group weighted by the inverse of its training share), dro:ETA (GroupDRO: weight moves "
        "to the group with the higher error, step ETA), relative:ETA (the same on each group's error in excess "
        f"of its own PCA reference). Must include erm, the twin every objective is compared with; dro alone is "
        f"dro:{DRO_STEP:g}, and bare numbers add members: dro:0.01,0.1.",
        metavar="O,O,...",
    )
    model: str = setting(
        "mlp",
        "Autoencoder: mlp or conv; vae and conv-vae are the same networks as variational "
        "autoencoders (Gaussian encoder, standard normal prior, the loss as the decoder's likelihood).",
        choices=MODELS,
    )
    beta: float = setting(1.0, "VAEs only: weight of the KL term, objective per sample = NLL + beta * KL.", metavar="B")
    generate: int = setting(
        1000,
        "VAEs only: images decoded from the prior per cell, each assigned to a group "
        "(generated_share: whom the generator produces); 0 = off.",
        metavar="N",
    )
    output: str = setting(
        "linear", "Decoder output: linear (unbounded) or sigmoid (predictions in (0, 1)).", choices=OUTPUTS
    )
    input_norm: str = setting(
        "none",
        "Encoder input: none, or standardize each pixel with the training images' mean "
        "and std (the reconstruction target is unchanged).",
        choices=INPUT_NORMS,
    )
    latent: int = setting(
        16,
        "Latent size of the autoencoder (also the PCA rank for difficulty-adjusted gaps).",
        scope="data",
        metavar="K",
    )
    hidden: int = setting(256, "Hidden width of the MLP (the conv model uses hidden // 8 channels).", metavar="N")
    seeds: int = setting(5, "Training runs per loss (seeds 0 .. seeds-1).", metavar="N")
    epochs: int | str = setting(
        50,
        "Training epochs per cell, or auto: until every group's validation error has settled (at least 16 "
        "epochs and 500 optimizer steps, at most max_epochs).",
        metavar="N|auto",
        words=("auto",),
    )
    max_epochs: int = setting(200, "Cap on the epochs of --epochs auto.", metavar="N")
    batch_size: int = setting(128, "Training batch size.", metavar="N")
    lr: float = setting(1e-3, "Adam learning rate of the weights.", metavar="LR")
    sigma_lr: float = setting(
        5e-2,
        "Adam learning rate of the losses' learned parameters, as logs (learned sigma, "
        "scale, dof; faster than the weights, so sigma^2 tracks the MSE within the run).",
        scope="spec",
    )
    sigma_floor: float = setting(
        1e-3, "Smallest value a learned scale (sigma, scale) may reach (pixel units).", scope="spec"
    )
    device: str = setting("auto", "auto takes CUDA when present.", choices=DEVICES, scope="data")
    # measurements
    grad_points: int = setting(
        20,
        "Gradient-share snapshots per cell, at most one per 20 steps (0 = off; with "
        "--epochs auto, at every epoch start instead).",
        scope="spec",
    )
    eval_points: int = setting(
        20,
        "Points per cell at which each group's held-out error is measured during "
        "training (curves.csv); with --epochs auto, one per epoch instead.",
        scope="spec",
    )
    out: str | None = setting(
        None, "Results folder: tables, summary.json, report.md, report.html, checkpoints.", metavar="DIR"
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "losses", parse_losses(self.losses))  # one spelling, however it was given
        object.__setattr__(self, "objectives", parse_objectives(self.objectives))
        _validate(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], where: str = "spec") -> AuditSpec:
        """A spec from plain values (TOML, JSON, keyword arguments): unknown keys and bad values are
        one-line errors that name `where`."""
        for key in raw:
            if key not in FIELDS:
                hint = difflib.get_close_matches(key, FIELDS, n=1)
                did_you_mean = f" (did you mean '{hint[0]}'?)" if hint else ""
                raise UserError(f"{where}: unknown key '{key}'{did_you_mean}; allowed: {', '.join(FIELDS)}")
        try:
            return cls(**_labels_imply_grouping({k: _coerce(k, v, where) for k, v in raw.items()}))
        except UserError as e:
            raise UserError(str(e) if str(e).startswith(f"{where}:") else f"{where}: {e}") from None

    def replace(self, **changes: Any) -> AuditSpec:
        """A copy with some fields changed, like dataclasses.replace but checked and coerced.

        None sets an optional field (out, limit, proportions, ...) to None and leaves any other
        field as it is, since None is not a value it can take.
        """
        unknown = sorted(set(changes) - set(FIELDS))
        if unknown:
            raise UserError(f"unknown spec field(s) {unknown}; allowed: {', '.join(FIELDS)}")
        changes = {k: v for k, v in changes.items() if v is not None or optional(k)}
        changes = {k: _coerce(k, v, "argument") for k, v in changes.items()}
        if self.group_method == "select":  # an explicit choice: --labels alone does not silently replace it
            changes.setdefault("group_method", self.group_method)
        return dataclasses.replace(self, **_labels_imply_grouping(changes))

    def override(self, **flags: Any) -> AuditSpec:
        """Apply CLI flags: a flag left at None was not given and changes nothing."""
        return self.replace(**{k: v for k, v in flags.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @property
    def group_proportions(self) -> tuple[float, ...]:
        n = len(self.targets)
        return self.proportions if self.proportions is not None else tuple([1.0 / n] * n)


FIELDS = tuple(f.name for f in dataclasses.fields(AuditSpec))
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(AuditSpec)}
FIELD_WORDS = {f.name: f.metadata["words"] for f in dataclasses.fields(AuditSpec) if f.metadata["words"]}
_HINTS = typing.get_type_hints(AuditSpec)


def field_type(name: str) -> type:
    """The value type of a field, without None: int, float, str, bool or tuple (of float or str).

    A field that takes a number or a word (`int | str`, e.g. epochs) is str: its text is parsed by `_coerce`.
    """
    hint = _HINTS[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)] if _is_union(hint) else [hint]
    return str if set(args) == {int, str} else args[0]


def optional(name: str) -> bool:
    """True when a field may be None."""
    hint = _HINTS[name]
    return _is_union(hint) and type(None) in typing.get_args(hint)


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def load_spec(path: str | Path, **flags: Any) -> AuditSpec:
    """Read a TOML spec (flat keys, or under an [audit] table) and apply CLI-style flags (None = not given).

    Parameters
    ----------
    path : str or Path
        The spec file, e.g. one of the repository's ``audits/*.toml``.
    **flags
        `AuditSpec` fields to override; a flag left at None was not given.

    Returns
    -------
    AuditSpec

    Examples
    --------
    >>> import pathlib, tempfile
    >>> from fairrecon import load_spec
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "audit.toml"
    >>> _ = path.write_text("seeds = 3")  # TOML: flat keys, or under [audit]
    >>> spec = load_spec(path, epochs=5, limit=None)
    >>> spec.seeds, spec.epochs, spec.limit
    (3, 5, None)
    """
    path = Path(path)
    raw = read_toml(path, "spec file")
    if set(raw) == {"audit"} and isinstance(raw["audit"], dict):
        raw = raw["audit"]
    return AuditSpec.from_dict(raw, str(path)).override(**flags)


def read_toml(path: Path, kind: str) -> dict[str, Any]:
    """A TOML file's tables (a spec file, a sweep file), or one line naming the file and what is wrong."""
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: {kind} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the {kind} ({e})") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: invalid TOML ({e})") from None


def parse_list(text: str, kind: type = float) -> tuple:
    """'0.3, 0.9' -> (0.3, 0.9); used for CLI flags."""
    items = [s.strip() for s in str(text).split(",") if s.strip()]
    try:
        return tuple(kind(s) for s in items)
    except ValueError:
        raise UserError(f"cannot read '{text}' as a comma-separated list of {kind.__name__}") from None


def parse_losses(items: str | Sequence[Any]) -> tuple[str, ...]:
    """Loss names as given (a comma-separated string or a list) -> their canonical, expanded form.

    'l1, mix:0,.25,1' -> ('l1', 'mix:0', 'mix:0.25', 'mix:1'): a bare number adds a member to the
    NAME:VALUE family before it, and numeric values are spelled one way (`canonical_number`), so
    duplicates are caught and checkpoint names are stable. Pure syntax: which families exist and
    their ranges are checked by `fairrecon.losses.get_loss` (spec.py sits below losses.py).
    """
    if isinstance(items, str):
        items = items.split(",")
    out: list[str] = []
    family = None  # the NAME of the last NAME:VALUE token
    for item in items:
        token = str(item).strip()
        name, colon, value = (part.strip() for part in token.partition(":"))
        if colon:
            family = name
            number = _number(value)
            out.append(f"{name}:{canonical_number(number) if number is not None else value}")
        elif (number := _number(token)) is not None:
            if family is None:
                raise UserError(f"losses: '{token}' has no family to extend; write NAME:VALUE first, e.g. mix:0,0.5,1")
            out.append(f"{family}:{canonical_number(number)}")
        elif token:
            family = None
            out.append(token)
    return tuple(out)


def parse_objectives(items: str | Sequence[Any]) -> tuple[str, ...]:
    """Objective names as given (a comma-separated string or a list) -> their canonical form, checked.

    'erm, dro, .1, relative:0.50' -> ('erm', 'dro:0.01', 'dro:0.1', 'relative:0.5'): a stepped objective
    (STEPPED_OBJECTIVES) alone takes DRO_STEP, a bare number adds a member to the stepped objective before it,
    and steps are spelled one way (`canonical_number`), so duplicates are caught and checkpoint names are
    stable. Every name is one of OBJECTIVES; a step is a finite number > 0; erm must be among them.
    """
    if isinstance(items, str):
        items = items.split(",")
    out: list[str] = []
    family = None  # the last stepped objective's name
    for item in items:
        token = str(item).strip()
        if not token:
            continue
        name, colon, value = (part.strip() for part in token.partition(":"))
        if _number(token) is not None:
            if family is None:
                raise UserError(f"objectives: '{token}' has no objective to extend; write NAME:ETA first, e.g. dro:0.1")
            name, value, colon = family, token, ":"
        if name not in OBJECTIVES:
            hint = difflib.get_close_matches(name, OBJECTIVES, n=1)
            raise UserError(
                f"objectives: unknown objective '{name}'"
                + (f" (did you mean '{hint[0]}'?)" if hint else "")
                + f"; allowed: {', '.join(OBJECTIVES)}"
            )
        if name not in STEPPED_OBJECTIVES:
            if colon:
                raise UserError(f"objectives: '{token}': {name} takes no value; write {name}")
            family = None
            out.append(name)
            continue
        step = _number(value) if colon else DRO_STEP
        if step is None or step <= 0:
            raise UserError(f"objectives: '{token}': the step {name}:ETA must be a number > 0, e.g. {name}:0.1")
        family = name
        out.append(f"{name}:{canonical_number(step)}")
    if len(set(out)) != len(out):
        raise UserError(f"objectives: {out} has duplicates")
    if "erm" not in out:
        raise UserError(
            f"objectives: {out or [str(i) for i in items]} lacks erm; every objective's effect is measured "
            "against its erm twin (same seeds, same test images): add erm"
        )
    return tuple(out)


def arm_name(loss: str, objective: str) -> str:
    """A (loss, objective) pair as one name, the unit the statistics compare: the loss for erm, else
    'loss+objective' ('l2+dro:0.1'); no loss or objective name has a '+'."""
    return loss if objective == "erm" else f"{loss}+{objective}"


def split_arm(name: str) -> tuple[str, str]:
    """`arm_name` undone: 'l2+dro:0.1' -> ('l2', 'dro:0.1'), 'l2' -> ('l2', 'erm')."""
    loss, plus, objective = name.partition("+")
    return loss, objective if plus else "erm"


def canonical_number(value: float) -> str:
    """The one spelling of a family's value: the shortest repr that reads back to the same float,
    without a trailing '.0' or an exponent's '+' ('.50' and '0.5' -> '0.5', '1.0' -> '1', 1e16 -> '1e16')."""
    text = repr(float(value) + 0.0)  # + 0.0 turns -0.0 into 0.0
    return text.removesuffix(".0").replace("e+", "e")


def _number(text: str) -> float | None:
    """A finite float, or None when `text` is not one ('nan' and 'inf' are not)."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _coerce(key: str, value: Any, where: str) -> Any:
    """Turn TOML/CLI/JSON values into the field's type, with a one-line error if impossible."""
    kind = field_type(key)
    hint = _HINTS[key]
    described = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
    try:
        if value is None:
            if not optional(key):
                raise TypeError
            return None
        words = FIELD_WORDS.get(key, ())
        if words:  # a number or one of the field's words
            if isinstance(value, str) and value.strip() in words:
                return value.strip()
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float, str))
                or isinstance(value, float)
                and not value.is_integer()
                or isinstance(value, str)
                and not value.strip().lstrip("+-").isdigit()
            ):
                raise UserError(f"{where}: '{key}' = {value!r} is not a whole number or one of: {', '.join(words)}")
            return int(value)
        if kind is tuple or typing.get_origin(kind) is tuple:
            item = typing.get_args(kind)[0] if typing.get_args(kind) else str
            if isinstance(value, str):
                return parse_list(value, item)
            if not isinstance(value, (list, tuple)):
                raise TypeError
            return tuple(item(v) for v in value)
        if kind is bool:
            if not isinstance(value, bool):
                raise TypeError
            return value
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if kind is str:
            if isinstance(value, (dict, list, tuple)):
                raise TypeError
            return str(value)
        return value
    except UserError:
        raise
    except (TypeError, ValueError):
        raise UserError(f"{where}: '{key}' = {value!r} is not a valid {described}") from None


def _labels_imply_grouping(given: dict[str, Any]) -> dict[str, Any]:
    """A labels CSV given without a group method means label grouping: `--labels` alone is enough. Given together with another method, it is a contradiction that `_validate` refuses."""
    if given.get("labels") is not None and "group_method" not in given:
        given = {**given, "group_method": "labels"}
    return given


@dataclass(frozen=True)
class AppliesOnly:
    """A setting that acts only under another one: `applies(spec)` says whether it does, `where` in words
    (for the message), `instead(spec)` the setting that rules it out (and why, where that helps)."""

    applies: Callable[[AuditSpec], bool]
    where: str
    instead: Callable[[AuditSpec], str]
    also_allowed: tuple[Any, ...] = ()  # values that mean the same under either setting (grad_points 0: off)


def _method(s: AuditSpec) -> str:
    return f"'{s.group_method}'" + (" (with --labels the CSV gives the groups)" if s.group_method == "labels" else "")


def _dataset(s: AuditSpec) -> str:
    return f"dataset '{s.dataset}'" + (" (bundled with scikit-learn: no files)" if s.dataset == "digits" else "")


_FILE_DATASETS = tuple(d for d in DATASETS if d != "digits")
# Settings that act only under another setting. Given (not at their default) where they do not act, they
# would be ignored yet counted in the audit's identity (a re-run with or without them would ask for --force):
# each is refused, one line, by the same rule. (Settings that depend on the losses: losses.check_settings.)
APPLIES_ONLY: dict[str, AppliesOnly] = {
    "data_root": AppliesOnly(lambda s: s.dataset in _FILE_DATASETS, "datasets read from files", _dataset),
    "download": AppliesOnly(
        lambda s: s.dataset in DOWNLOADABLE, f"datasets torchvision fetches ({', '.join(DOWNLOADABLE)})", _dataset
    ),
    "skip_bad_images": AppliesOnly(lambda s: s.dataset == "folder", "dataset folder", _dataset),
    "targets": AppliesOnly(
        lambda s: s.group_method in ("transform", "select"), "group method transform or select", _method
    ),
    "proportions": AppliesOnly(
        lambda s: s.group_method in ("transform", "select"), "group method transform or select", _method
    ),
    "contrast": AppliesOnly(lambda s: s.group_method == "transform", "group method transform", _method),
    "polarity": AppliesOnly(lambda s: s.group_method == "transform", "group method transform", _method),
    "tolerance": AppliesOnly(lambda s: s.group_method == "select", "group method select", _method),
    "beta": AppliesOnly(
        lambda s: s.model in VAE_MODELS, f"a VAE (--model {' or '.join(VAE_MODELS)})", lambda s: f"model '{s.model}'"
    ),
    "generate": AppliesOnly(
        lambda s: s.model in VAE_MODELS, f"a VAE (--model {' or '.join(VAE_MODELS)})", lambda s: f"model '{s.model}'"
    ),
    "max_epochs": AppliesOnly(lambda s: s.epochs == "auto", "--epochs auto", lambda s: f"epochs {s.epochs}"),
    "eval_points": AppliesOnly(
        lambda s: s.epochs != "auto",
        "a fixed number of epochs",
        lambda s: "epochs 'auto' (its curve points are at every epoch end)",
    ),
    "grad_points": AppliesOnly(
        lambda s: s.epochs != "auto",
        "a fixed number of epochs (with --epochs auto, only 0 = off)",
        lambda s: "epochs 'auto' (its snapshots are at epoch starts)",
        also_allowed=(0,),
    ),
}


def _shown(value: Any) -> str:
    """A setting's value as a message shows it after its name ('' for a flag that is on)."""
    if isinstance(value, bool):
        return ""
    if isinstance(value, tuple):
        return " " + ",".join(f"{v:g}" for v in value)
    return f" {value:g}" if isinstance(value, float) else f" {value}"


def _validate(s: AuditSpec) -> None:
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise UserError(message)

    for f in dataclasses.fields(s):
        allowed = f.metadata.get("choices")
        if allowed:
            value = getattr(s, f.name)
            need(value in allowed, f"unknown {f.name.replace('_', ' ')} '{value}'; allowed: {', '.join(allowed)}")
    need(len(s.losses) >= 1, "losses: give at least one loss")
    need(len(set(s.losses)) == len(s.losses), f"losses: {list(s.losses)} has duplicates")
    if s.group_method != "labels":
        need(len(s.targets) >= 2, f"targets: need two or more group targets, got {list(s.targets)}")
        for t in s.targets:
            need(math.isfinite(t) and 0.0 < t < 1.0, f"target {t} is outside (0, 1); targets are mean pixel values")
        props = s.group_proportions
        need(len(props) == len(s.targets), f"proportions: {len(props)} values for {len(s.targets)} targets")
        need(all(math.isfinite(p) and p > 0 for p in props), f"proportions {list(props)} must all be > 0")
        need(abs(sum(props) - 1.0) < 1e-6, f"proportions {list(props)} sum to {sum(props):g}, not 1")
    else:
        need(s.labels is not None, "group_method 'labels' needs a labels CSV (--labels FILE)")
        need(
            s.dataset == "folder",
            f"--labels gives groups to the images of a folder: use --dataset folder "
            f"--data-root DIR, not dataset '{s.dataset}'",
        )
    need(
        s.labels is None or s.group_method == "labels",
        f"--labels {s.labels} gives the groups from a CSV, which contradicts group method '{s.group_method}'; "
        "drop one of the two",
    )
    for name, rule in APPLIES_ONLY.items():
        value = getattr(s, name)
        need(
            value == _DEFAULTS[name] or value in rule.also_allowed or rule.applies(s),
            f"{name}{_shown(value)} applies only to {rule.where}, not {rule.instead(s)}; drop it",
        )
    for name in ("latent", "hidden", "seeds", "max_epochs", "batch_size"):
        need(getattr(s, name) >= 1, f"{name} must be >= 1, got {getattr(s, name)}")
    if s.epochs != "auto":
        need(
            isinstance(s.epochs, int) and not isinstance(s.epochs, bool),
            f"epochs must be a whole number or 'auto', got {s.epochs!r}",
        )
        need(isinstance(s.epochs, int) and s.epochs >= 1, f"epochs must be >= 1, got {s.epochs} (or 'auto')")
    need(math.isfinite(s.beta) and s.beta >= 0, f"beta must be a number >= 0, got {s.beta}")
    need(s.generate >= 0, f"generate must be >= 0, got {s.generate}")
    need(s.eval_points >= 2, f"eval_points must be >= 2 (the last is the trained model), got {s.eval_points}")
    for name in ("limit", "test_limit"):
        v = getattr(s, name)
        need(v is None or v >= 2, f"{name} must be >= 2, got {v}")
    need(s.grad_points >= 0, f"grad_points must be >= 0, got {s.grad_points}")
    for name in ("lr", "sigma_lr", "sigma_floor", "tolerance"):
        v = getattr(s, name)
        need(math.isfinite(v) and v > 0, f"{name} must be a positive number, got {v}")

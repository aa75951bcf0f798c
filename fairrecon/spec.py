"""The audit specification: one frozen dataclass, the one home of every default.

A spec is what makes an audit re-runnable: it is loaded from `audits/*.toml`,
overridden by CLI flags, validated once, and saved with every result.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .errors import UserError

DATASETS = ("digits", "mnist", "fashion-mnist", "kmnist", "cifar10", "folder")
MODELS = ("mlp", "conv")
GROUP_METHODS = ("transform", "select", "labels")
CONTRASTS = ("matched", "squeeze")
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_LOSSES = ("l1", "l2", "log-mse", "learned-sigma")


@dataclass(frozen=True)
class AuditSpec:
    """Everything an audit needs; any field can be set in TOML or by a CLI flag."""

    # data
    dataset: Literal["digits", "mnist", "fashion-mnist", "kmnist", "cifar10", "folder"] = "digits"
    data_root: str = "datasets"
    download: bool = False
    limit: int | None = None  # cap on training images (after grouping); None = all
    test_limit: int | None = None  # cap on held-out images; None = all
    split_seed: int = 0  # seeds the group assignment and, where a dataset has none, the train/test split
    # groups
    group_method: Literal["transform", "select", "labels"] = "transform"
    targets: tuple[float, ...] = (0.3, 0.9)  # target mean pixel value per group
    proportions: tuple[float, ...] | None = None  # None = balanced
    contrast: Literal["matched", "squeeze"] = "matched"  # transform only; see groups.py
    tolerance: float = 0.01  # allowed |group mean brightness - target|
    labels: str | None = None  # CSV (file or index -> group) for group_method = "labels"
    # models, losses, training
    losses: tuple[str, ...] = DEFAULT_LOSSES
    model: Literal["mlp", "conv"] = "mlp"
    latent: int = 16
    hidden: int = 256
    seeds: int = 3  # cells use seeds 0 .. seeds-1
    epochs: int = 50
    batch_size: int = 128
    lr: float = 1e-3
    sigma_lr: float = 5e-2  # log sigma moves faster than the weights so sigma^2 tracks the MSE within the run
    sigma_floor: float = 1e-3  # smallest sigma learned-sigma may reach (pixel units)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # measurements
    grad_points: int = 20  # gradient-share snapshots per cell, at most one per 20 steps (0 = off)
    out: str | None = None

    def __post_init__(self) -> None:
        _validate(self)

    def replace(self, **changes: Any) -> "AuditSpec":
        """A copy with some fields changed, like dataclasses.replace but checked and coerced.

        None sets an optional field (out, limit, proportions, ...) to None and leaves any other
        field as it is, since None is not a value it can take.
        """
        unknown = sorted(set(changes) - set(FIELDS))
        if unknown:
            raise UserError(f"unknown spec field(s) {unknown}; allowed: {', '.join(FIELDS)}")
        changes = {k: v for k, v in changes.items() if v is not None or "None" in str(_TYPES[k])}
        return dataclasses.replace(self, **{k: _coerce(k, v, "argument") for k, v in changes.items()})

    def override(self, **flags: Any) -> "AuditSpec":
        """Apply CLI flags: a flag left at None was not given and changes nothing."""
        return self.replace(**{k: v for k, v in flags.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @property
    def group_proportions(self) -> tuple[float, ...]:
        n = len(self.targets)
        return self.proportions if self.proportions is not None else tuple([1.0 / n] * n)


FIELDS = tuple(f.name for f in dataclasses.fields(AuditSpec))
_TYPES = {f.name: f.type for f in dataclasses.fields(AuditSpec)}


def load_spec(path: str | Path, **flags: Any) -> AuditSpec:
    """Read a TOML spec (flat keys, or under an [audit] table) and apply CLI-style flags (None = not given)."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: spec file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read spec ({e})") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: invalid TOML ({e})") from None
    if set(raw) == {"audit"} and isinstance(raw["audit"], dict):
        raw = raw["audit"]
    for key in raw:
        if key not in FIELDS:
            hint = difflib.get_close_matches(key, FIELDS, n=1)
            did_you_mean = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise UserError(f"{path}: unknown key '{key}'{did_you_mean}; allowed: {', '.join(FIELDS)}")
    values = {k: _coerce(k, v, str(path)) for k, v in raw.items()}
    try:
        spec = AuditSpec(**values)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    return spec.override(**flags)


def parse_list(text: str, kind: type = float) -> tuple:
    """'0.3, 0.9' -> (0.3, 0.9); used for CLI flags."""
    items = [s.strip() for s in str(text).split(",") if s.strip()]
    try:
        return tuple(kind(s) for s in items)
    except ValueError:
        raise UserError(f"cannot read '{text}' as a comma-separated list of {kind.__name__}") from None


def _coerce(key: str, value: Any, where: str) -> Any:
    """Turn TOML/CLI values into the field's type, with a one-line error if impossible."""
    kind = str(_TYPES[key])
    try:
        if value is None:
            return None
        if "tuple[float" in kind:
            return parse_list(value, float) if isinstance(value, str) else tuple(float(v) for v in value)
        if "tuple[str" in kind:
            return parse_list(value, str) if isinstance(value, str) else tuple(str(v) for v in value)
        if kind == "bool":
            if not isinstance(value, bool):
                raise TypeError
            return value
        if kind.startswith("int"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if kind.startswith("str"):
            if isinstance(value, (dict, list)):
                raise TypeError
            return str(value)
        return value
    except (TypeError, ValueError):
        raise UserError(f"{where}: '{key}' = {value!r} is not a valid {kind}") from None


def _validate(s: AuditSpec) -> None:
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise UserError(message)

    need(s.dataset in DATASETS, f"unknown dataset '{s.dataset}'; allowed: {', '.join(DATASETS)}")
    need(s.model in MODELS, f"unknown model '{s.model}'; allowed: {', '.join(MODELS)}")
    need(s.group_method in GROUP_METHODS, f"unknown group method '{s.group_method}'; allowed: {', '.join(GROUP_METHODS)}")
    need(s.contrast in CONTRASTS, f"unknown contrast '{s.contrast}'; allowed: {', '.join(CONTRASTS)}")
    need(s.device in DEVICES, f"unknown device '{s.device}'; allowed: {', '.join(DEVICES)}")
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
    for name in ("latent", "hidden", "seeds", "epochs", "batch_size"):
        need(getattr(s, name) >= 1, f"{name} must be >= 1, got {getattr(s, name)}")
    for name in ("limit", "test_limit"):
        v = getattr(s, name)
        need(v is None or v >= 2, f"{name} must be >= 2, got {v}")
    need(s.grad_points >= 0, f"grad_points must be >= 0, got {s.grad_points}")
    for name in ("lr", "sigma_lr", "sigma_floor", "tolerance"):
        v = getattr(s, name)
        need(math.isfinite(v) and v > 0, f"{name} must be a positive number, got {v}")

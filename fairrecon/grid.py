"""An audit's grid: its cells (one loss x one objective x one seed each) and the one training configuration
they share.

A cell's seed fixes its initial weights and its batch order (and, for a VAE, its noise: noise.py); cells that
share a seed differ only in their loss and their training objective (objectives.py), so a cell and its erm twin
are a paired comparison. Training (train.py), measurement (measure.py), generation
(generate.py) and checkpoints (resume.py) all name cells this way.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import pandas as pd
from torch import nn

from .models import VAE_MODELS, build_model
from .spec import AuditSpec, arm_name

ERM = "erm"  # the plain objective: every cell's before objectives existed, and every audit's by default
CELL_KEY = ["loss", "objective", "seed"]  # the columns that name a cell in training's and measurement's tables
OBJECTIVE_COLUMNS = ("objective", "group_weight")  # in an audit's tables only where its cells differ by objective


@dataclass(frozen=True)
class Cell:
    loss: str
    seed: int
    objective: str = ERM  # spec.parse_objectives' canonical name

    @property
    def arm(self) -> str:
        """The (loss, objective) pair as one name, what the statistics compare (spec.arm_name): 'l2', 'l2+dro:0.1'."""
        return arm_name(self.loss, self.objective)

    @property
    def key(self) -> str:
        return f"{self.arm}/seed{self.seed}"


@dataclass(frozen=True)
class TrainConfig:
    """The spec fields training needs; no defaults here: AuditSpec is their one home (`from_spec`)."""

    model: str
    latent: int
    hidden: int
    output: str  # linear | sigmoid (models.py)
    input_norm: str  # none | standardize
    epochs: int | str  # a number, or "auto": until the validation and training curves flatten
    max_epochs: int  # the cap of epochs="auto"
    batch_size: int
    lr: float
    sigma_lr: float
    sigma_floor: float
    grad_points: int  # how many batches per cell to hand to `on_snapshot`
    eval_points: int  # how many curve points per cell to hand to `on_eval` (fixed epochs)
    beta: float  # VAEs: the KL term's weight

    @property
    def vae(self) -> bool:
        return self.model in VAE_MODELS

    @property
    def auto(self) -> bool:
        return self.epochs == "auto"

    @property
    def epoch_cap(self) -> int:
        """The most epochs a cell can train: `epochs`, or `max_epochs` for epochs="auto"."""
        return self.max_epochs if self.auto else int(self.epochs)

    def build(self, shape: tuple[int, int, int], *, scale_head: bool = False) -> nn.Module:
        """One untrained autoencoder of this configuration (with the per-pixel log-scale head if asked)."""
        return build_model(
            self.model,
            shape,
            self.latent,
            self.hidden,
            output=self.output,
            input_norm=self.input_norm,
            scale_head=scale_head,
        )

    @classmethod
    def from_spec(cls, spec: AuditSpec, **changes) -> TrainConfig:
        """The training settings of a spec (with `changes` applied to the spec first, checked)."""
        spec = spec.replace(**changes) if changes else spec
        return cls(**{f.name: getattr(spec, f.name) for f in fields(cls)})


def cell_key(df: pd.DataFrame) -> list[str]:
    """The CELL_KEY columns a table has: loss and seed, with objective where the table names it."""
    return [c for c in CELL_KEY if c in df.columns]


def plain(cells: list[Cell]) -> bool:
    """Whether every cell trains with erm: then the tables carry no OBJECTIVE_COLUMNS, as before objectives."""
    return all(c.objective == ERM for c in cells)


def without_objectives(df: pd.DataFrame) -> pd.DataFrame:
    """A table with its OBJECTIVE_COLUMNS dropped (for an audit whose cells are all erm: `plain`)."""
    return df.drop(columns=[c for c in OBJECTIVE_COLUMNS if c in df.columns])

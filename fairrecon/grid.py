"""An audit's grid: its cells (one loss x one seed each) and the one training configuration they share.

A cell's seed fixes its initial weights and its batch order (and, for a VAE, its noise: noise.py); cells that
share a seed differ only in their loss. Training (train.py), measurement (measure.py), generation
(generate.py) and checkpoints (resume.py) all name cells this way.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from torch import nn

from .models import VAE_MODELS, build_model
from .spec import AuditSpec


@dataclass(frozen=True)
class Cell:
    loss: str
    seed: int

    @property
    def key(self) -> str:
        return f"{self.loss}/seed{self.seed}"


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

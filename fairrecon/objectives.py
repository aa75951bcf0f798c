"""Training objectives: how a cell weighs the samples of its batch, crossed with its loss (issue 21).

Each step, every cell minimises mean_b w[c, b] * objective[c, b] over its batch of B samples: `objective` is
its loss's per-sample NLL (plus beta KL for a VAE), and w is each sample's weight relative to a plain mean:

  erm           w = 1: the batch mean, the same operation to the bit as before objectives existed
  balanced      w = 1 / (G p_g), p_g the group's share of the training images: each group counts 1/G in
                expectation, whatever its headcount (on balanced groups w is exactly 1: the erm step)
  dro:ETA       GroupDRO (Sagawa et al., ICLR 2020; kohpangwei/group_DRO, loss.py, LossComputer with
                normalize_loss): first q_g <- q_g exp(ETA l_g / sum_h l_h), q <- q / sum_h q_h, then
                w = B q_g / n_g (n_g: the group's samples in the batch), so the step minimises
                sum_g q_g mean_{b in g} objective_b, the reference's `group_loss @ adv_probs` with the new q
  relative:ETA  the same game on each group's error in excess of its own reference (Fair PCA: Samadi et al.,
                NeurIPS 2018, minimise the largest excess error): q_g <- q_g exp(ETA (l_g - r_g) / sum_h l_h),
                r_g the mean per-pixel MSE of the group's own rank-`latent` PCA on its training images

q starts at 1/G, lives per cell (C x G) and is updated without gradients from the cell's own batch only, so
vmap, the looped runner and chunking stay exact (each cell's result does not depend on the cells beside it).

What drives q: l_g is the group's mean per-pixel MSE of the cell's reconstructions in this batch, whatever the
cell's loss, divided by its sum over groups (the reference's `--use_normalized_loss`). Not the loss's own value:
NLLs of different losses are in different units (an L1 NLL in |residual| / b + log 2b, a Gaussian one in
squared residuals), a learned-sigma NLL can be negative (q_g exp(ETA l_g) then pushes away from the worse
group, and a sum-normalised negative loss is meaningless), and a raw MSE is ~0.01 per pixel, so one ETA would
mean a different push for every loss and dataset. Normalised MSE is unitless, in [0, 1] for dro, the quantity
the audit measures, and the same for every loss: one ETA is comparable across losses. A group absent from the
batch is not pushed (the reference's loss of 0 for it gives the same); the generalization adjustment C/sqrt(n_g)
is the reference's default, 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .grid import ERM, Cell
from .spec import STEPPED_OBJECTIVES


@dataclass(frozen=True)
class ObjectiveKind:
    """A canonical objective name (spec.parse_objectives) taken apart: 'dro:0.1' -> ('dro', 0.1)."""

    name: str
    eta: float | None = None  # the step of dro and relative

    @classmethod
    def of(cls, objective: str) -> ObjectiveKind:
        name, _, value = objective.partition(":")
        return cls(name, float(value) if name in STEPPED_OBJECTIVES else None)


def dro_update(
    q: torch.Tensor,
    group_loss: torch.Tensor,
    group_count: torch.Tensor,
    eta: float | torch.Tensor,
    reference: torch.Tensor | None = None,
) -> torch.Tensor:
    """One GroupDRO update of the group weights q (..., G) from this batch's per-group mean loss (..., G) (0 for a
    group with no sample, `group_count` 0): q_g exp(eta (l_g - r_g) / sum_h l_h), renormalised to sum 1. Without
    `reference` (r = 0) this is the reference implementation's update with normalize_loss; groups not in the batch
    keep their q (before renormalising). A batch of perfect reconstructions (sum_h l_h = 0) pushes no group."""
    excess = group_loss if reference is None else group_loss - reference
    scale = group_loss.sum(-1, keepdim=True).clamp_min(torch.finfo(group_loss.dtype).tiny)
    push = torch.where(group_count > 0, excess / scale, torch.zeros_like(excess))
    q = q * torch.exp(eta * push)
    return q / q.sum(-1, keepdim=True)


def group_means(values: torch.Tensor, group: torch.Tensor, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per cell, each group's mean of values (C, B) with group codes (C, B), 0 where the group has no sample, and
    its count: two (C, G)."""
    sums = torch.zeros(*values.shape[:-1], n_groups, dtype=values.dtype, device=values.device)
    counts = torch.zeros_like(sums)
    sums.scatter_add_(-1, group, values)
    counts.scatter_add_(-1, group, torch.ones_like(values))
    return sums / counts.clamp_min(1), counts


@torch.no_grad()
def pca_reference(x: torch.Tensor, group: torch.Tensor, n_groups: int, k: int) -> torch.Tensor:
    """Each group's mean per-pixel MSE under its own rank-k PCA (affine: mean + top-k directions, fitted on the
    group's images x (N, ...)) on those same images: (G,). The closed form: the sum of the covariance's
    eigenvalues beyond the k-th, over the pixels (float64; the Gram matrix instead when a group has fewer images
    than pixels). The training images' counterpart of stats.pca_errors (held-out images); 0 for an empty group."""
    out = torch.zeros(n_groups, dtype=torch.float64)
    for g in range(n_groups):
        members = x[group == g].flatten(1).double().cpu()
        if len(members) == 0:
            continue
        centred = members - members.mean(0)
        gram = centred.T @ centred if centred.shape[0] >= centred.shape[1] else centred @ centred.T
        eigenvalues = torch.linalg.eigvalsh(gram / len(members)).clamp_min(0).flip(0)  # descending
        out[g] = eigenvalues[k:].sum() / members.shape[1]
    return out


class GroupWeights:
    """A chunk's objectives: each cell's weights over groups, and the per-sample weights of its step.

    Only cells of a stepped objective (dro, relative) have a state, q (C, G), changed by `update` from their own
    batch; the others' weights are fixed. `plain` (every cell erm): `sample_weights` is None, the step a plain
    mean."""

    def __init__(
        self,
        cells: list[Cell],
        train_group: torch.Tensor,
        n_groups: int,
        reference: torch.Tensor | None = None,
    ):
        """`train_group`: the group codes of the images the cells train on (their shares p_g); `reference` (G,):
        each group's PCA error (`pca_reference`), required when a cell's objective is relative."""
        kinds = [ObjectiveKind.of(c.objective) for c in cells]
        device = train_group.device
        self.n_groups = n_groups
        self.plain = all(c.objective == ERM for c in cells)
        counts = torch.bincount(train_group, minlength=n_groups).double()
        self.share = (counts / counts.sum()).float()  # p_g
        balanced = torch.where(counts > 0, 1.0 / (n_groups * counts / counts.sum()), 0.0).float()  # 1 / (G p_g)
        self.static = torch.stack(
            [balanced if k.name == "balanced" else torch.ones_like(balanced) for k in kinds]
        )  # (C, G): each group's per-sample weight, for the cells without a state
        self.stepped = torch.tensor([k.name in STEPPED_OBJECTIVES for k in kinds], device=device)
        self.eta = torch.tensor([[k.eta or 0.0] for k in kinds], device=device)  # (C, 1)
        self.q = torch.full((len(cells), n_groups), 1.0 / n_groups, device=device)
        relative = torch.tensor([k.name == "relative" for k in kinds], device=device)
        if relative.any() and reference is None:
            raise ValueError("a relative objective needs each group's reference error (pca_reference)")
        self.reference = (
            torch.where(relative[:, None], reference.to(device, torch.float32), 0.0) if relative.any() else None
        )

    def update(self, group: torch.Tensor, sample_mse: torch.Tensor) -> None:
        """The stepped cells' q after this batch (group codes and per-sample MSE, (C, B) each); no gradients."""
        if not self.stepped.any():
            return
        with torch.no_grad():
            loss, count = group_means(sample_mse.float(), group, self.n_groups)
            q = dro_update(self.q, loss, count, self.eta, self.reference)
            self.q = torch.where(self.stepped[:, None], q, self.q)

    def sample_weights(self, group: torch.Tensor) -> torch.Tensor | None:
        """Each sample's weight in its cell's step, relative to the batch mean (C, B), from the weights as they
        stand (after `update` for the step; before it for a snapshot); None when every cell is erm."""
        if self.plain:
            return None
        factor = self.static
        if self.stepped.any():
            count = torch.zeros_like(self.q).scatter_add_(1, group, torch.ones_like(group, dtype=self.q.dtype))
            adaptive = self.q * group.shape[1] / count.clamp_min(1)  # B q_g / n_g
            factor = torch.where(self.stepped[:, None], adaptive, factor)
        return factor.gather(1, group)

    def group_weights(self) -> torch.Tensor:
        """(C, G): the share of each cell's objective that falls on each group in expectation (sums to 1 per
        cell): erm its training share p_g, balanced 1/G, dro and relative q."""
        fixed = (self.static * self.share).float()
        return torch.where(self.stepped[:, None], self.q, fixed / fixed.sum(1, keepdim=True))

"""Gradient shares: which group's samples drive the weight updates, measured during training.

Every loss here is a per-sample NLL and the batch loss of a cell is L = sum_i nll_i / B,
so L splits exactly into one additive part per group, L = sum_g L_g (for log-mse the batch
MSE is held fixed inside each sample's term, see losses.py). Three views of who drives
an update, each a share that sums to 1 over the groups:

  projection  <grad L_g, grad L> / ||grad L||^2   how much of the actual step comes from g
                                                  (parameter space; can be < 0 or > 1)
  norm        ||grad L_g|| / sum_h ||grad L_h||   how hard g pulls, whatever the direction
  output      sum_{i in g} ||dL/dx_hat_i||^2 / sum_i ||dL/dx_hat_i||^2
                                                  how loud g's residuals are to the loss
                                                  (L2: SSE_g / SSE; L1: g's count of
                                                  nonzero residual pixels / the total)

Parameters are all weights plus log sigma (which only learned-sigma uses). Set beside
`sample_share` (g's share of the batch): share / sample_share > 1 means the updates serve
g more than its headcount.

Cost: one forward and G backward passes per snapshot, for all cells at once: the cells are independent, so
the backward of sum_c L_{c,g} gives every cell the gradient of its own L_g.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import pandas as pd
import torch

from .train import Snapshot, StackedCells

SHARES = ("sample_share", "projection_share", "norm_share", "output_share")


@dataclass
class GroupGradients:
    """Per-group gradients of every cell's batch loss, on one batch."""

    params: dict[str, torch.Tensor]  # name -> (G, C, ...): grad of cell c's L_g wrt its weights
    log_sigma: torch.Tensor  # (G, C): grad of cell c's L_g wrt its log sigma (0 unless learned)
    output: torch.Tensor  # (G, C): sum over g's samples of ||dL/dx_hat_i||^2
    count: torch.Tensor  # (G, C): g's samples in cell c's batch

    def gram(self) -> torch.Tensor:
        """(G, G, C): <grad L_g, grad L_h> per cell, over weights and log sigma together."""
        gram = torch.einsum("gc,hc->ghc", self.log_sigma, self.log_sigma)
        for g in self.params.values():
            flat = g.flatten(2)  # (G, C, P)
            gram = gram + torch.einsum("gcp,hcp->ghc", flat, flat)
        return gram

    def shares(self) -> torch.Tensor:
        """(4, G, C) in the order of SHARES: sample, projection, norm and output share."""
        gram = self.gram()
        projection = gram.sum(1) / gram.sum((0, 1))
        norm = torch.diagonal(gram, dim1=0, dim2=1).T.clamp_min(0).sqrt()  # (G, C)
        return torch.stack([self.count / self.count.sum(0), projection, norm / norm.sum(0),
                            self.output / self.output.sum(0)])


def group_gradients(stacked: StackedCells, x: torch.Tensor, group: torch.Tensor, n_groups: int) -> GroupGradients:
    """Per-group gradients of each cell's batch loss on its batch x (C, B, ...), group codes (C, B).

    Uses torch.autograd.grad only: parameters, their .grad and the optimizer are untouched.
    """
    names = list(stacked.params)
    leaves = [stacked.params[n] for n in names] + [stacked.log_sigma]
    with torch.enable_grad():
        x_hat = stacked.forward(x)
        nll = stacked.per_sample_nll(x, x_hat)  # (C, B)
        b = nll.shape[1]
        masks = torch.nn.functional.one_hot(group, n_groups).movedim(-1, 0).to(nll.dtype)  # (G, C, B)
        (out_grad,) = torch.autograd.grad(nll.sum() / b, x_hat, retain_graph=True)  # dL/dx_hat, per sample
        # One backward per group (on CPU this beat one vmapped backward, is_grads_batched, ~5x).
        per_group = [torch.autograd.grad(nll, leaves, grad_outputs=masks[g] / b, retain_graph=g < n_groups - 1,
                                         allow_unused=True, materialize_grads=True) for g in range(n_groups)]
        grads = [torch.stack(parts) for parts in zip(*per_group)]
    output = (masks * out_grad.detach().flatten(2).pow(2).sum(-1)).sum(-1)
    return GroupGradients({n: g.detach() for n, g in zip(names, grads[:-1])}, grads[-1].detach(),
                          output, masks.sum(-1))


class GradShareRecorder:
    """An `on_snapshot` hook for train_cells that records gradient shares; `.frame()` gives them.

    Results stay on the training device until `.frame()`, so recording adds no host syncs.
    """

    def __init__(self, group_names: Sequence[str]):
        self.group_names = tuple(str(n) for n in group_names)
        self._records: list[tuple[int, int, list, torch.Tensor]] = []

    def __call__(self, snap: Snapshot) -> None:
        grads = group_gradients(snap.stacked, snap.x, snap.group, len(self.group_names))
        self._records.append((snap.step, snap.epoch, list(snap.stacked.cells), grads.shares()))

    def frame(self) -> pd.DataFrame:
        """One row per (snapshot, cell, group): loss, seed, step, epoch, group and the four shares."""
        rows = []
        for step, epoch, cells, shares in self._records:
            values = shares.cpu().tolist()  # [share][group][cell]
            for c, cell in enumerate(cells):
                for g, name in enumerate(self.group_names):
                    rows.append({"loss": cell.loss, "seed": cell.seed, "step": step, "epoch": epoch + 1,
                                 "group": name, **{s: values[k][g][c] for k, s in enumerate(SHARES)}})
        return pd.DataFrame(rows, columns=["loss", "seed", "step", "epoch", "group", *SHARES])


def share_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Per (loss, group): the mean of each share over seeds and snapshots, and of share / sample_share."""
    df = frame.copy()
    headcount = df["sample_share"].where(df["sample_share"] > 0)
    ratios = []
    for s in SHARES[1:]:
        name = s.replace("_share", "_ratio")
        df[name] = df[s] / headcount
        ratios.append(name)
    out = df.groupby(["loss", "group"], sort=False)[[*SHARES, *ratios]].mean()
    out.insert(0, "snapshots", df.groupby(["loss", "group"], sort=False).size())
    return out.reset_index()

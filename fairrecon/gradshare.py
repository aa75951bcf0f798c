"""Gradient shares: which group's samples drive the weight updates, measured during training.

Every loss here is a per-sample NLL and the batch loss of a cell is L = sum_i w_i nll_i / B,
so L splits exactly into one additive part per group, L = sum_g L_g (for log-mse the batch
MSE is held fixed inside each sample's term, see losses.py). w_i is the sample's weight in the
cell's training objective (objectives.py): 1 for erm; for dro and relative, the group weights q as
they stand before the snapshot's step (that step's own update moves each q_g by a factor of at
most exp(ETA * |push|), see objectives.dro_update). Three views of who drives
an update, each a share that sums to 1 over the groups:

  projection  <grad L_g, grad L> / ||grad L||^2   how much of the actual step comes from g
                                                  (parameter space; can be < 0 or > 1)
  norm        ||grad L_g|| / sum_h ||grad L_h||   how hard g pulls, whatever the direction
  output      sum_{i in g} ||dL/dx_hat_i||^2 / sum_i ||dL/dx_hat_i||^2 (the mean channels only: a per-pixel scale head is not the reconstruction)
                                                  how loud g's residuals are to the loss
                                                  (L2: SSE_g / SSE; L1: g's count of
                                                  nonzero residual pixels / the total)

VAEs: the batch loss is the training objective, sum_i (nll_i + beta kl_i) / B at the step's own noise
eps, and each snapshot also records the effective KL weight per group,

  kl_weight   ||grad_w beta KL_g|| / ||grad_w NLL_g||  (w: the weights; NaN for autoencoders)

how strongly the prior pulls on g's updates relative to g's reconstruction term. Its drift over
training is the measurement behind "with log-MSE the reconstruction gradient grows as the error
falls, so the KL is effectively down-weighted; with L1 it stays constant".

Parameters are all weights plus the loss's learned parameters (their logs: learned-sigma's
sigma, student-t's scale and dof, ...; see losses.Param). Set beside
`sample_share` (g's share of the batch): share / sample_share > 1 means the updates serve
g more than its headcount.

Cost: about one training step per snapshot, for all cells and groups at once (see
group_gradients); at the default 20 snapshots per cell that is a few % of training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from .hooks import Snapshot
from .stacked import StackedCells
from .threads import one_thread

SHARES = ("sample_share", "projection_share", "norm_share", "output_share")
COLUMNS = ["loss", "objective", "seed", "step", "epoch", "group", *SHARES, "kl_weight"]


@dataclass
class GroupGradients:
    """Per-group gradients of every cell's batch loss on one batch; C cells, G groups."""

    params: dict[str, torch.Tensor]  # name -> (C, G, ...): grad of cell c's L_g wrt its weights
    loss_params: torch.Tensor  # (C, G, K): grad of cell c's L_g wrt its learned loss parameters (0 where unused)
    output: torch.Tensor  # (C, G): sum over g's samples of ||dL/dx_hat_i||^2
    count: torch.Tensor  # (C, G): g's samples in cell c's batch
    kl_weight: torch.Tensor | None = None  # VAEs (C, G): ||grad beta KL_g|| / ||grad NLL_g|| over the weights

    def gram(self) -> torch.Tensor:
        """(C, G, G): <grad L_g, grad L_h> per cell, over weights and learned loss parameters together."""
        gram = torch.bmm(self.loss_params, self.loss_params.transpose(1, 2))
        for w in self.params.values():
            flat = w.flatten(2)  # (C, G, P), contiguous: one batched matmul, no copy
            gram = gram + torch.bmm(flat, flat.transpose(1, 2))
        return gram

    def shares(self) -> torch.Tensor:
        """(4, C, G) in the order of SHARES: sample, projection, norm and output share."""
        gram = self.gram()
        projection = gram.sum(2) / gram.sum((1, 2))[:, None]
        norm = torch.diagonal(gram, dim1=1, dim2=2).clamp_min(0).sqrt()  # (C, G)
        return torch.stack(
            [
                self.count / self.count.sum(1, keepdim=True),
                projection,
                norm / norm.sum(1, keepdim=True),
                self.output / self.output.sum(1, keepdim=True),
            ]
        )


def group_gradients(
    stacked: StackedCells,
    x: torch.Tensor,
    group: torch.Tensor,
    n_groups: int,
    eps: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> GroupGradients:
    """Per-group gradients of each cell's batch loss on its batch x (C, B, ...), group codes (C, B)
    (VAEs: with the step's noise eps (C, B, latent), the objective NLL + beta KL, and the KL weight), each
    sample weighted by its cell's objective (`weights` (C, B), objectives.GroupWeights; None: erm, the mean).

    One forward and one backward for all groups: each cell's batch is split into G
    sub-batches (padded to a common size K), sub-batch g runs through its own copy of the
    cell's weights, and the outputs are put back in batch order before the loss. So the
    loss is exactly the training loss (log-mse's batch MSE included), and the gradient
    reaching copy g is grad L_g. Uses torch.autograd.grad only: the parameters, their
    .grad and the optimizer state are untouched.
    """
    n_cells, b = group.shape
    device = group.device
    masks = torch.nn.functional.one_hot(group, n_groups).transpose(1, 2)  # (C, G, B)
    count = masks.sum(-1)  # (C, G)
    rank = (masks.cumsum(-1) - 1).gather(1, group[:, None]).squeeze(1)  # (C, B): place of each sample in its group
    k = int(count.max())
    slots = torch.zeros(n_cells, n_groups, k + 1, dtype=torch.long, device=device)  # slot k collects the rest
    slots.scatter_(2, torch.where(masks.bool(), rank[:, None], k), torch.arange(b, device=device).expand_as(masks))
    slots = slots[..., :k]  # (C, G, K) sample index; padding repeats sample 0 and gets no gradient
    cell = torch.arange(n_cells, device=device)
    with torch.enable_grad():
        copies = {n: p.repeat_interleave(n_groups, dim=0) for n, p in stacked.params.items()}  # (C*G, ...)
        x_sub = x[cell[:, None, None], slots].flatten(0, 1)  # (C*G, K, ...)
        if eps is None:
            x_hat_sub = stacked.forward(x_sub, copies)
        else:
            x_hat_sub, kl_sub = stacked.forward(x_sub, copies, eps=eps[cell[:, None, None], slots].flatten(0, 1))
            kl = kl_sub.unflatten(0, (n_cells, n_groups))[cell[:, None], group, rank]  # (C, B), in batch order
        x_hat = x_hat_sub.unflatten(0, (n_cells, n_groups))[cell[:, None], group, rank]  # (C, B, ...), batch order
        nll = stacked.per_sample_nll(x, x_hat)  # (C, B)
        weighted = (lambda v: v) if weights is None else (lambda v: v * weights)
        out_grad, *grads = torch.autograd.grad(weighted(nll).sum() / b, [x_hat, *copies.values()], retain_graph=True)
        kl_weight = None
        if eps is not None:  # the KL term's own gradient (zero for the decoder), then the objective's
            kl_grads = torch.autograd.grad(
                stacked.config.beta * weighted(kl).sum() / b,
                list(copies.values()),
                retain_graph=True,
                allow_unused=True,
                materialize_grads=True,
            )
            kl_weight = _group_norms(kl_grads, n_cells, n_groups) / _group_norms(grads, n_cells, n_groups)
            grads = [w + k for w, k in zip(grads, kl_grads)]
        loss_params = torch.zeros(n_cells, n_groups, stacked.loss_params.shape[1], dtype=nll.dtype, device=device)
        if loss_params.numel():
            for g in range(n_groups):  # through the loss only: cheap
                (lp,) = torch.autograd.grad(
                    nll,
                    stacked.loss_params,
                    grad_outputs=weighted(masks[:, g].to(nll.dtype)) / b,
                    retain_graph=g < n_groups - 1,
                    allow_unused=True,
                )
                if lp is not None:
                    loss_params[:, g] = lp
    output = (masks * stacked.mean(out_grad).flatten(2).pow(2).sum(-1)[:, None]).sum(-1)
    grads = [w.unflatten(0, (n_cells, n_groups)) for w in grads]
    return GroupGradients(dict(zip(copies, grads)), loss_params, output, count.to(nll.dtype), kl_weight)


def _group_norms(grads: Sequence[torch.Tensor], n_cells: int, n_groups: int) -> torch.Tensor:
    """(C, G): the norm over all weights of each copy's gradient (copies cell-major, (C*G, ...) each)."""
    return sum(g.flatten(1).pow(2).sum(1) for g in grads).sqrt().view(n_cells, n_groups)


class GradShareRecorder:
    """An `on_snapshot` hook for train_cells that records gradient shares; `.frame()` gives them.

    Shares stay on the training device until `.frame()` (one small host sync per snapshot).
    """

    def __init__(self, group_names: Sequence[str]):
        self.group_names = tuple(str(n) for n in group_names)
        self._records: list[tuple[int, int, list, torch.Tensor]] = []

    def __call__(self, snap: Snapshot) -> None:
        with one_thread():  # the gradients' and Gram matrices' sums then round the same at any --threads
            grads = group_gradients(snap.stacked, snap.x, snap.group, len(self.group_names), snap.eps, snap.weights)
            kl_weight = grads.kl_weight if grads.kl_weight is not None else torch.full_like(grads.count, torch.nan)
            shares = torch.cat([grads.shares(), kl_weight[None]])
        self._records.append((snap.step, snap.epoch, list(snap.stacked.cells), shares))

    def frame(self) -> pd.DataFrame:
        """One row per (snapshot, cell, group): loss, objective, seed, step, epoch, group, the four shares and
        kl_weight."""
        rows = []
        for step, epoch, cells, shares in self._records:
            values = shares.cpu().tolist()  # [share or kl_weight][cell][group]
            for c, cell in enumerate(cells):
                for g, name in enumerate(self.group_names):
                    rows.append(
                        {
                            "loss": cell.loss,
                            "objective": cell.objective,
                            "seed": cell.seed,
                            "step": step,
                            "epoch": epoch + 1,
                            "group": name,
                            **{s: values[k][c][g] for k, s in enumerate([*SHARES, "kl_weight"])},
                        }
                    )
        return pd.DataFrame(rows, columns=COLUMNS)


def share_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Per (loss, group): the mean of each share over seeds and snapshots, and of share / sample_share
    (and of kl_weight, where the table has it)."""
    df = frame.copy()
    headcount = df["sample_share"].where(df["sample_share"] > 0)
    ratios = []
    for s in SHARES[1:]:
        name = s.replace("_share", "_ratio")
        df[name] = df[s] / headcount
        ratios.append(name)
    extra = ["kl_weight"] if "kl_weight" in df.columns else []
    out = df.groupby(["loss", "group"], sort=False)[[*SHARES, *ratios, *extra]].mean()
    out.insert(0, "snapshots", df.groupby(["loss", "group"], sort=False).size())
    return out.reset_index()


def kl_weight_over_training(frame: pd.DataFrame) -> pd.DataFrame | None:
    """VAEs: per (loss, group), the effective KL weight at the first, middle and last snapshot of each cell
    (means over seeds) and its drift, last / first: < 1 means the KL's pull fell relative to the likelihood's
    over training. None when the table has no kl_weight (autoencoders, older results)."""
    if "kl_weight" not in frame.columns or not frame["kl_weight"].notna().any():
        return None
    df = frame[frame["kl_weight"].notna()].sort_values("step", kind="stable")
    rows = []
    for (loss, group), part in df.groupby(["loss", "group"], sort=False):
        per_seed = [s["kl_weight"].to_numpy() for _, s in part.groupby("seed", sort=True)]
        first, mid, last = (
            float(np.mean([w[i(len(w))] for w in per_seed])) for i in (lambda n: 0, lambda n: n // 2, lambda n: n - 1)
        )
        drift = float(np.mean([w[-1] / w[0] for w in per_seed])) if all(w[0] > 0 for w in per_seed) else np.nan
        rows.append(
            {
                "loss": loss,
                "group": group,
                "snapshots": int(np.mean([len(w) for w in per_seed])),
                "kl_weight_first": first,
                "kl_weight_mid": mid,
                "kl_weight_last": last,
                "drift": drift,
            }
        )
    return pd.DataFrame(rows)

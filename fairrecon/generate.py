"""Whom a VAE's generator produces: images decoded from the prior, each assigned to a group.

Each cell decodes `n` codes z ~ N(0, I) (a fixed generator per seed, a stream of its own) and
each decoded image (the decoder's output, the likelihood's location: no sampling of pixel noise)
gets a group:

* brightness groups: the nearest target to its mean pixel (`nearest_target`);
* labelled groups: a classifier fitted on the training images (`GroupClassifier`): logistic
  regression on the first CLASSIFIER_COMPONENTS principal components of the pixels, its
  accuracy measured on the held-out images beside the accuracy of always guessing the largest
  group (chance). An accuracy within NEAR_CHANCE of chance makes the shares meaningless: the
  audit warns, and the report says so beside the shares.

`generated_share` (g's share of the generated images) set beside g's share of the training
images says whom the generator favours: a VAE trained on a 90/10 mix that generates 97/3 has
squeezed the minority out of its prior.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from .groups import GroupedData
from .noise import PRIOR_STREAM, draw_eps, eps_generators
from .stacked import StackedCells

CLASSIFIER_COMPONENTS = 32  # PCA components the labelled-group classifier sees (fewer when the data has fewer)
NEAR_CHANCE = 0.1  # held-out accuracy less than this above chance: the classifier cannot tell the groups apart
COLUMNS = ["loss", "objective", "seed", "group", "n", "generated_share", "brightness"]


def nearest_target(brightness: torch.Tensor, targets: tuple[float, ...]) -> torch.Tensor:
    """The index of the target nearest to each brightness (ties: the first); any shape -> the same shape."""
    return (brightness[..., None] - torch.tensor(targets, dtype=brightness.dtype)).abs().argmin(-1)


@dataclass
class GroupClassifier:
    """Labelled groups: logistic regression on PCA components of the pixels, with its held-out accuracy."""

    model: object  # an sklearn pipeline: standardise, PCA, logistic regression
    accuracy: float  # on the held-out images
    chance: float  # the largest group's share of the held-out images

    @classmethod
    def fit(cls, data: GroupedData, seed: int = 0) -> GroupClassifier:
        x, g = data.train_x.flatten(1).numpy(), data.train_g.numpy()
        k = min(CLASSIFIER_COMPONENTS, x.shape[0] - 1, x.shape[1])
        model = make_pipeline(StandardScaler(), PCA(k, random_state=seed), LogisticRegression(max_iter=2000))
        model.fit(x, g)
        test_g = data.test_g.numpy()
        accuracy = float((model.predict(data.test_x.flatten(1).numpy()) == test_g).mean())
        chance = float(np.bincount(test_g, minlength=len(data.names)).max() / len(test_g))
        return cls(model, accuracy, chance)

    @property
    def near_chance(self) -> bool:
        return self.accuracy < self.chance + NEAR_CHANCE

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """(..., C, H, W) -> group codes (...)."""
        flat = images.reshape(-1, images.shape[-3:].numel()).numpy()
        return torch.from_numpy(self.model.predict(flat)).view(images.shape[:-3])

    def describe(self) -> str:
        return (
            f"logistic regression on {self.model[1].n_components} PCA components of the training images' pixels, "
            f"held-out accuracy {self.accuracy:.3f} (chance {self.chance:.3f})"
        )


@dataclass
class Assigner:
    """How generated images get a group: nearest target brightness, or a fitted classifier."""

    names: tuple[str, ...]
    targets: tuple[float, ...] | None
    classifier: GroupClassifier | None

    @classmethod
    def for_data(cls, data: GroupedData) -> Assigner:
        if data.targets:
            return cls(tuple(data.names), tuple(data.targets), None)
        return cls(tuple(data.names), None, GroupClassifier.fit(data))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Decoded images (C, N, ...) -> group codes (C, N)."""
        if self.classifier is None:
            return nearest_target(images.flatten(2).mean(2), self.targets)
        return self.classifier.predict(images)

    def record(self) -> dict:
        """For result.info["generation"]: the method in words, and the classifier's accuracy."""
        if self.classifier is None:
            return {"method": "nearest target brightness to the mean pixel of each decoded image"}
        c = self.classifier
        return {"method": c.describe(), "accuracy": c.accuracy, "chance": c.chance, "near_chance": c.near_chance}

    def warning(self) -> str | None:
        c = self.classifier
        if c is None or not c.near_chance:
            return None
        return (
            f"generated_share: the group classifier's held-out accuracy {c.accuracy:.3f} is within "
            f"{NEAR_CHANCE:g} of chance ({c.chance:.3f}), so the groups of generated images are not reliable"
        )


@torch.no_grad()
def generated_shares(
    stacked: StackedCells, assign: Assigner, n: int, device: torch.device | str = "cpu"
) -> pd.DataFrame:
    """One row per (cell, group): how many of the cell's `n` images decoded from the prior fall in the group,
    their share, and their mean brightness (mean pixel; NaN when none): a group's generated images far from its
    target say the assignment was close (e.g. a collapsed VAE decoding the average image)."""
    z = draw_eps(
        eps_generators(stacked.cells, PRIOR_STREAM), stacked.cells, n, stacked.config.latent, torch.device(device)
    )
    images = stacked.decode(z).cpu()  # (C, n, ...)
    codes = assign(images)  # (C, n)
    counts = torch.stack([torch.bincount(c, minlength=len(assign.names)) for c in codes]).numpy()
    brightness = images.flatten(2).mean(2).double()
    sums = torch.zeros(len(codes), len(assign.names), dtype=torch.float64).scatter_add_(1, codes, brightness).numpy()
    rows = [
        {
            "loss": cell.loss,
            "objective": cell.objective,
            "seed": cell.seed,
            "group": name,
            "n": int(counts[c, g]),
            "generated_share": counts[c, g] / n,
            "brightness": sums[c, g] / counts[c, g] if counts[c, g] else np.nan,
        }
        for c, cell in enumerate(stacked.cells)
        for g, name in enumerate(assign.names)
    ]
    return pd.DataFrame(rows, columns=COLUMNS)

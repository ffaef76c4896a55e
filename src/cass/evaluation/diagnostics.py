"""Collapse diagnostics (SPEC §1): CASS's loss alone does not prevent both networks from emitting
one constant vector, and from random init it does collapse. These numbers make that visible.

* ``output_std``: per-dimension std over the batch of the L2-normalised outputs, times sqrt(dim).
  Isotropic outputs give 1.0; a constant output gives 0.
* ``effective_rank``: exp of the entropy of the normalised singular values of the centred features
  (Roy & Vetterli 2007): how many directions the backbone really uses.

The verdicts (:func:`learning_checks`) read only the backbones the user gets, measured on fixed images
(:mod:`cass.evaluation.online`), against their values before training; the head's or projector's
``output_std`` of the training batches is shown but decides nothing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BACKBONE_STD = "backbone_std"
"""Column suffix (``cnn_backbone_std``): :func:`output_std` of a backbone's pooled features on fixed images."""
BACKBONE_RANK = "backbone_rank"
"""Column suffix: :func:`effective_rank` of the same features."""
KNN_F1 = "knn_f1"
"""Column suffix: macro-F1 of the online k-NN on the selection split (:mod:`cass.evaluation.online`)."""
DIAGNOSTIC_SUFFIXES = ("_output_std", "_effective_rank", f"_{BACKBONE_STD}", f"_{BACKBONE_RANK}", f"_{KNN_F1}")
"""The per-network learning diagnostics of ``metrics.csv`` (``{role}{suffix}``)."""


def output_std(outputs: torch.Tensor) -> float:
    """Scaled std of L2-normalised outputs: 1.0 healthy, 0.0 collapsed."""
    z = F.normalize(outputs.double(), dim=-1)
    return float(z.std(dim=0).mean() * math.sqrt(z.shape[-1]))


def effective_rank(features: torch.Tensor) -> float:
    """Effective rank of a (samples x dims) feature matrix; 1.0 when everything lies on one line."""
    x = features.double()
    x = x - x.mean(dim=0, keepdim=True)
    singular = torch.linalg.svdvals(x)
    total = singular.sum()
    if total <= 0:
        return 0.0
    p = singular / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


class CollapseMonitor:
    """Keeps the first ``max_samples`` outputs and features of an epoch, per network role.

    Tensors stay on their device until :meth:`compute`, so the training step never waits on a copy.
    """

    def __init__(self, max_samples: int = 512) -> None:
        self.max_samples = max_samples
        self.outputs: dict[str, list[torch.Tensor]] = {}
        self.features: dict[str, list[torch.Tensor]] = {}
        self.seen = 0

    def update(self, outputs: dict[str, torch.Tensor], features: dict[str, torch.Tensor]) -> None:
        if self.seen >= self.max_samples:
            return
        for store, values in ((self.outputs, outputs), (self.features, features)):
            for role, value in values.items():
                store.setdefault(role, []).append(value.detach())
        self.seen += next(iter(outputs.values())).shape[0] if outputs else self.max_samples

    def compute(self) -> dict[str, float]:
        """``{role}_output_std`` and ``{role}_effective_rank`` for every role seen; then reset."""
        result: dict[str, float] = {}
        for role, chunks in self.outputs.items():
            result[f"{role}_output_std"] = output_std(torch.cat(chunks)[: self.max_samples].cpu())
        for role, chunks in self.features.items():
            result[f"{role}_effective_rank"] = effective_rank(torch.cat(chunks)[: self.max_samples].cpu())
        self.outputs, self.features, self.seen = {}, {}, 0
        return result


RANK_FLOOR = 2.0
"""A backbone whose features' effective rank is below 2 varies along one direction only: collapsed. An
absolute floor, not a fraction of the start: the rank of random features already depends on the network, the
input size and the number of images (9 for resnet18 at 32 px on 64 images, 98 at 64 px on 512). On brain MRI
(64 px, 1,000 train images, 512 fixed ones, 3 epochs) the vit_tiny rank fell from 64 to 10 under faithful
CASS, whose backbone collapsed, but also from 67 to 9 under cass-vicreg and from 66 to 16 under DINO, whose
k-NN rose (0.60 -> 0.65, 0.58 -> 0.63): a falling rank alone is a backbone dropping directions, not a
collapse. The std is what separates them (0.03 of its start against 0.29 and 0.68)."""

COLLAPSED = "backbone collapsed"
"""Words every collapse warning carries, so the report can tell a collapse from the other learning checks."""
KNN_MIN_GAIN = 0.02
"""Macro-F1 the online k-NN must gain over its value before training for the backbone to count as having
learned: about one standard error of a macro-F1 on the few hundred selection images it is scored on, so a
smaller gain cannot be told from noise."""


def _start(history: list[dict[str, float]]) -> dict[str, float] | None:
    """The start row (epoch 0, before the first step) of a run's record, if recorded."""
    return history[0] if history and history[0].get("epoch") == 0 else None


def _roles(row: dict[str, float], suffix: str) -> list[str]:
    return [key.removesuffix(f"_{suffix}") for key in row if key.endswith(f"_{suffix}")]


def collapse_warnings(history: list[dict[str, float]], threshold: float) -> list[str]:
    """Warnings for every backbone whose features collapsed since the start of the run, judged from the
    backbone checks of the last epoch against the start row (so a run without one is not judged):

    * std below ``threshold`` times its start: every image gets nearly the same features. Relative, because
      random initialisations already differ twenty-fold (0.02 for densenet121, 0.5 for efficientnet_b0). On
      brain MRI (resnet18 + vit_tiny, 64 px, 1,000 images, 3 epochs) the ViT backbone ended at 0.03 of its
      start under faithful CASS (k-NN 0.59 -> 0.57) and at 0.29 under cass-vicreg (k-NN 0.60 -> 0.65); the
      default 0.1 lies between;
    * effective rank below :data:`RANK_FLOOR`: the features vary along one direction.

    The head's or projector's ``output_std`` plays no part: a projector with BatchNorm (cass-vicreg's) turns
    the tiny differences of a collapsed backbone back into healthy-looking outputs, and a head can collapse
    over a backbone that still tells images apart.
    """
    start = _start(history)
    if start is None or len(history) < 2:
        return []
    last, warnings = history[-1], []
    for role in _roles(start, BACKBONE_STD):
        std, std0 = last.get(f"{role}_{BACKBONE_STD}"), start[f"{role}_{BACKBONE_STD}"]
        if std is not None and std < threshold * std0:
            warnings.append(f"the {role} {COLLAPSED}: the std of its features on fixed train images fell "
                            f"from {std0:.3f} before training to {std:.3f}, below {threshold:g} of it (every image "
                            "gets nearly the same features)")
        rank, rank0 = last.get(f"{role}_{BACKBONE_RANK}"), start[f"{role}_{BACKBONE_RANK}"]
        if rank is not None and rank < RANK_FLOOR:
            warnings.append(f"the {role} {COLLAPSED} onto one direction: the effective rank of its features "
                            f"on fixed train images is {rank:.2f} (below {RANK_FLOOR:g}; {rank0:.1f} before training)")
    return warnings


def knn_warnings(history: list[dict[str, float]]) -> list[str]:
    """Warnings for every backbone whose last online k-NN macro-F1 (selection split) is not
    :data:`KNN_MIN_GAIN` above its value before training: the features the user gets tell the classes
    apart no better than the starting point's."""
    start = _start(history)
    if start is None:
        return []
    warnings = []
    for role in _roles(start, KNN_F1):
        key = f"{role}_{KNN_F1}"
        scores = [(row[key], int(row["epoch"])) for row in history[1:] if key in row]
        if scores and scores[-1][0] < start[key] + KNN_MIN_GAIN:
            best, at = max(scores)
            warnings.append(f"the {role} backbone did not improve its k-NN: macro-F1 on the selection split ended at "
                            f"{scores[-1][0]:.3f} against {start[key]:.3f} before training (best {best:.3f}, epoch "
                            f"{at}); less than {KNN_MIN_GAIN:g} above its starting point")
    return warnings


def learning_checks(history: list[dict[str, float]], threshold: float) -> list[str]:
    """The verdicts every method gets, all on the backbones the user gets: collapse (``threshold``: the
    fraction of its starting std below which a backbone's std counts as collapsed) and the online k-NN."""
    return collapse_warnings(history, threshold) + knn_warnings(history)

"""Collapse diagnostics (SPEC §1): CASS's loss alone does not prevent both networks from emitting
one constant vector, and from random init it does collapse. These numbers make that visible.

* ``output_std``: per-dimension std over the batch of the L2-normalised outputs, times sqrt(dim).
  Isotropic outputs give 1.0; a constant output gives 0.
* ``effective_rank``: exp of the entropy of the normalised singular values of the centred features
  (Roy & Vetterli 2007): how many directions the backbone really uses.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


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


def collapse_warnings(diagnostics: dict[str, float], threshold: float) -> list[str]:
    """Human-readable warnings for every role whose output std fell below ``threshold``."""
    return [
        f"{key.removesuffix('_output_std')} outputs are collapsing: std {value:.3f} < {threshold} "
        "(1 = healthy, 0 = every image gives the same output)"
        for key, value in diagnostics.items()
        if key.endswith("_output_std") and value < threshold
    ]

"""Stochastic weight averaging of a method's exported networks (off by default; the paper mentions it)."""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel


class SWA:
    """Stochastic weight averaging of every exported network (off by default, SPEC §1)."""

    def __init__(self, networks: dict[str, torch.nn.Module], start_epoch: int) -> None:
        self.start_epoch = start_epoch
        self.models = {role: AveragedModel(net) for role, net in networks.items()}

    def update(self, networks: dict[str, torch.nn.Module], finished_epoch: int) -> None:
        if finished_epoch > self.start_epoch:
            for role, net in networks.items():
                self.models[role].update_parameters(net)

    def state_dict(self) -> dict[str, Any]:
        return {role: model.state_dict() for role, model in self.models.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for role, model in self.models.items():
            model.load_state_dict(state[role])

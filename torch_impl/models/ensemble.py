"""Tutorial 001's ensembles (twin of `tf_ref/models/ensemble.py`): prediction = the sum of the members' logits."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class Ensemble(nn.Module):
    def __init__(self, member_factory: Callable[[], nn.Module], members: int = 3):
        super().__init__()
        if members < 1:
            raise ValueError(f"an ensemble needs at least one member, got {members}")
        self.members = nn.ModuleList(member_factory() for _ in range(members))

    def member_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [member(x) for member in self.members]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack(self.member_logits(x)).sum(dim=0)

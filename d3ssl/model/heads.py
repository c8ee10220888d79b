"""Projection and prediction heads (BYOL / SoCo style MLPs)."""
from __future__ import annotations

import torch.nn as nn


class MLPHead(nn.Sequential):
    """Linear - BatchNorm1d - ReLU - Linear: [N,in_dim] -> [N,out_dim].

    Used as the projector (C5 -> 4096 -> 256, student and teacher) and the predictor
    (256 -> 4096 -> 256, student only).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        for name, v in (("in_dim", in_dim), ("hidden_dim", hidden_dim), ("out_dim", out_dim)):
            if int(v) <= 0:
                raise ValueError(f"MLPHead {name} must be a positive int, got {v}")
        super().__init__(
            nn.Linear(in_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )

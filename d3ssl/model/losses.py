"""Region-level losses, averaged over valid boxes only.

Padded boxes are masked, never indexed away, so every shape stays static (``torch.compile`` and
DDP friendly): their inputs are replaced by zeros before any arithmetic and their per-box losses by
zero after it, so whatever values they hold, their gradients are exactly zero and the loss ignores them.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _masked_inputs(valid: torch.Tensor, *feats: torch.Tensor):
    keep = valid.reshape(-1, 1)
    return [torch.where(keep, f.float(), torch.zeros((), dtype=torch.float32, device=f.device))
            for f in feats]


def _masked_mean(per_box: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    per_box = torch.where(valid, per_box, torch.zeros_like(per_box))
    return per_box.sum() / valid.sum().clamp(min=1)


class RegionInfoNCE(nn.Module):
    """InfoNCE of the paper's eq. (5) against a queue, averaged over valid boxes.

        nce(z, z+, Q) = -log exp(z.z+/tau) / sum_{z_j in Q u {z+}} exp(z.z_j/tau)

    with z, z+, z_j unit vectors. Only a box's own positive is in its denominator (no other
    current-batch features), as in MoCo.

    Args:
        temperature: tau (0.2 in the paper).
    forward(z, z_pos, queue, valid, queue_valid=None):
        z: [N,D] student features (any scale; normalised here).
        z_pos: [N,D] teacher features of the same boxes.
        queue: [M,D] unit negatives (M may be 0).
        valid: bool [N]; padded boxes contribute nothing.
        queue_valid: bool [M] or None; False slots (the unfilled part of the queue) are left out.
        Returns the scalar mean over valid boxes (float32).
    """

    def __init__(self, temperature: float = 0.2):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def forward(self, z, z_pos, queue, valid, queue_valid=None):
        valid = valid.reshape(-1)
        z, z_pos = _masked_inputs(valid, z, z_pos)
        z = F.normalize(z, dim=1)
        z_pos = F.normalize(z_pos, dim=1)
        pos = (z * z_pos).sum(dim=1, keepdim=True)
        neg = z @ queue.float().t()
        if queue_valid is not None:
            neg = neg.masked_fill(~queue_valid.reshape(1, -1), float("-inf"))
        logits = torch.cat([pos, neg], dim=1) / self.temperature
        per_box = torch.logsumexp(logits, dim=1) - logits[:, 0]
        return _masked_mean(per_box, valid)


class ByolRegression(nn.Module):
    """BYOL's regression loss 2 - 2 cos(p, z) per box, averaged over valid boxes (SoCo's objective).

    forward(p, z, valid): p [N,D] student predictions, z [N,D] teacher projections, valid bool [N].
    """

    def forward(self, p, z, valid):
        valid = valid.reshape(-1)
        p, z = _masked_inputs(valid, p, z)
        per_box = 2 - 2 * (F.normalize(p, dim=1) * F.normalize(z, dim=1)).sum(dim=1)
        return _masked_mean(per_box, valid)

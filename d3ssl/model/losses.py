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
    keep = valid.unsqueeze(-1)
    return [torch.where(keep, f.float(), torch.zeros((), dtype=torch.float32, device=f.device))
            for f in feats]


def _masked_mean(per_box: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Means over the last dimension's valid entries (0 where none is valid)."""
    per_box = torch.where(valid, per_box, torch.zeros_like(per_box))
    return per_box.sum(dim=-1) / valid.sum(dim=-1).clamp(min=1)


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
        Several terms against the same queue at once: z, z_pos [T,N,D] and valid [T,N] give the T
        terms' means [T], each over its own valid boxes (one pass instead of T: D3SSL's four).
    """

    def __init__(self, temperature: float = 0.2):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def forward(self, z, z_pos, queue, valid, queue_valid=None):
        terms = z.shape[:-2] if z.dim() == 3 else ()
        valid = valid.reshape(*terms, -1)
        z, z_pos = _masked_inputs(valid, z, z_pos)
        z = F.normalize(z.reshape(-1, z.shape[-1]), dim=1)
        z_pos = F.normalize(z_pos.reshape(-1, z_pos.shape[-1]), dim=1)
        pos = (z * z_pos).sum(dim=1, keepdim=True)
        neg = z @ queue.float().t()
        if queue_valid is not None:
            neg = neg.masked_fill(~queue_valid.reshape(1, -1), float("-inf"))
        logits = torch.cat([pos, neg], dim=1) / self.temperature
        per_box = torch.logsumexp(logits, dim=1) - logits[:, 0]
        return _masked_mean(per_box.reshape(valid.shape), valid)


class ByolRegression(nn.Module):
    """BYOL's regression loss 2 - 2 cos(p, z) per box, averaged over valid boxes (SoCo's objective).

    forward(p, z, valid): p [N,D] student predictions, z [N,D] teacher projections, valid bool [N].
    """

    def forward(self, p, z, valid):
        valid = valid.reshape(-1)
        p, z = _masked_inputs(valid, p, z)
        per_box = 2 - 2 * (F.normalize(p, dim=1) * F.normalize(z, dim=1)).sum(dim=1)
        return _masked_mean(per_box, valid)

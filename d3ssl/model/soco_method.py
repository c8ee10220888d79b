"""SoCo (Wei et al., NeurIPS 2021) on the C4 backbone: the baseline D3SSL is measured against.

BYOL regression between the student's predictions and the teacher's projections of the same
proposal in two views, no negatives, no queue. SoCo's three views are V1 (whole image, S px),
V2 (crop, S px) and V3 (V2 at S/2 px); it pairs V1 with V2 and V1 with V3, each in both directions.
Here the student sees x̂1 (V1, SoCo's box jitter and in-box cutout) and x̂2s (V3), the teacher
x1 (V1) and x2 (V2), and the two pairs are

    L = byol(p_s(x̂1), z_t(x2)) + byol(p_s(x̂2s), z_t(x1)),    byol(p, z) = 2 - 2 cos(p, z)

i.e. V1 -> V2 and V3 -> V1: each of the pairs V1-V2 and V1-V3 once, and each view as both student and
teacher input (symmetric), with the teacher's V2 standing in for V3 in the first pair (same
content, full size). Means over valid boxes.
"""
from __future__ import annotations

import torch

from .base import ModelConfig, StudentTeacher, _check_boxes
from .losses import ByolRegression


class SoCo(StudentTeacher):
    """The SoCo baseline method module (cfg.method == "soco"); no queue, no L_dp."""

    def __init__(self, cfg: ModelConfig, max_queue: int | None = None):
        super().__init__(cfg)
        self.byol = ByolRegression()

    def forward(self, views) -> dict[str, torch.Tensor]:
        """views: RegionViews from soco_stage (x3 unused). Returns {"loss", "l_12", "l_31"}."""
        s, s2 = self.cfg.roi_size, self.cfg.roi_size // 2
        _check_boxes("boxes_x1_hat", views.boxes_x1_hat, views.x1_hat)
        _check_boxes("boxes_x2s_hat", views.boxes_x2s_hat, views.x2s_hat)
        _check_boxes("boxes_x1", views.boxes_x1, views.x1)
        _check_boxes("boxes_x2", views.boxes_x2, views.x2)
        n = views.boxes_x1.shape[0] * views.boxes_x1.shape[1]
        valid = views.valid.reshape(-1)
        p = self.student([([views.x1_hat], [views.boxes_x1_hat], s),
                          ([views.x2s_hat], [views.boxes_x2s_hat], s2)])
        z = self.teacher([views.x1, views.x2], [views.boxes_x1, views.boxes_x2], s)
        l_12 = self.byol(p[:n], z[n:], valid)
        l_31 = self.byol(p[n:], z[:n], valid)
        return {"loss": l_12 + l_31, "l_12": l_12.detach(), "l_31": l_31.detach()}

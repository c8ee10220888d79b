"""ResNet-C4 backbone, heads, the D3SSL and SoCo modules, their losses, LARS and the schedules."""
from __future__ import annotations

import torch.nn as nn

from .base import ModelConfig, StudentTeacher, concat_all_gather
from .d3ssl_method import D3SSL
from .heads import MLPHead
from .losses import ByolRegression, RegionInfoNCE
from .optim import LARS, lr_schedule, momentum_schedule, param_groups_for_lars
from .resnet_c4 import ResNetC4, boxes_to_rois
from .soco_method import SoCo


def build_method(cfg: ModelConfig, max_queue: int | None = None) -> nn.Module:
    """The method module named by cfg.method ("d3ssl" -> D3SSL, "soco" -> SoCo).

    max_queue caps D3SSL's queue at what the data holds (num_images * K); SoCo has no queue.
    """
    if cfg.method == "d3ssl":
        return D3SSL(cfg, max_queue=max_queue)
    if cfg.method == "soco":
        return SoCo(cfg)
    raise ValueError(f"ModelConfig.method must be 'd3ssl' or 'soco', got {cfg.method!r}")


__all__ = ["ModelConfig", "build_method", "D3SSL", "SoCo", "StudentTeacher", "ResNetC4", "MLPHead",
           "RegionInfoNCE", "ByolRegression", "LARS", "param_groups_for_lars", "lr_schedule",
           "momentum_schedule", "boxes_to_rois", "concat_all_gather"]

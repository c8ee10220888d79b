"""What the D3SSL and SoCo methods share: the config, the student and its EMA teacher, and the
region encoders (the README's *The method*).

Student f_q = backbone + projector + predictor; teacher f_k = backbone + projector, an exponential
moving average of the student's, never trained by gradients.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from .heads import MLPHead
from .resnet_c4 import ARCHS, ResNetC4, boxes_to_rois

METHODS = ("d3ssl", "soco")
TEACHER_VIEWS1 = ("x1", "x1_hat")


@dataclass
class ModelConfig:
    """Model and loss settings; defaults are the paper's (ResNet-50-C4, COCO pre-training)."""
    method: str = "d3ssl"          # "d3ssl" | "soco" (the baseline)
    arch: str = "resnet50"         # "resnet50" | "resnet18"
    proj_hidden: int = 4096        # projector C5 -> proj_hidden -> proj_dim
    proj_dim: int = 256            # output side of projector and predictor (the InfoNCE features)
    pred_hidden: int = 4096        # predictor proj_dim -> pred_hidden -> proj_dim (student only)
    queue_size: int = 65536        # negatives (teacher region features of earlier steps); d3ssl only
    temperature: float = 0.2       # tau of the InfoNCE; d3ssl only
    base_momentum: float = 0.99    # teacher EMA momentum at step 0 (cosine to 1)
    use_dp: bool = True            # de-positioning loss L_dp (ablation switch); d3ssl only
    sync_bn: bool = False          # SyncBatchNorm when several GPU processes train (DDP); no effect otherwise
    roi_size: int = 14             # RoIAlign side on C4 for S-px views; roi_size // 2 for S/2 views
    # which view 1 the teacher sees (d3ssl only): x1, the view before PRC and PRM (our reading, the
    # default), or x1_hat, the student's erased view (the paper's eq. 3 as printed)
    teacher_view1: str = "x1"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"ModelConfig.method must be one of {METHODS}, got {self.method!r}")
        if self.arch not in ARCHS:
            raise ValueError(f"ModelConfig.arch must be one of {ARCHS}, got {self.arch!r}")
        for name in ("proj_hidden", "proj_dim", "pred_hidden", "queue_size"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {getattr(self, name)}")
        if not self.temperature > 0:
            raise ValueError(f"ModelConfig.temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.base_momentum < 1.0:
            raise ValueError(f"ModelConfig.base_momentum must be in [0, 1), got {self.base_momentum}")
        if self.teacher_view1 not in TEACHER_VIEWS1:
            raise ValueError(f"ModelConfig.teacher_view1 must be one of {TEACHER_VIEWS1}, "
                             f"got {self.teacher_view1!r}")
        if self.roi_size < 2 or self.roi_size % 2:
            raise ValueError(f"ModelConfig.roi_size must be an even int >= 2 (half of it is used for "
                             f"S/2 views), got {self.roi_size}")


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenates `tensor` [N,...] from every rank along dim 0 (rank order); identity when not
    distributed. Every rank must pass the same shape. No gradient flows through it."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(out, tensor.contiguous())
    return torch.cat(out, dim=0)


def _check_boxes(name, boxes, images):
    b = images.shape[0]
    if boxes is None or boxes.dim() != 3 or boxes.shape[0] != b or boxes.shape[-1] != 4:
        raise ValueError(f"RegionViews.{name} must be float [B,K,4] with B={b}, "
                         f"got {None if boxes is None else tuple(boxes.shape)}")


class StudentTeacher(nn.Module):
    """Student (online_backbone, online_projector, predictor) and EMA teacher
    (teacher_backbone, teacher_projector). Subclasses define ``forward(views) -> dict``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.online_backbone = ResNetC4(cfg.arch)
        self.online_projector = MLPHead(self.online_backbone.out_channels, cfg.proj_hidden, cfg.proj_dim)
        self.predictor = MLPHead(cfg.proj_dim, cfg.pred_hidden, cfg.proj_dim)
        self.teacher_backbone = copy.deepcopy(self.online_backbone)
        self.teacher_projector = copy.deepcopy(self.online_projector)
        for p in self.teacher_parameters():
            p.requires_grad_(False)

    def teacher_parameters(self):
        yield from self.teacher_backbone.parameters()
        yield from self.teacher_projector.parameters()

    def _pairs(self):
        online = list(self.online_backbone.parameters()) + list(self.online_projector.parameters())
        teacher = list(self.teacher_parameters())
        return online, teacher

    @torch.no_grad()
    def update_teacher(self, momentum: float):
        """teacher <- momentum * teacher + (1 - momentum) * student, for backbone and projector
        parameters; BatchNorm running statistics are copied from the student."""
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        online, teacher = self._pairs()
        torch._foreach_lerp_(teacher, online, 1.0 - momentum)  # no_grad: no detach needed
        src = list(self.online_backbone.buffers()) + list(self.online_projector.buffers())
        dst = list(self.teacher_backbone.buffers()) + list(self.teacher_projector.buffers())
        torch._foreach_copy_(dst, src)

    def _encode(self, backbone: ResNetC4, same_size_views, same_size_boxes, output_size):
        """Region features of several views of the same size, run through the trunk together.

        Returns one [B*K,C5] tensor, the views' boxes in order (view-major).
        """
        b = same_size_views[0].shape[0]
        images = torch.cat(same_size_views, dim=0) if len(same_size_views) > 1 else same_size_views[0]
        rois = torch.cat([boxes_to_rois(bx, i * b) for i, bx in enumerate(same_size_boxes)], dim=0)
        return backbone.pool_rois(backbone.c4(images), rois, output_size)

    def student(self, groups):
        """groups: list of (views, boxes, output_size), each group views of one size.
        Returns the predictor outputs [sum B*K, proj_dim] in the groups' order."""
        feats = torch.cat([self._encode(self.online_backbone, v, bx, s) for v, bx, s in groups], dim=0)
        return self.predictor(self.online_projector(feats))

    @torch.no_grad()
    def teacher(self, views, boxes, output_size):
        """Teacher projections [len(views)*B*K, proj_dim] of same-size views (no gradient)."""
        return self.teacher_projector(self._encode(self.teacher_backbone, views, boxes, output_size))

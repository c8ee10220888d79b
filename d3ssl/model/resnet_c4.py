"""ResNet-C4 backbone with RoIAlign region features (paper §4).

The torchvision ResNet (stride on the 3x3 conv) is cut after layer3: stem + layer1..3 form the C4
trunk (stride 16; 1024 channels for ResNet-50, 256 for ResNet-18). Regions are pooled from C4 with
RoIAlign and then run through layer4 (res5) one RoI at a time in a batch, then average-pooled:

    view [N,3,H,W] -> trunk -> C4 [N,C4,H/16,W/16] -> roi_align(boxes) [R,C4,s,s]
                   -> res5 [R,C5,s/2,s/2] -> mean over space -> [R,C5]

For whole-image features (evaluation), ``c5`` runs res5 on the full C4 map (stride 32).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torchvision

from d3ssl import ops

ARCHS = ("resnet50", "resnet18")
C4_STRIDE = 16
C5_STRIDE = 32


def boxes_to_rois(boxes: torch.Tensor, batch_offset: int = 0) -> torch.Tensor:
    """[B,K,4] boxes (x1,y1,x2,y2, pixels) -> [B*K,5] rois (batch index + offset, x1,y1,x2,y2).

    Row b*K+k of the result is box k of image b, so features come back in the boxes' order.
    """
    if boxes.dim() != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be [B,K,4] (x1,y1,x2,y2), got {tuple(boxes.shape)}")
    b, k, _ = boxes.shape
    idx = torch.arange(batch_offset, batch_offset + b, device=boxes.device, dtype=boxes.dtype)
    idx = idx.repeat_interleave(k).unsqueeze(1)
    return torch.cat([idx, boxes.reshape(b * k, 4)], dim=1)


class ResNetC4(nn.Module):
    """ResNet C4 trunk + res5 applied to RoIs.

    Args:
        arch: "resnet50" (C5 = 2048 channels) or "resnet18" (C5 = 512 channels).
    Attributes:
        trunk: stem + layer1..layer3 (stride 16).
        res5: layer4 (stride 2 on its first block).
        c4_channels, out_channels: channels of C4 and of the pooled region feature.
    """

    def __init__(self, arch: str = "resnet50"):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
        net = getattr(torchvision.models, arch)(weights=None)
        self.arch = arch
        self.trunk = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool,
                                   net.layer1, net.layer2, net.layer3)
        self.res5 = net.layer4
        self.c4_channels = net.layer4[0].conv1.in_channels
        self.out_channels = net.fc.in_features

    def c4(self, images: torch.Tensor) -> torch.Tensor:
        """images [N,3,H,W] -> C4 [N,C4,H/16,W/16] (memory format of the input)."""
        return self.trunk(images)

    def c5(self, images: torch.Tensor) -> torch.Tensor:
        """images [N,3,H,W] -> C5 [N,C5,H/32,W/32], the whole network without its classifier."""
        return self.res5(self.trunk(images))

    def pool_rois(self, c4: torch.Tensor, rois: torch.Tensor, output_size: int) -> torch.Tensor:
        """RoIAlign on C4 then res5 and average pool.

        Args:
            c4: [N,C4,h,w] trunk output.
            rois: [R,5] (batch index, x1,y1,x2,y2) in pixels of the image that produced ``c4``.
            output_size: RoIAlign output side (14 for 224-px views, 7 for 112-px views).
        Returns:
            [R,C5] region features.
        """
        # Boxes stay float32 under autocast: bf16 coordinates would be off by up to a pixel.
        rois = rois.to(torch.float64 if c4.dtype == torch.float64 else torch.float32)
        regions = ops.roi_align(c4, rois, output_size, spatial_scale=1.0 / C4_STRIDE,
                                sampling_ratio=-1, aligned=True)
        return self.res5(regions).mean(dim=(2, 3))

    def forward(self, images: torch.Tensor, boxes: torch.Tensor, output_size: int = 14) -> torch.Tensor:
        """Region features of one view.

        Args:
            images: [B,3,H,W] (channels_last preferred).
            boxes: float [B,K,4] x1,y1,x2,y2 in pixels of ``images``.
            output_size: RoIAlign output side on C4.
        Returns:
            [B,K,C5] features, row (b,k) for box k of image b.
        """
        b, k = boxes.shape[:2]
        if images.dim() != 4 or images.shape[0] != b:
            raise ValueError(f"images must be [B,3,H,W] with B={b} (the boxes' batch), "
                             f"got {tuple(images.shape)}")
        feats = self.pool_rois(self.c4(images), boxes_to_rois(boxes), output_size)
        return feats.view(b, k, -1)

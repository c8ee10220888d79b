"""The Batch: the one contract between the loaders (CPU, DALI) and training.

Both backends produce it; the region stage and the model consume only it. Shapes (S = view size):

  view1        [B,3,S,S]      whole image resized to S x S, normalised, channels_last
  view2        [B,3,S,S]      random resized crop of the image, normalised, channels_last
  view2_small  [B,3,S/2,S/2]  view2 resized to half size
  boxes1       float32 [B,K,4] x1,y1,x2,y2 in view-1 pixels
  boxes2       float32 [B,K,4] the same proposals in view-2 pixels (row k is the same proposal)
  box_valid    bool [B,K]     False for padding rows
  image_id     int64 [B]      index into the dataset

Views are float32 on the CPU and bf16/fp16 on the GPU, normalised with ImageNet mean/std so that 0
is the mean colour. Boxes for view2_small are boxes2 / 2.
"""
from dataclasses import dataclass, fields

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Batch:
    view1: torch.Tensor
    view2: torch.Tensor
    view2_small: torch.Tensor
    boxes1: torch.Tensor
    boxes2: torch.Tensor
    box_valid: torch.Tensor
    image_id: torch.Tensor

    @property
    def size(self) -> int:
        return self.view1.shape[0]

    @property
    def device(self) -> torch.device:
        return self.view1.device

    def to(self, device, dtype=None, non_blocking=False) -> "Batch":
        """Moves every tensor to `device`; `dtype` (if given) applies to the three views only.

        From the CPU to a GPU (any other device) the views are moved first and converted there. (Asked for both at
        once, torch converts a CPU tensor on the CPU, in the calling thread, into pageable memory,
        and copies that, a copy that cannot overlap the GPU's work; moved first, pinned views are
        one asynchronous transfer each.) Every other move converts where torch does: a non-blocking
        copy to the CPU must not be read before it has arrived."""
        device = torch.device(device)
        move_first = device.type != "cpu" and self.view1.device.type == "cpu"
        out = {}
        for f in fields(self):
            t = getattr(self, f.name)
            if not f.name.startswith("view"):
                t = t.to(device=device, non_blocking=non_blocking)
            elif move_first:
                t = t.to(device=device, non_blocking=non_blocking).to(
                    dtype=dtype or t.dtype, memory_format=torch.channels_last)
            else:
                t = t.to(device=device, dtype=dtype or t.dtype, non_blocking=non_blocking,
                         memory_format=torch.channels_last)
            out[f.name] = t
        return Batch(**out)

    def pin_memory(self) -> "Batch":
        return Batch(**{f.name: getattr(self, f.name).pin_memory() for f in fields(self)})

    def validate(self) -> "Batch":
        """Checks the contract; raises ValueError naming the field that breaks it."""
        b, c, s, s2 = self.view1.shape if self.view1.dim() == 4 else (None,) * 4
        if self.view1.dim() != 4 or c != 3 or s != s2:
            raise ValueError(f"Batch.view1 must be [B,3,S,S], got {tuple(self.view1.shape)}")
        if tuple(self.view2.shape) != (b, 3, s, s):
            raise ValueError(f"Batch.view2 must be {(b, 3, s, s)}, got {tuple(self.view2.shape)}")
        if tuple(self.view2_small.shape) != (b, 3, s // 2, s // 2):
            raise ValueError(f"Batch.view2_small must be {(b, 3, s // 2, s // 2)}, "
                             f"got {tuple(self.view2_small.shape)}")
        for name in ("view1", "view2", "view2_small"):
            t = getattr(self, name)
            if not t.is_floating_point():
                raise ValueError(f"Batch.{name} must be floating point, got {t.dtype}")
            if not t.is_contiguous(memory_format=torch.channels_last):
                raise ValueError(f"Batch.{name} must be channels_last")
        k = self.boxes1.shape[1] if self.boxes1.dim() == 3 else None
        for name in ("boxes1", "boxes2"):
            t = getattr(self, name)
            if t.dtype != torch.float32 or tuple(t.shape) != (b, k, 4):
                raise ValueError(f"Batch.{name} must be float32 [B,K,4] = {(b, k, 4)}, "
                                 f"got {t.dtype} {tuple(t.shape)}")
        if self.box_valid.dtype != torch.bool or tuple(self.box_valid.shape) != (b, k):
            raise ValueError(f"Batch.box_valid must be bool [B,K] = {(b, k)}, got "
                             f"{self.box_valid.dtype} {tuple(self.box_valid.shape)}")
        if self.image_id.dtype != torch.int64 or tuple(self.image_id.shape) != (b,):
            raise ValueError(f"Batch.image_id must be int64 [B], got {self.image_id.dtype} "
                             f"{tuple(self.image_id.shape)}")
        return self

"""D3SSL (paper §4; the README's *The method*): de-coupling and de-positioning losses against a queue.

Student inputs (region-augmented): x̂1 (S px), x̂2s (S/2 px), x3 (S px, de-positioning composite).
Teacher inputs: x1, x2 (S px). With z_s = predictor(projector(student)), z_t = projector(teacher):
(z_t(x1) below: with cfg.teacher_view1 = "x1_hat" the teacher sees x̂1 there instead, the paper's
eq. 3 as printed; the default "x1" is the reading of the README's *The method*.)

    L_dc = nce(z_s(x̂1), z_t(x2)) + nce(z_s(x̂2s), z_t(x1))          (eq. 4)
    L_dp = nce(z_s(x3), z_t(x2)) + nce(z_s(x3), z_t(x1))            (eq. 9)
    L    = mean over valid boxes of L_dc + L_dp                       (eq. 10)

nce is eq. (5), InfoNCE against a queue of teacher region features from earlier steps (MoCo).
After the loss, the step's valid teacher features of both teacher views (x1 then x2, gathered from
every rank) are enqueued. The queue starts empty (its first step has no negatives, so no gradient).

Padding: the loss and its gradient ignore padded boxes exactly. In train mode the BatchNorm layers of
res5 and of the heads still see the padded RoIs in their batch statistics (the loader pads by
repeating real proposals, and the region stage fills the rows that region.dp_boxes leaves out of x3
with one of x3's boxes, so they are ordinary regions); in eval mode nothing depends on them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import ModelConfig, StudentTeacher, _check_boxes, concat_all_gather
from .losses import RegionInfoNCE


class D3SSL(StudentTeacher):
    """The D3SSL method module.

    Args:
        cfg: ModelConfig (method "d3ssl").
        max_queue: if given, the queue holds at most this many features: what the data holds
            (num_images * K), so that a small dataset's queue is not mostly stale copies.
    Buffers:
        queue [M,proj_dim] float32 unit teacher features; queue_ptr (next slot), queue_filled
        (number of written slots; only those are used as negatives until the queue is full).
    """

    def __init__(self, cfg: ModelConfig, max_queue: int | None = None):
        super().__init__(cfg)
        size = cfg.queue_size if max_queue is None else min(cfg.queue_size, int(max_queue))
        if size <= 0:
            raise ValueError(f"max_queue must be a positive int, got {max_queue}")
        self.nce = RegionInfoNCE(cfg.temperature)
        # Unwritten slots are masked out of the loss, so their initial value never matters.
        self.register_buffer("queue", torch.zeros(size, cfg.proj_dim))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))

    @property
    def queue_valid(self) -> torch.Tensor:
        """bool [M]: slots written so far (all once the queue is full)."""
        return torch.arange(self.queue.shape[0], device=self.queue.device) < self.queue_filled

    @torch.no_grad()
    def enqueue(self, feats: torch.Tensor, valid: torch.Tensor):
        """Writes the valid rows of feats [N,D] (normalised here) from every rank into the queue,
        in rank order, from queue_ptr on with wraparound (when more rows than slots arrive, the
        latest win). Non-finite rows are left out.

        Only tensor ops, no host synchronisation: row i of the kept rows goes to slot
        (ptr + i) mod M; rows left out go to scratch rows past the end, which are dropped.
        """
        feats = concat_all_gather(feats.float().contiguous())
        keep = concat_all_gather(valid.reshape(-1).contiguous()) & torch.isfinite(feats).all(dim=1)
        size, n_rows = self.queue.shape[0], feats.shape[0]
        rank = torch.cumsum(keep, dim=0) - 1            # position among the kept rows
        n = keep.sum()
        keep &= rank >= n - size                          # only the latest `size` fit
        scratch = size + torch.arange(n_rows, device=feats.device)
        slots = torch.where(keep, (self.queue_ptr + rank) % size, scratch)
        extended = torch.cat([self.queue, self.queue.new_zeros(n_rows, self.queue.shape[1])])
        extended.index_copy_(0, slots, F.normalize(torch.nan_to_num(feats), dim=1))
        self.queue.copy_(extended[:size])
        self.queue_ptr.copy_((self.queue_ptr + n) % size)
        self.queue_filled.copy_(torch.clamp(self.queue_filled + n, max=size))

    def forward(self, views) -> dict[str, torch.Tensor]:
        """views: RegionViews (see d3ssl.augment.stage). Returns {"loss", "l_dc", "l_dp"} scalars,
        means over valid boxes; "l_dp" is 0 when use_dp is off or views.x3 is None."""
        s, s2 = self.cfg.roi_size, self.cfg.roi_size // 2
        _check_boxes("boxes_x1_hat", views.boxes_x1_hat, views.x1_hat)
        _check_boxes("boxes_x2s_hat", views.boxes_x2s_hat, views.x2s_hat)
        _check_boxes("boxes_x1", views.boxes_x1, views.x1)
        _check_boxes("boxes_x2", views.boxes_x2, views.x2)
        b, k = views.boxes_x1.shape[:2]
        n = b * k
        valid = views.valid.reshape(-1)
        use_dp = self.cfg.use_dp and views.x3 is not None
        if use_dp:
            _check_boxes("boxes_x3", views.boxes_x3, views.x3)
            full = ([views.x1_hat, views.x3], [views.boxes_x1_hat, views.boxes_x3], s)
        else:
            full = ([views.x1_hat], [views.boxes_x1_hat], s)
        z_s = self.student([full, ([views.x2s_hat], [views.boxes_x2s_hat], s2)])
        teacher1 = views.x1_hat if self.cfg.teacher_view1 == "x1_hat" else views.x1
        z_t = self.teacher([teacher1, views.x2], [views.boxes_x1, views.boxes_x2], s)
        z_s1 = z_s[:n]
        z_s3 = z_s[n:2 * n] if use_dp else None
        z_s2 = z_s[-n:]
        z_t1, z_t2 = z_t[:n], z_t[n:]

        # The loss terms as (student, teacher, boxes) against one queue, in one batched InfoNCE.
        terms = [(z_s1, z_t2, valid), (z_s2, z_t1, valid)]                  # L_dc
        if use_dp:  # over x3's boxes only (a subset of the valid ones with region.dp_boxes > 0)
            valid3 = valid
            if views.valid_x3 is not None:
                if views.valid_x3.shape != views.valid.shape or views.valid_x3.dtype != torch.bool:
                    raise ValueError(f"valid_x3 must be bool {tuple(views.valid.shape)} like valid, got "
                                     f"{views.valid_x3.dtype} {tuple(views.valid_x3.shape)}")
                valid3 = valid & views.valid_x3.reshape(-1)
            terms += [(z_s3, z_t2, valid3), (z_s3, z_t1, valid3)]           # L_dp
        student, teacher, masks = (torch.stack(parts) for parts in zip(*terms))
        means = self.nce(student, teacher, self.queue.clone(), masks, self.queue_valid)
        l_dc = means[0] + means[1]
        l_dp = means[2] + means[3] if use_dp else torch.zeros((), device=l_dc.device)
        if self.training:
            self.enqueue(z_t, valid.repeat(2))
        return {"loss": l_dc + l_dp, "l_dc": l_dc.detach(), "l_dp": l_dp.detach()}

"""One optimiser step: what train/run.py runs and the throughput benchmark times, the same code.

The order is chosen so that a GPU never waits for the host:

    snapshot of the buffers (queue, BN statistics), to undo a skipped step
    for each micro-batch: its views (the first one prepared by the previous step, or now)
                          ─▶ forward ─▶ [last one: loss terms + stop flag ─ all-reduce ─ copy to
                          the host queued (HostCopy)] ─▶ backward
    the next step's first micro-batch: copy to the device and region stage, queued behind the backward
    read the loss terms: waits for the last forward only, while the GPU runs the backward
    finite everywhere: LARS step + teacher EMA, queued behind the backward
    otherwise: no update, the buffers restored, and the result says the step was skipped
    (fp16: the same when GradScaler finds the gradients not finite and skips the LARS step itself)

so the host issues the optimiser's and the next step's work while the GPU computes this step's
backward. In bf16 or float32 nothing in a step reads a GPU value on the host but the loss terms
(checked by a CUDA test under torch's sync debug mode); with fp16 the GradScaler also reads whether
the gradients were finite.
"""
from __future__ import annotations

import contextlib
import math
import sys
import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

# The phases a step's work is labelled with (``TrainStep(phase=...)``; benchmarks/breakdown.py).
PHASES = ("buffer snapshot", "copy to device", "region stage", "forward", "loss terms", "backward",
          "read the loss", "optimiser", "teacher update")


def view_dtype(device, amp_dtype) -> torch.dtype:
    """The Batch contract's view dtype for training on `device`: the autocast dtype on a GPU,
    float32 on the CPU."""
    return amp_dtype if torch.device(device).type == "cuda" and amp_dtype is not None else torch.float32


def loader_options(device, amp_dtype) -> dict:
    """make_loader's options for training on `device`: on a GPU the views arrive in the step's
    dtype (the CPU loader normalises its workers' uint8 pixels there), so the step converts nothing."""
    return {"dtype": view_dtype(device, amp_dtype)} if torch.device(device).type == "cuda" else {}


def step_seed(seed: int, rank: int, step: int, micro: int) -> int:
    """Seed of the region-stage generator for one micro-batch: a pure function of where the run is,
    so a resumed run draws exactly what the uninterrupted one drew."""
    return zlib.crc32(f"{seed}/{rank}/{step}/{micro}".encode()) + (seed << 32)


class HostCopy:
    """A small device tensor's values on the host, copied without waiting for the work queued after
    it: the copy is queued at once (into pinned memory on a GPU) and `get()` waits for that copy
    alone, not for the whole stream."""

    def __init__(self, values: torch.Tensor):
        self._event = None
        if values.device.type == "cuda":
            self._host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self._host.copy_(values, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(values.device))  # the copy's stream
        else:
            self._host = values.detach().clone()

    def get(self) -> list:
        if self._event is not None:
            self._event.synchronize()
        return self._host.tolist()


def check_channels_last(views):
    """Warns if a student/teacher view reaches the model in another layout (a hidden copy)."""
    for name, t in vars(views).items() if hasattr(views, "__dict__") else []:
        if isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[1] == 3 \
                and not t.is_contiguous(memory_format=torch.channels_last):
            print(f"warning: region view {name} is not channels_last; the model will copy it",
                  file=sys.stderr)


@dataclass
class StepResult:
    terms: dict       # loss terms (float), mean over micro-batches and ranks; NaN or inf if not finite
    any_stop: bool    # some rank had been signalled when the terms were all-reduced
    skipped: bool     # the loss was not finite (on some rank): no update, buffers restored
    epoch: int        # epoch of the step's last micro-batch
    # fp16 only: the loss was finite but the scaled gradients were not, so GradScaler skipped the
    # optimiser step and lowered its scale; as after a skip, no EMA and the buffers restored
    overflow: bool = False


def _now(flag) -> bool:
    return bool(flag() if callable(flag) else flag)


class TrainStep:
    """Runs optimiser steps in the order above. All arguments are by keyword:

    Args:
        method: the method (its parameters' owner: buffers, ``update_teacher``).
        forward: what runs the forward: ``method``, its DDP wrapper, or a compiled version of
            either. Under DDP (``world > 1``) ``ddp.no_sync()`` wraps all micro-batches but the last.
        ddp: the DDP wrapper when ``world > 1`` (for ``no_sync``), else None.
        optimizer, scaler: the optimiser (its groups' lr set by the caller) and a GradScaler.
        stage: ``stage(batch, generator) -> RegionViews`` (the region stage).
        generator: the stage's generator on the device, seeded per micro-batch by ``step_seed``.
        device, amp_dtype: where, and the autocast dtype (None: no autocast).
        accum: micro-batches per step; world, rank: DDP's; seed: the run's seed.
        check_layout: warn if the first views reach the model in another layout than channels_last.
        phase: ``phase(name)`` -> a context manager around each phase (names: PHASES); none by
            default. benchmarks/breakdown.py labels them for the profiler.
    """

    def __init__(self, *, method, forward, optimizer, scaler, stage, generator, device, ddp=None,
                 amp_dtype=None, accum: int = 1, world: int = 1, rank: int = 0, seed: int = 0,
                 check_layout: bool = False, phase=None):
        if world > 1 and ddp is None:
            raise ValueError("TrainStep: world > 1 needs the DDP wrapper (ddp=...) for no_sync")
        self.method, self.forward, self.ddp = method, forward, ddp
        self.optimizer, self.scaler, self.stage, self.generator = optimizer, scaler, stage, generator
        self.device, self.amp_dtype = torch.device(device), amp_dtype
        self.view_dtype = view_dtype(self.device, amp_dtype)
        self.accum, self.world, self.rank, self.seed = accum, world, rank, seed
        self.phase = phase or (lambda name: contextlib.nullcontext())
        self._check_layout = check_layout
        self._ahead = None      # (step, epoch, views): the first micro-batch of the step prepared
        self._snapshot = None   # the buffers before the step, to undo a skipped one

    def prepare(self, fetch, at_step: int, micro: int):
        """(epoch, views): `fetch()`'s (epoch, batch) on the device through the region stage, with
        the draws of (step, micro-batch)."""
        epoch, batch = fetch()
        with self.phase("copy to device"):
            batch = batch.to(self.device, dtype=self.view_dtype, non_blocking=True)
        with self.phase("region stage"):
            self.generator.manual_seed(step_seed(self.seed, self.rank, at_step, micro))
            return epoch, self.stage(batch, self.generator)

    def __call__(self, step: int, fetch, momentum: float, *, signalled=False,
                 prepare_next=True) -> StepResult:
        """Runs step number `step`.

        fetch: ``fetch() -> (epoch, batch)``, the loader's next batch (CPU or device).
        momentum: the teacher's EMA momentum for this step.
        signalled: whether this rank was asked to stop, a bool or a callable read after the last
            forward (all-reduced with the loss: every rank learns that one was).
        prepare_next: whether to prepare step + 1's first micro-batch during the backward (a bool or
            a callable read then). That step must be the next call's; a call for another step
            raises rather than train on draws made for another step.
        """
        buffers = list(self.method.buffers())
        with self.phase("buffer snapshot"):  # one batched copy into tensors kept across steps
            if self._snapshot is None or [t.shape for t in self._snapshot] != [b.shape for b in buffers]:
                self._snapshot = [torch.empty_like(b) for b in buffers]
            torch._foreach_copy_(self._snapshot, buffers)

        terms_sum, epoch, names, pending = {}, 0, None, None
        for micro in range(self.accum):
            if micro == 0 and self._ahead is not None:
                (ahead_step, epoch, views), self._ahead = self._ahead, None
                if ahead_step != step:
                    raise ValueError(f"TrainStep: the prepared batch is for step {ahead_step}, but step "
                                     f"{step} was asked for (calls must follow each other)")
            else:
                epoch, views = self.prepare(fetch, step, micro)
            if self._check_layout:
                check_channels_last(views)
                self._check_layout = False
            last = micro == self.accum - 1
            sync = self.ddp.no_sync() if self.world > 1 and not last else contextlib.nullcontext()
            with self.phase("forward"), sync, torch.autocast(self.device.type, dtype=self.amp_dtype,
                                                             enabled=self.amp_dtype is not None):
                out = self.forward(views)
                loss = out["loss"] / self.accum
            for k, v in out.items():
                terms_sum[k] = terms_sum.get(k, 0.0) + v.detach().float() / self.accum
            if last:
                with self.phase("loss terms"):
                    # The loss terms (NaN anywhere -> NaN everywhere) and whether any rank was
                    # signalled, in one all-reduce, so that all ranks skip or stop at the same step.
                    # (torch.full fills on the device; torch.tensor(x, device=...) would be a
                    # blocking copy that waits for the whole stream.)
                    names = sorted(terms_sum)
                    values = torch.stack([terms_sum[k] for k in names] + [
                        torch.full((), float(_now(signalled)), device=self.device)])
                    if self.world > 1:
                        dist.all_reduce(values)
                        values[:-1] /= self.world
                    pending = HostCopy(values)
            with self.phase("backward"):
                self.scaler.scale(loss).backward()  # (DDP's no_sync needs to wrap only the forward)
        if _now(prepare_next):
            # The same batch and draws as preparing it at the top of the next step (data and seeds
            # follow the step), queued behind the backward.
            self._ahead = (step + 1, *self.prepare(fetch, step + 1, 0))
        with self.phase("read the loss"):
            *term_values, stop_flag = pending.get()
        terms = dict(zip(names, term_values))
        result = StepResult(terms=terms, any_stop=stop_flag > 0, epoch=epoch,
                            skipped=not math.isfinite(terms["loss"]))
        if result.skipped:
            # No optimiser step, no EMA, and the queue / BN statistics restored.
            if self.scaler.is_enabled():
                # The scaler's own checks of the gradients, which update() needs: it backs the
                # scale off if they were not finite either, as after a step it skipped itself.
                self.scaler.unscale_(self.optimizer)
                self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                torch._foreach_copy_(buffers, self._snapshot)
            return result
        with self.phase("optimiser"):
            # With fp16 the scaler reads on the host whether the gradients were finite (its step
            # waits for the backward anyway); it lowers the scale exactly when they were not.
            scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
        if scale is not None and self.scaler.get_scale() < scale:
            # The scaler skipped the optimiser step: the student did not change, so neither does
            # the teacher, and the forwards' buffer changes are undone as for a non-finite loss.
            with torch.no_grad():
                torch._foreach_copy_(buffers, self._snapshot)
            result.overflow = True
            return result
        with self.phase("teacher update"):
            self.method.update_teacher(momentum)
        return result

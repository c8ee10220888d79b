"""train/step.py's TrainStep on a toy method: the order of its work, micro-batches, the prepared
batch, the skip, and when the stop flag and prepare_next are read."""
import math

import pytest
import torch
import torch.nn as nn

from train.step import PHASES, TrainStep, step_seed


class Toy(nn.Module):
    """A method's interface: forward(views) -> {"loss", ...}, buffers, update_teacher(momentum).
    Its loss is w . views (plus NaN when told); every forward bumps a buffer."""

    def __init__(self, log):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, 2.0]))
        self.register_buffer("calls", torch.zeros(()))
        self.register_buffer("teacher", torch.zeros(2))
        self.log, self.poison, self.blow_up = log, False, False

    def forward(self, views):
        self.log.append("forward")
        self.calls += 1
        loss = (self.w * views).sum() * (float("nan") if self.poison else 1.0)  # NaN gradients too
        if self.blow_up:  # a finite loss whose gradients are not (fp16's overflow)
            loss = InfGrad.apply(loss)
        return {"loss": loss, "twice": 2 * loss.detach()}

    @torch.no_grad()
    def update_teacher(self, momentum):
        self.log.append("teacher")
        self.teacher.mul_(momentum).add_(self.w, alpha=1 - momentum)


class InfGrad(torch.autograd.Function):
    """Identity forward; its backward sends infinite gradients on."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def make(accum=1, log=None, scaler=None):
    log = [] if log is None else log
    toy = Toy(log)
    opt = torch.optim.SGD(toy.parameters(), lr=0.1)
    stage = lambda batch, g: batch + torch.rand(2, generator=g)  # the draws follow the seed
    scaler = torch.amp.GradScaler("cpu", enabled=False) if scaler is None else scaler
    step = TrainStep(method=toy, forward=toy, optimizer=opt, scaler=scaler,
                     stage=stage, generator=torch.Generator(), device="cpu", accum=accum, seed=7)
    batches = iter(torch.arange(200.0).reshape(100, 2))
    fetched = []

    def fetch():
        fetched.append(1)
        log.append("fetch")
        return len(fetched) // 10, next(batches)
    return step, toy, fetch, log


def test_terms_are_means_over_micro_batches_and_draws_follow_the_step():
    step, toy, fetch, log = make(accum=2)
    result = step(0, fetch, 0.9, prepare_next=False)
    g = torch.Generator()
    views = []
    for micro, batch in enumerate(torch.arange(4.0).reshape(2, 2)):
        g.manual_seed(step_seed(7, 0, 0, micro))
        views.append(batch + torch.rand(2, generator=g))
    want = sum(float((torch.tensor([1.0, 2.0]) * v).sum()) for v in views) / 2
    assert result.terms["loss"] == pytest.approx(want) and result.terms["twice"] == pytest.approx(2 * want)
    assert not result.skipped and not result.any_stop and result.epoch == 0
    assert log == ["fetch", "forward", "fetch", "forward", "teacher"]


def test_next_batch_is_prepared_during_the_step_and_used_by_the_next_call():
    step, toy, fetch, log = make()
    step(0, fetch, 0.9)
    assert log == ["fetch", "forward", "fetch", "teacher"]   # step 1's batch fetched before the update
    log.clear()
    step(1, fetch, 0.9, prepare_next=lambda: False)
    assert log == ["forward", "teacher"]                     # ... and used; none prepared for step 2
    log.clear()
    step(2, fetch, 0.9)
    assert log == ["fetch", "forward", "fetch", "teacher"]
    with pytest.raises(ValueError, match="prepared batch is for step 3, but step 5"):
        step(5, fetch, 0.9)


def test_stop_flag_is_read_after_the_last_forward():
    step, toy, fetch, log = make(accum=3)

    def signalled():
        log.append("signalled?")
        return True
    result = step(0, fetch, 0.9, signalled=signalled, prepare_next=False)
    assert result.any_stop
    assert log.index("signalled?") == len(log) - 2 and log.count("forward") == 3   # before the update
    assert not step(1, fetch, 0.9, signalled=False, prepare_next=False).any_stop


def test_non_finite_loss_skips_the_update_and_restores_the_buffers():
    step, toy, fetch, log = make(accum=2)
    step(0, fetch, 0.5, prepare_next=False)
    w, calls, teacher = toy.w.detach().clone(), toy.calls.clone(), toy.teacher.clone()
    toy.poison = True
    result = step(1, fetch, 0.5, prepare_next=False)
    assert result.skipped and math.isnan(result.terms["loss"])
    assert torch.equal(toy.w.detach(), w) and torch.equal(toy.teacher, teacher)
    assert torch.equal(toy.calls, calls)          # the forwards' buffer changes were undone
    assert toy.w.grad is None and log[-1] == "forward"
    toy.poison = False
    assert not step(2, fetch, 0.5, prepare_next=False).skipped and not torch.equal(toy.w.detach(), w)


def test_a_skip_with_a_grad_scaler_backs_its_scale_off():
    """fp16 training: the GradScaler had made no inf checks on a skipped step (update() asserted);
    the step has it check the gradients, so it backs off as after a step it skipped itself."""
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    step, toy, fetch, log = make(scaler=scaler)
    assert not step(0, fetch, 0.5, prepare_next=False).skipped
    w = toy.w.detach().clone()
    toy.poison = True
    assert step(1, fetch, 0.5, prepare_next=False).skipped
    assert scaler.get_scale() == 512.0 and torch.equal(toy.w.detach(), w)
    toy.poison = False
    assert not step(2, fetch, 0.5, prepare_next=False).skipped and not torch.equal(toy.w.detach(), w)


def test_an_overflow_that_the_grad_scaler_skips_updates_nothing():
    """fp16 training: a finite loss with infinite gradients. GradScaler skips the optimiser step
    and halves its scale; the step then leaves the teacher and the buffers as they were, too, and
    says so."""
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    step, toy, fetch, log = make(accum=2, scaler=scaler)
    assert not step(0, fetch, 0.5, prepare_next=False).overflow
    w, calls, teacher = toy.w.detach().clone(), toy.calls.clone(), toy.teacher.clone()
    toy.blow_up = True
    result = step(1, fetch, 0.5, prepare_next=False)
    assert result.overflow and not result.skipped and math.isfinite(result.terms["loss"])
    assert scaler.get_scale() == 512.0
    assert torch.equal(toy.w.detach(), w) and torch.equal(toy.teacher, teacher)
    assert torch.equal(toy.calls, calls) and toy.w.grad is None and "teacher" not in log[-3:]
    toy.blow_up = False
    result = step(2, fetch, 0.5, prepare_next=False)
    assert not result.overflow and not result.skipped and log[-1] == "teacher"
    assert not torch.equal(toy.w.detach(), w) and not torch.equal(toy.teacher, teacher)
    assert scaler.get_scale() == 512.0 and torch.equal(toy.calls, calls + 2)


def test_every_phase_is_labelled():
    seen = []

    class Label:
        def __init__(self, name):
            seen.append(name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False
    step, toy, fetch, log = make()
    step.phase = Label
    step(0, fetch, 0.9)
    assert set(seen) == set(PHASES)


def test_ddp_needs_its_wrapper():
    toy = Toy([])
    with pytest.raises(ValueError, match="DDP wrapper"):
        TrainStep(method=toy, forward=toy, optimizer=None, scaler=None, stage=None, generator=None,
                  device="cpu", world=2)

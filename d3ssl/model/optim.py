"""LARS and the per-step schedules (the README's *The method*). Schedules are pure functions of the step."""
from __future__ import annotations

import math

import torch
import torch.nn as nn


def momentum_schedule(step: int, total_steps: int, base: float = 0.99) -> float:
    """Teacher EMA momentum at `step` of `total_steps`: 1 - (1 - base) (cos(pi k / K) + 1) / 2,
    from `base` at step 0 to 1 at the last step (BYOL)."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be a positive int, got {total_steps}")
    k = min(max(step, 0), total_steps)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * k / total_steps) + 1.0) / 2.0


def lr_schedule(step: int, total_steps: int, warmup_steps: int, base_lr: float, final_lr: float = 1e-6,
                warmup_start_factor: float = 0.01) -> float:
    """Learning rate at `step`: linear warm-up from base_lr * warmup_start_factor (step 0) to base_lr
    (step warmup_steps), then cosine decay to final_lr at step total_steps (held after it).

    The paper: base_lr = 1.0 * batch / 256, 10 warm-up epochs from base_lr / 100, cosine to 1e-6.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be a positive int, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
    if step < warmup_steps:
        start = base_lr * warmup_start_factor
        return start + (base_lr - start) * step / warmup_steps
    t = min(step - warmup_steps, total_steps - warmup_steps) / max(total_steps - warmup_steps, 1)
    return final_lr + (base_lr - final_lr) * (math.cos(math.pi * t) + 1.0) / 2.0


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017; BYOL's form).

    For a parameter p with gradient g, in groups with ``lars_adapt`` True (the default for
    parameters with ndim > 1):

        d = g + weight_decay * p;   d *= trust_coefficient * |p| / |d|   (1 if either norm is 0)

    and in groups with ``lars_adapt`` False (biases, BatchNorm: see param_groups_for_lars) d = g,
    no weight decay and no scaling. Then  buf = momentum * buf + d;  p -= lr * buf.

    Args:
        params: parameters or param groups (a group may set lr, weight_decay, momentum,
            trust_coefficient, lars_adapt).
        lr: learning rate (set per step from lr_schedule by the trainer).
        weight_decay: 1e-5 in the paper.
        momentum: 0.9.
        trust_coefficient: 0.001.
        foreach: update all parameters of a group with a few multi-tensor operations instead of a
            dozen small operations per parameter (a group may set its own). The same arithmetic
            either way: bit for bit on a CPU; on a GPU the norms may differ in the last bits (their
            multi-tensor reduction sums in another order). For ResNet-50-C4 and its heads the update
            is 22 operations instead of 1,142; on a GPU a multi-tensor operation is one or a few
            kernels, but the trust ratios' multiply is one small kernel per adapted parameter (57),
            so about a hundred kernels instead of ~1,150. It holds the adapted gradients' updates
            all at once (one extra copy of those parameters' size). On a CPU the loop is faster
            (each tensor stays in cache through its dozen operations: 75 against 85 ms for
            ResNet-50-C4 on 2 cores). None (the default): multi-tensor for groups whose parameters
            are all on a GPU, the loop otherwise.
    """

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 1e-5, momentum: float = 0.9,
                 trust_coefficient: float = 0.001, foreach: bool | None = None):
        if lr < 0:
            raise ValueError(f"LARS lr must be >= 0, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"LARS weight_decay must be >= 0, got {weight_decay}")
        if not 0 <= momentum < 1:
            raise ValueError(f"LARS momentum must be in [0, 1), got {momentum}")
        if trust_coefficient <= 0:
            raise ValueError(f"LARS trust_coefficient must be > 0, got {trust_coefficient}")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                        trust_coefficient=trust_coefficient, lars_adapt=None, foreach=foreach)
        super().__init__(params, defaults)

    def __setstate__(self, state):
        super().__setstate__(state)
        for g in self.param_groups:  # (state saved before the option existed)
            g.setdefault("foreach", None)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    raise RuntimeError("LARS does not support sparse gradients")
            foreach = g["foreach"]
            if foreach is None:
                foreach = all(p.device.type == "cuda" for p in g["params"])
            if foreach:
                self._group_foreach(g)
            else:
                self._group_loop(g)
        return loss

    def _adapt(self, g, p) -> bool:
        return g["lars_adapt"] if g["lars_adapt"] is not None else p.ndim > 1

    def _buffer(self, p):
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        return state["momentum_buffer"]

    def _group_loop(self, g):
        """The update one parameter at a time: the reference the multi-tensor path must equal."""
        for p in g["params"]:
            if p.grad is None:
                continue
            d = p.grad
            if self._adapt(g, p):
                d = d.add(p, alpha=g["weight_decay"])
                p_norm = torch.linalg.vector_norm(p)
                d_norm = torch.linalg.vector_norm(d)
                one = torch.ones_like(p_norm)
                q = torch.where(p_norm > 0,
                                torch.where(d_norm > 0, g["trust_coefficient"] * p_norm / d_norm, one),
                                one)
                d = d.mul(q)
            buf = self._buffer(p)
            buf.mul_(g["momentum"]).add_(d)
            p.add_(buf, alpha=-g["lr"])

    def _group_foreach(self, g):
        """The same update with multi-tensor operations, over the group's parameters split by
        device, dtype and whether they adapt."""
        lists: dict[tuple, list] = {}
        for p in g["params"]:
            if p.grad is not None:
                lists.setdefault((p.device, p.dtype, self._adapt(g, p)), []).append(p)
        for (_, _, adapt), params in lists.items():
            grads = [p.grad for p in params]
            bufs = [self._buffer(p) for p in params]
            if adapt:
                d = torch._foreach_add(grads, params, alpha=g["weight_decay"])
                p_norm = torch.stack(torch._foreach_norm(params))
                d_norm = torch.stack(torch._foreach_norm(d))
                one = torch.ones_like(p_norm)
                q = torch.where(p_norm > 0,
                                torch.where(d_norm > 0, g["trust_coefficient"] * p_norm / d_norm, one),
                                one)
                # One small multiply per parameter: no multi-tensor kernel scales each tensor by
                # its own device-side scalar.
                torch._foreach_mul_(d, list(q.unbind(0)))
            else:
                d = grads
            torch._foreach_mul_(bufs, g["momentum"])
            torch._foreach_add_(bufs, d)
            torch._foreach_add_(params, bufs, alpha=-g["lr"])


def param_groups_for_lars(model: nn.Module, weight_decay: float = 1e-5) -> list[dict]:
    """Two param groups of the trainable parameters (requires_grad) of `model`:
    ndim > 1 (conv and linear weights) with weight decay and LARS adaptation, and ndim <= 1
    (biases, BatchNorm) with neither (lars_adapt False, weight_decay 0)."""
    adapt, plain = [], []
    for p in model.parameters():
        if p.requires_grad:
            (adapt if p.ndim > 1 else plain).append(p)
    return [{"params": adapt, "weight_decay": weight_decay, "lars_adapt": True},
            {"params": plain, "weight_decay": 0.0, "lars_adapt": False}]

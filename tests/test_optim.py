"""LARS against a hand computation; the lr and momentum schedules at their defining points."""
import copy
import math

import pytest
import torch

from d3ssl.model import LARS, lr_schedule, momentum_schedule, param_groups_for_lars


def test_momentum_schedule_values():
    assert momentum_schedule(0, 100) == pytest.approx(0.99)
    assert momentum_schedule(100, 100) == pytest.approx(1.0)
    assert momentum_schedule(50, 100) == pytest.approx(0.995)
    k, K, base = 25, 100, 0.996
    want = 1 - (1 - base) * (math.cos(math.pi * k / K) + 1) / 2
    assert momentum_schedule(k, K, base) == pytest.approx(want)
    vals = [momentum_schedule(i, 10) for i in range(11)]
    assert all(a < b for a, b in zip(vals, vals[1:]))
    with pytest.raises(ValueError, match="total_steps"):
        momentum_schedule(0, 0)


def test_lr_schedule_warmup_and_cosine():
    base, total, warm = 2.0, 100, 10
    assert lr_schedule(0, total, warm, base) == pytest.approx(base / 100)
    assert lr_schedule(5, total, warm, base) == pytest.approx(base / 100 + (base - base / 100) / 2)
    assert lr_schedule(warm, total, warm, base) == pytest.approx(base)
    assert lr_schedule(total, total, warm, base) == pytest.approx(1e-6)
    assert lr_schedule(total + 5, total, warm, base) == pytest.approx(1e-6)
    mid = warm + (total - warm) // 2
    assert lr_schedule(mid, total, warm, base) == pytest.approx((base + 1e-6) / 2)
    assert lr_schedule(0, total, 0, base) == pytest.approx(base)   # no warm-up
    with pytest.raises(ValueError, match="warmup_steps"):
        lr_schedule(0, 10, 20, base)


def test_lars_matches_hand_computation():
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))    # |w| = 5
    b = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
    lr, wd, mom, eta = 0.5, 0.1, 0.9, 0.001
    opt = LARS([{"params": [w], "lars_adapt": True, "weight_decay": wd},
                {"params": [b], "lars_adapt": False, "weight_decay": 0.0}],
               lr=lr, momentum=mom, trust_coefficient=eta)
    gw, gb = torch.tensor([[0.3, 0.0]]), torch.tensor([0.2, 0.4])
    # step 1 by hand: d = g + wd w = [0.6, 0.4]; |d| = sqrt(0.52); q = eta * 5 / |d|
    d1 = [0.3 + 0.1 * 3, 0.0 + 0.1 * 4]
    q1 = eta * 5 / math.sqrt(d1[0] ** 2 + d1[1] ** 2)
    buf1 = [q1 * d1[0], q1 * d1[1]]
    w1 = [3 - lr * buf1[0], 4 - lr * buf1[1]]
    w.grad, b.grad = gw.clone(), gb.clone()
    opt.step()
    assert w.detach().tolist()[0] == pytest.approx(w1, rel=1e-6)
    assert b.detach().tolist() == pytest.approx([1 - lr * 0.2, -1 - lr * 0.4], rel=1e-6)
    # step 2: momentum buffer carries over
    d2 = [0.3 + 0.1 * w1[0], 0.1 * w1[1]]
    q2 = eta * math.hypot(*w1) / math.hypot(*d2)
    buf2 = [mom * buf1[0] + q2 * d2[0], mom * buf1[1] + q2 * d2[1]]
    w.grad, b.grad = gw.clone(), gb.clone()
    opt.step()
    assert w.detach().tolist()[0] == pytest.approx([w1[0] - lr * buf2[0], w1[1] - lr * buf2[1]], rel=1e-6)
    bb = [1 - lr * 0.2 - lr * (mom * 0.2 + 0.2), -1 - lr * 0.4 - lr * (mom * 0.4 + 0.4)]
    assert b.detach().tolist() == pytest.approx(bb, rel=1e-6)


def test_lars_zero_norms_fall_back_to_plain_sgd():
    w = torch.nn.Parameter(torch.zeros(2, 2))
    w.grad = torch.ones(2, 2)
    LARS([w], lr=1.0, weight_decay=0.0, momentum=0.0).step()
    assert torch.equal(w.detach(), -torch.ones(2, 2))


def test_param_groups_for_lars():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                              torch.nn.Linear(4, 2))
    net[3].bias.requires_grad_(False)
    adapt, plain = param_groups_for_lars(net, weight_decay=1e-5)
    assert [p.shape for p in adapt["params"]] == [net[0].weight.shape, net[3].weight.shape]
    assert adapt["lars_adapt"] and adapt["weight_decay"] == 1e-5
    assert len(plain["params"]) == 3 and not plain["lars_adapt"] and plain["weight_decay"] == 0
    assert all(p.ndim <= 1 for p in plain["params"])
    opt = LARS(param_groups_for_lars(net))
    assert opt.param_groups[0]["momentum"] == 0.9 and opt.param_groups[0]["trust_coefficient"] == 0.001


def test_lars_rejects_bad_arguments():
    with pytest.raises(ValueError, match="momentum"):
        LARS([torch.nn.Parameter(torch.ones(1))], momentum=1.5)


def _lars_problem(device="cpu", seed=0):
    """Parameters of several shapes and dtypes in three groups (adapt, plain, and one that decides per
    parameter), with the corner cases: a zero tensor (|p| = 0), a zero gradient with no weight decay
    (|d| = 0), a parameter without a gradient."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(8, 3, 3, 3), (16, 8), (5,), (4, 4), (7,), (2, 3, 1, 1), (6,)]
    ps = [torch.nn.Parameter(torch.randn(s, generator=g).to(device)) for s in shapes]
    ps.append(torch.nn.Parameter(torch.zeros(3, 3, device=device)))                       # |p| = 0
    ps.append(torch.nn.Parameter(torch.randn(4, 2, generator=g).double().to(device)))     # float64
    ps.append(torch.nn.Parameter(torch.randn(3, 3, generator=g).to(device)))              # no grad
    ps.append(torch.nn.Parameter(torch.randn(2, 5, generator=g).to(device)))              # |d| = 0
    groups = [{"params": [ps[0], ps[1], ps[7], ps[8], ps[9]], "lars_adapt": True, "weight_decay": 0.01},
              {"params": [ps[2], ps[4]], "lars_adapt": False, "weight_decay": 0.0},
              {"params": [ps[3], ps[5], ps[6]]},                     # adapt decided by ndim
              {"params": [ps[10]], "lars_adapt": True, "weight_decay": 0.0}]

    def grads(step):
        gg = torch.Generator().manual_seed(1000 * seed + step)
        for i, p in enumerate(ps):
            if i == 9:
                continue
            p.grad = (torch.zeros_like(p) if i == 10 else
                      torch.randn(p.shape, generator=gg, dtype=p.dtype).to(device))
    return ps, groups, grads


@pytest.mark.parametrize("momentum", [0.9, 0.0])
def test_lars_foreach_equals_the_per_parameter_loop(momentum):
    """The multi-tensor update against the one-parameter-at-a-time reference, bit for bit on the CPU
    over several steps (the momentum buffers carry over)."""
    runs = []
    for foreach in (True, False):
        ps, groups, grads = _lars_problem()
        opt = LARS(groups, lr=0.3, momentum=momentum, trust_coefficient=0.02, foreach=foreach)
        before = [p.detach().clone() for p in ps]
        for step in range(4):
            grads(step)
            opt.step()
        runs.append(([p.detach().clone() for p in ps], before))
    (a, a0), (b, _) = runs
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.dtype == y.dtype and torch.equal(x, y), f"parameter {i} differs"
    assert torch.equal(a[9], a0[9])                        # no gradient: untouched
    assert not torch.equal(a[0], a0[0]) and not torch.equal(a[2], a0[2])   # the others moved


def test_lars_foreach_state_resumes_in_the_loop():
    """The two paths keep the same state: a checkpoint of one continues in the other."""
    ps, groups, grads = _lars_problem(seed=1)
    opt = LARS(groups, lr=0.1, foreach=True)
    grads(0)
    opt.step()
    state = opt.state_dict()
    snapshot = [p.detach().clone() for p in ps]
    results = []
    for foreach in (False, True):
        with torch.no_grad():
            for p, s in zip(ps, snapshot):
                p.copy_(s)
        resumed = LARS(groups, lr=0.1)
        resumed.load_state_dict(copy.deepcopy(state))   # loading shares the buffers' storage
        for g in resumed.param_groups:                   # (the saved groups say foreach=True)
            g["foreach"] = foreach
        grads(1)
        resumed.step()
        results.append([p.detach().clone() for p in ps])
    assert all(torch.equal(x, y) for x, y in zip(*results))


def test_lars_rejects_sparse_gradients():
    w = torch.nn.Parameter(torch.ones(3, 2))
    w.grad = torch.ones(3, 2).to_sparse()
    for foreach in (True, False):
        with pytest.raises(RuntimeError, match="sparse"):
            LARS([w], lr=0.1, foreach=foreach).step()


def _spy_paths(monkeypatch):
    used = []
    for name in ("_group_foreach", "_group_loop"):
        original = getattr(LARS, name)
        monkeypatch.setattr(LARS, name, lambda self, g, _f=original, _n=name: (used.append(_n), _f(self, g)))
    return used


def test_lars_default_path_is_the_loop_on_cpu(monkeypatch):
    used = _spy_paths(monkeypatch)
    ps, groups, grads = _lars_problem()
    grads(0)
    LARS(groups, lr=0.1).step()
    assert used == ["_group_loop"] * len(groups)
    ps, groups, grads = _lars_problem()   # (an optimiser writes its defaults into the group dicts)
    grads(0)
    LARS(groups, lr=0.1, foreach=True).step()
    assert used[len(groups):] == ["_group_foreach"] * len(groups)


@pytest.mark.cuda
def test_lars_foreach_on_cuda_matches_the_cpu_loop(monkeypatch):
    """On a GPU the default is the multi-tensor path; its norms sum in another order: equal to the
    CPU reference up to rounding."""
    used = _spy_paths(monkeypatch)
    out = {}
    for device, foreach in (("cpu", False), ("cuda", None)):
        ps, groups, grads = _lars_problem(device)
        opt = LARS(groups, lr=0.3, trust_coefficient=0.02, foreach=foreach)
        for step in range(3):
            grads(step)
            opt.step()
        out[device] = [p.detach().cpu() for p in ps]
    for x, y in zip(out["cpu"], out["cuda"]):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6)
    assert "_group_foreach" in used


def test_lars_copies_and_older_state_keep_working():
    """foreach lives in the param groups (as in torch's optimisers): a deep copy keeps it, and a
    state saved without it loads with the default."""
    ps, groups, grads = _lars_problem(seed=2)
    opt = LARS(groups, lr=0.1, foreach=True)
    grads(0)
    copy.deepcopy(opt).step()
    assert all(g["foreach"] is True for g in copy.deepcopy(opt).param_groups)
    state = opt.state_dict()
    for g in state["param_groups"]:
        del g["foreach"]
    fresh = LARS(groups, lr=0.1, foreach=True)
    fresh.load_state_dict(state)
    assert all(g["foreach"] is None for g in fresh.param_groups)
    fresh.step()

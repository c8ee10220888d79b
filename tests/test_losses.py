"""Losses against a direct float64 implementation of the paper's equations (4), (5), (9), (10)."""
import math

import numpy as np
import pytest
import torch

from d3ssl.model.losses import ByolRegression, RegionInfoNCE


def ref_nce(z, z_pos, negatives, tau):
    """Eq. (5), one box, float64: -log exp(z.z+/tau) / sum over Q u {z+} of exp(z.z_j/tau)."""
    z = z / np.linalg.norm(z)
    z_pos = z_pos / np.linalg.norm(z_pos)
    num = math.exp(float(z @ z_pos) / tau)
    den = num + sum(math.exp(float(z @ q) / tau) for q in negatives)
    return -math.log(num / den)


def ref_d3ssl(zs1, zs2, zs3, zt1, zt2, negatives, valid, tau):
    """Eqs. (4), (9), (10): mean over valid boxes of L_dc + L_dp, each box on its own."""
    l_dc, l_dp = [], []
    for i in np.flatnonzero(valid):
        l_dc.append(ref_nce(zs1[i], zt2[i], negatives, tau) + ref_nce(zs2[i], zt1[i], negatives, tau))
        l_dp.append(ref_nce(zs3[i], zt2[i], negatives, tau) + ref_nce(zs3[i], zt1[i], negatives, tau))
    return float(np.mean(l_dc)), float(np.mean(l_dp))


def _unit(n, d, g):
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    return x / x.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("tau", [0.2, 0.5])
def test_info_nce_matches_eq5(tau):
    g = torch.Generator().manual_seed(1)
    n, d, m = 7, 16, 11
    # z is not unit length: the module normalises it
    z, zp = torch.randn(n, d, generator=g) * 3, torch.randn(n, d, generator=g)
    queue = _unit(m, d, g).float()
    valid = torch.tensor([1, 1, 0, 1, 0, 1, 1], dtype=torch.bool)
    got = RegionInfoNCE(tau)(z, zp, queue, valid)
    want = np.mean([ref_nce(z[i].double().numpy(), zp[i].double().numpy(), queue.double().numpy(), tau)
                    for i in range(n) if valid[i]])
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-6)



def test_info_nce_terms_at_once_match_eq5_each_over_its_own_boxes():
    """[T,N,D] inputs: T terms against one queue, each term's mean over its own valid boxes (one
    with none valid gives 0), and the gradients of each term's inputs those of the term alone."""
    g = torch.Generator().manual_seed(4)
    t, n, d, m = 3, 6, 8, 9
    z = (torch.randn(t, n, d, generator=g) * 2).requires_grad_()
    zp = torch.randn(t, n, d, generator=g)
    queue = _unit(m, d, g).float()
    queue_valid = torch.arange(m) < 7
    valid = torch.rand(t, n, generator=g) < 0.6
    valid[0, :2] = True
    valid[2] = False
    nce = RegionInfoNCE(0.3)
    got = nce(z, zp, queue, valid, queue_valid)
    assert got.shape == (t,)
    negatives = queue[:7].double().numpy()
    for k in range(t):
        want = [ref_nce(z[k, i].detach().double().numpy(), zp[k, i].double().numpy(), negatives, 0.3)
                for i in range(n) if valid[k, i]]
        assert got[k].item() == pytest.approx(np.mean(want) if want else 0.0, rel=1e-5, abs=1e-6)
    got.sum().backward()
    for k in range(t):
        zk = z[k].detach().clone().requires_grad_()
        nce(zk, zp[k], queue, valid[k], queue_valid).backward()
        torch.testing.assert_close(z.grad[k], zk.grad, rtol=1e-5, atol=1e-7)
    assert torch.all(z.grad[2] == 0)


def test_d3ssl_loss_matches_eqs_4_9_10():
    g = torch.Generator().manual_seed(2)
    n, d, m, tau = 8, 32, 20, 0.2
    zs1, zs2, zs3, zt1, zt2 = (torch.randn(n, d, generator=g) for _ in range(5))
    queue = _unit(m, d, g).float()
    valid = torch.rand(n, generator=g) > 0.3
    valid[0] = True
    nce = RegionInfoNCE(tau)
    l_dc = nce(zs1, zt2, queue, valid) + nce(zs2, zt1, queue, valid)
    l_dp = nce(zs3, zt2, queue, valid) + nce(zs3, zt1, queue, valid)
    np_ = [t.double().numpy() for t in (zs1, zs2, zs3, zt1, zt2)]
    want_dc, want_dp = ref_d3ssl(*np_, queue.double().numpy(), valid.numpy(), tau)
    assert l_dc.item() == pytest.approx(want_dc, rel=1e-5)
    assert l_dp.item() == pytest.approx(want_dp, rel=1e-5)


def test_info_nce_gradient_matches_float64_autograd():
    g = torch.Generator().manual_seed(3)
    n, d, m, tau = 5, 8, 6, 0.2
    z = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    zp = torch.randn(n, d, generator=g, dtype=torch.float64)
    queue = _unit(m, d, g)
    valid = torch.tensor([1, 0, 1, 1, 0], dtype=torch.bool)
    # direct eq. (5) in torch float64, valid boxes only
    zn, zpn = z / z.norm(dim=1, keepdim=True), zp / zp.norm(dim=1, keepdim=True)
    num = torch.exp((zn * zpn).sum(1) / tau)
    den = num + torch.exp(zn @ queue.t() / tau).sum(1)
    ref = -torch.log(num / den)[valid].mean()
    (g_ref,) = torch.autograd.grad(ref, z)
    z2 = z.detach().float().requires_grad_()
    RegionInfoNCE(tau)(z2, zp.float(), queue.float(), valid).backward()
    torch.testing.assert_close(z2.grad.double(), g_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("garbage", [1e30, float("nan"), float("inf")])
def test_padded_boxes_contribute_nothing(garbage):
    g = torch.Generator().manual_seed(4)
    n, d, m = 6, 8, 5
    z, zp = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    queue = _unit(m, d, g).float()
    valid = torch.tensor([1, 0, 1, 0, 1, 1], dtype=torch.bool)
    nce = RegionInfoNCE(0.2)
    clean = nce(z, zp, queue, valid)
    z_bad, zp_bad = z.clone(), zp.clone()
    z_bad[~valid] = garbage
    zp_bad[~valid] = -garbage
    z_bad.requires_grad_()
    zp_bad.requires_grad_()
    loss = nce(z_bad, zp_bad, queue, valid)
    loss.backward()
    assert loss.item() == clean.item()
    for grad in (z_bad.grad, zp_bad.grad):
        assert torch.isfinite(grad).all()
        assert (grad[~valid] == 0).all()
    assert (z_bad.grad[valid].abs().sum(1) > 0).all()
    # and the BYOL loss too
    byol = ByolRegression()
    z_bad.grad = None
    lb = byol(z_bad, zp_bad, valid)
    lb.backward()
    assert lb.item() == pytest.approx(byol(z, zp, valid).item(), abs=1e-7)
    assert (z_bad.grad[~valid] == 0).all() and torch.isfinite(z_bad.grad).all()


def test_no_valid_box_gives_zero_loss():
    z = torch.randn(3, 4, requires_grad=True)
    loss = RegionInfoNCE(0.2)(z, torch.randn(3, 4), torch.randn(2, 4), torch.zeros(3, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0 and (z.grad == 0).all()


def test_unfilled_queue_slots_are_ignored():
    g = torch.Generator().manual_seed(5)
    z, zp = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    queue = _unit(10, 8, g).float()
    valid = torch.ones(4, dtype=torch.bool)
    filled = torch.arange(10) < 6
    nce = RegionInfoNCE(0.2)
    masked = nce(z, zp, queue, valid, filled)
    assert masked.item() == pytest.approx(nce(z, zp, queue[:6], valid).item(), rel=1e-6)
    empty = nce(z, zp, queue, valid, torch.zeros(10, dtype=torch.bool))
    assert empty.item() == pytest.approx(0.0, abs=1e-7)   # only the positive: -log 1


def test_byol_regression_matches_2_minus_2cos():
    g = torch.Generator().manual_seed(6)
    p, z = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    valid = torch.tensor([1, 1, 0, 1, 0], dtype=torch.bool)
    pn, zn = p.double().numpy(), z.double().numpy()
    want = np.mean([2 - 2 * pn[i] @ zn[i] / np.linalg.norm(pn[i]) / np.linalg.norm(zn[i])
                    for i in range(5) if valid[i]])
    assert ByolRegression()(p, z, valid).item() == pytest.approx(want, rel=1e-5)


def test_bad_temperature_is_rejected():
    with pytest.raises(ValueError, match="temperature"):
        RegionInfoNCE(0.0)

"Losses and penalties: formulas against explicit torch, hand-computed penalties, the finite-difference limit, gradient flow."
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from gat_tutorial.losses import (FD_SIGMA, R1_GAMMA, R2_GAMMA, _d_step, bench_penalties, drift_penalty, exact_penalty,
                                 finite_difference_penalty, gradient_penalty, hinge_d_loss, hinge_g_loss, ns_d_loss,
                                 ns_g_loss, rpgan_d_loss, rpgan_g_loss, wgan_d_loss, wgan_g_loss)


def gen(seed=0): return torch.Generator().manual_seed(seed)


def smooth_d(in_dim=4, seed=0):
    "A small tanh MLP in float64: smooth, so finite differences converge cleanly."
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(in_dim, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1)).double()


def weight_grad(d, loss):
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss.mean(), list(d.parameters()), materialize_grads=True)])


# ---------------------------------------------------------------- adversarial losses
def test_rpgan_and_ns_match_explicit_torch():
    r, f = torch.randn(16, generator=gen(1)), torch.randn(16, generator=gen(2))
    torch.testing.assert_close(rpgan_d_loss(r, f), -torch.log(torch.sigmoid(r - f)))
    torch.testing.assert_close(rpgan_g_loss(f, r), -torch.log(torch.sigmoid(f - r)))
    torch.testing.assert_close(ns_d_loss(r, f), -torch.log(torch.sigmoid(r)) - torch.log(1 - torch.sigmoid(f)))
    torch.testing.assert_close(ns_g_loss(f), -torch.log(torch.sigmoid(f)))
    torch.testing.assert_close(hinge_d_loss(r, f), torch.clamp(1 - r, min=0) + torch.clamp(1 + f, min=0))
    torch.testing.assert_close(wgan_d_loss(r, f), f - r)
    for g_loss in (hinge_g_loss, wgan_g_loss): torch.testing.assert_close(g_loss(f, r), -f)


def test_losses_are_per_sample_and_accept_b1_logits():
    r, f = torch.randn(8, 1), torch.randn(8, 1)
    for loss in (rpgan_d_loss, ns_d_loss, hinge_d_loss, wgan_d_loss, rpgan_g_loss):
        assert loss(r, f).shape == (8,)
        torch.testing.assert_close(loss(r, f), loss(r[:, 0], f[:, 0]))


def test_rpgan_is_stable_for_confident_wrong_d():
    assert rpgan_d_loss(torch.tensor([-100.]), torch.tensor([100.])).item() == pytest.approx(200.)
    assert torch.isfinite(rpgan_g_loss(torch.tensor([-200.]), torch.tensor([200.]))).all()


@pytest.mark.parametrize("loss", [rpgan_d_loss, rpgan_g_loss, ns_d_loss, hinge_d_loss, wgan_d_loss])
def test_paired_losses_reject_bad_shapes(loss):
    with pytest.raises(ValueError, match="equal batches"): loss(torch.randn(8), torch.randn(7))
    with pytest.raises(ValueError, match=r"\(B,\) or \(B, 1\)"): loss(torch.randn(8, 2), torch.randn(8, 2))


def test_rpgan_depends_on_the_pairing():
    r, f = torch.randn(8, generator=gen(3)), torch.randn(8, generator=gen(4))
    shift = torch.roll(torch.arange(8), 1)
    torch.testing.assert_close(ns_d_loss(r, f[shift]).mean(), ns_d_loss(r, f).mean())
    assert abs(rpgan_d_loss(r, f[shift]).mean() - rpgan_d_loss(r, f).mean()) > 1e-2


# ---------------------------------------------------------------- WGAN-GP and drift
def test_gradient_penalty_of_a_linear_critic_is_hand_computed():
    w = torch.randn(6, generator=gen(5), requires_grad=True)
    real, fake = torch.randn(10, 6), torch.randn(10, 6)
    gp = gradient_penalty(lambda x: x @ w - 3., real, fake)
    torch.testing.assert_close(gp, ((w.norm() - 1) ** 2).expand(10))
    grad_w, = torch.autograd.grad(gp.mean(), w)                     # create_graph: the penalty trains the critic
    torch.testing.assert_close(grad_w, 2 * (w.norm() - 1) * w / w.norm())


def test_gradient_penalty_interpolates_with_the_given_generator():
    real, fake = torch.randn(10, 3, 2, 2), torch.randn(10, 3, 2, 2)
    alpha = torch.rand(10, 1, 1, 1, generator=gen(6))
    x_hat = alpha * real + (1 - alpha) * fake
    gp = gradient_penalty(lambda x: 0.5 * x.pow(2).sum((1, 2, 3)), real, fake, generator=gen(6))   # grad D(x^) = x^
    torch.testing.assert_close(gp, (x_hat.flatten(1).norm(dim=1) - 1) ** 2)


def test_gradient_penalty_is_finite_for_a_flat_critic():
    w = torch.zeros(3, requires_grad=True)
    gp = gradient_penalty(lambda x: x @ w, torch.randn(4, 3), torch.randn(4, 3))
    grad_w, = torch.autograd.grad(gp.mean(), w)
    assert torch.isfinite(grad_w).all()


def test_drift_penalty():
    torch.testing.assert_close(drift_penalty(torch.tensor([[3.], [-2.]])), torch.tensor([9e-3, 4e-3]))


# ---------------------------------------------------------------- exact R1 / R2
def test_exact_penalty_matches_torch_func_and_the_analytic_gradient():
    d, x = smooth_d(), torch.randn(12, 4, dtype=torch.float64, generator=gen(7))
    ref = torch.func.vmap(torch.func.grad(lambda xi: d(xi[None]).sum()))(x).pow(2).sum(1)
    torch.testing.assert_close(exact_penalty(d, x), ref)
    W, v = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    analytic = ((1 - torch.tanh(x @ W.T) ** 2) * v) @ W                         # grad of v . tanh(W x)
    torch.testing.assert_close(exact_penalty(lambda x: torch.tanh(x @ W.T) @ v, x), analytic.pow(2).sum(1))


def test_exact_penalty_sums_over_mng_levels():
    d, x = smooth_d(), torch.randn(6, 4, dtype=torch.float64)
    two_levels = lambda xs: d(xs[0]) + d(2 * xs[1])
    torch.testing.assert_close(exact_penalty(two_levels, [x, x / 2]), 5 * exact_penalty(d, x))


def test_exact_penalty_weight_gradient_by_gradcheck():
    x = torch.randn(5, 4, dtype=torch.float64)
    W = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda W, v: exact_penalty(lambda x: torch.tanh(x @ W.T) @ v, x), (W, v))


# ---------------------------------------------------------------- finite differences
def test_constants_are_gats():
    assert (R1_GAMMA, R2_GAMMA, FD_SIGMA) == (0.1, 0.1, 0.01)


def test_finite_difference_matches_the_formula_with_the_same_draw():
    d, x = smooth_d(), torch.randn(8, 4, dtype=torch.float64)
    eps = torch.randn(x.shape, generator=gen(8), dtype=x.dtype)
    expected = ((d(x) - d(x + FD_SIGMA * eps)) / FD_SIGMA).pow(2)[:, 0]
    torch.testing.assert_close(finite_difference_penalty(d, x, d(x), generator=gen(8)), expected)


def test_finite_difference_converges_per_draw_to_the_directional_penalty():
    "|FD_sigma - (grad D . eps)^2| shrinks like sigma for a fixed draw of eps."
    d, x = smooth_d(), torch.randn(64, 4, dtype=torch.float64, generator=gen(9))
    eps = torch.randn(x.shape, generator=gen(10), dtype=x.dtype)
    xg = x.clone().requires_grad_()
    grad_x, = torch.autograd.grad(d(xg).sum(), xg)
    directional = (grad_x * eps).sum(1).pow(2)
    with torch.no_grad():
        err = [(finite_difference_penalty(d, x, d(x), s, gen(10)) - directional).abs().mean().item() for s in (1e-1, 1e-2, 1e-3, 1e-4)]
    for coarse, fine in zip(err, err[1:]): assert 5 < coarse / fine < 20      # first order in sigma, per draw
    assert err[-1] < 1e-4 * directional.mean().item()


def test_finite_difference_expectation_converges_to_the_exact_penalty():
    "E_eps[(grad D . eps)^2] = |grad D|^2: averaged over many draws, FD_sigma -> exact R1 as sigma -> 0."
    d, n = smooth_d(in_dim=2), 20_000
    x = torch.randn(1, 2, dtype=torch.float64, generator=gen(11)).expand(n, 2)
    exact = exact_penalty(d, x[:1]).item()
    with torch.no_grad():
        rel = {s: abs(finite_difference_penalty(d, x, d(x), s, gen(12)).mean().item() / exact - 1) for s in (1.0, FD_SIGMA)}
    assert rel[FD_SIGMA] < 4 * math.sqrt(2 / n)                              # unbiased up to Monte Carlo noise
    assert rel[1.0] > 10 * rel[FD_SIGMA]                                       # a large step is biased


def test_finite_difference_gradient_flows_through_both_evaluations():
    d, x = smooth_d(), torch.randn(8, 4, dtype=torch.float64, generator=gen(13))
    eps = torch.randn(x.shape, generator=gen(14), dtype=x.dtype)
    live = weight_grad(d, finite_difference_penalty(d, x, d(x), generator=gen(14)))
    naive = weight_grad(d, ((d(x) - d(x + FD_SIGMA * eps)) / FD_SIGMA).pow(2))
    torch.testing.assert_close(live, naive)
    detached = weight_grad(d, finite_difference_penalty(d, x, d(x).detach(), generator=gen(14)))
    assert (detached - live).norm() > live.norm()                              # one side alone is a different, wrong gradient
    xg = x.clone().requires_grad_()
    grad_x, = torch.autograd.grad(d(xg).sum(), xg, create_graph=True)
    directional = weight_grad(d, (grad_x * eps).sum(1).pow(2))
    small = weight_grad(d, finite_difference_penalty(d, x, d(x), sigma=1e-6, generator=gen(14)))
    assert (small - directional).norm() < 1e-4 * directional.norm()


def test_finite_difference_needs_the_same_augmentation_draw():
    d, x = smooth_d(), torch.randn(4096, 4, dtype=torch.float64, generator=gen(15))
    mask = (torch.rand(x.shape, generator=gen(16)) > 0.25).double()
    g = gen(17)
    shared = lambda x: d(x * mask)                                             # reuses the draw
    fresh = lambda x: d(x * (torch.rand(x.shape, generator=g) > 0.25).double())  # draws again on every call
    exact = exact_penalty(shared, x).mean().item()
    with torch.no_grad():
        ok = finite_difference_penalty(shared, x, shared(x), generator=gen(18)).mean().item()
        bad = finite_difference_penalty(fresh, x, fresh(x), generator=gen(18)).mean().item()
    assert abs(ok / exact - 1) < 4 * math.sqrt(2 / len(x))
    assert bad / exact > 100


def test_finite_difference_perturbs_each_level_independently():
    x, seen = torch.zeros(4, 3, dtype=torch.float64), []
    def d_fn(xs):
        seen.append([xi.clone() for xi in xs])
        return xs[0].sum(1) + xs[1].sum(1)
    finite_difference_penalty(d_fn, [x, x], torch.zeros(4, dtype=torch.float64), generator=gen(19))
    (p0, p1), = seen
    assert p0.abs().min() > 0 and not torch.allclose(p0, p1)
    g = gen(19)
    eps = [torch.randn(4, 3, generator=g, dtype=torch.float64) for _ in range(2)]     # one draw per level, in order
    torch.testing.assert_close([p0, p1], [FD_SIGMA * e for e in eps])


def test_finite_difference_rejects_mismatched_logits():
    d, x = smooth_d(), torch.randn(8, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="equal batches"): finite_difference_penalty(d, x, d(x)[:5])


# ---------------------------------------------------------------- D step and benchmark
def test_d_step_exact_and_fd_agree_in_expectation():
    "The two D steps give the same loss up to the finite-difference noise (float64, smooth D, large batch)."
    torch.manual_seed(0)
    d = nn.Sequential(nn.Flatten(), nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 1)).double()
    real, fake = (torch.randn(4096, 3, 2, 2, dtype=torch.float64, generator=gen(s)) for s in (20, 21))
    base = rpgan_d_loss(d(real), d(fake)).mean().item()
    exact = _d_step(d, real, fake, approximate=False).item() - base
    fd = _d_step(d, real, fake, approximate=True, generator=gen(22)).item() - base
    assert exact > 0 and abs(fd / exact - 1) < 0.1
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in d.parameters())


def test_bench_penalties_returns_both_times_and_the_ratio():
    res = bench_penalties(shape=(2, 2, 8, 8), width=4, repeats=1)
    assert set(res) == {'exact_s', 'fd_s', 'ratio'}
    assert res['exact_s'] > 0 and res['fd_s'] > 0
    assert res['ratio'] == pytest.approx(res['fd_s'] / res['exact_s'])


def test_bench_penalties_takes_a_given_d():
    calls = []
    class D(nn.Module):
        def __init__(self): super().__init__(); self.lin = nn.Linear(2 * 4 * 4, 1)
        def forward(self, x): calls.append(x.shape); return self.lin(x.flatten(1))
    bench_penalties(d=D(), shape=(3, 2, 4, 4), repeats=1)
    assert len(calls) == 2 * (2 + 4) and all(s == (3, 2, 4, 4) for s in calls)   # 2 rounds x (exact 2 + fd 4 forwards)

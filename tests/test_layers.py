"Layers of lesson 03: what would clutter the lesson (counts over many widths, state dicts, dtypes, the GAN double forward)."
import copy

import pytest
import timm.layers
import torch
import torch.nn as nn
import torch.nn.functional as F

from gat_tutorial.layers import (AdaptiveModulation, EqualLinear, LayerScale, PixelNorm, RMSNorm,
                                 SelfModulatedLayerNorm, SwiGLU, improved_spectral_norm, modulate)

GAT_WIDTHS = (384, 768, 1024, 1152)  # S, B, L, XL


# ---------------------------------------------------------------- RMSNorm
@pytest.mark.parametrize("affine", [True, False])
def test_rmsnorm_matches_torch_forward_and_backward(affine):
    torch.manual_seed(0)
    ours, ref = RMSNorm(24, affine=affine), nn.RMSNorm(24, eps=1e-6, elementwise_affine=affine)
    if affine:
        with torch.no_grad(): ours.weight.uniform_(0.5, 1.5)
        ref.load_state_dict(ours.state_dict())
    x = torch.randn(3, 7, 24, requires_grad=True)
    g = torch.randn(3, 7, 24)
    grads = torch.autograd.grad(ours(x), [x, *ours.parameters()], g)
    ref_grads = torch.autograd.grad(ref(x), [x, *ref.parameters()], g)
    torch.testing.assert_close(ours(x), ref(x))
    assert len(grads) == len(ref_grads) == (2 if affine else 1)
    for a, b in zip(grads, ref_grads): torch.testing.assert_close(a, b)


def test_rmsnorm_eps_matters_for_small_tokens():
    x = torch.randn(2, 3, 16) * 1e-3  # mean square ~ eps
    torch.testing.assert_close(RMSNorm(16, affine=False)(x), nn.RMSNorm(16, eps=1e-6, elementwise_affine=False)(x))
    assert torch.all(RMSNorm(16)(torch.zeros(1, 1, 16)) == 0)


def test_rmsnorm_state_dict_and_bf16():
    assert list(RMSNorm(8).state_dict()) == ["weight"] and list(RMSNorm(8, affine=False).state_dict()) == []
    x = torch.randn(2, 5, 64) * 4
    y = RMSNorm(64, affine=False)(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), RMSNorm(64, affine=False)(x), atol=2e-2, rtol=1e-2)


# ---------------------------------------------------------------- SwiGLU
def test_swiglu_keys_and_shapes_match_official_gat_s():
    with torch.device("meta"): m = SwiGLU(384)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {"w12.weight": (2048, 384), "w12.bias": (2048,), "w3.weight": (384, 1024), "w3.bias": (384,)}


def test_swiglu_hidden_is_gats_int_two_thirds_of_4c():
    with torch.device("meta"):
        for c in (*GAT_WIDTHS, *range(1, 300)):
            assert SwiGLU(c).w3.in_features == int(2 / 3 * int(4 * c)) == int(8 * c / 3)


@pytest.mark.parametrize("c", [*GAT_WIDTHS, *range(3, 120)])
def test_swiglu_param_count_vs_4c_gelu_mlp(c):
    "Weights equal iff 3 | C; otherwise r*C fewer (r = 8C mod 3). Biases: 2H - 4C more."
    with torch.device("meta"): swi, gelu = SwiGLU(c), timm.layers.Mlp(c, 4 * c)
    count = lambda m, kind: sum(p.numel() for n, p in m.named_parameters() if n.endswith(kind))
    h = 8 * c // 3
    assert count(gelu, "weight") == 8 * c * c and count(gelu, "bias") == 5 * c
    assert count(swi, "weight") - count(gelu, "weight") == -(8 * c % 3) * c
    assert count(swi, "bias") - count(gelu, "bias") == 2 * h - 4 * c
    if c % 3 == 0: assert count(swi, "weight") == count(gelu, "weight")


def test_swiglu_equals_timm_swiglu_with_copied_weights():
    torch.manual_seed(0)
    c = 30; h = 8 * c // 3
    ours, ref = SwiGLU(c), timm.layers.SwiGLU(c, h)
    (wg, wx), (bg, bx) = ours.w12.weight.chunk(2), ours.w12.bias.chunk(2)
    ref.load_state_dict({"fc1_g.weight": wg, "fc1_g.bias": bg, "fc1_x.weight": wx, "fc1_x.bias": bx,
                         "fc2.weight": ours.w3.weight, "fc2.bias": ours.w3.bias})
    x = torch.randn(2, 9, c, requires_grad=True)
    torch.testing.assert_close(ours(x), ref(x))
    gx, = torch.autograd.grad(ours(x).sum(), x)
    rx, = torch.autograd.grad(ref(x).sum(), x)
    torch.testing.assert_close(gx, rx)
    # the gate is the FIRST half: swapping the halves is a different function
    swapped = copy.deepcopy(ours)
    with torch.no_grad():
        swapped.w12.weight.copy_(torch.cat([wx, wg])); swapped.w12.bias.copy_(torch.cat([bx, bg]))
    assert not torch.allclose(swapped(x), ours(x), atol=1e-3)


# ---------------------------------------------------------------- LayerScale
def test_layerscale_matches_timm():
    ours, ref = LayerScale(12), timm.layers.LayerScale(12, init_values=0.1)
    torch.testing.assert_close(ours.gamma.detach(), torch.full((12,), 0.1))
    x = torch.randn(2, 3, 12)
    torch.testing.assert_close(ours(x), ref(x))
    assert list(ours.state_dict()) == ["gamma"]


# ---------------------------------------------------------------- EqualLinear
def _twins(lr_mul):
    eq = EqualLinear(40, 20, lr_mul=lr_mul).double()
    with torch.no_grad(): eq.bias.uniform_(-1, 1)
    plain = nn.Linear(40, 20).double()
    with torch.no_grad(): plain.weight.copy_(eq.weight * lr_mul); plain.bias.copy_(eq.bias * lr_mul)
    return eq, plain


def _effective_adam_step(layer, lr_mul):
    x = torch.randn(32, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    eff = lambda: torch.cat([(layer.weight * lr_mul).flatten(), layer.bias * lr_mul]).detach().clone()
    before, opt = eff(), torch.optim.Adam(layer.parameters(), lr=1e-3, betas=(0.0, 0.99), eps=1e-8)
    (layer(x) - 1).pow(2).sum().backward(); opt.step()
    return eff() - before


@pytest.mark.parametrize("lr_mul", [0.01, 0.1, 1.0])
def test_equal_linear_adam_step_is_lr_mul_times_plain(lr_mul):
    torch.manual_seed(0)
    eq, plain = _twins(lr_mul)
    x = torch.randn(4, 40, dtype=torch.float64)
    torch.testing.assert_close(eq(x), plain(x))
    d_eq, d_plain = _effective_adam_step(eq, lr_mul), _effective_adam_step(plain, 1.0)
    torch.testing.assert_close(d_eq, lr_mul * d_plain, rtol=0, atol=1e-3 * lr_mul * d_plain.abs().max().item())


def test_equal_linear_stores_at_inverse_lr_scale():
    torch.manual_seed(0)
    eq = EqualLinear(128, 64, lr_mul=0.01)
    bound = (6 / (128 + 64)) ** 0.5
    assert 0.95 * bound < (eq.weight * 0.01).abs().max() <= bound  # effective weight: xavier
    assert eq.weight.abs().max() > 50 * bound                        # stored: 100x
    assert EqualLinear(3, 2, bias=False).bias is None
    with pytest.raises(ValueError, match="lr_mul must be positive"): EqualLinear(3, 2, lr_mul=-1)


# ---------------------------------------------------------------- modulation
@pytest.mark.parametrize("n_chunks", [1, 4])
def test_adaptive_modulation_init_and_chunks(n_chunks):
    c = 32
    ada = AdaptiveModulation(c, n_chunks=n_chunks)
    out = ada(torch.randn(5, c))
    assert len(out) == n_chunks and all(t.shape == (5, c) for t in out)
    assert list(ada.state_dict()) == ["linear.weight", "linear.bias"]
    assert torch.all(ada.linear.bias == 0)
    bound = 0.1 * (6 / (c + n_chunks * c)) ** 0.5
    assert 0.9 * bound < ada.linear.weight.abs().max() <= bound


def test_gain_point_one_lets_gradient_reach_w_where_adaln_zero_does_not():
    torch.manual_seed(0)
    c = 16
    x = torch.randn(1, 4, c).expand(3, 4, c)
    mlp, norm = SwiGLU(c), RMSNorm(c, affine=False)

    def grad_w(zero):
        ada = AdaptiveModulation(c, n_chunks=2)
        if zero: nn.init.zeros_(ada.linear.weight)
        w = torch.randn(3, c, requires_grad=True)
        s, g = ada(w)
        out = x + g.unsqueeze(1) * mlp(modulate(norm(x), s))
        out.pow(2).sum().backward()
        return w.grad.abs().max().item(), out.std(0).max().item()

    assert grad_w(zero=True) == (0.0, 0.0)
    assert all(v > 0 for v in grad_w(zero=False))


def test_modulate_broadcasts_per_sample():
    x, s = torch.randn(2, 3, 4), torch.randn(2, 4)
    torch.testing.assert_close(modulate(x, s), x * (1 + s[:, None, :]))
    with pytest.raises(RuntimeError): modulate(x, torch.randn(3, 4))


# ---------------------------------------------------------------- SLN, PixelNorm
def test_sln_depends_on_each_samples_own_w_and_reduces_to_layernorm():
    torch.manual_seed(0)
    sln, h, w = SelfModulatedLayerNorm(12, 6), torch.randn(4, 5, 12), torch.randn(4, 6)
    w2 = w.clone(); w2[2] = torch.randn(6)
    out, out2 = sln(h, w), sln(h, w2)
    assert not torch.allclose(out[2], out2[2], atol=1e-4)
    torch.testing.assert_close(out[[0, 1, 3]], out2[[0, 1, 3]])
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in sln.parameters())
    with torch.no_grad():
        sln.gamma.weight.zero_(); sln.gamma.bias.fill_(1); sln.beta.weight.zero_(); sln.beta.bias.zero_()
    torch.testing.assert_close(sln(h, w), nn.LayerNorm(12, elementwise_affine=False)(h))


def test_sln_starts_as_layernorm_plus_a_style_term():
    torch.manual_seed(0)
    sln, h = SelfModulatedLayerNorm(12, 6), torch.randn(2, 5, 12)
    torch.testing.assert_close(sln(h, torch.zeros(2, 6)), F.layer_norm(h, (12,)))


def test_pixelnorm_is_rmsnorm_without_gain():
    x = torch.randn(3, 8, 20) * 7
    torch.testing.assert_close(PixelNorm()(x), nn.RMSNorm(20, eps=1e-8, elementwise_affine=False)(x))
    torch.testing.assert_close(PixelNorm()(x).pow(2).mean(-1), torch.ones(3, 8))
    assert list(PixelNorm().parameters()) == []


# ---------------------------------------------------------------- improved spectral norm
def _fit(layer, steps=25):
    torch.manual_seed(1)
    x = torch.randn(64, layer.in_features if hasattr(layer, "in_features") else 3 * 4 * 4)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        out = layer(x) if isinstance(layer, nn.Linear) else layer(x.view(-1, 3, 4, 4))
        out.pow(2).mean().neg().backward()  # push the weight to grow
        opt.step()
    return opt


@pytest.mark.parametrize("make", [lambda: nn.Linear(16, 24), lambda: nn.Conv2d(3, 8, 3)])
def test_isn_trains_the_original_and_keeps_sigma_init(make):
    torch.manual_seed(0)
    layer = improved_spectral_norm(make())
    original, sigma_init = layer.parametrizations.weight.original, layer.parametrizations.weight[0].sigma_init
    torch.testing.assert_close(sigma_init, torch.linalg.matrix_norm(original.detach().flatten(1), ord=2))
    start = original.detach().clone()
    opt = _fit(layer)
    assert (original - start).abs().max() > 1e-2
    assert any(p is original for p in opt.param_groups[0]["params"])
    for _ in range(50): layer.weight  # settle the power iteration
    sigma = torch.linalg.matrix_norm(layer.weight.detach().flatten(1), ord=2)
    torch.testing.assert_close(sigma, sigma_init, rtol=1e-4, atol=0)
    # without the parametrization the same training grows the weight
    torch.manual_seed(0)
    plain = make(); _fit(plain)
    assert torch.linalg.matrix_norm(plain.weight.detach().flatten(1), ord=2) > 1.5 * sigma_init


def test_isn_registration_leaves_the_layer_unchanged():
    "u, v start at the exact top singular vectors, so W_eff = W at registration (a square W: close top singular values)."
    torch.manual_seed(0)
    layer = nn.Linear(32, 32)
    w = layer.weight.detach().clone()
    improved_spectral_norm(layer).eval()
    torch.testing.assert_close(layer.weight.detach(), w, rtol=1e-5, atol=0)


def test_isn_is_sigma_init_times_torch_spectral_norm_with_gradients():
    torch.manual_seed(0)
    base = nn.Linear(10, 14)
    ours = improved_spectral_norm(copy.deepcopy(base))
    theirs = nn.utils.parametrizations.spectral_norm(copy.deepcopy(base))
    isn, sn = ours.parametrizations.weight[0], theirs.parametrizations.weight[0]
    isn._u.copy_(sn._u); isn._v.copy_(sn._v)
    x = torch.randn(5, 10)
    for _ in range(3):
        torch.testing.assert_close(ours.weight, isn.sigma_init * theirs.weight)
    ours.weight.sum().backward(); theirs.weight.sum().backward()
    torch.testing.assert_close(ours.parametrizations.weight.original.grad,
                               isn.sigma_init * theirs.parametrizations.weight.original.grad)
    torch.testing.assert_close(isn._u, sn._u)
    assert ours(x).shape == (5, 14)


def test_isn_survives_two_forwards_before_backward():
    "GAN pattern: D(real) and D(fake) in training mode, then one backward (needs the u, v clones)."
    torch.manual_seed(0)
    d = improved_spectral_norm(nn.Linear(8, 1))
    loss = F.softplus(d(torch.randn(4, 8)) - d(torch.randn(4, 8))).mean()
    loss.backward()
    assert d.parametrizations.weight.original.grad is not None


def test_isn_eval_freezes_power_iteration_and_state_dict_round_trips():
    torch.manual_seed(0)
    a = improved_spectral_norm(nn.Linear(6, 9))
    _fit(a, steps=3)
    a.eval()
    u = a.parametrizations.weight[0]._u.clone()
    a.weight
    assert torch.equal(a.parametrizations.weight[0]._u, u)
    keys = set(a.state_dict())
    assert {"parametrizations.weight.original", "parametrizations.weight.0._u",
            "parametrizations.weight.0._v", "parametrizations.weight.0.sigma_init"} <= keys
    b = improved_spectral_norm(nn.Linear(6, 9)).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 6)
    torch.testing.assert_close(b(x), a(x))


def test_isn_rejects_zero_power_iterations():
    with pytest.raises(ValueError, match="n_power_iterations"):
        improved_spectral_norm(nn.Linear(3, 3), n_power_iterations=0)

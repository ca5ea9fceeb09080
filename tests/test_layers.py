"Layers of lesson 04: what would clutter the lesson (counts over many widths, state dicts, dtypes)."
import copy

import pytest
import timm.layers
import torch
import torch.nn as nn

from gat_tutorial.layers import AdaptiveModulation, EqualLinear, LayerScale, RMSNorm, SwiGLU, modulate

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

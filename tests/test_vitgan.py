"ViTGAN (lesson 07): its parts (overlapping patches, L2 attention, SLN, ISN), the class-conditional G and D, and the losses."
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from gat_tutorial.attention import Attention
from gat_tutorial.patches import PatchEmbed
from gat_tutorial.peers.vitgan import (BCR_WEIGHT, DEMOD_EPS, ISN_LAYERS, VITGAN_BETAS, VITGAN_LR, VITGAN_POLICY,
                                       VITGAN_R1_GAMMA, INRPatchDecoder, L2Attention, ModulatedLinear,
                                       OverlapPatchEmbed, SelfModulatedLayerNorm, ViTGANDiscriminator,
                                       ViTGANGenerator, improved_spectral_norm, vitgan_d_loss, vitgan_g_loss)


# ---------------------------------------------------------------- overlapping patches
@pytest.mark.parametrize("shape,p,o", [((1, 1, 32, 32), 4, 2), ((2, 3, 12, 20), 4, 1), ((1, 16, 32, 32), 2, 1),
                                       ((1, 4, 16, 16), 8, 3)])
def test_overlap_patch_embed_keeps_token_count(shape, p, o):
    ope = OverlapPatchEmbed(shape[1], 8, p, o)
    x = torch.randn(shape)
    assert ope(x).shape == PatchEmbed(shape[1], 8, p)(x).shape
    assert ope.proj.kernel_size == (p + 2 * o,) * 2 and ope.proj.stride == (p, p) and ope.proj.padding == (o, o)


def test_overlap_tokens_share_pixels():
    ope = OverlapPatchEmbed(1, 8, 4, 2)
    x = torch.zeros(1, 1, 32, 32, requires_grad=True)
    ope(x)[0, 9].sum().backward()                       # token 9 = row 1, column 1 of the 8x8 grid
    seen = (x.grad[0, 0] != 0).nonzero()
    assert len(seen) == 8 * 8
    assert seen.min().item() == 2 and seen.max().item() == 9   # pixels 2..9: 2 beyond the 4..7 patch each side


# ---------------------------------------------------------------- L2 attention
def test_l2_attention_tokens_attend_most_to_themselves():
    torch.manual_seed(0)
    layer = L2Attention(32, 4)
    weights = layer.attn_weights(torch.randn(16, 10, 32))
    assert weights.shape == (16, 4, 10, 10)
    torch.testing.assert_close(weights.sum(-1), torch.ones(16, 4, 10))
    assert (weights.argmax(-1) == torch.arange(10)).all()


def test_l2_attention_gradient_stays_bounded_while_dot_product_grows():
    torch.manual_seed(0)
    layers = {"dot": Attention(32, 4), "l2": L2Attention(32, 4)}
    for layer in layers.values():
        for m in layer.modules():
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
    x = torch.randn(3, 12, 32)
    x[:, 0] = 0  # a quiet token: its dot-product logits stay flat while the keys grow
    u = torch.randn(3, 12, 32)
    u /= u.norm()

    def grad_norm(layer, x):
        x = x.clone().requires_grad_()
        (layer(x) * u).sum().backward()
        return x.grad.norm().item()

    g = {name: [grad_norm(layer, s * x) for s in (1, 10, 100)] for name, layer in layers.items()}
    assert max(g["l2"]) < 10 * g["l2"][0]
    assert g["dot"][-1] > 100 * g["dot"][0]


# ---------------------------------------------------------------- SLN
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


def test_isn_keeps_the_registered_parameter_in_the_optimizer_and_sigma_init():
    "The ports' bug re-wraps the weight in a new nn.Parameter: the optimizer's tensor never trains."
    torch.manual_seed(0)
    layer = improved_spectral_norm(nn.Linear(12, 12))
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    held = opt.param_groups[0]["params"]
    original = layer.parametrizations.weight.original
    start = original.detach().clone()
    x = torch.randn(32, 12)
    for _ in range(20):
        opt.zero_grad(); layer(x).pow(2).mean().neg().backward(); opt.step()
        assert any(p is original for p in held) and original is layer.parametrizations.weight.original
    assert (original - start).abs().max() > 1e-2
    for _ in range(50): layer.weight
    sigma_init = layer.parametrizations.weight[0].sigma_init
    torch.testing.assert_close(torch.linalg.matrix_norm(layer.weight.detach(), ord=2), sigma_init, rtol=1e-4, atol=0)


# ---------------------------------------------------------------- the ports' bugs, guarded
def test_l2_attention_has_one_tied_projection_for_queries_and_keys():
    layer = L2Attention(16, 2)
    names = {n for n, _ in layer.named_parameters()}
    assert names == {"qk.weight", "qk.bias", "v.weight", "v.bias", "proj.weight", "proj.bias"}
    torch.manual_seed(0)
    x = torch.randn(4, 9, 16)
    q = layer.qk(x).unflatten(-1, (2, -1)).transpose(1, 2)                   # (B, H, T, d), also the keys
    logits = -torch.cdist(q, q).square() * (16 // 2) ** -0.5
    torch.testing.assert_close(layer.attn_weights(x), logits.softmax(-1), rtol=1e-4, atol=1e-5)


def test_l2_attention_puts_weight_on_the_nearest_keys():
    "The missing minus sign sends the weight to the farthest key."
    torch.manual_seed(0)
    layer = L2Attention(8, 1)
    with torch.no_grad():
        layer.qk.weight.copy_(torch.eye(8)); layer.qk.bias.zero_()
    x = torch.randn(2, 12, 8)
    w = layer.attn_weights(x)[:, 0]                                           # (B, T, T)
    dist = torch.cdist(x, x)
    dist_no_self = dist + torch.eye(12) * 1e9
    w_no_self = w - torch.eye(12) * 1e9
    assert (w_no_self.argmax(-1) == dist_no_self.argmin(-1)).all()            # the nearest other token
    assert (w.argmin(-1) == dist.argmax(-1)).all()                            # the farthest gets the least
    assert (w.argmax(-1) == torch.arange(12)).all()
    log_ratio = w.log() + dist.square() * 8 ** -0.5                           # log w_ij = -d_ij^2 / sqrt(d) + const_i
    torch.testing.assert_close(log_ratio, log_ratio[..., :1].expand_as(log_ratio), rtol=0, atol=1e-4)


def test_sln_gamma_and_beta_are_learned_affine_maps_of_w():
    "Not two scalars times w: per-channel maps with their own weights, and w = 0 keeps the content."
    torch.manual_seed(0)
    sln = SelfModulatedLayerNorm(10, 6)
    assert isinstance(sln.gamma, nn.Linear) and sln.gamma.weight.shape == (10, 6)
    assert isinstance(sln.beta, nn.Linear) and sln.beta.weight.shape == (10, 6)
    h, w = torch.randn(3, 4, 10), torch.randn(3, 6)
    torch.testing.assert_close(sln(h, w), sln.gamma(w)[:, None] * F.layer_norm(h, (10,)) + sln.beta(w)[:, None])
    assert sln(h, torch.zeros(3, 6)).abs().max() > 0.5
    assert not torch.allclose(sln(h, w), sln(h, 2 * w), atol=1e-3)


# ---------------------------------------------------------------- the modulated 1x1 conv and the INR decoder
@pytest.mark.parametrize("demodulate", [True, False])
def test_modulated_linear_matches_a_per_sample_conv2d(demodulate):
    torch.manual_seed(0)
    layer = ModulatedLinear(6, 5, style_dim=4, demodulate=demodulate)
    nn.init.normal_(layer.bias)
    x, style = torch.randn(3, 7, 6), torch.randn(3, 4)
    ref = []
    for xn, sn in zip(x, style):
        wn = layer.weight * layer.affine(sn) * layer.scale
        if demodulate: wn = wn * torch.rsqrt(wn.square().sum(1, keepdim=True) + DEMOD_EPS)
        ref.append(F.conv2d(xn.T[None, :, :, None], wn[:, :, None, None], layer.bias)[0, :, :, 0].T)
    torch.testing.assert_close(layer(x, style), torch.stack(ref), rtol=1e-4, atol=1e-5)


def test_inr_decoder_paints_each_patch_from_its_own_token():
    torch.manual_seed(0)
    dec = INRPatchDecoder(dim=16, channels=2, patch=4)
    tokens = torch.randn(1, 9, 16, requires_grad=True)                        # a 3x3 grid
    out = dec(tokens)
    assert out.shape == (1, 2, 12, 12)
    out[0, :, 4:8, 8:12].sum().backward()                                     # patch (1, 2) = token 5
    assert ((tokens.grad[0].abs().sum(-1) > 0).nonzero().flatten() == torch.tensor([5])).all()


# ---------------------------------------------------------------- generator
def test_generator_shapes_attributes_and_determinism():
    torch.manual_seed(0)
    G = ViTGANGenerator()
    assert (G.z_dim, G.num_classes) == (32, 10)
    z, y = torch.randn(5, G.z_dim), torch.arange(5)
    out = G(z, y)
    assert out.shape == (5, 1, 32, 32) and torch.isfinite(out).all()
    torch.testing.assert_close(G(z, y), out, rtol=0, atol=0)
    torch.manual_seed(0)
    torch.testing.assert_close(ViTGANGenerator()(z, y), out, rtol=0, atol=0)   # same seed, same weights
    assert ViTGANGenerator(img_size=16, channels=3, patch=2)(z, y).shape == (5, 3, 16, 16)
    with pytest.raises(ValueError, match="not divisible"):
        ViTGANGenerator(img_size=30, patch=4)


def test_generator_input_tokens_are_positions_only_and_every_norm_is_sln():
    torch.manual_seed(0)
    G = ViTGANGenerator(depth=3)
    assert sum(isinstance(m, SelfModulatedLayerNorm) for m in G.modules()) == 2 * 3 + 1
    assert not any(isinstance(m, (nn.LayerNorm, nn.RMSNorm)) for m in G.modules())
    seen = []
    hook = G.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    G(torch.randn(2, G.z_dim), torch.tensor([1, 7]))
    G(torch.randn(2, G.z_dim), torch.tensor([3, 3]))
    hook.remove()
    torch.testing.assert_close(seen[0], seen[1])                              # the same tokens whatever z and y
    torch.testing.assert_close(seen[0][0], seen[0][1])


def test_generator_output_depends_on_z_and_on_the_class():
    torch.manual_seed(0)
    G = ViTGANGenerator()
    z, y = torch.randn(4, G.z_dim), torch.tensor([0, 1, 2, 3])
    out = G(z, y)
    assert (G(z, torch.tensor([5, 1, 2, 3])) - out)[0].abs().max() > 1e-3
    torch.testing.assert_close(G(z, torch.tensor([5, 1, 2, 3]))[1:], out[1:])
    assert (G(torch.randn_like(z), y) - out).abs().max() > 1e-3


# ---------------------------------------------------------------- discriminator
def test_discriminator_shapes_and_isn_on_every_weight_layer():
    torch.manual_seed(0)
    D = ViTGANDiscriminator()
    x, y = torch.randn(3, 1, 32, 32), torch.tensor([0, 4, 9])
    assert D(x, y).shape == (3,)
    layers = [m for m in D.modules() if isinstance(m, ISN_LAYERS)]
    assert len(layers) >= 2 * 4 + 3
    assert all(parametrize.is_parametrized(m, "weight") for m in layers)
    for m in (D.patch_embed.proj, D.embed, D.head, D.blocks[0].attn.qk, D.blocks[0].mlp[0]):  # conv and embedding too
        assert parametrize.is_parametrized(m, "weight")
    assert not any(isinstance(m, nn.Module) and hasattr(m, "weight") and isinstance(getattr(m, "weight", None), nn.Parameter)
                   and not parametrize.is_parametrized(m) for m in D.modules() if not isinstance(m, nn.LayerNorm))
    assert isinstance(D.patch_embed, OverlapPatchEmbed)
    assert not any(isinstance(m, Attention) for m in D.modules())
    assert all(isinstance(b.attn, L2Attention) for b in D.blocks)


def test_discriminator_is_class_sensitive_through_a_projection_head():
    torch.manual_seed(0)
    D = ViTGANDiscriminator().eval()
    x = torch.randn(4, 1, 32, 32)
    y = torch.tensor([0, 1, 2, 3])
    logits = D(x, y)
    phi = D.features(x)
    torch.testing.assert_close(logits, D.head(phi)[:, 0] + (D.embed.weight[y] * phi).sum(-1))
    other = D(x, torch.tensor([9, 1, 2, 3]))
    assert (other[0] - logits[0]).abs() > 1e-3
    torch.testing.assert_close(other[1:], logits[1:])


# ---------------------------------------------------------------- losses
def _setup(seed=0, batch=6):
    torch.manual_seed(seed)
    G, D = ViTGANGenerator(dim=32, depth=1), ViTGANDiscriminator(dim=32, depth=1)
    real, y = torch.rand(batch, 1, 32, 32) * 2 - 1, torch.arange(batch) % 10
    return G, D, real, y


def test_constants_are_the_released_recipe():
    assert (VITGAN_LR, VITGAN_BETAS, VITGAN_R1_GAMMA, BCR_WEIGHT) == (1e-3, (0.0, 0.99), 0.1, 1.0)
    assert set(VITGAN_POLICY) == {"translation", "cutout"}


def test_d_loss_is_finite_and_reaches_every_d_parameter_and_no_g_parameter():
    G, D, real, y = _setup()
    fake = G(torch.randn(len(real), G.z_dim), y)
    loss, terms = vitgan_d_loss(D, real, fake, y, VITGAN_POLICY, torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert set(terms) == {"d_loss", "r1", "bcr"}
    assert all(t.ndim == 0 and torch.isfinite(t) and not t.requires_grad for t in terms.values())
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in D.parameters())
    assert all(p.grad is None for p in G.parameters())
    torch.testing.assert_close(loss.detach(), terms["d_loss"] + VITGAN_R1_GAMMA / 2 * terms["r1"] + BCR_WEIGHT * terms["bcr"])


def test_g_loss_is_finite_and_reaches_every_g_parameter():
    G, D, real, y = _setup()
    loss = vitgan_g_loss(D, G(torch.randn(len(real), G.z_dim), y), y, VITGAN_POLICY, torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in G.parameters())


def test_r1_is_the_input_gradient_on_unaugmented_reals_and_bcr_needs_two_draws():
    G, D, real, y = _setup()
    D.eval()                                                                  # frozen power iteration between calls
    fake = G(torch.randn(len(real), G.z_dim), y).detach()
    x = real.clone().requires_grad_()
    grad, = torch.autograd.grad(D(x, y).sum(), x)
    _, terms = vitgan_d_loss(D, real, fake, y, VITGAN_POLICY, torch.Generator().manual_seed(0))
    torch.testing.assert_close(terms["r1"], grad.square().flatten(1).sum(1).mean(), rtol=1e-4, atol=1e-7)
    assert terms["bcr"] > 0
    _, none = vitgan_d_loss(D, real, fake, y, (), torch.Generator().manual_seed(0))
    assert none["bcr"] == 0
    a, _ = vitgan_d_loss(D, real, fake, y, VITGAN_POLICY, torch.Generator().manual_seed(3))
    b, _ = vitgan_d_loss(D, real, fake, y, VITGAN_POLICY, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)


def test_one_adam_step_of_each_loss_moves_the_trainable_tensors():
    G, D, real, y = _setup()
    opt_g = torch.optim.Adam(G.parameters(), lr=VITGAN_LR, betas=VITGAN_BETAS)
    opt_d = torch.optim.Adam(D.parameters(), lr=VITGAN_LR, betas=VITGAN_BETAS)
    rng = torch.Generator().manual_seed(0)
    d_before = [p.detach().clone() for p in D.parameters()]
    g_before = [p.detach().clone() for p in G.parameters()]
    fake = G(torch.randn(len(real), G.z_dim), y)
    loss, _ = vitgan_d_loss(D, real, fake, y, VITGAN_POLICY, rng)
    opt_d.zero_grad(); loss.backward(); opt_d.step()
    loss = vitgan_g_loss(D, fake, y, VITGAN_POLICY, rng)
    opt_g.zero_grad(); loss.backward(); opt_g.step()
    assert all((p - b).abs().max() > 0 for p, b in zip(D.parameters(), d_before))
    assert all((p - b).abs().max() > 0 for p, b in zip(G.parameters(), g_before))

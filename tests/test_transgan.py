"TransGAN (lesson 08): grid attention and its relative bias, PixelNorm, the generator's stages, the multi-scale D, the WGAN-GP loss."
import copy

import pytest
import torch
import torch.nn as nn
from timm.models.swin_transformer import get_relative_position_index, window_partition, window_reverse
from torch.nn.attention import SDPBackend, sdpa_kernel

from gat_tutorial.augment import diffaugment, sample_diffaug
from gat_tutorial.peers.transgan import (N_CRITIC, PixelNorm, TRANSGAN_BETAS, TRANSGAN_GRAD_CLIP, TRANSGAN_LR,
                                         TransGANBlock, TransGANDiscriminator, TransGANGenerator, WindowAttention,
                                         _relative_position_index, _window_partition, _window_reverse, pixel_upsample,
                                         transgan_d_loss, transgan_g_loss)
from gat_tutorial.losses import gradient_penalty

POLICY = ("translation", "cutout")


from test_attention import sdpa_naive, grid_offsets                # the references lesson 03's tests check


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return TransGANGenerator(), TransGANDiscriminator()


# ---------------------------------------------------------------- grid attention
@pytest.mark.parametrize("s", [1, 2, 3, 5, 8])
def test_relative_position_index_matches_timm_swin_and_coordinates(s):
    assert torch.equal(_relative_position_index(s), get_relative_position_index(s, s))
    assert torch.equal(_relative_position_index(s), grid_offsets(s, s))


@pytest.mark.parametrize("hw, s", [((8, 12), 4), ((6, 6), 3), ((4, 4), 4)])
def test_window_partition_round_trip_and_timm(hw, s):
    x = torch.randn(2, hw[0] * hw[1], 7)
    windows = _window_partition(x, hw, s)
    assert windows.shape == (2 * hw[0] * hw[1] // s ** 2, s * s, 7)
    assert torch.equal(windows, window_partition(x.view(2, *hw, 7), (s, s)).flatten(1, 2))
    assert torch.equal(_window_reverse(windows, hw, s), x)
    assert torch.equal(window_reverse(windows.unflatten(1, (s, s)), (s, s), *hw).flatten(1, 2), x)


def test_window_attention_with_one_window_is_full_attention_with_relative_bias():
    torch.manual_seed(0)
    s, heads = 5, 2
    layer = WindowAttention(20, heads, s)
    assert layer.relative_position_bias_table.shape == ((2 * s - 1) ** 2, heads)
    x = torch.randn(2, s * s, 20)
    bias = layer.relative_position_bias_table[grid_offsets(s, s)].permute(2, 0, 1)  # (H, T, T)
    q, k, v = layer.qkv(x).unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4)
    full = layer.proj(sdpa_naive(q, k, v, bias).transpose(1, 2).flatten(2))
    torch.testing.assert_close(layer(x, (s, s)), full, atol=1e-5, rtol=0)


def test_window_attention_equals_a_loop_over_windows():
    torch.manual_seed(0)
    (h, w), s, heads = (6, 9), 3, 2
    layer = WindowAttention(16, heads, s)
    with torch.no_grad(): layer.relative_position_bias_table.normal_()  # a bias that matters
    x = torch.randn(2, h * w, 16)
    grid, out = x.view(2, h, w, 16), torch.zeros(2, h, w, 16)
    bias = layer.relative_position_bias_table[grid_offsets(s, s)].permute(2, 0, 1)
    for r in range(0, h, s):
        for c in range(0, w, s):
            win = grid[:, r:r + s, c:c + s].flatten(1, 2)
            q, k, v = layer.qkv(win).unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4)
            out[:, r:r + s, c:c + s] = layer.proj(sdpa_naive(q, k, v, bias).transpose(1, 2).flatten(2)).view(2, s, s, 16)
    torch.testing.assert_close(layer(x, (h, w)), out.flatten(1, 2), atol=1e-5, rtol=0)


def test_window_attention_keeps_information_inside_windows():
    torch.manual_seed(0)
    h, w, s = 6, 9, 3
    layer = WindowAttention(16, 2, s)
    x = torch.randn(2, h * w, 16, requires_grad=True)
    out = layer(x, (h, w))
    assert out.shape == x.shape
    for row, col in ((0, 0), (4, 7), (5, 3)):
        (grad,) = torch.autograd.grad(out[1, row * w + col].sum(), x, retain_graph=True)
        assert grad[0].abs().sum() == 0  # other samples untouched
        reached = (grad[1].abs().sum(-1) > 0).view(h, w)
        expected = torch.zeros(h, w, dtype=torch.bool)
        expected[row // s * s : row // s * s + s, col // s * s : col // s * s + s] = True
        assert torch.equal(reached, expected)


@pytest.mark.parametrize("n_tokens, hw", [(36, (6, 6)), (64, (8, 4))])
def test_window_attention_rejects_grids_that_do_not_tile(n_tokens, hw):
    with pytest.raises(ValueError, match="divisible by 4"):
        WindowAttention(16, 2, 4)(torch.randn(1, n_tokens, 16), hw)


# ---------------------------------------------------------------- PixelNorm
def test_pixelnorm_is_rmsnorm_without_gain():
    x = torch.randn(3, 8, 20) * 7
    torch.testing.assert_close(PixelNorm()(x), nn.RMSNorm(20, eps=1e-8, elementwise_affine=False)(x))
    torch.testing.assert_close(PixelNorm()(x).pow(2).mean(-1), torch.ones(3, 8))
    assert list(PixelNorm().parameters()) == []


# ---------------------------------------------------------------- generator
def test_pixel_upsample_is_torch_pixel_shuffle_on_tokens():
    fmap = torch.randn(2, 12, 3, 5)
    up, hw = pixel_upsample(fmap.flatten(2).transpose(1, 2), (3, 5))
    assert hw == (6, 10)
    assert torch.equal(up, nn.PixelShuffle(2)(fmap).flatten(2).transpose(1, 2))


def test_generator_shapes_at_each_stage(models):
    G, _ = models
    z, y = torch.randn(3, G.z_dim), torch.tensor([0, 5, 9])
    stages = G.stage_tokens(z, y)
    assert [tuple(t.shape) for t in stages] == [(3, 64, 64), (3, 256, 16), (3, 1024, 4)]
    assert G(z, y).shape == (3, 1, 32, 32)
    assert (G.z_dim, G.num_classes) == (64, 10)
    assert all(isinstance(b.attn, WindowAttention) for blocks in G.stages for b in blocks)
    assert [blocks[0].attn.window_size for blocks in G.stages] == [8, 8, 8]


def test_generator_other_sizes_and_bad_configs():
    torch.manual_seed(0)
    G = TransGANGenerator(img_size=16, channels=3, num_classes=4, z_dim=8, dim=32, depths=(2, 1), heads=4, window=4)
    assert G(torch.randn(2, 8), torch.tensor([0, 3])).shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="3 stages"): TransGANGenerator(depths=(1, 1))
    with pytest.raises(ValueError, match="divisible by 4"): TransGANGenerator(dim=24)
    with pytest.raises(ValueError, match="power of 2"): TransGANGenerator(img_size=24)


def test_generator_pixelnorm_option():
    G = TransGANGenerator(norm="pn")
    assert all(isinstance(b.norm1, PixelNorm) and isinstance(b.norm2, PixelNorm) for blocks in G.stages for b in blocks)
    assert torch.isfinite(G(torch.randn(2, G.z_dim), torch.tensor([1, 2]))).all()
    with pytest.raises(ValueError, match="'ln'"): TransGANBlock(16, 2, 4, norm="bn")


def test_generator_uses_the_class_and_keeps_samples_independent(models):
    G, _ = models
    z = torch.randn(1, G.z_dim).expand(2, -1)
    out = G(z, torch.tensor([3, 7]))
    assert (out[0] - out[1]).abs().max() > 1e-3
    zb, yb = torch.randn(4, G.z_dim), torch.arange(4)
    torch.testing.assert_close(G(zb[:2], yb[:2]), G(zb, yb)[:2], atol=1e-5, rtol=0)


# ---------------------------------------------------------------- discriminator
def test_discriminator_shapes_and_windows(models):
    _, D = models
    assert D(torch.randn(3, 1, 32, 32), torch.tensor([0, 1, 2])).shape == (3,)
    assert D.num_classes == 10
    assert [b.attn.window_size for b in (*D.blocks_1, *D.blocks_2)] == [4, 8]
    assert D.fine_embed.kernel_size == (2, 2) and D.coarse_embed.kernel_size == (4, 4)
    with pytest.raises(ValueError, match="divisible by 4"): TransGANDiscriminator(dim=30)


@pytest.mark.parametrize("part", ["fine_embed", "coarse_embed", "pos_embed_2", "class_embed"])
def test_discriminator_uses_both_patch_sizes_and_the_class(models, part):
    _, D = models
    torch.manual_seed(1)
    x, y = torch.randn(4, 1, 32, 32), torch.arange(4)
    d = copy.deepcopy(D)
    with torch.no_grad():
        p = getattr(d, part)
        p = p.weight if isinstance(p, nn.Module) else p
        p.add_(0.1 * torch.randn_like(p))
    assert (d(x, y) - D(x, y)).abs().max() > 1e-4


def test_discriminator_projection_depends_on_the_label(models):
    _, D = models
    x = torch.randn(1, 1, 32, 32).expand(10, -1, -1, -1)
    logits = D(x, torch.arange(10))
    assert logits.std() > 1e-4
    h = D.features(x[:1])
    torch.testing.assert_close(logits, D.head(h)[:, 0] + D.class_embed.weight @ h[0], atol=1e-5, rtol=0)


# ---------------------------------------------------------------- losses
def test_gradient_penalty_equals_hand_autograd(models):
    G, D = models
    torch.manual_seed(2)
    real, y = torch.rand(6, 1, 32, 32) * 2 - 1, torch.arange(6)
    with torch.no_grad(): fake = G(torch.randn(6, G.z_dim), y)
    d_fn = lambda x: D(x, y)
    with sdpa_kernel(SDPBackend.MATH):
        ours = gradient_penalty(d_fn, real, fake, torch.Generator().manual_seed(1)).mean()
        alpha = torch.rand(6, 1, 1, 1, generator=torch.Generator().manual_seed(1))
        x_hat = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
        out = d_fn(x_hat)
        (grads,) = torch.autograd.grad(out, x_hat, grad_outputs=torch.ones_like(out), create_graph=True)
        hand = ((grads.view(6, -1).norm(2, dim=1) - 1) ** 2).mean()
    torch.testing.assert_close(ours, hand, atol=1e-5, rtol=1e-5)


def test_d_loss_is_the_released_wgangp_eps_formula(models):
    G, D = models
    torch.manual_seed(3)
    real, y = torch.rand(6, 1, 32, 32) * 2 - 1, torch.arange(6)
    with torch.no_grad(): fake = G(torch.randn(6, G.z_dim), y)
    loss, terms = transgan_d_loss(D, real, fake, y, POLICY, torch.Generator().manual_seed(4))
    gen = torch.Generator().manual_seed(4)
    aug = lambda x: diffaugment(x, sample_diffaug(x, POLICY, gen))
    r, f = D(aug(real), y), D(aug(fake), y)
    alpha = torch.rand(6, 1, 1, 1, generator=gen)
    x_hat = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    with sdpa_kernel(SDPBackend.MATH):
        out = D(aug(x_hat), y)
        (grads,) = torch.autograd.grad(out, x_hat, grad_outputs=torch.ones_like(out), create_graph=True)
    gp = ((grads.view(6, -1).norm(2, dim=1) - 1) ** 2).mean()
    ref = -r.mean() + f.mean() + 10 * gp + 1e-3 * r.mean() ** 2
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    assert set(terms) == {"d_loss", "gp", "drift"}
    torch.testing.assert_close(terms["gp"], gp.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(terms["drift"], r.mean().detach() ** 2, atol=1e-6, rtol=1e-5)
    assert all(not v.requires_grad and v.dim() == 0 for v in terms.values())


def test_losses_are_finite_and_reach_every_parameter():
    torch.manual_seed(5)
    G, D = TransGANGenerator(depths=(1, 1, 1)), TransGANDiscriminator()
    real, y = torch.rand(4, 1, 32, 32) * 2 - 1, torch.tensor([0, 3, 6, 9])
    fake = G(torch.randn(4, G.z_dim), y)
    loss, _ = transgan_d_loss(D, real, fake, y, ("color", "translation", "cutout"), torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in D.parameters())
    assert all(p.grad is None for p in G.parameters())  # the D loss detaches the fakes
    D.zero_grad()
    g_loss = transgan_g_loss(D, fake, y, POLICY, torch.Generator().manual_seed(0))
    assert torch.isfinite(g_loss) and g_loss.dim() == 0
    g_loss.backward()
    missing = [n for n, p in G.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_released_settings():
    assert TRANSGAN_LR == 1e-4 and TRANSGAN_BETAS == (0.0, 0.99)
    assert N_CRITIC == 4 and TRANSGAN_GRAD_CLIP == 5.0
    torch.optim.Adam(nn.Linear(2, 2).parameters(), lr=TRANSGAN_LR, betas=TRANSGAN_BETAS)  # a valid Adam config

"DiffAugment of lesson 06: draws, geometry on hand-made and non-square tensors, gradients, reuse of a draw, bad input."
import pytest
import torch
import torch.nn.functional as F

from gat_tutorial.augment import (COLOR_KEYS, COLOR_P, FLIP_P, POLICY, diffaugment, sample_diffaug)

GEOMETRY = ('translation', 'cutout', 'flip')


def draw_for(x, seed=0, policy=POLICY):
    return sample_diffaug(x, policy=policy, generator=torch.Generator().manual_seed(seed))


def keep(draw, *keys): return {k: v for k, v in draw.items() if k in keys}


def reference(x, draw):
    "Loop over samples and pixels, straight from the definitions (independent of the vectorised code)."
    out = x.clone()
    B, C, H, W = x.shape
    for b in range(B):
        y = x[b].clone()
        if 'color' in draw and draw['color'][b]:
            y = y + draw['brightness'][b]
            y = (y - draw['saturation_mean'][b]) * draw['saturation'][b] + draw['saturation_mean'][b]
            y = (y - draw['contrast_mean'][b]) * draw['contrast'][b] + draw['contrast_mean'][b]
        if 'translation' in draw:
            sy, sx = round(draw['translation'][b, 0].item() * H), round(draw['translation'][b, 1].item() * W)
            z = torch.zeros_like(y)
            for i in range(H):
                for j in range(W):
                    if 0 <= i + sy < H and 0 <= j + sx < W: z[:, i, j] = y[:, i + sy, j + sx]
            y = z
        if 'cutout' in draw:
            ch, cw = int(H / 2 + 0.5), int(W / 2 + 0.5)
            cy, cx = round(draw['cutout'][b, 0].item() * H), round(draw['cutout'][b, 1].item() * W)
            for i in range(H):
                for j in range(W):
                    if cy - ch // 2 <= i < cy - ch // 2 + ch and cx - cw // 2 <= j < cx - cw // 2 + cw: y[:, i, j] = 0
        if 'flip' in draw and draw['flip'][b]: y = y.flip(-1)
        out[b] = y
    return out


# ---------------------------------------------------------------- the draw
def test_same_generator_seed_same_draw_and_output():
    x = torch.randn(6, 4, 16, 16)
    a, b, c = draw_for(x, 0), draw_for(x, 0), draw_for(x, 1)
    assert set(a) == set(b) == {*COLOR_KEYS, *GEOMETRY}
    for k in a: assert torch.equal(a[k], b[k])
    assert torch.equal(diffaugment(x, a), diffaugment(x, b))
    assert not torch.equal(diffaugment(x, a), diffaugment(x, c))


def test_global_seed_used_without_generator():
    x = torch.randn(6, 3, 8, 8)
    torch.manual_seed(3); a = sample_diffaug(x)
    torch.manual_seed(3); b = sample_diffaug(x)
    for k in a: assert torch.equal(a[k], b[k])


def test_draw_statistics_match_gat():
    d = draw_for(torch.zeros(40_000, 1, 64, 48))
    assert abs(d['color'].float().mean() - COLOR_P) < 0.01 and abs(d['flip'].float().mean() - FLIP_P) < 0.01
    shift = (d['translation'] * torch.tensor([64, 48])).round().long()
    assert shift[:, 0].unique().tolist() == list(range(-8, 9)) and shift[:, 1].unique().tolist() == list(range(-6, 7))
    center = (d['cutout'] * torch.tensor([64, 48])).round().long()
    assert (center.min(0).values.tolist(), center.max(0).values.tolist()) == ([0, 0], [64, 48])


# ---------------------------------------------------------------- geometry
def test_translation_on_hand_made_tensor():
    x = (10 * torch.arange(8)[:, None] + torch.arange(8)).float()[None, None] + 100
    out = diffaugment(x, {'translation': torch.tensor([[-2 / 8, 1 / 8]])})[0, 0]
    assert torch.equal(out[2:, :7], x[0, 0, :6, 1:])            # out[i, j] = x[i - 2, j + 1]
    assert (out[:2] == 0).all() and (out[:, 7] == 0).all()
    assert (out != 0).sum() == 6 * 7


def test_cutout_and_flip_on_hand_made_tensor():
    x = torch.ones(2, 3, 8, 8)
    out = diffaugment(x, {'cutout': torch.tensor([[3 / 8, 6 / 8], [8 / 8, 0.]])})
    assert (out[0, :, 1:5, 4:8] == 0).all() and (out[0] == 0).sum() == 3 * 16
    assert (out[1, :, 6:8, 0:2] == 0).all() and (out[1] == 0).sum() == 3 * 4
    ramp = torch.arange(4.).expand(2, 1, 4, 4)
    flipped = diffaugment(ramp, {'flip': torch.tensor([True, False])})
    assert torch.equal(flipped[0, 0, 0], torch.tensor([3., 2, 1, 0])) and torch.equal(flipped[1], ramp[1])


@pytest.mark.parametrize("shape", [(5, 4, 8, 8), (4, 3, 16, 24), (3, 1, 5, 7), (2, 4, 32, 32)])
def test_matches_loop_reference_on_any_shape(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    for seed in range(3):
        d = draw_for(x, seed)
        torch.testing.assert_close(diffaugment(x, d), reference(x, d))


def test_geometry_of_a_small_draw_scales_to_a_larger_picture():
    lat = torch.randn(16, 4, 8, 8)
    d = keep(draw_for(lat, 2), *GEOMETRY)
    up = lambda t: F.interpolate(t, scale_factor=4, mode='nearest')
    assert torch.equal(up(diffaugment(lat, d)), diffaugment(up(lat), d))


# ---------------------------------------------------------------- reusing a draw
def test_draw_from_one_tensor_uses_its_stored_parameters_on_another():
    final, coarse = torch.randn(8, 4, 8, 8), torch.randn(8, 4, 8, 8)
    d = draw_for(final, 4)
    d_own = draw_for(coarse, 4)                                 # same seed: same coins and factors, coarse's own means
    out = diffaugment(coarse, d)
    expected = diffaugment(coarse, {**d_own, 'saturation_mean': final.mean(1, keepdim=True),
                                    'contrast_mean': final.mean((1, 2, 3), keepdim=True)})
    torch.testing.assert_close(out, expected)
    assert d['color'].any() and not torch.allclose(out, diffaugment(coarse, d_own))
    torch.testing.assert_close(out, reference(coarse, d))


def test_penalty_copy_changes_nothing_inside_the_hole():
    x = torch.randn(8, 4, 16, 16)
    d = draw_for(x, 5)
    delta = diffaugment(x + 0.01 * torch.randn_like(x), d) - diffaugment(x, d)
    hole = diffaugment(torch.ones_like(x), keep(d, *GEOMETRY)) == 0
    assert hole.any() and (delta[hole] == 0).all() and (delta[~hole] != 0).all()


# ---------------------------------------------------------------- gradients
def test_gradcheck_full_policy():
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    d = draw_for(x, 6)
    assert torch.autograd.gradcheck(lambda t: diffaugment(t, d), x.clone().requires_grad_())


def test_gradient_zero_exactly_inside_cutout_and_nonzero_elsewhere():
    x = torch.randn(4, 3, 16, 16, requires_grad=True)
    d = keep(draw_for(x.detach(), 7), 'cutout')
    diffaugment(x, d).square().sum().backward()
    hole = diffaugment(torch.ones_like(x), d) == 0
    assert hole.any() and (x.grad[hole] == 0).all()
    assert x.grad.isfinite().all() and (x.grad[~hole] != 0).all()


def test_colour_means_keep_the_graph_of_the_tensor_they_were_drawn_on():
    final = torch.randn(4, 4, 8, 8, requires_grad=True)
    d = keep(draw_for(final, 8), *COLOR_KEYS)
    d['color'] = torch.ones(4, dtype=torch.bool)
    other = torch.randn(4, 4, 8, 8, requires_grad=True)
    diffaugment(other, d).square().sum().backward()
    assert final.grad is not None and final.grad.abs().sum() > 0 and other.grad.abs().sum() > 0


# ---------------------------------------------------------------- channels, dtypes
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_channels_and_bfloat16(channels):
    x = torch.randn(4, channels, 16, 16)
    d = draw_for(x, 9)
    assert diffaugment(x, d).shape == x.shape
    xb = x.bfloat16()
    out = diffaugment(xb, draw_for(xb, 9))
    assert out.dtype == torch.bfloat16 and out.shape == x.shape


def test_single_channel_saturation_only_scales_brightness():
    x = torch.randn(6, 1, 8, 8)
    d = keep(draw_for(x, 10), *COLOR_KEYS)
    d['color'] = torch.ones(6, dtype=torch.bool)
    b, s, c, m = d['brightness'], d['saturation'], d['contrast'], d['contrast_mean']
    torch.testing.assert_close(diffaugment(x, d), (x + s * b - m) * c + m)


# ---------------------------------------------------------------- bad input
def test_bad_input_messages():
    x = torch.randn(8, 4, 8, 8)
    d = draw_for(x)
    with pytest.raises(ValueError, match=r"batch of 8 .*x has 5 samples"): diffaugment(x[:5], d)
    with pytest.raises(ValueError, match="unknown DiffAugment policy"): sample_diffaug(x, policy=('color', 'zoom'))
    with pytest.raises(ValueError, match="unknown DiffAugment draw keys"): diffaugment(x, {**d, 'zoom': d['flip']})
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"): sample_diffaug(x[0])
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"): diffaugment(x[0], d)
    with pytest.raises(ValueError, match="drop the colour keys"): diffaugment(torch.randn(8, 4, 16, 16), d)

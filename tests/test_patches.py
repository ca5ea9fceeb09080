"Tests for gat_tutorial.patches: patchify order, round trips, patch embeddings and 2-D sin-cos positions."
import numpy as np
import pytest
import torch
from torch import nn

from gat_tutorial.patches import PatchEmbed, patchify, sincos_pos_embed_2d, unpatchify

SHAPES = [((2, 3, 12, 20), 4), ((1, 4, 32, 32), 2), ((3, 1, 8, 16), 8), ((1, 5, 6, 6), 3), ((2, 16, 32, 32), 8)]


def dit_unpatchify(x, p, c):
    "DiT models.py `unpatchify`, verbatim up to argument passing (square grids)."
    h = w = int(x.shape[1] ** 0.5)
    assert h * w == x.shape[1]
    x = x.reshape(shape=(x.shape[0], h, w, p, p, c))
    x = torch.einsum('nhwpqc->nchpwq', x)
    return x.reshape(shape=(x.shape[0], c, h * p, h * p))


def mae_2d_sincos(embed_dim, grid_size):
    "MAE util/pos_embed.py == DiT models.py `get_2d_sincos_pos_embed` (numpy, no cls token)."
    def emb_1d(dim, pos):
        omega = np.arange(dim // 2, dtype=np.float64)
        omega /= dim / 2.
        omega = 1. / 10000**omega
        out = np.einsum('m,d->md', pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.meshgrid(grid_w, grid_h)  # here w goes first
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_size, grid_size])
    emb_h = emb_1d(embed_dim // 2, grid[0])
    emb_w = emb_1d(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


# ---------------------------------------------------------------- patchify / unpatchify

@pytest.mark.parametrize("shape,p", SHAPES)
def test_round_trip_is_exact(shape, p):
    x = torch.randn(shape)
    B, C, H, W = shape
    t = patchify(x, p)
    assert t.shape == (B, (H // p) * (W // p), p * p * C)
    assert torch.equal(unpatchify(t, p, H // p, W // p), x)
    assert torch.equal(patchify(unpatchify(t, p, H // p, W // p), p), t)


def test_token_order_row_major_and_within_token_p_row_p_col_c():
    x = torch.arange(2 * 4 * 6, dtype=torch.float32).reshape(1, 2, 4, 6)   # C=2, H=4, W=6, p=2 -> 2x3 grid
    t = patchify(x, 2)
    # token 4 = grid row 1, column 1: pixels rows 2..3, cols 2..3; inside: (p_row, p_col, C)
    expected = x[0, :, 2:4, 2:4].permute(1, 2, 0).flatten()
    assert torch.equal(t[0, 4], expected)
    assert torch.equal(t[0, 1, :2], x[0, :, 0, 2])   # first entry of token 1 = pixel (0, 2), all channels


@pytest.mark.parametrize("p,c,h", [(2, 4, 16), (4, 3, 5), (8, 1, 2)])
def test_unpatchify_matches_dit(p, c, h):
    x = torch.randn(2, h * h, p * p * c)
    assert torch.equal(unpatchify(x, p, h), dit_unpatchify(x, p, c))


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="not divisible by patch size 4"):
        patchify(torch.randn(1, 4, 32, 30), 4)
    with pytest.raises(ValueError, match="do not fit"):
        unpatchify(torch.randn(1, 256, 16), 2, 15)
    with pytest.raises(ValueError, match="do not fit"):
        unpatchify(torch.randn(1, 4, 10), 2, 2)


# ---------------------------------------------------------------- patch embeddings

@pytest.mark.parametrize("shape,p", SHAPES)
def test_patch_embed_is_linear_on_patchify(shape, p):
    C = shape[1]
    pe = PatchEmbed(C, 24, p)
    lin = nn.Linear(p * p * C, 24)
    with torch.no_grad():
        lin.weight.copy_(pe.proj.weight.permute(0, 2, 3, 1).reshape(24, -1))   # (D, p, p, C) order
        lin.bias.copy_(pe.proj.bias)
    x = torch.randn(shape)
    torch.testing.assert_close(pe(x), lin(patchify(x, p)), atol=1e-5, rtol=1e-5)


def test_patch_embed_matches_timm():
    import timm.layers
    pe = PatchEmbed(16, 32, 2)
    ref = timm.layers.PatchEmbed(img_size=32, patch_size=2, in_chans=16, embed_dim=32)
    ref.proj.load_state_dict(pe.proj.state_dict())
    x = torch.randn(2, 16, 32, 32)
    assert pe(x).shape == (2, 256, 32)
    torch.testing.assert_close(pe(x), ref(x))
    assert isinstance(pe.proj, nn.Conv2d) and pe.proj.kernel_size == pe.proj.stride == (2, 2)


def test_patch_embed_refuses_indivisible_input():
    with pytest.raises(ValueError, match="not divisible"):
        PatchEmbed(4, 8, 4)(torch.randn(1, 4, 32, 30))


# ---------------------------------------------------------------- sin-cos positions
@pytest.mark.parametrize("dim,g", [(8, 4), (384, 16), (1152, 16), (64, 5)])
def test_sincos_matches_mae_dit(dim, g):
    ours = sincos_pos_embed_2d(dim, g)
    assert ours.shape == (g * g, dim) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, torch.from_numpy(mae_2d_sincos(dim, g)).float(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dim,g", [(8, 4), (384, 16)])
def test_sincos_matches_diffusers(dim, g):
    from diffusers.models.embeddings import get_2d_sincos_pos_embed
    ref = get_2d_sincos_pos_embed(dim, g, base_size=g, output_type='pt').float()
    torch.testing.assert_close(sincos_pos_embed_2d(dim, g), ref, atol=1e-6, rtol=0)


def test_sincos_first_half_is_column_second_half_is_row():
    dim, g = 16, 6
    e = sincos_pos_embed_2d(dim, g).reshape(g, g, dim)   # (row, col, dim)
    first, second = e[..., :dim // 2], e[..., dim // 2:]
    assert torch.equal(first, first[:1].expand_as(first))            # same in every row: encodes the column
    assert torch.equal(second, second[:, :1].expand_as(second))      # same in every column: encodes the row
    assert not torch.equal(first, first[:, :1].expand_as(first))
    # each half is [sin, cos] of the index: column 1 -> sin(1), cos(1) in the first channels of the halves
    torch.testing.assert_close(e[0, 1, 0], torch.tensor(np.sin(1.0), dtype=torch.float32))
    torch.testing.assert_close(e[0, 1, dim // 4], torch.tensor(np.cos(1.0), dtype=torch.float32))
    torch.testing.assert_close(e[1, 0, dim // 2], torch.tensor(np.sin(1.0), dtype=torch.float32))


def test_sincos_dot_product_depends_only_on_offset():
    g, dim = 8, 64
    pos = sincos_pos_embed_2d(dim, g).double()
    gram = (pos @ pos.T).reshape(g, g, g, g)
    for dr, dc in [(0, 1), (2, 3), (5, 0), (3, -2)]:
        vals = torch.stack([gram[r, c, r + dr, c + dc] for r in range(g - dr) for c in range(max(0, -dc), g - max(0, dc))])
        torch.testing.assert_close(vals, vals[:1].expand_as(vals), atol=1e-5, rtol=0)
    torch.testing.assert_close(pos.norm(dim=1), torch.full((g * g,), (dim / 2) ** 0.5, dtype=torch.float64))


def test_sincos_bad_width_raises():
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed_2d(30, 4)

"Attention layers: SDPA by hand, 2-D RoPE against timm, GAT attention against timm/EVA (ViTGAN's L2 attention: tests/test_vitgan.py)."
from unittest import mock

import pytest
import timm.layers
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.eva import EvaAttention

from gat_tutorial.attention import Attention, apply_rope, rope_2d


def sdpa_naive(q, k, v, bias=None):
    logits = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    return (logits if bias is None else logits + bias).softmax(-1) @ v


def grid_offsets(h, w):
    "(T, T) id of the offset (query minus key, as Swin) between tokens i and j of an h x w grid, from coordinates."
    rows, cols = torch.arange(h * w) // w, torch.arange(h * w) % w
    dy, dx = rows[:, None] - rows[None] + h - 1, cols[:, None] - cols[None] + w - 1
    return dy * (2 * w - 1) + dx


@pytest.mark.parametrize("with_bias", [False, True])
def test_naive_sdpa_matches_torch_outputs_and_grads(with_bias):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 16, requires_grad=True) for _ in range(3))
    bias, probe = (torch.randn(3, 9, 9) if with_bias else None), torch.randn(2, 3, 9, 16)
    results = []
    for attn in (sdpa_naive, lambda q, k, v, b: F.scaled_dot_product_attention(q, k, v, attn_mask=b)):
        out = attn(q, k, v, bias)
        results.append((out, *torch.autograd.grad((out * probe).sum(), (q, k, v))))
    for ours, ref in zip(*results):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_rope_keeps_norms_and_rotates_rows_then_columns():
    h, w, d = 5, 7, 16
    cos, sin = rope_2d(d, h, w)
    assert cos.shape == sin.shape == (h * w, d)
    x = torch.randn(2, 3, h * w, d)
    rot = apply_rope(x, cos, sin)
    torch.testing.assert_close(rot.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(rot[..., :w, : d // 2], x[..., :w, : d // 2])  # row 0: row half unturned
    torch.testing.assert_close(rot[..., ::w, d // 2 :], x[..., ::w, d // 2 :])  # column 0: column half unturned
    assert not torch.allclose(rot[..., w:, : d // 2], x[..., w:, : d // 2])


def test_rope_scores_depend_only_on_the_2d_offset():
    torch.manual_seed(0)
    h, w, d = 6, 9, 32
    cos, sin = rope_2d(d, h, w)
    q, k = torch.randn(2, 5, 1, d)
    scores = apply_rope(q.expand(5, h * w, d), cos, sin) @ apply_rope(k.expand(5, h * w, d), cos, sin).mT
    offset = grid_offsets(h, w)
    one_per_offset = scores.new_zeros(5, (2 * h - 1) * (2 * w - 1))
    one_per_offset[:, offset] = scores
    torch.testing.assert_close(one_per_offset[:, offset], scores, atol=1e-4, rtol=0)


def test_rope_is_timm_eva_convention():
    h, w, d = 4, 6, 24
    cos, sin = rope_2d(d, h, w)
    sin_t, cos_t = timm.layers.build_rotary_pos_embed([h, w], dim=d, in_pixels=False, temperature=10_000)
    torch.testing.assert_close(cos, cos_t)
    torch.testing.assert_close(sin, sin_t)
    x = torch.randn(2, 3, h * w, d)
    torch.testing.assert_close(apply_rope(x, cos, sin), timm.layers.apply_rot_embed(x, sin_t, cos_t))


def test_rope_keeps_low_precision_dtype():
    cos, sin = rope_2d(16, 4, 4)
    assert apply_rope(torch.randn(1, 2, 16, 16, dtype=torch.bfloat16), cos, sin).dtype == torch.bfloat16


def test_rope_rejects_head_dim_not_divisible_by_4():
    with pytest.raises(ValueError, match="divisible by 4"):
        rope_2d(6, 4, 4)


def test_attention_equals_timm_vit_attention():
    torch.manual_seed(0)
    ours, ref = Attention(48, 3), timm.layers.Attention(48, 3, qkv_bias=True)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 11, 48)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=0)


def test_attention_equals_timm_eva_attention_with_qk_norm_rope_and_cls():
    torch.manual_seed(0)
    ours = Attention(64, 2, qk_norm=True, num_prefix_tokens=1)
    for norm in (ours.q_norm, ours.k_norm):
        assert isinstance(norm, nn.RMSNorm) and norm.eps is None
        nn.init.normal_(norm.weight, 1.0, 0.2)
    eva = EvaAttention(64, 2, qkv_bias=True, num_prefix_tokens=1, qk_norm=True, norm_layer=nn.RMSNorm,
                       scale_norm=False)
    q_bias, k_bias, v_bias = ours.qkv.bias.detach().chunk(3)
    weights = {n: p for n, p in ours.state_dict().items() if n != "qkv.bias"}
    eva.load_state_dict({**weights, "q_bias": q_bias, "v_bias": v_bias})
    eva.k_bias.copy_(k_bias)
    cos, sin = rope_2d(32, 3, 5)
    x = torch.randn(2, 1 + 15, 64)
    torch.testing.assert_close(ours(x, rope=(cos, sin)), eva(x, rope=torch.cat([sin, cos], -1)), atol=1e-5, rtol=0)


def test_prefix_tokens_reach_sdpa_unrotated():
    torch.manual_seed(0)
    attn = Attention(32, 2, qk_norm=True, num_prefix_tokens=2)
    x, rope = torch.randn(1, 2 + 12, 32), rope_2d(16, 3, 4)
    seen = {}
    for key, r in (("plain", None), ("rope", rope)):
        with mock.patch.object(F, "scaled_dot_product_attention", wraps=F.scaled_dot_product_attention) as spy:
            attn(x, rope=r)
        seen[key] = spy.call_args.args[:2]  # q, k
    for plain, rotated in zip(seen["plain"], seen["rope"]):
        torch.testing.assert_close(rotated[:, :, :2], plain[:, :, :2], atol=0, rtol=0)
        assert not torch.allclose(rotated[:, :, 2:], plain[:, :, 2:])


def test_attention_rejects_bad_shapes():
    with pytest.raises(ValueError, match="not divisible"):
        Attention(64, 5)
    with pytest.raises(RuntimeError):
        Attention(64, 4)(torch.randn(1, 16, 64), rope=rope_2d(16, 4, 5))

"Generator of lesson 13 and `load_official_gat`: official key layout, an independent re-implementation of the released forward, refusals."
from pathlib import Path
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gat_tutorial.discriminator import Discriminator
from gat_tutorial.generator import Generator, load_official_gat, update_class_means

ROOT = Path(__file__).resolve().parents[1]
KEYS_FILE = ROOT / "data/gat_official_keys.txt"  # state dicts of the released GAT-S/2 (hse1032/GAT)


# ------------------------------------------------ the released code's state dicts, written from its layout
def official_generator_shapes(depth=12, C=384, heads=6, p=2, c_lat=4, grid=16, classes=1000, z=64):
    "Key -> shape of hse1032/GAT models/generator.py::GAT (GAT-S/2 by default), in its state-dict order."
    H, d = 8 * C // 3, C // heads
    s = {"pos_embed": (1, grid * grid, C), "w_avg": (classes, C), "x_embedder.proj.weight": (C, c_lat, p, p),
         "x_embedder.proj.bias": (C,), "y_embedder.embedding_table.weight": (classes, z),
         "feat_rope.freqs_cos": (grid * grid, d), "feat_rope.freqs_sin": (grid * grid, d),
         "latent_embedder.0.weight": (C, 2 * z), "latent_embedder.0.bias": (C,),
         "latent_embedder.2.weight": (C, C), "latent_embedder.2.bias": (C,)}
    for i in range(depth):
        s |= {f"blocks.{i}.{k}": v for k, v in _block_shapes(C, H, d).items()}
        s |= {f"blocks.{i}.adaLN_modulation.1.weight": (4 * C, C), f"blocks.{i}.adaLN_modulation.1.bias": (4 * C,)}
    for k in range(4):
        s |= {f"final_layers.{k}.linear.weight": (p * p * c_lat, C), f"final_layers.{k}.linear.bias": (p * p * c_lat,),
              f"final_layers.{k}.adaLN_modulation.1.weight": (C, C), f"final_layers.{k}.adaLN_modulation.1.bias": (C,)}
    return s


def official_discriminator_shapes(depth=12, C=384, heads=6, p=2, c_in=16, grid=16, classes=1000, cmap=2048, repa=(2048, 768)):
    "Key -> shape of hse1032/GAT models/discriminator.py::GATD (GAT-S/2 by default), in its state-dict order."
    H, d = 8 * C // 3, C // heads
    s = {"pos_embed": (1, grid * grid, C), "cls_token": (1, 1, C), "x_embedder.proj.weight": (C, c_in, p, p),
         "x_embedder.proj.bias": (C,), "y_embedder.embedding_table.weight": (classes, cmap),
         "y_embedder.latent_embedder.0.weight": (cmap, cmap), "y_embedder.latent_embedder.0.bias": (cmap,),
         "y_embedder.latent_embedder.2.weight": (cmap, cmap), "y_embedder.latent_embedder.2.bias": (cmap,)}
    for i in range(depth):
        s |= {f"blocks.{i}.ls_attn": (C,), f"blocks.{i}.ls_mlp": (C,), f"blocks.{i}.norm1.weight": (C,)}
        blk = _block_shapes(C, H, d)
        s |= {f"blocks.{i}.{k}": v for k, v in blk.items() if k.startswith("attn.")}
        s |= {f"blocks.{i}.norm2.weight": (C,)}
        s |= {f"blocks.{i}.{k}": v for k, v in blk.items() if k.startswith("mlp.")}
    s |= {"final_layer.0.weight": (C,), "final_layer.1.weight": (cmap, C), "final_layer.1.bias": (cmap,)}
    hidden, out = repa
    s |= {"proj.0.weight": (hidden, C), "proj.0.bias": (hidden,), "proj.2.weight": (hidden, hidden),
          "proj.2.bias": (hidden,), "proj.4.weight": (out, hidden), "proj.4.bias": (out,)}
    return s | {"feat_rope.freqs_cos": (grid * grid, d), "feat_rope.freqs_sin": (grid * grid, d)}


def _block_shapes(C, H, d):
    return {"attn.qkv.weight": (3 * C, C), "attn.qkv.bias": (3 * C,), "attn.q_norm.weight": (d,),
            "attn.k_norm.weight": (d,), "attn.proj.weight": (C, C), "attn.proj.bias": (C,),
            "mlp.w12.weight": (2 * H, C), "mlp.w12.bias": (2 * H,), "mlp.w3.weight": (C, H), "mlp.w3.bias": (C,)}


def read_keys_file(section):
    "Key -> shape of one section ('generator' or 'discriminator') of the released code's key list."
    out, on = {}, False
    for line in KEYS_FILE.read_text().splitlines():
        if line.startswith("# GAT-S/2"): on = section in line
        elif on and line and not line.startswith("#"):
            key, shape = line.split("\t")[:2]
            out[key] = tuple(int(v) for v in shape.strip("()").split(",") if v.strip())
    return out


@pytest.mark.parametrize("section, shapes", [("generator", official_generator_shapes), ("discriminator", official_discriminator_shapes)])
def test_layout_matches_the_released_key_list(section, shapes):
    expected = read_keys_file(section)
    assert len(expected) == {"generator": 171, "discriminator": 188}[section]
    assert list(shapes().items()) == list(expected.items())


# ------------------------------------------------ fixed tables, written as the released code computes them
def mae_pos_embed(C, g):
    "MAE / released get_2d_sincos_pos_embed in numpy: first half of the channels from meshgrid(w, h)[0], i.e. the column."
    grid = np.stack(np.meshgrid(np.arange(g, dtype=np.float32), np.arange(g, dtype=np.float32)))
    def one_d(D, pos):
        omega = 1.0 / 10000 ** (np.arange(D // 2, dtype=np.float64) / (D / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    emb = np.concatenate([one_d(C // 2, grid[0]), one_d(C // 2, grid[1])], axis=1)
    return torch.from_numpy(emb).float()[None]                                  # (1, T, C)


def eva_rope(head_dim, g):
    "EVA-02 VisionRotaryEmbeddingFast(dim=head_dim/2, pt_seq_len=g) buffers: first half turns with the row."
    dim = head_dim // 2
    freqs = 1.0 / (10000 ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    f = torch.einsum("t,f->tf", torch.arange(g).float(), freqs).repeat_interleave(2, -1)  # (g, dim)
    f = torch.cat([f[:, None].expand(g, g, dim), f[None, :].expand(g, g, dim)], -1).reshape(g * g, 2 * dim)
    return f.cos(), f.sin()


def synthetic_state_dict(shapes, seed=0):
    "Random weights of reasonable scale for every key; the fixed tables as the released code computes them."
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in shapes.items():
        x = torch.randn(shape, generator=gen)
        if len(shape) >= 2: x = x / math.sqrt(math.prod(shape[1:]))         # fan-in scale
        else: x = 0.1 * x + (1.0 if k.endswith("norm.weight") or ".norm" in k or k.startswith("final_layer.0") else 0.0)
        if "latent_embedder" in k: x = x * 100                                  # EqualLinear: stored at 1/lr_mul
        sd[k] = x
    C, T = shapes["pos_embed"][2], shapes["pos_embed"][1]
    sd["pos_embed"] = mae_pos_embed(C, int(T ** 0.5))
    sd["feat_rope.freqs_cos"], sd["feat_rope.freqs_sin"] = eva_rope(shapes["feat_rope.freqs_cos"][1], int(T ** 0.5))
    return sd


# ------------------------------------------------ the released forward, re-implemented from its semantics
def _eq(sd, pre, x): return F.linear(x, sd[pre + ".weight"] * 0.01, sd[pre + ".bias"] * 0.01)
def _lin(sd, pre, x): return F.linear(x, sd[pre + ".weight"], sd[pre + ".bias"])


def _rotate_half(t):
    x1, x2 = t.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([-x2, x1], -1).flatten(-2)


def _attn(sd, pre, x, heads, n_prefix=0):
    B, T, C = x.shape
    q, k, v = _lin(sd, pre + "qkv", x).reshape(B, T, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    q = F.rms_norm(q, (C // heads,), sd[pre + "q_norm.weight"])
    k = F.rms_norm(k, (C // heads,), sd[pre + "k_norm.weight"])
    cos, sin = sd["feat_rope.freqs_cos"], sd["feat_rope.freqs_sin"]
    rope = lambda t: torch.cat([t[:, :, :n_prefix], t[:, :, n_prefix:] * cos + _rotate_half(t[:, :, n_prefix:]) * sin], 2)
    q, k = rope(q), rope(k)
    a = ((q * (C // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1) @ v
    return _lin(sd, pre + "proj", a.transpose(1, 2).reshape(B, T, C))


def _swiglu(sd, pre, x):
    a, b = _lin(sd, pre + "w12", x).chunk(2, -1)
    return _lin(sd, pre + "w3", F.silu(a) * b)


def official_generator_forward(sd, z, y, heads, psi=0.0):
    "The four cumulative latents of the released GAT.forward(x, y, z, truncation_psi=psi, multiscale=True)."
    n = lambda v: v * (v.square().mean(1, keepdim=True) + 1e-8).rsqrt()
    c = torch.cat([n(sd["y_embedder.embedding_table.weight"][y]), n(z)], 1)
    c = _eq(sd, "latent_embedder.2", F.silu(_eq(sd, "latent_embedder.0", c)))
    if psi != 0: c = c.lerp(sd["w_avg"][y], psi)
    x = sd["pos_embed"].expand(len(z), -1, -1)
    B, T, C = x.shape
    depth = len([k for k in sd if k.endswith("attn.qkv.weight")])
    p = sd["x_embedder.proj.weight"].shape[-1]
    g = int(T ** 0.5)
    rgb, rgbs = 0, []
    for i in range(depth):
        s_a, g_a, s_m, g_m = _lin(sd, f"blocks.{i}.adaLN_modulation.1", F.silu(c)).chunk(4, 1)
        x = x + g_a[:, None] * _attn(sd, f"blocks.{i}.attn.", F.rms_norm(x, (C,), eps=1e-6) * (1 + s_a[:, None]), heads)
        x = x + g_m[:, None] * _swiglu(sd, f"blocks.{i}.mlp.", F.rms_norm(x, (C,), eps=1e-6) * (1 + s_m[:, None]))
        if (i + 1) % (depth // 4) == 0:
            k = (i + 1) // (depth // 4) - 1
            scale = _lin(sd, f"final_layers.{k}.adaLN_modulation.1", F.silu(c))
            out = _lin(sd, f"final_layers.{k}.linear", F.rms_norm(x, (C,), eps=1e-6) * (1 + scale[:, None]))
            out = torch.einsum("nhwpqc->nchpwq", out.reshape(B, g, g, p, p, -1)).reshape(B, -1, g * p, g * p)
            rgb = rgb + out
            rgbs.append(rgb)
    return rgbs


def official_discriminator_forward(sd, x, y, heads):
    "Logits (B,) and REPA features (cls, patches) of the released GATD.forward(list(x_levels), y, return_aux=True)."
    e = _eq(sd, "y_embedder.latent_embedder.2", F.silu(_eq(sd, "y_embedder.latent_embedder.0", sd["y_embedder.embedding_table.weight"][y])))
    W = sd["x_embedder.proj.weight"]
    h = F.conv2d(x, W, sd["x_embedder.proj.bias"], stride=W.shape[-1]).flatten(2).transpose(1, 2) + sd["pos_embed"]
    h = torch.cat([sd["cls_token"].expand(len(x), -1, -1), h], 1)
    C = h.shape[-1]
    depth = len([k for k in sd if k.endswith("attn.qkv.weight")])
    for i in range(depth):
        b = f"blocks.{i}."
        h = h + _attn(sd, b + "attn.", F.rms_norm(h, (C,), sd[b + "norm1.weight"], 1e-6), heads, n_prefix=1) * sd[b + "ls_attn"]
        h = h + _swiglu(sd, b + "mlp.", F.rms_norm(h, (C,), sd[b + "norm2.weight"], 1e-6)) * sd[b + "ls_mlp"]
    cls = h[:, 0]
    logit = (_lin(sd, "final_layer.1", F.rms_norm(cls, (C,), sd["final_layer.0.weight"], 1e-6)) * e).sum(-1)
    proj = lambda t: _lin(sd, "proj.4", F.silu(_lin(sd, "proj.2", F.silu(_lin(sd, "proj.0", t)))))
    return logit, proj(cls), proj(h[:, 1:])


# ------------------------------------------------ loading
@pytest.fixture(scope="module")
def official_g():
    return synthetic_state_dict(official_generator_shapes())


def test_load_official_generator_infers_gat_s2(official_g):
    G = load_official_gat(official_g)
    assert isinstance(G, Generator)
    assert (len(G.blocks), G.pos_embed.shape[1], G.blocks[0].attn.num_heads) == (12, 384, 6)
    assert (G.patch_size, G.grid, G.latent_channels, G.num_classes, G.z_dim, G.mng_levels) == (2, 16, 4, 1000, 64, 4)
    torch.testing.assert_close(G.w_avg, official_g["w_avg"])
    torch.testing.assert_close(G.mapping.mlp[0].weight, official_g["latent_embedder.0.weight"])  # 1/lr_mul scale on both sides


def test_loaded_generator_computes_the_released_forward(official_g):
    G = load_official_gat(official_g)
    torch.manual_seed(1)
    z, y = torch.randn(2, 64), torch.tensor([3, 999])
    for psi in (0.0, 0.3):
        with torch.no_grad():
            ours, ref = G(z, y, psi=psi), official_generator_forward(official_g, z, y, heads=6, psi=psi)
        assert len(ours) == len(ref) == 4
        for a, b in zip(ours, ref): torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        assert ref[-1].std() > 0.1 and not torch.allclose(ref[0], ref[-1])


def test_official_loader_refuses_unknown_and_missing_keys(official_g):
    with pytest.raises(ValueError, match=r"blocks\.3\.attn\.extra_scale"):
        load_official_gat(official_g | {"blocks.3.attn.extra_scale": torch.ones(1)})
    missing = {k: v for k, v in official_g.items() if k != "blocks.7.mlp.w3.bias"}
    with pytest.raises(ValueError, match=r"missing.*blocks\.7\.mlp\.w3\.bias"):
        load_official_gat(missing)


def test_official_loader_refuses_other_tables_and_shapes(official_g):
    with pytest.raises(ValueError, match="pos_embed"):
        load_official_gat(official_g | {"pos_embed": official_g["pos_embed"] + 0.01})
    with pytest.raises(ValueError, match="feat_rope.freqs_sin"):
        load_official_gat(official_g | {"feat_rope.freqs_sin": -official_g["feat_rope.freqs_sin"]})
    with pytest.raises(ValueError, match=r"final_layers\.2\.linear\.bias"):
        load_official_gat(official_g | {"final_layers.2.linear.bias": torch.zeros(15)})
    with pytest.raises(ValueError, match="x_embedder.proj.weight"):
        load_official_gat({k: v for k, v in official_g.items() if not k.startswith("x_embedder")})
    with pytest.raises(ValueError, match="not a GAT state dict"):
        load_official_gat({"weight": torch.ones(3)})


def test_official_loader_keeps_the_noise_embedding_out(official_g):
    G = load_official_gat(official_g)
    assert not any("x_embedder" in k or "feat_rope" in k for k in G.state_dict())
    trainable = sum(p.numel() for p in G.parameters())
    dead = official_g["x_embedder.proj.weight"].numel() + official_g["x_embedder.proj.bias"].numel()
    official_trainable = sum(v.numel() for k, v in official_g.items() if k not in ("pos_embed", "w_avg") and not k.startswith("feat_rope"))
    assert trainable == official_trainable - dead


@pytest.fixture(scope="module")
def official_d():
    return synthetic_state_dict(official_discriminator_shapes())


def test_loaded_discriminator_computes_the_released_forward(official_d):
    D = load_official_gat(official_d)
    assert isinstance(D, Discriminator) and len(D.blocks) == 12 and D.x_embedder.proj.in_channels == 16
    torch.manual_seed(2)
    x, y = torch.randn(2, 16, 32, 32), torch.tensor([0, 512])                 # the 4 MNG levels on channels
    with torch.no_grad():
        logits, (cls, patches) = D(x, y, return_repa=True)
        ref_logits, ref_cls, ref_patches = official_discriminator_forward(official_d, x, y, heads=6)
    torch.testing.assert_close(logits, ref_logits, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(cls, ref_cls, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(patches, ref_patches, atol=1e-4, rtol=1e-4)
    assert patches.shape == (2, 256, 768) and ref_logits.abs().max() > 1e-2


def test_official_loader_refuses_unknown_and_missing_discriminator_keys(official_d):
    with pytest.raises(ValueError, match=r"unknown keys head\.weight"):
        load_official_gat(official_d | {"head.weight": torch.ones(3)})
    with pytest.raises(ValueError, match=r"missing keys blocks\.11\.ls_mlp"):
        load_official_gat({k: v for k, v in official_d.items() if k != "blocks.11.ls_mlp"})
    with pytest.raises(ValueError, match="pos_embed"):
        load_official_gat(official_d | {"pos_embed": official_d["pos_embed"].flip(1)})


def test_official_discriminator_without_repa_projector(official_d):
    D = load_official_gat({k: v for k, v in official_d.items() if not k.startswith("proj.")})
    assert D.proj is None


# ------------------------------------------------ generator behaviour
def tiny(**kw):
    torch.manual_seed(0)
    return Generator.from_size("GAT-T/2", num_classes=10, latent_size=8, **kw)


def test_each_level_depends_only_on_its_blocks():
    G = tiny(depth=8)                                                           # heads after blocks 2, 4, 6, 8
    z, y = torch.randn(3, 64), torch.tensor([0, 4, 9])
    with torch.no_grad():
        before = G(z, y)
        G.blocks[4].mlp.w3.bias.add_(1.0)                                       # block 5: feeds levels 3 and 4 only
        after = G(z, y)
    for k in (0, 1): torch.testing.assert_close(before[k], after[k])
    for k in (2, 3): assert not torch.allclose(before[k], after[k], atol=1e-3)


def test_w_avg_update_is_per_class_and_uses_the_truncated_w():
    G = tiny()
    G.w_avg.normal_()
    w_avg0 = G.w_avg.clone()
    z, y = torch.randn(5, 64), torch.tensor([2, 2, 2, 7, 2])
    with torch.no_grad():
        w = G.mapping(z, y).lerp(w_avg0[y], 0.3)
        G(z, y, psi=0.3, update_w_avg=True)
    torch.testing.assert_close(G.w_avg[2], w_avg0[2].lerp(w[y == 2].mean(0), 0.005))
    torch.testing.assert_close(G.w_avg[7], w_avg0[7].lerp(w[3], 0.005))
    mask = torch.ones(10, dtype=torch.bool); mask[[2, 7]] = False
    assert torch.equal(G.w_avg[mask], w_avg0[mask])
    G.w_avg.copy_(w_avg0)
    with torch.no_grad(): G(z, y)                                               # no update unless asked
    assert torch.equal(G.w_avg, w_avg0)


def test_update_class_means_matches_the_released_loop():
    torch.manual_seed(0)
    w_avg, w, y = torch.randn(50, 16), torch.randn(200, 16), torch.randint(0, 40, (200,))
    ref = w_avg.clone()
    for label in y.unique():                                                    # hse1032/GAT generator.py
        ref[label].copy_(w[y == label].mean(0).lerp(ref[label], 0.995))
    torch.testing.assert_close(update_class_means(w_avg.clone(), w, y), ref)
    assert update_class_means(w_avg.clone(), w.bfloat16(), y).dtype == torch.float32


def test_grad_checkpointing_gives_the_same_gradients():
    def grads(flag):
        G = tiny(grad_checkpointing=flag)
        torch.manual_seed(1)
        loss = sum(x.pow(2).mean() for x in G(torch.randn(4, 64), torch.tensor([1, 2, 3, 1])))
        loss.backward()
        return {n: p.grad.clone() for n, p in G.named_parameters()}
    a, b = grads(False), grads(True)
    assert a.keys() == b.keys()
    for n in a: torch.testing.assert_close(a[n], b[n], atol=1e-6, rtol=1e-5)


def test_init_follows_the_released_code():
    G = Generator.from_size("GAT-S/2")
    blk, head = G.blocks[0], G.output_heads[0]
    for lin in (blk.attn.qkv, blk.attn.proj, blk.mlp.w12, blk.mlp.w3, head.linear):
        bound = math.sqrt(6 / sum(lin.weight.shape))
        assert 0.95 * bound < lin.weight.abs().max() <= bound and not lin.bias.any()
    for lin in (blk.modulation.linear, head.modulation.linear):
        bound = 0.1 * math.sqrt(6 / sum(lin.weight.shape))
        assert 0.95 * bound < lin.weight.abs().max() <= bound and not lin.bias.any()
    assert abs(G.mapping.class_embed.weight.std().item() - 0.02) < 0.001
    eff = G.mapping.mlp[0].weight * 0.01
    assert eff.abs().max() <= math.sqrt(6 / (128 + 384))
    torch.testing.assert_close(G.pos_embed[None], mae_pos_embed(384, 16))
    cos, sin = eva_rope(64, 16)
    torch.testing.assert_close(G.rope_cos, cos, atol=1e-4, rtol=0); torch.testing.assert_close(G.rope_sin, sin, atol=1e-4, rtol=0)
    assert not G.w_avg.any()


def test_state_dict_round_trip_and_buffers():
    G, H = tiny(), Generator.from_size("GAT-T/2", num_classes=10, latent_size=8)
    G.w_avg.normal_()
    keys = set(G.state_dict())
    assert "w_avg" in keys and not {"pos_embed", "rope_cos", "rope_sin"} & keys
    H.load_state_dict(G.state_dict())
    z, y = torch.randn(2, 64), torch.tensor([1, 2])
    with torch.no_grad(): torch.testing.assert_close(G(z, y, psi=0.4)[-1], H(z, y, psi=0.4)[-1])


@pytest.mark.parametrize("kw", [{}, dict(psi=0.3, guidance_scale=1.5, update_w_avg=True)])
def test_bf16_autocast_forward(kw):
    G = tiny()
    G.w_avg.normal_()
    z, y = torch.randn(2, 64), torch.tensor([1, 2])
    with torch.no_grad(): ref = G(z, y, **(kw | dict(update_w_avg=False)))[-1]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = G(z, y, **kw)[-1]
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all() and G.w_avg.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.1)


def test_bad_inputs_are_refused():
    G = tiny()
    with pytest.raises(ValueError, match="z_dim=64"): G(torch.randn(2, 63), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="MNG levels"): Generator(4, 32, 2, depth=5, width=64, heads=4)
    with pytest.raises(ValueError, match="not divisible"): Generator(4, 30, 4, depth=4, width=64, heads=4)
    with pytest.raises(ValueError, match="GAT-XL/2"): Generator.from_size("GAT-XXL/2")

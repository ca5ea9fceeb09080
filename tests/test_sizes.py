"The size table on the meta device (no memory, no compute): GAT-XL/2's 602M, FLOPs of every size, shapes of G into D."
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from gat_tutorial.discriminator import Discriminator, parse_size, size_names
from gat_tutorial.generator import Generator

PAPER_XL2_PARAMS = 602e6      # GAT paper: GAT-XL/2 generator
SPEC_XL2_PARAMS = 601.94e6    # the released code's count without its dead noise embedding
DIT_XL2_GFLOPS = 119          # DiT-XL/2, quoted for GAT-XL/2 (multiply-adds)
LATENT = dict(num_classes=1000, latent_channels=4, latent_size=32)  # ImageNet 256 in SD-VAE latents


def meta_generator(name, **kw):
    with torch.device("meta"): return Generator.from_size(name, **(LATENT | kw))


def inputs(G, batch=1):
    return torch.zeros(batch, G.z_dim, device="meta"), torch.zeros(batch, dtype=torch.long, device="meta")


def generator_flops(G):
    with FlopCounterMode(display=False) as counter: G(*inputs(G))
    return counter.get_total_flops()


def expected_macs(name, num_classes=1000, c_lat=4, latent=32, z_dim=64, levels=4):
    "Multiply-adds of one generator forward at batch 1, from the architecture: mapping, blocks, heads."
    size, p = parse_size(name)
    C, H, T = size.width, 8 * size.width // 3, (latent // p) ** 2
    mapping = 2 * z_dim * C + C * C
    block = 4 * C * C + T * (3 * C * C + C * C + 2 * H * C + H * C) + 2 * T * T * C  # modulation, qkv, proj, SwiGLU, QK^T and AV
    head = C * C + T * C * p * p * c_lat
    return mapping + size.depth * block + levels * head


def expected_params(name, num_classes=1000, c_lat=4, z_dim=64, levels=4):
    "Trainable parameters of a generator, from the architecture: mapping, blocks, heads."
    size, p = parse_size(name)
    C, H, d = size.width, 8 * size.width // 3, size.width // size.heads
    mapping = num_classes * z_dim + (2 * z_dim * C + C) + (C * C + C)
    attn = (3 * C * C + 3 * C) + 2 * d + (C * C + C)                            # qkv, q/k norm gains, proj
    block = attn + (2 * H * C + 2 * H) + (H * C + C) + (4 * C * C + 4 * C)     # + SwiGLU w12, w3, modulation
    head = (C * C + C) + (C * p * p * c_lat + p * p * c_lat)                    # modulation, linear
    return mapping + size.depth * block + levels * head


@pytest.mark.parametrize("name", size_names())
def test_parameter_count_of_every_size(name):
    G = meta_generator(name)
    assert sum(p.numel() for p in G.parameters() if p.requires_grad) == expected_params(name)


def test_xl2_generator_has_602m_trainable_parameters():
    G = meta_generator("GAT-XL/2")
    n = sum(p.numel() for p in G.parameters() if p.requires_grad)
    assert abs(n - PAPER_XL2_PARAMS) < 0.5e6
    assert abs(n - SPEC_XL2_PARAMS) < 0.01e6
    assert all(b.numel() == 0 or name in ("pos_embed", "rope_cos", "rope_sin", "w_avg") for name, b in G.named_buffers())


def test_xl2_flops_are_twice_dits_published_macs():
    fl = generator_flops(meta_generator("GAT-XL/2"))
    assert abs(fl / 2e9 / DIT_XL2_GFLOPS - 1) < 0.02


@pytest.mark.parametrize("name", size_names())
def test_flop_counter_equals_twice_the_multiply_adds(name):
    assert generator_flops(meta_generator(name)) == 2 * expected_macs(name)


@pytest.mark.parametrize("name", size_names())
def test_shapes_of_every_size_from_g_into_d(name):
    G = meta_generator(name)
    levels = G(*inputs(G, batch=3))
    assert len(levels) == G.mng_levels == 4
    assert all(x.shape == (3, 4, 32, 32) for x in levels)
    with torch.device("meta"): D = Discriminator.from_size(name, mng_levels=G.mng_levels, **LATENT)
    logits = D(torch.cat(levels, 1), torch.zeros(3, dtype=torch.long, device="meta"))
    assert logits.shape == (3,)


@pytest.mark.parametrize("name", ["GAT-S/4", "GAT-B/8"])
def test_sizes_follow_the_table(name):
    size, p = parse_size(name)
    G = meta_generator(name)
    assert (len(G.blocks), G.blocks[0].attn.num_heads, G.patch_size, G.grid) == (size.depth, size.heads, p, 32 // p)
    assert G.output_heads[0].linear.out_features == p * p * 4 and G.w_avg.shape == (1000, size.width)

"The discriminator against the released code's state dict, its shapes for every size (on the meta device), its init, RoPE and checkpointing."
import math
import re
from pathlib import Path

import pytest
import torch

from gat_tutorial.attention import apply_rope
from gat_tutorial.discriminator import Discriminator, parse_size, size_names

KEYS = Path(__file__).resolve().parents[1] / "data" / "gat_official_keys.txt"  # state dicts of the released GAT-S/2 (hse1032/GAT)


def official_params(section):
    "Trainable {key: shape} of the released GAT-S/2 generator or discriminator."
    part = next(p for p in KEYS.read_text().split("# GAT-S/2 ") if p.startswith(section))
    rows = [l.split("\t") for l in part.splitlines()[1:] if l and not l.startswith("#")]
    return {k: tuple(int(n) for n in re.findall(r"\d+", shape)) for k, shape, _, kind in rows if kind == "param"}


def tiny(**kw):
    "A GAT-T/2 D on 4 x 8 x 8 latents with 10 classes."
    return Discriminator.from_size("GAT-T/2", **(dict(num_classes=10, latent_channels=4, latent_size=8) | kw))


def test_s2_matches_the_released_discriminator_key_for_key():
    with torch.device("meta"): D = Discriminator.from_size("GAT-S/2")
    ours = {re.sub(r"\.ls_(attn|mlp)\.gamma$", r".ls_\1", k): tuple(p.shape) for k, p in D.named_parameters()}
    assert ours == official_params("discriminator")


def test_s2_parameter_count_equals_the_released_count():
    "Sum of the products of the shapes of the file's trainable rows (the frozen pos_embed excluded)."
    with torch.device("meta"): D = Discriminator.from_size("GAT-S/2")
    expected = sum(math.prod(shape) for shape in official_params("discriminator").values())
    assert sum(p.numel() for p in D.parameters() if p.requires_grad) == expected == 39_114_624


@pytest.mark.parametrize("name", size_names())
def test_one_logit_per_sample_for_every_size(name):
    with torch.device("meta"):
        D = Discriminator.from_size(name)
        x, y = torch.empty(2, 16, 32, 32), torch.zeros(2, dtype=torch.long)
        logits, (cls, patches) = D(x, y, return_repa=True)
    size, p = parse_size(name)
    assert logits.shape == (2,) and cls.shape == (2, 768) and patches.shape == (2, (32 // p) ** 2, 768)
    assert len(D.blocks) == size.depth and D.cls_token.shape[-1] == size.width
    assert D.blocks[0].attn.num_heads == size.heads and D.x_embedder.proj.kernel_size == (p, p)


def test_cls_token_is_not_rotated_and_spatial_tokens_start_at_position_0():
    torch.manual_seed(0)
    D = tiny(repa_dim=0)
    attn, rope = D.blocks[0].attn, (D.rope_cos, D.rope_sin)
    q = torch.randn(1, attn.num_heads, 1 + 16, 32)
    rotated = attn._rotate(q, rope)
    assert torch.equal(rotated[:, :, 0], q[:, :, 0])
    torch.testing.assert_close(rotated[:, :, 1:], apply_rope(q[:, :, 1:], *rope))
    assert not torch.allclose(rotated[:, :, 2:], q[:, :, 2:])


def test_class_conditioning_and_unconditional_head():
    torch.manual_seed(0)
    D, x = tiny(cond_dim=64, repa_dim=0), torch.randn(4, 16, 8, 8)
    y = torch.tensor([0, 1, 2, 3])
    assert not torch.allclose(D(x, y), D(x, (y + 5) % 10))
    y2 = y.clone(); y2[0] = 9                                                   # one sample's label: only its logit moves
    changed = D(x, y2) != D(x, y)
    assert changed[0] and not changed[1:].any()
    U = tiny(num_classes=0, repa_dim=0)
    assert U.y_embedder is None and U.final_layer[1].out_features == 1 and U(x).shape == (4,)


def test_init_follows_the_released_code():
    torch.manual_seed(0)
    D = tiny(num_classes=1000, cond_dim=2048, repa_dim=0)
    linears = [m for m in D.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert all(torch.count_nonzero(m.bias) == 0 for m in linears)
    w = D.blocks[0].attn.qkv.weight
    assert abs(w.abs().max().item() - math.sqrt(6 / sum(w.shape))) < 1e-3     # xavier-uniform bound
    assert abs(D.y_embedder.embedding_table.weight.std().item() - 0.02) < 1e-3
    assert abs(D.cls_token.std().item() - 0.02) < 0.01
    assert all(torch.equal(b.ls_attn.gamma, torch.full((128,), 0.1)) for b in D.blocks)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    D, x, y = tiny(cond_dim=64, repa_dim=32, repa_hidden=64), torch.randn(3, 16, 8, 8), torch.tensor([1, 2, 3])

    def grads():
        D.zero_grad()
        logits, (c, p) = D(x, y, return_repa=True)
        (logits.sum() + c.sum() + p.sum()).backward()
        return {k: p.grad.clone() for k, p in D.named_parameters()}

    plain = grads(); D.grad_checkpointing = True; ckpt = grads()
    assert plain.keys() == ckpt.keys() == dict(D.named_parameters()).keys()
    for k in plain: torch.testing.assert_close(plain[k], ckpt[k], rtol=0, atol=1e-6)


def test_fixed_tables_are_buffers_not_saved():
    D = tiny(repa_dim=0)
    assert {"pos_embed", "rope_cos", "rope_sin"} <= dict(D.named_buffers()).keys()
    assert not {"pos_embed", "rope_cos", "rope_sin"} & D.state_dict().keys()


def test_bad_names_and_inputs():
    with pytest.raises(ValueError, match="valid names: GAT-T/2"): Discriminator.from_size("GAT-M/2")
    D = tiny(repa_dim=0)
    with pytest.raises(ValueError, match=r"D expects \(B, 16, H, W\)"): D(torch.randn(2, 4, 8, 8), torch.zeros(2, dtype=torch.long))

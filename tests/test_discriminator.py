"The discriminator against the released code's state dict, and its shapes for every size (on the meta device)."
import re
from pathlib import Path

import pytest
import torch

from gat_tutorial.discriminator import Discriminator, parse_size, size_names

KEYS = Path(__file__).resolve().parents[2] / "shared" / "spec" / "gat_official_keys.txt"


def official_params(section):
    "Trainable {key: shape} of the released GAT-S/2 generator or discriminator."
    part = next(p for p in KEYS.read_text().split("# GAT-S/2 ") if p.startswith(section))
    rows = [l.split("\t") for l in part.splitlines()[1:] if l and not l.startswith("#")]
    return {k: tuple(int(n) for n in re.findall(r"\d+", shape)) for k, shape, _, kind in rows if kind == "param"}


@pytest.mark.skipif(not KEYS.exists(), reason="needs the course's shared/spec beside the repository")
def test_s2_matches_the_released_discriminator_key_for_key():
    with torch.device("meta"): D = Discriminator.from_size("GAT-S/2")
    ours = {re.sub(r"\.ls_(attn|mlp)\.gamma$", r".ls_\1", k): tuple(p.shape) for k, p in D.named_parameters()}
    assert ours == official_params("discriminator")


@pytest.mark.parametrize("name", size_names())
def test_one_logit_per_sample_for_every_size(name):
    with torch.device("meta"):
        D = Discriminator.from_size(name)
        x, y = torch.empty(2, 16, 32, 32), torch.zeros(2, dtype=torch.long)
        logits, (cls, patches) = D(x, y, return_repa=True)
    size, p = parse_size(name)
    assert logits.shape == (2,) and cls.shape == (2, 768) and patches.shape == (2, (32 // p) ** 2, 768)
    assert len(D.blocks) == size.depth and D.cls_token.shape[-1] == size.width


def test_cls_token_is_not_rotated():
    "Swapping the RoPE tables for the identity must change spatial tokens only through position, never [cls]'s view."
    torch.manual_seed(0)
    D = Discriminator.from_size("GAT-T/2", num_classes=0, latent_channels=4, latent_size=8, repa_dim=0)
    attn = D.blocks[0].attn
    q = torch.randn(1, attn.num_heads, 1 + 16, 32)
    rotated = attn._rotate(q, (D.rope_cos, D.rope_sin))
    assert torch.equal(rotated[:, :, 0], q[:, :, 0]) and not torch.allclose(rotated[:, :, 2:], q[:, :, 2:])


def test_bad_names_and_inputs():
    with pytest.raises(ValueError, match="valid names: GAT-T/2"): Discriminator.from_size("GAT-M/2")
    D = Discriminator.from_size("GAT-T/2", num_classes=10, latent_channels=4, latent_size=8, repa_dim=0)
    with pytest.raises(ValueError, match=r"D expects \(B, 16, H, W\)"): D(torch.randn(2, 4, 8, 8), torch.zeros(2, dtype=torch.long))

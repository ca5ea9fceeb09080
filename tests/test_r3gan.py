"R3GAN's family in the trainer (lesson 20): it trains with its own RpGAN + R1 + R2, resumes bit for bit, refuses latents."
import pytest
import torch

from gat_tutorial import train as T
from gat_tutorial.checkpoint import load_checkpoint
from gat_tutorial.peers.r3gan import R3GANGenerator, ResidualBlock, downsample2x, upsample2x

TINY = dict(batch_size=4, log_every=1, sample_every=1000, ckpt_every=1000, milestone_every=1000, eval_samples=0)


def test_r3gan_resumes_bitwise_with_r1_and_r2_on_every_step(tmp_path):
    T.train(T.make_config("r3gan", steps=3, out=str(tmp_path / "straight"), **TINY))
    T.train(T.make_config("r3gan", steps=2, out=str(tmp_path / "split"), **TINY))
    T.train(T.make_config("r3gan", steps=3, out=str(tmp_path / "split"), resume=True, **TINY))
    a, b = (load_checkpoint(T.checkpoint_path(tmp_path / n))[0] for n in ("straight", "split"))
    for k in a: assert torch.equal(a[k], b[k]), k
    assert all(r["r1"] > 0 and r["r2"] > 0 for r in T.loss_history(tmp_path / "straight"))


def test_r3gan_is_named_by_the_command_line(tmp_path, capsys):
    cfg = T.parse_config(["--preset", "r3gan", "--out", str(tmp_path)])
    assert cfg.family == "r3gan" and cfg.base_lr == 2e-4 and cfg.reg_every == 1
    with pytest.raises(SystemExit):
        T.main(["--family", "r3gan", "--data", "latents.safetensors", "--out", str(tmp_path / "x")])
    assert "trains on the embedded digits only" in capsys.readouterr().err


def test_every_block_starts_as_the_identity_and_resampling_keeps_constants():
    G = R3GANGenerator()
    blocks = [m for m in G.modules() if isinstance(m, ResidualBlock)]
    x = torch.randn(2, 32, 8, 8)
    assert len(blocks) == 8 and all(torch.equal(ResidualBlock(32, 8)(x), x) for _ in range(2))
    ones = torch.ones(1, 2, 8, 8)
    assert torch.allclose(upsample2x(ones)[..., 1:-2, 1:-2], torch.ones(1, 2, 13, 13))
    assert torch.allclose(downsample2x(ones)[..., 1:, 1:], torch.ones(1, 2, 3, 3))


def test_r3gan_is_scored_on_the_digits(tmp_path):
    "The digits scorer reads G.num_classes: R3GAN's G has it, so a scored run works (it crashed before)."
    T.train(T.make_config("r3gan", steps=1, out=str(tmp_path), **{**TINY, "eval_samples": 20, "sample_every": 1}))
    scores = T.score_history(tmp_path)
    assert [s["step"] for s in scores] == [1] and 0 <= scores[0]["class_acc"] <= 1

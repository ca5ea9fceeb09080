"Lesson 21 across modules: stacked digits in every family, GAT on pixels, the pair losses, --time_limit and gat-compare's bad input."
import json

import pytest
import torch

from gat_tutorial import train as T
from gat_tutorial import gat as gat_family
from gat_tutorial.compare import main as compare_main
from gat_tutorial.data import DigitsDataset, StackedDigits
from gat_tutorial.latents import load_digits_vae, sample_posterior
from gat_tutorial.losses import ns_d_loss, rpgan_d_loss

TINY = dict(batch_size=4, log_every=1, sample_every=1000, ckpt_every=1000, milestone_every=1000, eval_samples=0)
STACKED = dict(data="stacked", num_classes=1)


@pytest.mark.parametrize("preset,extra", [("digits", {}), ("digits", {"vae": "none", "g_model": "GAT-T/4", "d_model": "GAT-T/4"}),
                                          ("vitgan", {}), ("transgan", {}), ("r3gan", {})])
def test_every_family_trains_on_stacked_digits_and_counts_modes(tmp_path, preset, extra):
    T.train(T.make_config(preset, steps=2, out=str(tmp_path), **{**TINY, **STACKED, **extra, "eval_samples": 20, "sample_every": 2}))
    scores = T.score_history(tmp_path)
    assert [s["step"] for s in scores] == [2] and 1 <= scores[0]["modes"] <= 20 and scores[0]["kl"] > 0


def test_stacked_latents_decode_channel_by_channel(tmp_path):
    "GAT's stacked latents are the three digits' latents side by side; the decoder turns each group of 4 into one channel."
    cfg = T.make_config(out=str(tmp_path), **TINY, **STACKED)
    family = gat_family.GATFamily(cfg, T.Runtime(torch.device("cpu")))
    data, stacked, digits = family.load_data(), StackedDigits(), gat_family.LatentDataset(tmp_path / "digits_latents")
    assert data.mean.shape[1:] == (12, 8, 8) and len(data) == len(stacked)
    assert torch.equal(data.mean[5, 4:8], digits.mean[stacked.members[5, 1]])
    z = torch.randn(2, 12, 8, 8)
    images, vae = family.decoder()([z]), load_digits_vae()
    assert images.shape == (2, 3, 32, 32)
    torch.testing.assert_close(images[:, 2:3], vae.decode(z[:, 8:12]))


def test_gat_on_pixels_sees_the_images_themselves(tmp_path):
    cfg = T.make_config(out=str(tmp_path), vae="none", **TINY)
    family = gat_family.GATFamily(cfg, T.Runtime(torch.device("cpu")))
    data = family.load_data()
    x = sample_posterior(data.mean[:3], data.std[:3], data.scaling_factor, data.shift)
    assert torch.equal(x, DigitsDataset("train").images[:3]) and not (tmp_path / "digits_latents").exists()
    assert torch.equal(family.decoder()([x]), x)


def test_pair_losses_and_a_penalty_left_out():
    "--loss ns swaps the pair term; a zero weight skips its penalty (R3GAN's 'RpGAN + R1' ablation)."
    D = lambda x, y: x.flatten(1).sum(1)                                   # a linear critic: its R1/R2 is exactly 32*32
    real, fake, y = torch.randn(4, 1, 32, 32), torch.randn(4, 1, 32, 32), torch.zeros(4, dtype=torch.long)
    r, f = D(real, y), D(fake, y)
    for name, pair in (("rpgan", rpgan_d_loss), ("ns", ns_d_loss)):
        loss, terms = T.r1r2_d_loss(D, real, fake.requires_grad_(), y, (), None, 1.0, 0.0, loss=name)
        torch.testing.assert_close(terms["d_loss"], pair(r, f).mean())
        torch.testing.assert_close(terms["r1"], torch.tensor(32.0 * 32))
        assert float(terms["r2"]) == 0
        torch.testing.assert_close(loss, pair(r, f).mean() + 0.5 * 32 * 32)


def test_time_limit_saves_scores_and_says_so(tmp_path, capsys):
    T.main(["--preset", "r3gan", "--data", "stacked", "--num_classes", "1", "--out", str(tmp_path), "--time_limit", "1",
            "--steps", "1000000", "--batch_size", "4", "--eval_samples", "30", "--sample_every", "1000000"])
    state = T.load_checkpoint(T.checkpoint_path(tmp_path), "cpu")[1]
    last, score = T.loss_history(tmp_path)[-1], T.score_history(tmp_path)[-1]
    assert 0 < state["step"] < 1000000 and last["step"] == score["step"] == state["step"] and last["train_s"] >= 1
    out = capsys.readouterr().out
    assert "stopped by --time_limit" in out and "of 1000 stacked modes" in out


@pytest.mark.parametrize("args,message", [(["mnist"], "unknown suite 'mnist'; valid: digits, stacked, ablation"),
                                          (["--minutes", "0"], "--minutes must be positive")])
def test_gat_compare_bad_input_is_one_line(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e: compare_main([*args, "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())

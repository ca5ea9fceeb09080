"The trainer end to end: bitwise resume (also with REPA and lazy R1/R2), signals, non-finite losses, bad input, scores, the CLI and 2-process DDP."
import json, math, os, signal, subprocess, sys, time
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import SMALL_TEACHER, train_two_ranks_then_sigterm_rank_1
from gat_tutorial.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from gat_tutorial import train as T
from gat_tutorial import gat as gat_family
from gat_tutorial.optim import width_aware_lr
from gat_tutorial.discriminator import parse_size

TINY = dict(batch_size=8, log_every=1, sample_every=1000, ckpt_every=1000, milestone_every=1000, eval_samples=0)


def cfg(out, **kw):
    return T.TrainConfig(out=str(out), **{**TINY, **kw})


def weights(out):
    tensors, state = load_checkpoint(T.checkpoint_path(out))
    return tensors, state


def test_resume_is_bitwise(tmp_path):
    T.train(cfg(tmp_path / "straight", steps=6))
    T.train(cfg(tmp_path / "split", steps=3))
    T.train(cfg(tmp_path / "split", steps=6, resume=True))
    (a, sa), (b, sb) = weights(tmp_path / "straight"), weights(tmp_path / "split")
    assert sa["step"] == sb["step"] == 6 and sa["images_seen"] == 48
    assert a.keys() == b.keys() and any(k.startswith("opt_d.") for k in a)
    for k in a: assert torch.equal(a[k], b[k]), k


def test_milestones_are_copies_and_only_the_newest_are_kept(tmp_path):
    T.train(cfg(tmp_path, steps=4, milestone_every=1, ckpt_every=1, keep_milestones=2))
    folder = T.checkpoint_path(tmp_path).parent
    assert sorted(p.name for p in folder.iterdir()) == ["latest.safetensors", "step_0000003.safetensors", "step_0000004.safetensors"]
    assert T.checkpoint_path(tmp_path, 4).read_bytes() == T.checkpoint_path(tmp_path).read_bytes()
    assert load_checkpoint(T.checkpoint_path(tmp_path, 3))[1]["step"] == 3


def test_resume_on_a_node_that_cannot_see_the_checkpoint_says_out_must_be_shared(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "9")
    with pytest.raises(T.TrainError, match="rank 9: --out must be a folder every node shares"): T.train(cfg(tmp_path, resume=True))


def test_resume_is_bitwise_across_the_class_fade(tmp_path):
    fade = dict(cond_fade_steps=4, batch_size=4)                        # the classes arrive at step 4, the split is at 3
    T.train(cfg(tmp_path / "straight", steps=6, **fade))
    T.train(cfg(tmp_path / "split", steps=3, **fade))
    T.train(cfg(tmp_path / "split", steps=6, resume=True, **fade))
    (a, _), (b, _) = weights(tmp_path / "straight"), weights(tmp_path / "split")
    assert any(k.startswith("G.z_tokens.") for k in a) and any(k.startswith("D.uncond_head.") for k in a)
    for k in a: assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("preset,loss", [("vitgan", ""), ("transgan", ""), ("vitgan", "rpgan"), ("transgan", "rpgan")])
def test_ancestors_train_and_resume_bitwise(tmp_path, preset, loss):
    "ViTGAN and TransGAN on the digits' pixels, their own loss or RpGAN + R1 + R2: the split run equals the straight one."
    kw = dict(TINY, batch_size=4, loss=loss)                             # TransGAN's G steps at 0 and 4: the split is at 3
    T.train(T.make_config(preset, steps=6, out=str(tmp_path / "straight"), **kw))
    T.train(T.make_config(preset, steps=3, out=str(tmp_path / "split"), **kw))
    T.train(T.make_config(preset, steps=6, out=str(tmp_path / "split"), resume=True, **kw))
    (a, sa), (b, _) = weights(tmp_path / "straight"), weights(tmp_path / "split")
    assert sa["config"]["family"] == preset and any(k.startswith("opt_g.") for k in a)
    for k in a: assert torch.equal(a[k], b[k]), k
    first, last = [json.loads(l) for l in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()][::5]
    assert {"d_loss", "g_loss"} <= first.keys() and ("r1" in first) == (preset == "vitgan" or loss == "rpgan")


@pytest.mark.parametrize("mng, d_channels", [("exp", 16), ("linear", 16), ("msg", 16), ("none", 4)])
def test_every_mng_view_trains_and_resumes_bitwise(tmp_path, mng, d_channels):
    "--mng: D reads the four heads (MNG, MNG-lin, MSG levels) or the final output only (4 latent channels each)."
    T.train(cfg(tmp_path / "straight", steps=4, mng=mng))
    T.train(cfg(tmp_path / "split", steps=2, mng=mng))
    T.train(cfg(tmp_path / "split", steps=4, mng=mng, resume=True))
    (a, _), (b, _) = weights(tmp_path / "straight"), weights(tmp_path / "split")
    assert a["D.x_embedder.proj.weight"].shape[1] == d_channels
    for k in a: assert torch.equal(a[k], b[k]), k


def test_width_sets_both_nets_and_their_learning_rate(tmp_path):
    "--width 64: G and D 64 wide (2 heads of 32), each at twice GAT-T's width-aware η; resuming at another width is refused."
    T.train(cfg(tmp_path, steps=1, width=64))
    tensors, _ = weights(tmp_path)
    assert tensors["G.blocks.0.attn.qkv.weight"].shape == (3 * 64, 64) and tensors["D.x_embedder.proj.weight"].shape[0] == 64
    rt = T.setup(cfg(tmp_path, device="cpu"))
    lr = lambda **kw: T.get_family("gat")(cfg(tmp_path, **kw), rt).learning_rates(None, None)
    assert lr(width=64) == tuple(2 * x for x in lr())
    with pytest.raises(CheckpointError, match="width: checkpoint 64, now 0"):
        T.train(cfg(tmp_path, steps=2, resume=True))


def test_g_change_is_how_far_a_g_update_moves_the_output(tmp_path):
    "Logged with every loss record; 0 exactly when G's learning rate is 0; measured for TransGAN's sparse G steps too."
    T.train(cfg(tmp_path / "a", steps=3))
    T.train(cfg(tmp_path / "still", steps=3, base_lr=0.0))
    T.train(T.make_config("transgan", steps=5, out=str(tmp_path / "t"), **dict(TINY, batch_size=4, log_every=5)))
    logs = {name: [r for r in T.loss_history(tmp_path / name)] for name in ("a", "still", "t")}
    assert all(r["g_change"] > 0 for r in logs["a"]) and len(logs["a"]) == 3
    assert all(r["g_change"] == 0 for r in logs["still"])
    assert logs["t"][-1]["g_change"] > 0


def test_repa_trains_with_the_digits_teacher(tmp_path):
    T.train(cfg(tmp_path, steps=2, batch_size=4, repa_teacher="digits", images="digits"))
    assert all(r["repa"] > 0 for r in T.loss_history(tmp_path))


def test_mng_views_show_d_what_they_say():
    "The noise levels and the levels D reads, for each --mng, on four heads of an 8x8 latent."
    heads = [torch.full((1, 4, 8, 8), float(k)) for k in range(4)]
    t, view = gat_family.mng_view("exp", 4)
    assert torch.equal(t, gat_family.mng_noise_levels(4)) and view(heads) == heads
    t, view = gat_family.mng_view("none", 4)
    assert t.tolist() == [0.01] and len(view(heads)) == 1 and view(heads)[0] is heads[-1]
    t, view = gat_family.mng_view("msg", 4)
    x = torch.arange(64.).view(1, 1, 8, 8).expand(1, 4, 8, 8)
    assert t.tolist() == [0.0] * 4 and torch.equal(view([x] * 4)[-1], x) and view([x] * 4)[0].unique().tolist() == [x.mean().item()]
    assert gat_family.mng_view("linear", 4)[0][1] != gat_family.mng_view("exp", 4)[0][1]


def test_transgan_updates_g_once_per_n_critic_steps(tmp_path, monkeypatch):
    calls = []
    g_step = T.g_step
    monkeypatch.setattr(T, "g_step", lambda *a, **k: calls.append(a[-1]) or g_step(*a, **k))
    T.train(T.make_config("transgan", steps=9, out=str(tmp_path), **dict(TINY, batch_size=4)))
    assert calls == [0, 4, 8]


def test_a_family_refuses_what_it_cannot_train(tmp_path):
    with pytest.raises(T.TrainError, match="trains on the embedded digits only"):
        T.train(T.make_config("vitgan", steps=1, out=str(tmp_path / "a"), data="latents.safetensors", **TINY))
    with pytest.raises(T.TrainError, match="--loss 'hinge'"):
        T.train(T.make_config("transgan", steps=1, out=str(tmp_path / "b"), loss="hinge", **TINY))
    with pytest.raises(T.TrainError, match="--family 'stylegan': unknown"):
        T.train(cfg(tmp_path / "c", steps=1, family="stylegan"))


def test_gat_networks_have_no_digits_switches(tmp_path):
    T.train(cfg(tmp_path, steps=1, z_tokens=False, cond_fade_steps=0))
    a, _ = weights(tmp_path)
    assert not any(k.startswith(("G.z_tokens.", "D.uncond_head.")) for k in a)


def test_mode_seeking_reaches_g_and_is_logged_only_when_on(tmp_path, monkeypatch):
    "The digits default adds lesson 05's term to G's loss (logged); weight 0 is GAT's loss, and the weight changes G's update."
    calls = []
    term = gat_family.mode_seeking_loss
    monkeypatch.setattr(gat_family, "mode_seeking_loss", lambda *a: calls.append(1) or term(*a))
    for name, weight in (("on", T.TrainConfig.mode_seeking), ("off", 0.0), ("strong", 10.0)):
        T.train(cfg(tmp_path / name, steps=1, mode_seeking=weight))
    assert T.TrainConfig.mode_seeking > 0 and len(calls) == 2                           # one G step each, not for "off"
    logged = {n: json.loads((tmp_path / n / "metrics.jsonl").read_text().splitlines()[0]) for n in ("on", "off")}
    assert logged["on"]["mode_seeking"] > 0 and "mode_seeking" not in logged["off"]
    g = {n: weights(tmp_path / n)[0] for n in ("on", "off", "strong")}
    assert all(torch.equal(g["on"][k], g["off"][k]) for k in g["on"] if k.startswith("D."))  # D steps first: unchanged
    assert not torch.equal(g["on"]["G.z_tokens.weight"], g["off"]["G.z_tokens.weight"])
    assert not torch.equal(g["on"]["G.z_tokens.weight"], g["strong"]["G.z_tokens.weight"])



def test_class_loss_asks_d_to_classify_the_reals_and_is_logged_only_when_on(tmp_path, teacher_file):
    "class_loss adds the cross-entropy of D's class scores on the reals to D's loss (logged, also beside REPA); 0 is GAT's."
    repa = dict(repa_teacher=SMALL_TEACHER, repa_weights=str(teacher_file), images="digits")
    for name, kw in (("off", dict(class_loss=0.0)), ("on", dict(class_loss=1.0)), ("repa", dict(class_loss=1.0, **repa))):
        T.train(cfg(tmp_path / name, steps=1, **kw))
    logged = {n: T.loss_history(tmp_path / n)[0] for n in ("off", "on", "repa")}
    assert T.TrainConfig.class_loss > 0 and "class_ce" not in logged["off"]            # on in the digits default
    for n in ("on", "repa"): assert logged[n]["class_ce"] == pytest.approx(math.log(10), rel=0.1)   # ten classes, D untrained
    assert logged["repa"]["repa"] > 0
    d = {n: weights(tmp_path / n)[0] for n in ("off", "on")}
    assert not torch.equal(d["on"]["D.y_embedder.embedding_table.weight"], d["off"]["D.y_embedder.embedding_table.weight"])

def test_resume_is_bitwise_with_repa_and_lazy_regularisation(tmp_path, teacher_file):
    repa = dict(batch_size=4, reg_every=2, repa_teacher=SMALL_TEACHER, repa_weights=str(teacher_file), images="digits")
    T.train(cfg(tmp_path / "straight", steps=4, **repa))
    T.train(cfg(tmp_path / "split", steps=3, **repa))
    T.train(cfg(tmp_path / "split", steps=4, resume=True, **repa))
    (a, _), (b, _) = weights(tmp_path / "straight"), weights(tmp_path / "split")
    assert any(k.startswith("D.proj.") for k in a)                                      # D has the REPA projector
    for k in a: assert torch.equal(a[k], b[k]), k
    lines = [json.loads(l) for l in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert all("repa" in l for l in lines) and lines[0]["repa"] > lines[-1]["repa"]        # REPA trains D's tokens


def test_lazy_regularisation_skips_the_penalties_between_steps(tmp_path, monkeypatch):
    calls = []
    penalty = gat_family.finite_difference_penalty
    monkeypatch.setattr(gat_family, "finite_difference_penalty", lambda *a: calls.append(1) or penalty(*a))
    T.train(cfg(tmp_path, steps=4, reg_every=4))
    assert len(calls) == 1                                          # at step 0 only: one perturbed pass holds R1's reals and R2's fakes


def test_metrics_samples_and_checkpoint_are_written(tmp_path):
    result = T.train(cfg(tmp_path, steps=2))
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2]
    assert {"d_loss", "g_loss", "r1", "r2", "images_per_s", "data_wait", "tflops", "mfu", "peak_tflops"} <= lines[0].keys()
    assert all(l["tflops"] > 0 and 0 < l["data_wait"] < 1 and l["mfu"] == pytest.approx(l["tflops"] / l["peak_tflops"], rel=2e-3)
               for l in lines)
    assert (tmp_path / "samples" / "step_0000002.png").stat().st_size > 1000
    assert result["checkpoint"] == T.checkpoint_path(tmp_path)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    T.train(cfg(tmp_path, steps=2))
    before = T.checkpoint_path(tmp_path).read_bytes()
    monkeypatch.setattr(gat_family, "rpgan_g_loss", lambda fake, real: fake * float("nan"))
    with pytest.raises(T.TrainError, match="non-finite loss at step 3"):
        T.train(cfg(tmp_path, steps=4, resume=True))
    assert T.checkpoint_path(tmp_path).read_bytes() == before


def run_cli(capsys, *args):
    "Run gat-train in this process; returns (exit status, stderr)."
    with pytest.raises(SystemExit) as exit_:
        T.main(list(args))
    return exit_.value.code, capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--preset", "GAT-Q/2"], "argument --preset: invalid choice"),
    (["--g_model", "GAT-Q/2"], "GAT-Q/2"),
    (["--data", "/nonexistent/latents.safetensors"], "/nonexistent/latents.safetensors"),
    (["--steps", "ten"], "argument --steps: invalid int value"),
    (["--preset", "GAT-B/2"], "needs --data"),
    (["--resume"], "--resume: no checkpoint"),
    (["--augment", "color,zoom"], "--augment: unknown DiffAugment ['zoom']"),
    (["--mng", "cubic"], "--mng 'cubic': unknown; valid: exp, linear, msg, none"),
    (["--width", "100"], "--width 100: must be 0 (the sizes' own) or a positive multiple of 32"),
    (["--repa_teacher", SMALL_TEACHER], "--repa_teacher needs --images"),
    (["--repa_teacher", SMALL_TEACHER, "--images", "digits", "--repa_weights", "/nonexistent/w.pt"], "/nonexistent/w.pt: no teacher"),
    (["--repa_teacher", "vit_base_patch14_dinov2", "--images", "digits"], "are not on this machine"),
    (["--repa_teacher", "no_such_net", "--images", "digits"], "unknown timm model 'no_such_net'"),
    (["--latent_flip", "true"], "--latent_flip: the latents of --data digits hold no mirror images"),
    (["--grad_accum", "0"], "--grad_accum 0: must be 1"),
])
def test_bad_input_is_one_line(tmp_path, capsys, args, message):
    code, err = run_cli(capsys, "--out", str(tmp_path / "run"), *args)
    assert code == 2 and message in err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_images_that_do_not_match_the_latents_are_refused(tmp_path, capsys):
    for i in range(2):
        (tmp_path / "imgs" / "a").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 40)).save(tmp_path / "imgs" / "a" / f"{i}.png")
    code, err = run_cli(capsys, "--out", str(tmp_path / "run"), "--repa_teacher", SMALL_TEACHER, "--images", str(tmp_path / "imgs"))
    assert code == 2 and "holds 2 images, the latents 1437" in err and len(err.strip().splitlines()) == 1


def test_digits_scores_and_tensorboard_are_written(tmp_path, capsys):
    T.main(["--out", str(tmp_path), "--steps", "2", "--batch_size", "8", "--sample_every", "1", "--eval_samples", "100",
            "--tensorboard"])
    scores = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines() if "fd" in l]
    assert [s["step"] for s in scores] == [1, 2] and all(0 <= s["class_acc"] <= 1 and s["fd"] > 0 for s in scores)
    printed = capsys.readouterr()
    assert "EMA-G:      class accuracy" in printed.out and "recall" in printed.out and "coverage" in printed.out
    progress = [json.loads(l.removeprefix("gat-train: ")) for l in printed.err.splitlines() if l.startswith("gat-train: {")]
    assert [p["step"] for p in progress] == [1, 2] and "\r" not in printed.err and "recall" in progress[-1]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    best = min(scores, key=lambda s: s["fd"])["step"]                                   # checkpoints/best: the lowest FD
    assert load_checkpoint(T.checkpoint_path(tmp_path, "best"))[1]["step"] == best


def test_best_goes_on_from_the_log_of_a_resumed_run(tmp_path):
    records = [{"step": 2, "fd": 5.0}, {"step": 4, "fd": 3.0}, {"step": 4, "d_loss": 0.1, "images_per_s": 9.0}, {"step": 6, "fd": 1.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    best = T.BestScore(tmp_path, start=4)                     # resumed at step 4: the log's step 6 is a future that never was
    assert best.value == 3.0 and not best.improved({"fd": 3.5}) and best.improved({"fd": 2.0}) and best.value == 2.0
    assert T.BestScore(tmp_path / "new", start=0).improved({"fid": 80.0})           # a fresh run: its first score is its best
    assert not T.BestScore(tmp_path, start=4).improved({"modes": 900, "kl": 0.1})  # stacked digits: no score to follow


def test_fid_ref_without_the_inception_weights_is_one_line(tmp_path, capsys):
    import numpy as np
    np.savez(tmp_path / "ref.npz", arr_0=np.zeros((8, 32, 32, 3), np.uint8))
    code, err = run_cli(capsys, "--out", str(tmp_path / "run"), "--fid_ref", str(tmp_path / "ref.npz"), "--inception", str(tmp_path / "none.pth"))
    assert code == 2 and "--fid_ref" in err and "none.pth" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_checkpoint_problems_are_one_line_and_touch_nothing(tmp_path, capsys):
    T.train(cfg(tmp_path, steps=1))
    latest = T.checkpoint_path(tmp_path)
    good = latest.read_bytes()
    capsys.readouterr()
    code, err = run_cli(capsys, "--out", str(tmp_path), "--steps", "2")                 # a new run over an old one
    assert code == 2 and "already holds a run" in err
    code, err = run_cli(capsys, "--out", str(tmp_path), "--steps", "2", "--resume", "--batch_size", "16")  # another config
    assert code == 2 and "batch_size: checkpoint 8, now 16" in err
    assert latest.read_bytes() == good
    latest.write_bytes(good[:100])                                                      # a corrupt file
    code, err = run_cli(capsys, "--out", str(tmp_path), "--steps", "2", "--resume", "--batch_size", "8")
    assert code == 2 and "corrupt checkpoint" in err and len(err.strip().splitlines()) == 1
    assert latest.read_bytes() == good[:100]


def test_sigterm_saves_a_checkpoint_then_exits_cleanly(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    p = subprocess.Popen([sys.executable, "-m", "gat_tutorial.train", "--out", str(tmp_path), "--steps", "100000",
                          "--batch_size", "8", "--log_every", "1", "--sample_every", "100000"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert time.time() < deadline and p.poll() is None, p.communicate()
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert "stopped by SIGTERM" in out
    step = load_checkpoint(T.checkpoint_path(tmp_path))[1]["step"]
    assert 2 <= step < 100000


def test_two_process_ddp_on_gloo_with_repa(tmp_path, teacher_file):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "gat_tutorial.train", "--out", str(tmp_path), "--steps", "3", "--batch_size", "8",
                        "--sample_every", "1000", "--reg_every", "2", "--repa_teacher", SMALL_TEACHER,
                        "--repa_weights", str(teacher_file), "--images", "digits"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("checkpoint: ") == 1                                          # rank 0 reports
    tensors, state = load_checkpoint(T.checkpoint_path(tmp_path))
    assert state["step"] == 3 and state["images_seen"] == 24
    # resume the 2-rank run in one process: the checkpoint holds no world size, the global batch continues
    T.train(cfg(tmp_path, steps=5, reg_every=2, eval_samples=T.EVAL_SAMPLES, repa_teacher=SMALL_TEACHER,
                repa_weights=str(teacher_file), images="digits", resume=True))
    after, state = load_checkpoint(T.checkpoint_path(tmp_path))
    assert state["step"] == 5 and state["images_seen"] == 40
    assert any(not torch.equal(after[k], tensors[k]) for k in tensors if k.startswith("G."))          # it trained on
    assert [r["step"] for r in T.loss_history(tmp_path)][-2:] == [4, 5]


def _torchrun_2(args, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "gat_tutorial.train", *args], capture_output=True, text=True, env=env, timeout=timeout)


def test_one_process_accumulating_two_micro_batches_trains_what_two_ranks_train(tmp_path):
    """The paper's batch on fewer GPUs: a shard's data and draws do not depend on who computes it, so one process that
    accumulates 2 micro-batches and 2 DDP ranks end the same steps (a regularised one, a plain one) with the same G, D
    and EMA, up to the order gradients are summed in. Not w_avg: each DDP rank keeps its own (broadcast_buffers off)."""
    r = _torchrun_2(["--out", str(tmp_path / "ranks"), "--steps", "2", "--batch_size", "8", "--reg_every", "2",
                     "--sample_every", "1000", "--eval_samples", "0", "--log_every", "1"])
    assert r.returncode == 0, r.stderr[-3000:]
    T.train(cfg(tmp_path / "accumulated", steps=2, reg_every=2, grad_accum=2))
    ranks, accumulated = weights(tmp_path / "ranks")[0], weights(tmp_path / "accumulated")[0]
    T.train(cfg(tmp_path / "whole", steps=2, reg_every=2))                          # one shard of 8: other draws
    whole = weights(tmp_path / "whole")[0]
    trained = [k for k in ranks if k.split(".")[0] in ("G", "D", "ema") and "w_avg" not in k]
    eta = width_aware_lr(parse_size(T.TrainConfig.g_model)[0].width, T.TrainConfig.base_lr)   # GAT-T's η, both nets
    apart = lambda other: torch.cat([(ranks[k] - other[k]).abs().flatten() for k in trained]) > 0.1 * eta   # per weight
    # Adam's first steps move a weight by about ±η whatever its gradient's size: where a gradient is near 0, the order
    # of summation can flip its sign. So a few weights may differ by up to 2η a step; almost all must agree.
    assert apart(accumulated).float().mean() < 1e-5, apart(accumulated).float().mean()   # measured: one weight in 1.8 M
    assert apart(whole).float().mean() > 0.5                                           # the check can tell runs apart
    logged = [T.loss_history(tmp_path / d)[-1] for d in ("ranks", "accumulated")]
    assert logged[0]["d_loss"] == pytest.approx(logged[1]["d_loss"], rel=1e-4)       # terms: means over the shards


def test_accumulation_needs_the_batch_to_split(tmp_path, capsys):
    with pytest.raises(SystemExit): T.main(["--out", str(tmp_path), "--batch_size", "12", "--grad_accum", "8"])
    assert "not divisible by 1 ranks x 8 micro-batches" in capsys.readouterr().err


def _mean_terms(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    T.dist.init_process_group("gloo", rank=rank, world_size=world)
    terms = T._mean_over_ranks(T.Runtime(torch.device("cpu"), rank, world), {"d_loss": torch.tensor(float(rank)), "r1": torch.tensor(2.0 * rank)})
    torch.save({k: float(v) for k, v in terms.items()}, out / f"{rank}.pt")
    T.dist.destroy_process_group()


def test_logged_losses_are_the_mean_over_ranks(tmp_path):
    torch.multiprocessing.spawn(_mean_terms, args=(2, 29517, tmp_path), nprocs=2)
    assert torch.load(tmp_path / "0.pt") == torch.load(tmp_path / "1.pt") == {"d_loss": 0.5, "r1": 1.0}


def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    "Only rank 1 is signalled: the ranks agree each step, so rank 0 saves, every rank leaves together and torchrun exits 0."
    code, out, err = train_two_ranks_then_sigterm_rank_1(["--batch_size", "8"], tmp_path)
    assert code == 0, err[-3000:]
    assert "stopped by a signal to another rank" in out                                 # rank 0 reports, unsignalled
    assert 2 <= load_checkpoint(T.checkpoint_path(tmp_path))[1]["step"] < 100000


def test_ranks_split_the_global_batch_and_draw_their_own_noise():
    """Rank r reads every world-th sample of the step's global batch (so 2 ranks together read what 1 process reads, and a
    resume on another world size continues the same data order), and each rank's step generator is its own."""
    cfg, cpu = T.TrainConfig(batch_size=8), torch.device("cpu")
    one = T.Runtime(cpu)
    two = [T.Runtime(cpu, rank=r, world=2) for r in range(2)]
    for step in (0, 5, 400):                                                # 400 is past the first epoch of 1437 // 8
        whole = T.batch_indices(step, 1437, cfg, one)
        halves = [T.batch_indices(step, 1437, cfg, rt) for rt in two]
        assert sorted(torch.cat(halves).tolist()) == sorted(whole.tolist()) and len(set(whole.tolist())) == 8
        noise = [torch.randn(4, generator=T.step_generator(cfg, step, rt)) for rt in two]
        assert not torch.equal(*noise)                                     # the rank is part of the seed
        assert torch.equal(noise[0], torch.randn(4, generator=T.step_generator(cfg, step, one)))
    assert not torch.equal(T.batch_indices(0, 1437, cfg, one), T.batch_indices(179, 1437, cfg, one))   # epoch 1: a new order


@pytest.mark.parametrize("regularize, passes", [(True, 2), (False, 1)])
def test_a_regularised_d_step_under_autocast_runs_d_in_fp32_on_reals_and_fakes_together(tmp_path, regularize, passes):
    """GAT's D step under bf16 autocast: D sees the reals and the fakes as one batch of 2B; on a regularised step that
    pass is in fp32 and the penalty reuses its logits (2 passes: clean, perturbed; lesson 05's cost table), other steps
    keep the one pass in bf16."""
    c = cfg(tmp_path, steps=1)
    rt = T.setup(c)
    family = gat_family.GATFamily(c, rt)
    data = family.load_data()
    G, D, *_ = T.build(family, data)
    gen = T.step_generator(c, 0, rt)
    real, y = family.batch(data, T.batch_indices(0, len(data), c, rt), gen)
    z = torch.randn(len(y), G.z_dim, generator=gen)
    seen = []
    D.register_forward_hook(lambda m, i, out: seen.append(((out[0] if isinstance(out, tuple) else out).dtype, len(i[0]))))  # logits[, classes]
    with torch.autocast("cpu", torch.bfloat16):
        loss, terms = gat_family.gat_d_loss(G, D, real, y, z, family.t, c, gen, family.policy, regularize=regularize, view=family.view)
    loss.backward()
    assert seen == [(torch.float32 if regularize else torch.bfloat16, 2 * len(y))] * passes
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in terms.values())


def test_latent_flip_takes_each_sample_or_its_mirror_and_flips_repa_images_alike(tmp_path):
    "With --latent_flip a batch mixes images and mirrors (p = 0.5, drawn from the step's generator); REPA's raw image follows its latent."
    from types import SimpleNamespace
    n = 64
    data = SimpleNamespace(mean=torch.zeros(n, 1, 1, 2), std=torch.zeros(n, 1, 1, 2), mirror=(torch.ones(n, 1, 1, 2), torch.zeros(n, 1, 1, 2)),
                           labels=torch.zeros(n, dtype=torch.long), scaling_factor=1.0, shift=0.0)
    family = gat_family.GATFamily(cfg(tmp_path, latent_flip=True), T.Runtime(torch.device("cpu")))
    raw = torch.arange(2.0).expand(n, 1, 1, 2)                                         # each image: [0, 1]; its mirror [1, 0]
    family.raw = iter([raw, raw])
    idx = torch.arange(n)
    real, _ = family.batch(data, idx, torch.Generator().manual_seed(0))
    mirrored = real[:, 0, 0, 0] == 1                                                  # the mirror's latent is all ones here
    assert 10 < mirrored.sum() < n - 10
    assert torch.equal(family.fetched.popleft()[:, 0, 0, 0], mirrored.float())         # its raw image flipped with it
    again, _ = family.batch(data, idx, torch.Generator().manual_seed(1))
    assert not torch.equal(again, real)                                              # another step, other draws


def _teardown_with(rank, world, port, out, diverge):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    T.dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    G, D = torch.nn.Linear(3, 3), torch.nn.Linear(3, 1)
    if diverge and rank == 1:
        with torch.no_grad(): G.weight[0, 0] += 1e-3                                   # one weight of one replica moved
    try: T._teardown(T.Runtime(torch.device("cpu"), rank, world), G, D); said = "agree"
    except RuntimeError as e: said = str(e)
    (out / f"{rank}.txt").write_text(said)


@pytest.mark.parametrize("diverge", [False, True])
def test_the_end_of_a_ddp_run_checks_that_replicas_agree(tmp_path, diverge):
    "The check every DDP run ends with: identical replicas pass; one weight moved on one rank stops every rank, naming that rank."
    torch.multiprocessing.spawn(_teardown_with, args=(2, 29531 + diverge, tmp_path, diverge), nprocs=2)
    said = [(tmp_path / f"{r}.txt").read_text() for r in range(2)]
    assert said == (["DDP replicas diverged: rank 1 differs from rank 0"] * 2 if diverge else ["agree", "agree"])


def test_fsdp_trains_what_ddp_trains_and_its_checkpoints_resume_anywhere(tmp_path):
    """--parallel fsdp (FSDP2 shards on gloo): 2 ranks, 2 micro-batches each, end a regularised and a plain step with
    the G, D, EMA and Adam state DDP ends them with, up to the order gradients are summed in; the grid's scores come
    from the gathered EMA; a sharded run stopped and resumed on 2 ranks goes on as the unsharded one, and its checkpoint
    resumes in one process."""
    common = ["--batch_size", "8", "--grad_accum", "2", "--reg_every", "2", "--sample_every", "2", "--eval_samples", "100",
              "--log_every", "1"]
    r = _torchrun_2(["--out", str(tmp_path / "ddp"), "--steps", "3", *common])
    assert r.returncode == 0, r.stderr[-3000:]
    for steps, resume in (("2", []), ("3", ["--resume"])):
        r = _torchrun_2(["--out", str(tmp_path / "fsdp"), "--parallel", "fsdp", "--steps", steps, *common, *resume])
        assert r.returncode == 0, r.stderr[-3000:]
    (ddp, ddp_state), (fsdp, fsdp_state) = weights(tmp_path / "ddp"), weights(tmp_path / "fsdp")
    assert ddp.keys() == fsdp.keys() and fsdp_state["step"] == 3
    # D's last bias adds b.e(y) to the real and the fake logit of a pair alike: its gradient is 0 but for rounding, which
    # Adam (beta_1 = 0) turns into steps of +-lr either way. Every other tensor, Adam's moments included, must agree.
    noise = "D.final_layer.1.bias"
    worst = max((ddp[k].float() - fsdp[k].float()).abs().max().item() for k in ddp if k != noise)
    assert worst < 1e-5, worst
    scores = [T.score_history(tmp_path / d)[0] for d in ("ddp", "fsdp")]
    assert scores[0]["step"] == scores[1]["step"] == 2
    assert scores[0]["fd"] == pytest.approx(scores[1]["fd"], rel=1e-3)
    T.train(cfg(tmp_path / "fsdp", steps=4, reg_every=2, grad_accum=2, resume=True))          # 2 sharded ranks -> 1 process
    assert weights(tmp_path / "fsdp")[1]["step"] == 4


def test_parallel_must_be_ddp_or_fsdp(tmp_path, capsys):
    with pytest.raises(SystemExit): T.main(["--out", str(tmp_path), "--parallel", "zero3"])
    assert "--parallel 'zero3': unknown; valid: ddp, fsdp" in capsys.readouterr().err

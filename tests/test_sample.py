"gat-sample across modules: a checkpoint's EMA generator, the same file on 1 or 2 ranks, bad input in one line."
import json, os, subprocess, sys

import numpy as np
import pytest

from gat_tutorial import train as T
from gat_tutorial.sample import main as sample_main, sample, sample_inputs


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    T.train(T.make_config(steps=2, batch_size=8, sample_every=1000, eval_samples=0, out=str(out)))
    return T.checkpoint_path(out)


def test_two_ranks_write_the_file_one_rank_writes(tmp_path, checkpoint):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                        "gat_tutorial.sample", str(checkpoint), "--num_samples", "7", "--chunk", "2", "--out", str(tmp_path / "two.npz")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = np.load(sample(checkpoint, tmp_path / "one.npz", n=7, chunk=2)), np.load(tmp_path / "two.npz")
    assert np.array_equal(one["arr_0"], two["arr_0"]) and np.array_equal(one["arr_1"], two["arr_1"])
    assert sorted(p.name for p in tmp_path.glob("*.npz")) == ["one.npz", "two.npz"]
    record = json.loads((tmp_path / "two.json").read_text())
    assert record["n"] == 7 and record["step"] == 2 and record["shape"] == [7, 32, 32, 3]


def test_image_i_depends_on_its_index_only(tmp_path, checkpoint):
    full = np.load(sample(checkpoint, tmp_path / "full.npz", n=6, chunk=2))
    y, _ = sample_inputs(0, range(6), 64, 10)
    assert np.array_equal(full["arr_1"], y.numpy()) and full["arr_0"].dtype == np.uint8
    fewer = np.load(sample(checkpoint, tmp_path / "fewer.npz", n=4, chunk=2))             # how many are drawn changes nothing
    assert np.array_equal(fewer["arr_0"], full["arr_0"][:4])
    other_seed = np.load(sample(checkpoint, tmp_path / "other.npz", n=4, chunk=2, seed=1))
    assert not np.array_equal(other_seed["arr_0"], fewer["arr_0"])


def test_the_ancestors_sample_but_refuse_gat_knobs(tmp_path, capsys):
    T.train(T.make_config("vitgan", steps=1, batch_size=4, sample_every=1000, eval_samples=0, out=str(tmp_path / "v")))
    ckpt = T.checkpoint_path(tmp_path / "v")
    assert np.load(sample(ckpt, tmp_path / "v.npz", n=3))["arr_0"].shape == (3, 32, 32, 3)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e: sample_main([str(ckpt), "--num_samples", "3", "--psi", "0.3", "--out", str(tmp_path / "w.npz")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--psi and --guidance_scale are GAT's" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("args,message", [(["/nonexistent/latest.safetensors"], "/nonexistent/latest.safetensors"),
                                          (["CKPT", "--num_samples", "0"], "--num_samples and --chunk must be positive")])
def test_bad_input_is_one_line(tmp_path, capsys, checkpoint, args, message):
    args = [str(checkpoint) if a == "CKPT" else a for a in args]
    with pytest.raises(SystemExit) as e: sample_main([*args, "--out", str(tmp_path / "x.npz")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.glob("*.npz"))


def test_export_ema_is_what_sampling_reads(tmp_path, checkpoint, capsys):
    sample_main([str(checkpoint), "--export_ema", str(tmp_path / "ema.safetensors")])
    assert capsys.readouterr().out.strip() == f"EMA-G: {tmp_path / 'ema.safetensors'}"
    tensors, state = T.load_checkpoint(tmp_path / "ema.safetensors", "cpu")
    assert tensors and all(k.startswith("ema.") for k in tensors) and state["step"] == 2
    a, b = (np.load(sample(c, tmp_path / f"{n}.npz", n=5)) for n, c in (("full", checkpoint), ("ema", tmp_path / "ema.safetensors")))
    assert np.array_equal(a["arr_0"], b["arr_0"])

"gat-eval across modules: ADM's five numbers on known answers, a random Inception through the real loading path, the CLI end to end, bad input in one line."
import json, os, subprocess, sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gat_tutorial.data import DigitsDataset
from gat_tutorial.evaluate import (ADM_BATCH_SIZE, INCEPTION_URL, IS_SPLIT_SIZE, POOL_DIM, SFID_CHANNELS, SFID_DIM, SFID_LAYER,
                                   EvalError, NpzImages, batch_features, evaluate, inception_score, load_inception,
                                   main as eval_main, npz_stats, save_random_inception)
from gat_tutorial.metrics import NN_K, feature_stats, frechet_distance, precision_recall
from gat_tutorial.sample import to_uint8

N = 12  # images per file: a random InceptionV3 at 299 x 299 costs about 0.15 s an image on one CPU thread


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return save_random_inception(tmp_path_factory.mktemp("inception") / "random.pth", seed=0)


@pytest.fixture(scope="module")
def inception(weights):
    return load_inception(weights)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    "A sample .npz as gat-sample writes it and a reference .npz of other digits without statistics."
    d = tmp_path_factory.mktemp("npz")
    ds = DigitsDataset("val")
    digits = to_uint8(ds.images[:2 * N]).contiguous().numpy()
    np.savez(d / "sample.npz", arr_0=digits[:N], arr_1=ds.labels[:N].numpy())
    np.savez_compressed(d / "ref.npz", arr_0=digits[N:])
    return d / "ref.npz", d / "sample.npz"


def test_adm_constants():
    assert (ADM_BATCH_SIZE, IS_SPLIT_SIZE, SFID_CHANNELS, NN_K) == (64, 5000, 7, 3)
    assert SFID_DIM == 17 * 17 * 7 == 2023 and SFID_LAYER == "Mixed_6d.branch1x1"


def test_frechet_distance_closed_form_and_zero():
    rng = np.random.default_rng(0)
    a, b, m1, m2 = rng.uniform(0.1, 3, 7), rng.uniform(0.1, 3, 7), rng.normal(size=7), rng.normal(size=7)
    closed = ((m1 - m2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert abs(frechet_distance((m1, np.diag(a)), (m2, np.diag(b))) - closed) < 1e-9
    x = torch.randn(300, 5, dtype=torch.float64)
    assert abs(frechet_distance(feature_stats(x), feature_stats(x))) < 1e-10
    assert feature_stats(x.float())[0].dtype == np.float64 and feature_stats(x.float())[1].dtype == np.float64


def test_inception_score_known_answers():
    one_hot = lambda classes: 50.0 * F.one_hot(torch.as_tensor(classes), 1008).double()
    assert abs(inception_score(one_hot([5] * 30)) - 1) < 1e-9                       # one class for all
    assert abs(inception_score(one_hot(torch.arange(60) % 12)) - 12) < 1e-9         # K classes equally often: K
    assert abs(inception_score(one_hot([0] * 10 + list(range(10))), split_size=10) - 5.5) < 1e-9   # mean over splits 1 and 10
    probs = np.random.default_rng(0).dirichlet(np.full(6, 0.5), size=250)           # ADM's loop, split size 100 (last split 50)
    adm = np.mean([np.exp(np.mean(np.sum(p * (np.log(p) - np.log(p.mean(0, keepdims=True))), 1)))
                   for p in (probs[i:i + 100] for i in range(0, 250, 100))])
    assert abs(inception_score(torch.from_numpy(np.log(probs)), split_size=100) - adm) < 1e-9


def test_precision_recall_known_overlap():
    real = torch.randn(120, 8, generator=torch.Generator().manual_seed(0))
    assert precision_recall(real, real) == (1.0, 1.0)
    assert precision_recall(real, real + 50) == (0.0, 0.0)
    assert precision_recall(real, torch.cat([real[:30], real[:30] + 50]))[0] == 0.5


def test_features_shapes_layout_and_torch_fidelitys_own_path(inception, weights, files):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    images = np.load(files[1])["arr_0"][:4]
    seen = []
    hook = inception.net.get_submodule(SFID_LAYER).register_forward_hook(lambda m, i, out: seen.append(out.clone()))
    pool, spatial = inception(images)
    hook.remove()
    assert pool.shape == (4, POOL_DIM) and spatial.shape == (4, SFID_DIM) and inception.logits(pool).shape == (4, 1008)
    assert seen[0].shape == (4, 192, 17, 17)                                         # mixed_6/conv: 17 x 17 x 192
    assert torch.equal(spatial.view(4, 17, 17, SFID_CHANNELS), seen[0][:, :SFID_CHANNELS].permute(0, 2, 3, 1))   # TF's NHWC order
    theirs = FeatureExtractorInceptionV3("t", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(weights))
    their_pool, their_logits = theirs(torch.from_numpy(images).permute(0, 3, 1, 2))
    assert torch.allclose(pool, their_pool, atol=1e-5) and torch.allclose(inception.logits(pool), their_logits, atol=1e-4)
    assert pool.std() > 1e-3                                                         # the random net's features do not vanish


def test_streaming_reads_the_file_in_order(files):
    for path in files:
        images = NpzImages(path)
        batches = list(images.batches(5))
        assert [len(b) for b in batches] == [5, 5, 2] and len(images) == N
        assert np.array_equal(np.concatenate(batches), np.load(path)["arr_0"])


def test_batch_size_does_not_change_the_numbers(inception, files):
    (p64, s64), (p5, s5) = (batch_features(inception, files[1], batch_size=b) for b in (ADM_BATCH_SIZE, 5))
    assert np.allclose(p64, p5, atol=1e-4 * np.abs(p64).max()) and np.allclose(s64, s5, atol=1e-4 * np.abs(s64).max())
    a, b = (evaluate(*files, inception, batch_size=bs) for bs in (ADM_BATCH_SIZE, 5))
    for k in a: assert abs(a[k] - b[k]) <= 1e-4 * max(1, abs(a[k])), (k, a[k], b[k])


def test_a_file_against_itself(inception, files):
    s = evaluate(files[1], files[1], inception)
    scale = np.trace(feature_stats(torch.from_numpy(batch_features(inception, files[1])[0]))[1])
    assert abs(s["fid"]) < 1e-5 * scale and s["precision"] == s["recall"] == 1.0 and s["inception_score"] >= 1


def test_precision_is_the_samples_inside_the_reference(tmp_path, inception, files):
    "Half the samples are reference digits, half flat gray images far from any digit: precision 1/2; the other way round, recall 1/2."
    digits = np.load(files[0])["arr_0"]
    flat = np.broadcast_to(np.linspace(128, 255, N // 2).astype(np.uint8)[:, None, None, None], (N // 2, 32, 32, 3))
    np.savez(tmp_path / "mixed.npz", arr_0=np.concatenate([digits[:N // 2], flat]))
    s = evaluate(files[0], tmp_path / "mixed.npz", inception)
    assert s["precision"] == 0.5 and s["recall"] > 0.5, s
    s = evaluate(tmp_path / "mixed.npz", files[0], inception)
    assert s["recall"] == 0.5 and s["precision"] > 0.5, s


def test_cli_end_to_end_computed_and_stored_reference(tmp_path, weights, inception, files, capsys):
    ref, sample = files
    eval_main([str(ref), str(sample), "--inception_weights", str(weights), "--json", str(tmp_path / "a.json")])
    out = capsys.readouterr().out
    record = json.loads((tmp_path / "a.json").read_text())
    assert {"fid", "sfid", "inception_score", "precision", "recall"} <= set(record) and record["num_samples"] == N
    assert all(np.isfinite(record[k]) for k in ("fid", "sfid", "inception_score", "precision", "recall"))
    assert record["fid"] > 0 and f"FID: {record['fid']}" in out and "sFID:" in out and "Recall:" in out
    _, fid, sfid = npz_stats(ref, inception)                                        # a reference that stores its statistics
    np.savez(tmp_path / "ref_stats.npz", arr_0=np.load(ref)["arr_0"], mu=fid[0], sigma=fid[1], mu_s=sfid[0], sigma_s=sfid[1])
    eval_main([str(tmp_path / "ref_stats.npz"), str(sample), "--inception_weights", str(weights)])
    stored = json.loads(sample.with_suffix(".eval.json").read_text())             # the default record path
    for k in ("fid", "sfid", "inception_score", "precision", "recall"): assert abs(stored[k] - record[k]) < 1e-6 * max(1, abs(record[k]))
    wrong = dict(mu=fid[0], sigma=fid[1], mu_s=sfid[0][:100], sigma_s=sfid[1])      # stored statistics are used, and checked
    np.savez(tmp_path / "bad_stats.npz", arr_0=np.load(ref)["arr_0"], **wrong)
    with pytest.raises(EvalError, match="mu_s has shape"): evaluate(tmp_path / "bad_stats.npz", sample, inception)


def test_console_script_missing_weights_is_one_line(tmp_path, files):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "gat_tutorial.evaluate", *map(str, files), "--inception_weights",
                        str(tmp_path / "inception.pth")], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("gat-eval: error: ") and INCEPTION_URL in r.stderr and str(tmp_path / "inception.pth") in r.stderr


def _bad_inputs(tmp_path, files, weights):
    "name -> (argv, the message's part) for every kind of bad input."
    ref, sample = map(str, files)
    digits = np.load(sample)["arr_0"]
    np.savez(tmp_path / "labels.npz", arr_1=np.arange(4))
    np.savez(tmp_path / "floats.npz", arr_0=digits.astype(np.float32))
    np.savez(tmp_path / "gray.npz", arr_0=digits[..., 0])
    np.savez(tmp_path / "three.npz", arr_0=digits[:NN_K])
    np.savez(tmp_path / "half_stats.npz", arr_0=digits, mu=np.zeros(POOL_DIM))
    (tmp_path / "text.npz").write_text("not a zip")
    (tmp_path / "garbage.pth").write_bytes(b"\x00garbage")
    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "other.pth")
    w = ["--inception_weights", str(weights)]
    return {
        "missing sample": ([ref, str(tmp_path / "none.npz"), *w], "none.npz: no such file"),
        "not a zip": ([ref, str(tmp_path / "text.npz"), *w], "text.npz: not an .npz file"),
        "no arr_0": ([ref, str(tmp_path / "labels.npz"), *w], "labels.npz: no arr_0"),
        "float images": ([ref, str(tmp_path / "floats.npz"), *w], "ADM's layout is uint8 N x H x W x 3"),
        "no channels": ([str(tmp_path / "gray.npz"), sample, *w], "gray.npz: arr_0 is uint8 of shape"),
        "too few images": ([ref, str(tmp_path / "three.npz"), *w], f"need more than k = {NN_K}"),
        "mu without the rest": ([str(tmp_path / "half_stats.npz"), sample, *w], "holds mu but not all of sigma, mu_s, sigma_s"),
        "weights missing": ([ref, sample, "--inception_weights", str(tmp_path / "w.pth")], INCEPTION_URL),
        "weights garbage": ([ref, sample, "--inception_weights", str(tmp_path / "garbage.pth")], "garbage.pth: not a PyTorch weights file"),
        "weights foreign": ([ref, sample, "--inception_weights", str(tmp_path / "other.pth")], "other.pth: not torch-fidelity's InceptionV3 weights"),
        "batch size": ([ref, sample, *w, "--batch_size", "0"], "--batch_size must be positive"),
    }


BAD = ["missing sample", "not a zip", "no arr_0", "float images", "no channels", "too few images", "mu without the rest",
       "weights missing", "weights garbage", "weights foreign", "batch size"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line(tmp_path, files, weights, capsys, case):
    argv, message = _bad_inputs(tmp_path, files, weights)[case]
    with pytest.raises(SystemExit) as e: eval_main([*argv, "--json", str(tmp_path / "out.json")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("gat-eval: error: ") and not (tmp_path / "out.json").exists()

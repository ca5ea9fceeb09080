"""The cloud path end to end on CPU: 2-rank gat-extract (interrupted, resumed) -> 2-rank training with REPA (one rank sent
SIGTERM) -> resume on 1 rank -> gat-sample -> gat-eval, on a generated image folder with one image under the crop size."""
import json, os, subprocess, sys

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image

from conftest import SMALL_TEACHER, train_two_ranks_then_sigterm_rank_1
from gat_tutorial import train as T
from gat_tutorial.checkpoint import load_checkpoint
from gat_tutorial.data import ImageFolderDataset
from gat_tutorial.evaluate import save_random_inception
from gat_tutorial.latents import MANIFEST, LatentDataset
from gat_tutorial.sample import to_uint8

CROP, IMAGES, SHARD = 64, 24, 8   # a 64-pixel ADM crop -> 8x8 latents through an f8 VAE; 3 shards of 8
F8_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=CROP, block_out_channels=(8, 8, 8, 8), norm_num_groups=4,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)  # SD-VAE's layout, tiny
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", *args]


def run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def make_folder(root):
    "Two classes of coloured noise images of several sizes; one is smaller than the crop (ADM upsamples it)."
    rng = np.random.default_rng(0)
    for i in range(IMAGES):
        size = (40, 30) if i == 5 else (96 + 8 * (i % 3), 80)
        (root / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(root / f"class{i % 2}" / f"{i:03d}.png")
    return root


def test_extract_train_resume_sample_evaluate(tmp_path, teacher_file):
    images, latents, out, vae = make_folder(tmp_path / "images"), tmp_path / "latents", tmp_path / "run", tmp_path / "vae"
    torch.manual_seed(0); AutoencoderKL(**F8_VAE).save_pretrained(vae)

    # 1. extraction on 2 ranks; then a preemption's damage (a shard cut off mid-write, a record never written); a rerun finishes
    extract = torchrun("gat_tutorial.latents", str(images), str(latents), "--vae", str(vae), "--image_size", str(CROP),
                       "--shard_size", str(SHARD), "--batch_size", "4", "--workers", "1")
    run(extract)
    first = {k: (latents / f"shard_0000{k}.npy").stat().st_mtime_ns for k in range(3)}
    (latents / "shard_00001.npy").write_bytes((latents / "shard_00001.npy").read_bytes()[:500])
    (latents / "shard_00002.json").unlink()
    assert "24 images" in run(extract)
    assert [(latents / f"shard_0000{k}.npy").stat().st_mtime_ns != first[k] for k in range(3)] == [False, True, True]
    data = LatentDataset(latents)
    assert data.mean.shape == (IMAGES, 4, 8, 8) and data.manifest["dtype"] == "bfloat16" and data.manifest["image_size"] == CROP
    assert torch.equal(data.labels, torch.tensor([y for _, y in ImageFolderDataset(images, CROP).samples]))

    # 2. 2-rank training with REPA reading the raw images; SIGTERM to rank 1 only: every rank stops, rank 0 saves, exit 0
    train = ["--data", str(latents), "--images", str(images), "--vae", str(vae), "--num_classes", "2", "--repa_teacher",
             SMALL_TEACHER, "--repa_weights", str(teacher_file), "--batch_size", "4", "--workers", "1"]
    code, stdout, stderr = train_two_ranks_then_sigterm_rank_1(train, out)
    assert code == 0 and "stopped by a signal to another rank" in stdout, stderr[-3000:]
    stopped = load_checkpoint(T.checkpoint_path(out))[1]["step"]

    # 3. resume on one process: the same global batch, two more steps
    run([sys.executable, "-m", "gat_tutorial.train", *train, "--out", str(out), "--steps", str(stopped + 2), "--resume",
         "--eval_samples", "0"])
    assert load_checkpoint(T.checkpoint_path(out))[1]["step"] == stopped + 2

    # 4. samples through the VAE's decoder, 5. ADM's five numbers against the training images (random Inception)
    run([sys.executable, "-m", "gat_tutorial.sample", str(T.checkpoint_path(out)), "--num_samples", "16", "--chunk", "8",
         "--out", str(tmp_path / "samples.npz")])
    samples = np.load(tmp_path / "samples.npz")
    assert samples["arr_0"].shape == (16, CROP, CROP, 3) and set(samples["arr_1"]) <= {0, 1}
    reals = to_uint8(torch.stack([x for x, _ in ImageFolderDataset(images, CROP)])).numpy()
    np.savez(tmp_path / "ref.npz", arr_0=reals)
    weights = save_random_inception(tmp_path / "inception.pth")
    run([sys.executable, "-m", "gat_tutorial.evaluate", str(tmp_path / "ref.npz"), str(tmp_path / "samples.npz"),
         "--inception_weights", str(weights), "--json", str(tmp_path / "eval.json")])
    scores = json.loads((tmp_path / "eval.json").read_text())
    assert all(np.isfinite(scores[k]) for k in ("fid", "sfid", "inception_score", "precision", "recall")) and scores["fid"] > 0

"The latent space (lesson 11): SD-VAE's code path, the shipped digits VAE, the sharded latent store, gat-extract and bad files."
import math, time

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
import numpy as np
from PIL import Image
from torch.utils.data import TensorDataset

from gat_tutorial.data import DataError, DigitsDataset
from gat_tutorial.latents import (DIGITS_VAE_DIR, MANIFEST, SD_VAE, SD_VAE_EMA, SD_VAE_SCALE, LatentDataset, LatentVAE,
                                  extract_latents, load_digits_vae, main as extract_main)

SD_VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=256, layers_per_block=2,
                     block_out_channels=(128, 256, 512, 512),
                     down_block_types=('DownEncoderBlock2D',) * 4, up_block_types=('UpDecoderBlock2D',) * 4)
TINY_CONFIG = dict(in_channels=1, out_channels=1, latent_channels=4, sample_size=16, block_out_channels=(32, 32),
                   down_block_types=('DownEncoderBlock2D',) * 2, up_block_types=('UpDecoderBlock2D',) * 2)


@pytest.fixture(scope='module')
def digits():
    return load_digits_vae()


def test_sd_vae_from_a_local_folder(tmp_path):
    torch.manual_seed(0)
    AutoencoderKL(**SD_VAE_CONFIG).save_pretrained(tmp_path, safe_serialization=True)
    vae = LatentVAE.from_pretrained(tmp_path)
    assert (vae.scaling_factor, vae.shift) == (SD_VAE_SCALE, 0.0)
    mean, std = vae.encode(torch.rand(1, 3, 256, 256) * 2 - 1)
    assert mean.shape == std.shape == (1, 4, 32, 32) and (std > 0).all()
    assert vae.sample(mean, std).shape == (1, 4, 32, 32)


@pytest.mark.parametrize('name', [SD_VAE, SD_VAE_EMA])
def test_missing_hub_weights_fail_fast_in_one_line(name):
    t0 = time.time()
    with pytest.raises(FileNotFoundError) as e: LatentVAE.from_pretrained(name)
    assert time.time() - t0 < 1
    msg = str(e.value)
    assert '\n' not in msg and f'hf download {name}' in msg and 'huggingface-cli download' in msg


def test_a_folder_without_weights_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f'{tmp_path}: not a diffusers AutoencoderKL folder'):
        LatentVAE.from_pretrained(tmp_path)


def test_shipped_weights_are_small_and_found_from_the_package():
    assert DIGITS_VAE_DIR.parent.name == 'data' and (DIGITS_VAE_DIR.parents[1] / 'gat_tutorial').is_dir()
    files = {p.name: p.stat().st_size for p in DIGITS_VAE_DIR.iterdir()}
    assert set(files) == {'config.json', 'diffusion_pytorch_model.safetensors'}
    assert sum(files.values()) < 5e6


def test_digits_vae_reconstructs_and_scales_to_unit_std(digits):
    val = DigitsDataset('val').images
    mean, std = digits.encode(val)
    assert mean.shape == (len(val), 4, 8, 8)
    recon = digits.decode((mean - digits.shift) * digits.scaling_factor).clamp(-1, 1)
    assert 10 * math.log10(4 / F.mse_loss(recon, val).item()) >= 24
    z = digits.sample(mean, std, generator=torch.Generator().manual_seed(0))
    assert 0.8 <= z.std().item() <= 1.25


def test_sample_then_decode_inverts_the_scaling():
    torch.manual_seed(0)
    vae = AutoencoderKL(**TINY_CONFIG)
    lvae = LatentVAE(vae, scaling_factor=0.25, shift=-0.3)
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    mean, std = lvae.encode(x)
    z = lvae.sample(mean, torch.zeros_like(std))
    torch.testing.assert_close(z, (mean + 0.3) * 0.25)
    with torch.no_grad(): torch.testing.assert_close(lvae.decode(z), vae.decode(mean).sample, atol=1e-5, rtol=1e-5)


def test_missing_digits_vae_names_the_folder(tmp_path):
    with pytest.raises(DataError, match=f'{tmp_path}: no digits VAE'): load_digits_vae(tmp_path)


def _tiny_dataset(n=10):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.rand(n, 1, 16, 16, generator=g) * 2 - 1, torch.arange(n) % 3)


@pytest.mark.parametrize('dtype, tol', [('float32', 1e-5), ('bfloat16', 2 ** -8)])
def test_shards_round_trip(tmp_path, dtype, tol):
    torch.manual_seed(0)
    vae = LatentVAE(AutoencoderKL(**TINY_CONFIG), scaling_factor=0.5, shift=0.2)
    data = _tiny_dataset()
    out = extract_latents(data, vae, tmp_path / 'sub', 'tiny', 16, dtype, shard_size=4, batch_size=3, progress=False)
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST] + [f'shard_0000{k}.{e}' for k in range(3) for e in ('json', 'npy')]
    ds = LatentDataset(out)
    mean, std = vae.encode(data.tensors[0])
    torch.testing.assert_close(ds.mean[:], mean, atol=tol, rtol=tol)
    torch.testing.assert_close(ds.std[torch.tensor([9, 3, 4])], std[[9, 3, 4]], atol=tol, rtol=tol)   # across shards
    assert torch.equal(ds.labels, data.tensors[1]) and len(ds) == 10
    assert (ds.scaling_factor, ds.shift) == (0.5, 0.2) and ds.manifest['dtype'] == dtype and ds.manifest['vae'] == 'tiny'
    m, s, y = ds[7]
    assert torch.equal(m, ds.mean[7]) and torch.equal(s, ds.std[7]) and y == 7 % 3


def test_a_failed_extraction_keeps_finished_shards_and_a_rerun_finishes(tmp_path):
    torch.manual_seed(0)
    vae = LatentVAE(AutoencoderKL(**TINY_CONFIG), scaling_factor=1.0)

    class Broken(TensorDataset):
        def __getitem__(self, i):
            if i == 7: raise RuntimeError('disk gone')                 # shard 1's second batch: half written
            return super().__getitem__(i)

    data = _tiny_dataset()
    with pytest.raises(RuntimeError, match='disk gone'):
        extract_latents(Broken(*data.tensors), vae, tmp_path, shard_size=4, batch_size=2, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['shard_00000.json', 'shard_00000.npy', 'shard_00001.tmp.npy']
    first = (tmp_path / 'shard_00000.npy').stat().st_mtime_ns
    extract_latents(data, vae, tmp_path, shard_size=4, batch_size=2, progress=False)
    assert (tmp_path / 'shard_00000.npy').stat().st_mtime_ns == first and len(LatentDataset(tmp_path)) == 10


@pytest.mark.parametrize('damage, says', [('no_manifest', 'no latent manifest'), ('manifest', 'manifest.json: not JSON'),
                                          ('truncated', 'shard_00001.npy: not a readable latent shard'),
                                          ('missing_shard', 'shard_00002.npy: not a readable latent shard'),
                                          ('wrong_shape', 'shard_00000.npy: holds (4, 3, 4, 4, 4)')])
def test_bad_latent_folders_name_the_file(tmp_path, damage, says):
    torch.manual_seed(0)
    out = extract_latents(_tiny_dataset(), LatentVAE(AutoencoderKL(**TINY_CONFIG), 1.0), tmp_path, shard_size=4, progress=False)
    if damage == 'no_manifest': (out / MANIFEST).unlink()
    if damage == 'manifest': (out / MANIFEST).write_text('{')
    if damage == 'truncated': (out / 'shard_00001.npy').write_bytes((out / 'shard_00001.npy').read_bytes()[:-20])
    if damage == 'missing_shard': (out / 'shard_00002.npy').unlink()
    if damage == 'wrong_shape': np.save(out / 'shard_00000.npy', np.zeros((4, 3, 4, 4, 4), np.uint16))
    with pytest.raises(DataError) as e: LatentDataset(out)
    assert says in str(e.value) and str(out) in str(e.value) and '\n' not in str(e.value)


def test_gat_extract_command(tmp_path, capsys):
    extract_main(['digits', str(tmp_path / 'd'), '--vae', 'digits', '--dtype', 'float32', '--workers', '0'])
    assert capsys.readouterr().out.strip() == f"1437 images -> {tmp_path / 'd' / MANIFEST}"
    ds = LatentDataset(tmp_path / 'd')
    assert ds.manifest['image_size'] == 32 and ds.manifest['classes'] == [str(c) for c in range(10)]


@pytest.mark.parametrize('problem', ['missing', 'corrupt'])
def test_gat_extract_bad_input_is_one_line(tmp_path, capsys, problem):
    (tmp_path / 'imgs' / 'cat').mkdir(parents=True)
    for i in range(3): Image.new('RGB', (40, 30), (i, 0, 0)).save(tmp_path / 'imgs' / 'cat' / f'{i}.png')
    (tmp_path / 'imgs' / 'cat' / '1.png').write_bytes(b'not a png')
    root = tmp_path / ('nowhere' if problem == 'missing' else 'imgs')
    with pytest.raises(SystemExit) as e:
        extract_main([str(root), str(tmp_path / 'out'), '--vae', str(tmp_path / 'novae'), '--workers', '2'] if problem == 'missing'
                     else [str(root), str(tmp_path / 'out'), '--vae', 'digits', '--image_size', '32', '--workers', '2'])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert (f'{root}: folder not found' if problem == 'missing' else "1.png: not a readable image") in err

"The latent space (lesson 11): SD-VAE's code path, the shipped digits VAE, the latent cache and its bad files."
import math, time

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from safetensors.torch import save_file
from torch.utils.data import TensorDataset

from gat_tutorial.data import DataError, DigitsDataset
from gat_tutorial.latents import (DIGITS_VAE_DIR, SD_VAE, SD_VAE_EMA, SD_VAE_SCALE, LatentDataset, LatentVAE,
                                  cache_latents, load_digits_vae)

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


def test_cache_round_trip(tmp_path):
    torch.manual_seed(0)
    vae = LatentVAE(AutoencoderKL(**TINY_CONFIG), scaling_factor=0.5, shift=0.2)
    data = _tiny_dataset()
    path = cache_latents(data, vae, tmp_path / 'sub' / 'lat.safetensors', batch_size=4)
    assert sorted(p.name for p in path.parent.iterdir()) == ['lat.safetensors']
    ds = LatentDataset(path)
    mean, std = vae.encode(data.tensors[0])
    torch.testing.assert_close(ds.mean, mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ds.std, std, atol=1e-5, rtol=1e-5)
    assert torch.equal(ds.labels, data.tensors[1]) and len(ds) == 10
    assert (ds.scaling_factor, ds.shift) == (0.5, 0.2)
    m, s, y = ds[7]
    assert torch.equal(m, ds.mean[7]) and torch.equal(s, ds.std[7]) and y == 7 % 3


def test_a_failed_cache_run_keeps_the_old_file(tmp_path):
    torch.manual_seed(0)
    vae = LatentVAE(AutoencoderKL(**TINY_CONFIG), scaling_factor=1.0)
    path = cache_latents(_tiny_dataset(), vae, tmp_path / 'lat.safetensors')
    before = path.read_bytes()

    class Broken(torch.utils.data.Dataset):
        def __len__(self): return 8
        def __getitem__(self, i):
            if i == 5: raise RuntimeError('disk gone')
            return torch.zeros(1, 16, 16), 0

    with pytest.raises(RuntimeError, match='disk gone'): cache_latents(Broken(), vae, path, batch_size=4)
    assert path.read_bytes() == before


@pytest.mark.parametrize('content, says', [(None, 'no latent cache'), (b'garbage', 'not a readable'),
                                           ('truncated', 'not a readable'), ('no_std', "latent cache lacks ['std']")])
def test_bad_cache_files_name_the_path(tmp_path, content, says):
    path = tmp_path / 'bad.safetensors'
    full = dict(mean=torch.zeros(4, 4, 2, 2), std=torch.ones(4, 4, 2, 2), labels=torch.arange(4))
    if content == 'truncated':
        save_file(full, path); path.write_bytes(path.read_bytes()[:-20])
    elif content == 'no_std':
        save_file({k: v for k, v in full.items() if k != 'std'}, path)
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError) as e: LatentDataset(path)
    assert str(e.value).startswith(f'{path}: {says}') and '\n' not in str(e.value)

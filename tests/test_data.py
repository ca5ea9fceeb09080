"Tests for gat_tutorial.data: the digits split, center_crop_arr against DiT, torchvision and folder datasets, bad input."
import struct

import matplotlib
matplotlib.use('Agg')
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from gat_tutorial.data import (DATASETS, DIGITS_VAL, DataError, DigitsDataset, ImageFolderDataset, center_crop_arr,
                               get_dataset, show_grid)


def dit_center_crop_arr(pil_image, image_size):
    "DiT train.py `center_crop_arr` (ADM's center crop), verbatim."
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(
            tuple(x // 2 for x in pil_image.size), resample=Image.BOX
        )

    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(
        tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC
    )

    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size])


def write_png(path, w, h, seed=0, value=None):
    "Write a w x h RGB PNG to `path`: random pixels, or all `value`."
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((h, w, 3), value, np.uint8) if value is not None else \
        np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)


def data_error(f):
    "Call `f`, expect a DataError, check its message is one line, and return the message."
    with pytest.raises(DataError) as e: f()
    msg = str(e.value)
    assert msg and '\n' not in msg
    return msg


@pytest.fixture(scope='module')
def splits(): return DigitsDataset('train'), DigitsDataset('val')


@pytest.fixture
def pictures(tmp_path):
    "root/cats and root/dogs, three PNGs each, of different sizes and aspect ratios."
    root = tmp_path / 'pictures'
    for i, (w, h) in enumerate([(40, 40), (64, 48), (33, 90)]):
        write_png(root / 'cats' / f'{i}.png', w, h, seed=i)
        write_png(root / 'dogs' / f'{i}.png', h, w, seed=10 + i)
    return root


# ---------------------------------------------------------------- digits

def test_split_is_disjoint_and_complete(splits):
    train, val = splits
    assert len(val) == DIGITS_VAL and len(train) + len(val) == len(load_digits().images)
    assert set(train.indices.tolist()).isdisjoint(val.indices.tolist())
    assert sorted(train.indices.tolist() + val.indices.tolist()) == list(range(len(train) + len(val)))
    for ds in splits: assert (ds.indices[1:] > ds.indices[:-1]).all()   # kept in load_digits order


def test_split_is_deterministic_and_seeded(splits):
    train, val = splits
    again = DigitsDataset('val')
    assert torch.equal(again.indices, val.indices) and torch.equal(again.images, val.images)
    assert torch.equal(DigitsDataset('train').labels, train.labels)
    assert not torch.equal(DigitsDataset('val', seed=1).indices, val.indices)


@pytest.mark.parametrize("split", ['train', 'val'])
def test_split_is_stratified(split, splits):
    ds = splits[split == 'val']
    all_counts = torch.bincount(torch.from_numpy(load_digits().target))
    fair = all_counts * len(ds) / all_counts.sum()
    assert (torch.bincount(ds.labels, minlength=10) - fair).abs().max() <= 1


def test_shapes_dtypes_and_range(splits):
    train, val = splits
    assert train.images.shape == (len(train), 1, 32, 32) and train.images.dtype == torch.float32
    assert train.labels.shape == (len(train),) and train.labels.dtype == torch.int64
    x, y = val[3]
    assert x.shape == (1, 32, 32) and y.dtype == torch.int64 and y == val.labels[3]
    for ds in splits:
        assert ds.images.min() == -1 and ds.images.max() == 1
    assert train.classes == [str(c) for c in range(10)] and train.num_classes == 10
    assert DigitsDataset('val', size=16).images.shape == (DIGITS_VAL, 1, 16, 16)


def test_digits_are_load_digits_scaled_to_unit_range():
    digits = load_digits()
    ds = DigitsDataset('val', size=8)   # no resize: the raw values, mapped 0..16 -> -1..1
    expected = torch.tensor(digits.images[ds.indices.numpy()], dtype=torch.float32) / 8 - 1
    assert torch.equal(ds.images[:, 0], expected)
    assert torch.equal(ds.labels, torch.from_numpy(digits.target[ds.indices.numpy()]))


def pil_bilinear(images, size):
    "Resize (N, 1, H, W) float images with PIL's (antialiased) bilinear filter, the reference torch's antialias follows."
    return torch.from_numpy(np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR))
                                      for im in images[:, 0].numpy()]))[:, None]


@pytest.mark.parametrize("size", [32, 20, 5, 4])
def test_digits_resize_is_antialiased_bilinear(size):
    raw = DigitsDataset('val', size=8).images
    ours = DigitsDataset('val', size=size).images
    assert torch.allclose(ours, pil_bilinear(raw, size), atol=1e-5)
    if size < 8:   # shrinking: antialiasing averages over the footprint instead of sampling 4 pixels
        plain = torch.nn.functional.interpolate(raw, size=size, mode='bilinear', antialias=False)
        assert (ours - plain).abs().max() > 0.1


@pytest.mark.parametrize("kwargs,msg", [(dict(split='test'), 'valid splits: train, val'),
                                        (dict(size=0), 'positive integer'), (dict(size=-3), 'positive integer'),
                                        (dict(size=2.5), 'positive integer'), (dict(size='32'), 'positive integer')])
def test_digits_bad_arguments(kwargs, msg):
    with pytest.raises(ValueError, match=msg): DigitsDataset(**kwargs)


# ---------------------------------------------------------------- center crop

@pytest.mark.parametrize("w,h,size", [(600, 400, 64), (257, 311, 32), (1536, 1024, 256), (40, 17, 32), (64, 64, 64),
                                      (129, 130, 64), (1000, 33, 16), (2048, 2048, 256), (500, 375, 256)])
@pytest.mark.parametrize("mode", ['RGB', 'L'])
def test_center_crop_matches_dit(w, h, size, mode):
    rng = np.random.default_rng(w * h)
    noise = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    ramp = np.add.outer(np.arange(h), np.arange(w)) % 256
    img = Image.fromarray(((noise.astype(int) + ramp[..., None]) // 2).astype(np.uint8)).convert(mode)
    ours, ref = center_crop_arr(img, size), dit_center_crop_arr(img, size)
    assert ours.size == (size, size) and ours.mode == mode
    assert np.array_equal(np.asarray(ours), np.asarray(ref))


@pytest.mark.parametrize("size", [0, -1, 2.0])
def test_center_crop_bad_size(size):
    assert 'positive integer' in data_error(lambda: center_crop_arr(Image.new('RGB', (64, 64)), size))


# ---------------------------------------------------------------- image folders

def test_folder_dataset(pictures):
    ds = ImageFolderDataset(pictures, image_size=32)
    assert ds.classes == ['cats', 'dogs'] and ds.num_classes == 2 and len(ds) == 6 and ds.verify() == 6
    assert [y for _, y in ds.samples] == [0, 0, 0, 1, 1, 1]
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
        crop = dit_center_crop_arr(Image.open(ds.samples[i][0]).convert('RGB'), 32)
        expected = torch.from_numpy(np.array(crop)).permute(2, 0, 1).float() / 127.5 - 1
        assert torch.allclose(x, expected, atol=1e-6)


def test_folder_white_and_black_map_to_plus_and_minus_one(tmp_path):
    write_png(tmp_path / 'a' / 'white.png', 40, 40, value=255)
    write_png(tmp_path / 'b' / 'black.png', 40, 40, value=0)
    ds = ImageFolderDataset(tmp_path, image_size=32)
    assert torch.equal(ds[0][0], torch.ones(3, 32, 32)) and torch.equal(ds[1][0], -torch.ones(3, 32, 32))


def test_folder_missing(tmp_path):
    msg = data_error(lambda: ImageFolderDataset(tmp_path / 'nope', 32))
    assert str(tmp_path / 'nope') in msg and 'not found' in msg


def test_folder_is_a_file(tmp_path):
    write_png(tmp_path / 'one.png', 40, 40)
    assert str(tmp_path / 'one.png') in data_error(lambda: ImageFolderDataset(tmp_path / 'one.png', 32))


def test_folder_without_class_subfolders(tmp_path):
    write_png(tmp_path / 'loose.png', 40, 40)   # images straight in root: no class folders
    msg = data_error(lambda: ImageFolderDataset(tmp_path, 32))
    assert str(tmp_path) in msg and 'no class subfolders' in msg


def test_folder_empty(tmp_path):
    assert 'no class subfolders' in data_error(lambda: ImageFolderDataset(tmp_path, 32))


def test_class_folder_without_images(tmp_path):
    write_png(tmp_path / 'cats' / '0.png', 40, 40)
    (tmp_path / 'dogs').mkdir()
    (tmp_path / 'dogs' / 'readme.txt').write_text('no pictures here')
    msg = data_error(lambda: ImageFolderDataset(tmp_path, 32))
    assert str(tmp_path) in msg and 'dogs' in msg and 'cats' not in msg.split(str(tmp_path))[-1]


@pytest.mark.parametrize("content", [b'this is not a PNG', b''])
def test_corrupt_file_is_named_on_load_and_by_verify(pictures, content):
    bad = pictures / 'cats' / 'broken.png'
    bad.write_bytes(content)
    ds = ImageFolderDataset(pictures, 32)           # building does not open files
    i = [p for p, _ in ds.samples].index(str(bad))
    for f in (lambda: ds[i], ds.verify):
        msg = data_error(f)
        assert msg.startswith(str(bad)) and 'not a readable image' in msg
    assert ds[0][0].shape == (3, 32, 32)            # the good files still load


def test_truncated_file_is_named(pictures):
    good = (pictures / 'dogs' / '0.png').read_bytes()
    bad = pictures / 'dogs' / 'truncated.png'
    bad.write_bytes(good[:len(good) // 2])
    msg = data_error(ImageFolderDataset(pictures, 32).verify)
    assert msg.startswith(str(bad)) and 'not a readable image' in msg


def test_image_smaller_than_image_size_is_upsampled_as_adm_does(pictures):
    ds = ImageFolderDataset(pictures, 48)
    x = ds[0][0]                                     # cats/0.png is 40x40
    assert x.shape == (3, 48, 48) and ds.verify() == len(ds)
    expected = torch.from_numpy(np.array(center_crop_arr(Image.open(pictures / 'cats' / '0.png').convert('RGB'), 48)))
    torch.testing.assert_close(x, expected.permute(2, 0, 1).float() / 127.5 - 1, atol=1e-6, rtol=0)


@pytest.mark.parametrize("size", [0, -32, 32.5, None])
def test_folder_bad_image_size(pictures, size):
    assert 'positive integer' in data_error(lambda: ImageFolderDataset(pictures, size))


# ---------------------------------------------------------------- get_dataset and torchvision

def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as e: get_dataset('nope')
    assert "'nope'" in str(e.value) and all(name in str(e.value) for name in DATASETS)
    assert DATASETS == ('digits', 'mnist', 'fashion-mnist', 'cifar10', 'folder')


def test_get_dataset_routes(pictures, splits):
    ds = get_dataset('digits', 'val', image_size=16)
    assert isinstance(ds, DigitsDataset) and ds.images.shape[1:] == (1, 16, 16)
    assert torch.equal(ds.indices, splits[1].indices)
    folder = get_dataset('folder', root=pictures, image_size=24)
    assert isinstance(folder, ImageFolderDataset) and folder[0][0].shape == (3, 24, 24)
    assert 'needs root=' in data_error(lambda: get_dataset('folder'))
    with pytest.raises(ValueError, match='valid splits'): get_dataset('digits', split='valid')
    with pytest.raises(ValueError, match='valid splits'): get_dataset('mnist', split='test')


@pytest.mark.parametrize("name,subdir", [('mnist', 'MNIST/raw'), ('fashion-mnist', 'FashionMNIST/raw'),
                                         ('cifar10', 'cifar-10-batches-py')])
@pytest.mark.parametrize("split", ['train', 'val'])
def test_torchvision_without_files_says_where_and_how(tmp_path, name, subdir, split):
    msg = data_error(lambda: get_dataset(name, split, root=tmp_path, download=False))
    assert str(tmp_path / subdir) in msg and 'download=True' in msg and name in msg
    assert list(tmp_path.iterdir()) == []           # nothing was downloaded or created


def write_mnist(raw, prefix, images, labels):
    "Write `images` (N, 28, 28) uint8 and `labels` (N,) in MNIST's IDX format, uncompressed, as torchvision reads it."
    raw.mkdir(parents=True, exist_ok=True)
    (raw / f'{prefix}-images-idx3-ubyte').write_bytes(struct.pack('>IIII', 0x803, len(images), 28, 28) + images.tobytes())
    (raw / f'{prefix}-labels-idx1-ubyte').write_bytes(struct.pack('>II', 0x801, len(labels)) + labels.tobytes())


def test_mnist_from_local_files(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    images[0] = 255
    write_mnist(tmp_path / 'MNIST' / 'raw', 'train', images, np.array([7, 1, 2, 3, 4], np.uint8))
    write_mnist(tmp_path / 'MNIST' / 'raw', 't10k', images[:2], np.array([9, 8], np.uint8))
    train = get_dataset('mnist', 'train', root=tmp_path, image_size=32)
    val = get_dataset('mnist', 'val', root=tmp_path, image_size=32)
    assert len(train) == 5 and len(val) == 2 and train.num_classes == 10
    x, y = train[0]
    assert x.shape == (1, 32, 32) and y == 7 and torch.equal(x, torch.ones(1, 32, 32))
    x, y = val[1]
    assert y == 8 and -1 <= x.min() < x.max() <= 1
    assert get_dataset('mnist', root=tmp_path, image_size=28)[1][0].shape == (1, 28, 28)
    with pytest.raises(ValueError, match='positive integer'): get_dataset('mnist', root=tmp_path, image_size=0)


# ---------------------------------------------------------------- show_grid

def test_show_grid_layout_and_labels(splits):
    train = splits[0]
    fig = show_grid(train.images[:10], train.labels[:10], ncols=4)
    ax = fig.axes[0]
    assert ax.images[0].get_array().shape == (3 * 32 + 4 * 2, 4 * 32 + 5 * 2, 3)
    assert [t.get_text() for t in ax.texts] == [str(int(y)) for y in train.labels[:10]]
    assert ax.texts[6].get_position() == (2 * (32 + 2) + 2, 1 * (32 + 2) + 2)   # tile 6: row 1, column 2
    assert len(show_grid(train.images[:9]).axes[0].texts) == 0
    rgb = show_grid(torch.rand(5, 3, 16, 16) * 2 - 1, labels=['a', 'b', 'c', 'd', 'e'])
    assert [t.get_text() for t in rgb.axes[0].texts] == list('abcde')
    matplotlib.pyplot.close('all')


def test_show_grid_draws_into_a_given_ax(splits):
    fig, axs = matplotlib.pyplot.subplots(1, 2)
    assert show_grid(splits[1].images[:4], ax=axs[1]) is fig and len(axs[1].images) == 1 and len(axs[0].images) == 0
    tile = axs[1].images[0].get_array()[2:34, 2:34]
    assert np.allclose(tile, ((splits[1].images[0, 0] + 1) / 2).numpy()[..., None].repeat(3, -1), atol=1e-6)
    with pytest.raises(ValueError, match=r'\(N, C, H, W\)'): show_grid(splits[1].images[0])
    matplotlib.pyplot.close('all')

"""ImageFolder: class indices, ADM centre crop, native sizes, lazy sizes, errors, batching."""
import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from flexgen.datasets.batch_samplers import BucketBatchSampler
from flexgen.datasets.collate import jagged_collate
from flexgen.datasets.image_folder import ImageFolder, capped_size, center_crop_arr
from flexgen.registry import DATASETS


def write(path, array):
    """Save a uint8 [H, W, 3] array as a PNG (creating the folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)
    return path


def ramp(h, w, offset=0):
    """A [H, W, 3] uint8 image whose every pixel is distinct and known."""
    y, x = np.mgrid[:h, :w]
    return np.stack([(y * 7 + offset) % 256, (x * 5 + offset) % 256, (x + y) % 256], -1)


def to_unit(array):
    """uint8 [H, W, 3] -> the dataset's [3, H, W] float in [-1, 1]."""
    return torch.from_numpy(np.asarray(array, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1


@pytest.fixture
def tree(tmp_path):
    """Three classes (one of them nested), sizes H x W as in the file names."""
    root = tmp_path / 'data'
    write(root / 'zebra' / 'a.png', ramp(20, 37))
    write(root / 'apple' / 'b.PNG', ramp(32, 16, 1))
    write(root / 'apple' / 'a.jpg', ramp(16, 32, 2))
    write(root / 'mango' / 'sub' / 'c.bmp', ramp(24, 24, 3))
    (root / 'mango' / 'notes.txt').write_text('not an image')
    (root / 'empty_class').mkdir()
    return root


def test_classes_labels_and_item_format(tree):
    dataset = DATASETS.build(dict(type='ImageFolder', data_root=str(tree), resolution=8))
    assert dataset.classes == ('apple', 'empty_class', 'mango', 'zebra')
    assert dataset.metainfo == dict(classes=dataset.classes)
    names = [p.split('data/')[1] for p, _ in dataset.samples]
    assert names == ['apple/a.jpg', 'apple/b.PNG', 'mango/sub/c.bmp', 'zebra/a.png']
    assert [dataset.get_label(i) for i in range(4)] == [0, 0, 2, 3]
    for i in range(4):
        item = dataset[i]
        assert item['data_samples'] == dict(label=dataset.get_label(i), index=i)
        x = item['inputs']
        assert x.shape == (3, 8, 8) and x.dtype == torch.float32
        assert -1 <= x.min() and x.max() <= 1
    # A chosen subset: labels follow the given order.
    subset = ImageFolder(str(tree), 8, classes=['zebra', 'apple'])
    assert [(p.split('data/')[1], y) for p, y in subset.samples] == \
        [('zebra/a.png', 0), ('apple/a.jpg', 1), ('apple/b.PNG', 1)]


def test_center_crop_closed_form(tmp_path):
    # 16 x 32 of constant 2x2 blocks: one BOX halving (16 >= 2 * 8) gives the block colours
    # exactly, the BICUBIC step is then the identity (short side already 8), and the crop
    # keeps columns [4, 12) of the 8 x 16 block image.
    blocks = ramp(8, 16)
    big = blocks.repeat(2, 0).repeat(2, 1)
    write(tmp_path / 'd' / 'c' / 'x.png', big)
    dataset = ImageFolder(str(tmp_path / 'd'), resolution=8)
    assert torch.equal(dataset[0]['inputs'], to_unit(blocks[:, 4:12]))
    # Without halving (short side 8 < 16): the crop alone, rows [3, 11) of a 14 x 8 image.
    image = ramp(14, 8)
    write(tmp_path / 'e' / 'c' / 'x.png', image)
    assert torch.equal(ImageFolder(str(tmp_path / 'e'), 8)[0]['inputs'], to_unit(image[3:11]))
    # Upscaling a constant image stays constant.
    write(tmp_path / 'f' / 'c' / 'x.png', np.full((5, 7, 3), 200))
    assert torch.equal(ImageFolder(str(tmp_path / 'f'), 12)[0]['inputs'],
                       torch.full((3, 12, 12), 200 / 127.5 - 1))
    # Two halvings (40 >= 20, then 20 >= 20) of constant 4x4 blocks: exact block colours.
    blocks = ramp(10, 18)
    out = center_crop_arr(Image.fromarray(blocks.repeat(4, 0).repeat(4, 1).astype(np.uint8)), 10)
    assert np.array_equal(np.asarray(out), blocks[:, 4:14])


def test_native_sizes_multiple_of_crop_and_cap(tree):
    dataset = ImageFolder(str(tree), multiple_of=8)
    # (H, W) per file: 16x32, 32x16, 24x24, 20x37 -> 16x32 (centre crop of the last).
    assert [dataset.get_size(i) for i in range(4)] == [(16, 32), (32, 16), (24, 24), (16, 32)]
    for i in range(4):
        assert tuple(dataset[i]['inputs'].shape[1:]) == dataset.get_size(i)
    # The crop is centred: offsets ((20 - 16) // 2, (37 - 32) // 2) = (2, 2).
    assert torch.equal(dataset[3]['inputs'], to_unit(ramp(20, 37)[2:18, 2:34]))
    # No multiple: exact native pixels.
    native = ImageFolder(str(tree))
    assert native.get_size(3) == (20, 37)
    assert torch.equal(native[3]['inputs'], to_unit(ramp(20, 37)))
    # max_pixels: area-preserving downscale, then the multiple-of crop.
    capped = ImageFolder(str(tree), max_pixels=128, multiple_of=4)
    assert capped.get_size(0) == (8, 16)   # 16x32 = 512 px, scale 1/2 exactly
    assert capped.get_size(2) == (8, 8)    # 24x24 -> 11x11 (121 <= 128) -> 8x8
    for i in range(4):
        assert tuple(capped[i]['inputs'].shape[1:]) == capped.get_size(i)


def test_capped_size():
    assert capped_size(37, 20, None) == (37, 20)
    assert capped_size(32, 16, 512) == (32, 16)
    assert capped_size(32, 16, 128) == (16, 8)
    for w, h, cap in [(1000, 3, 500), (640, 480, 65536), (7, 1000, 10), (333, 777, 4096)]:
        cw, ch = capped_size(w, h, cap)
        assert cw * ch <= cap and cw >= 1 and ch >= 1
        assert (cw + 1) * (ch + 1) > cap  # not needlessly small


def test_image_smaller_than_multiple_of_is_named(tmp_path):
    write(tmp_path / 'c' / 'x.png', ramp(8, 20))
    with pytest.raises(ValueError, match=r'x\.png.*20x8.*smaller than multiple_of=16'):
        ImageFolder(str(tmp_path), multiple_of=16).get_size(0)


def test_get_size_does_not_decode_and_caches(tree, monkeypatch):
    dataset = ImageFolder(str(tree), multiple_of=8)
    opened = []
    real_open = Image.open

    def counting_open(path, *args, **kwargs):
        opened.append(path)
        return real_open(path, *args, **kwargs)

    def no_decoding(self, *args, **kwargs):
        raise AssertionError('get_size decoded pixels')

    monkeypatch.setattr(Image, 'open', counting_open)
    monkeypatch.setattr(ImageFile.ImageFile, 'load', no_decoding)
    sizes = [dataset.get_size(i) for i in range(4)]
    assert sizes == [dataset.get_size(i) for i in range(4)]  # second pass: from the cache
    assert len(opened) == 4
    with pytest.raises(AssertionError, match='decoded'):  # the patch does catch decoding
        dataset[0]
    # A fixed resolution reads no file at all.
    fixed = ImageFolder(str(tree), resolution=16)
    assert [fixed.get_size(i) for i in range(4)] == [(16, 16)] * 4 and len(opened) == 5


def test_hflip_seeded_per_index(tree):
    plain = ImageFolder(str(tree), resolution=8)
    a = ImageFolder(str(tree), resolution=8, hflip=True, seed=0)
    b = ImageFolder(str(tree), resolution=8, hflip=True, seed=0)
    flips = [a.flipped(i) for i in range(4)]
    assert flips == [b.flipped(i) for i in range(4)]
    for i in range(4):
        expected = plain[i]['inputs'].flip(-1) if flips[i] else plain[i]['inputs']
        assert torch.equal(a[i]['inputs'], expected)
    # Over many seeds, each index is mirrored about half the time.
    rate = np.mean([ImageFolder(str(tree), 8, hflip=True, seed=s).flipped(1)
                    for s in range(200)])
    assert 0.35 < rate < 0.65


def test_errors_name_the_path(tmp_path):
    missing = tmp_path / 'nowhere'
    with pytest.raises(FileNotFoundError, match=r'nowhere.*data_root'):
        ImageFolder(str(missing))
    (tmp_path / 'bare').mkdir()
    with pytest.raises(ValueError, match=r'bare.*no class sub-folders'):
        ImageFolder(str(tmp_path / 'bare'))
    (tmp_path / 'noimg' / 'cls').mkdir(parents=True)
    (tmp_path / 'noimg' / 'cls' / 'readme.txt').write_text('x')
    with pytest.raises(ValueError, match=r'no images.*noimg'):
        ImageFolder(str(tmp_path / 'noimg'))
    write(tmp_path / 'ok' / 'cls' / 'x.png', ramp(8, 8))
    with pytest.raises(FileNotFoundError, match=r"\['dog'\].*ok"):
        ImageFolder(str(tmp_path / 'ok'), classes=['cls', 'dog'])
    # A corrupt file is found (listing never decodes) and fails when read, by name.
    bad = tmp_path / 'ok' / 'cls' / 'y.png'
    bad.write_bytes(b'\x89PNG\r\n\x1a\n' + b'garbage' * 10)
    dataset = ImageFolder(str(tmp_path / 'ok'), resolution=8)
    assert len(dataset) == 2 and dataset[0]['inputs'].shape == (3, 8, 8)
    with pytest.raises(OSError, match=r'y\.png'):
        dataset[1]
    with pytest.raises(OSError, match=r'y\.png'):
        ImageFolder(str(tmp_path / 'ok')).get_size(1)
    # Truncated data behind a valid header: the header reads, decoding fails by name.
    good = (tmp_path / 'ok' / 'cls' / 'x.png').read_bytes()
    (tmp_path / 'ok' / 'cls' / 'z.png').write_bytes(good[:len(good) // 2])
    dataset = ImageFolder(str(tmp_path / 'ok'))
    assert dataset.get_size(2) == (8, 8)
    with pytest.raises(OSError, match=r'z\.png'):
        dataset[2]


def test_through_bucket_sampler_and_jagged_collate(tree):
    for i, (h, w) in enumerate([(16, 32), (16, 32), (32, 16), (24, 24)]):
        write(tree / 'extra' / f'{i}.png', ramp(h, w, i))
    dataset = ImageFolder(str(tree), multiple_of=8)
    sampler = BucketBatchSampler(dataset, batch_size=2, seed=0)
    # 8 images: (16, 32) x 4, (32, 16) x 2, (24, 24) x 2 -> four complete pairs per epoch.
    assert sampler.bucket_sizes == {(16, 32): 4, (24, 24): 2, (32, 16): 2}
    assert len(sampler) == 4 and sampler.num_dropped == 0
    iterator = iter(sampler)
    seen = []
    for _ in range(4):
        indices = next(iterator)
        batch = jagged_collate([dataset[i] for i in indices])
        assert len({tuple(x.shape) for x in batch['inputs']}) == 1
        assert batch['data_samples']['label'].tolist() == [dataset.get_label(i) for i in indices]
        assert batch['data_samples']['index'].tolist() == indices
        seen += indices
    assert sorted(seen) == list(range(8))


def test_image_folder_and_the_latent_encoder_list_the_same_files(tmp_path):
    """One listing rule (image_folder.list_class_images) for ImageFolder and
    tools/encode_latents.py: hidden folders and files are left out, symbolic links (to a
    folder, to a file) are followed, items ordered by label, folder, file name."""
    import os

    from flexgen.datasets.latent_writer import list_images
    root, outside = tmp_path / 'root', tmp_path / 'outside'
    for path in ['cat/b.png', 'cat/sub/a.png', 'cat/t.PNG', 'cat/.thumbs/x.png', 'cat/.hidden.png',
                 'dog/d.jpg', '.cache/c.png']:
        write(root / path, ramp(4, 4))
    write(outside / 'linked_dir' / 'l.png', ramp(4, 4))
    write(outside / 'linked_file.png', ramp(4, 4))
    (root / 'cat' / 'notes.txt').write_text('not an image')
    os.symlink(outside / 'linked_dir', root / 'dog' / 'linked_dir')
    os.symlink(outside / 'linked_file.png', root / 'dog' / 'z.png')
    dataset = ImageFolder(str(root), resolution=4)
    classes, items = list_images(str(root))
    assert classes == list(dataset.classes) == ['cat', 'dog']
    assert [(path, label) for path, label, _ in items] == dataset.samples
    assert [name for _, _, name in items] == ['cat/b', 'cat/t', 'cat/sub/a', 'dog/d', 'dog/z',
                                              'dog/linked_dir/l']

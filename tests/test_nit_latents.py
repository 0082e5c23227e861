"""NiTLatents: NiT's data-meta jsonl + safetensors latents (merged types, per-(seed, index)
flip, REPA images at 16 px per latent cell), header-free get_size / get_label, errors that
name the file and the jsonl line."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from flexgen.datasets.collate import jagged_collate
from flexgen.datasets.image_folder import center_crop_arr
from flexgen.datasets.nit_latents import NiTFileError, NiTLatents
from flexgen.rng import stream_id, uniforms
from flexgen.registry import DATASETS

C = 4
DIRS = {'native-resolution': 'nr', 'fixed-256x256': 'f256', 'fixed-512x512': 'f512'}
# (image file, (W, H) px of the original, type, (latent_h, latent_w), label)
LINES = [
    ('n01/a.png', (50, 30), 'native-resolution', (2, 3), 0),
    ('n01/a.png', (50, 30), 'fixed-256x256', (1, 1), 0),
    ('n02/b.png', (40, 44), 'native-resolution', (3, 2), 1),
    ('n02/b.png', (40, 44), 'fixed-512x512', (2, 2), 1),
    ('n02/c.png', (20, 36), 'native-resolution', (2, 1), 1),
]


def latent_of(i, h, w):
    g = torch.Generator().manual_seed(i)
    return torch.randn(2, C, h, w, generator=g)


def write_line(handle, meta):
    handle.write(json.dumps(meta) + '\n')


@pytest.fixture()
def root(tmp_path):
    rng = np.random.default_rng(0)
    for image_file, (w, h), *_ in LINES:
        path = tmp_path / 'images' / image_file
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    for d in DIRS.values():
        (tmp_path / d).mkdir()
    with open(tmp_path / 'merge_meta.jsonl', 'w') as f:
        for i, (image_file, (w, h), data_type, (lh, lw), label) in enumerate(LINES):
            stem = os.path.splitext(image_file)[0]
            latent_file = f'{stem}.safetensors'
            path = tmp_path / DIRS[data_type] / latent_file
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(dict(latent=latent_of(i, lh, lw),
                           label=torch.tensor(label, dtype=torch.int64)), path)
            meta = dict(image_file=image_file, latent_file=latent_file, ori_w=w, ori_h=h,
                        latent_h=lh, latent_w=lw, image_h=lh * 32, image_w=lw * 32,
                        type=data_type)
            if i != 4:  # the last line has no label field: get_label reads the file's
                meta['label'] = label
            write_line(f, meta)
    return tmp_path


def dirs(root):
    return {t: str(root / d) for t, d in DIRS.items()}


def make(root, **kwargs):
    return NiTLatents(str(root / 'merge_meta.jsonl'), dirs(root), **kwargs)


def test_items_sizes_labels_and_flips(root):
    ds = make(root, seed=2)
    assert len(ds) == 5
    flips = (uniforms(2, torch.arange(5), stream_id("flip")) < 0.5).numpy()
    assert 0 < flips.sum() < 5  # both copies occur for this seed
    for i, (_, _, data_type, (h, w), label) in enumerate(LINES):
        assert ds.get_size(i) == (h, w) and ds.get_label(i) == label
        assert ds.data_type(i) == data_type and ds.flipped(i) == flips[i]
        item = ds[i]
        assert torch.equal(item['inputs'], latent_of(i, h, w)[int(flips[i])])
        assert item['data_samples'] == dict(label=label, index=i)
    again = make(root, seed=2)
    assert all(torch.equal(again[i]['inputs'], ds[i]['inputs']) for i in range(5))
    assert [make(root, flip_prob=0.0).flipped(i) for i in range(5)] == [False] * 5
    assert [make(root, flip_prob=1.0).flipped(i) for i in range(5)] == [True] * 5


def test_sizes_and_labels_do_not_read_latents(root):
    """A latent whose shape disagrees with its line fails only when the item is read."""
    save_file(dict(latent=torch.zeros(2, C, 7, 7), label=torch.tensor(1)),
              root / 'nr' / 'n02' / 'c.safetensors')
    ds = make(root)
    assert ds.get_size(4) == (2, 1) and ds.get_label(4) == 1  # label from the file header
    with pytest.raises(NiTFileError, match=r"c\.safetensors.*\[2, 4, 7, 7\].*line 5 of"):
        ds[4]


def test_type_selection_list_dirs_and_several_jsonl_files(root):
    native = make(root, data_types=['native-resolution'])
    assert len(native) == 3 and [native.get_size(i) for i in range(3)] == [(2, 3), (3, 2), (2, 1)]
    # NiT's config style: data_types and latent_dirs as paired lists.
    paired = NiTLatents(str(root / 'merge_meta.jsonl'), data_types=list(DIRS),
                        latent_dirs=[dirs(root)[t] for t in DIRS], seed=1)
    assert len(paired) == 5
    # The merged set from two files (lines 1-2 and 3-5), in order.
    lines = (root / 'merge_meta.jsonl').read_text().splitlines(keepends=True)
    (root / 'part1.jsonl').write_text(''.join(lines[:2]) + '\n')  # a blank line is skipped
    (root / 'part2.jsonl').write_text(''.join(lines[2:]))
    split = NiTLatents([str(root / 'part1.jsonl'), str(root / 'part2.jsonl')], dirs(root),
                       seed=1)
    assert len(split) == 5
    assert all(torch.equal(split[i]['inputs'], paired[i]['inputs']) for i in range(5))
    with pytest.raises(NiTFileError, match="no line of type \\['fixed-1024x1024'\\]"):
        NiTLatents(str(root / 'merge_meta.jsonl'), dict(dirs(root), **{
            'fixed-1024x1024': str(root / 'nr')}))


def test_repa_images_follow_the_reference(root):
    ds = make(root, image_dir=str(root / 'images'), image_mode='image', seed=5)
    for i, (image_file, _, data_type, (h, w), _) in enumerate(LINES):
        image = ds[i]['data_samples']['image']
        original = Image.open(root / 'images' / image_file).convert('RGB')
        if data_type == 'native-resolution':
            expected = original.resize((w * 16, h * 16), Image.BICUBIC)
        else:
            expected = center_crop_arr(original, h * 16)
        if ds.flipped(i):
            expected = expected.transpose(Image.FLIP_LEFT_RIGHT)
        assert image.dtype == np.uint8 and image.shape == (h * 16, w * 16, 3)
        assert np.array_equal(image, np.asarray(expected))
    batch = jagged_collate([ds[i] for i in range(3)])  # images of different sizes
    groups = batch['data_samples']['image']  # stacked per size, [k, 3, H, W]
    assert [tuple(x.shape) for x in groups.images] == [(1, 3, 32, 48), (1, 3, 16, 16),
                                                      (1, 3, 48, 32)]
    assert [ids.tolist() for ids in groups.index] == [[0], [1], [2]]
    assert np.array_equal(groups.images[2][0].permute(1, 2, 0).numpy(), ds[2]['data_samples']['image'])
    paths = make(root, image_dir=str(root / 'images'), image_mode='path', seed=5)
    sample = paths[2]['data_samples']
    assert sample['image_path'] == str(root / 'images' / 'n02/b.png')
    assert sample['flip'] == ds.flipped(2)
    dino = make(root, image_dir=str(root / 'images'), image_mode='image', image_scale=14)
    assert dino[0]['data_samples']['image'].shape == (28, 42, 3)


def test_missing_and_corrupt_files_name_file_and_line(root):
    (root / 'nr' / 'n01' / 'a.safetensors').unlink()
    (root / 'f512' / 'n02' / 'b.safetensors').write_bytes(b'not a safetensors file')
    ds = make(root)
    with pytest.raises(FileNotFoundError, match=r"nr/n01/a\.safetensors.*line 1 of .*merge"):
        ds[0]
    with pytest.raises(NiTFileError, match=r"f512/n02/b\.safetensors.*line 4 of .*merge"):
        ds[3]
    (root / 'images' / 'n02' / 'c.png').unlink()
    images = make(root, image_dir=str(root / 'images'), image_mode='image')
    with pytest.raises(FileNotFoundError, match=r"images/n02/c\.png.*line 5"):
        images[4]
    with pytest.raises(FileNotFoundError, match='nowhere.jsonl'):
        NiTLatents(str(root / 'nowhere.jsonl'), dirs(root))


def test_non_finite_latent_names_file_and_line(root):
    latent = latent_of(2, 3, 2)
    latent[0, 1, 2, 0] = float('inf')
    save_file(dict(latent=latent, label=torch.tensor(1)), root / 'nr' / 'n02' / 'b.safetensors')
    with pytest.raises(NiTFileError, match=r"nr/n02/b\.safetensors.*line 3 of .*merge_meta"
                                           r"\.jsonl.*NaN or inf values \(1 of 24\)"):
        make(root, flip_prob=0.0)[2]


@pytest.mark.parametrize('line, message', [
    ('{"latent_file": "x.safetensors", "latent_h": 2', r'line 3 of .*bad\.jsonl.* not JSON'),
    ('{"latent_file": "x.safetensors", "latent_h": 2, "type": "native-resolution"}',
     r"line 3 of .*bad\.jsonl.*no \['latent_w'\]"),
    ('{"latent_file": "x.safetensors", "latent_h": 0, "latent_w": 2, '
     '"type": "native-resolution"}', r'bad\.jsonl:3: latent_h must be a positive int, got 0'),
    ('[1, 2]', r'line 3 of .*bad\.jsonl.* not a JSON object'),
])
def test_bad_jsonl_lines_name_file_and_line(root, line, message):
    lines = (root / 'merge_meta.jsonl').read_text().splitlines()
    (root / 'bad.jsonl').write_text('\n'.join(lines[:2] + [line] + lines[2:]) + '\n')
    with pytest.raises(NiTFileError, match=message):
        NiTLatents(str(root / 'bad.jsonl'), dirs(root))


def test_repa_needs_image_file_and_dir(root):
    with pytest.raises(ValueError, match='needs image_dir'):
        make(root, image_mode='image')
    lines = (root / 'merge_meta.jsonl').read_text().splitlines()
    meta = json.loads(lines[1])
    del meta['image_file']
    (root / 'bad.jsonl').write_text('\n'.join([lines[0], json.dumps(meta)]) + '\n')
    with pytest.raises(NiTFileError, match=r"line 2 of .*no \['image_file'\]"):
        NiTLatents(str(root / 'bad.jsonl'), dirs(root), image_dir=str(root / 'images'),
                   image_mode='path')


def test_builds_from_a_config(root):
    ds = DATASETS.build(dict(type='NiTLatents', data_meta=str(root / 'merge_meta.jsonl'),
                             latent_dirs=dirs(root), latent_channels=C))
    assert len(ds) == 5 and ds[0]['inputs'].shape == (C, 2, 3)
    with pytest.raises(NiTFileError, match=r"\[2, 8, 2, 3\]"):
        make(root, latent_channels=8)[0]

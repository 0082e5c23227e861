"""FiTLatents reads FiT's latent folders as the reference IN1kLatentDataset does, and
jagged_collate's max_length checks FiT's token budget on the jagged batch.

The folders are written here by hand in the reference's layout (einops, not flexgen's own
writer): ``feature [2, h, w, 16]`` = the (c p1 p2) patches of the latent and of a second,
independent "mirrored" latent, ``grid [2, h*w]`` from meshgrid(arange(w), arange(h), 'xy'),
``size [2]``, ``label [1]``.
"""
import functools
import os

import numpy as np
import pytest
import torch
from einops import rearrange
from safetensors.torch import save_file

import flexgen.datasets.fit_latents as fit_latents
from flexgen.datasets.batch_samplers import TokenBudgetBatchSampler
from flexgen.datasets.collate import jagged_collate
from flexgen.datasets.fit_latents import FiTFileError, FiTLatents
from flexgen.registry import DATASETS, FUNCTIONS
from flexgen.structures import Geometry, patchify

L = 64  # token budget: folders from_16_to_64, greater_than_64_resize, greater_than_64_crop


def reference_file(path, original, mirrored, class_id, dtype=torch.float32, **override):
    """One file as the reference stores it, from two latents ``[4, 2h, 2w]``."""
    h, w = original.shape[1] // 2, original.shape[2] // 2
    feature = torch.stack([rearrange(z, 'c (h p1) (w p2) -> h w (c p1 p2)', p1=2, p2=2)
                           for z in (original, mirrored)]).to(dtype)
    xs, ys = torch.meshgrid(torch.arange(w), torch.arange(h), indexing='xy')
    tensors = dict(feature=feature, grid=torch.stack([xs.reshape(-1), ys.reshape(-1)]),
                   size=torch.tensor([h, w], dtype=torch.int32),
                   label=torch.tensor([class_id]))
    tensors.update(override)
    save_file({k: v for k, v in tensors.items() if v is not None}, str(path))


def latent_pair(seed, h, w):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 2 * h, 2 * w, generator=g), torch.randn(4, 2 * h, 2 * w, generator=g)


# name -> (folder, tokens (h, w), label); the resize/crop pair "b" has two sizes.
FILES = {
    ('from_16_to_64', 'c'): ((4, 6), 3),
    ('from_16_to_64', 'a'): ((5, 5), 1),
    ('greater_than_64_resize', 'b'): ((6, 10), 2),
    ('greater_than_64_resize', 'd'): ((7, 9), 0),
    ('greater_than_64_crop', 'b'): ((8, 8), 2),
}
# Listing order: from_16_to_64 sorted, resize-only sorted, then the pairs.
ORDER = [('from_16_to_64', 'a'), ('from_16_to_64', 'c'), ('greater_than_64_resize', 'd'),
         ('greater_than_64_resize', 'b')]


@pytest.fixture()
def root(tmp_path):
    latents = {}
    for k, ((folder, name), ((h, w), label)) in enumerate(FILES.items()):
        os.makedirs(tmp_path / folder, exist_ok=True)
        latents[folder, name] = latent_pair(k, h, w)
        reference_file(tmp_path / folder / f'{name}.safetensors', *latents[folder, name], label)
    os.makedirs(tmp_path / 'less_than_16')
    for name in ('tiny1', 'tiny2', 'tiny3'):  # never read: one is not even safetensors
        (tmp_path / 'less_than_16' / f'{name}.safetensors').write_bytes(b'not a file')
    (tmp_path / 'greater_than_64_crop' / 'notes.txt').write_text('ignored')
    return tmp_path, latents


def test_listing_ignores_less_than_16_and_logs_counts(root, monkeypatch):
    path, _ = root
    logged = []
    monkeypatch.setattr(fit_latents, 'print_log', lambda msg, **kw: logged.append(msg))
    dataset = DATASETS.build(dict(type='FiTLatents', data_root=str(path), target_len=L))
    assert len(dataset) == 4
    assert [e[0] for e in dataset.entries] == [str(path / f / f'{n}.safetensors')
                                               for f, n in ORDER]
    assert dataset.entries[3][1] == str(path / 'greater_than_64_crop' / 'b.safetensors')
    assert len(logged) == 1
    assert 'ignored 3 entries of less_than_16 and 1 other entries' in logged[0]
    assert '2 from_16_to_64, 1 resize-only, 1 resize/crop pairs' in logged[0]


def test_latents_reconstruct_the_stored_tokens(root):
    """The original copy, the mirrored copy, labels and sizes; patchify(latent) gives back
    the stored tokens exactly, in raster order."""
    path, latents = root
    plain = FiTLatents(str(path), target_len=L, choice='resize', flip_prob=0.0)
    mirror = FiTLatents(str(path), target_len=L, choice='resize', flip_prob=1.0)
    for i, (folder, name) in enumerate(ORDER):
        (h, w), label = FILES[folder, name]
        for dataset, copy in ((plain, 0), (mirror, 1)):
            item = dataset[i]
            assert item['data_samples'] == dict(label=label, index=i)
            assert item['inputs'].dtype == torch.float32
            assert torch.equal(item['inputs'], latents[folder, name][copy])
            assert dataset.get_size(i) == (2 * h, 2 * w) == tuple(item['inputs'].shape[1:])
            assert dataset.get_label(i) == label and dataset.flipped(i) == bool(copy)
            stored = rearrange(latents[folder, name][copy], 'c (h p1) (w p2) -> (h w) (c p1 p2)',
                               p1=2, p2=2)
            assert torch.equal(patchify([item['inputs']], 2).tokens, stored)


def test_stored_dtype_kept_on_request(root):
    path, latents = root
    folder, name = ORDER[0]
    reference_file(path / folder / f'{name}.safetensors', *latents[folder, name], 1,
                   dtype=torch.bfloat16)
    kept = FiTLatents(str(path), target_len=L, flip_prob=0.0, dtype=None)[0]['inputs']
    cast = FiTLatents(str(path), target_len=L, flip_prob=0.0)[0]['inputs']
    assert kept.dtype == torch.bfloat16 and cast.dtype == torch.float32
    assert torch.equal(kept, latents[folder, name][0].bfloat16())
    assert torch.equal(cast, kept.float())


def test_choice_crop_and_random(root):
    path, latents = root
    crop = FiTLatents(str(path), target_len=L, choice='crop', flip_prob=0.0)
    assert torch.equal(crop[3]['inputs'], latents['greater_than_64_crop', 'b'][0])
    assert torch.equal(crop[2]['inputs'], latents['greater_than_64_resize', 'd'][0])  # no crop
    # 'random': the pair's file is a hash of (seed, index): stable, 1/2 each over seeds,
    # and get_size always names the size of the file the item reads.
    picks = []
    for seed in range(200):
        dataset = FiTLatents(str(path), target_len=L, seed=seed)
        assert dataset.path(0) == dataset.entries[0][0]
        picks.append(dataset.path(3) == dataset.entries[3][1])
        if seed < 20:
            again = FiTLatents(str(path), target_len=L, seed=seed)
            for i in range(4):
                x = dataset[i]['inputs']
                assert tuple(x.shape[1:]) == dataset.get_size(i)
                assert torch.equal(x, again[i]['inputs'])
    assert 0.4 < np.mean(picks) < 0.6


def test_flip_is_a_half_and_per_seed_index(root):
    path, latents = root
    flips = np.array([[FiTLatents(str(path), target_len=L, seed=s).flipped(i) for i in range(4)]
                      for s in range(200)])
    assert 0.43 < flips.mean() < 0.57
    assert len({tuple(row) for row in flips}) > 8  # the draw depends on the seed
    # Items of one seed differ in their draws (not one coin for the whole dataset).
    assert 0 < flips.sum(1).mean() < 4 and (flips.sum(1) % 4 != 0).any()
    dataset = FiTLatents(str(path), target_len=L, seed=int(np.argmax(flips[:, 0])),
                         choice='resize')
    assert dataset.flipped(0)
    assert torch.equal(dataset[0]['inputs'], latents[ORDER[0]][1])


class _Spy:
    """Wraps safetensors' safe_open and records what is read."""

    def __init__(self, calls):
        self.calls = calls

    def __call__(self, path, framework):
        calls, handle = self.calls, fit_latents.__dict__['_real_safe_open'](path, framework)

        class Slice:
            def __init__(self, key):
                self.inner = handle.get_slice(key)
                self.key = key

            def get_shape(self):
                return self.inner.get_shape()

            def __getitem__(self, item):
                calls.append(('slice', self.key))
                return self.inner[item]

        class Handle:
            def __enter__(self):
                handle.__enter__()
                return self

            def __exit__(self, *exc):
                return handle.__exit__(*exc)

            def keys(self):
                return handle.keys()

            def get_slice(self, key):
                return Slice(key)

            def get_tensor(self, key):
                calls.append(('tensor', key))
                return handle.get_tensor(key)

        return Handle()


def test_get_size_and_label_never_read_features(root, monkeypatch):
    path, _ = root
    calls = []
    monkeypatch.setitem(fit_latents.__dict__, '_real_safe_open', fit_latents.safe_open)
    monkeypatch.setattr(fit_latents, 'safe_open', _Spy(calls))
    dataset = FiTLatents(str(path), target_len=L)
    sizes = [dataset.get_size(i) for i in range(4)]
    labels = [dataset.get_label(i) for i in range(4)]
    assert labels == [FILES[key][1] for key in ORDER]
    assert all(kind == 'tensor' and key == 'label' for kind, key in calls)
    assert len(calls) == 4
    calls.clear()
    assert [dataset.get_size(i) for i in range(4)] == sizes and calls == []  # cached
    dataset[0]
    assert ('slice', 'feature') in calls


# ---------------------------------------------------------------------- errors
def test_missing_root_and_folders(tmp_path, root):
    with pytest.raises(FileNotFoundError, match='nowhere'):
        FiTLatents(str(tmp_path / 'nowhere'))
    path, _ = root
    with pytest.raises(FileNotFoundError, match='from_16_to_256'):
        FiTLatents(str(path))  # target_len 256: other folder names
    os.rename(path / 'greater_than_64_crop', path / 'moved')
    with pytest.raises(FileNotFoundError, match='greater_than_64_crop'):
        FiTLatents(str(path), target_len=L)


def test_crop_without_resize_partner(root):
    path, _ = root
    os.remove(path / 'greater_than_64_resize' / 'b.safetensors')
    with pytest.raises(FileNotFoundError, match=r'greater_than_64_resize/b\.safetensors'):
        FiTLatents(str(path), target_len=L)


def test_missing_file_after_listing_is_named(root):
    path, _ = root
    dataset = FiTLatents(str(path), target_len=L)
    os.remove(path / 'from_16_to_64' / 'c.safetensors')
    for read in (dataset.__getitem__, dataset.get_size, dataset.get_label):
        with pytest.raises(FileNotFoundError, match=r'from_16_to_64/c\.safetensors'):
            read(1)
    assert dataset[0]['inputs'].shape == (4, 10, 10)  # the others still read


@pytest.mark.parametrize('damage, field', [
    ('garbage', 'cannot read'),
    ('truncate', 'cannot read'),
    ('size', "'size'"),
    ('grid', "'grid'"),
    ('no_label', 'no \\[\'label\'\\]'),
    ('label', "'label'"),
    ('width', "'feature' has shape"),
])
def test_corrupt_file_is_named(root, damage, field):
    path, latents = root
    file = path / 'from_16_to_64' / 'a.safetensors'
    z = latents['from_16_to_64', 'a']
    if damage == 'garbage':
        file.write_bytes(b'\x08\x00\x00\x00\x00\x00\x00\x00{"a":1}x')
    elif damage == 'truncate':
        data = file.read_bytes()
        file.write_bytes(data[:len(data) - 200])
    elif damage == 'size':
        reference_file(file, *z, 1, size=torch.tensor([5, 4]))
    elif damage == 'grid':
        reference_file(file, *z, 1, grid=torch.zeros(2, 25, dtype=torch.long))
    elif damage == 'no_label':
        reference_file(file, *z, 1, label=None)
    elif damage == 'label':
        reference_file(file, *z, 1, label=torch.tensor([1, 2]))
    else:
        reference_file(file, z[0][:3], z[1][:3], 1)  # 12 values per token
    dataset = FiTLatents(str(path), target_len=L)
    with pytest.raises((FiTFileError, FileNotFoundError),
                       match=rf'from_16_to_64/a\.safetensors.*{field}|{field}.*a\.safetensors'):
        dataset[0]
    assert dataset[1]['data_samples']['label'] == 3


def test_bad_arguments():
    with pytest.raises(ValueError, match='choice'):
        FiTLatents('.', choice='both')
    with pytest.raises(ValueError, match='flip_prob'):
        FiTLatents('.', flip_prob=2)


# ---------------------------------------------------------------------- max_length
def _item(index, h, w, label=0):
    return dict(inputs=torch.full((4, h, w), float(index)),
                data_samples=dict(label=label, index=index))


def test_max_length_keeps_the_jagged_batch():
    """What the model receives under FiT's context length is the plain jagged batch: the
    images' own tokens, no pad tokens, its geometry already built (in the data workers)."""
    items = [_item(0, 8, 8), _item(1, 4, 12), _item(2, 16, 16)]  # 16, 12, 64 tokens at p=2
    batch = jagged_collate(items, patch_size=2, max_length=64)
    plain = jagged_collate(items, patch_size=2)
    assert torch.equal(batch['inputs'].tokens, plain['inputs'].tokens)
    assert torch.equal(batch['inputs'].tokens, patchify([x['inputs'] for x in items], 2).tokens)
    assert batch['data_samples'].keys() == plain['data_samples'].keys() == {'label', 'index'}
    assert torch.equal(batch['data_samples']['label'], plain['data_samples']['label'])
    assert batch['inputs'].seqlens_list == [16, 12, 64] and batch['inputs'].patch_size == 2
    assert set(batch['inputs'].geometry.tensors) == set(Geometry.TENSORS)


def test_max_length_oversize_policies(monkeypatch):
    items = [_item(5, 8, 8), _item(7, 18, 16), _item(9, 4, 4)]  # 16, 72, 4 tokens
    with pytest.raises(ValueError, match=r'index 7 \(18x16\) has 72 tokens \(patch_size 2\), '
                                         r'more than max_length=64 \(1 of 3 images'):
        jagged_collate(items, patch_size=2, max_length=64)
    logged = []
    monkeypatch.setattr('flexgen.datasets.collate.print_log',
                        lambda message, **kwargs: logged.append(message))
    batch = jagged_collate(items, patch_size=2, max_length=64, oversize='drop')
    assert batch['data_samples']['index'].tolist() == [5, 9]
    assert batch['inputs'].seqlens_list == [16, 4]
    assert logged and 'dropped 1 of 3 images' in logged[0] and 'index 7' in logged[0]
    with pytest.raises(ValueError, match='every image of the batch exceeds'):
        jagged_collate([items[1]], patch_size=2, max_length=64, oversize='drop')
    assert jagged_collate(items, patch_size=2, max_length=72)['inputs'].seqlens_list == \
        [16, 72, 4]
    with pytest.raises(ValueError, match='oversize must be one of'):
        jagged_collate(items, patch_size=2, max_length=64, oversize='crop')
    with pytest.raises(ValueError, match='give patch_size too'):
        jagged_collate(items, max_length=64)
    with pytest.raises(TypeError, match="'overflow' is now called 'oversize'"):
        jagged_collate(items, patch_size=2, max_length=64, overflow='drop')


def test_max_length_from_registry_as_mmengine_builds_it():
    cfg = dict(type='flexgen.jagged_collate', patch_size=2, max_length=256)
    fn = FUNCTIONS.get(cfg.pop('type'))
    collate = functools.partial(fn, **cfg)
    assert collate([_item(0, 32, 32)])['inputs'].seqlens_list == [256]
    with pytest.raises(ValueError, match='max_length=256'):
        collate([_item(0, 34, 32)])
    with pytest.raises(KeyError, match='jagged_collate'):  # the closest registered name
        FUNCTIONS.get('flexgen.padded_collate')


def test_token_budget_packs_from_fit_latents(root):
    """Batch sampler + dataset + collate: each step's tokens are the stored tokens."""
    path, latents = root
    dataset = FiTLatents(str(path), target_len=L, choice='resize', flip_prob=0.0)
    sampler = TokenBudgetBatchSampler(dataset, max_tokens=128, patch_size=2, seed=0)
    seen = []
    for step, indices in zip(range(3), sampler):
        tokens = jagged_collate([dataset[i] for i in indices], patch_size=2,
                                max_length=L)['inputs']
        assert sum(tokens.seqlens_list) <= 128
        expected = [rearrange(latents[ORDER[i]][0], 'c (h p1) (w p2) -> (h w) (c p1 p2)',
                              p1=2, p2=2) for i in indices]
        assert torch.equal(tokens.tokens, torch.cat(expected))
        seen += indices
    assert set(seen) == {0, 1, 2, 3}

"""The demo dataset, generation requests and the jagged collate function."""
import math
import time
from collections import Counter

import pytest
import torch
from mmengine.registry import DefaultScope

import flexgen.datasets  # noqa: F401  (registers)
from flexgen.datasets import GenerationRequests, ProceduralShapes, jagged_collate
from flexgen.datasets.shapes import DEFAULT_SIZES, SHAPES


def coverage_of(dataset, index):
    """Recover the per-pixel shape coverage from an image: image = bg + c (fg - bg)."""
    p = dataset.params(index)
    image = (dataset[index]['inputs'] + 1) / 2
    bg, fg = p['background'][:, None, None], p['foreground'][:, None, None]
    return (image - bg) / (fg - bg)


# ------------------------------------------------------------------------ ProceduralShapes
def test_shapes_deterministic_and_seed_dependent():
    a, b = ProceduralShapes(40, seed=0), ProceduralShapes(40, seed=0)
    c = ProceduralShapes(40, seed=1)
    for i in range(40):
        assert torch.equal(a[i]['inputs'], b[i]['inputs'])
    differ = sum(a.get_size(i) != c.get_size(i) or not torch.equal(a[i]['inputs'], c[i]['inputs'])
                 for i in range(40))
    assert differ == 40
    # Item i does not depend on the dataset length (a pure function of (seed, i)).
    longer = ProceduralShapes(400, seed=0)
    assert all(torch.equal(a[i]['inputs'], longer[i]['inputs']) for i in range(40))


def test_shapes_items_sizes_range_and_labels():
    dataset = ProceduralShapes(120, seed=3)
    assert dataset.metainfo == dict(classes=SHAPES)
    seen_sizes = Counter()
    for i in range(len(dataset)):
        item = dataset[i]
        x = item['inputs']
        h, w = dataset.get_size(i)
        assert x.shape == (3, h, w) and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1
        assert item['data_samples'] == dict(label=i % 6, index=i)
        seen_sizes[(h, w)] += 1
    assert set(seen_sizes) == set(DEFAULT_SIZES)
    assert Counter(dataset[i]['data_samples']['label'] for i in range(120)) == \
        {label: 20 for label in range(6)}


def test_shapes_colour_model_contrast_and_margin():
    """Every pixel is bg + c (fg - bg) with one coverage c in [0, 1] for all channels; the
    colours differ by >= 0.35 per channel; the shape stays >= 1 px inside the border."""
    dataset = ProceduralShapes(60, seed=5)
    for i in range(len(dataset)):
        p = dataset.params(i)
        assert ((p['foreground'] - p['background']).abs() >= 0.35 - 1e-6).all()
        c = coverage_of(dataset, i)
        assert torch.allclose(c[0], c[1], atol=1e-4) and torch.allclose(c[0], c[2], atol=1e-4)
        assert c.min() > -1e-4 and c.max() < 1 + 1e-4
        assert c[0].max() > 0.99  # the shape's inside is fully covered somewhere
        border = torch.cat([c[0, 0], c[0, -1], c[0, :, 0], c[0, :, -1]])
        assert border.abs().max() < 1e-4
        assert 0 < c[0, 1:-1, 1:-1].mean() < 1  # antialiased edges: partial coverage exists
        assert ((c[0] > 0.01) & (c[0] < 0.99)).any()


def test_shapes_grey_palette_keeps_every_draw_but_colour():
    """'grey' repeats the red channel's draws in all three: the same shapes, sizes, labels
    and coverage as 'rgb', each image one grey level per region, contrast >= 0.35."""
    rgb, grey = ProceduralShapes(60, seed=5), ProceduralShapes(60, seed=5, palette='grey')
    for i in range(len(rgb)):
        assert grey.get_size(i) == rgb.get_size(i)
        a, b = rgb[i]['inputs'], grey[i]['inputs']
        assert torch.equal(b[0], a[0])  # red is the same draw
        assert torch.equal(b[1], b[0]) and torch.equal(b[2], b[0])
        p = grey.params(i)
        assert (p['foreground'] - p['background']).abs().min() >= 0.35 - 1e-6
    levels = torch.stack([grey.params(i)['background'][0] for i in range(60)])
    assert 0.2 < levels.std() < 0.4  # uniform grey levels (std 0.29), not one colour
    with pytest.raises(ValueError, match="palette.*'sepia'"):
        ProceduralShapes(10, palette='sepia')


@pytest.mark.parametrize('kind, area', [
    ('disc', math.pi), ('square', 1.4 ** 2), ('triangle', 3 * math.sqrt(3) / 4),
    ('cross', 2 * 0.6 * 1.9 - 0.36), ('ring', math.pi * (1 - 0.55 ** 2)), ('bars', 2 * 0.5 * 1.32)])
def test_shapes_antialiased_area_matches_closed_form(kind, area):
    """Summed coverage = the shape's area (in radius units^2 times radius^2)."""
    dataset = ProceduralShapes(8, sizes=[(32, 32)], classes=(kind,), seed=7, supersample=8)
    for i in range(len(dataset)):
        r = dataset.params(i)['radius']
        assert coverage_of(dataset, i)[0].sum().item() == pytest.approx(area * r * r, rel=0.03)


def test_shapes_classes_subset_and_batched_rendering():
    dataset = ProceduralShapes(30, classes=('ring', 'disc'), seed=2)
    assert dataset.metainfo['classes'] == ('ring', 'disc')
    assert [dataset[i]['data_samples']['label'] for i in range(4)] == [0, 1, 0, 1]
    # A ring's centre is empty, a disc's is covered.
    for i in range(6):
        cy, cx = dataset.params(i)['center']
        centre = coverage_of(dataset, i)[0, int(cy), int(cx)]
        assert (centre < 0.01) if i % 2 == 0 else (centre > 0.99)
    # The DataLoader's batched fetch draws exactly what single fetches draw.
    indices = [5, 3, 17, 3, 29, 0]
    batch = dataset.__getitems__(indices)
    for i, item in zip(indices, batch):
        assert torch.equal(item['inputs'], dataset[i]['inputs'])
        assert item['data_samples'] == dict(label=i % 2, index=i)


def test_shapes_rendering_is_fast():
    dataset = ProceduralShapes(1000)
    indices = list(range(32))
    dataset.__getitems__(indices)
    best = float('inf')
    for _ in range(5):
        start = time.perf_counter()
        dataset.__getitems__(indices)
        best = min(best, time.perf_counter() - start)
    print(f'\n32 mixed-size shapes rendered in {best * 1e3:.1f} ms')
    assert best < 0.1  # typically 3-8 ms; generous for a loaded CI machine


def test_shapes_errors():
    dataset = ProceduralShapes(10)
    with pytest.raises(IndexError, match='index 10 .* length 10'):
        dataset[10]
    with pytest.raises(IndexError, match='index -1'):
        dataset.get_size(-1)
    with pytest.raises(ValueError, match="classes.*'star'"):
        ProceduralShapes(10, classes=('disc', 'star'))
    with pytest.raises(ValueError, match=r'sizes.*\(16, 0\)'):
        ProceduralShapes(10, sizes=[(16, 16), (16, 0)])
    with pytest.raises(ValueError, match='scale'):
        ProceduralShapes(10, sizes=[(4, 4)])


# ------------------------------------------------------------------------ GenerationRequests
def test_generation_requests_cover_every_class_size_repeat():
    sizes = [(16, 16), (16, 32), (24, 16)]
    requests = GenerationRequests(sizes=sizes, num_classes=4, num_per_class=2, seed=3)
    assert len(requests) == 3 * 4 * 2
    assert requests.metainfo == dict(classes=('0', '1', '2', '3'))
    items = [requests[i] for i in range(len(requests))]
    assert all(item['inputs'] is None for item in items)
    combos = Counter((s['label'], s['size']) for s in (item['data_samples'] for item in items))
    assert combos == {(c, s): 2 for c in range(4) for s in sizes}
    for i, item in enumerate(items):
        assert item['data_samples']['index'] == i
        assert item['data_samples']['size'] == requests.get_size(i)
    seeds = [item['data_samples']['seed'] for item in items]
    assert len(set(seeds)) == len(seeds) and all(0 <= s < 2 ** 63 for s in seeds)
    again = GenerationRequests(sizes=sizes, num_classes=4, num_per_class=2, seed=3)
    assert [again[i]['data_samples']['seed'] for i in range(len(again))] == seeds
    other = GenerationRequests(sizes=sizes, num_classes=4, num_per_class=2, seed=4)
    assert not set(other[i]['data_samples']['seed'] for i in range(len(other))) & set(seeds)


def test_generation_requests_num_samples_is_class_balanced():
    """num_samples=N per size: the classes take turns (any run of consecutive requests is
    balanced), N // C or N // C + 1 images each; with N = C * R the requests (labels, sizes,
    seeds) are exactly those of num_per_class=R."""
    sizes = [(16, 16), (16, 32)]
    requests = GenerationRequests(sizes=sizes, num_classes=4, num_samples=10, seed=3)
    assert len(requests) == 20
    labels = [requests.get_label(i) for i in range(20)]
    assert labels == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1] * 2
    assert [requests.get_size(i) for i in range(20)] == [(16, 16)] * 10 + [(16, 32)] * 10
    balanced = GenerationRequests(sizes=sizes, num_classes=4, num_samples=12, seed=3)
    repeats = GenerationRequests(sizes=sizes, num_classes=4, num_per_class=3, seed=3)
    assert [balanced[i] for i in range(24)] == [repeats[i] for i in range(24)]
    with pytest.raises(ValueError, match='num_per_class or num_samples, not both'):
        GenerationRequests(sizes=sizes, num_classes=4, num_per_class=1, num_samples=4)
    with pytest.raises(ValueError, match='num_samples must be a positive int'):
        GenerationRequests(sizes=sizes, num_classes=4, num_samples=0)
    with pytest.raises(ValueError, match='num_classes must be a positive int, got True'):
        GenerationRequests(sizes=sizes, num_classes=True)


def test_generation_requests_class_names_and_errors():
    requests = GenerationRequests(sizes=[(16, 16)], classes=SHAPES)
    assert requests.metainfo['classes'] == SHAPES and len(requests) == 6
    assert [requests[i]['data_samples']['label'] for i in range(6)] == list(range(6))
    with pytest.raises(ValueError, match='exactly one of num_classes and classes'):
        GenerationRequests(sizes=[(16, 16)])
    with pytest.raises(ValueError, match='exactly one'):
        GenerationRequests(sizes=[(16, 16)], num_classes=6, classes=SHAPES)
    with pytest.raises(ValueError, match=r"\(16, 'a'\)"):
        GenerationRequests(sizes=[(16, 'a')], num_classes=2)
    with pytest.raises(IndexError, match='GenerationRequests: index 6 is out of range for a '
                                         'dataset of length 6'):
        requests[6]


# ------------------------------------------------------------------------ jagged_collate
def test_collate_mixed_sizes_and_field_types():
    dataset = ProceduralShapes(12, seed=1)
    items = [dataset[i] for i in range(12)]
    assert len({tuple(item['inputs'].shape) for item in items}) > 1
    batch = jagged_collate(items)
    assert isinstance(batch['inputs'], list) and len(batch['inputs']) == 12
    assert all(x is item['inputs'] for x, item in zip(batch['inputs'], items))
    labels = batch['data_samples']['label']
    assert labels.dtype == torch.long and labels.tolist() == [i % 6 for i in range(12)]
    assert batch['data_samples']['index'].tolist() == list(range(12))

    mixed = [dict(inputs=None, data_samples=dict(size=(16, 24), scale=0.5, flag=True,
                                                 emb=torch.full((2,), float(i)), name=f'n{i}',
                                                 shift=(0.5, 1)))
             for i in range(3)]
    out = jagged_collate(mixed)
    assert out['inputs'] is None
    samples = out['data_samples']
    assert samples['size'].dtype == torch.long and samples['size'].tolist() == [[16, 24]] * 3
    assert samples['scale'].dtype == torch.float32 and samples['scale'].shape == (3,)
    assert samples['flag'].dtype == torch.bool
    assert torch.equal(samples['emb'], torch.tensor([[0., 0.], [1., 1.], [2., 2.]]))
    assert samples['name'] == ['n0', 'n1', 'n2']
    assert samples['shift'].dtype == torch.float32 and samples['shift'].shape == (3, 2)


def test_collate_requests_and_errors():
    requests = GenerationRequests(sizes=[(16, 16), (16, 32)], num_classes=2)
    batch = jagged_collate([requests[i] for i in range(4)])
    assert batch['inputs'] is None
    assert batch['data_samples']['size'].tolist() == [[16, 16]] * 2 + [[16, 32]] * 2
    assert batch['data_samples']['seed'].dtype == torch.long
    with pytest.raises(ValueError, match="'emb'.*one shape"):
        jagged_collate([dict(inputs=None, data_samples=dict(emb=torch.zeros(n)))
                        for n in (2, 3)])
    with pytest.raises(ValueError, match='item 1 has data_samples keys'):
        jagged_collate([dict(inputs=None, data_samples=dict(a=1)),
                        dict(inputs=None, data_samples=dict(b=1))])
    with pytest.raises(ValueError, match='all tensors or all None'):
        jagged_collate([dict(inputs=torch.zeros(3, 4, 4), data_samples={}),
                        dict(inputs=None, data_samples={})])


def test_collate_resolves_through_mmengine_root_registry():
    """mmengine's Runner looks collate functions up in its ROOT registry, whose `get`
    ignores the default scope: configs name the scope, 'flexgen.jagged_collate'."""
    from mmengine.registry import FUNCTIONS as ROOT_FUNCTIONS

    from flexgen.registry import FUNCTIONS
    assert ROOT_FUNCTIONS.get('flexgen.jagged_collate') is jagged_collate
    assert FUNCTIONS.get('jagged_collate') is jagged_collate


def test_mmengine_builds_the_dataloader():
    from mmengine.runner import Runner

    from flexgen.datasets import BucketBatchSampler
    with DefaultScope.overwrite_default_scope('flexgen'):
        loader = Runner.build_dataloader(dict(
            dataset=dict(type='ProceduralShapes', num_samples=60, seed=4),
            sampler=dict(type='DefaultSampler', shuffle=False),
            batch_sampler=dict(type='BucketBatchSampler'), batch_size=4,
            collate_fn=dict(type='flexgen.jagged_collate'), num_workers=0), seed=11)
    sampler = loader.batch_sampler
    assert isinstance(sampler, BucketBatchSampler)
    assert sampler.batch_size == 4 and sampler.seed == 11  # the runner's seed, via the sampler
    iterator = iter(loader)
    expected = iter(sampler)
    dataset = loader.dataset
    for _ in range(3):
        batch, indices = next(iterator), next(expected)
        assert batch['data_samples']['index'].tolist() == indices
        assert len({tuple(x.shape) for x in batch['inputs']}) == 1
        assert batch['inputs'][0].shape[1:] == dataset.get_size(indices[0])
        assert batch['data_samples']['label'].tolist() == [i % 6 for i in indices]
        assert torch.equal(batch['inputs'][1], dataset[indices[1]]['inputs'])

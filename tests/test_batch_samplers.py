"""Bucket and token-budget batch samplers: content, ranks, resume."""
from collections import Counter

import pytest

from flexgen.datasets import (BucketBatchSampler, ProceduralShapes,
                              TokenBudgetBatchSampler, base_sampler)
from flexgen.registry import DATA_SAMPLERS
from helpers import SizedDataset, Wrapped, take


def build(monkeypatch, cls, dataset, rank=0, world_size=1, **kwargs):
    monkeypatch.setattr(base_sampler, 'get_dist_info', lambda: (rank, world_size))
    return cls(Wrapped(dataset), **kwargs)


# 3 sizes with 23, 17 and 10 images, interleaved.
MIXED = SizedDataset([(16, 16), (16, 32), (24, 24), (16, 16), (16, 32)] * 10
                     + [(16, 16)] * 3)
COUNTS = {(16, 16): 23, (16, 32): 20, (24, 24): 10}


# ------------------------------------------------------------------------ bucket sampler
def test_bucket_one_size_per_batch_each_index_once_drops_documented(monkeypatch):
    sampler = build(monkeypatch, BucketBatchSampler, MIXED, batch_size=4, seed=0)
    per_epoch = sum(n // 4 for n in COUNTS.values())
    assert len(sampler) == per_epoch == 5 + 5 + 2
    assert sampler.num_dropped == sum(n % 4 for n in COUNTS.values()) == 3 + 0 + 2
    batches = take(sampler, 3 * per_epoch)
    for epoch in range(3):
        epoch_batches = batches[epoch * per_epoch:(epoch + 1) * per_epoch]
        used = [i for batch in epoch_batches for i in batch]
        assert len(used) == len(set(used)) == len(MIXED) - sampler.num_dropped
        for batch in epoch_batches:
            assert len(batch) == 4 and len({MIXED.get_size(i) for i in batch}) == 1
        # What is left out is fewer than one batch of each size.
        left = Counter(MIXED.get_size(i) for i in set(range(len(MIXED))) - set(used))
        assert left == {s: n % 4 for s, n in COUNTS.items() if n % 4}
    assert batches[:per_epoch] != batches[per_epoch:2 * per_epoch]  # epochs reshuffle


def test_bucket_in_order_without_shuffle(monkeypatch):
    sampler = build(monkeypatch, BucketBatchSampler, SizedDataset([(8, 8)] * 10),
                    batch_size=3, shuffle=False, seed=0)
    assert take(sampler, 4) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [0, 1, 2]]


def test_bucket_deterministic_by_seed(monkeypatch):
    first = take(build(monkeypatch, BucketBatchSampler, MIXED, batch_size=4, seed=3), 30)
    again = take(build(monkeypatch, BucketBatchSampler, MIXED, batch_size=4, seed=3), 30)
    other = take(build(monkeypatch, BucketBatchSampler, MIXED, batch_size=4, seed=4), 30)
    assert first == again and first != other
    # seed=None takes the wrapped sampler's seed (mmengine: the runner's).
    monkeypatch.setattr(base_sampler, 'get_dist_info', lambda: (0, 1))
    assert take(BucketBatchSampler(Wrapped(MIXED, seed=3), batch_size=4), 30) == first


def test_bucket_ranks_split_the_single_process_global_batch(monkeypatch):
    single = take(build(monkeypatch, BucketBatchSampler, MIXED, batch_size=6, seed=1), 20)
    ranks = [take(build(monkeypatch, BucketBatchSampler, MIXED, rank=r, world_size=2,
                        batch_size=3, seed=1), 20) for r in range(2)]
    for step in range(20):
        part0, part1 = ranks[0][step], ranks[1][step]
        assert len(part0) == len(part1) == 3 and not set(part0) & set(part1)
        assert part0 + part1 == single[step]


@pytest.mark.parametrize('start', [0, 4, 11, 12, 29])
def test_bucket_resume_continues_the_uninterrupted_sequence(monkeypatch, start):
    full = take(build(monkeypatch, BucketBatchSampler, MIXED, batch_size=4, seed=2), 40)
    resumed = build(monkeypatch, BucketBatchSampler, MIXED, batch_size=4, seed=2)
    resumed.set_start_iter(start)
    resumed.set_epoch(7)  # harmless
    assert take(resumed, 40 - start) == full[start:]


def test_bucket_errors(monkeypatch):
    with pytest.raises(ValueError, match=r'batch_size x world_size = 12 x 2.*\(24, 24\): 10'):
        build(monkeypatch, BucketBatchSampler, MIXED, world_size=2, batch_size=4 * 3, seed=0)
    with pytest.raises(TypeError, match='get_size'):
        BucketBatchSampler(Wrapped(list(range(10))), batch_size=2, seed=0)
    with pytest.raises(ValueError, match='batch_size must be a positive int'):
        build(monkeypatch, BucketBatchSampler, MIXED, batch_size=0, seed=0)


# ------------------------------------------------------------------------ token sampler
DEMO = ProceduralShapes(3000, seed=0)  # 6 sizes, 64 to 144 tokens at patch size 2


def tokens(dataset, indices, patch_size=2):
    return sum((dataset.get_size(i)[0] // patch_size) * (dataset.get_size(i)[1] // patch_size)
               for i in indices)


def test_token_best_fit_closed_form(monkeypatch):
    """Token counts [3, 1, 2, 2, 3, 1], budget 4, index order: the open pack takes the
    largest buffered image that fits; the buffer size decides what it can see."""
    dataset = SizedDataset([(3, 1), (1, 1), (2, 1), (2, 1), (3, 1), (1, 1)])
    wide = build(monkeypatch, TokenBudgetBatchSampler, dataset, max_tokens=4, shuffle=False,
                 seed=0, buffer_size=6)
    assert wide.epoch_packs(0) == [[0, 1], [4, 5], [2, 3]]
    narrow = build(monkeypatch, TokenBudgetBatchSampler, dataset, max_tokens=4, shuffle=False,
                   seed=0, buffer_size=2)
    assert narrow.epoch_packs(0) == [[0, 1], [2, 3], [4, 5]]
    capped = build(monkeypatch, TokenBudgetBatchSampler, dataset, max_tokens=4, shuffle=False,
                   seed=0, buffer_size=6, max_images=1)
    assert capped.epoch_packs(0) == [[0], [4], [2], [3], [1], [5]]


def test_token_budget_respected_efficiency_and_each_index_once(monkeypatch):
    sampler = build(monkeypatch, TokenBudgetBatchSampler, DEMO, max_tokens=512, patch_size=2,
                    seed=0)
    efficiency = sampler.efficiency()
    print(f'\ntoken budget 512 on the 6-size demo set: {efficiency:.1%} of tokens used')
    assert efficiency >= 0.9
    for epoch in range(2):
        packs = sampler.epoch_packs(epoch)
        assert all(tokens(DEMO, pack) <= 512 for pack in packs)
        flat = [i for pack in packs for i in pack]
        assert sorted(flat) == list(range(len(DEMO)))  # every image packed exactly once
    steps = take(sampler, len(sampler) + 5)  # into the second epoch
    assert all(0 < tokens(DEMO, batch) <= 512 for batch in steps)
    first_epoch = [i for batch in steps[:len(sampler)] for i in batch]
    assert len(first_epoch) == len(set(first_epoch))
    assert steps[:5] != steps[len(sampler):]


def test_token_max_images_caps_images(monkeypatch):
    sampler = build(monkeypatch, TokenBudgetBatchSampler, DEMO, max_tokens=4096, patch_size=2,
                    max_images=5, seed=0)
    assert all(len(batch) <= 5 for batch in take(sampler, 50))
    assert max(len(batch) for batch in take(sampler, 50)) == 5


def test_token_deterministic_by_seed(monkeypatch):
    def run(seed):
        return take(build(monkeypatch, TokenBudgetBatchSampler, DEMO, max_tokens=512,
                          patch_size=2, seed=seed), 40)
    assert run(5) == run(5) and run(5) != run(6)


def test_token_ranks_split_the_single_process_global_batch(monkeypatch):
    single = take(build(monkeypatch, TokenBudgetBatchSampler, DEMO, max_tokens=512,
                        patch_size=2, seed=1, packs_per_step=2), 30)
    ranks = [take(build(monkeypatch, TokenBudgetBatchSampler, DEMO, rank=r, world_size=2,
                        max_tokens=512, patch_size=2, seed=1), 30) for r in range(2)]
    for step in range(30):
        part0, part1 = ranks[0][step], ranks[1][step]
        assert not set(part0) & set(part1)
        assert tokens(DEMO, part0) <= 512 and tokens(DEMO, part1) <= 512
        assert part0 + part1 == single[step]


@pytest.mark.parametrize('epochs, offset', [(0, 0), (0, 7), (1, 0), (2, 3)])
def test_token_resume_continues_the_uninterrupted_sequence(monkeypatch, epochs, offset):
    def make():
        return build(monkeypatch, TokenBudgetBatchSampler, DEMO, max_tokens=1024,
                     patch_size=2, seed=2)
    reference = make()
    lengths = [reference._epoch_length(e) for e in range(3)]
    start = sum(lengths[:epochs]) + offset
    full = take(reference, start + 10)
    resumed = make()
    resumed.set_start_iter(start)
    assert take(resumed, 10) == full[start:]


def test_token_too_large_image_fails_at_build(monkeypatch):
    dataset = SizedDataset([(16, 16)] * 7 + [(64, 64)] + [(16, 16)] * 4)
    with pytest.raises(ValueError, match=r'index 7 of size \(64, 64\).*1024 tokens.*'
                                         r'max_tokens=256'):
        build(monkeypatch, TokenBudgetBatchSampler, dataset, max_tokens=256, patch_size=2,
              seed=0)


def test_samplers_build_through_the_registry(monkeypatch):
    monkeypatch.setattr(base_sampler, 'get_dist_info', lambda: (0, 1))
    wrapped = Wrapped(DEMO, seed=0)
    sampler = DATA_SAMPLERS.build(dict(type='TokenBudgetBatchSampler', max_tokens=512,
                                       patch_size=2),
                                  default_args=dict(sampler=wrapped, batch_size=None))
    assert isinstance(sampler, TokenBudgetBatchSampler) and sampler.seed == 0
    bucket = DATA_SAMPLERS.build(dict(type='BucketBatchSampler'),
                                 default_args=dict(sampler=wrapped, batch_size=8))
    assert isinstance(bucket, BucketBatchSampler) and len(take(bucket, 1)[0]) == 8
    # An old config's renamed knob stops the build, naming the new one; a typo stops it too.
    with pytest.raises(TypeError, match="`TokenBudgetBatchSampler` .*unexpected argument "
                                        "'packs_per_batch'. Did you mean 'packs_per_step'?"):
        DATA_SAMPLERS.build(dict(type='TokenBudgetBatchSampler', max_tokens=512,
                                 packs_per_batch=2),
                            default_args=dict(sampler=wrapped, batch_size=1))
    with pytest.raises(TypeError, match="`TokenBudgetBatchSampler` .*unexpected argument "
                                        "'max_image'. Did you mean 'max_images'?"):
        DATA_SAMPLERS.build(dict(type='TokenBudgetBatchSampler', max_tokens=512, max_image=2),
                            default_args=dict(sampler=wrapped, batch_size=1))


def test_token_names_shared_with_the_pack_samplers(monkeypatch):
    """packs_per_step, max_images and oversize mean here what they mean in the pack
    samplers; the dataloader's batch_size counts packs; old names are refused by name."""
    with pytest.raises(TypeError, match=r"TokenBudgetBatchSampler.__init__\(\) got an "
                                        "unexpected keyword argument 'packs_per_batch'"):
        build(monkeypatch, TokenBudgetBatchSampler, DEMO, max_tokens=512, patch_size=2,
              seed=1, packs_per_batch=2)
    with pytest.raises(ValueError, match=r'batch_size=32 .*packs_per_step=32 or max_images=32'):
        build(monkeypatch, TokenBudgetBatchSampler, DEMO, max_tokens=512, patch_size=2,
              seed=1, batch_size=32)
    # With the cap named, the dataloader's batch_size is the packs per step, as NiT's.
    by_batch = build(monkeypatch, TokenBudgetBatchSampler, DEMO, max_tokens=512, patch_size=2,
                     seed=1, batch_size=2, max_images=6)
    named = build(monkeypatch, TokenBudgetBatchSampler, DEMO, max_tokens=512, patch_size=2,
                  seed=1, packs_per_step=2, max_images=6)
    assert by_batch.packs_per_step == 2 and take(by_batch, 20) == take(named, 20)
    packs = named.epoch_packs(0)
    assert max(len(p) for p in packs) == 6
    assert take(named, 3) == [packs[0] + packs[1], packs[2] + packs[3], packs[4] + packs[5]]


def test_token_oversize_drop(monkeypatch):
    sizes = [(16, 16)] * 7 + [(64, 64)] + [(16, 16)] * 4 + [(48, 48)]
    dataset = SizedDataset(sizes)
    sampler = build(monkeypatch, TokenBudgetBatchSampler, dataset, max_tokens=256,
                    patch_size=2, seed=0, oversize='drop')
    assert sampler.num_oversize == 2
    for epoch in range(3):
        flat = [i for pack in sampler.epoch_packs(epoch) for i in pack]
        assert sorted(flat) == [i for i in range(13) if i not in (7, 12)]
    # The images it keeps come in the order the full permutation gives them.
    full = build(monkeypatch, TokenBudgetBatchSampler, SizedDataset([(16, 16)] * 13),
                 max_tokens=256, patch_size=2, seed=0)
    assert sampler.epoch_order(1).tolist() == [i for i in full.epoch_order(1).tolist()
                                               if i not in (7, 12)]
    with pytest.raises(ValueError, match="oversize must be one of"):
        build(monkeypatch, TokenBudgetBatchSampler, dataset, max_tokens=256, patch_size=2,
              seed=0, oversize='clip')


def test_every_size_aware_sampler_reads_sizes_the_same_way(monkeypatch):
    """One sweep of the dataset's sizes (packing.lengths.dataset_sizes) for every sampler:
    the same refusals of an empty dataset and of a dataset without get_size."""
    from flexgen.datasets.pack_samplers import OnlinePackSampler
    samplers = [(BucketBatchSampler, dict(batch_size=2)),
                (TokenBudgetBatchSampler, dict(max_tokens=64)),
                (OnlinePackSampler, dict(max_tokens=64))]
    for cls, kwargs in samplers:
        with pytest.raises(ValueError, match=f'^{cls.__name__}: the dataset is empty$'):
            build(monkeypatch, cls, SizedDataset([]), seed=0, **kwargs)
        with pytest.raises(TypeError, match=f'^{cls.__name__}: the dataset list has no '
                                            r'get_size\(index\)'):
            build(monkeypatch, cls, [0, 1], seed=0, **kwargs)

"""Packing as pure functions: LPFHP (hand-worked and against a literal transcription of
NiT's steps), index assignment, sampler-meta files, the online chunk packer, the
efficiency report, and tools/pack_dataset.py."""
import importlib.util
import json
import os.path as osp

import numpy as np
import pytest

from flexgen.datasets.packing.lengths import (data_meta_lengths, length_histogram,
                                              lengths_from_histogram, load_size_histogram)
from flexgen.datasets.packing.lpfhp import (assign_indices, lpfhp, pack_offline,
                                            strategies_efficiency)
from flexgen.datasets.packing.online import OnlinePlan, best_fit_stream, choose_fill, fill_packs
from flexgen.datasets.packing.report import online_epoch, packing_report
from flexgen.datasets.packing.sampler_meta import load_sampler_meta, save_sampler_meta

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
HISTOGRAM = osp.join(ROOT, 'tools', 'data', 'imagenet_like_latent_sizes.json')


def lpfhp_literal(histogram, max_len, limit):
    """NiT's steps written out literally (nit.md 2.2): scan the free space upwards one
    token at a time from the length, give up after max_len - length + 1 misses. The
    implementation under test finds the same open pack with a sorted-key search."""
    open_packs, closed = {}, {}

    def add(count, pack, free):
        target = closed if free == 0 or len(pack) == limit else open_packs
        target.setdefault(free, []).append((count, pack))

    for length in range(max_len, 0, -1):
        n, offset = histogram.get(length, 0), 0
        while n > 0:
            if length + offset in open_packs:
                old, pack = open_packs[length + offset].pop()
                repeat = min(1 + offset // length, limit - len(pack))
                while n // repeat == 0:
                    repeat -= 1
                count = min(old, n // repeat)
                if old > count:
                    open_packs[length + offset].append((old - count, pack))
                n -= count * repeat
                add(count, pack + [length] * repeat, length + offset - repeat * length)
                if not open_packs[length + offset]:
                    del open_packs[length + offset]
                offset = 0
            else:
                offset += 1
            if offset >= max_len - length + 1:
                repeat = min(max_len // length, limit)
                while n // repeat == 0:
                    repeat -= 1
                add(n // repeat, [length] * repeat, max_len - length * repeat)
                n -= n // repeat * repeat
    for free, group in open_packs.items():
        closed.setdefault(free, []).extend(group)
    return [(c, tuple(reversed(p))) for group in closed.values() for c, p in group]


# ------------------------------------------------------------------------ LPFHP by hand
def test_lpfhp_best_fit_then_new_pack():
    # L = 10, lengths {6: 2, 4: 2, 3: 1}, longest first.
    # 6 x2: nothing open -> 2 packs [6] (free 4).  4 x2: the open packs with free 4 are the
    # best fit, 4 // 4 = 1 per pack -> 2 packs [6, 4], full (closed).  3 x1: nothing open ->
    # a new pack [3] (free 7), still open at the end. Closed first, then open; ascending.
    strategies = lpfhp({6: 2, 4: 2, 3: 1}, 10)
    assert strategies == [(2, (4, 6)), (1, (3,))]
    assert strategies_efficiency(strategies, 10) == pytest.approx((2 * 10 + 3) / 30)
    # NiT's array form, histogram[l - 1] = count of length l, gives the same.
    assert lpfhp([0, 0, 1, 2, 0, 2, 0, 0, 0, 0], 10) == strategies


def test_lpfhp_splits_a_group_and_repeats_a_length():
    # L = 8, lengths {5: 3, 3: 2, 1: 4}.
    # 5 x3 -> 3 packs [5] (free 3).  3 x2: best fit is free 3, one 3 per pack, only 2 to
    # place -> the group of 3 splits: 2 packs [5, 3] (full) and 1 pack [5] stays open.
    # 1 x4: best fit free 3 -> 3 // 1 = 3 ones go into the last [5] -> [5, 1, 1, 1] (full);
    # the one left finds no open pack -> new pack [1].
    strategies = lpfhp({5: 3, 3: 2, 1: 4}, 8)
    assert strategies == [(2, (3, 5)), (1, (1, 1, 1, 5)), (1, (1,))]
    assert strategies_efficiency(strategies, 8) == pytest.approx(25 / 32)


def test_lpfhp_cap_on_sequences_per_pack():
    # L = 10, seven 2s, at most 3 per pack: new packs of min(10 // 2, 3) = 3 -> 2 packs
    # [2, 2, 2] (closed at the cap, free 4); the 1 left -> pack [2].
    assert lpfhp({2: 7}, 10, max_per_pack=3) == [(2, (2, 2, 2)), (1, (2,))]
    # Without the cap: 5 per pack -> 1 full pack [2]*5 and the 2 left -> [2, 2] (free 6).
    assert lpfhp({2: 7}, 10) == [(1, (2,) * 5), (1, (2, 2))]


def test_lpfhp_errors():
    with pytest.raises(ValueError, match='length 11 exceed max_len=10'):
        lpfhp({11: 1, 3: 2}, 10)
    with pytest.raises(ValueError, match='negative'):
        lpfhp({3: -1}, 10)
    with pytest.raises(ValueError, match='max_per_pack'):
        lpfhp({3: 1}, 10, max_per_pack=0)


@pytest.mark.parametrize('seed', range(6))
def test_lpfhp_equals_the_literal_steps_and_packs_every_length_once(seed):
    rng = np.random.default_rng(seed)
    for _ in range(25):
        max_len = int(rng.integers(4, 120))
        k = int(rng.integers(1, 12))
        histogram = {int(l): int(c) for l, c in zip(rng.integers(1, max_len + 1, k),
                                                    rng.integers(1, 40, k))}
        limit = int(rng.integers(1, 8)) if rng.random() < 0.5 else None
        strategies = lpfhp(histogram, max_len, limit)
        assert strategies == lpfhp_literal(histogram, max_len, limit or max_len)
        packed = {}
        for count, pack in strategies:
            assert count >= 1 and 1 <= len(pack) <= (limit or max_len)
            assert sum(pack) <= max_len and list(pack) == sorted(pack)
            for length in pack:
                packed[length] = packed.get(length, 0) + count
        assert packed == histogram


def test_lpfhp_on_the_imagenet_like_histogram():
    histogram = load_size_histogram(HISTOGRAM)
    assert sum(histogram.values()) == 3 * 1281167
    for max_len in (8192, 16384, 65536):
        strategies = lpfhp(histogram, max_len)
        assert strategies_efficiency(strategies, max_len) >= 0.999
        assert all(sum(pack) <= max_len for _, pack in strategies)


# ------------------------------------------------------------------------ indices and files
def test_assign_indices_nit_order_takes_the_last_unused_index():
    lengths = [3, 5, 3, 5, 1]
    # Pack (3, 5): last unused 3 is index 2, last 5 is index 3. Pack (1, 3, 5): 4, 0, 1.
    assert assign_indices(lengths, [(1, (3, 5)), (1, (1, 3, 5))]) == [[2, 3], [4, 0, 1]]
    with pytest.raises(ValueError, match='more images of some length'):
        assign_indices(lengths, [(2, (1, 3))])


def test_assign_indices_seeded_and_pack_offline_use_every_index_once():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 40, 500)
    strategies = lpfhp(length_histogram(lengths), 100)
    packs = assign_indices(lengths, strategies, seed=1)
    assert sorted(i for p in packs for i in p) == list(range(500))
    flat_lengths = [tuple(sorted(lengths[p].tolist())) for p in packs]
    assert flat_lengths == [pack for count, pack in strategies for _ in range(count)]
    assert packs == assign_indices(lengths, strategies, seed=1)
    assert packs != assign_indices(lengths, strategies, seed=2)

    packs = pack_offline(lengths, 100, seed=0)
    assert sorted(i for p in packs for i in p) == list(range(500))
    assert max(lengths[p].sum() for p in packs) <= 100
    # split=3 packs [0, 166), [166, 332), [332, 498) apart; the last 2 images are left out.
    split = pack_offline(lengths, 100, seed=0, split=3)
    assert sorted(i for p in split for i in p) == list(range(498))
    assert all(len({i // 166 for i in p}) == 1 for p in split)


def test_sampler_meta_round_trip_and_errors(tmp_path):
    path = str(tmp_path / 'meta' / 'x_LPFHP_16.json')
    save_sampler_meta([[3, 1], [np.int64(0)], [2]], path)
    assert load_sampler_meta(path) == [[3, 1], [0], [2]]
    bad = tmp_path / 'bad.json'
    bad.write_text('[[1, 2], [3, -1]]')
    with pytest.raises(ValueError, match=r'bad.json: pack 1 must be a non-empty list'):
        load_sampler_meta(str(bad))
    bad.write_text('{"packs": []}')
    with pytest.raises(ValueError, match='bad.json: expected a non-empty JSON list'):
        load_sampler_meta(str(bad))
    bad.write_text('[[1, 2')
    with pytest.raises(ValueError, match='bad.json: not valid JSON'):
        load_sampler_meta(str(bad))
    with pytest.raises(FileNotFoundError, match='missing.json'):
        load_sampler_meta(str(tmp_path / 'missing.json'))


# ------------------------------------------------------------------------ online packers
def test_fill_packs_worst_fit_decreasing_by_hand():
    lengths = [5, 4, 3, 3, 2, 2, 1]  # index i has lengths[i] tokens
    # Largest first, each into the emptiest pack (ties: lowest pack):
    # 5 -> p0 (5), 4 -> p1 (4), 3 -> p2 (3), 3 -> p2 (6), 2 -> p1 (6), 2 -> p0 (7),
    # 1 -> p1 (7; p1 and p2 tie at 6).
    assert fill_packs(range(7), lengths, 3, 8) == ([[0, 5], [1, 4, 6], [2, 3]], [])
    # Budget 6: the second 2 finds the emptiest pack p0 at 5 -> fits nowhere, left out;
    # then 1 -> p0 (6).
    assert fill_packs(range(7), lengths, 3, 6) == ([[0, 6], [1, 4], [2, 3]], [5])
    # An image cap of 2 closes a pack for good.
    assert fill_packs(range(7), lengths, 3, 8, max_per_pack=2) == (
        [[0, 5], [1, 4], [2, 3]], [6])


def test_best_fit_stream_by_hand():
    # Tokens [3, 1, 2, 2, 3, 1], budget 4, buffer of 6: pack 1 takes 3 (index 0) then 1;
    # pack 2 takes the other 3 (index 4) then 1 (index 5); pack 3 takes 2 + 2.
    lengths = [3, 1, 2, 2, 3, 1]
    assert best_fit_stream(range(6), lengths, 4, 6) == [[0, 1], [4, 5], [2, 3]]
    assert best_fit_stream(range(6), lengths, 4, 2) == [[0, 1], [2, 3], [4, 5]]


def small_lengths(seed=0):
    """An ImageNet-like merged set at 1/100 scale, shuffled."""
    histogram = load_size_histogram(HISTOGRAM)
    scaled = {l: c // 100 for l, c in histogram.items() if c >= 100}
    return np.random.default_rng(seed).permutation(lengths_from_histogram(scaled))


def test_online_plan_epochs_use_every_image_once_and_chunks_stand_alone():
    lengths = small_lengths()
    kept = np.flatnonzero(lengths != 256)  # pack a subset: the others must never show up
    # Small chunks (48 packs) need room: an image of up to 1813 tokens can straddle the end
    # of a chunk's share of tokens.
    plan = OnlinePlan(lengths, kept, 4096, packs_per_step=3, chunk_steps=16, fill=0.97, seed=0)
    assert plan.steps_per_epoch == -int(-lengths[kept].sum() // (0.97 * 4096 * 3))  # ceil
    assert plan.efficiency == lengths[kept].sum() / (plan.steps_per_epoch * 3 * 4096) <= 0.97
    epochs = []
    for epoch in range(2):
        packs = [p for c in range(plan.num_chunks) for p in plan.chunk(epoch, c)[0]]
        assert all(plan.chunk(epoch, c)[1] == [] for c in range(plan.num_chunks))
        assert len(packs) == plan.packs_per_epoch
        assert all(0 < lengths[p].sum() <= 4096 for p in packs)
        assert sorted(i for p in packs for i in p) == kept.tolist()
        epochs.append(packs)
    assert epochs[0][:5] != epochs[1][:5]  # reshuffled
    # A chunk depends on (seed, epoch, chunk) only: a fresh plan packs chunk 5 directly.
    fresh = OnlinePlan(lengths, kept, 4096, 3, 16, 0.97, seed=0)
    assert fresh.step(5 * 16 + 2) == epochs[0][(5 * 16 + 2) * 3:(5 * 16 + 3) * 3]
    assert fresh.step(plan.steps_per_epoch + 1) == epochs[1][3:6]


def test_choose_fill_places_every_image():
    lengths = small_lengths()
    plan = choose_fill(lengths, np.arange(len(lengths)), 8192, packs_per_step=1,
                       chunk_steps=256, seed=0)
    # It checked epoch 0; other epochs (other orders) must pack cleanly too.
    for epoch in (1, 2):
        result = online_epoch(plan, epoch)
        print(f'\nonline at 8192, 1/100 ImageNet-like, epoch {epoch}: fill {plan.fill:.4f}, '
              f'{result}')
        assert result['left_out'] == 0 and result['efficiency'] >= 0.99
        assert result['fullest'] <= 8192 and result['emptiest'] >= 0.98 * 8192
    # Images as large as the budget cannot be spread over a fixed number of packs.
    with pytest.raises(ValueError, match='too large against the budget'):
        choose_fill(np.full(100, 60), np.arange(100), 100, 1, 4, seed=0)


def test_packing_report_meets_the_goals_on_a_small_histogram(tmp_path, capsys):
    histogram = load_size_histogram(HISTOGRAM)
    table = {'description': '1/20 of tools/data/imagenet_like_latent_sizes.json',
             'merged': [[1, l, c // 20] for l, c in histogram.items() if c >= 20]}
    path = tmp_path / 'sizes.json'
    path.write_text(json.dumps(table))
    rows = packing_report(str(path), lengths=(16384,), chunk_packs=256, stream=False)
    row = rows[0]
    assert row['images'] == sum(c for _, _, c in table['merged'])
    assert row['offline'] >= 0.999 and row['online'] >= 0.995
    assert row['online_left_out'] == 0 and row['online_fullest'] <= 16384
    # The table explains its columns, and a progress bar counted the stages while it packed.
    out, err = capsys.readouterr()
    header = next(line for line in out.splitlines() if line.lstrip().startswith('L |'))
    legend = out[out.index('Columns'):].splitlines()
    for column in ('L', 'offline LPFHP', 'online', 'stream'):
        assert column in header and any(line.startswith(f'  {column} ') for line in legend)
    for column in ('packs', 'fill', 'left out', 'min..max pack'):
        assert column in header and any(f'{column}:' in line for line in legend)
    assert 'L=16384: online epoch: 100%' in err.split('\r')[-1] and '2/2' in err


@pytest.mark.slow
def test_packing_report_full_histogram():
    rows = packing_report(HISTOGRAM)
    by_len = {r['max_len']: r for r in rows}
    assert all(r['offline'] >= 0.999 for r in rows)
    assert by_len[16384]['online'] >= 0.995 and by_len[16384]['online_left_out'] == 0


# ------------------------------------------------------------------------ the tool
def load_tool():
    spec = importlib.util.spec_from_file_location(
        'flexgen_tool_pack_dataset', osp.join(ROOT, 'tools', 'pack_dataset.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_data_meta(path, sizes):
    with open(path, 'w') as f:
        for k, (h, w) in enumerate(sizes):
            f.write(json.dumps(dict(image_file=f'n0/{k}.JPEG', latent_file=f'n0/{k}.safetensors',
                                    latent_h=h, latent_w=w, image_h=32 * h, image_w=32 * w,
                                    type='native-resolution')) + '\n')


def test_pack_dataset_tool_writes_nit_sampler_meta(tmp_path, capsys):
    tool = load_tool()
    rng = np.random.default_rng(0)
    sizes = [tuple(s) for s in rng.integers(2, 12, (300, 2)).tolist()]
    (tmp_path / 'data_meta').mkdir()
    meta = str(tmp_path / 'data_meta' / 'toy_merge_meta.jsonl')
    write_data_meta(meta, sizes)
    assert tool.main(['--data-meta', meta, '--max-seq-len', '256']) == 0
    out = tmp_path / 'sampler_meta' / 'toy_merge_LPFHP_256.json'  # NiT's naming
    packs = load_sampler_meta(str(out))
    tokens = np.array([h * w for h, w in sizes])
    assert sorted(i for p in packs for i in p) == list(range(300))
    assert max(tokens[p].sum() for p in packs) <= 256
    # --nit-order reproduces NiT's assignment: strategies, then the last unused index.
    nit = str(tmp_path / 'nit.json')
    tool.main(['--data-meta', meta, '--max-seq-len', '256', '--nit-order', '--out', nit])
    assert load_sampler_meta(nit) == assign_indices(tokens, lpfhp(length_histogram(tokens), 256))
    # --check reads it back (as it would read NiT's own file).
    capsys.readouterr()
    tool.main(['--check', nit, '--data-meta', meta, '--max-seq-len', '256'])
    report = capsys.readouterr().out
    assert 'unique: 300' in report and 'over_budget: 0' in report


def test_pack_dataset_tool_oversize_and_bad_meta(tmp_path):
    tool = load_tool()
    meta = str(tmp_path / 'x_meta.jsonl')
    write_data_meta(meta, [(4, 4), (20, 20), (4, 8)])
    with pytest.raises(ValueError, match=r'index 1 has 400 tokens, more than --max-seq-len 64'):
        tool.main(['--data-meta', meta, '--max-seq-len', '64', '--out', str(tmp_path / 'o.json')])
    tool.main(['--data-meta', meta, '--max-seq-len', '64', '--oversize', 'drop',
               '--out', str(tmp_path / 'o.json')])
    assert sorted(i for p in load_sampler_meta(str(tmp_path / 'o.json')) for i in p) == [0, 2]
    with open(meta, 'a') as f:
        f.write(json.dumps(dict(latent_h=3)) + '\n')
    with pytest.raises(ValueError, match=r"x_meta.jsonl:4: field 'latent_w' must be an int"):
        data_meta_lengths(meta)


def test_pack_dataset_tool_from_a_flexgen_config(tmp_path):
    tool = load_tool()
    config = tmp_path / 'cfg.py'
    config.write_text("train_dataloader = dict(dataset=dict(type='ProceduralShapes', "
                      "num_samples=200, seed=0))\n")
    out = str(tmp_path / 'shapes.json')
    tool.main(['--config', str(config), '--patch-size', '2', '--max-seq-len', '512',
               '--out', out])
    from flexgen.datasets import ProceduralShapes
    dataset = ProceduralShapes(200, seed=0)
    tokens = np.array([(h // 2) * (w // 2) for h, w in map(dataset.get_size, range(200))])
    packs = load_sampler_meta(out)
    assert sorted(i for p in packs for i in p) == list(range(200))
    assert max(tokens[p].sum() for p in packs) <= 512

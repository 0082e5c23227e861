"""A dataset and a data sampler written only from their base classes' documentation
(FlexDataset, GlobalBatchSampler) work with flexgen's samplers, collate and DataLoader."""
from typing import Iterator, List

import pytest
import torch

from flexgen.datasets import (BucketBatchSampler, FlexDataset, OnlinePackSampler,
                              jagged_collate)
from flexgen.datasets import base_sampler
from flexgen.datasets.base_sampler import GlobalBatchSampler
from helpers import Wrapped, take


class Squares(FlexDataset):
    """FlexDataset's docstring example, with two sides and two classes."""

    def __init__(self, num_samples=40):
        self.num_samples, self.classes = num_samples, ('small', 'large')

    def __len__(self):
        return self.num_samples

    def get_size(self, index):
        side = 8 if self.get_label(index) == 0 else 12
        return side, side

    def get_label(self, index):
        return self.check_index(index) % 2

    def __getitem__(self, index):
        index = self.check_index(index)
        h, w = self.get_size(index)
        return dict(inputs=torch.full((3, h, w), float(index)),
                    data_samples=dict(label=self.get_label(index), index=index))


def test_a_dataset_written_from_the_contract_trains():
    dataset = Squares()
    assert dataset.metainfo == dict(classes=('small', 'large')) and len(dataset) == 40
    with pytest.raises(IndexError, match='Squares: index 40 is out of range for a dataset of '
                                         'length 40'):
        dataset.get_size(40)
    bucket = BucketBatchSampler(Wrapped(dataset), batch_size=4, seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=bucket,
                                         collate_fn=lambda items: jagged_collate(items, 2))
    for indices, batch in zip(take(bucket, 3), take(loader, 3)):
        assert len({dataset.get_size(i) for i in indices}) == 1  # one size per bucket batch
        assert batch['data_samples']['index'].tolist() == indices
        side = dataset.get_size(indices[0])[0]
        assert batch['inputs'].seqlens_list == [(side // 2) ** 2] * 4
    packs = OnlinePackSampler(Wrapped(dataset), max_tokens=128, patch_size=2, seed=0)
    served = [i for step in take(packs, len(packs)) for i in step]
    assert sorted(served) == list(range(40))  # one epoch: every image once


def test_a_dataset_missing_part_of_the_contract_is_refused():
    class NoSize(FlexDataset):
        def __len__(self):
            return 1

        def get_label(self, index):
            return 0

        def __getitem__(self, index):
            return {}

    with pytest.raises(TypeError, match='get_size'):
        NoSize()


class Chunks(GlobalBatchSampler):
    """A sampler written from GlobalBatchSampler's docstring: each epoch's permutation cut
    into groups of ``size`` images, ``groups_per_rank`` groups per rank and step."""

    def __init__(self, sampler, size, groups_per_rank=1, seed=None, shuffle=True):
        super().__init__(sampler, seed, shuffle)
        self.size, self.groups_per_rank = size, groups_per_rank
        self.per_step = size * groups_per_rank * self.world_size
        self.steps = len(self.dataset) // self.per_step

    def __len__(self):
        return self.steps

    def global_steps(self, start: int) -> Iterator[List[List[int]]]:
        step = start
        while True:
            epoch, s = divmod(step, self.steps)
            order = self.epoch_permutation(epoch, len(self.dataset))
            step_order = order[s * self.per_step:(s + 1) * self.per_step]
            yield step_order.view(-1, self.size).tolist()
            step += 1


def test_a_sampler_written_from_the_contract_splits_ranks_and_resumes(monkeypatch):
    dataset = Squares(60)

    def build(rank=0, world_size=1, **kwargs):
        monkeypatch.setattr(base_sampler, 'get_dist_info', lambda: (rank, world_size))
        return Chunks(Wrapped(dataset, seed=5), size=3, **kwargs)

    single = take(build(groups_per_rank=2), 25)
    ranks = [take(build(r, 2), 25) for r in range(2)]
    assert [a + b for a, b in zip(*ranks)] == single  # 2 ranks = one process, 2 groups
    epoch0 = [i for step in single[:10] for i in step]
    assert sorted(epoch0) == list(range(60))  # 10 steps of 6: one permutation per epoch
    assert single[10:20] != single[:10]  # the next epoch draws anew
    resumed = build(groups_per_rank=2)
    resumed.set_start_iter(13)
    assert take(resumed, 12) == single[13:]
    unshuffled = take(build(groups_per_rank=2, shuffle=False), 2)
    assert unshuffled == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]]

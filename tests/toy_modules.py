"""Toy parts for the engine tests: a flow-matching model whose noise is seeded by
(seed, step, image index), a vector dataset, an infinite resumable batch sampler and a
loss metric. Registered in flexgen's registries (import this module, or name it in
``custom_imports``)."""
import math

import torch
from mmengine.dist import get_dist_info
from mmengine.evaluator import BaseMetric
from mmengine.model import BaseModel
from torch import nn

from flexgen.registry import DATA_SAMPLERS, DATASETS, METRICS, MODELS


def image_generator(seed: int, step: int, index: int) -> torch.Generator:
    """The generator of one image's random draws at one training step."""
    mixed = ((int(seed) * 1_000_003 + int(step)) * 1_000_033 + int(index)) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)


@MODELS.register_module()
class ToyFlowModel(BaseModel):
    """Rectified flow on vectors: x_t = (1 - t) x + t eps, an MLP predicts v = eps - x.

    The noise eps and the time t of image i come from
    ``image_generator(seed, step, index_i)``; in ``'loss'`` mode ``seed`` and ``step``
    must be in ``data_samples`` (the training loop puts them there), so a run that
    forgets to seed fails instead of silently using the global RNG.
    """

    def __init__(self, dim: int = 8, hidden: int = 32, data_preprocessor=None):
        super().__init__(data_preprocessor)
        self.dim = dim
        self.net = nn.Sequential(nn.Linear(dim + 1, hidden), nn.SiLU(), nn.Linear(hidden, dim))

    def draw(self, x, data_samples, training):
        seed = data_samples['seed'] if training else data_samples.get('seed', 0)
        step = data_samples['step'] if training else data_samples.get('step', 0)
        noise, t = [], []
        for index in data_samples['index'].tolist():
            g = image_generator(seed, step, index)
            noise.append(torch.randn(self.dim, generator=g))
            t.append(torch.rand(1, generator=g))
        return torch.stack(noise).to(x), torch.stack(t).to(x)

    def forward(self, inputs, data_samples=None, mode='tensor'):
        x = inputs.float()
        noise, t = self.draw(x, data_samples, training=(mode == 'loss'))
        x_t = (1 - t) * x + t * noise
        pred = self.net(torch.cat([x_t, t], dim=1))
        per_image = ((pred.float() - (noise - x))**2).mean(1)
        if mode == 'loss':
            return dict(loss=per_image.mean())
        if mode == 'predict':
            return [dict(loss=value) for value in per_image]
        return pred


@DATASETS.register_module()
class ToyVectorDataset(torch.utils.data.Dataset):
    """``num`` vectors on a few fixed directions (learnable), seeded. Counts loads."""

    def __init__(self, num: int = 64, dim: int = 8, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        centers = torch.randn(4, dim, generator=g)
        self.data = centers[torch.arange(num) % 4] + 0.05 * torch.randn(num, dim, generator=g)
        self.loaded = 0

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        self.loaded += 1
        return dict(inputs=self.data[index], data_samples=dict(index=index))


@DATA_SAMPLERS.register_module()
class ToyStepBatchSampler:
    """Infinite batch sampler positioned by the step alone (the flexgen contract).

    Global step s covers positions [s*G, (s+1)*G) of an endless stream of seeded
    permutations of the dataset (G = batch_size * world size); rank r takes the r-th
    slice of B = batch_size. The union over ranks equals one process with batch G.
    """

    def __init__(self, sampler, batch_size: int, seed: int = None):
        self.sampler = sampler  # mmengine's DistSamplerSeedHook reads batch_sampler.sampler
        self.dataset = sampler.dataset
        self.batch_size = batch_size
        self.rank, self.world_size = get_dist_info()
        self.seed = seed if seed is not None else (getattr(sampler, 'seed', None) or 0)
        self.start_iter = 0
        self._perms = {}

    def set_start_iter(self, start_iter: int) -> None:
        self.start_iter = start_iter

    def _perm(self, epoch):
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            self._perms[epoch] = torch.randperm(len(self.dataset), generator=g).tolist()
        return self._perms[epoch]

    def __iter__(self):
        n, step = len(self.dataset), self.start_iter
        global_batch = self.batch_size * self.world_size
        while True:
            first = step * global_batch + self.rank * self.batch_size
            yield [self._perm(p // n)[p % n] for p in range(first, first + self.batch_size)]
            step += 1

    def __len__(self):  # steps per pass over the data (the stream itself never ends)
        return math.ceil(len(self.dataset) / (self.batch_size * self.world_size))


@METRICS.register_module()
class ToyLossMetric(BaseMetric):
    """Mean per-image flow loss of ``'predict'`` outputs."""
    default_prefix = 'toy'

    def process(self, data_batch, data_samples):
        self.results.extend(float(out['loss']) for out in data_samples)

    def compute_metrics(self, results):
        return dict(loss=sum(results) / len(results))


"""Class accuracy and Frechet distance of generated images, judged by a small classifier.

The demo's quality figure. FID proper needs Inception weights and tens of thousands of
samples; a generator of a small synthetic dataset is judged better by a classifier trained
on that same dataset (cached, trained in seconds on the CPU):

- ``accuracy``: percent of generated images the classifier assigns to the requested class;
- ``frechet_distance``: Frechet distance (Heusel et al., 2017) between the classifier's
  penultimate features of the generated images and of real images;
- ``classifier_accuracy``: the classifier's own accuracy on held-out real images, the
  ceiling ``accuracy`` can be read against.

With images of several sizes, ``accuracy/HxW`` and ``frechet_distance/HxW`` give the same
per size: the features of that size against the real images of the same size among the
``num_real`` drawn (the judge's pooled features depend on the image size), or against all
of them for a size the real data does not have (an extrapolation).
"""
import math
from typing import Optional, Sequence

import numpy as np
import torch
from mmengine.evaluator import BaseMetric
from mmengine.logging import print_log

from flexgen.registry import METRICS

from .classifier import TrainedClassifier, classify, load_items, train_classifier
from .frechet import feature_statistics, frechet_distance
from .utils import size_key


@METRICS.register_module()
class GeneratedClassAccuracy(BaseMetric):
    """Judges class-conditional generations with a classifier of the real data.

    ``process`` takes the generator's predictions: ``data_samples`` is a list of
    ``dict(image=Tensor[3, H, W] in [0, 1] or uint8, label=int)`` (any sizes).

    Args:
        classifier_dataset: config of the generator's training data, e.g.
            ``dict(type='ProceduralShapes', ...)``; the classifier trains on it and the
            real reference features come from it.
        cache_dir: where the classifier weights are cached (default:
            ``user_cache_dir('classifiers')``, shared by runs from any folder).
        classifier: keyword arguments of ``SmallConvClassifier`` (e.g. ``widths``).
        train_cfg: keyword arguments of ``train_classifier`` (epochs, lr, batch_size, ...).
        seed: the classifier's seed; the real reference images are drawn with it too.
        num_real: real images for the reference statistics (all images if fewer).
        batch_size: images per classifier forward pass.
    """

    default_prefix = 'gen'

    def __init__(self, classifier_dataset: dict,
                 cache_dir: Optional[str] = None,
                 classifier: Optional[dict] = None, train_cfg: Optional[dict] = None,
                 seed: int = 0, num_real: int = 1000, batch_size: int = 256,
                 collect_device: str = 'cpu', prefix: Optional[str] = None):
        super().__init__(collect_device=collect_device, prefix=prefix)
        if not isinstance(classifier_dataset, dict) or 'type' not in classifier_dataset:
            raise ValueError('GeneratedClassAccuracy: classifier_dataset must be a dataset '
                             f"config dict with a 'type', got {classifier_dataset!r}")
        self.classifier_dataset = classifier_dataset
        self.cache_dir, self.seed, self.num_real = cache_dir, seed, num_real
        self.classifier_cfg, self.train_cfg = dict(classifier or {}), dict(train_cfg or {})
        self.batch_size = batch_size
        self._trained: Optional[TrainedClassifier] = None
        self._real_statistics = None

    @property
    def trained(self) -> TrainedClassifier:
        """The classifier, trained or loaded from the cache on first use. Every rank loads
        its own (no barrier: a rank that sees no sample must not block the others); training
        is deterministic and the cache is written atomically, so racing ranks agree."""
        if self._trained is None:
            self._trained = train_classifier(
                self.classifier_dataset, self.classifier_cfg, seed=self.seed,
                cache_dir=self.cache_dir, **self.train_cfg)
        return self._trained

    def process(self, data_batch, data_samples: Sequence[dict]) -> None:
        images, labels = [], []
        num_classes = len(self.trained.classes)
        for i, sample in enumerate(data_samples):
            image, label = sample.get('image'), int(sample.get('label', -1))
            if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3:
                shape = tuple(image.shape) if isinstance(image, torch.Tensor) else image
                raise ValueError(f'GeneratedClassAccuracy.process: data_samples[{i}]["image"] '
                                 f'must be a Tensor[3, H, W] in [0, 1], got {shape}')
            if not 0 <= label < num_classes:
                raise ValueError(f'GeneratedClassAccuracy.process: data_samples[{i}]["label"] '
                                 f'= {label} is not a class index in [0, {num_classes})')
            image = image.detach().cpu()
            image = image.float() / 255 if image.dtype == torch.uint8 else image.float()
            images.append(image * 2 - 1)  # the classifier sees real data's [-1, 1]
            labels.append(label)
        logits, features = classify(self.trained.model, images, self.batch_size)
        for predicted, label, feature, image in zip(logits.argmax(1).tolist(), labels, features,
                                                    images):
            self.results.append(dict(correct=predicted == label, feature=feature.numpy(),
                                     size=tuple(image.shape[1:])))

    def real_statistics(self, size=None):
        """(mu, sigma) of the classifier features of ``num_real`` real images, drawn with
        the seed (computed once per metric); with ``size``, of those of that size when
        there are at least 2, else of all."""
        if self._real_statistics is None:
            from flexgen.registry import DATASETS
            dataset = DATASETS.build(dict(self.classifier_dataset))
            generator = torch.Generator().manual_seed(self.seed)
            indices = torch.randperm(len(dataset), generator=generator)[:self.num_real]
            images, _ = load_items(dataset, indices.tolist())
            _, features = classify(self.trained.model, images, self.batch_size)
            sizes = [tuple(image.shape[1:]) for image in images]
            self._real_statistics = {None: feature_statistics(features)}
            for key in set(sizes):
                mine = [i for i, s in enumerate(sizes) if s == key]
                if len(mine) >= 2:
                    self._real_statistics[key] = feature_statistics(features[mine])
        return self._real_statistics.get(size, self._real_statistics[None])

    def _scores(self, results: list, what: str, size=None) -> dict:
        accuracy = 100.0 * float(np.mean([r['correct'] for r in results])) if results \
            else math.nan
        if len(results) >= 2:
            mu, sigma = feature_statistics(np.stack([r['feature'] for r in results]))
            distance = frechet_distance(mu, sigma, *self.real_statistics(size))
        else:
            print_log(f'GeneratedClassAccuracy: fewer than 2 generated images{what}; the '
                      'Frechet distance is undefined (nan)', logger='current', level=30)
            distance = math.nan
        return dict(accuracy=accuracy, frechet_distance=distance)

    def compute_metrics(self, results: list) -> dict:
        out = dict(self._scores(results, ''), classifier_accuracy=self.trained.accuracy)
        groups = {}
        for result in results:
            groups.setdefault(tuple(result.get('size', ())), []).append(result)
        if len(groups) > 1:
            for size, group in sorted(groups.items()):
                key = size_key(size)
                for name, value in self._scores(group, f' of size {key}', size).items():
                    out[f'{name}/{key}'] = value
        return out

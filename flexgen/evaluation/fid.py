"""FID, sFID, Inception Score and precision / recall of generated images, as ADM's suite
computes them, per image size.

- FID (Heusel et al. 2017): Frechet distance between Gaussians fitted to the 2048-d
  ``pool_3`` features of the samples and of the reference (ADM: the stored ``mu`` /
  ``sigma`` of its reference batch); sFID (Nash et al. 2021): the same on ADM's 2023-d
  spatial features.
- Inception Score (Salimans et al. 2016): ``exp E[KL(p(y|x) || p(y))]`` over splits of
  5,000 samples in order, averaged (ADM's ``split_size=5000``: 10 splits for 50K).
- Precision / recall (Kynkaanniemi et al. 2019): the share of samples inside the k-NN
  (k = 3) balls of the reference features, and of reference images inside the samples'.

IS and precision / recall are torch-fidelity's (``isc_features_to_metric`` without
shuffling, ``calculate_precision_recall_part``); the Frechet distance is flexgen's
(:func:`~flexgen.evaluation.frechet.frechet_distance`, float64).
"""
import logging
import math
import os
import os.path as osp
from typing import Dict, Optional, Sequence, Union

import numpy as np
import torch
from mmengine.dist import barrier, get_dist_info
from mmengine.evaluator import BaseMetric
from mmengine.logging import print_log

from flexgen.registry import METRICS

from .frechet import frechet_distance
from .utils import parse_size_key, size_key, to_uint8
from .inception import InceptionFeatures, import_torch_fidelity, resolve_weights
from .reference import (InceptionStatistics, ReferenceReader, npz_needs,
                        statistics_from_features)

ALL_SCORES = ('fid', 'sfid', 'is', 'precision', 'recall')


def inception_score(logits, split_size: int = 5000) -> float:
    """ADM's Inception Score of logits ``[N, 1008]``: consecutive splits of ``split_size``
    (at least one), the mean of their scores."""
    import_torch_fidelity()
    from torch_fidelity.metric_isc import isc_features_to_metric
    logits = torch.as_tensor(np.asarray(logits))
    splits = max(1, round(len(logits) / split_size))
    return isc_features_to_metric(logits, splits=splits, shuffle=False)['inception_score_mean']


def precision_recall(samples, reference, neighborhood: int = 3,
                     batch_size: int = 10000) -> Dict[str, float]:
    """Improved precision and recall of sample features against reference features."""
    import_torch_fidelity()
    from torch_fidelity.metric_prc import calculate_precision_recall_part
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    precision, recall = calculate_precision_recall_part(
        torch.as_tensor(np.asarray(samples), device=device),
        torch.as_tensor(np.asarray(reference), device=device), neighborhood, batch_size)
    return dict(precision=precision, recall=recall)


@METRICS.register_module()
class InceptionMetrics(BaseMetric):
    """FID / sFID / IS / precision / recall of generated images against a reference.

    ``process`` takes the generator's predictions: ``data_samples`` is a list of
    ``dict(image=Tensor[3, H, W] in [0, 1] or uint8, index=int)`` (any sizes). Results
    are reported per image size: with one size as ``fid``, ``is``, ...; with several as
    ``fid/HxW``, ``is/HxW``, ... (each size against its reference).

    Args:
        reference: an ADM reference batch (``.npz``) or a folder of images; or a dict
            ``{'HxW': source, ..., 'default': source}`` choosing one per size. Checked
            when the metric is built, read (and cached) when first needed.
        inception_weights: a local Inception weights file (``.pth`` / ``.safetensors``);
            ``None``: torch-fidelity's file in torch's hub cache, fetched when missing
            (``download``), before any image is generated.
        scores: a subset of ``('fid', 'sfid', 'is', 'precision', 'recall')`` (not named
            ``metrics``: mmengine reads a config with that key as an ``Evaluator``'s).
        batch_size: images per Inception forward pass.
        device: where Inception runs (default: CUDA when available).
        cache_dir: the reference-feature cache (default ``user_cache_dir('inception')``).
        neighborhood: k of precision / recall.
        is_split_size: images per Inception Score split.
    """

    default_prefix = 'inception'

    def __init__(self, reference: Union[str, Dict[str, str]],
                 inception_weights: Optional[str] = None, download: bool = True,
                 scores: Sequence[str] = ALL_SCORES, batch_size: int = 64,
                 device: Optional[str] = None, cache_dir: Optional[str] = None,
                 neighborhood: int = 3, is_split_size: int = 5000,
                 collect_device: str = 'cpu', prefix: Optional[str] = None):
        super().__init__(collect_device=collect_device, prefix=prefix)
        unknown = sorted(set(scores) - set(ALL_SCORES))
        if unknown or not scores:
            raise ValueError(f'InceptionMetrics: scores must be a non-empty subset of '
                             f'{ALL_SCORES}, got {tuple(scores)}')
        self.scores = tuple(scores)
        self.references = self._check_references(reference, self.scores)
        import_torch_fidelity()
        self.weights = self._weights_on_every_rank(inception_weights, download)
        self.batch_size, self.device, self.cache_dir = batch_size, device, cache_dir
        self.neighborhood, self.is_split_size = neighborhood, is_split_size
        self._inception: Optional[InceptionFeatures] = None
        self._reader: Optional[ReferenceReader] = None
        self._statistics: Dict[str, InceptionStatistics] = {}

    @staticmethod
    def _weights_on_every_rank(weights, download: bool) -> str:
        """The weights file; when it must be fetched, one process per machine fetches it
        while the others wait."""
        _, world = get_dist_info()
        if world == 1 or weights is not None:
            return resolve_weights(weights, download)
        if int(os.environ.get('LOCAL_RANK', 0)) == 0:
            resolve_weights(None, download)
        barrier()
        return resolve_weights(None, download=False)

    @staticmethod
    def _check_references(reference, scores) -> Dict[str, str]:
        """Every source exists and can give what ``scores`` need (before any image is
        generated, not after)."""
        references = dict(reference) if isinstance(reference, dict) else dict(default=reference)
        for key, source in references.items():
            if key != 'default':
                parse_size_key(key)
            if not isinstance(source, str) or not osp.exists(osp.expanduser(source)):
                raise FileNotFoundError(
                    f'InceptionMetrics: reference[{key!r}] = {source!r} does not exist: give '
                    'an ADM reference batch (.npz, e.g. VIRTUAL_imagenet256_labeled.npz from '
                    "guided-diffusion's evaluations) or a folder of images")
            if osp.isdir(osp.expanduser(source)):
                continue
            try:
                with np.load(osp.expanduser(source)) as data:
                    keys = set(data.files)
            except Exception as error:
                raise ValueError(f'InceptionMetrics: reference {source!r} is not a readable '
                                 f'.npz: {error}') from error
            needs = npz_needs(keys, scores)
            if needs:
                raise ValueError(f'InceptionMetrics: reference {source!r} has keys '
                                 f'{sorted(keys)}: {"; ".join(needs)}')
        return references

    @property
    def inception(self) -> InceptionFeatures:
        if self._inception is None:
            self._inception = InceptionFeatures(self.weights, download=False,
                                                device=self.device)
        return self._inception

    def reference_for(self, size) -> InceptionStatistics:
        """The reference statistics for images of ``size`` (read once per source)."""
        key = size_key(size)
        source = self.references.get(key, self.references.get('default'))
        if source is None:
            raise KeyError(f'InceptionMetrics: no reference for size {key} (give '
                           f"reference={{'{key}': ..., 'default': ...}}); "
                           f'have {sorted(self.references)}')
        if source not in self._statistics:
            if self._reader is None:
                self._reader = ReferenceReader(self.inception, self.cache_dir, self.batch_size)
            need_images = 'precision' in self.scores or 'recall' in self.scores
            self._statistics[source] = self._reader.read(source, need_images)
        return self._statistics[source]

    def process(self, data_batch, data_samples: Sequence[dict]) -> None:
        groups: Dict[tuple, list] = {}
        for i, sample in enumerate(data_samples):
            image = sample.get('image')
            if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3:
                shape = tuple(image.shape) if isinstance(image, torch.Tensor) else image
                raise ValueError(f'InceptionMetrics.process: data_samples[{i}]["image"] must '
                                 f'be a Tensor[3, H, W] in [0, 1] or uint8, got {shape}')
            groups.setdefault(tuple(image.shape[1:]), []).append(sample)
        for size, samples in groups.items():
            for start in range(0, len(samples), self.batch_size):
                chunk = samples[start:start + self.batch_size]
                images = to_uint8(torch.stack([s['image'].detach().cpu() for s in chunk]))
                features = self.inception(images)
                for j, sample in enumerate(chunk):
                    result = dict(index=int(sample.get('index', -1)), size=size,
                                  pool=features['pool'][j].numpy(),
                                  logits=features['logits'][j].numpy())
                    if 'sfid' in self.scores:
                        result['spatial'] = features['spatial'][j].numpy()
                    self.results.append(result)

    def _size_metrics(self, size, results: list) -> Dict[str, float]:
        reference = self.reference_for(size)
        out = {}
        if len(results) < 2:
            print_log(f'InceptionMetrics: {len(results)} image(s) of size {size_key(size)}; '
                      'FID and the other statistics need at least 2 (nan)', logger='current',
                      level=logging.WARNING)
            return {name: math.nan for name in self.scores}
        samples = statistics_from_features(
            np.stack([r['pool'] for r in results]),
            np.stack([r['spatial'] for r in results]) if 'sfid' in self.scores else None)
        if 'fid' in self.scores:
            out['fid'] = frechet_distance(samples.mu, samples.sigma, reference.mu,
                                          reference.sigma)
        if 'sfid' in self.scores:
            if reference.mu_s is None:
                raise ValueError(f'InceptionMetrics: the reference {reference.source!r} has no '
                                 "spatial statistics (mu_s, sigma_s) and no images; drop 'sfid' "
                                 'from scores or give a reference with images')
            out['sfid'] = frechet_distance(samples.mu_s, samples.sigma_s, reference.mu_s,
                                           reference.sigma_s)
        if 'is' in self.scores:
            out['is'] = inception_score(np.stack([r['logits'] for r in results]),
                                        self.is_split_size)
        if 'precision' in self.scores or 'recall' in self.scores:
            if reference.pool is None:
                raise ValueError(f'InceptionMetrics: the reference {reference.source!r} has no '
                                 'images (arr_0), so precision / recall cannot be computed; '
                                 "drop them from scores or give a reference with images")
            scores = precision_recall(samples.pool, reference.pool, self.neighborhood)
            out.update({k: v for k, v in scores.items() if k in self.scores})
        return out

    def compute_metrics(self, results: list) -> dict:
        groups: Dict[tuple, list] = {}
        for result in sorted(results, key=lambda r: r['index']):
            groups.setdefault(tuple(result['size']), []).append(result)
        if len(groups) == 1:
            ((size, group),) = groups.items()
            return self._size_metrics(size, group)
        out = {}
        for size, group in sorted(groups.items()):
            for name, value in self._size_metrics(size, group).items():
                out[f'{name}/{size_key(size)}'] = value
        return out

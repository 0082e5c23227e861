"""Reference statistics for Inception metrics: an ADM reference batch, an image folder, or
the cache of a previous run.

ADM's reference batches (``VIRTUAL_imagenet256_labeled.npz``, ``VIRTUAL_imagenet512.npz``)
hold ``arr_0`` (10,000 uint8 images ``[N, H, W, 3]``) and the statistics ``mu``, ``sigma``
(``pool_3``) and ``mu_s``, ``sigma_s`` (spatial, sFID). As ADM's evaluator does, FID and
sFID use the stored statistics and precision / recall the features of ``arr_0``; a file
without statistics gets them from its images. Features computed from images are cached
(``user_cache_dir('inception')``) under a key of the source (path, size and modification
time of every file) and the Inception weights, so the next run reads them back.
"""
import hashlib
import io
import json
import os
import os.path as osp
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Optional

import numpy as np
import torch
from mmengine.logging import print_log

from flexgen.fileio import atomic_write

from .frechet import feature_statistics
from .utils import user_cache_dir

CACHE_VERSION = 1
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp', '.bmp')
POOL_DIM, SPATIAL_DIM = 2048, 2023


def npz_needs(keys, scores: Iterable[str] = ('fid',)) -> List[str]:
    """What an ADM-style reference ``.npz`` with ``keys`` lacks for ``scores`` (empty when
    it can give them all): FID its ``mu`` / ``sigma`` or images ``arr_0``, sFID
    ``mu_s`` / ``sigma_s`` or images, precision / recall the images."""
    keys, scores = set(keys), set(scores)
    needs = []
    if {'precision', 'recall'} & scores and 'arr_0' not in keys:
        needs.append('precision / recall need its images (arr_0, uint8 [N, H, W, 3])')
    if 'sfid' in scores and not ({'mu_s', 'sigma_s'} <= keys or 'arr_0' in keys):
        needs.append('sfid needs mu_s / sigma_s or images (arr_0)')
    if not ({'mu', 'sigma'} <= keys or 'arr_0' in keys):
        needs.append('FID needs mu / sigma (Inception statistics) or images (arr_0)')
    return needs


@dataclass
class InceptionStatistics:
    """What FID, sFID and precision / recall need of one image set.

    ``mu`` / ``sigma``: mean and covariance of the pool features; ``mu_s`` / ``sigma_s``:
    of the spatial features (``None`` when unknown); ``pool``: the per-image pool
    features (``None`` when only statistics are known); ``count``: images behind them.
    """
    mu: np.ndarray
    sigma: np.ndarray
    mu_s: Optional[np.ndarray] = None
    sigma_s: Optional[np.ndarray] = None
    pool: Optional[np.ndarray] = None
    count: int = 0
    source: str = ''


def statistics_from_features(pool, spatial=None, source: str = '') -> InceptionStatistics:
    """Statistics (float64) of per-image features ``pool [N, 2048]`` and ``spatial``."""
    pool = np.asarray(pool, dtype=np.float32)
    mu, sigma = feature_statistics(pool)
    mu_s = sigma_s = None
    if spatial is not None:
        mu_s, sigma_s = feature_statistics(np.asarray(spatial, dtype=np.float32))
    return InceptionStatistics(mu, sigma, mu_s, sigma_s, pool, len(pool), source)


def extract_features(inception, batches: Iterable[torch.Tensor]) -> Dict[str, np.ndarray]:
    """Concatenated Inception features of uint8 ``[B, 3, H, W]`` batches."""
    parts = {}
    for batch in batches:
        for name, value in inception(batch).items():
            parts.setdefault(name, []).append(value.numpy())
    if not parts:
        raise ValueError('extract_features: no images')
    return {name: np.concatenate(values) for name, values in parts.items()}


def _array_batches(images: np.ndarray, batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(0, len(images), batch_size):
        yield torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])
                               ).permute(0, 3, 1, 2)


def _folder_files(folder: str) -> List[str]:
    files = []
    for root, _, names in os.walk(folder):
        files += [osp.join(root, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(files)


def _folder_batches(files: List[str], batch_size: int) -> Iterator[torch.Tensor]:
    """Images of a folder as uint8 batches, one size per batch (in file order within a
    size)."""
    from PIL import Image
    pending: Dict[tuple, list] = {}
    for path in files:
        with Image.open(path) as image:
            array = np.asarray(image.convert('RGB'))
        group = pending.setdefault(array.shape, [])
        group.append(array)
        if len(group) == batch_size:
            yield torch.from_numpy(np.stack(group)).permute(0, 3, 1, 2)
            group.clear()
    for group in pending.values():
        if group:
            yield torch.from_numpy(np.stack(group)).permute(0, 3, 1, 2)


def _source_key(source: str, files: List[str], weights_digest: str) -> str:
    """A key that changes when any file of the source or the Inception weights change."""
    entries = []
    for path in files:
        stat = os.stat(path)
        entries.append((osp.relpath(path, source) if osp.isdir(source) else path,
                        stat.st_size, stat.st_mtime_ns))
    text = json.dumps(dict(version=CACHE_VERSION, source=osp.abspath(source), files=entries,
                           weights=weights_digest))
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _check_shape(path: str, key: str, value: np.ndarray, shape: tuple) -> np.ndarray:
    if value.shape != shape:
        raise ValueError(f'{path}: {key!r} has shape {value.shape}, expected {shape} '
                         '(ADM reference batches hold Inception pool_3 / mixed_6 statistics)')
    return value.astype(np.float64)


class ReferenceReader:
    """Reads (and caches) the Inception statistics of reference sources.

    Args:
        inception: an :class:`~flexgen.evaluation.inception.InceptionFeatures`.
        cache_dir: the feature cache; default ``user_cache_dir('inception')``.
        batch_size: images per Inception forward pass.
    """

    def __init__(self, inception, cache_dir: Optional[str] = None, batch_size: int = 64):
        self.inception, self.batch_size = inception, batch_size
        self.cache_dir = cache_dir or user_cache_dir('inception')

    # ------------------------------------------------------------------ cache
    def _cached_features(self, source: str, files: List[str], batches) -> Dict[str, np.ndarray]:
        """Features of a source's images: from the cache, else computed and cached."""
        key = _source_key(source, files, self.inception.digest)
        path = osp.join(self.cache_dir, f'reference_{key}.npz')
        if osp.isfile(path):
            with np.load(path) as cached:
                print_log(f'Inception features of {source} read from the cache {path}',
                          logger='current')
                return {name: cached[name] for name in cached.files}
        features = extract_features(self.inception, batches())
        buffer = io.BytesIO()
        np.savez(buffer, **features)
        atomic_write(buffer.getvalue(), path)
        print_log(f'Inception features of {len(features["pool"])} images of {source} '
                  f'cached in {path}', logger='current')
        return features

    # ------------------------------------------------------------------ sources
    def read(self, source: str, need_images: bool = False) -> InceptionStatistics:
        """Statistics of ``source``: an ADM ``.npz`` or a folder of images.

        ``need_images``: the per-image pool features are wanted (precision / recall), so
        a reference batch's ``arr_0`` is run through Inception even when its statistics
        are stored.
        """
        source = osp.expanduser(str(source))
        if osp.isdir(source):
            return self._read_folder(source)
        if osp.isfile(source):
            return self._read_npz(source, need_images)
        raise FileNotFoundError(f'reference {source!r} does not exist: give an ADM reference '
                                'batch (.npz, e.g. VIRTUAL_imagenet256_labeled.npz) or a '
                                'folder of images')

    def _read_folder(self, folder: str) -> InceptionStatistics:
        files = _folder_files(folder)
        if len(files) < 2:
            raise ValueError(f'reference folder {folder!r} holds {len(files)} images '
                             f'({", ".join(IMAGE_EXTENSIONS)}); statistics need at least 2')
        features = self._cached_features(
            folder, files, lambda: _folder_batches(files, self.batch_size))
        return statistics_from_features(features['pool'], features['spatial'], folder)

    def _read_npz(self, path: str, need_images: bool) -> InceptionStatistics:
        try:
            data = np.load(path)  # allow_pickle=False: arrays only
        except Exception as error:
            raise ValueError(f'reference {path!r} is not a readable .npz: {error}') from error
        with data:
            keys = set(data.files)
            has_stats, has_images = {'mu', 'sigma'} <= keys, 'arr_0' in keys
            needs = npz_needs(keys)
            if needs:
                raise ValueError(f'reference {path!r} has keys {sorted(keys)}: '
                                 f'{"; ".join(needs)}')
            stored = {}
            if has_stats:
                stored['mu'] = _check_shape(path, 'mu', data['mu'], (POOL_DIM,))
                stored['sigma'] = _check_shape(path, 'sigma', data['sigma'],
                                               (POOL_DIM, POOL_DIM))
            if {'mu_s', 'sigma_s'} <= keys:
                stored['mu_s'] = _check_shape(path, 'mu_s', data['mu_s'], (SPATIAL_DIM,))
                stored['sigma_s'] = _check_shape(path, 'sigma_s', data['sigma_s'],
                                                 (SPATIAL_DIM, SPATIAL_DIM))
            if has_images and (need_images or not has_stats or 'mu_s' not in stored):
                images = data['arr_0']
                if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
                    raise ValueError(f'reference {path!r}: arr_0 must be uint8 [N, H, W, 3] '
                                     f'(ADM layout), got {images.dtype} {images.shape}')
                features = self._cached_features(
                    path, [path], lambda: _array_batches(images, self.batch_size))
                computed = statistics_from_features(features['pool'], features['spatial'],
                                                    path)
            else:
                computed = None
        if computed is None:
            return InceptionStatistics(stored['mu'], stored['sigma'], stored.get('mu_s'),
                                       stored.get('sigma_s'), None, 0, path)
        # The stored statistics win (ADM's evaluator uses them); the images give the rest.
        for name, value in stored.items():
            setattr(computed, name, value)
        return computed

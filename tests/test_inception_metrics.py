"""Inception metrics on a randomly initialised Inception of ADM's architecture (torch-fidelity's
port; real weights are never fetched in tests): FID / sFID / IS / precision-recall equal
direct computations on the same features, reference batches in ADM's layout, image folders,
the feature cache, and the weights loader's refusals."""
import argparse
import os

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from flexgen.datasets import ProceduralShapes
from flexgen.evaluation import InceptionFeatures, InceptionMetrics, ReferenceReader
from flexgen.evaluation import reference as reference_module
from flexgen.evaluation.inception import resolve_weights
from flexgen.registry import METRICS
from helpers import random_inception_weights


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp('inception') / 'inception.pth'
    random_inception_weights(path, seed=0)
    return str(path)


@pytest.fixture(scope='module')
def inception(weights):
    return InceptionFeatures(weights, download=False, device='cpu')


def shapes(count, seed, size=(24, 24), palette='rgb'):
    """uint8 ``[N, H, W, 3]`` images drawn by flexgen's ProceduralShapes."""
    data = ProceduralShapes(count, sizes=[size], seed=seed, palette=palette)
    images = torch.stack([data[i]['inputs'] for i in range(count)])
    return ((images + 1) * 127.5 + 0.5).floor().clamp(0, 255).to(torch.uint8) \
        .permute(0, 2, 3, 1).numpy()


def torch_fidelity_features(weights, images, batch=64):
    """Features straight from torch-fidelity's extractor (its own loader; the file is this
    test's), with ADM's spatial layer taken by a hook here; batched as the metric batches
    (a convolution's float32 rounding depends on the batch)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    net = FeatureExtractorInceptionV3('inception-v3-compat', ['2048', 'logits_unbiased'],
                                      feature_extractor_weights_path=weights)
    kept, parts = {}, []
    net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: kept.update(spatial=o))
    for begin in range(0, len(images), batch):
        chunk = torch.from_numpy(images[begin:begin + batch]).permute(0, 3, 1, 2)
        with torch.no_grad():
            pool, logits = net(chunk)
        spatial = kept['spatial'][:, :7].permute(0, 2, 3, 1).reshape(len(chunk), -1)
        parts.append((pool, logits, spatial))
    return tuple(torch.cat(p).double().numpy() for p in zip(*parts))


def direct_fid(a, b):
    """ADM's formula with scipy's sqrtm, float64, from features ``a`` and ``b``. scipy's
    sqrtm of the 2048-d product takes minutes on a CPU; these covariances have rank < 2N,
    and with Q an orthonormal basis of the span of both centred feature sets,
    S1 S2 = Q (Q^T S1 Q)(Q^T S2 Q) Q^T, so Tr sqrt(S1 S2) = Tr sqrtm of the small product."""
    mu1, sigma1 = a.mean(0), np.cov(a, rowvar=False)
    mu2, sigma2 = b.mean(0), np.cov(b, rowvar=False)
    basis, _ = np.linalg.qr(np.concatenate([a - mu1, b - mu2]).T)
    covmean = scipy.linalg.sqrtm((basis.T @ sigma1 @ basis) @ (basis.T @ sigma2 @ basis))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2)
                 - 2 * np.trace(np.real(covmean)))


def direct_inception_score(logits):
    """ADM's compute_inception_score on one split (fewer than 5,000 images)."""
    logits = logits - logits.max(1, keepdims=True)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    kl = p * (np.log(p) - np.log(p.mean(0, keepdims=True)))
    return float(np.exp(kl.sum(1).mean()))


def direct_precision_recall(samples, reference, k=3):
    """k-NN manifolds by brute force: radius = distance to the k-th nearest other point."""
    def dist(x, y):
        return np.sqrt(((x[:, None, :] - y[None, :, :]) ** 2).sum(-1))
    radius_ref = np.sort(dist(reference, reference), axis=1)[:, k]
    radius_gen = np.sort(dist(samples, samples), axis=1)[:, k]
    precision = (dist(samples, reference) <= radius_ref[None]).any(1).mean()
    recall = (dist(reference, samples) <= radius_gen[None]).any(1).mean()
    return float(precision), float(recall)


def evaluate(metric, images, batch=16, start_index=0):
    for begin in range(0, len(images), batch):
        chunk = torch.from_numpy(images[begin:begin + batch]).permute(0, 3, 1, 2)
        metric.process(None, [dict(image=x.float() / 255, index=start_index + begin + j)
                              for j, x in enumerate(chunk)])
    return metric.evaluate(len(images))


def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


@pytest.mark.slow
def test_metrics_equal_direct_computation(weights, tmp_path):
    samples = shapes(40, seed=1)
    real = shapes(48, seed=2, palette='grey')
    reference = write_npz(tmp_path / 'ref.npz', arr_0=real)  # images only: stats from them
    metric = METRICS.build(dict(type='InceptionMetrics', reference=reference,
                                inception_weights=weights, device='cpu',
                                cache_dir=str(tmp_path / 'cache')))
    result = evaluate(metric, samples, batch=16)
    assert set(result) == {f'inception/{m}' for m in ('fid', 'sfid', 'is', 'precision',
                                                       'recall')}

    # The same features (bit for bit) straight from torch-fidelity, then the direct formulas.
    pool, logits, spatial = torch_fidelity_features(weights, samples, batch=16)
    real_pool, _, real_spatial = torch_fidelity_features(weights, real)
    with np.load(next((tmp_path / 'cache').iterdir())) as cached:
        assert np.array_equal(cached['pool'], real_pool.astype(np.float32))
        assert np.array_equal(cached['spatial'], real_spatial.astype(np.float32))
    fid = direct_fid(pool, real_pool)
    assert abs(result['inception/fid'] - fid) <= 1e-6 * fid
    sfid = direct_fid(spatial, real_spatial)
    assert abs(result['inception/sfid'] - sfid) <= 1e-6 * sfid
    score = direct_inception_score(logits)
    assert abs(result['inception/is'] - score) <= 1e-6 * score
    precision, recall = direct_precision_recall(pool, real_pool)
    # Shares of N images (k / N); torch-fidelity averages in float32.
    assert result['inception/precision'] == pytest.approx(precision, abs=1e-6)
    assert result['inception/recall'] == pytest.approx(recall, abs=1e-6)
    assert 0 < precision < 1 or 0 < recall < 1  # a comparison that could have gone otherwise


@pytest.mark.slow
def test_adm_reference_batch_stored_statistics_win(weights, tmp_path):
    """ADM's layout: arr_0 images plus mu / sigma / mu_s / sigma_s of another set (as ADM's
    reference batches store statistics of the whole training set). FID and sFID use the
    stored statistics; precision / recall the features of arr_0."""
    samples, real, other = shapes(24, seed=1), shapes(24, seed=2), shapes(30, seed=3,
                                                                          palette='grey')
    other_pool, _, other_spatial = torch_fidelity_features(weights, other)
    reference = write_npz(
        tmp_path / 'VIRTUAL_tiny.npz', arr_0=real,
        mu=other_pool.mean(0), sigma=np.cov(other_pool, rowvar=False),
        mu_s=other_spatial.mean(0), sigma_s=np.cov(other_spatial, rowvar=False))
    metric = InceptionMetrics(reference, inception_weights=weights, device='cpu',
                              scores=('fid', 'precision', 'recall'),
                              cache_dir=str(tmp_path / 'cache'))
    result = evaluate(metric, samples, batch=16)
    pool, _, _ = torch_fidelity_features(weights, samples, batch=16)
    real_pool, _, _ = torch_fidelity_features(weights, real)
    fid = direct_fid(pool, other_pool)
    assert abs(result['inception/fid'] - fid) <= 1e-6 * fid
    assert abs(result['inception/fid'] - direct_fid(pool, real_pool)) > 1e-3 * fid
    precision, recall = direct_precision_recall(pool, real_pool)
    # Shares of N images (k / N); torch-fidelity averages in float32.
    assert result['inception/precision'] == pytest.approx(precision, abs=1e-6)
    assert result['inception/recall'] == pytest.approx(recall, abs=1e-6)


def test_reference_reader_npz_folder_and_cache(inception, tmp_path, monkeypatch):
    real = shapes(6, seed=2, size=(16, 24))
    npz = write_npz(tmp_path / 'ref.npz', arr_0=real)
    folder = tmp_path / 'folder' / 'class_a'
    folder.mkdir(parents=True)
    for i, image in enumerate(real):
        Image.fromarray(image).save(folder / f'{i:03d}.png')
    reader = ReferenceReader(inception, cache_dir=str(tmp_path / 'cache'), batch_size=4)
    from_npz = reader.read(npz)
    from_folder = reader.read(str(tmp_path / 'folder'))
    parts = [inception(torch.from_numpy(real[b:b + 4]).permute(0, 3, 1, 2)) for b in (0, 4)]
    direct = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}  # batched as the reader
    assert from_npz.count == from_folder.count == 6
    assert np.array_equal(from_npz.pool, direct['pool'].numpy())
    assert np.array_equal(from_folder.pool, direct['pool'].numpy())  # PNG is lossless
    np.testing.assert_allclose(from_npz.mu, direct['pool'].double().numpy().mean(0), rtol=1e-12)
    np.testing.assert_allclose(from_npz.sigma_s, np.cov(direct['spatial'].double().numpy(),
                                                         rowvar=False), rtol=1e-9, atol=1e-15)

    # Cached: read back without running Inception.
    def no_inception(*args, **kwargs):
        raise AssertionError('the cache should have been used')

    monkeypatch.setattr(reference_module, 'extract_features', no_inception)
    assert np.array_equal(reader.read(npz).pool, from_npz.pool)
    assert np.array_equal(reader.read(str(tmp_path / 'folder')).pool, from_folder.pool)
    # ... until the file changes.
    os.utime(npz, ns=(1, 1))
    with pytest.raises(AssertionError, match='cache should have been used'):
        reader.read(npz)


def test_reference_errors_name_the_file_and_keys(inception, weights, tmp_path):
    reader = ReferenceReader(inception, cache_dir=str(tmp_path / 'cache'))
    empty = write_npz(tmp_path / 'stats.npz', labels=np.zeros(3))
    with pytest.raises(ValueError, match=r"stats\.npz.*\['labels'\].*FID needs mu / sigma"
                                         r".*or images \(arr_0\)"):
        reader.read(empty)
    bad = write_npz(tmp_path / 'bad.npz', mu=np.zeros(64), sigma=np.eye(64))
    with pytest.raises(ValueError, match=r"bad\.npz: 'mu' has shape \(64,\), expected \(2048,\)"):
        reader.read(bad)
    chw = write_npz(tmp_path / 'chw.npz', arr_0=np.zeros((4, 3, 8, 8), np.uint8))
    with pytest.raises(ValueError, match=r"chw\.npz': arr_0 must be uint8 \[N, H, W, 3\]"):
        reader.read(chw)
    with pytest.raises(FileNotFoundError, match='missing.npz'):
        reader.read(str(tmp_path / 'missing.npz'))
    # The metric checks its references when it is built, before anything is generated.
    stats_only = write_npz(tmp_path / 'stats_only.npz', mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(ValueError, match=r'stats_only\.npz.*precision / recall need its images'):
        InceptionMetrics(stats_only, inception_weights=weights)
    with pytest.raises(FileNotFoundError, match=r"reference\['default'\] = .*nowhere\.npz"):
        InceptionMetrics(str(tmp_path / 'nowhere.npz'), inception_weights=weights)
    with pytest.raises(ValueError, match="scores must be a non-empty subset"):
        InceptionMetrics(stats_only, inception_weights=weights, scores=('fid', 'kid'))
    assert InceptionMetrics(stats_only, inception_weights=weights, scores=('fid', 'is'))


def test_weights_are_read_safely(weights, inception, tmp_path, monkeypatch):
    state = torch.load(weights, weights_only=True)
    from safetensors.torch import save_file
    save_file(state, str(tmp_path / 'inception.safetensors'))
    images = torch.from_numpy(shapes(3, seed=5)).permute(0, 3, 1, 2)
    again = InceptionFeatures(str(tmp_path / 'inception.safetensors'), device='cpu')(images)
    for name, value in inception(images).items():
        assert torch.equal(again[name], value), name
    assert again['pool'].shape == (3, 2048) and again['spatial'].shape == (3, 2023)

    # Any pickled object beyond tensors and plain containers: refused, never unpickled.
    torch.save(dict(state, extra=argparse.Namespace(code='anything')),
               str(tmp_path / 'pickled.pth'))
    with pytest.raises(RuntimeError, match='pickled.pth.*weights-only'):
        InceptionFeatures(str(tmp_path / 'pickled.pth'), device='cpu')
    torch.save({k: v for k, v in state.items() if k != 'fc.weight'}, str(tmp_path / 'short.pth'))
    with pytest.raises(ValueError, match=r"short\.pth.*do not fit.*fc\.weight"):
        InceptionFeatures(str(tmp_path / 'short.pth'), device='cpu')
    with pytest.raises(FileNotFoundError, match='nothing.pth'):
        resolve_weights(str(tmp_path / 'nothing.pth'))
    # No file given and none cached: with download=False, an error saying where to put it.
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path / 'hub'))
    with pytest.raises(FileNotFoundError, match=r'hub/checkpoints/weights-inception.*'
                                                'inception_weights=PATH'):
        resolve_weights(None, download=False)


def test_several_sizes_are_scored_against_their_references(weights, tmp_path, monkeypatch):
    """Per-size keys, each size against the reference the dict names for it."""
    small, wide = shapes(3, seed=1, size=(16, 16)), shapes(3, seed=2, size=(16, 32))
    stats = {name: write_npz(tmp_path / f'{name}.npz', mu=np.full(2048, value),
                             sigma=np.eye(2048)) for name, value in (('a', 1.0), ('b', 2.0))}
    metric = InceptionMetrics({'16x32': stats['b'], 'default': stats['a']}, scores=('fid',),
                              inception_weights=weights, device='cpu')
    # Frechet distances are checked above; here only which reference each size meets.
    calls = []
    monkeypatch.setattr('flexgen.evaluation.fid.frechet_distance',
                        lambda mu1, s1, mu2, s2: calls.append(mu2) or float(len(calls)))
    evaluate_mixed = [dict(image=torch.from_numpy(x).permute(2, 0, 1), index=i)
                      for i, x in enumerate(list(small) + list(wide))]
    metric.process(None, evaluate_mixed)
    result = metric.evaluate(6)
    assert set(result) == {'inception/fid/16x16', 'inception/fid/16x32'}
    with np.load(stats['a']) as a, np.load(stats['b']) as b:
        assert np.array_equal(calls[0], a['mu']) and np.array_equal(calls[1], b['mu'])


def test_uint8_conversion_matches_adm():
    """to_uint8 of (x + 1) / 2 is ADM's / DiT's clamp(127.5 x + 128, 0, 255) truncated, on
    a dense float32 grid (the generator's dtype) that hits every rounding boundary."""
    from flexgen.evaluation import to_uint8
    x = torch.linspace(-1.2, 1.2, 100_001, dtype=torch.float32)
    adm = (127.5 * x + 128).clamp(0, 255).to(torch.uint8)
    assert torch.equal(to_uint8((x + 1) / 2), adm)
    assert torch.equal(to_uint8(adm), adm)


def test_features_need_uint8(inception):
    with pytest.raises(ValueError, match='uint8 \\[B, 3, H, W\\]'):
        inception(torch.zeros(1, 3, 8, 8))


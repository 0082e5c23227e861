"""Evaluation: the Frechet distance against closed forms, the cached classifier of the real
data, and the generated-class-accuracy metric on perfect, mislabelled and noise generators."""
import os

import numpy as np
import pytest
import torch

from flexgen.evaluation import classifier as classifier_module
from flexgen.evaluation import (GeneratedClassAccuracy, SmallConvClassifier, classify,
                                feature_statistics, frechet_distance, train_classifier)
from flexgen.registry import DATASETS, METRICS


class ToyShapes:
    """Squares, discs and crosses of random colours on dark backgrounds; label = index % 3,
    sizes alternate every three images."""

    CLASSES = ('square', 'disc', 'cross')

    def __init__(self, num_images=600, sizes=((16, 16), (16, 24)), seed=0):
        g = torch.Generator().manual_seed(seed)
        self.sizes = [tuple(sizes[(i // 3) % len(sizes)]) for i in range(num_images)]
        self.images = [self._draw(i % 3, *self.sizes[i], g) for i in range(num_images)]
        self.metainfo = dict(classes=self.CLASSES)

    @staticmethod
    def _draw(label, h, w, g):
        colour = torch.rand(3, 1, 1, generator=g) * 0.7 + 0.3
        background = torch.rand(3, 1, 1, generator=g) * 0.25
        r = 3 + int(torch.randint(0, 3, (1,), generator=g))
        cy = int(torch.randint(r, h - r, (1,), generator=g))
        cx = int(torch.randint(r, w - r, (1,), generator=g))
        dy = (torch.arange(h) - cy).abs()[:, None]
        dx = (torch.arange(w) - cx).abs()[None, :]
        if label == 0:
            mask = torch.maximum(dy, dx) <= r
        elif label == 1:
            mask = dy ** 2 + dx ** 2 <= r * r + r
        else:
            mask = ((dy <= 1) & (dx <= r)) | ((dx <= 1) & (dy <= r))
        return torch.where(mask, colour, background) * 2 - 1

    def __len__(self):
        return len(self.images)

    def get_size(self, i):
        return self.sizes[i]

    def __getitem__(self, i):
        return dict(inputs=self.images[i], data_samples=dict(label=i % 3, index=i))


DATASETS.register_module(name='_TestEvaluationToyShapes', module=ToyShapes, force=True)
DATASET = dict(type='_TestEvaluationToyShapes', num_images=600)
TRAIN = dict(epochs=20, batch_size=64)


# ----------------------------------------------------------------------- Frechet distance
def _random_spd(d, seed):
    a = np.random.default_rng(seed).normal(size=(d, d))
    return a @ a.T + 0.1 * np.eye(d)


def test_frechet_closed_forms():
    rng = np.random.default_rng(0)
    d = 6
    mu, sigma = rng.normal(size=d), _random_spd(d, 1)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-9
    shift = rng.normal(size=d)
    assert frechet_distance(mu, sigma, mu + shift, sigma) == pytest.approx(shift @ shift,
                                                                          rel=1e-9)
    # Diagonal, then commuting (same eigenvectors): sum (sqrt(a) - sqrt(b))^2.
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    expected = ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu, np.diag(a), mu, np.diag(b)) == pytest.approx(expected, rel=1e-9)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    assert frechet_distance(mu, q * a @ q.T, mu + shift, q * b @ q.T) == pytest.approx(
        expected + shift @ shift, rel=1e-9)
    # General covariances: Tr (S1 S2)^(1/2) from the (non-symmetric) product's eigenvalues.
    s1, s2 = _random_spd(d, 2), _random_spd(d, 3)
    trace_sqrt = np.sqrt(np.linalg.eigvals(s1 @ s2).real).sum()
    general = np.trace(s1) + np.trace(s2) - 2 * trace_sqrt
    assert frechet_distance(mu, s1, mu, s2) == pytest.approx(general, rel=1e-9)
    assert frechet_distance(mu, s2, mu, s1) == pytest.approx(general, rel=1e-9)
    # Torch inputs (float32) go through the same float64 path.
    assert frechet_distance(torch.tensor(mu), torch.tensor(s1), mu, s2) == pytest.approx(
        general, rel=1e-9)


def test_feature_statistics_and_errors():
    features = np.random.default_rng(0).normal(size=(50, 4))
    mu, sigma = feature_statistics(torch.tensor(features, dtype=torch.float64))
    np.testing.assert_allclose(mu, features.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(features.T), rtol=1e-12)
    with pytest.raises(ValueError, match='N >= 2'):
        feature_statistics(features[:1])
    with pytest.raises(ValueError, match='sigma2 has shape \\(3, 3\\), expected \\(4, 4\\)'):
        frechet_distance(mu, sigma, mu, np.eye(3))


# ----------------------------------------------------------------------- classifier
@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp('classifiers'))


@pytest.fixture(scope='module')
def trained(cache_dir):
    return train_classifier(DATASET, seed=0, cache_dir=cache_dir, **TRAIN)


def _no_training(*args, **kwargs):
    raise AssertionError('the classifier was retrained instead of loaded from the cache')


def test_classifier_accuracy_and_any_size(trained):
    assert trained.accuracy >= 90
    assert trained.classes == list(ToyShapes.CLASSES)
    assert trained.model(torch.zeros(2, 3, 20, 28)).shape == (2, 3)
    assert trained.model.features(torch.zeros(1, 3, 12, 40)).shape == (1, 64)


def test_classifier_cache_is_reused(trained, cache_dir, monkeypatch):
    assert os.listdir(cache_dir) == [os.path.basename(trained.path)]  # no temporary left
    assert trained.path.endswith('.safetensors')
    monkeypatch.setattr(classifier_module, '_fit', _no_training)
    again = train_classifier(DATASET, seed=0, cache_dir=cache_dir, **TRAIN)
    assert again.accuracy == trained.accuracy and again.classes == trained.classes
    reference = trained.model.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in again.model.state_dict().items())
    # Anything that changes the weights changes the cache file: these would retrain.
    for changed in (dict(seed=1), dict(epochs=3), dict(noise_std=0.1),
                    dict(dataset_cfg=dict(DATASET, seed=5))):
        kwargs = dict(dict(dataset_cfg=DATASET, seed=0, cache_dir=cache_dir, **TRAIN), **changed)
        with pytest.raises(AssertionError, match='retrained'):
            train_classifier(**kwargs)


def test_classifier_training_is_deterministic(trained, tmp_path):
    again = train_classifier(DATASET, seed=0, cache_dir=str(tmp_path), **TRAIN)
    assert os.path.basename(again.path) == os.path.basename(trained.path)
    reference = trained.model.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in again.model.state_dict().items())


def test_noise_augmented_classifier_judges_noisy_shapes(trained, tmp_path):
    """Generated images keep faint grain: a judge trained with noise still reads the shape."""
    robust = train_classifier(DATASET, seed=0, cache_dir=str(tmp_path), noise_std=0.3, **TRAIN)
    assert robust.accuracy >= 90  # on clean held-out images
    fresh = ToyShapes(num_images=300, seed=321)
    g = torch.Generator().manual_seed(0)
    noisy = [(fresh[i]['inputs'] + 0.25 * torch.randn(3, *fresh.sizes[i], generator=g))
             .clamp(-1, 1) for i in range(300)]
    labels = torch.tensor([fresh[i]['data_samples']['label'] for i in range(300)])
    accuracy = {name: (classify(judge.model, noisy)[0].argmax(1) == labels).double().mean()
                for name, judge in (('clean', trained), ('robust', robust))}
    assert accuracy['robust'] >= 0.85 and accuracy['robust'] > accuracy['clean'] + 0.1, accuracy
    with pytest.raises(ValueError, match='noise_std must be >= 0, got -0.1'):
        train_classifier(DATASET, cache_dir=str(tmp_path), noise_std=-0.1)


# ----------------------------------------------------------------------- metric
def _evaluate(metric, images, labels, batch=50):
    for start in range(0, len(images), batch):
        metric.process(None, [dict(image=(x + 1) / 2, label=y)
                              for x, y in zip(images[start:start + batch],
                                              labels[start:start + batch])])
    return metric.evaluate(len(images))


def test_generated_class_accuracy(trained, cache_dir, monkeypatch):
    monkeypatch.setattr(classifier_module, '_fit', _no_training)  # the fixture's weights
    metric = METRICS.build(dict(type='GeneratedClassAccuracy', classifier_dataset=DATASET,
                                cache_dir=cache_dir, train_cfg=TRAIN, num_real=300))
    assert isinstance(metric, GeneratedClassAccuracy)
    fresh = ToyShapes(num_images=300, seed=123)  # real images the classifier never saw
    images = [fresh[i]['inputs'] for i in range(len(fresh))]
    labels = [fresh[i]['data_samples']['label'] for i in range(len(fresh))]

    perfect = _evaluate(metric, images, labels)
    sizes = sorted({f'{x.shape[1]}x{x.shape[2]}' for x in images})
    assert sizes == ['16x16', '16x24']
    assert set(perfect) == {'gen/accuracy', 'gen/frechet_distance', 'gen/classifier_accuracy'} \
        | {f'gen/{name}/{size}' for name in ('accuracy', 'frechet_distance') for size in sizes}
    # Per size: the accuracy of that size's images scored alone (a one-size set has no
    # per-size keys), and the Frechet distance of their features to those of the real
    # images of that size among the 300 the metric draws (seeded permutation).
    toy = ToyShapes(num_images=600)
    drawn = torch.randperm(600, generator=torch.Generator().manual_seed(0))[:300].tolist()
    for size in sizes:
        mine = [i for i, x in enumerate(images) if f'{x.shape[1]}x{x.shape[2]}' == size]
        alone = _evaluate(metric, [images[i] for i in mine], [labels[i] for i in mine])
        assert set(alone) == {'gen/accuracy', 'gen/frechet_distance', 'gen/classifier_accuracy'}
        assert alone['gen/accuracy'] == perfect[f'gen/accuracy/{size}']
        real = [toy[i]['inputs'] for i in drawn
                if f'{toy.sizes[i][0]}x{toy.sizes[i][1]}' == size]
        assert 100 < len(real) < 200
        _, real_features = classify(trained.model, real)
        _, features = classify(trained.model, [images[i] for i in mine])
        expected = frechet_distance(*feature_statistics(features),
                                    *feature_statistics(real_features))
        assert perfect[f'gen/frechet_distance/{size}'] == pytest.approx(expected, rel=1e-6)
        assert abs(perfect[f'gen/frechet_distance/{size}']
                   - alone['gen/frechet_distance']) > 1e-3 * expected  # not the pooled one
    # A size the real data does not have (an extrapolation): all the drawn real images.
    pooled, unseen = metric.real_statistics(), metric.real_statistics((32, 32))
    assert all(np.array_equal(a, b) for a, b in zip(pooled, unseen))
    assert perfect['gen/classifier_accuracy'] == trained.accuracy
    assert abs(perfect['gen/accuracy'] - trained.accuracy) <= 5

    wrong = _evaluate(metric, images, [(y + 1) % 3 for y in labels])
    assert wrong['gen/accuracy'] <= 10
    assert wrong['gen/frechet_distance'] == pytest.approx(perfect['gen/frechet_distance'])

    g = torch.Generator().manual_seed(0)
    noise = _evaluate(metric, [torch.rand(x.shape, generator=g) * 2 - 1 for x in images], labels)
    assert noise['gen/frechet_distance'] > 20 * perfect['gen/frechet_distance']

    with pytest.raises(ValueError, match='"label"\\] = 3 is not a class index in \\[0, 3\\)'):
        metric.process(None, [dict(image=torch.zeros(3, 16, 16), label=3)])
    with pytest.raises(ValueError, match='must be a Tensor\\[3, H, W\\]'):
        metric.process(None, [dict(image=torch.zeros(16, 16), label=0)])


def test_classifier_init_is_seeded():
    a, b = SmallConvClassifier(3), SmallConvClassifier(3)
    a.reset_parameters(torch.Generator().manual_seed(4))
    b.reset_parameters(torch.Generator().manual_seed(4))
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_classifier_trains_inside_no_grad(tmp_path):
    """The metric trains its judge lazily, inside mmengine's no-grad evaluation loop."""
    from flexgen.evaluation.classifier import SmallConvClassifier, _fit
    model = SmallConvClassifier(2)
    before = [p.clone() for p in model.parameters()]
    images = [torch.randn(3, 8, 8) for _ in range(4)]
    with torch.no_grad():
        _fit(model, images, torch.tensor([0, 1, 0, 1]), epochs=1, batch_size=4, lr=1e-2,
             weight_decay=0.0, generator=torch.Generator().manual_seed(0))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_sample_writer_names_by_index_and_packs_npz(tmp_path):
    from PIL import Image

    from flexgen.evaluation import SampleWriter
    g = torch.Generator().manual_seed(0)
    samples = [dict(image=torch.rand(3, 4, 6, generator=g), label=i % 3, index=10 - i)
               for i in range(5)]
    writer = SampleWriter(out_dir=str(tmp_path))
    writer.process(None, samples[3:])   # batches in any order
    writer.process(None, samples[:3])
    assert writer.compute_metrics(writer.results) == dict(count=5)
    packed = np.load(tmp_path / 'samples.npz')['arr_0']
    assert packed.shape == (5, 4, 6, 3) and packed.dtype == np.uint8
    by_index = sorted(samples, key=lambda s: s['index'])
    for image, sample in zip(packed, by_index):
        expected = (sample['image'] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        assert np.array_equal(image, expected)
        name = f"{sample['index']:06d}_{sample['label']}.png"
        assert np.array_equal(np.asarray(Image.open(tmp_path / name)), expected)

"""A small CNN classifier of the generator's own training data, trained once and cached.

It is the judge of the demo's quality figure (``GeneratedClassAccuracy``): does a generated
image show the class it was asked for, and do its features look like those of real images?
The network takes images of any size (global average pooling) and is trained on the CPU
in seconds; its weights are cached as safetensors under a hash of everything that
determines them, so the next evaluation reloads instead of retraining.
"""
import hashlib
import json
import math
import os
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from mmengine.dist import is_main_process
from mmengine.logging import print_log
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import Tensor, nn
from tqdm import tqdm

from flexgen.fileio import atomic_write

from .utils import user_cache_dir

# Bump when the network or the training recipe changes: old cache files then stop matching.
CACHE_VERSION = 1


class SmallConvClassifier(nn.Module):
    """Conv-BN-ReLU stages (the first keeps the resolution, each next one halves it), global
    average pooling, then a linear head; the pooled vector is the feature (``features``).

    Args:
        num_classes: number of classes.
        widths: channels of the stages.
        in_channels: image channels.
    """

    def __init__(self, num_classes: int, widths: Sequence[int] = (16, 32, 64),
                 in_channels: int = 3):
        super().__init__()
        layers, channels = [], in_channels
        for i, width in enumerate(widths):
            layers += [nn.Conv2d(channels, width, 3, stride=1 if i == 0 else 2, padding=1,
                                 bias=False),
                       nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            channels = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(channels, num_classes)
        self.num_classes, self.feature_dim = num_classes, channels

    def reset_parameters(self, generator: torch.Generator) -> None:
        """He initialisation from ``generator`` (never the global RNG)."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity='relu', generator=generator)
            elif isinstance(module, nn.BatchNorm2d):
                module.reset_parameters()
        nn.init.normal_(self.head.weight, std=0.01, generator=generator)
        nn.init.zeros_(self.head.bias)

    def features(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` in [-1, 1] -> pooled features ``[B, feature_dim]``."""
        return self.body(images).mean((2, 3))

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))


@dataclass
class TrainedClassifier:
    """A classifier, its accuracy (percent) on held-out real images and where it is cached."""
    model: SmallConvClassifier
    accuracy: float
    classes: List[str]
    path: str
    config: dict = field(default_factory=dict)


def size_batches(images: Sequence[Tensor], batch_size: int,
                 generator: Optional[torch.Generator] = None) -> List[List[int]]:
    """Indices of ``images`` cut into batches of one size each; shuffled (batches and their
    contents) when a generator is given, in order otherwise."""
    groups = defaultdict(list)
    for i, image in enumerate(images):
        groups[tuple(image.shape)].append(i)
    batches = []
    for indices in groups.values():
        if generator is not None:
            indices = [indices[j] for j in torch.randperm(len(indices), generator=generator)]
        batches += [indices[k:k + batch_size] for k in range(0, len(indices), batch_size)]
    if generator is not None:
        batches = [batches[j] for j in torch.randperm(len(batches), generator=generator)]
    return batches


@torch.no_grad()
def classify(model: SmallConvClassifier, images: Sequence[Tensor],
             batch_size: int = 256) -> Tuple[Tensor, Tensor]:
    """Logits ``[N, K]`` and features ``[N, D]`` of images ``[3, H, W]`` in [-1, 1]."""
    model.eval()
    device = next(model.parameters()).device
    logits = torch.empty(len(images), model.num_classes)
    features = torch.empty(len(images), model.feature_dim)
    for batch in size_batches(images, batch_size):
        x = torch.stack([images[i] for i in batch]).to(device, torch.float32)
        feats = model.features(x)
        features[batch], logits[batch] = feats.cpu(), model.head(feats).cpu()
    return logits, features


def load_items(dataset, indices: Sequence[int]) -> Tuple[List[Tensor], Tensor]:
    """Images (``inputs``, [-1, 1]) and labels of ``dataset[i]`` for ``i`` in ``indices``."""
    images, labels = [], []
    for i in indices:
        item = dataset[int(i)]
        try:
            images.append(item['inputs'])
            labels.append(int(item['data_samples']['label']))
        except (KeyError, TypeError) as error:
            raise ValueError(f'{type(dataset).__name__}[{int(i)}] must be dict(inputs=Tensor, '
                             f'data_samples=dict(label=int, ...)); got {error!r}') from error
    return images, torch.tensor(labels, dtype=torch.long)


@torch.enable_grad()  # the metric first trains inside mmengine's no-grad val/test loops
def _fit(model: SmallConvClassifier, images: List[Tensor], labels: Tensor, epochs: int,
         batch_size: int, lr: float, weight_decay: float, generator: torch.Generator,
         noise_std: float = 0.0) -> None:
    """Train with AdamW and a cosine learning rate, one image size per batch; each image
    gets Gaussian noise of a standard deviation uniform in ``[0, noise_std]``."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    plan = [size_batches(images, batch_size, generator) for _ in range(epochs)]
    total, step = sum(len(batches) for batches in plan), 0
    bar = tqdm(total=total, desc='training the judge classifier', unit='step',
               file=sys.stderr, dynamic_ncols=True, disable=not is_main_process())
    for batches in plan:
        for batch in batches:
            for group in optimizer.param_groups:
                group['lr'] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            x = torch.stack([images[i] for i in batch]).float()
            if noise_std > 0:
                std = noise_std * torch.rand(len(batch), 1, 1, 1, generator=generator)
                x = x + std * torch.randn(x.shape, generator=generator)
            loss = F.cross_entropy(model(x), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            bar.update(1)
    bar.close()
    model.eval()


def _cache_key(config: dict) -> str:
    text = json.dumps(config, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def train_classifier(dataset_cfg: dict, classifier_cfg: Optional[dict] = None, epochs: int = 10,
                     batch_size: int = 64, lr: float = 3e-3, weight_decay: float = 1e-4,
                     holdout_fraction: float = 0.2, max_train_images: Optional[int] = None,
                     noise_std: float = 0.0, seed: int = 0,
                     cache_dir: Optional[str] = None) -> TrainedClassifier:
    """Train (or reload) a ``SmallConvClassifier`` on the dataset built from ``dataset_cfg``.

    A seeded random ``holdout_fraction`` of the dataset is held out (never trained on) and
    measures the classifier's accuracy. The weights are cached in
    ``cache_dir/<hash of (dataset cfg, classifier cfg, training settings, seed)>.safetensors``
    with the accuracy and class names in its metadata; a later call with the same settings
    loads that file and does not build the dataset at all. The dataset is known by its
    config only: if the code behind a dataset type changes, delete the cache.

    Args:
        dataset_cfg: e.g. ``dict(type='ProceduralShapes', ...)`` (``flexgen.registry.DATASETS``).
        classifier_cfg: keyword arguments of ``SmallConvClassifier`` except ``num_classes``.
        epochs, batch_size, lr, weight_decay: AdamW with a cosine learning rate.
        holdout_fraction: the held-out share of the dataset.
        max_train_images: train on at most this many of the other images.
        noise_std: train on images with Gaussian noise of a standard deviation uniform in
            ``[0, noise_std]`` (in [-1, 1] units). Without it the judge is brittle: trained on
            clean images only, it calls 85% of real shapes with noise of std 0.1 'ring',
            so a generated image with faint residual grain would be judged by its grain,
            not its shape.
        seed: drives the split, the initialisation and the batch order.
        cache_dir: where the weights are cached; default ``user_cache_dir('classifiers')``
            (``$FLEXGEN_CACHE_DIR``, else ``~/.cache/flexgen``): the same judge for a run
            from any folder.
    """
    if not 0 < holdout_fraction < 1:
        raise ValueError(f'train_classifier: holdout_fraction must be in (0, 1), '
                         f'got {holdout_fraction}')
    if noise_std < 0:
        raise ValueError(f'train_classifier: noise_std must be >= 0, got {noise_std}')
    classifier_cfg = dict(classifier_cfg or {})
    config = dict(version=CACHE_VERSION, dataset=dataset_cfg, classifier=classifier_cfg,
                  training=dict(epochs=epochs, batch_size=batch_size, lr=lr,
                                weight_decay=weight_decay, holdout_fraction=holdout_fraction,
                                max_train_images=max_train_images, noise_std=noise_std),
                  seed=seed)
    path = os.path.join(cache_dir or user_cache_dir('classifiers'),
                        f'{_cache_key(config)}.safetensors')

    if os.path.isfile(path):
        with safe_open(path, framework='pt') as f:
            metadata = f.metadata() or {}
        classes = json.loads(metadata['classes'])
        model = SmallConvClassifier(len(classes), **classifier_cfg)
        model.load_state_dict(load_file(path))
        model.eval()
        accuracy = float(metadata['accuracy'])
        print_log(f'Classifier loaded from {path} (held-out accuracy {accuracy:.2f}%)',
                  logger='current')
        return TrainedClassifier(model, accuracy, classes, path, config)

    from flexgen.registry import DATASETS
    dataset = DATASETS.build(dict(dataset_cfg))
    classes = [str(c) for c in dataset.metainfo['classes']]
    n = len(dataset)
    num_holdout = max(1, round(n * holdout_fraction))
    if n - num_holdout < 1:
        raise ValueError(f'train_classifier: {type(dataset).__name__} has {n} images, too few '
                         f'to hold out {holdout_fraction:.0%} and train on the rest')
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator).tolist()
    holdout, train = order[:num_holdout], order[num_holdout:][:max_train_images]

    train_images, train_labels = load_items(dataset, train)
    model = SmallConvClassifier(len(classes), **classifier_cfg)
    model.reset_parameters(generator)
    _fit(model, train_images, train_labels, epochs, batch_size, lr, weight_decay, generator,
         noise_std)

    holdout_images, holdout_labels = load_items(dataset, holdout)
    logits, _ = classify(model, holdout_images)
    accuracy = 100.0 * (logits.argmax(1) == holdout_labels).double().mean().item()
    # Atomic: a reader (another rank, a crashed run) never sees a half-written file.
    atomic_write(save({k: v.contiguous() for k, v in model.state_dict().items()}, dict(
        accuracy=repr(accuracy), classes=json.dumps(classes),
        config=json.dumps(config, sort_keys=True, default=repr))), path)
    print_log(f'Classifier trained on {len(train)} images of {type(dataset).__name__}: '
              f'held-out accuracy {accuracy:.2f}% on {len(holdout)} real images; '
              f'cached in {path}', logger='current')
    return TrainedClassifier(model, accuracy, classes, path, config)

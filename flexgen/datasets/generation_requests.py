"""What a generator is asked to generate at validation and test time."""
from typing import Optional, Sequence, Tuple

from flexgen.registry import DATASETS
from flexgen.rng import mix

from .base_dataset import IndexedDataset
from .base_sampler import positive_int
from .shapes import _check_sizes


@DATASETS.register_module()
class GenerationRequests(IndexedDataset):
    """The val / test "dataset" of a generator: ``N`` class-balanced requests per size.

    Not a :class:`~flexgen.datasets.FlexDataset` (its items hold no image to train on), it
    shares that contract's ``metainfo`` (``classes``) and index checks.

    Item ``i`` is ``dict(inputs=None, data_samples=dict(label, size=(H, W), seed, index=i))``
    in the order size, then request: ``i = size_id * N + k`` asks for label ``k mod C``
    (``C`` classes). The classes take turns, so every class gets ``N // C`` or
    ``N // C + 1`` images of each size and any run of consecutive requests is balanced too:
    ADM's Inception Score, computed over consecutive splits of 5,000 images of an .npz in
    request order, sees every class in every split (as with DiT's random labels). ``seed``
    is ``flexgen.rng.mix(seed, i)`` (62 bits), so a request's image depends only on the
    request, never on the batch it lands in or the process count.

    Args:
        sizes: (H, W) pixel sizes to generate.
        num_classes: labels ``0 .. num_classes - 1``, named by their numbers; or
        classes: class names (labels are their positions), e.g. the training dataset's
            ``metainfo['classes']``. Give one of the two.
        num_per_class: images per (class, size): ``N = C * num_per_class``; or
        num_samples: ``N``, images per size (e.g. 50,000 for FID-50K), any positive
            number. Give at most one of the two (default: one per class).
        seed: selects the whole set of per-request seeds.
    """

    def __init__(self, sizes: Sequence[Tuple[int, int]], num_classes: Optional[int] = None,
                 classes: Optional[Sequence[str]] = None, num_per_class: Optional[int] = None,
                 num_samples: Optional[int] = None, seed: int = 0):
        name = 'GenerationRequests'
        if (num_classes is None) == (classes is None):
            raise ValueError('GenerationRequests: give exactly one of num_classes and classes, '
                             f'got num_classes={num_classes!r}, classes={classes!r}')
        if classes is None:
            classes = [str(c) for c in range(positive_int(name, 'num_classes', num_classes))]
        if len(classes) == 0:
            raise ValueError('GenerationRequests: classes is empty')
        if num_per_class is not None and num_samples is not None:
            raise ValueError('GenerationRequests: give num_per_class or num_samples, not both '
                             f'(got {num_per_class!r} and {num_samples!r})')
        num_per_class = positive_int(name, 'num_per_class', num_per_class, allow_none=True)
        num_samples = positive_int(name, 'num_samples', num_samples, allow_none=True)
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f'GenerationRequests: seed must be a non-negative int, got {seed!r}')
        self.sizes = _check_sizes('GenerationRequests', sizes)
        self.classes = tuple(classes)
        if num_samples is None:
            num_samples = len(self.classes) * (1 if num_per_class is None else num_per_class)
        self.num_samples, self.seed = num_samples, seed

    def __len__(self) -> int:
        return len(self.sizes) * self.num_samples

    def get_size(self, index: int) -> Tuple[int, int]:
        return self.sizes[self.check_index(index) // self.num_samples]

    def get_label(self, index: int) -> int:
        return self.check_index(index) % self.num_samples % len(self.classes)

    def request_seed(self, index: int) -> int:
        """The 62-bit seed of request ``index`` (a pure function of ``(seed, index)``)."""
        return int(mix(self.seed, self.check_index(index)))

    def __getitem__(self, index: int) -> dict:
        index = self.check_index(index)
        return dict(inputs=None,
                    data_samples=dict(label=self.get_label(index), size=self.get_size(index),
                                      seed=self.request_seed(index), index=index))

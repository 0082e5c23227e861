"""What a generator is asked to generate at validation and test time."""
from typing import Optional, Sequence, Tuple

from torch.utils.data import Dataset

from flexgen.registry import DATASETS
from flexgen.rng import mix

from .shapes import _check_sizes


@DATASETS.register_module()
class GenerationRequests(Dataset):
    """The val / test "dataset" of a generator: one request per (size, class, repeat).

    Item ``i`` is ``dict(inputs=None, data_samples=dict(label, size=(H, W), seed, index=i))``
    in the order size, then class, then repeat (``i = (size_id * C + label) * R + repeat``).
    ``seed`` is ``flexgen.rng.mix(seed, i)`` (62 bits), so a request's image
    depends only on the request, never on the batch it lands in or the process count.

    Args:
        sizes: (H, W) pixel sizes to generate.
        num_classes: labels ``0 .. num_classes - 1``, named by their numbers; or
        classes: class names (labels are their positions), e.g. the training dataset's
            ``metainfo['classes']``. Give one of the two.
        num_per_class: images per (class, size).
        seed: selects the whole set of per-request seeds.
    """

    def __init__(self, sizes: Sequence[Tuple[int, int]], num_classes: Optional[int] = None,
                 classes: Optional[Sequence[str]] = None, num_per_class: int = 1,
                 seed: int = 0):
        if (num_classes is None) == (classes is None):
            raise ValueError('GenerationRequests: give exactly one of num_classes and classes, '
                             f'got num_classes={num_classes!r}, classes={classes!r}')
        if classes is None:
            if not isinstance(num_classes, int) or num_classes < 1:
                raise ValueError(f'GenerationRequests: num_classes must be a positive int, '
                                 f'got {num_classes!r}')
            classes = [str(c) for c in range(num_classes)]
        if len(classes) == 0:
            raise ValueError('GenerationRequests: classes is empty')
        if not isinstance(num_per_class, int) or num_per_class < 1:
            raise ValueError(f'GenerationRequests: num_per_class must be a positive int, '
                             f'got {num_per_class!r}')
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f'GenerationRequests: seed must be a non-negative int, got {seed!r}')
        self.sizes = _check_sizes('GenerationRequests', sizes)
        self.classes = tuple(classes)
        self.num_per_class, self.seed = num_per_class, seed

    @property
    def metainfo(self) -> dict:
        return dict(classes=self.classes)

    def __len__(self) -> int:
        return len(self.sizes) * len(self.classes) * self.num_per_class

    def _check(self, index) -> int:
        if not 0 <= index < len(self):
            raise IndexError(f'GenerationRequests: index {index} is out of range for '
                             f'{len(self)} requests')
        return int(index)

    def get_size(self, index: int) -> Tuple[int, int]:
        return self.sizes[self._check(index) // (len(self.classes) * self.num_per_class)]

    def get_label(self, index: int) -> int:
        return self._check(index) // self.num_per_class % len(self.classes)

    def request_seed(self, index: int) -> int:
        """The 62-bit seed of request ``index`` (a pure function of ``(seed, index)``)."""
        return int(mix(self.seed, self._check(index)))

    def __getitem__(self, index: int) -> dict:
        index = self._check(index)
        return dict(inputs=None,
                    data_samples=dict(label=self.get_label(index), size=self.get_size(index),
                                      seed=self.request_seed(index), index=index))

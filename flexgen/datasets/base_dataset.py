"""What a flexgen dataset provides: the contract between a dataset, the data samplers, the
collate and the generator."""
from abc import ABCMeta, abstractmethod
from typing import Tuple

from torch.utils.data import Dataset


class IndexedDataset(Dataset):
    """What every flexgen dataset shares, training data or generation requests: the
    attributes named in :attr:`METAINFO_KEYS` (by default ``classes``, the class names in
    label order) as :attr:`metainfo`, which the runner stores with every checkpoint, and
    :meth:`check_index` for every index a method takes."""

    METAINFO_KEYS: Tuple[str, ...] = ('classes',)

    @property
    def metainfo(self) -> dict:
        """The attributes named by :attr:`METAINFO_KEYS`."""
        return {key: getattr(self, key) for key in self.METAINFO_KEYS}

    def check_index(self, index) -> int:
        """``index`` as an int, or an IndexError naming the dataset and its length."""
        length = len(self)
        if not 0 <= index < length:
            raise IndexError(f'{type(self).__name__}: index {index} is out of range for a '
                             f'dataset of length {length}')
        return int(index)


class FlexDataset(IndexedDataset, metaclass=ABCMeta):
    """Base class of flexgen's training datasets (one image and its class per index).

    A subclass implements:

    - ``__len__()``: the number of items;
    - ``get_size(i) -> (H, W)``: the size of item ``i``'s ``inputs``, WITHOUT decoding it.
      The size-aware data samplers call it for every index when they are built, so it must
      be cheap: computed, read from an index file or a file header, and cached;
    - ``get_label(i) -> int``: the class of item ``i``, without reading its tensor;
    - ``__getitem__(i) -> dict(inputs=Tensor[C, H, W], data_samples=dict(label=int,
      index=int, ...))``: the image (pixels or latent) and its class. ``index`` is ``i``
      itself: the generator keys every random draw of an image (noise, time, label drop)
      on ``(seed, step, index)``. Other fields ride along; :func:`~flexgen.datasets.jagged_collate`
      batches them by type. The optional field ``image``, the clean image for REPA
      (a uint8 array ``[H, W, 3]`` or a float tensor ``[3, H, W]`` in [-1, 1], any size),
      is grouped per size into :class:`~flexgen.structures.ImageGroups`;

    and names in :attr:`METAINFO_KEYS` the attributes that describe it (by default
    ``classes``, the class names in label order): :attr:`metainfo` returns them, and the
    runner stores them with every checkpoint. Index checks go through
    :meth:`check_index`. A subclass may add ``__getitems__(indices)`` to load a whole
    batch at once (torch's DataLoader calls it when it exists).

    Example::

        @DATASETS.register_module()
        class Squares(FlexDataset):
            def __init__(self, side=16, num_samples=100):
                self.side, self.num_samples, self.classes = side, num_samples, ('square',)

            def __len__(self):
                return self.num_samples

            def get_size(self, index):
                self.check_index(index)
                return self.side, self.side

            def get_label(self, index):
                self.check_index(index)
                return 0

            def __getitem__(self, index):
                index = self.check_index(index)
                return dict(inputs=torch.zeros(3, self.side, self.side),
                            data_samples=dict(label=0, index=index))
    """

    @abstractmethod
    def __len__(self) -> int:
        """The number of items."""

    @abstractmethod
    def get_size(self, index: int) -> Tuple[int, int]:
        """``(H, W)`` of item ``index``'s ``inputs``, without decoding it."""

    @abstractmethod
    def get_label(self, index: int) -> int:
        """The class of item ``index``, without reading its tensor."""

    @abstractmethod
    def __getitem__(self, index: int) -> dict:
        """``dict(inputs=Tensor[C, H, W], data_samples=dict(label=int, index=int, ...))``."""

"""Class-conditional images from an ImageNet-style folder tree, at a fixed or native size."""
import math
import os
import os.path as osp
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from flexgen.registry import DATASETS
from flexgen.rng import stream_id, uniforms

from .base_dataset import FlexDataset


IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp', '.bmp')
_FLIP_STREAM = stream_id('flip')


def center_crop_arr(image: Image.Image, resolution: int) -> Image.Image:
    """ADM's square centre crop (Dhariwal & Nichol 2021; used by DiT / SiT / REPA):
    halve with a BOX filter while the short side is >= 2 * resolution (cheap, alias-free),
    BICUBIC-resize so the short side is ``resolution``, crop the centre
    ``resolution x resolution`` (offsets floored)."""
    while min(image.size) >= 2 * resolution:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = resolution / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    left = (image.size[0] - resolution) // 2
    top = (image.size[1] - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def capped_size(width: int, height: int, max_pixels: Optional[int]) -> Tuple[int, int]:
    """(W, H) scaled down, aspect ratio kept, so that ``W * H <= max_pixels`` (each side
    floored, at least 1); unchanged when already within the cap or without one."""
    if max_pixels is None or width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    # The epsilon keeps exact products (e.g. a scale of exactly 1/2) from flooring below.
    w, h = max(1, math.floor(width * scale + 1e-6)), max(1, math.floor(height * scale + 1e-6))
    while w * h > max_pixels:  # the epsilon's rare overshoot: trim the longer side
        if w >= h:
            w -= 1
        else:
            h -= 1
    return w, h


@DATASETS.register_module()
class ImageFolder(FlexDataset):
    """Images in ``data_root/<class_name>/<files>`` (the ImageNet layout), labelled by class.

    Classes are the sorted names of ``data_root``'s sub-folders, or ``classes`` (labels are
    positions in that list). Each class folder is searched recursively for files ending in
    .jpg, .jpeg, .png, .webp or .bmp (any case), following symbolic links and leaving out
    hidden files and folders; items are ordered by label, then folder, then file name. The
    rule is :func:`list_class_images`, which ``tools/encode_latents.py`` follows too.

    Sizes:

    - ``resolution=int``: ADM / DiT's square centre crop (:func:`center_crop_arr`).
    - ``resolution=None``: native size. With ``max_pixels`` an image of more pixels is
      downscaled (BICUBIC, aspect kept, :func:`capped_size`); then the centre is cropped to
      the largest multiple of ``multiple_of`` on each side (e.g. 16 = VAE factor x patch).

    ``hflip=True`` mirrors item ``i`` iff a hash of ``(seed, i)`` is below 1/2 (the same
    every epoch, half of the items): reproducible with no RNG state.

    ``get_size(i)`` (what the batch samplers call for every index when they are built) never
    decodes pixels: at a fixed resolution it reads no file at all; at native size it opens the
    file's header with PIL (``Image.open(path).size``; a few KB read, tens of microseconds from
    page cache, one disk seek otherwise: minutes for ImageNet's 1.28M files on a cold network
    file system) and caches the result for the dataset's lifetime.

    Args:
        data_root: the folder holding one sub-folder per class.
        resolution: side of the square crop, or None for native sizes.
        classes: class folder names to use, in label order; default all, sorted.
        max_pixels: native sizes only: the largest H * W kept before cropping.
        multiple_of: native sizes only: both sides are cropped down to a multiple of it.
        hflip: mirror half of the items (chosen by hash of ``(seed, index)``).
        seed: selects which items are mirrored.

    Items: ``dict(inputs=Tensor[3, H, W] float32 in [-1, 1],
    data_samples=dict(label=int, index=int))``, as :class:`ProceduralShapes`.

    Raises:
        FileNotFoundError: ``data_root`` does not exist, or a named class has no folder.
        ValueError: no class folder, or no image in them.
        OSError: when an item (or its native size) is read from a file PIL cannot read;
            the message names the file.
    """

    def __init__(self, data_root: str, resolution: Optional[int] = None,
                 classes: Optional[Sequence[str]] = None, max_pixels: Optional[int] = None,
                 multiple_of: int = 1, hflip: bool = False, seed: int = 0):
        if not osp.isdir(data_root):
            raise FileNotFoundError(f'ImageFolder: data_root {data_root!r} does not exist or is '
                                    'not a folder (check the dataset config field data_root)')
        if resolution is not None and (not isinstance(resolution, int) or resolution < 1):
            raise ValueError(f'ImageFolder: resolution must be a positive int or None, '
                             f'got {resolution!r}')
        if max_pixels is not None and (not isinstance(max_pixels, int) or max_pixels < 1):
            raise ValueError(f'ImageFolder: max_pixels must be a positive int or None, '
                             f'got {max_pixels!r}')
        if not isinstance(multiple_of, int) or multiple_of < 1:
            raise ValueError(f'ImageFolder: multiple_of must be a positive int, '
                             f'got {multiple_of!r}')
        if resolution is not None and (max_pixels is not None or multiple_of != 1):
            raise ValueError('ImageFolder: max_pixels and multiple_of apply to native sizes '
                             f'(resolution=None), got resolution={resolution}')
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f'ImageFolder: seed must be a non-negative int, got {seed!r}')
        self.data_root, self.resolution = data_root, resolution
        self.max_pixels, self.multiple_of = max_pixels, multiple_of
        self.hflip, self.seed = bool(hflip), seed
        self.classes, self.samples = list_class_images(data_root, classes, 'ImageFolder')
        self._native_sizes = {}  # index -> (H, W) of the file, read from its header

    def __len__(self) -> int:
        return len(self.samples)

    def get_label(self, index: int) -> int:
        return self.samples[self.check_index(index)][1]

    def get_size(self, index: int) -> Tuple[int, int]:
        """(H, W) of item ``index`` without decoding it (see the class docstring for cost)."""
        index = self.check_index(index)
        if self.resolution is not None:
            return self.resolution, self.resolution
        if index not in self._native_sizes:
            path = self.samples[index][0]
            try:
                with Image.open(path) as image:  # lazy: parses the header only
                    width, height = image.size
            except OSError as err:
                raise OSError(f'ImageFolder: cannot read image {path!r}: {err}') from err
            self._native_sizes[index] = self._target_size(path, width, height)
        return self._native_sizes[index]

    def _target_size(self, path: str, width: int, height: int) -> Tuple[int, int]:
        """The item's (H, W) at native size: capped, then floored to ``multiple_of``."""
        w, h = capped_size(width, height, self.max_pixels)
        m = self.multiple_of
        if w < m or h < m:
            raise ValueError(f'ImageFolder: image {path!r} is {w}x{h} (W x H, after the '
                             f'max_pixels cap), smaller than multiple_of={m}')
        return h - h % m, w - w % m

    def load(self, index: int) -> Image.Image:
        """Item ``index`` as a resized, cropped (and maybe mirrored) RGB PIL image."""
        index = self.check_index(index)
        path = self.samples[index][0]
        try:
            with Image.open(path) as image:
                image = image.convert('RGB')  # decodes here: corrupt data fails here
        except OSError as err:
            raise OSError(f'ImageFolder: cannot read image {path!r}: {err}') from err
        if self.resolution is not None:
            image = center_crop_arr(image, self.resolution)
        else:
            h, w = self._target_size(path, image.width, image.height)
            self._native_sizes[index] = (h, w)
            size = capped_size(image.width, image.height, self.max_pixels)
            if size != image.size:
                image = image.resize(size, resample=Image.BICUBIC)
            left, top = (image.width - w) // 2, (image.height - h) // 2
            image = image.crop((left, top, left + w, top + h))
        if self.flipped(index):
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return image

    def flipped(self, index: int) -> bool:
        """Whether item ``index`` is mirrored."""
        return self.hflip and bool(uniforms(self.seed, index, _FLIP_STREAM) < 0.5)

    def __getitem__(self, index: int) -> dict:
        image = self.load(index)
        array = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
        inputs = array.permute(2, 0, 1).float() / 127.5 - 1
        return dict(inputs=inputs, data_samples=dict(label=self.get_label(index),
                                                     index=int(index)))


def list_class_images(root: str, classes: Optional[Sequence[str]] = None,
                      owner: str = 'list_class_images'
                      ) -> Tuple[Tuple[str, ...], List[Tuple[str, int]]]:
    """``(classes, [(path, label)])`` of the ImageNet-style folder ``root``
    (``root/<class_name>/<image files>``): flexgen's one rule for which files of a folder tree
    are images, read by :class:`ImageFolder` and encoded by ``tools/encode_latents.py``.

    - Classes are the sorted names of ``root``'s sub-folders, or ``classes`` (each must be
      one of them); a label is a class's position.
    - Each class folder is searched recursively, following symbolic links (to folders and
      to files); a file is an image when its name ends in one of :data:`IMG_EXTENSIONS`, in
      any case.
    - Hidden entries (a name starting with ``.``: class folders, folders inside them, files)
      are left out.
    - Images are ordered by label, then folder (sorted paths), then file name: folder by
      folder, as torchvision's ``ImageFolder`` orders them.

    ``root`` must be a folder. ``owner`` starts every error message: a ValueError for no
    class folder or no image, a FileNotFoundError for a named class without a folder.
    """
    found = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith('.'))
    if classes is None:
        if not found:
            raise ValueError(f'{owner}: {root!r} has no class sub-folders (expected '
                             f'{root}/<class_name>/<image files>)')
        classes = found
    else:
        classes = tuple(classes)
        if not classes or len(set(classes)) != len(classes):
            raise ValueError(f'{owner}: classes must be distinct folder names, got {classes!r}')
        missing = [c for c in classes if c not in found]
        if missing:
            raise FileNotFoundError(f'{owner}: classes {missing} have no folder in '
                                    f'{root!r} (found {found[:10]})')
    samples = []
    for label, name in enumerate(classes):
        folders = []
        for folder, dirnames, filenames in os.walk(osp.join(root, name), followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith('.')]
            folders.append((folder, sorted(f for f in filenames if not f.startswith('.')
                                           and f.lower().endswith(IMG_EXTENSIONS))))
        samples += [(osp.join(folder, f), label)
                    for folder, files in sorted(folders, key=lambda entry: entry[0])
                    for f in files]
    if not samples:
        raise ValueError(f'{owner}: no images ({", ".join(IMG_EXTENSIONS)}) in the class '
                         f'folders of {root!r}')
    return tuple(classes), samples

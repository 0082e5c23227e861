"""Writing pre-encoded latents (``tools/encode_latents.py``): what a format's writer
provides, and what the writers share. Each format's writer lives next to its reader
(:class:`~flexgen.datasets.fit_latents.FiTLatentWriter`,
:class:`~flexgen.datasets.nit_latents.NiTLatentWriter`)."""
import os
import os.path as osp
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import safetensors.torch
import torch
from PIL import Image

from flexgen.fileio import atomic_path

from .image_folder import list_class_images


class LatentWriter:
    """Base class of a latent format's writer. The encoding job calls, in order:

    - :meth:`bind` once, with every image ``(path, label, name)`` of :func:`list_images`;
    - :meth:`pending` per image: False skips an image whose files are all written (resume);
    - :meth:`prepare` and :meth:`info` per image, in the loader workers: the pixel views to
      encode, ``{key: Tensor[3, H, W] in [-1, 1]}``, and any facts about the image that
      :meth:`write` needs;
    - :meth:`write` per image with the encoded views ``{key: latent [C, h, w]}``; every
      file goes through :func:`save_tensors` (atomic), the one that marks the image done
      last;
    - :meth:`finish` once at the end (index files).

    :meth:`settings` are the values an output folder was written with; a rerun with other
    ones must not mix into it.

    What the writers share: the output root ``out_dir``, the autoencoder's ``downsample``
    (d), the model's ``patch_size`` (p), ``multiple`` = d * p pixels per token side, the
    stored ``dtype``; one safetensors file per image and folder at :meth:`path`
    (``out_dir/<folder>/<latent_file(name)>``), each holding an image's latent and its
    mirror's (:meth:`mirror_pair`).

    Args:
        out_dir: the dataset root to write.
        downsample: the autoencoder's pixels per latent cell (d).
        patch_size: p.
        dtype: the dtype the latents are stored in (a torch dtype name).
    """

    name = ''

    def __init__(self, out_dir: str, downsample: int, patch_size: int, dtype: str):
        self.out_dir, self.downsample, self.patch_size = out_dir, downsample, patch_size
        self.multiple = downsample * patch_size
        self.dtype = getattr(torch, dtype)

    @property
    def dtype_name(self) -> str:
        """The stored dtype's name, as :meth:`settings` record it (``'float32'``)."""
        return str(self.dtype).replace('torch.', '')

    def make_folders(self, folders: Sequence[str]) -> None:
        for folder in folders:
            os.makedirs(osp.join(self.out_dir, folder), exist_ok=True)

    def file_name(self, name: str) -> str:
        """The file (without ``.safetensors``, ``/``-separated, under a folder) of image
        ``name``, its path under the image root without extension."""
        return name

    def latent_file(self, name: str) -> str:
        """:meth:`file_name` with the extension of a latent file."""
        return self.file_name(name) + '.safetensors'

    def path(self, folder: str, name: str) -> str:
        """Where image ``name``'s file of ``folder`` goes."""
        return osp.join(self.out_dir, folder, *self.latent_file(name).split('/'))

    @staticmethod
    def mirror_pair(latents: Dict[str, torch.Tensor], key: str) -> List[torch.Tensor]:
        """The latents of view ``key`` and of its mirror (:func:`with_mirrors`)."""
        return [latents[key], latents[key + '/flipped']]

    def settings(self) -> dict:
        raise NotImplementedError

    def bind(self, items: List[Tuple[str, int, str]], image_root: str) -> None:
        """Called once with every image of the job."""

    def pending(self, name: str) -> bool:
        raise NotImplementedError

    def prepare(self, image: Image.Image) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def info(self, path: str, image: Image.Image) -> Optional[dict]:
        return None

    def write(self, name: str, label: int, latents: Dict[str, torch.Tensor],
              info: Optional[dict] = None) -> None:
        raise NotImplementedError

    def finish(self, items: List[Tuple[str, int, str]]):
        """Called once at the end of the job."""


def to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image -> ``[3, H, W]`` float32 in [-1, 1] (ToTensor, Normalize(0.5, 0.5))."""
    array = np.asarray(image.convert('RGB'), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1


def resized(image: Image.Image, size: Tuple[int, int]) -> Image.Image:
    """``image`` BICUBIC-resized to ``size`` (W, H); itself when it has that size."""
    return image if size == image.size else image.resize(size, resample=Image.BICUBIC)


def with_mirrors(views: Dict[str, Image.Image]) -> Dict[str, torch.Tensor]:
    """Each view as a tensor under its key, and its horizontal mirror under
    ``key + '/flipped'`` (both formats store the latent of the image and of its mirror)."""
    out = {}
    for key, view in views.items():
        x = to_tensor(view)
        out[key], out[key + '/flipped'] = x, x.flip(-1)
    return out


def save_tensors(tensors: Dict[str, torch.Tensor], path: str,
                 metadata: Optional[Dict[str, str]] = None) -> None:
    """A safetensors file written atomically (:func:`flexgen.fileio.atomic_path`)."""
    with atomic_path(path) as tmp:
        safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, tmp,
                                    metadata=metadata)


def list_images(root: str) -> Tuple[List[str], List[Tuple[str, int, str]]]:
    """``(classes, [(path, label, name)])`` of an ImageNet-style folder: the classes and
    images :class:`~flexgen.datasets.ImageFolder` reads, in its order
    (:func:`~flexgen.datasets.image_folder.list_class_images`: recursive, symbolic links
    followed, hidden files and folders left out). ``name`` is the image's path under
    ``root`` without its extension, ``/``-separated (it names the output files), so two
    images in one folder that differ only in extension are refused."""
    if not osp.isdir(root):
        raise FileNotFoundError(f'image root {root!r} is not a directory')
    classes, samples = list_class_images(root, owner='image root')
    items, seen = [], {}
    for path, label in samples:
        name = osp.splitext(osp.relpath(path, root))[0].replace(os.sep, '/')
        if name in seen:
            raise ValueError(f'{path!r} and {seen[name]!r} differ only in their '
                             f'extension; the output files are named by the path '
                             f'without it ({name!r}): rename one')
        seen[name] = path
        items.append((path, label, name))
    return list(classes), items

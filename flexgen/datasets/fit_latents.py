"""FiT's pre-encoded ImageNet latents (Lu et al. 2024, "FiT: Flexible Vision Transformer for
Diffusion Model"; FiTv2, arXiv 2410.13925), read as the reference ``IN1kLatentDataset`` does.

The format (the released ``imagenet1k_latents_{256,1024}_sd_vae_ft_ema`` sets and what
:class:`FiTLatentWriter`, ``tools/encode_latents.py --format fit``, writes), with ``L`` the
token budget (256 or 1024):

- ``data_root/from_16_to_{L}/``: images of 16 to L tokens, kept at their size;
- ``data_root/greater_than_{L}_resize/``: larger images resized to about L tokens (aspect kept);
- ``data_root/greater_than_{L}_crop/``: the same images centre-cropped to a square of L tokens
  (a file here is paired with the file of the same name in ``_resize``);
- ``data_root/less_than_16/``: images of fewer than 16 tokens: ignored (the reference does
  not read it either; the count is logged).

One safetensors file per image, with

- ``feature`` ``[2, h, w, C*p*p]``: the latent, already cut into ``p x p`` patches (tokens in
  ``(c, p1, p2)`` order), of the image (index 0) and of its horizontal mirror (index 1);
  SD-VAE latents times the scaling factor 0.18215, C = 4, p = 2;
- ``grid`` ``[2, h*w]``: row 0 the column (width) index, row 1 the row (height) index of each
  token, raster order;
- ``size`` ``[2]``: ``(h, w)`` in tokens; ``label``: the class id (one element).

Layout conversion: flexgen's datasets yield latents ``[C, H, W]`` and the model patchifies
them (``flexgen.structures.patchify``: row-major patches, ``(c, p1, p2)`` order). The stored
tokens are turned back into ``latent[c, i*p + p1, j*p + p2] = feature[k, i, j, c*p*p + p1*p + p2]``
(``flexgen.structures.unpatchify``), so patchify hands the model exactly the reference's token
sequence, and the token grid ``(row, col) = (i, j)`` is the one ``grid`` stores (checked).
"""
import logging
import math
import os
import os.path as osp
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from mmengine.logging import print_log
from PIL import Image
from safetensors import SafetensorError, safe_open

from flexgen.registry import DATASETS
from flexgen.rng import stream_id, uniforms
from flexgen.structures import patchify, unpatchify

from .base_dataset import FlexDataset
from .image_folder import center_crop_arr
from .latent_writer import LatentWriter, resized, save_tensors, with_mirrors


CHOICES = ('random', 'resize', 'crop')
KEYS = ('feature', 'grid', 'size', 'label')
IGNORED_FOLDER = 'less_than_16'
_CHOICE_STREAM, _FLIP_STREAM = stream_id('fit_choice'), stream_id('flip')


def fit_folders(target_len: int) -> Tuple[str, str, str]:
    """The reference's three folder names for token budget ``target_len``:
    ``(from_16_to_L, greater_than_L_resize, greater_than_L_crop)``."""
    return (f'from_16_to_{target_len}', f'greater_than_{target_len}_resize',
            f'greater_than_{target_len}_crop')


def raster_grid(h: int, w: int) -> torch.Tensor:
    """FiT's ``grid`` of an ``h x w`` token image: ``[2, h*w]``, row 0 the column index,
    row 1 the row index, tokens in raster (row-major) order."""
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing='ij')
    return torch.stack([cols.reshape(-1), rows.reshape(-1)])


class FiTFileError(ValueError):
    """A FiT latent file that cannot be read or does not follow the format."""


@DATASETS.register_module()
class FiTLatents(FlexDataset):
    """FiT / FiTv2 latents from ``data_root`` (format: see the module docstring).

    Entries, as the reference lists them (each folder's names sorted, so that index ``i`` is
    the same file on every machine; the reference keeps ``os.listdir``'s order): every file
    of ``from_16_to_L``; every ``_resize`` file without a ``_crop`` partner; every
    (``_resize``, ``_crop``) pair. Only ``*.safetensors`` files count; ``less_than_16`` and
    anything else are ignored, with a logged count.

    Which file and which copy item ``i`` reads:

    - ``choice``: ``'resize'`` (FiTv1's config: always the aspect-kept file),
      ``'crop'`` (the square crop where there is one), or ``'random'`` (FiTv2's config and the
      reference default: resize or crop with probability 1/2 each, for the images that have
      both; this is FiTv2's mix of fixed-resolution and flexible-resolution data);
    - the mirrored copy (``feature[1]``) with probability ``flip_prob`` (the reference: 1/2),
      else the original (``feature[0]``).

    Both draws are hashes of ``(seed, i)`` (:func:`flexgen.rng.uniforms`),
    not of a global RNG: item ``i`` is the same every epoch and in every worker, and
    :meth:`get_size` knows the size of the file ``__getitem__`` will read without reading it.
    (The reference redraws both on every access; here a different ``seed`` draws anew.)

    ``get_size(i)`` / ``get_label(i)`` (the batch samplers call ``get_size`` for every index
    when they are built) read only the file's header / the ``label`` tensor, never the
    features, and are cached for the dataset's lifetime.

    Args:
        data_root: the folder holding the reference's folders.
        target_len: the token budget L that names the folders (256 for FiT / FiTv2, 1024
            for the FiTv2 high-resolution fine-tune).
        choice: ``'random'``, ``'resize'`` or ``'crop'`` (above).
        flip_prob: probability of the mirrored copy.
        seed: selects every item's draws.
        patch_size: ``p`` of the stored tokens (the reference: 2).
        latent_channels: ``C`` (the reference: 4); tokens must have ``C*p*p`` values.
        dtype: the dtype of the returned latents; None keeps the stored one.

    Items: ``dict(inputs=Tensor[C, h*p, w*p], data_samples=dict(label=int, index=int))``;
    ``get_size(i)`` is ``(h*p, w*p)``, the latent's size (what the batch samplers' token
    counts ``(H // p) * (W // p)`` expect).

    Raises:
        FileNotFoundError: ``data_root`` or one of the three folders is missing (named), or
            a ``_crop`` file has no ``_resize`` partner; when an item is read, its file is gone.
        FiTFileError: an item's file is corrupt or breaks the format (names the file and
            the field).
    """

    def __init__(self, data_root: str, target_len: int = 256, choice: str = 'random',
                 flip_prob: float = 0.5, seed: int = 0, patch_size: int = 2,
                 latent_channels: int = 4, dtype: Optional[str] = 'float32'):
        if choice not in CHOICES:
            raise ValueError(f'FiTLatents: choice must be one of {CHOICES}, got {choice!r}')
        if not 0 <= flip_prob <= 1:
            raise ValueError(f'FiTLatents: flip_prob must be in [0, 1], got {flip_prob!r}')
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f'FiTLatents: seed must be a non-negative int, got {seed!r}')
        if not isinstance(target_len, int) or target_len < 16:
            raise ValueError(f'FiTLatents: target_len must be an int >= 16, got {target_len!r}')
        self.dtype = None if dtype is None else getattr(torch, str(dtype), None)
        if dtype is not None and not isinstance(self.dtype, torch.dtype):
            raise ValueError(f'FiTLatents: dtype {dtype!r} is not a torch dtype name')
        self.data_root, self.target_len, self.choice = os.fspath(data_root), target_len, choice
        self.flip_prob, self.seed = float(flip_prob), seed
        self.patch_size, self.latent_channels = patch_size, latent_channels
        self.entries = self._list_entries()
        # Per-index draws: the file of the entry (its position in the entry) and the copy.
        u = uniforms(seed, torch.arange(len(self.entries))[:, None],
                     torch.tensor([_CHOICE_STREAM, _FLIP_STREAM])).numpy()
        self._flip = u[:, 1] < self.flip_prob
        pick_random = (u[:, 0] * 2).astype(np.int64)  # the reference's random.choice of 2
        self._paths: List[str] = []
        for entry, r in zip(self.entries, pick_random):
            if choice == 'resize' or len(entry) == 1:
                self._paths.append(entry[0])
            elif choice == 'crop':
                self._paths.append(entry[-1])
            else:
                self._paths.append(entry[r])
        self._shapes = np.full((len(self.entries), 2), -1, dtype=np.int64)  # (h, w) tokens
        self._labels = np.full(len(self.entries), -1, dtype=np.int64)

    # ------------------------------------------------------------------ listing
    def _list_entries(self) -> List[List[str]]:
        root = self.data_root
        if not osp.isdir(root):
            raise FileNotFoundError(f'FiTLatents: data_root {root!r} is not a directory')
        names, ignored = {}, 0
        for folder in fit_folders(self.target_len):
            path = osp.join(root, folder)
            if not osp.isdir(path):
                expected = ', '.join(fit_folders(self.target_len))
                raise FileNotFoundError(
                    f'FiTLatents: folder {path!r} is missing (a FiT latent root with '
                    f'target_len={self.target_len} holds {expected})')
            listing = os.listdir(path)
            names[folder] = sorted(n for n in listing if n.endswith('.safetensors'))
            ignored += len(listing) - len(names[folder])
        small = osp.join(root, IGNORED_FOLDER)
        num_small = len(os.listdir(small)) if osp.isdir(small) else 0
        single, resize, crop = fit_folders(self.target_len)
        crop_set, resize_set = set(names[crop]), set(names[resize])
        orphans = [n for n in names[crop] if n not in resize_set]
        if orphans:
            raise FileNotFoundError(
                f'FiTLatents: {osp.join(root, resize, orphans[0])!r} is missing: the crop file '
                f'{osp.join(root, crop, orphans[0])!r} has no resize partner '
                f'({len(orphans)} crop files without one)')
        entries = [[osp.join(root, single, n)] for n in names[single]]
        entries += [[osp.join(root, resize, n)] for n in names[resize] if n not in crop_set]
        entries += [[osp.join(root, resize, n), osp.join(root, crop, n)] for n in names[crop]]
        print_log(f'FiTLatents: {len(entries)} images under {root} ({len(names[single])} '
                  f'{single}, {len(names[resize]) - len(names[crop])} resize-only, '
                  f'{len(names[crop])} resize/crop pairs); ignored {num_small} entries of '
                  f'{IGNORED_FOLDER} and {ignored} other entries that are not .safetensors files',
                  logger='current', level=logging.INFO)
        if not entries:
            raise FileNotFoundError(f'FiTLatents: no .safetensors files under {root!r}')
        return entries

    # ------------------------------------------------------------------ metadata
    METAINFO_KEYS = ('latent_channels', 'patch_size')

    def __len__(self) -> int:
        return len(self.entries)

    def path(self, index: int) -> str:
        """The file item ``index`` reads."""
        return self._paths[self.check_index(index)]

    def flipped(self, index: int) -> bool:
        """Whether item ``index`` is the mirrored copy (``feature[1]``)."""
        return bool(self._flip[self.check_index(index)])

    def _open(self, path: str):
        if not osp.isfile(path):
            raise FileNotFoundError(f'FiTLatents: file {path!r} is missing')
        try:
            return safe_open(path, framework='pt')
        except (SafetensorError, OSError, ValueError) as error:
            raise FiTFileError(f'FiTLatents: cannot read {path!r}: {error}') from error

    def _read_shape(self, index: int, handle, path: str) -> Tuple[int, int]:
        """``(h, w)`` tokens of the open file, from its header; checks the format."""
        missing = [k for k in KEYS if k not in handle.keys()]
        if missing:
            raise FiTFileError(f'FiTLatents: {path!r} has no {missing} (keys: '
                               f'{sorted(handle.keys())}; expected {list(KEYS)})')
        shape = tuple(handle.get_slice('feature').get_shape())
        width = self.latent_channels * self.patch_size ** 2
        if len(shape) != 4 or shape[0] != 2 or shape[3] != width:
            raise FiTFileError(f"FiTLatents: {path!r}: 'feature' has shape {list(shape)}, "
                               f'expected [2, h, w, {width}] (latent_channels '
                               f'{self.latent_channels} x patch_size {self.patch_size}^2)')
        self._shapes[index] = shape[1:3]
        return shape[1], shape[2]

    def get_size(self, index: int) -> Tuple[int, int]:
        """``(H, W)`` of item ``index``'s latent (tokens times ``patch_size``), from the
        header of the file it reads."""
        index = self.check_index(index)
        if self._shapes[index, 0] < 0:
            path = self._paths[index]
            with self._open(path) as handle:
                self._read_shape(index, handle, path)
        h, w = self._shapes[index].tolist()
        return h * self.patch_size, w * self.patch_size

    def get_label(self, index: int) -> int:
        """The class of item ``index`` (reads only the ``label`` tensor)."""
        index = self.check_index(index)
        if self._labels[index] < 0:
            path = self._paths[index]
            with self._open(path) as handle:
                self._read_shape(index, handle, path)
                self._labels[index] = self._label(handle.get_tensor('label'), path)
        return int(self._labels[index])

    @staticmethod
    def _label(label: torch.Tensor, path: str) -> int:
        if label.numel() != 1 or label.is_floating_point() and label.item() != int(label.item()):
            raise FiTFileError(f"FiTLatents: {path!r}: 'label' must be one class id, got "
                               f'{label.tolist()}')
        value = int(label.item())
        if value < 0:
            raise FiTFileError(f"FiTLatents: {path!r}: 'label' is negative ({value})")
        return value

    # ------------------------------------------------------------------ items
    def __getitem__(self, index: int) -> dict:
        index = self.check_index(index)
        path = self._paths[index]
        with self._open(path) as handle:
            h, w = self._read_shape(index, handle, path)
            try:
                tokens = handle.get_slice('feature')[int(self._flip[index])]
                grid = handle.get_tensor('grid')
                size = handle.get_tensor('size')
                label = self._label(handle.get_tensor('label'), path)
            except (SafetensorError, OSError, ValueError, RuntimeError) as error:
                raise FiTFileError(f'FiTLatents: cannot read {path!r}: {error}') from error
        if size.numel() != 2 or size.reshape(-1).tolist() != [h, w]:
            raise FiTFileError(f"FiTLatents: {path!r}: 'size' is {size.tolist()} but "
                               f"'feature' holds {h} x {w} tokens")
        if tuple(grid.shape) != (2, h * w) or not torch.equal(grid.long(), raster_grid(h, w)):
            raise FiTFileError(f"FiTLatents: {path!r}: 'grid' (shape {list(grid.shape)}) is "
                               f'not the raster grid of {h} x {w} tokens (row 0 column index, '
                               'row 1 row index)')
        if not torch.isfinite(tokens).all():
            raise FiTFileError(f"FiTLatents: {path!r}: 'feature' holds NaN or inf values "
                               f'({int((~torch.isfinite(tokens)).sum())} of {tokens.numel()}); '
                               're-encode the image or remove the file')
        self._labels[index] = label
        tokens = tokens.reshape(h * w, -1)
        if self.dtype is not None:
            tokens = tokens.to(self.dtype)
        latent = unpatchify(tokens, torch.tensor([[h, w]]), self.patch_size)[0]
        return dict(inputs=latent.contiguous(), data_samples=dict(label=label, index=index))


# ---------------------------------------------------------------------- writing
def fit_resize_size(width: int, height: int, image_size: int, multiple: int) -> Tuple[int, int]:
    """FiT's flexible-resolution size ``(W', H')`` of a ``width x height`` image
    (``fit/data/in1k_dataset.py: resize_arr``; rule in :class:`FiTLatentWriter`);
    ``image_size`` is S, ``multiple`` is m."""
    if width * height >= image_size ** 2:
        new_w = np.sqrt(width / height) * image_size
        new_h = new_w * height / width
    elif width < multiple:
        new_w, new_h = multiple, multiple * height / width
    elif height < multiple:
        new_h, new_w = multiple, multiple * width / height
    else:
        new_w, new_h = width, height
    return int(new_w / multiple) * multiple, int(new_h / multiple) * multiple


class FiTLatentWriter(LatentWriter):
    """Writes FiT's latent folders (the format of the module docstring), what
    :class:`FiTLatents` reads.

    With ``L`` = ``target_len`` tokens, ``d`` the autoencoder's downsampling and ``p`` =
    ``patch_size``, ``m = d * p`` pixels per token side and ``S = m * sqrt(L)`` (256 px for
    L = 256 on SD-VAE):

    - each image is resized by FiT's rule (:func:`fit_resize_size`): if ``W * H >= S^2`` to
      area ``S^2``, aspect kept (``W' = sqrt(W / H) * S``, ``H' = W' H / W``); else a side
      below ``m`` is raised to ``m`` (aspect kept); then both sides are floored to
      multiples of ``m`` (BICUBIC, skipped when the size does not change);
    - an image of more than ``S^2`` pixels goes to ``greater_than_L_resize`` and, centre-
      cropped to ``S x S`` (ADM's crop, :func:`~flexgen.datasets.image_folder.center_crop_arr`),
      to ``greater_than_L_crop``; an image of fewer than 16 tokens goes to
      ``less_than_16``; the others to ``from_16_to_L`` (the reference's encoding script is
      not released: this split is read off the folder names);
    - one ``<name>.safetensors`` per image and folder, where ``<name>`` is the image's path
      under the image root without its extension, ``%`` written ``%25`` and ``/`` written
      ``%2F`` (``cat/0.jpg`` -> ``cat%2F0``: images of the same file name in different
      class folders stay apart, and the folders stay flat as FiT's are), holding
      ``feature`` ``[2, h, w, C*p*p]`` (the image's and its horizontal mirror's latent,
      each encoded, in patches of ``(c, p1, p2)`` order), ``grid`` ``[2, h*w]`` (column
      index, row index), ``size`` ``[2]`` = ``(h, w)`` tokens, ``label`` ``[1]``.

    Args:
        out_dir: the dataset root to write.
        downsample: the autoencoder's pixels per latent cell (d).
        target_len: the token budget L (a square number: S = d * p * sqrt(L)).
        patch_size: p.
        dtype: the dtype ``feature`` is stored in (a torch dtype name).
    """

    name = 'fit'
    FILE_NAMES = 'path under the image root, % as %25, / as %2F'

    def __init__(self, out_dir: str, downsample: int, target_len: int = 256,
                 patch_size: int = 2, dtype: str = 'float32'):
        side = math.isqrt(target_len)
        if side * side != target_len or target_len < 16:
            raise ValueError(f'--target-len must be a square number >= 16 (FiT: 256 or 1024), '
                             f'got {target_len}')
        super().__init__(out_dir, downsample, patch_size, dtype)
        self.target_len, self.image_size = target_len, self.multiple * side
        self.single, self.resize, self.crop = fit_folders(target_len)
        self.ignored = IGNORED_FOLDER
        self.folders = (self.single, self.resize, self.crop, IGNORED_FOLDER)
        self.make_folders(self.folders)

    def settings(self) -> dict:
        return dict(format=self.name, target_len=self.target_len, patch_size=self.patch_size,
                    image_size=self.image_size, dtype=self.dtype_name,
                    file_names=self.FILE_NAMES)

    @staticmethod
    def file_name(name: str) -> str:
        """The flat file name (without ``.safetensors``) of image ``name`` (its path under
        the image root, without extension): one-to-one, so no two images share a file."""
        return name.replace('%', '%25').replace('/', '%2F')

    def pending(self, name: str) -> bool:
        """Whether image ``name`` still needs encoding (its last file is written last)."""
        done = (osp.exists(self.path(self.single, name))
                or osp.exists(self.path(self.ignored, name))
                or osp.exists(self.path(self.crop, name)))
        return not done

    def prepare(self, image: Image.Image) -> Dict[str, torch.Tensor]:
        """The pixel images to encode, keyed ``folder`` and ``folder/flipped``."""
        width, height = image.size
        new_w, new_h = fit_resize_size(width, height, self.image_size, self.multiple)
        if new_w == 0 or new_h == 0:
            raise ValueError(f'{width}x{height} px is too thin for FiT\'s resize rule (it '
                             f'floors to {new_w}x{new_h} at a multiple of {self.multiple})')
        view = resized(image, (new_w, new_h))
        views = {}
        if width * height > self.image_size ** 2:
            views[self.resize] = view
            views[self.crop] = center_crop_arr(image, self.image_size)
        elif (new_w // self.multiple) * (new_h // self.multiple) < 16:
            views[self.ignored] = view
        else:
            views[self.single] = view
        return with_mirrors(views)

    def write(self, name: str, label: int, latents: Dict[str, torch.Tensor],
              info: Optional[dict] = None) -> None:
        # The crop file last: pending() takes it as the sign that the image is complete.
        for folder in sorted((k for k in latents if '/' not in k), key=lambda k: k == self.crop):
            pair = patchify(self.mirror_pair(latents, folder), self.patch_size)
            h, w = pair.sizes[0].tolist()
            feature = pair.tokens.reshape(2, h, w, -1).to(self.dtype)
            save_tensors(dict(feature=feature, grid=raster_grid(h, w),
                              size=torch.tensor([h, w], dtype=torch.int64),
                              label=torch.tensor([label], dtype=torch.int64)),
                         self.path(folder, name))

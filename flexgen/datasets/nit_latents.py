"""NiT's pre-encoded latents (Wang et al. 2025, "Native-Resolution Image Synthesis",
github WZDTHU/NiT), read as the reference ``ImprovedPackedImageNetLatentDataset`` does.

The format (the released ``GoodEnough/NiT-Preprocessed-ImageNet1K`` set, and what
:class:`NiTLatentWriter`, ``tools/encode_latents.py --format nit``, writes):

- a data-meta jsonl, one JSON object per line (per image and geometry): ``latent_file``
  (relative to its type's latent folder), ``type`` (``'native-resolution'``,
  ``'fixed-256x256'``, ``'fixed-512x512'``), ``latent_h`` / ``latent_w`` (tokens: NiT's
  patch size is 1), ``image_file`` (relative to the image folder), ``ori_w`` / ``ori_h``,
  ``image_w`` / ``image_h`` (autoencoder input pixels); flexgen's writer adds ``label``.
  The "merged" jsonl simply holds the lines of the three types (three geometries of every
  ImageNet image, one model trains on all of them);
- one safetensors file per line: ``latent`` ``[2, C, latent_h, latent_w]`` (index 0 the
  image's latent, index 1 its horizontal mirror's; DC-AE f32c32 times its scaling factor
  in NiT, C = 32) and ``label`` (the class id, 0-d int64).

Items are ``dict(inputs=Tensor[C, h, w], data_samples=dict(label, index, ...))``: the
latent as stored (no patching: the model patchifies). Index ``i`` is the ``i``-th kept line
(all lines of the selected types, in file order; with every type selected and no blank
line, line ``i`` of the jsonl, which is what NiT's packed sampler-meta files index).

REPA (NiT aligns block ``encoder_depth`` with RADIO features of the same image): with
``image_mode='image'`` an item also holds ``image``: the original image from
``image_dir / image_file`` resized the reference's way to ``image_scale`` pixels per
latent cell (``latent_h * 16 x latent_w * 16`` for RADIO/16, so the encoder's patch grid is
the token grid): native-resolution lines by a BICUBIC resize, ``fixed-*`` lines by ADM's
centre crop; mirrored with the latent. It is a uint8 numpy array ``[H, W, 3]`` (sizes
differ across items, so ``jagged_collate`` keeps a list; 4x smaller than float to move
between loader workers); :func:`flexgen.models.vision_encoders.as_pixels` reads it.
``image_mode='path'`` gives ``image_path`` (str) and ``flip`` (bool) instead.

The flip choice (``latent[1]`` and the mirrored image) is a hash of ``(seed, index)``
(:func:`flexgen.rng.uniforms`): the same every epoch and in every
worker. (The reference redraws it on every access with the global RNG.)
"""
import json
import logging
import os
import os.path as osp
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from mmengine.logging import print_log
from PIL import Image
from safetensors import SafetensorError, safe_open

from flexgen.fileio import atomic_write
from flexgen.registry import DATASETS
from flexgen.rng import stream_id, uniforms

from .base_dataset import FlexDataset
from .image_folder import center_crop_arr
from .latent_writer import LatentWriter, resized, save_tensors, with_mirrors

NIT_TYPES = ('native-resolution', 'fixed-256x256', 'fixed-512x512')
IMAGE_MODES = (None, 'path', 'image')
REQUIRED = ('latent_file', 'latent_h', 'latent_w', 'type')
_FLIP_STREAM = stream_id('flip')


class NiTFileError(ValueError):
    """A NiT data-meta line or latent file that cannot be read or breaks the format."""


def nit_image_size(latent_h: int, latent_w: int, scale: int) -> Tuple[int, int]:
    """``(H, W)`` pixels of the REPA image of a ``latent_h x latent_w`` latent."""
    return latent_h * scale, latent_w * scale


def load_nit_image(path: str, data_type: str, latent_h: int, latent_w: int, scale: int,
                   flip: bool) -> np.ndarray:
    """The reference's REPA image: ``[H, W, 3]`` uint8 at ``latent * scale`` pixels
    (fixed types: ADM centre crop; others: BICUBIC resize), mirrored if ``flip``."""
    height, width = nit_image_size(latent_h, latent_w, scale)
    with Image.open(path) as image:
        image = image.convert('RGB')
    if data_type.startswith('fixed'):
        if height != width:
            raise ValueError(f'a {data_type!r} line has a {latent_h}x{latent_w} latent; fixed '
                             'types are square (ADM centre crop)')
        image = center_crop_arr(image, height)
    elif image.size != (width, height):
        image = image.resize((width, height), resample=Image.BICUBIC)
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(image, dtype=np.uint8)


@DATASETS.register_module()
class NiTLatents(FlexDataset):
    """NiT's latents listed by one or more data-meta jsonl files (format: module docstring).

    Args:
        data_meta: the jsonl path, or a list of them (read in order, e.g. NiT's separate
            ``_nr`` / ``_256x256`` / ``_512x512`` files instead of the merged one).
        latent_dirs: ``{type: folder}``, or a list of folders paired with ``data_types``
            (NiT's config: ``data_types=[...]``, ``latent_dirs=[...]``).
        data_types: the types to keep (default: every type of ``latent_dirs``); lines of
            other types are skipped (counted in the log). A kept type with no line raises.
        image_dir: the original images (REPA only).
        image_mode: ``None``, ``'path'`` or ``'image'`` (module docstring).
        image_scale: REPA image pixels per latent cell (NiT / RADIO: 16; DINOv2: 14).
        flip_prob: probability of the mirrored copy (the reference: 1/2).
        seed: selects every item's flip.
        latent_channels: if given, every latent must have this many channels.
        dtype: dtype of the returned latents; None keeps the stored one.

    ``get_size(i)`` is the latent's ``(h, w)`` and ``get_label(i)`` the class, both without
    reading the latent: sizes come from the jsonl; labels from its ``label`` field when
    present, else from the file's ``label`` tensor alone (a few bytes; cached).

    The jsonl is indexed once (per kept line: its file, byte offset, size, type; about
    20 bytes a line: 3.84M lines of NiT's merged set fit in ~80 MB); an item re-reads its
    own line, so workers do not each hold millions of parsed dicts.

    Raises:
        FileNotFoundError: a jsonl, a latent folder, or (when read) a latent file / image is
            missing; the message names the file and the jsonl line.
        NiTFileError: a jsonl line is not JSON or lacks / misstates a field (names the file
            and line), or a latent file is corrupt or disagrees with its line.
    """

    def __init__(self, data_meta: Union[str, Sequence[str]],
                 latent_dirs: Union[Dict[str, str], Sequence[str]],
                 data_types: Optional[Sequence[str]] = None, image_dir: Optional[str] = None,
                 image_mode: Optional[str] = None, image_scale: int = 16,
                 flip_prob: float = 0.5, seed: int = 0, latent_channels: Optional[int] = None,
                 dtype: Optional[str] = 'float32'):
        if image_mode not in IMAGE_MODES:
            raise ValueError(f'NiTLatents: image_mode must be one of {IMAGE_MODES}, '
                             f'got {image_mode!r}')
        if image_mode is not None and image_dir is None:
            raise ValueError(f'NiTLatents: image_mode={image_mode!r} needs image_dir')
        if not 0 <= flip_prob <= 1:
            raise ValueError(f'NiTLatents: flip_prob must be in [0, 1], got {flip_prob!r}')
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f'NiTLatents: seed must be a non-negative int, got {seed!r}')
        if not isinstance(image_scale, int) or image_scale < 1:
            raise ValueError(f'NiTLatents: image_scale must be a positive int, '
                             f'got {image_scale!r}')
        self.dtype = None if dtype is None else getattr(torch, str(dtype), None)
        if dtype is not None and not isinstance(self.dtype, torch.dtype):
            raise ValueError(f'NiTLatents: dtype {dtype!r} is not a torch dtype name')
        if isinstance(latent_dirs, dict):
            type_dirs = dict(latent_dirs)
            data_types = list(data_types) if data_types is not None else list(type_dirs)
        else:
            if data_types is None or len(data_types) != len(latent_dirs):
                raise ValueError('NiTLatents: a list of latent_dirs pairs with data_types of '
                                 f'the same length, got {data_types!r} and {latent_dirs!r}')
            type_dirs = dict(zip(data_types, latent_dirs))
        unknown = [t for t in data_types if t not in type_dirs]
        if unknown:
            raise ValueError(f'NiTLatents: data_types {unknown} have no latent folder in '
                             f'latent_dirs {sorted(type_dirs)}')
        for t in data_types:
            if not osp.isdir(type_dirs[t]):
                raise FileNotFoundError(f'NiTLatents: latent folder {type_dirs[t]!r} of type '
                                        f'{t!r} is not a directory')
        self.types = tuple(data_types)
        self.type_dirs = {t: os.fspath(type_dirs[t]) for t in self.types}
        self.meta_files = [os.fspath(data_meta)] if isinstance(data_meta, (str, os.PathLike)) \
            else [os.fspath(f) for f in data_meta]
        self.image_dir, self.image_mode, self.image_scale = image_dir, image_mode, image_scale
        self.flip_prob, self.seed, self.latent_channels = float(flip_prob), seed, latent_channels
        self._index()
        draws = uniforms(seed, torch.arange(len(self)), _FLIP_STREAM)
        self._flip = (draws < self.flip_prob).numpy()

    # ------------------------------------------------------------------ the jsonl index
    def _index(self) -> None:
        files, offsets, lines, sizes, types, labels = [], [], [], [], [], []
        skipped: Dict[str, int] = {}
        type_id = {t: k for k, t in enumerate(self.types)}
        for f, path in enumerate(self.meta_files):
            if not osp.isfile(path):
                raise FileNotFoundError(f'NiTLatents: data-meta file {path!r} is missing')
            offset = 0
            with open(path, 'rb') as handle:
                for number, raw in enumerate(handle, start=1):
                    start, offset = offset, offset + len(raw)
                    if not raw.strip():
                        continue
                    meta = self._parse(raw, path, number)
                    if meta['type'] not in type_id:
                        skipped[meta['type']] = skipped.get(meta['type'], 0) + 1
                        continue
                    files.append(f)
                    offsets.append(start)
                    lines.append(number)
                    sizes.append((meta['latent_h'], meta['latent_w']))
                    types.append(type_id[meta['type']])
                    labels.append(meta.get('label', -1))
        self._file = np.asarray(files, dtype=np.int16)
        self._offset = np.asarray(offsets, dtype=np.int64)
        self._line = np.asarray(lines, dtype=np.int64)
        self._sizes = np.asarray(sizes, dtype=np.int32).reshape(-1, 2)
        self._type = np.asarray(types, dtype=np.int8)
        self._labels = np.asarray(labels, dtype=np.int64)
        counts = np.bincount(self._type, minlength=len(self.types))
        empty = [t for t, c in zip(self.types, counts) if c == 0]
        if empty:
            raise NiTFileError(f'NiTLatents: no line of type {empty} in {self.meta_files} '
                               f'(other types found: {sorted(skipped)})')
        print_log(f'NiTLatents: {len(self._line)} items from {self.meta_files} ('
                  + ', '.join(f'{c} {t}' for t, c in zip(self.types, counts))
                  + (f'; skipped {skipped}' if skipped else '') + ')',
                  logger='current', level=logging.INFO)

    def _parse(self, raw: bytes, path: str, number: int) -> dict:
        """One jsonl line, checked; errors name the file and line."""
        where = f'{path}:{number}'
        try:
            meta = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise NiTFileError(f'NiTLatents: line {number} of {path!r} is not JSON ({error}): '
                               f'{raw[:80]!r}') from error
        if not isinstance(meta, dict):
            raise NiTFileError(f'NiTLatents: line {number} of {path!r} is not a JSON object')
        missing = [k for k in REQUIRED if k not in meta]
        if self.image_mode is not None and 'image_file' not in meta:
            missing.append('image_file')
        if missing:
            raise NiTFileError(f'NiTLatents: line {number} of {path!r} has no {missing} '
                               f'(keys: {sorted(meta)})')
        for key in ('latent_h', 'latent_w'):
            if not isinstance(meta[key], int) or isinstance(meta[key], bool) or meta[key] < 1:
                raise NiTFileError(f'NiTLatents: {where}: {key} must be a positive int, got '
                                   f'{meta[key]!r}')
        for key in ('latent_file', 'type'):
            if not isinstance(meta[key], str):
                raise NiTFileError(f'NiTLatents: {where}: {key} must be a string, got '
                                   f'{meta[key]!r}')
        label = meta.get('label', 0)
        if not isinstance(label, int) or isinstance(label, bool) or label < 0:
            raise NiTFileError(f'NiTLatents: {where}: label must be a non-negative int, got '
                               f'{label!r}')
        return meta

    def meta(self, index: int) -> dict:
        """The jsonl line of item ``index`` (re-read from its file)."""
        index = self.check_index(index)
        path = self.meta_files[self._file[index]]
        with open(path, 'rb') as handle:
            handle.seek(int(self._offset[index]))
            raw = handle.readline()
        return self._parse(raw, path, int(self._line[index]))

    def _where(self, index: int) -> str:
        return f'line {int(self._line[index])} of {self.meta_files[self._file[index]]!r}'

    # ------------------------------------------------------------------ metadata
    METAINFO_KEYS = ('types', 'image_scale')

    def __len__(self) -> int:
        return len(self._line)

    def get_size(self, index: int) -> Tuple[int, int]:
        """``(h, w)`` of item ``index``'s latent, from the jsonl."""
        h, w = self._sizes[self.check_index(index)].tolist()
        return h, w

    def data_type(self, index: int) -> str:
        return self.types[self._type[self.check_index(index)]]

    def flipped(self, index: int) -> bool:
        """Whether item ``index`` is the mirrored copy (``latent[1]``)."""
        return bool(self._flip[self.check_index(index)])

    def latent_path(self, index: int, meta: Optional[dict] = None) -> str:
        meta = meta or self.meta(index)
        return osp.join(self.type_dirs[meta['type']], meta['latent_file'])

    def get_label(self, index: int) -> int:
        """The class of item ``index``: the jsonl's ``label``, else the file's ``label``
        tensor alone (the latent is not read)."""
        index = self.check_index(index)
        if self._labels[index] < 0:
            path = self.latent_path(index)
            with self._open(path, index) as handle:
                self._labels[index] = self._read_label(handle, path, index)
        return int(self._labels[index])

    # ------------------------------------------------------------------ files
    def _open(self, path: str, index: int):
        if not osp.isfile(path):
            raise FileNotFoundError(f'NiTLatents: latent file {path!r} ({self._where(index)}) '
                                    'is missing')
        try:
            return safe_open(path, framework='pt')
        except (SafetensorError, OSError, ValueError) as error:
            raise NiTFileError(f'NiTLatents: cannot read latent file {path!r} '
                               f'({self._where(index)}): {error}') from error

    def _read_label(self, handle, path: str, index: int) -> int:
        if 'label' not in handle.keys():
            raise NiTFileError(f"NiTLatents: {path!r} ({self._where(index)}) has no 'label' "
                               f'(keys: {sorted(handle.keys())})')
        try:
            label = handle.get_tensor('label')
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            raise NiTFileError(f'NiTLatents: cannot read {path!r} ({self._where(index)}): '
                               f'{error}') from error
        if label.numel() != 1 or label.is_floating_point() or int(label.item()) < 0:
            raise NiTFileError(f"NiTLatents: {path!r} ({self._where(index)}): 'label' must be "
                               f'one class id, got {label.tolist()}')
        return int(label.item())

    def _read_latent(self, handle, path: str, index: int) -> torch.Tensor:
        if 'latent' not in handle.keys():
            raise NiTFileError(f"NiTLatents: {path!r} ({self._where(index)}) has no 'latent' "
                               f'(keys: {sorted(handle.keys())})')
        h, w = self.get_size(index)
        shape = list(handle.get_slice('latent').get_shape())
        channels = self.latent_channels
        if len(shape) != 4 or shape[0] != 2 or shape[2:] != [h, w] or (
                channels is not None and shape[1] != channels):
            raise NiTFileError(f"NiTLatents: {path!r}: 'latent' has shape {shape}, but "
                               f'{self._where(index)} says [2, {channels or "C"}, {h}, {w}] '
                               '(the latent and its mirror)')
        try:
            latent = handle.get_slice('latent')[int(self._flip[index])]
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            raise NiTFileError(f'NiTLatents: cannot read {path!r} ({self._where(index)}): '
                               f'{error}') from error
        if not torch.isfinite(latent).all():
            raise NiTFileError(f"NiTLatents: {path!r} ({self._where(index)}): 'latent' holds "
                               f'NaN or inf values ({int((~torch.isfinite(latent)).sum())} of '
                               f'{latent.numel()}); re-encode the image or remove the file')
        return latent

    # ------------------------------------------------------------------ items
    def __getitem__(self, index: int) -> dict:
        index = self.check_index(index)
        meta = self.meta(index)
        path = self.latent_path(index, meta)
        with self._open(path, index) as handle:
            latent = self._read_latent(handle, path, index)
            label = self._read_label(handle, path, index)
        if 'label' in meta and meta['label'] != label:
            raise NiTFileError(f"NiTLatents: {path!r} holds label {label} but "
                               f"{self._where(index)} says {meta['label']}")
        self._labels[index] = label
        if self.dtype is not None:
            latent = latent.to(self.dtype)
        samples = dict(label=label, index=index)
        if self.image_mode is not None:
            image_path = osp.join(self.image_dir, meta['image_file'])
            flip = bool(self._flip[index])
            if self.image_mode == 'path':
                samples.update(image_path=image_path, flip=flip)
            else:
                samples['image'] = self._image(image_path, meta, flip, index)
        return dict(inputs=latent.contiguous(), data_samples=samples)

    def _image(self, path: str, meta: dict, flip: bool, index: int) -> np.ndarray:
        if not osp.isfile(path):
            raise FileNotFoundError(f'NiTLatents: image {path!r} ({self._where(index)}) is '
                                    'missing')
        try:
            return load_nit_image(path, meta['type'], meta['latent_h'], meta['latent_w'],
                                  self.image_scale, flip)
        except (OSError, ValueError) as error:
            raise NiTFileError(f'NiTLatents: cannot read image {path!r} '
                               f'({self._where(index)}): {error}') from error


# ---------------------------------------------------------------------- writing
def nit_resize_size(width: int, height: int, min_image_size: int, max_image_size: int
                    ) -> Tuple[int, int]:
    """NiT's ``native_resolution_resize`` size ``(W', H')`` of a ``width x height`` image
    (rule in :class:`NiTLatentWriter`; ``min_image_size`` is a, ``max_image_size`` is S)."""
    a = min_image_size
    if width * height < max_image_size ** 2:
        return max(1, int(width / a)) * a, max(1, int(height / a)) * a
    new_w = np.sqrt(width / height) * max_image_size
    new_h = new_w * height / width
    return int(new_w / a) * a, int(new_h / a) * a


class NiTLatentWriter(LatentWriter):
    """Writes NiT's latent folders and data-meta jsonl (the format of the module
    docstring), what :class:`NiTLatents` reads, for every type of ``types``:

    - ``native-resolution``: NiT's ``native_resolution_resize`` (:func:`nit_resize_size`)
      with ``a = min_image_size`` and ``S = max_image_size``: if ``W * H < S^2`` each side is
      floored to a multiple of ``a`` (at least ``a``; no crop, the aspect ratio moves
      slightly), else the image is scaled to area ``S^2`` (aspect kept,
      ``W' = sqrt(W / H) * S``, ``H' = W' H / W``) and then floored; BICUBIC;
    - ``fixed-SxS``: ADM's centre crop to ``S x S`` (NiT's 256 / 512 copies of ImageNet);
    - files ``out_dir/<type>/<class folder>/<stem>.safetensors`` holding ``latent``
      ``[2, C, h, w]`` (the image's and its mirror's latent) and ``label`` (0-d int64), and
      the data-meta jsonl ``out_dir/data_meta/<type>_meta.jsonl`` (NiT's fields
      ``image_file``, ``latent_file``, ``ori_w``, ``ori_h``, ``latent_h``, ``latent_w``,
      ``image_h``, ``image_w``, ``type``, plus ``label``), and with several types
      ``out_dir/data_meta/merge_meta.jsonl`` (the types' lines, in ``types`` order). The
      jsonl files are rewritten by :meth:`finish` from what is on disk (each file's header
      carries its line), so an interrupted job resumes to the same files.

    Args:
        out_dir: the dataset root to write.
        downsample: the autoencoder's pixels per latent cell (d).
        types: ``'native-resolution'`` and / or ``'fixed-SxS'`` types.
        patch_size: p (NiT: 1); sizes are multiples of ``d * p``.
        min_image_size, max_image_size: a and S of the native rule (default ``d * p``, 2048).
        dtype: the dtype ``latent`` is stored in (a torch dtype name).
    """

    name = 'nit'
    NATIVE = NIT_TYPES[0]

    def __init__(self, out_dir: str, downsample: int, types: Sequence[str] = (NATIVE,),
                 patch_size: int = 1, min_image_size: Optional[int] = None,
                 max_image_size: int = 2048, dtype: str = 'float32'):
        super().__init__(out_dir, downsample, patch_size, dtype)
        self.min_image_size = self.multiple if min_image_size is None else min_image_size
        self.max_image_size = max_image_size
        if self.min_image_size % self.multiple:
            raise ValueError(f'--min-image-size {self.min_image_size} is not a multiple of '
                             f'{self.multiple} (autoencoder downsampling x patch size)')
        if not types or len(set(types)) != len(types):
            raise ValueError(f'--nit-types must name distinct types, got {list(types)}')
        self.types, self.fixed = tuple(types), {}
        for t in self.types:
            if t == self.NATIVE:
                continue
            side = t[len('fixed-'):].split('x') if t.startswith('fixed-') else []
            if len(side) != 2 or side[0] != side[1] or not side[0].isdigit() \
                    or int(side[0]) % self.multiple or int(side[0]) == 0:
                raise ValueError(f'--nit-types: {t!r} is not {self.NATIVE!r} or '
                                 f"'fixed-SxS' with S a multiple of {self.multiple}")
            self.fixed[t] = int(side[0])
        self.rel: Dict[str, str] = {}  # image name -> image file relative to the image root
        self.make_folders(self.types + ('data_meta',))

    def settings(self) -> dict:
        return dict(format=self.name, types=list(self.types), patch_size=self.patch_size,
                    min_image_size=self.min_image_size, max_image_size=self.max_image_size,
                    dtype=self.dtype_name)

    def bind(self, items, image_root: str) -> None:
        self.rel = {name: osp.relpath(path, image_root).replace(os.sep, '/')
                    for path, _, name in items}

    def pending(self, name: str) -> bool:
        return not all(osp.exists(self.path(t, name)) for t in self.types)

    def prepare(self, image: Image.Image) -> Dict[str, torch.Tensor]:
        """The pixel images to encode, keyed ``type`` and ``type/flipped``."""
        width, height = image.size
        views = {}
        for t in self.types:
            if t == self.NATIVE:
                size = nit_resize_size(width, height, self.min_image_size, self.max_image_size)
                if 0 in size:
                    raise ValueError(f'{width}x{height} px floors to {size[0]}x{size[1]} under '
                                     f"NiT's native rule")
                views[t] = resized(image, size)
            else:
                views[t] = center_crop_arr(image, self.fixed[t])
        return with_mirrors(views)

    def info(self, path: str, image: Image.Image) -> dict:
        return dict(ori_w=image.size[0], ori_h=image.size[1])

    def write(self, name: str, label: int, latents: Dict[str, torch.Tensor],
              info: Optional[dict] = None) -> None:
        for t in self.types:  # pending() needs every type's file: order does not matter
            latent = torch.stack(self.mirror_pair(latents, t)).to(self.dtype)
            h, w = latent.shape[-2:]
            line = dict(image_file=self.rel[name], latent_file=self.latent_file(name),
                        ori_w=int(info['ori_w']), ori_h=int(info['ori_h']),
                        latent_h=int(h), latent_w=int(w), image_h=int(h) * self.downsample,
                        image_w=int(w) * self.downsample, type=t, label=int(label))
            save_tensors(dict(latent=latent, label=torch.tensor(label, dtype=torch.int64)),
                         self.path(t, name), metadata={'nit_meta': json.dumps(line)})

    def _line(self, data_type: str, name: str) -> dict:
        path = self.path(data_type, name)
        if not osp.isfile(path):
            raise FileNotFoundError(f'{path} is missing: image {name!r} is not encoded yet')
        with safe_open(path, framework='pt') as handle:
            meta = handle.metadata() or {}
        if 'nit_meta' not in meta:
            raise NiTFileError(f'{path} has no nit_meta header (not written by '
                               'NiTLatentWriter?)')
        return json.loads(meta['nit_meta'])

    def finish(self, items) -> Dict[str, str]:
        """Write the jsonl files from the files on disk (every image of ``items`` is
        written by then); returns ``{type: jsonl path}``."""
        written, merged = {}, []
        for t in self.types:
            lines = [json.dumps(self._line(t, name)) + '\n' for _, _, name in items]
            written[t] = osp.join(self.out_dir, 'data_meta', f'{t}_meta.jsonl')
            atomic_write(''.join(lines).encode(), written[t])
            merged += lines
        if len(self.types) > 1:
            written['merge'] = osp.join(self.out_dir, 'data_meta', 'merge_meta.jsonl')
            atomic_write(''.join(merged).encode(), written['merge'])
        return written

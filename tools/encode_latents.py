"""Encode an ImageNet-style image folder into pre-encoded latents (FiT's or NiT's format).

    python tools/encode_latents.py IMAGE_ROOT OUT_DIR --vae DIR [--format fit|nit] \
        [--target-len 256] [--batch-size 32] [--workers 4] [--device cuda]

``IMAGE_ROOT/<class>/<images>``: classes are the sorted sub-folder names (label = position);
images are found recursively (.jpg .jpeg .png .webp .bmp, any case). ``--vae`` is a local
directory written by diffusers' ``save_pretrained`` (e.g. sd-vae-ft-ema), loaded through
``flexgen.models.autoencoders.DiffusersAutoencoder``: stored latents are
``(E(x) - shift) * scale`` with the posterior mean of a KL autoencoder.

``--format fit`` (FiT / FiTv2; read back by ``flexgen.datasets.FiTLatents``): with ``L`` =
``--target-len`` tokens, ``d`` the autoencoder's downsampling and ``p`` = ``--patch-size``,
``m = d * p`` pixels per token side and ``S = m * sqrt(L)`` (256 px for L = 256 on SD-VAE):

- each image is resized by FiT's rule (``fit/data/in1k_dataset.py: resize_arr``): if
  ``W * H >= S^2`` to area ``S^2``, aspect kept (``W' = sqrt(W / H) * S``, ``H' = W' H / W``);
  else a side below ``m`` is raised to ``m`` (aspect kept); then both sides are floored to
  multiples of ``m`` (BICUBIC, skipped when the size does not change);
- an image of more than ``S^2`` pixels goes to ``greater_than_L_resize`` and, centre-cropped
  to ``S x S`` (ADM's crop, as FiT's ``center_crop_arr``), to ``greater_than_L_crop``; an
  image of fewer than 16 tokens goes to ``less_than_16``; the others to ``from_16_to_L``
  (the reference's encoding script is not released: this split is read off the folder names);
- one ``<name>.safetensors`` per image and folder, where ``<name>`` is the image's path under
  IMAGE_ROOT without its extension, ``%`` written ``%25`` and ``/`` written ``%2F``
  (``cat/0.jpg`` -> ``cat%2F0``: images of the same file name in different class folders
  stay apart, and the folders stay flat as FiT's are), holding ``feature``
  ``[2, h, w, C*p*p]`` (the image's and its horizontal mirror's latent, each encoded, in
  patches of ``(c, p1, p2)`` order), ``grid`` ``[2, h*w]`` (column index, row index),
  ``size`` ``[2]`` = ``(h, w)`` tokens, ``label`` ``[1]``.

``--format nit`` (NiT; read back by ``flexgen.datasets.NiTLatents``), for every type of
``--nit-types`` (default ``native-resolution``; also ``fixed-SxS``, e.g. ``fixed-256x256``):

- ``native-resolution``: NiT's ``native_resolution_resize`` with ``a = --min-image-size``
  (default ``d * p``: 32 for DC-AE, patch 1) and ``S = --max-image-size`` (2048): if
  ``W * H < S^2`` each side is floored to a multiple of ``a`` (at least ``a``; no crop, the
  aspect ratio moves slightly), else the image is scaled to area ``S^2`` (aspect kept,
  ``W' = sqrt(W / H) * S``, ``H' = W' H / W``) and then floored; BICUBIC;
- ``fixed-SxS``: ADM's centre crop to ``S x S`` (NiT's 256 / 512 copies of ImageNet);
- files ``OUT_DIR/<type>/<class folder>/<stem>.safetensors`` holding ``latent``
  ``[2, C, h, w]`` (the image's and its mirror's latent) and ``label`` (0-d int64), and
  the data-meta jsonl ``OUT_DIR/data_meta/<type>_meta.jsonl`` (NiT's fields ``image_file``,
  ``latent_file``, ``ori_w``, ``ori_h``, ``latent_h``, ``latent_w``, ``image_h``,
  ``image_w``, ``type``, plus ``label``), and with several types
  ``OUT_DIR/data_meta/merge_meta.jsonl`` (the types' lines, in ``--nit-types`` order).
  The jsonl files are rewritten at the end of every run from what is on disk (the file
  headers carry each line's fields), so an interrupted run resumes to the same files.

Resumable: an image whose files all exist is skipped, and every file is written to a
temporary name and renamed into place (``os.replace``), so an interrupted run leaves no
partial file under a final name. ``OUT_DIR/meta.json`` records the settings; a rerun with
different ones stops instead of mixing two encodings.

Adding a format: a class listed in ``FORMATS`` with ``from_args(args, downsample)``,
``pending(name)``, ``prepare(image) -> {key: pixels}`` (run in the loader workers) and
``write(name, label, {key: latent}, info)``; optionally ``bind(items, image_root)``
(called once with every image), ``info(path, image) -> dict`` (run in the workers; handed
to ``write``) and ``finish(items)`` (called at the end of the run).
"""
from __future__ import annotations  # annotations name torch types; torch loads after --help

import argparse
import json
import math
import os
import os.path as osp
import sys
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from flexgen.cli import usable_cpus

if TYPE_CHECKING:
    import torch

IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp', '.bmp')


# ---------------------------------------------------------------------- image rules
def fit_resize_size(width: int, height: int, image_size: int, multiple: int) -> Tuple[int, int]:
    """FiT's flexible-resolution size ``(W', H')`` of a ``width x height`` image (rule above);
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


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """ADM's square centre crop (Dhariwal & Nichol 2021), as FiT's ``center_crop_arr``: halve
    with BOX while the short side is >= 2 * size, BICUBIC so the short side is ``size``,
    crop the centre (offsets floored)."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image -> ``[3, H, W]`` float32 in [-1, 1] (ToTensor, Normalize(0.5, 0.5))."""
    import torch
    array = np.asarray(image.convert('RGB'), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1


def save_atomic(tensors: Dict[str, torch.Tensor], path: str,
                metadata: Optional[Dict[str, str]] = None) -> None:
    """``safetensors.torch.save_file`` to ``path + '.tmp'``, then rename into place."""
    import safetensors.torch
    tmp = path + '.tmp'
    if metadata is None:  # the two-argument call (what a monkeypatched save_file may take)
        safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
    else:
        safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, tmp,
                                    metadata=metadata)
    os.replace(tmp, path)


def write_text_atomic(path: str, text: str) -> str:
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        f.write(text)
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------- formats
class FiTFormat:
    """FiT's latent folders (module docstring; read by ``flexgen.datasets.FiTLatents``).

    Args:
        out_dir: the dataset root to write.
        downsample: the autoencoder's pixels per latent cell (d).
        target_len: the token budget L (a square number: S = d * p * sqrt(L)).
        patch_size: p.
        dtype: the dtype ``feature`` is stored in (a torch dtype name).
    """

    name = 'fit'

    def __init__(self, out_dir: str, downsample: int, target_len: int = 256,
                 patch_size: int = 2, dtype: str = 'float32'):
        import torch

        from flexgen.datasets.fit_latents import IGNORED_FOLDER, fit_folders
        side = math.isqrt(target_len)
        if side * side != target_len or target_len < 16:
            raise ValueError(f'--target-len must be a square number >= 16 (FiT: 256 or 1024), '
                             f'got {target_len}')
        self.out_dir, self.patch_size, self.dtype = out_dir, patch_size, getattr(torch, dtype)
        self.target_len, self.multiple = target_len, downsample * patch_size
        self.image_size = self.multiple * side
        self.single, self.resize, self.crop = fit_folders(target_len)
        self.ignored = IGNORED_FOLDER
        self.folders = (self.single, self.resize, self.crop, IGNORED_FOLDER)
        for folder in self.folders:
            os.makedirs(osp.join(out_dir, folder), exist_ok=True)

    @classmethod
    def from_args(cls, args, downsample: int) -> 'FiTFormat':
        return cls(args.out_dir, downsample=downsample, target_len=args.target_len,
                   patch_size=2 if args.patch_size is None else args.patch_size,
                   dtype=args.dtype)

    def settings(self) -> dict:
        return dict(format=self.name, target_len=self.target_len, patch_size=self.patch_size,
                    image_size=self.image_size, dtype=str(self.dtype).replace('torch.', ''),
                    file_names=self.FILE_NAMES)

    FILE_NAMES = 'path under the image root, % as %25, / as %2F'

    @staticmethod
    def file_name(name: str) -> str:
        """The flat file name (without ``.safetensors``) of image ``name`` (its path under
        the image root, without extension): one-to-one, so no two images share a file."""
        return name.replace('%', '%25').replace('/', '%2F')

    def _path(self, folder: str, name: str) -> str:
        return osp.join(self.out_dir, folder, self.file_name(name) + '.safetensors')

    def pending(self, name: str) -> bool:
        """Whether image ``name`` still needs encoding (its last file is written last)."""
        done = (osp.exists(self._path(self.single, name))
                or osp.exists(self._path(self.ignored, name))
                or osp.exists(self._path(self.crop, name)))
        return not done

    def prepare(self, image: Image.Image) -> Dict[str, torch.Tensor]:
        """The pixel images to encode, keyed ``folder`` and ``folder/flipped``."""
        width, height = image.size
        new_w, new_h = fit_resize_size(width, height, self.image_size, self.multiple)
        if new_w == 0 or new_h == 0:
            raise ValueError(f'{width}x{height} px is too thin for FiT\'s resize rule (it '
                             f'floors to {new_w}x{new_h} at a multiple of {self.multiple})')
        resized = image if (new_w, new_h) == (width, height) else \
            image.resize((new_w, new_h), resample=Image.BICUBIC)
        views = {}
        if width * height > self.image_size ** 2:
            views[self.resize] = resized
            views[self.crop] = center_crop(image, self.image_size)
        elif (new_w // self.multiple) * (new_h // self.multiple) < 16:
            views[self.ignored] = resized
        else:
            views[self.single] = resized
        out = {}
        for folder, view in views.items():
            x = to_tensor(view)
            out[folder], out[folder + '/flipped'] = x, x.flip(-1)
        return out

    def write(self, name: str, label: int, latents: Dict[str, torch.Tensor],
              info: Optional[dict] = None) -> None:
        import torch

        from flexgen.datasets.fit_latents import raster_grid
        from flexgen.structures import patchify
        # The crop file last: pending() takes it as the sign that the image is complete.
        for folder in sorted((k for k in latents if '/' not in k), key=lambda k: k == self.crop):
            pair = patchify([latents[folder], latents[folder + '/flipped']], self.patch_size)
            h, w = pair.sizes[0].tolist()
            feature = pair.tokens.reshape(2, h, w, -1).to(self.dtype)
            save_atomic(dict(feature=feature, grid=raster_grid(h, w),
                             size=torch.tensor([h, w], dtype=torch.int64),
                             label=torch.tensor([label], dtype=torch.int64)),
                        self._path(folder, name))


def nit_resize_size(width: int, height: int, min_image_size: int, max_image_size: int
                    ) -> Tuple[int, int]:
    """NiT's ``native_resolution_resize`` size ``(W', H')`` of a ``width x height`` image
    (rule in the module docstring; ``min_image_size`` is a, ``max_image_size`` is S)."""
    a = min_image_size
    if width * height < max_image_size ** 2:
        return max(1, int(width / a)) * a, max(1, int(height / a)) * a
    new_w = np.sqrt(width / height) * max_image_size
    new_h = new_w * height / width
    return int(new_w / a) * a, int(new_h / a) * a


class NiTFormat:
    """NiT's latent folders and data-meta jsonl (module docstring; read by
    ``flexgen.datasets.NiTLatents``).

    Args:
        out_dir: the dataset root to write.
        downsample: the autoencoder's pixels per latent cell (d).
        types: ``'native-resolution'`` and / or ``'fixed-SxS'`` types.
        patch_size: p (NiT: 1); sizes are multiples of ``d * p``.
        min_image_size, max_image_size: a and S of the native rule (default ``d * p``, 2048).
        dtype: the dtype ``latent`` is stored in (a torch dtype name).
    """

    name = 'nit'
    NATIVE = 'native-resolution'

    def __init__(self, out_dir: str, downsample: int, types: Sequence[str] = (NATIVE,),
                 patch_size: int = 1, min_image_size: Optional[int] = None,
                 max_image_size: int = 2048, dtype: str = 'float32'):
        import torch
        self.out_dir, self.patch_size, self.dtype = out_dir, patch_size, getattr(torch, dtype)
        self.downsample, self.multiple = downsample, downsample * patch_size
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
        for t in self.types:
            os.makedirs(osp.join(out_dir, t), exist_ok=True)
        os.makedirs(osp.join(out_dir, 'data_meta'), exist_ok=True)

    @classmethod
    def from_args(cls, args, downsample: int) -> 'NiTFormat':
        return cls(args.out_dir, downsample=downsample, types=args.nit_types.split(','),
                   patch_size=1 if args.patch_size is None else args.patch_size,
                   min_image_size=args.min_image_size, max_image_size=args.max_image_size,
                   dtype=args.dtype)

    def settings(self) -> dict:
        return dict(format=self.name, types=list(self.types), patch_size=self.patch_size,
                    min_image_size=self.min_image_size, max_image_size=self.max_image_size,
                    dtype=str(self.dtype).replace('torch.', ''))

    def bind(self, items, image_root: str) -> None:
        self.rel = {name: osp.relpath(path, image_root).replace(os.sep, '/')
                    for path, _, name in items}

    def latent_file(self, name: str) -> str:
        """``<class folder>/<stem>.safetensors``: image ``name`` (its path under the root,
        without extension) with the extension of a latent file."""
        return name + '.safetensors'

    def _path(self, data_type: str, name: str) -> str:
        return osp.join(self.out_dir, data_type, *self.latent_file(name).split('/'))

    def pending(self, name: str) -> bool:
        return not all(osp.exists(self._path(t, name)) for t in self.types)

    def prepare(self, image: Image.Image) -> Dict[str, torch.Tensor]:
        """The pixel images to encode, keyed ``type`` and ``type/flipped``."""
        width, height = image.size
        out = {}
        for t in self.types:
            if t == self.NATIVE:
                size = nit_resize_size(width, height, self.min_image_size, self.max_image_size)
                if 0 in size:
                    raise ValueError(f'{width}x{height} px floors to {size[0]}x{size[1]} under '
                                     f"NiT's native rule")
                view = image if size == image.size else \
                    image.resize(size, resample=Image.BICUBIC)
            else:
                view = center_crop(image, self.fixed[t])
            x = to_tensor(view)
            out[t], out[t + '/flipped'] = x, x.flip(-1)
        return out

    def info(self, path: str, image: Image.Image) -> dict:
        return dict(ori_w=image.size[0], ori_h=image.size[1])

    def write(self, name: str, label: int, latents: Dict[str, torch.Tensor],
              info: Optional[dict] = None) -> None:
        import torch
        for t in self.types:  # pending() needs every type's file: order does not matter
            latent = torch.stack([latents[t], latents[t + '/flipped']]).to(self.dtype)
            h, w = latent.shape[-2:]
            line = dict(image_file=self.rel[name], latent_file=self.latent_file(name),
                        ori_w=int(info['ori_w']), ori_h=int(info['ori_h']),
                        latent_h=int(h), latent_w=int(w), image_h=int(h) * self.downsample,
                        image_w=int(w) * self.downsample, type=t, label=int(label))
            path = self._path(t, name)
            os.makedirs(osp.dirname(path), exist_ok=True)
            save_atomic(dict(latent=latent, label=torch.tensor(label, dtype=torch.int64)), path,
                        metadata={'nit_meta': json.dumps(line)})

    def _line(self, data_type: str, name: str) -> dict:
        from safetensors import safe_open
        path = self._path(data_type, name)
        with safe_open(path, framework='pt') as handle:
            meta = handle.metadata() or {}
        if 'nit_meta' not in meta:
            raise SystemExit(f'{path} has no nit_meta header (not written by this tool?)')
        return json.loads(meta['nit_meta'])

    def finish(self, items) -> Dict[str, str]:
        """Write the jsonl files from the files on disk; returns ``{type: jsonl path}``."""
        names = [name for _, _, name in items if not self.pending(name)]
        written, merged = {}, []
        for t in self.types:
            lines = [json.dumps(self._line(t, name)) + '\n' for name in names]
            written[t] = write_text_atomic(osp.join(self.out_dir, 'data_meta',
                                                    f'{t}_meta.jsonl'), ''.join(lines))
            merged += lines
        if len(self.types) > 1:
            written['merge'] = write_text_atomic(
                osp.join(self.out_dir, 'data_meta', 'merge_meta.jsonl'), ''.join(merged))
        return written


FORMATS = {FiTFormat.name: FiTFormat, NiTFormat.name: NiTFormat}


# ---------------------------------------------------------------------- the job
def list_images(root: str) -> Tuple[List[str], List[Tuple[str, int, str]]]:
    """``(classes, [(path, label, name)])`` of an ImageNet-style folder; ``name`` is the
    image's path under ``root`` without its extension, ``/``-separated (it names the output
    files), so two images in one folder that differ only in extension are refused."""
    if not osp.isdir(root):
        raise FileNotFoundError(f'image root {root!r} is not a directory')
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise FileNotFoundError(f'image root {root!r} has no class sub-folders')
    items, seen = [], {}
    for label, cls in enumerate(classes):
        for folder, _, files in sorted(os.walk(osp.join(root, cls))):
            for file in sorted(files):
                if not file.lower().endswith(IMG_EXTENSIONS):
                    continue
                path = osp.join(folder, file)
                name = osp.splitext(osp.relpath(path, root))[0].replace(os.sep, '/')
                if name in seen:
                    raise ValueError(f'{path!r} and {seen[name]!r} differ only in their '
                                     f'extension; the output files are named by the path '
                                     f'without it ({name!r}): rename one')
                seen[name] = path
                items.append((path, label, name))
    return classes, items


class _Images:
    """Loads and prepares the images to encode (a map-style dataset for the DataLoader's
    workers)."""

    def __init__(self, items, fmt):
        self.items, self.fmt = items, fmt

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, label, name = self.items[i]
        try:
            with Image.open(path) as image:
                image = image.convert('RGB')
                views = self.fmt.prepare(image)
                info = self.fmt.info(path, image) if hasattr(self.fmt, 'info') else None
        except (OSError, ValueError) as error:
            raise RuntimeError(f'cannot prepare image {path!r}: {error}') from error
        return name, label, views, info


def _check_meta(out_dir: str, meta: dict) -> None:
    path = osp.join(out_dir, 'meta.json')
    if osp.exists(path):
        with open(path) as f:
            old = json.load(f)
        changed = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
        if changed:
            raise SystemExit(f'{path} was written with other settings ({", ".join(changed)}: '
                             f'{[old.get(k) for k in changed]} there, '
                             f'{[meta.get(k) for k in changed]} now); use another OUT_DIR')
        return
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, path)


def parse_args(argv: Optional[Sequence[str]] = None):
    parser = argparse.ArgumentParser(description='Encode an image folder into latents')
    parser.add_argument('image_root', help='IMAGE_ROOT/<class>/<images>')
    parser.add_argument('out_dir', help='where the latents go (a rerun resumes there)')
    parser.add_argument('--vae', required=True, help='a local diffusers autoencoder directory')
    parser.add_argument('--vae-kind', default='AutoencoderKL',
                        help='the diffusers class of the autoencoder: AutoencoderKL (SD-VAE, '
                        'default) or AutoencoderDC (DC-AE)')
    parser.add_argument('--vae-subfolder', help="e.g. 'vae' inside a pipeline directory")
    parser.add_argument('--vae-dtype', default='float32', help='dtype the autoencoder runs in')
    parser.add_argument('--format', default='fit', choices=sorted(FORMATS),
                        help="the dataset layout: FiT's latent folders or NiT's (default: fit)")
    parser.add_argument('--target-len', type=int, default=256, help='FiT: tokens L (256, 1024)')
    parser.add_argument('--patch-size', type=int, help='the model patch size (FiT 2, NiT 1)')
    parser.add_argument('--nit-types', default=NiTFormat.NATIVE,
                        help="NiT: comma-separated 'native-resolution', 'fixed-SxS' types")
    parser.add_argument('--min-image-size', type=int,
                        help='NiT native rule: sides are multiples of it (default d * p)')
    parser.add_argument('--max-image-size', type=int, default=2048,
                        help='NiT native rule: larger images are scaled to this area')
    parser.add_argument('--dtype', default='float32', choices=('float32', 'float16', 'bfloat16'),
                        help='dtype of the stored latents')
    parser.add_argument('--batch-size', type=int, default=16, help='images per encoder call')
    parser.add_argument('--workers', type=int, default=min(4, usable_cpus()),
                        help='image loading processes (default: 4, or fewer on a machine with '
                        'fewer cores; 0 loads in the main process)')
    parser.add_argument('--device', help='torch device (default: cuda if available, else cpu)')
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the job; returns ``dict(total, skipped, written)`` (images)."""
    args = parse_args(argv)
    classes, items = list_images(args.image_root)
    import torch
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from flexgen.models.autoencoders import DiffusersAutoencoder
    if args.device is None:
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    autoencoder = DiffusersAutoencoder(args.vae, kind=args.vae_kind,
                                       subfolder=args.vae_subfolder, dtype=args.vae_dtype)
    autoencoder.to(args.device)
    fmt = FORMATS[args.format].from_args(args, autoencoder.downsample)
    if hasattr(fmt, 'bind'):
        fmt.bind(items, args.image_root)
    _check_meta(args.out_dir, dict(fmt.settings(), classes=classes,
                                   vae=osp.abspath(args.vae), vae_subfolder=args.vae_subfolder,
                                   scaling_factor=autoencoder.scaling_factor,
                                   shift_factor=autoencoder.shift_factor,
                                   downsample=autoencoder.downsample))
    todo = [item for item in items if fmt.pending(item[2])]
    stats = dict(total=len(items), skipped=len(items) - len(todo), written=0)
    loader = DataLoader(_Images(todo, fmt), batch_size=args.batch_size,
                        num_workers=args.workers, collate_fn=list)
    with tqdm(total=len(todo), desc=f'encoding ({stats["skipped"]} done before)',
              unit='img', file=sys.stderr) as bar:
        for batch in loader:
            keys = [(i, key) for i, (_, _, views, _) in enumerate(batch) for key in views]
            pixels = [batch[i][2][key].to(args.device) for i, key in keys]
            latents = [z.cpu() for z in autoencoder.encode(pixels)]
            per_image = [dict() for _ in batch]
            for (i, key), z in zip(keys, latents):
                per_image[i][key] = z
            for (name, label, _, info), encoded in zip(batch, per_image):
                fmt.write(name, label, encoded, info)
                stats['written'] += 1
                bar.update(1)
    if hasattr(fmt, 'finish'):
        fmt.finish(items)
    return stats


if __name__ == '__main__':
    result = main()
    print(f"{result['written']} images encoded, {result['skipped']} already done, "
          f"{result['total']} in all")

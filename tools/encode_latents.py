"""Encode an ImageNet-style image folder into pre-encoded latents (FiT's format).

    python tools/encode_latents.py IMAGE_ROOT OUT_DIR --vae DIR [--format fit] \
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
- one ``<image file stem>.safetensors`` per image and folder holding ``feature``
  ``[2, h, w, C*p*p]`` (the image's and its horizontal mirror's latent, each encoded, in
  patches of ``(c, p1, p2)`` order), ``grid`` ``[2, h*w]`` (column index, row index),
  ``size`` ``[2]`` = ``(h, w)`` tokens, ``label`` ``[1]``.

Resumable: an image whose files all exist is skipped, and every file is written to a
temporary name and renamed into place (``os.replace``), so an interrupted run leaves no
partial file under a final name. ``OUT_DIR/meta.json`` records the settings; a rerun with
different ones stops instead of mixing two encodings.

Adding a format (e.g. NiT's): a class with ``pending(name)``, ``prepare(image) -> {key:
pixels}`` (run in the loader workers) and ``write(name, label, {key: latent})``, listed in
``FORMATS``.
"""
import argparse
import json
import math
import os
import os.path as osp
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from flexgen.datasets.fit_latents import IGNORED_FOLDER, fit_folders, raster_grid
from flexgen.models.autoencoders import DiffusersAutoencoder
from flexgen.structures import patchify

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
    array = np.asarray(image.convert('RGB'), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1


def save_atomic(tensors: Dict[str, torch.Tensor], path: str) -> None:
    """``safetensors.torch.save_file`` to ``path + '.tmp'``, then rename into place."""
    tmp = path + '.tmp'
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)


# ---------------------------------------------------------------------- formats
class FiTFormat:
    """FiT's latent folders (module docstring; read by ``flexgen.datasets.FiTLatents``).

    Args:
        out_dir: the dataset root to write.
        downsample: the autoencoder's pixels per latent cell (d).
        target_len: the token budget L (a square number: S = d * p * sqrt(L)).
        patch_size: p.
        dtype: the dtype ``feature`` is stored in.
    """

    name = 'fit'

    def __init__(self, out_dir: str, downsample: int, target_len: int = 256,
                 patch_size: int = 2, dtype: torch.dtype = torch.float32):
        side = math.isqrt(target_len)
        if side * side != target_len or target_len < 16:
            raise ValueError(f'--target-len must be a square number >= 16 (FiT: 256 or 1024), '
                             f'got {target_len}')
        self.out_dir, self.patch_size, self.dtype = out_dir, patch_size, dtype
        self.target_len, self.multiple = target_len, downsample * patch_size
        self.image_size = self.multiple * side
        self.single, self.resize, self.crop = fit_folders(target_len)
        self.folders = (self.single, self.resize, self.crop, IGNORED_FOLDER)
        for folder in self.folders:
            os.makedirs(osp.join(out_dir, folder), exist_ok=True)

    def settings(self) -> dict:
        return dict(format=self.name, target_len=self.target_len, patch_size=self.patch_size,
                    image_size=self.image_size, dtype=str(self.dtype).replace('torch.', ''))

    def _path(self, folder: str, name: str) -> str:
        return osp.join(self.out_dir, folder, name + '.safetensors')

    def pending(self, name: str) -> bool:
        """Whether image ``name`` still needs encoding (its last file is written last)."""
        done = (osp.exists(self._path(self.single, name))
                or osp.exists(self._path(IGNORED_FOLDER, name))
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
            views[IGNORED_FOLDER] = resized
        else:
            views[self.single] = resized
        out = {}
        for folder, view in views.items():
            x = to_tensor(view)
            out[folder], out[folder + '/flipped'] = x, x.flip(-1)
        return out

    def write(self, name: str, label: int, latents: Dict[str, torch.Tensor]) -> None:
        # The crop file last: pending() takes it as the sign that the image is complete.
        for folder in sorted((k for k in latents if '/' not in k), key=lambda k: k == self.crop):
            pair = patchify([latents[folder], latents[folder + '/flipped']], self.patch_size)
            h, w = pair.sizes[0].tolist()
            feature = pair.tokens.reshape(2, h, w, -1).to(self.dtype)
            save_atomic(dict(feature=feature, grid=raster_grid(h, w),
                             size=torch.tensor([h, w], dtype=torch.int64),
                             label=torch.tensor([label], dtype=torch.int64)),
                        self._path(folder, name))


FORMATS = {FiTFormat.name: FiTFormat}


# ---------------------------------------------------------------------- the job
def list_images(root: str) -> Tuple[List[str], List[Tuple[str, int, str]]]:
    """``(classes, [(path, label, name)])`` of an ImageNet-style folder; ``name`` is the file
    stem, which must be unique over the whole tree (it names the output files)."""
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
                path, name = osp.join(folder, file), osp.splitext(file)[0]
                if name in seen:
                    raise ValueError(f'{path!r} and {seen[name]!r} have the same file stem '
                                     f'{name!r}, which names the output file; rename one')
                seen[name] = path
                items.append((path, label, name))
    return classes, items


class _Images(Dataset):
    """Loads and prepares the images to encode (in DataLoader workers)."""

    def __init__(self, items, fmt):
        self.items, self.fmt = items, fmt

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, label, name = self.items[i]
        try:
            with Image.open(path) as image:
                views = self.fmt.prepare(image.convert('RGB'))
        except (OSError, ValueError) as error:
            raise RuntimeError(f'cannot prepare image {path!r}: {error}') from error
        return name, label, views


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
    parser.add_argument('out_dir')
    parser.add_argument('--vae', required=True, help='a local diffusers autoencoder directory')
    parser.add_argument('--vae-kind', default='AutoencoderKL', choices=DiffusersAutoencoder.KINDS)
    parser.add_argument('--vae-subfolder', help="e.g. 'vae' inside a pipeline directory")
    parser.add_argument('--vae-dtype', default='float32', help='dtype the autoencoder runs in')
    parser.add_argument('--format', default='fit', choices=sorted(FORMATS))
    parser.add_argument('--target-len', type=int, default=256, help='FiT: tokens L (256, 1024)')
    parser.add_argument('--patch-size', type=int, default=2)
    parser.add_argument('--dtype', default='float32', choices=('float32', 'float16', 'bfloat16'),
                        help='dtype of the stored latents')
    parser.add_argument('--batch-size', type=int, default=16, help='images per encoder call')
    parser.add_argument('--workers', type=int, default=4, help='image loading processes')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the job; returns ``dict(total, skipped, written)`` (images)."""
    args = parse_args(argv)
    classes, items = list_images(args.image_root)
    autoencoder = DiffusersAutoencoder(args.vae, kind=args.vae_kind,
                                       subfolder=args.vae_subfolder, dtype=args.vae_dtype)
    autoencoder.to(args.device)
    fmt = FORMATS[args.format](args.out_dir, downsample=autoencoder.downsample,
                               target_len=args.target_len, patch_size=args.patch_size,
                               dtype=getattr(torch, args.dtype))
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
            keys = [(i, key) for i, (_, _, views) in enumerate(batch) for key in views]
            pixels = [batch[i][2][key].to(args.device) for i, key in keys]
            latents = [z.cpu() for z in autoencoder.encode(pixels)]
            per_image = [dict() for _ in batch]
            for (i, key), z in zip(keys, latents):
                per_image[i][key] = z
            for (name, label, _), encoded in zip(batch, per_image):
                fmt.write(name, label, encoded)
                stats['written'] += 1
                bar.update(1)
    return stats


if __name__ == '__main__':
    result = main()
    print(f"{result['written']} images encoded, {result['skipped']} already done, "
          f"{result['total']} in all")

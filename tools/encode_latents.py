"""Encode an ImageNet-style image folder into pre-encoded latents (FiT's or NiT's format).

    python tools/encode_latents.py IMAGE_ROOT OUT_DIR --vae DIR [--format fit|nit] \
        [--target-len 256] [--batch-size 32] [--workers 4] [--device cuda]

``IMAGE_ROOT/<class>/<images>``: classes are the sorted sub-folder names (label = position);
images are found recursively (.jpg .jpeg .png .webp .bmp, any case). ``--vae`` is a local
directory written by diffusers' ``save_pretrained`` (e.g. sd-vae-ft-ema), loaded through
``flexgen.models.autoencoders.DiffusersAutoencoder``: stored latents are
``(E(x) - shift) * scale`` with the posterior mean of a KL autoencoder.

``--format fit`` writes what ``flexgen.datasets.FiTLatents`` reads
(``flexgen.datasets.fit_latents.FiTLatentWriter``: FiT's resize rule, the folder split by
``--target-len`` tokens, one file per image and folder); ``--format nit`` what
``flexgen.datasets.NiTLatents`` reads (``flexgen.datasets.nit_latents.NiTLatentWriter``:
NiT's native-resolution rule and ``fixed-SxS`` centre crops for the types of
``--nit-types``, one file per image and type, and the data-meta jsonl files).

Resumable: an image whose files all exist is skipped, and every file is written to a
temporary name and renamed into place, so an interrupted run leaves no partial file under a
final name. ``OUT_DIR/meta.json`` records the settings; a rerun with different ones stops
instead of mixing two encodings. A new format is a ``flexgen.datasets.latent_writer.
LatentWriter`` (next to its dataset) and one entry of ``FORMATS``.
"""
import argparse
import json
import os.path as osp
import sys
from typing import Optional, Sequence

from flexgen.cli import usable_cpus

NIT_NATIVE = 'native-resolution'


def fit_writer(args, downsample: int):
    from flexgen.datasets.fit_latents import FiTLatentWriter
    return FiTLatentWriter(args.out_dir, downsample=downsample, target_len=args.target_len,
                           patch_size=2 if args.patch_size is None else args.patch_size,
                           dtype=args.dtype)


def nit_writer(args, downsample: int):
    from flexgen.datasets.nit_latents import NiTLatentWriter
    return NiTLatentWriter(args.out_dir, downsample=downsample,
                           types=args.nit_types.split(','),
                           patch_size=1 if args.patch_size is None else args.patch_size,
                           min_image_size=args.min_image_size,
                           max_image_size=args.max_image_size, dtype=args.dtype)


FORMATS = dict(fit=fit_writer, nit=nit_writer)


class _Images:
    """Loads and prepares the images to encode (a map-style dataset for the DataLoader's
    workers)."""

    def __init__(self, items, writer):
        self.items, self.writer = items, writer

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        from PIL import Image
        path, label, name = self.items[i]
        try:
            with Image.open(path) as image:
                image = image.convert('RGB')
                views = self.writer.prepare(image)
                info = self.writer.info(path, image)
        except (OSError, ValueError) as error:
            raise RuntimeError(f'cannot prepare image {path!r}: {error}') from error
        return name, label, views, info


def _check_meta(out_dir: str, meta: dict) -> None:
    """Refuse to mix two encodings in one folder: ``meta.json`` holds the first run's
    settings."""
    from flexgen.fileio import atomic_write
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
    atomic_write(json.dumps(meta, indent=1).encode(), path)


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
    parser.add_argument('--nit-types', default=NIT_NATIVE,
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
    from flexgen.datasets.latent_writer import list_images
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
    writer = FORMATS[args.format](args, autoencoder.downsample)
    writer.bind(items, args.image_root)
    _check_meta(args.out_dir, dict(writer.settings(), classes=classes,
                                   vae=osp.abspath(args.vae), vae_subfolder=args.vae_subfolder,
                                   scaling_factor=autoencoder.scaling_factor,
                                   shift_factor=autoencoder.shift_factor,
                                   downsample=autoencoder.downsample))
    todo = [item for item in items if writer.pending(item[2])]
    stats = dict(total=len(items), skipped=len(items) - len(todo), written=0)
    loader = DataLoader(_Images(todo, writer), batch_size=args.batch_size,
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
                writer.write(name, label, encoded, info)
                stats['written'] += 1
                bar.update(1)
    writer.finish(items)
    return stats


if __name__ == '__main__':
    result = main()
    print(f"{result['written']} images encoded, {result['skipped']} already done, "
          f"{result['total']} in all")

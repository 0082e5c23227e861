"""Pack a dataset into token budgets once (LPFHP) and write NiT's sampler-meta JSON.

    # from a NiT data-meta jsonl (tokens = latent_h * latent_w), as NiT's tools/pack_dataset.py
    python tools/pack_dataset.py --data-meta data_meta/x_merge_meta.jsonl --max-seq-len 16384
    # from a flexgen dataset config (tokens from dataset.get_size and --patch-size)
    python tools/pack_dataset.py --config configs/nit/x.py --max-seq-len 16384 --out packs.json
    # check a sampler-meta file (NiT's own, or ours) against its data: coverage, budget, fill
    python tools/pack_dataset.py --check sampler_meta/x_LPFHP_16384.json --data-meta ... \
        --max-seq-len 16384
    # efficiency of offline / online packing on a size histogram
    python tools/pack_dataset.py --report [--histogram tools/data/imagenet_like_latent_sizes.json]

Output (default for --data-meta): ``<data-meta dir>/../sampler_meta/<name>_LPFHP_<L>.json``, a
list of packs, each a list of 0-based data-meta line numbers = dataset indices: what
``OfflinePackSampler(meta_file=...)`` serves. Which images fill a pack's lengths is drawn
with ``--seed`` (default 0); ``--nit-order`` takes NiT's choice instead (the last unused
line of each length), which reproduces NiT's files but groups neighbouring lines (the same
class) in one pack.
"""
import argparse
import os.path as osp
import sys
import time

import numpy as np

HISTOGRAM = osp.join(osp.dirname(osp.abspath(__file__)), 'data',
                     'imagenet_like_latent_sizes.json')


def lengths_from_config(path: str, key: str, patch_size: int) -> np.ndarray:
    """Tokens of every index of the dataset at ``key`` of a flexgen config (``get_size``)."""
    from mmengine.config import Config

    from flexgen.datasets.packing.lengths import dataset_token_counts
    from flexgen.registry import DATASETS
    cfg = Config.fromfile(path)
    node = cfg
    for part in key.split('.'):
        if part not in node:
            raise KeyError(f'{path}: no {key!r} in the config (missing {part!r})')
        node = node[part]
    return dataset_token_counts(DATASETS.build(node), patch_size, f'{path}: {key}')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument('--data-meta', help='NiT data-meta jsonl (latent_h, latent_w per line)')
    source.add_argument('--config', help='flexgen config; the dataset at --dataset-key is built')
    parser.add_argument('--dataset-key', default='train_dataloader.dataset',
                        help='with --config: where the dataset is in the config')
    parser.add_argument('--patch-size', type=int, default=1,
                        help='tokens = (h // p) * (w // p) of the latent size')
    parser.add_argument('--max-seq-len', type=int, default=16384, help='token budget L')
    parser.add_argument('--max-per-pack', type=int, default=None,
                        help='most images in a pack (default: no limit, as NiT)')
    parser.add_argument('--split', type=int, default=1,
                        help='pack this many contiguous parts separately (NiT --split)')
    parser.add_argument('--seed', type=int, default=0,
                        help='draws which images of each length fill the packs')
    parser.add_argument('--nit-order', action='store_true',
                        help="NiT's assignment (last unused line per length) instead of --seed")
    parser.add_argument('--oversize', choices=['error', 'drop'], default='error',
                        help='images longer than --max-seq-len: stop (error, default) or '
                        'leave them out (drop)')
    parser.add_argument('--out', help='output JSON (default: NiT naming next to the data-meta)')
    parser.add_argument('--check', metavar='SAMPLER_META',
                        help='check this sampler-meta file instead of packing')
    parser.add_argument('--report', action='store_true',
                        help='print the packing efficiency of the offline, online and stream '
                        'packers on --histogram, per budget of --lengths (about a minute on '
                        'the default histogram; the table ends with a legend of its columns)')
    parser.add_argument('--histogram', default=HISTOGRAM, help='size histogram for --report')
    parser.add_argument('--kinds', nargs='+', help='histogram kinds to merge (default: all)')
    parser.add_argument('--lengths', nargs='+', type=int, default=[8192, 16384, 65536],
                        help='budgets for --report')
    parser.add_argument('--packs-per-step', type=int, default=1,
                        help='for --report: packs per global step of the online packer '
                        '(ranks x packs per rank)')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from flexgen.datasets.packing.lengths import (data_meta_lengths, find_oversize,
                                                  length_histogram)
    from flexgen.datasets.packing.lpfhp import pack_offline
    from flexgen.datasets.packing.report import packing_report
    from flexgen.datasets.packing.sampler_meta import (check_sampler_meta, sampler_meta_path,
                                                       save_sampler_meta)
    if args.report:
        packing_report(args.histogram, args.lengths, args.kinds,
                       packs_per_step=args.packs_per_step)
        return 0
    if args.data_meta:
        lengths, source = data_meta_lengths(args.data_meta, args.patch_size), args.data_meta
    elif args.config:
        lengths = lengths_from_config(args.config, args.dataset_key, args.patch_size)
        source = f'{args.config}:{args.dataset_key}'
    else:
        raise SystemExit('pack_dataset.py: give --data-meta or --config (or --report)')
    if args.check:
        for key, value in check_sampler_meta(args.check, lengths, args.max_seq_len).items():
            print(f'{key}: {value:.4%}' if key == 'efficiency' else f'{key}: {value}')
        return 0
    over = find_oversize(lengths, args.max_seq_len, args.oversize, source,
                         budget=f'--max-seq-len {args.max_seq_len}',
                         remedy='use --oversize drop to leave them out')
    if len(over):
        print(f'left out {len(over)} images over {args.max_seq_len} tokens (e.g. index '
              f'{over[0]})')
    kept = np.flatnonzero((lengths > 0) & (lengths <= args.max_seq_len))
    start = time.time()
    packs = pack_offline(lengths, args.max_seq_len, args.max_per_pack,
                         None if args.nit_order else args.seed, args.split, indices=kept)
    out = args.out or (sampler_meta_path(args.data_meta, args.max_seq_len) if args.data_meta
                       else None)
    if out is None:
        raise SystemExit('pack_dataset.py: --out is needed with --config')
    save_sampler_meta(packs, out)
    used = sum(int(lengths[p].sum()) for p in packs)
    print(f'{source}: {sum(map(len, packs))} images, {len(length_histogram(lengths[kept]))}'
          f' distinct lengths -> {len(packs)} packs of {args.max_seq_len} tokens, '
          f'{used / (len(packs) * args.max_seq_len):.4%} full ({time.time() - start:.1f} s); '
          f'wrote {out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())

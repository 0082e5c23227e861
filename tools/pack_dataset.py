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
import json
import os.path as osp
import sys
import time

import numpy as np

HISTOGRAM = osp.join(osp.dirname(osp.abspath(__file__)), 'data',
                     'imagenet_like_latent_sizes.json')


def read_data_meta(path: str, patch_size: int = 1) -> np.ndarray:
    """Tokens of every line of a NiT data-meta jsonl: ``(latent_h // p) * (latent_w // p)``."""
    from flexgen.datasets.packing import token_counts
    if not osp.isfile(path):
        raise FileNotFoundError(f'data-meta file not found: {path}')
    sizes = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f'{path}:{number}: not a JSON object ({error})') from None
            for key in ('latent_h', 'latent_w'):
                if not isinstance(item, dict) or not isinstance(item.get(key), int):
                    raise ValueError(f'{path}:{number}: field {key!r} must be an int, got '
                                     f'{item.get(key) if isinstance(item, dict) else item!r}')
            sizes.append((item['latent_h'], item['latent_w']))
    if not sizes:
        raise ValueError(f'{path}: no entries')
    return token_counts(sizes, patch_size)


def lengths_from_config(path: str, key: str, patch_size: int) -> np.ndarray:
    """Tokens of every index of the dataset at ``key`` of a flexgen config (``get_size``)."""
    from mmengine.config import Config

    from flexgen.datasets.packing import token_counts
    from flexgen.registry import DATASETS
    cfg = Config.fromfile(path)
    node = cfg
    for part in key.split('.'):
        if part not in node:
            raise KeyError(f'{path}: no {key!r} in the config (missing {part!r})')
        node = node[part]
    dataset = DATASETS.build(node)
    if not hasattr(dataset, 'get_size'):
        raise TypeError(f'{path}: {key} builds {type(dataset).__name__}, which has no '
                        'get_size(index)')
    return token_counts([dataset.get_size(i) for i in range(len(dataset))], patch_size)


def default_output(data_meta: str, max_len: int) -> str:
    """NiT's naming: data_meta/<name>_meta.jsonl -> sampler_meta/<name>_LPFHP_<L>.json."""
    name = osp.basename(data_meta)
    for suffix in ('_meta.jsonl', '.jsonl'):
        if name.endswith(suffix):
            name = name[:-len(suffix)]
            break
    root = osp.dirname(osp.dirname(osp.abspath(data_meta)))
    return osp.join(root, 'sampler_meta', f'{name}_LPFHP_{max_len}.json')


def handle_oversize(lengths: np.ndarray, max_len: int, policy: str, source: str) -> np.ndarray:
    """Lengths with the oversize ones set to 0 (left out) under 'drop'; an error under
    'error'."""
    over = np.flatnonzero(lengths > max_len)
    if len(over) and policy == 'error':
        raise ValueError(f'{source}: index {over[0]} has {lengths[over[0]]} tokens, more than '
                         f'--max-seq-len {max_len} ({len(over)} of {len(lengths)} images); '
                         'use --oversize drop to leave them out')
    if len(over):
        print(f'left out {len(over)} images over {max_len} tokens (e.g. index {over[0]})')
        lengths = lengths.copy()
        lengths[over] = 0
    return lengths


def pack(lengths: np.ndarray, max_len: int, max_per_pack=None, seed=0, split: int = 1):
    """LPFHP packs of indices, leaving out images of length 0 (dropped as oversize)."""
    from flexgen.datasets.packing import pack_offline
    kept = np.flatnonzero(lengths > 0)
    if len(kept) == len(lengths):
        return pack_offline(lengths, max_len, max_per_pack, seed, split)
    packs = pack_offline(lengths[kept], max_len, max_per_pack, seed, split)
    return [[int(kept[i]) for i in p] for p in packs]


def check(meta_file: str, lengths: np.ndarray, max_len) -> dict:
    """Coverage, duplicates, budget and fill of a sampler-meta file against ``lengths``."""
    from flexgen.datasets.packing import load_sampler_meta
    packs = load_sampler_meta(meta_file)
    flat = np.fromiter((i for p in packs for i in p), np.int64)
    if flat.max() >= len(lengths):
        raise ValueError(f'{meta_file}: index {flat.max()} is beyond the {len(lengths)} images')
    loads = np.array([lengths[p].sum() for p in packs])
    result = dict(packs=len(packs), images=len(flat), unique=len(np.unique(flat)),
                  dataset=len(lengths), tokens=int(loads.sum()), largest_pack=int(loads.max()))
    if max_len:
        result.update(max_len=max_len, over_budget=int((loads > max_len).sum()),
                      efficiency=float(loads.sum() / (len(packs) * max_len)))
    return result


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
    from flexgen.datasets.packing import length_histogram, packing_report, save_sampler_meta
    if args.report:
        packing_report(args.histogram, args.lengths, args.kinds,
                       packs_per_step=args.packs_per_step)
        return 0
    if args.data_meta:
        lengths, source = read_data_meta(args.data_meta, args.patch_size), args.data_meta
    elif args.config:
        lengths = lengths_from_config(args.config, args.dataset_key, args.patch_size)
        source = f'{args.config}:{args.dataset_key}'
    else:
        raise SystemExit('pack_dataset.py: give --data-meta or --config (or --report)')
    if args.check:
        for key, value in check(args.check, lengths, args.max_seq_len).items():
            print(f'{key}: {value:.4%}' if key == 'efficiency' else f'{key}: {value}')
        return 0
    lengths = handle_oversize(lengths, args.max_seq_len, args.oversize, source)
    start = time.time()
    packs = pack(lengths, args.max_seq_len, args.max_per_pack,
                 None if args.nit_order else args.seed, args.split)
    out = args.out or (default_output(args.data_meta, args.max_seq_len) if args.data_meta
                       else None)
    if out is None:
        raise SystemExit('pack_dataset.py: --out is needed with --config')
    save_sampler_meta(packs, out)
    used = sum(int(lengths[p].sum()) for p in packs)
    print(f'{source}: {sum(map(len, packs))} images, {len(length_histogram(lengths[lengths > 0]))}'
          f' distinct lengths -> {len(packs)} packs of {args.max_seq_len} tokens, '
          f'{used / (len(packs) * args.max_seq_len):.4%} full ({time.time() - start:.1f} s); '
          f'wrote {out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())

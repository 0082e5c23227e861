"""Consolidate a sharded training checkpoint into one safetensors file of full weights.

    python tools/consolidate_checkpoint.py work_dirs/fitv2_3b_2/iter_400000.pth \
        fitv2_3b_ema.safetensors [--weights ema|model] [--dtype bfloat16]

The input is the directory a sharded run writes (FullyShardedWrapper; every rank's shards,
any world size). The output holds the generator's full weights under its own keys
(``backbone.*``): the EMA (default) or the trained weights. ``tools/sample.py``,
``tools/test.py`` and ``flexgen.apis.init_generator`` read it like any weights file. Runs
in one process, no GPU or process group needed; it reads only JSON headers and tensor
bytes (no pickle), and writes the file atomically.
"""
import argparse
import os.path as osp

DTYPES = ('bfloat16', 'float16', 'float32')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Sharded checkpoint -> one safetensors file')
    parser.add_argument('checkpoint', help='a sharded checkpoint directory (iter_N.pth/)')
    parser.add_argument('out', help='the .safetensors file to write')
    parser.add_argument('--weights', choices=['ema', 'model'], default='ema',
                        help='the exponential moving average (default) or the trained weights')
    parser.add_argument('--dtype', choices=DTYPES,
                        help='cast floating-point tensors (default: as stored, float32)')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if not args.out.endswith('.safetensors'):
        raise ValueError(f'{args.out}: the output is a safetensors file; name it *.safetensors')
    import torch
    from safetensors.torch import save_file

    from flexgen.engine.sharded_checkpoint import consolidate, read_train_state
    from flexgen.fileio import atomic_path
    dtype = getattr(torch, args.dtype) if args.dtype else None
    tensors = consolidate(args.checkpoint, args.weights, dtype)
    meta = read_train_state(args.checkpoint).get('meta', {})
    header = dict(format='pt', weights=args.weights, source=osp.abspath(args.checkpoint),
                  iter=str(meta.get('iter', '')))
    with atomic_path(args.out) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=header)
    count = sum(v.numel() for v in tensors.values())
    print(f'{args.out}: {len(tensors)} tensors, {count:,} values ({args.weights} weights of '
          f'{args.checkpoint}, iteration {header["iter"]})')
    return tensors


if __name__ == '__main__':
    main()

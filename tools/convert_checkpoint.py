"""Convert an official reference checkpoint to flexgen weights (safetensors).

    python tools/convert_checkpoint.py --from dit DiT-XL-2-256x256.pt dit_xl_2_256.safetensors
    python tools/convert_checkpoint.py --from sit SiT-XL-2-256.pt sit_xl_2.safetensors

``--from`` names a registered checkpoint converter (any case: dit, sit, fitv1, ...). The
source is read with safetensors or ``torch.load(weights_only=True)`` (no pickled code
runs); a training checkpoint gives its EMA weights unless ``--no-ema``. The output holds
the generator's weights (``backbone.*`` keys), loadable by ``tools/sample.py`` /
``flexgen.apis.init_generator`` with the matching config; its metadata records the
converter and the backbone settings the weights need. It is written to a temporary file
and renamed into place, so an interrupted run never leaves a partial file under DST.
"""
import argparse
import json
import os.path as osp
import sys


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Convert an official checkpoint to flexgen')
    parser.add_argument('--from', dest='source_kind', required=True, metavar='NAME',
                        help='a registered checkpoint converter, any case: dit, sit, fitv1, '
                        'fitv2, nit, or your own (a wrong name lists the registered ones)')
    parser.add_argument('src', help='reference checkpoint (.pt, .pth, .bin, .safetensors)')
    parser.add_argument('dst', help='output .safetensors file')
    parser.add_argument('--no-ema', action='store_true',
                        help="take a training checkpoint's raw 'model' weights, not 'ema'")
    parser.add_argument('--num-heads', type=int,
                        help='attention heads, for a width the converter does not know')
    return parser.parse_args(argv)


def convert(source_kind: str, src: str, dst: str, use_ema: bool = True,
            num_heads: int = None):
    """Convert ``src`` with the converter ``source_kind`` and write ``dst``; returns the
    ``ConvertedCheckpoint``."""
    from safetensors.torch import save_file

    from flexgen.apis.official import build_converter, converter_names, read_checkpoint
    from flexgen.fileio import atomic_path
    if not dst.endswith('.safetensors'):
        raise ValueError(f'output {dst!r} must end in .safetensors')
    cfg = dict(type=source_kind)
    if num_heads is not None:
        cfg['num_heads'] = num_heads
    try:
        converter = build_converter(cfg)
    except KeyError as error:
        raise SystemExit(f'--from {source_kind}: no such converter; registered: '
                         f'{", ".join(n.lower() for n in converter_names())}') from error
    converted = converter(read_checkpoint(src), use_ema=use_ema)
    tensors = {f'backbone.{k}': v.contiguous() for k, v in converted.state_dict.items()}
    metadata = dict(format='flexgen', converter=type(converter).__name__,
                    source=osp.basename(src), backbone=json.dumps(converted.backbone),
                    info=json.dumps(converted.info))
    with atomic_path(dst) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    return converted


def main(argv=None):
    args = parse_args(argv)
    converted = convert(args.source_kind, args.src, args.dst, not args.no_ema, args.num_heads)
    count = sum(v.numel() for v in converted.state_dict.values())
    print(f'wrote {args.dst}: {len(converted.state_dict)} tensors, {count:,} parameters')
    print('the config\'s model.backbone must hold: ' + json.dumps(converted.backbone))
    if converted.info:
        print('source: ' + json.dumps(converted.info))


if __name__ == '__main__':
    sys.exit(main())

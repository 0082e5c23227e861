"""Generate a PNG grid of samples from a trained generator.

    python tools/sample.py CONFIG CHECKPOINT --classes 0 1 2 --height 16 24 --width 24 16 \
        --steps 50 --cfg-scale 2.0 --out samples.png

Every class is generated at every (height, width) pair (heights and widths are zipped; a
single value is repeated), all sizes in one jagged batch. One grid row per size.

RoPE models take any extrapolation rule at sampling time, e.g. FiT's
``--interpolation yarn --decouple --ori-max-pe-len 16`` (``no`` = plain extrapolation).

CHECKPOINT may also be an official reference checkpoint (e.g. DiT-XL-2-256x256.pt): it is
recognised by its keys and converted on the fly (``flexgen.apis.official.load_official``;
``--converter`` names the converter when the config alone cannot tell).
"""
import argparse

import torch
from mmengine.config import DictAction
from tqdm import tqdm

from flexgen.apis import image_grid, init_generator, save_png
from flexgen.apis.official import is_official_checkpoint, load_official


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Sample a class-conditional generator')
    parser.add_argument('config')
    parser.add_argument('checkpoint', help='training checkpoint (.pth), weights (.safetensors) '
                        'or an official reference checkpoint (converted on the fly)')
    parser.add_argument('--converter', help='converter of an official checkpoint (dit, sit, '
                        '...); default: the one the checkpoint and the config agree on')
    parser.add_argument('--classes', type=int, nargs='+', default=[0])
    parser.add_argument('--height', type=int, nargs='+', required=True, help='pixels')
    parser.add_argument('--width', type=int, nargs='+', required=True, help='pixels')
    parser.add_argument('--steps', type=int, help='sampling steps (overrides the config)')
    parser.add_argument('--cfg-scale', type=float, help='classifier-free guidance scale')
    parser.add_argument('--cfg-interval', type=float, nargs=2, metavar=('LOW', 'HIGH'))
    parser.add_argument('--interpolation', metavar='RULE',
                        help='RoPE extrapolation rule: a registered rule (YaRN, NTKAware, ...) '
                        'or a reference name (no, linear, dynntk, partntk, yarn, ntkpro1, '
                        'ntkpro2, scale1, scale2)')
    parser.add_argument('--decouple', action='store_true',
                        help='one RoPE scale per axis (height, width)')
    parser.add_argument('--ori-max-pe-len', type=int,
                        help='the training grid side in tokens the rule scales from')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--no-ema', action='store_true', help='use the raw, not EMA, weights')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--out', default='samples.png')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    return parser.parse_args(argv)


def build_model(args):
    """The config's generator with the checkpoint's weights; an official reference
    checkpoint is converted on the fly."""
    if is_official_checkpoint(args.checkpoint):
        return load_official(args.config, args.checkpoint, args.converter, args.device,
                             use_ema=not args.no_ema, cfg_options=args.cfg_options)
    if args.converter:
        raise SystemExit(f'--converter {args.converter}: {args.checkpoint} is not an official '
                         'checkpoint that converter recognises')
    return init_generator(args.config, args.checkpoint, args.device, not args.no_ema,
                          args.cfg_options)


def set_rope_rule(model, args):
    """Apply ``--interpolation / --decouple / --ori-max-pe-len`` to the backbone's RoPE."""
    if args.interpolation is None:
        if args.decouple or args.ori_max_pe_len is not None:
            raise SystemExit('--decouple / --ori-max-pe-len need --interpolation RULE')
        return
    rope = getattr(model.backbone, 'rope', None)
    if rope is None or not hasattr(rope, 'set_rule'):
        raise SystemExit(f'--interpolation {args.interpolation}: the config\'s backbone has no '
                         'RoPE (model.backbone.rope) to extrapolate')
    rule = dict(type=args.interpolation, decouple=args.decouple)
    if args.ori_max_pe_len is not None:
        rule['ori_max_pe_len'] = args.ori_max_pe_len
    try:
        rope.set_rule(rule)
    except (KeyError, TypeError, ValueError) as error:
        raise SystemExit(f'--interpolation {args.interpolation}: {error}') from error


def main(argv=None):
    args = parse_args(argv)
    heights, widths = args.height, args.width
    if len(heights) == 1:
        heights = heights * len(widths)
    if len(widths) == 1:
        widths = widths * len(heights)
    if len(heights) != len(widths):
        raise SystemExit(f'--height has {len(heights)} values and --width {len(widths)}: '
                         'give one of each per size, or a single value to repeat')
    model = build_model(args)
    set_rope_rule(model, args)
    if args.steps:
        # Keep the sampler's own type for it (DDPM respacing takes a string, e.g. '250').
        current = getattr(model.sampler, 'num_steps', None)
        model.sampler.num_steps = str(args.steps) if isinstance(current, str) else args.steps
    guidance = model.guidance
    if args.cfg_scale is not None or args.cfg_interval is not None:
        guidance = dict(type='ClassifierFreeGuidance',
                        scale=args.cfg_scale if args.cfg_scale is not None else
                        getattr(guidance, 'scale', 1.0),
                        interval=args.cfg_interval or getattr(guidance, 'interval', (0, 1)),
                        channels=getattr(guidance, 'channels', None))
    sizes = [(h, w) for h, w in zip(heights, widths) for _ in args.classes]
    labels = [c for _ in heights for c in args.classes]
    seeds = [args.seed * 1_000_003 + i for i in range(len(labels))]
    total = getattr(model.sampler, 'num_steps', None)
    total = int(total) if str(total).isdigit() else None  # adaptive samplers: unknown
    with tqdm(total=total, desc=f'sampling {len(labels)} images') as bar:
        images = model.generate(labels, sizes, seeds, guidance=guidance,
                                callback=lambda i, x: bar.update(1))
    images = [((im.float().cpu() + 1) / 2).clamp(0, 1) for im in images]
    save_png(image_grid(images, ncols=len(args.classes)), args.out)
    print(f'wrote {len(images)} samples ({len(heights)} sizes x {len(args.classes)} classes) '
          f'to {args.out}')


if __name__ == '__main__':
    main()

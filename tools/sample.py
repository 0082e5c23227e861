"""Generate samples from a trained generator: a PNG grid and / or one PNG per image.

    python tools/sample.py CONFIG CHECKPOINT --classes 0 1 2 --height 16 24 --width 24 16 \
        --steps 50 --cfg-scale 2.0 --out samples.png [--out-dir samples/] [--batch-size 8]

Every class is generated at every (height, width) pair (heights and widths are zipped; a
single value is repeated). The grid has one row per size and one column per class;
``--out-dir`` writes every image as ``class<C>_<H>x<W>_seed<S>.png``, where S is the image's
own seed (``--seed * 1000003 + its position in the grid``). Each image's noise comes from its
own seed alone, so ``--batch-size`` (images per generation call, sizes mixed in one jagged
batch) changes speed and memory, not the images.

The request is checked against the config before the model loads: class ids against
``model.backbone.num_classes``, sizes against the autoencoder's downsampling times the
patch size.

RoPE models take any extrapolation rule at sampling time, e.g. FiT's
``--interpolation yarn --decouple --ori-max-pe-len 16`` (``no`` = plain extrapolation).

CHECKPOINT may also be an official reference checkpoint (e.g. DiT-XL-2-256x256.pt): it is
recognised by its keys and converted on the fly (``flexgen.apis.official.load_official``;
``--converter`` names the converter when the config alone cannot tell).
"""
import argparse
import json
import os
import os.path as osp

from flexgen.cli import add_cfg_options

SEED_STRIDE = 1_000_003  # image i of a run with --seed S draws from seed S * SEED_STRIDE + i


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be a positive integer, got {value}')
    return value


def class_id(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f'class ids are >= 0, got {value}')
    return value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Sample a class-conditional generator: a PNG grid (one row per size, '
        'one column per class) and / or one PNG per image.')
    parser.add_argument('config', help='the config the checkpoint was trained with')
    parser.add_argument('checkpoint', help='training checkpoint (.pth), weights (.safetensors) '
                        'or an official reference checkpoint (converted on the fly)')
    parser.add_argument('--converter', help='converter of an official checkpoint (dit, sit, '
                        '...); default: the one the checkpoint and the config agree on')
    parser.add_argument('--classes', type=class_id, nargs='+', default=[0], metavar='ID',
                        help='class ids to generate, each at every size (default: 0); repeat '
                        'an id for several samples of it')
    parser.add_argument('--height', type=positive_int, nargs='+', required=True, metavar='PX',
                        help='image heights in pixels (zipped with --width)')
    parser.add_argument('--width', type=positive_int, nargs='+', required=True, metavar='PX',
                        help='image widths in pixels (zipped with --height)')
    parser.add_argument('--steps', type=positive_int,
                        help="sampling steps (default: the config's sampler's)")
    parser.add_argument('--cfg-scale', type=float, metavar='S',
                        help="classifier-free guidance scale (1 = no guidance; default: the "
                        "config's)")
    parser.add_argument('--cfg-interval', type=float, nargs=2, metavar=('LOW', 'HIGH'),
                        help='apply guidance only for LOW <= t <= HIGH (t = 0 data, t = 1 '
                        "noise; default: the config's, else 0 1)")
    parser.add_argument('--interpolation', metavar='RULE',
                        help='RoPE extrapolation rule: a registered rule (YaRN, NTKAware, ...) '
                        'or a reference name (no, linear, dynntk, partntk, yarn, ntkpro1, '
                        'ntkpro2, scale1, scale2)')
    parser.add_argument('--decouple', action='store_true',
                        help='one RoPE scale per axis (height, width)')
    parser.add_argument('--ori-max-pe-len', type=int,
                        help='the training grid side in tokens the rule scales from')
    parser.add_argument('--seed', type=int, default=0,
                        help=f'seed of the run (default 0); image i draws its noise from '
                        f'seed * {SEED_STRIDE} + i')
    parser.add_argument('--no-ema', action='store_true', help='use the raw, not EMA, weights')
    parser.add_argument('--device', help='torch device, e.g. cpu, cuda, cuda:1 (default: cuda '
                        'if available, else cpu)')
    parser.add_argument('--batch-size', type=positive_int, metavar='N',
                        help='images per generation call (default: all at once); the images '
                        'do not depend on it')
    parser.add_argument('--out', help='the grid PNG (default: samples.png unless --out-dir '
                        'is given)')
    parser.add_argument('--out-dir', help='also write one PNG per image here, named '
                        'class<C>_<H>x<W>_seed<S>.png')
    add_cfg_options(parser, 'model.sampler.num_steps=64')
    args = parser.parse_args(argv)
    if args.out is None and args.out_dir is None:
        args.out = 'samples.png'
    return args


def requested_sizes(args):
    """``[(height, width)]`` from the zipped ``--height`` / ``--width``."""
    heights, widths = args.height, args.width
    if len(heights) == 1:
        heights = heights * len(widths)
    if len(widths) == 1:
        widths = widths * len(heights)
    if len(heights) != len(widths):
        raise SystemExit(f'--height has {len(heights)} values and --width {len(widths)}: '
                         'give one of each per size, or a single value to repeat')
    return list(zip(heights, widths))


def autoencoder_downsample(cfg: dict):
    """Pixels per latent pixel of the config's autoencoder, read without building it (for a
    diffusers autoencoder: from its config.json, locally or in the Hugging Face cache; the
    same rule as ``DiffusersAutoencoder.downsample``); None when it cannot tell."""
    kind = cfg.get('type')
    if kind == 'IdentityAutoencoder':
        return 1
    if kind != 'DiffusersAutoencoder':
        return None
    if cfg.get('downsample') is not None:
        return cfg['downsample']
    path, subfolder = os.fspath(cfg.get('path', '')), cfg.get('subfolder')
    if osp.isdir(path):
        config_file = osp.join(path, subfolder or '', 'config.json')
    else:
        try:
            from huggingface_hub import try_to_load_from_cache
            config_file = try_to_load_from_cache(path, 'config.json', subfolder=subfolder)
        except Exception:  # not a Hub id, or no cache: the model's own check applies later
            return None
    if not isinstance(config_file, str) or not osp.isfile(config_file):
        return None
    with open(config_file) as f:
        config = json.load(f)
    from flexgen.models.autoencoders import diffusers_downsample
    try:
        return diffusers_downsample(cfg.get('kind', 'AutoencoderKL'), config)
    except (KeyError, TypeError):  # not a config the rule knows: the model checks later
        return None


def load_config(args):
    """The config with ``--cfg-options`` merged (read without importing torch)."""
    from mmengine.config import Config
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    return cfg


def check_request(args, sizes, cfg):
    """Refuse, before anything loads, a request the config's model cannot generate."""
    model = cfg.get('model', {})
    backbone = model.get('backbone', {})
    num_classes = backbone.get('num_classes')
    if isinstance(num_classes, int):
        bad = [c for c in args.classes if c >= num_classes]
        if bad:
            raise SystemExit(f'--classes {" ".join(map(str, bad))}: the config\'s model has '
                             f'{num_classes} classes (model.backbone.num_classes), ids 0 to '
                             f'{num_classes - 1}')
    patch = backbone.get('patch_size')
    downsample = autoencoder_downsample(model.get('autoencoder') or {})
    if isinstance(patch, int) and downsample is not None:
        step = downsample * patch
        for flag, values in (('--height', [h for h, _ in sizes]),
                             ('--width', [w for _, w in sizes])):
            bad = [v for v in values if v % step]
            if bad:
                v = bad[0]
                nearby = sorted({max(step, v // step * step), (v // step + 1) * step})
                raise SystemExit(
                    f'{flag} {v}: sizes must be multiples of {step} pixels (the autoencoder\'s '
                    f'downsampling {downsample} x the patch size {patch}), e.g. '
                    f'{" or ".join(map(str, nearby))}')
    if args.cfg_interval is not None:
        low, high = args.cfg_interval
        if not 0 <= low <= high <= 1:
            raise SystemExit(f'--cfg-interval {low:g} {high:g}: needs 0 <= LOW <= HIGH <= 1')


def build_model(args, cfg=None):
    """The generator of ``cfg`` (default: :func:`load_config`) with the checkpoint's
    weights; an official reference checkpoint is converted on the fly."""
    from flexgen.apis import init_generator
    from flexgen.apis.official import is_official_checkpoint, load_official
    cfg = load_config(args) if cfg is None else cfg
    if is_official_checkpoint(args.checkpoint):
        return load_official(cfg, args.checkpoint, args.converter, args.device,
                             use_ema=not args.no_ema)
    if args.converter:
        raise SystemExit(f'--converter {args.converter}: {args.checkpoint} is not an official '
                         'checkpoint that converter recognises')
    return init_generator(cfg, args.checkpoint, args.device, not args.no_ema)


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


def image_name(label: int, size, seed: int) -> str:
    return f'class{label}_{size[0]}x{size[1]}_seed{seed}.png'


def main(argv=None):
    args = parse_args(argv)
    sizes = requested_sizes(args)
    cfg = load_config(args)
    check_request(args, sizes, cfg)

    import torch
    from tqdm import tqdm

    from flexgen.apis import image_grid, save_png
    from flexgen.engine.generation_loop import apply_generation_options
    if args.device is None:
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    # The guidance flags ask for classifier-free guidance, whatever the config's is.
    apply_generation_options(cfg, cfg_scale=args.cfg_scale, cfg_interval=args.cfg_interval,
                             steps=args.steps, guidance_type='ClassifierFreeGuidance')
    model = build_model(args, cfg)
    set_rope_rule(model, args)
    requests = [(label, size, args.seed * SEED_STRIDE + i) for i, (size, label) in
                enumerate((size, label) for size in sizes for label in args.classes)]
    batch_size = args.batch_size or len(requests)
    batches = [requests[i:i + batch_size] for i in range(0, len(requests), batch_size)]
    steps = getattr(model.sampler, 'num_steps', None)
    steps = int(steps) if str(steps).isdigit() else None  # adaptive samplers: unknown
    if args.out_dir is not None:
        os.makedirs(args.out_dir, exist_ok=True)
    images = []
    with tqdm(total=steps and steps * len(batches),
              desc=f'sampling {len(requests)} images in {len(batches)} '
              f'batch{"es" if len(batches) > 1 else ""}') as bar:
        for batch in batches:
            labels, batch_sizes, seeds = map(list, zip(*batch))
            generated = model.generate(labels, batch_sizes, seeds,
                                       callback=lambda i, x: bar.update(1))
            for image, (label, size, seed) in zip(generated, batch):
                image = ((image.float().cpu() + 1) / 2).clamp(0, 1)
                images.append(image)
                if args.out_dir is not None:
                    save_png(image, osp.join(args.out_dir, image_name(label, size, seed)))
    where = []
    if args.out is not None:
        save_png(image_grid(images, ncols=len(args.classes)), args.out)
        where.append(f'{args.out} (grid)')
    if args.out_dir is not None:
        where.append(f'{args.out_dir}/ (one PNG per image)')
    print(f'wrote {len(images)} samples ({len(sizes)} sizes x {len(args.classes)} classes) '
          f'to {" and ".join(where)}')


if __name__ == '__main__':
    main()

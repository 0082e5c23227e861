"""GPU memory per GPU of a training recipe, and what to switch on to fit it.

    python tools/memory_plan.py CONFIG [CONFIG ...] --gpus 8 --gpu-memory 80 [--amp]
        [--tokens-per-gpu N] [--usable 0.9] [--markdown]

For each config: parameters (built on the meta device), activations per token per block
(one block at the real width run on a few tokens of the CPU, saved tensors counted) and,
per setup (as configured; + fused AdamW and gradient_as_bucket_view; + activation
checkpointing; FSDP with bf16 compute; FSDP + checkpointing), the bytes of weights,
gradients, DDP buckets, optimizer state, EMA, gathered weights / autocast copies,
activations and optimizer-step temporaries per GPU, the peak, and whether it fits.
``--amp`` plans the run as ``tools/train.py --amp`` trains it (bf16 autocast).
The arithmetic is in ``flexgen/utils/memory_plan.py``.
"""
import argparse
import os.path as osp
from dataclasses import replace

from flexgen.cli import add_cfg_options

COLUMNS = [('weights', 'weights'), ('gradients', 'grads'), ('buckets', 'buckets'),
           ('optimizer', 'optim'), ('ema', 'EMA'), ('gathered', 'gathered'),
           ('activations', 'activ.'), ('step', 'step')]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='GPU memory plan of training recipes')
    parser.add_argument('configs', nargs='+', help='training config files')
    parser.add_argument('--gpus', type=int, default=8, help='data-parallel GPUs (default 8)')
    parser.add_argument('--gpu-memory', type=float, default=80, help='GiB per GPU')
    parser.add_argument('--usable', type=float, default=0.9,
                        help='share of the GPU memory a plan may fill (the rest: CUDA '
                        'context, NCCL buffers, allocator fragmentation)')
    parser.add_argument('--amp', action='store_true',
                        help='bf16 autocast, as tools/train.py --amp trains')
    parser.add_argument('--tokens-per-gpu', type=int,
                        help='default: from the train dataloader (packs, padding, resolution)')
    parser.add_argument('--repa-z-dim', type=int, default=1280,
                        help="REPA vision encoder feature width when the config sets no "
                        "z_dims (1280: RADIO v2.5-H, NiT's encoder)")
    parser.add_argument('--markdown', action='store_true', help='one README table row each')
    add_cfg_options(parser, 'train_dataloader.batch_size=8')
    return parser.parse_args(argv)


def plans_for(path, args):
    from mmengine.config import Config

    from flexgen.utils.memory_plan import (candidate_setups, configured_setup,
                                           count_parameters, measure_activations,
                                           plan_memory, tokens_per_gpu)
    cfg = Config.fromfile(path)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    counts = count_parameters(cfg.model, args.repa_z_dim)
    tokens = args.tokens_per_gpu or tokens_per_gpu(cfg)
    configured = configured_setup(cfg)
    if args.amp and configured.wrapper == 'ddp':
        configured = replace(configured, compute_dtype='bfloat16')
    measured = {}
    plans = []
    for setup in candidate_setups(configured):
        if setup.compute_dtype not in measured:
            measured[setup.compute_dtype] = measure_activations(
                cfg.model, setup.compute_dtype, args.repa_z_dim)
        plans.append(plan_memory(counts, measured[setup.compute_dtype], tokens, args.gpus,
                                 setup))
    return cfg, counts, tokens, measured, plans


def gib(value):
    return f'{value / 2 ** 30:.1f}'


def main(argv=None):
    args = parse_args(argv)
    import flexgen
    flexgen.register_all_modules()
    rows = []
    for path in args.configs:
        cfg, counts, tokens, measured, plans = plans_for(path, args)
        fitting = next((p for p in plans if p.fits(args.gpu_memory, args.usable)), None)
        name = osp.splitext(osp.basename(path))[0]
        if args.markdown:
            for plan in [plans[0]] + ([fitting] if fitting not in (None, plans[0]) else []):
                state = sum(plan.parts[k] for k in ('weights', 'gradients', 'buckets',
                                                     'optimizer', 'ema', 'buffers'))
                rows.append(
                    f'| {name} | {plan.setup.describe()} | {counts.params / 1e9:.2f}B '
                    f'({counts.trainable / 1e9:.2f}B) | {tokens} | {gib(state)} | '
                    f'{gib(plan.parts["activations"])} | {gib(plan.peak)} | '
                    f'{"yes" if plan.fits(args.gpu_memory, args.usable) else "**no**"} |')
            continue
        print(f'\n{path}: {counts.params:,} parameters ({counts.trainable:,} trainable, '
              f'{counts.depth} blocks of {counts.block:,}), {tokens} tokens per GPU, '
              f'{args.gpus} GPUs of {args.gpu_memory:g} GiB ({args.usable:.0%} usable)')
        for dtype, act in measured.items():
            print(f'  activations ({dtype}), bytes per token: {act.block:,.0f} per block, '
                  f'{act.checkpointed:,.0f} per checkpointed block, {act.rest:,.0f} outside '
                  'the blocks')
        print('  GiB per GPU: ' + ' '.join(f'{label:>8}' for _, label in COLUMNS)
              + '     peak  fits  setup')
        for plan in plans:
            fits = 'yes' if plan.fits(args.gpu_memory, args.usable) else 'no'
            print('               ' + ' '.join(f'{gib(plan.parts[k]):>8}' for k, _ in COLUMNS)
                  + f' {gib(plan.peak):>8}  {fits:>4}  {plan.setup.describe()}')
        if fitting is None:
            verdict = 'no setup here fits: more GPUs or fewer tokens per GPU'
        elif fitting is plans[0]:
            verdict = 'as configured'
        else:
            verdict = f'switch on: {fitting.setup.describe()}'
        print(f'  -> {verdict}')
    if args.markdown:
        print(f'| config | setup | parameters (trainable) | tokens / GPU | weights, grads, '
              f'buckets, optimizer, EMA (GiB) | activations (GiB) | peak (GiB) | fits '
              f'{args.gpus} x {args.gpu_memory:g} GiB |')
        print('|---|---|---|---|---|---|---|---|')
        print('\n'.join(rows))


if __name__ == '__main__':
    main()

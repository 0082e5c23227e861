"""Sweep RoPE extrapolation rules over target sizes: a metric table and an image grid.

    python tools/sweep_extrapolation.py CONFIG CHECKPOINT --rules no linear dynntk yarn ntkpro2 \
        --sizes 32x32 48x48 24x48 --ori-max-pe-len 8 --num-samples 24

Every rule is run with and without one scale per axis (``--decouple both``; plain
extrapolation once) at every size: the test requests of the config at those sizes, generated
(sharded, resumable; ``--launcher pytorch`` across processes) and scored by the config's
test evaluator (Inception FID with a reference on a GPU, the demo's judge on a CPU). The
sweep folder (``--out-dir``, default ``WORK_DIR/sweep/<hash of the settings>``) gets
``sweep.json`` / ``sweep.md`` (one row per rule, decouple and size) and ``sweep_grid.png``
(rows: the rule variants in the table's order; columns: the sizes; each cell the same
request, ``--grid-index``, of its size). Every other option is tools/test.py's.
"""
import argparse
import os.path as osp


def parse_args(argv=None):
    # torch, mmengine and flexgen are imported after parsing: --help answers at once.
    parser = argparse.ArgumentParser(
        description='RoPE extrapolation sweep: CONFIG CHECKPOINT and any other tools/test.py '
        'option (python tools/test.py --help) pass through')
    parser.add_argument('--rules', nargs='+', required=True,
                        help='rule types (NTKAware, YaRN, ...) or reference names (no, linear, '
                        'dynntk, partntk, yarn, ntkpro1, ntkpro2, scale1, scale2)')
    parser.add_argument('--sizes', nargs='+', required=True, help='HxW pixel sizes, e.g. 48x48')
    parser.add_argument('--decouple', choices=['both', 'on', 'off'], default='both',
                        help='each rule with and without one scale per axis (both), or '
                        'only with (on) / without (off)')
    parser.add_argument('--ori-max-pe-len', type=float,
                        help='training grid side in patches the rules scale from')
    parser.add_argument('--grid-index', type=int, default=0,
                        help='which request of each size the grid shows')
    return parser.parse_known_args(argv)


def write_grid(sweep_dir: str, variants, sizes, index: int) -> str:
    import torch

    from flexgen.apis import image_grid, save_png
    from flexgen.evaluation.generation import read_image
    cells = []
    for variant in variants:
        for size in sizes:
            pixels = read_image(variant['out_dir'], size, index)
            cells.append(torch.from_numpy(pixels).permute(2, 0, 1).float() / 255)
    path = osp.join(sweep_dir, 'sweep_grid.png')
    save_png(image_grid(cells, ncols=len(sizes)), path)
    return path


def main(argv=None):
    args, rest = parse_args(argv)
    from mmengine.dist import is_main_process

    from flexgen.evaluation.utils import parse_size_key
    from test import build_runner
    try:
        sizes = [parse_size_key(s) for s in args.sizes]
    except ValueError as error:
        raise SystemExit(f'--sizes: {error}') from None
    runner = build_runner(rest, test_cfg=dict(
        type='ExtrapolationSweep', rules=args.rules, sizes=sizes, decouple=args.decouple,
        ori_max_pe_len=args.ori_max_pe_len))
    metrics = runner.test()
    loop = runner.test_loop
    if is_main_process():
        path = write_grid(loop.sweep_dir, loop.variants, sizes, args.grid_index)
        runner.logger.info(f'sweep grid (rows: {", ".join(v["name"] for v in loop.variants)}; '
                           f'columns: {", ".join(args.sizes)}): {path}')
    return metrics


if __name__ == '__main__':
    main()

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
    # torch and flexgen's models are imported after parsing: --help answers at once.
    from flexgen.cli import add_test_arguments, export_local_rank
    parser = argparse.ArgumentParser(
        description="RoPE extrapolation sweep of a checkpoint; every tools/test.py option "
        'applies')
    add_test_arguments(parser)
    sweep = parser.add_argument_group('sweep')
    sweep.add_argument('--rules', nargs='+', required=True,
                        help='rule types (NTKAware, YaRN, ...) or reference names (no, linear, '
                        'dynntk, partntk, yarn, ntkpro1, ntkpro2, scale1, scale2)')
    sweep.add_argument('--decouple', choices=['both', 'on', 'off'], default='both',
                        help='each rule with and without one scale per axis (both), or '
                        'only with (on) / without (off)')
    sweep.add_argument('--ori-max-pe-len', type=float,
                        help='training grid side in patches the rules scale from')
    sweep.add_argument('--grid-index', type=int, default=0,
                        help='which request of each size the grid shows')
    args = parser.parse_args(argv)
    if not args.sizes:
        parser.error('--sizes is required: the sizes to sweep, e.g. 48x48 24x48')
    export_local_rank(args)
    return args


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
    args = parse_args(argv)
    from mmengine.dist import is_main_process

    from flexgen.apis.runners import build_test_runner, parse_sizes
    sizes = parse_sizes(args.sizes)
    runner = build_test_runner(args, sizes=sizes, test_cfg=dict(
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
    from flexgen.apis.runners import end_distributed
    end_distributed()

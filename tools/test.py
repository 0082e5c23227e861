"""Evaluate a checkpoint: ``python tools/test.py CONFIG CHECKPOINT [options]``.

The checkpoint is loaded with ``torch.load(weights_only=True)`` (flexgen.engine's local
loader): a file holding pickled code is refused, never executed. An official reference
checkpoint (e.g. DiT-XL-2-256x256.pt) is recognised by its keys and converted on the fly
(``flexgen.apis.official``); ``--converter`` names the converter when the config alone
cannot tell.

Generators are tested by ``GenerationLoop`` (``test_cfg``): the requests are generated in
shards that a rerun skips, ADM's ``samples_{H}x{W}.npz`` is written per size and the test
evaluator's metrics land in a per-size table (``metrics.json``, ``metrics.md``):

    torchrun --nproc_per_node 8 tools/test.py configs/dit/dit_xl_2_256.py DiT-XL-2-256x256.pt \
        --launcher pytorch --num-samples 50000 --batch-size 32 --cfg-scale 1.5
"""
import argparse
import os
import os.path as osp

from mmengine.config import Config

from flexgen.cli import add_cfg_options
from train import check_config_keys, init_cpu_distributed, runner_from_cfg, use_cpu_ddp


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Evaluate a flexgen checkpoint')
    parser.add_argument('config', help='config file path')
    parser.add_argument('checkpoint', help='checkpoint file, or an official reference '
                        'checkpoint (converted on the fly)')
    parser.add_argument('--converter', help='converter of an official checkpoint (dit, sit, '
                        '...); default: the one the checkpoint and the config agree on')
    parser.add_argument('--work-dir', help='where logs and metrics go')
    add_cfg_options(parser, 'test_dataloader.batch_size=4')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm'], default='none',
                        help='how processes were started: none (one process), pytorch '
                        '(torchrun), slurm (srun)')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0,
                        help=argparse.SUPPRESS)  # set by torch.distributed.launch
    generation = parser.add_argument_group('generation (GenerationLoop)')
    generation.add_argument('--sizes', nargs='+', metavar='HxW',
                            help='sizes to generate, e.g. 256x256 512x512')
    generation.add_argument('--num-samples', type=int, help='images per size (e.g. 50000)')
    generation.add_argument('--batch-size', type=int, help='requests per process and step')
    generation.add_argument('--out-dir', help='samples folder (default: WORK_DIR/samples/'
                            '<hash of the settings>); a rerun resumes there')
    generation.add_argument('--cfg-scale', type=float, help='classifier-free guidance scale')
    generation.add_argument('--cfg-interval', type=float, nargs=2, metavar=('LOW', 'HIGH'),
                            help='guide only for LOW <= t <= HIGH (t = 1 is noise)')
    generation.add_argument('--sampler', help='a registered sampler, e.g. EulerODE, '
                            'DDPMAncestral, EulerMaruyamaSDE (its default arguments)')
    generation.add_argument('--steps', type=int, help='sampling steps')
    generation.add_argument('--precision', metavar='{fp32,tf32,bf16,fp16}',
                            help='fp32 (TF32 off), tf32, or bf16 / fp16 autocast')
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def build_runner(argv=None, test_cfg=None):
    """Parse ``argv``, load the config and the checkpoint, and build (not run) the Runner;
    ``test_cfg`` entries (e.g. another test loop) override the config's."""
    args = parse_args(argv)
    from mmengine.model import is_model_wrapper

    import flexgen
    from flexgen.apis.official import convert_for_config, is_official_checkpoint
    from flexgen.engine.generation_loop import apply_generation_options
    from flexgen.evaluation.utils import parse_size_key
    flexgen.register_all_modules()
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    if test_cfg is not None:
        cfg.test_cfg = dict(cfg.get('test_cfg') or {}, **test_cfg)
    try:
        sizes = None if args.sizes is None else [parse_size_key(s) for s in args.sizes]
    except ValueError as error:
        raise SystemExit(f'--sizes: {error}') from None
    apply_generation_options(
        cfg, sizes=sizes, num_samples=args.num_samples, batch_size=args.batch_size,
        out_dir=args.out_dir, cfg_scale=args.cfg_scale, cfg_interval=args.cfg_interval,
        sampler=args.sampler, steps=args.steps, precision=args.precision)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])
    official = is_official_checkpoint(args.checkpoint)
    converted = (convert_for_config(cfg, args.checkpoint, args.converter) if official
                 else None)
    cfg.load_from, cfg.resume = (None if official else args.checkpoint), False
    check_config_keys(cfg, args.config)
    use_cpu_ddp(cfg)
    init_cpu_distributed(args.launcher)
    runner = runner_from_cfg(cfg)
    if converted is not None:
        # Before test(): an EMA hook copies the model when the run starts, so the EMA
        # weights it swaps in for testing are these.
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        model.backbone.load_state_dict(converted.state_dict, strict=True)
    return runner


def main(argv=None):
    return build_runner(argv).test()


if __name__ == '__main__':
    main()

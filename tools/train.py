"""Train a flexgen model from a config.

    python tools/train.py CONFIG [--work-dir DIR] [--resume [CKPT]] [--amp] [--seed N]
        [--cfg-options key=value ...] [--launcher none|pytorch|slurm]
    torchrun --nproc_per_node 8 tools/train.py CONFIG --launcher pytorch

Every option ends up in the config, and the Runner dumps that config to the work dir, so
the dumped file reproduces the run.
"""
import argparse

from flexgen.cli import add_cfg_options, add_launcher_arguments, export_local_rank


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Train a flexgen model.')
    parser.add_argument('config', help='config file')
    parser.add_argument('--work-dir', help='where logs and checkpoints go (default: the '
                        "config's work_dir, else ./work_dirs/<config name>)")
    parser.add_argument('--resume', nargs='?', const='auto', default=None, metavar='CKPT',
                        help='resume from CKPT; a bare --resume resumes from '
                        'work_dir/last_checkpoint')
    parser.add_argument('--amp', action='store_true',
                        help='bfloat16 autocast (AutocastOptimWrapper; CPU and GPU)')
    parser.add_argument('--seed', type=int, help='overrides randomness.seed')
    add_cfg_options(parser, 'train_cfg.max_iters=100')
    add_launcher_arguments(parser)
    args = parser.parse_args(argv)
    export_local_rank(args)
    return args


def build_runner(argv=None):
    """Parse ``argv``, load and check the config, and build (not run) the Runner."""
    args = parse_args(argv)
    from flexgen.apis.runners import apply_train_options, build_runner, load_config
    cfg = load_config(args.config, args.launcher, args.cfg_options, args.work_dir)
    apply_train_options(cfg, args.resume, args.seed, args.amp)
    return build_runner(cfg, args.config)


def main(argv=None):
    runner = build_runner(argv)
    runner.train()
    return runner


if __name__ == '__main__':
    main()
    from flexgen.apis.runners import end_distributed
    end_distributed()

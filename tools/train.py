"""Train a flexgen model from a config.

    python tools/train.py CONFIG [--work-dir DIR] [--resume [CKPT]] [--amp] [--seed N]
        [--cfg-options key=value ...] [--launcher none|pytorch|slurm]
    torchrun --nproc_per_node 8 tools/train.py CONFIG --launcher pytorch

Every option ends up in the config, and the Runner dumps that config to the work dir, so
the dumped file reproduces the run.
"""
import argparse
import difflib
import importlib.util
import os
import os.path as osp

from mmengine.config import Config
from mmengine.config.lazy import LazyAttr, LazyObject

from flexgen.cli import add_cfg_options

# Top-level keys that mmengine's Runner reads (Runner.from_cfg and Runner methods) ...
RUNNER_KEYS = {
    'model', 'work_dir', 'train_dataloader', 'val_dataloader', 'test_dataloader',
    'train_cfg', 'val_cfg', 'test_cfg', 'auto_scale_lr', 'optim_wrapper',
    'param_scheduler', 'val_evaluator', 'test_evaluator', 'default_hooks', 'custom_hooks',
    'data_preprocessor', 'load_from', 'resume', 'launcher', 'env_cfg', 'log_processor',
    'log_level', 'visualizer', 'default_scope', 'randomness', 'experiment_name',
    'model_wrapper_cfg', 'sync_bn', 'compile', 'runner_type', 'strategy', 'custom_imports',
    'gpu_ids', 'find_unused_parameters', 'activation_checkpointing', 'efficient_conv_bn_eval',
}
# ... and flexgen's own. A subpackage that reads a new top-level key adds it here.
FLEXGEN_KEYS = {'vis_backends'}


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
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm'], default='none',
                        help='how processes were started: none (one process), pytorch '
                        '(torchrun), slurm (srun)')
    # torch.distributed.launch passes --local_rank (older) or --local-rank (newer).
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0,
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def register_flexgen():
    """Register every flexgen module and make 'flexgen' the default scope."""
    import flexgen
    flexgen.register_all_modules()


def check_config_keys(cfg: Config, filename: str = None) -> None:
    """Refuse top-level keys that nothing reads: a misspelled ``trian_cfg`` would
    otherwise be ignored and the run would silently use the base config's value.
    Helper variables of a config start with an underscore and are skipped."""
    known = RUNNER_KEYS | FLEXGEN_KEYS
    problems = []
    for key in cfg.keys():
        if key.startswith('_') or key in known or isinstance(cfg[key], (LazyObject, LazyAttr)):
            continue
        close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
        hint = f" Did you mean '{close[0]}'?" if close else ''
        problems.append(f"'{key}'.{hint}")
    if problems:
        raise KeyError(
            f'{filename or cfg.filename}: unknown top-level config key {" ".join(problems)} '
            "Neither mmengine's Runner nor flexgen reads it. Name helper variables with a "
            'leading underscore.')


def merge_args(cfg: Config, args) -> Config:
    """Fold the command line into the config (CLI > config > defaults)."""
    cfg.launcher = args.launcher
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)

    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])

    if args.resume == 'auto':
        cfg.resume, cfg.load_from = True, None
    elif args.resume is not None:
        cfg.resume, cfg.load_from = True, args.resume

    if args.seed is not None:
        cfg.randomness = dict(cfg.get('randomness') or {}, seed=args.seed)

    if args.amp:
        optim_wrapper = cfg.get('optim_wrapper')
        if optim_wrapper is None:
            raise ValueError(f'{cfg.filename}: --amp needs an optim_wrapper in the config')
        kind = optim_wrapper.get('type', 'OptimWrapper')
        if kind not in ('OptimWrapper', 'FlexOptimWrapper', 'AmpOptimWrapper',
                        'AutocastOptimWrapper'):
            raise ValueError(f'{cfg.filename}: --amp works with OptimWrapper, not '
                             f"optim_wrapper.type='{kind}'")
        optim_wrapper.pop('loss_scale', None)  # AmpOptimWrapper's; bf16 needs no scaling
        optim_wrapper.update(type='AutocastOptimWrapper', dtype='bfloat16')

    if importlib.util.find_spec('tensorboard') is not None:
        backends = (cfg.get('visualizer') or {}).get('vis_backends')
        if isinstance(backends, list) and not any(
                b.get('type') == 'TensorboardVisBackend' for b in backends):
            backends.append(dict(type='TensorboardVisBackend'))
    return cfg


def use_cpu_ddp(cfg: Config) -> None:
    """``--launcher pytorch`` without CUDA: gloo, and DDP without device ids."""
    import torch
    if cfg.get('launcher') != 'pytorch' or torch.cuda.is_available():
        return
    cfg.env_cfg = cfg.get('env_cfg') or {}
    cfg.env_cfg.dist_cfg = dict(cfg.env_cfg.get('dist_cfg') or {}, backend='gloo')
    wrapper = cfg.get('model_wrapper_cfg') or dict(type='MMDistributedDataParallel',
                                                   broadcast_buffers=False)
    from flexgen.engine.fsdp import is_sharded_wrapper_cfg
    if not is_sharded_wrapper_cfg(wrapper):
        wrapper['device_ids'] = None  # CPU modules take no device ids
    cfg.model_wrapper_cfg = wrapper


def init_cpu_distributed(launcher: str) -> None:
    """Create the gloo process group for ``--launcher pytorch`` without CUDA.

    mmengine's own set-up calls ``torch.cuda.set_device`` and uses nccl; it skips both
    when a process group already exists, so the group is created here first.
    """
    import torch
    if launcher == 'pytorch' and not torch.cuda.is_available() \
            and not torch.distributed.is_initialized():
        torch.distributed.init_process_group('gloo')


def build_runner(argv=None):
    """Parse ``argv``, load and check the config, and build (not run) the Runner."""
    args = parse_args(argv)
    register_flexgen()
    cfg = merge_args(Config.fromfile(args.config), args)
    check_config_keys(cfg, args.config)
    use_cpu_ddp(cfg)
    init_cpu_distributed(args.launcher)
    return runner_from_cfg(cfg)


def runner_from_cfg(cfg: Config):
    """The config's ``runner_type``, else flexgen's Runner (a readable console)."""
    from flexgen.registry import RUNNERS
    if 'runner_type' in cfg:
        return RUNNERS.build(cfg)
    from flexgen.engine import FlexRunner
    return FlexRunner.from_cfg(cfg)


def main(argv=None):
    runner = build_runner(argv)
    runner.train()
    return runner


if __name__ == '__main__':
    main()

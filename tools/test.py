"""Evaluate a checkpoint: ``python tools/test.py CONFIG CHECKPOINT [options]``.

The checkpoint is loaded with ``torch.load(weights_only=True)`` (flexgen.engine's local
loader): a file holding pickled code is refused, never executed. An official reference
checkpoint (e.g. DiT-XL-2-256x256.pt) is recognised by its keys and converted on the fly
(``flexgen.apis.official``); ``--converter`` names the converter when the config alone
cannot tell.
"""
import argparse
import os
import os.path as osp

from mmengine.config import Config

from flexgen.cli import add_cfg_options
from train import check_config_keys, init_cpu_distributed, runner_from_cfg


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
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def main(argv=None):
    args = parse_args(argv)
    from mmengine.model import is_model_wrapper

    import flexgen
    from flexgen.apis.official import convert_for_config, is_official_checkpoint
    flexgen.register_all_modules()
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])
    official = is_official_checkpoint(args.checkpoint)
    converted = (convert_for_config(cfg, args.checkpoint, args.converter) if official
                 else None)
    cfg.load_from, cfg.resume = (None if official else args.checkpoint), False
    check_config_keys(cfg, args.config)
    init_cpu_distributed(args.launcher)
    runner = runner_from_cfg(cfg)
    if converted is not None:
        # Before test(): an EMA hook copies the model when the run starts, so the EMA
        # weights it swaps in for testing are these.
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        model.backbone.load_state_dict(converted.state_dict, strict=True)
    return runner.test()


if __name__ == '__main__':
    main()

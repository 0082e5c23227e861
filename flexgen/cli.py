"""Command-line pieces shared by the scripts in ``tools/``.

Nothing here imports torch: a tool parses its arguments (and answers ``--help``) before it
loads anything heavy.
"""
import argparse
import os

from mmengine.config import DictAction


class ConfigOptions(DictAction):
    """mmengine's ``DictAction`` (``KEY=VALUE`` items, lists as ``V1,V2`` or ``[V1,V2]``) with
    an argparse error naming the item that is not ``KEY=VALUE``, instead of an unpacking
    traceback.

    Use: ``parser.add_argument('--cfg-options', nargs='+', action=ConfigOptions, ...)``.
    """

    def __call__(self, parser, namespace, values, option_string=None):
        for item in values or ():
            key, equals, value = item.partition('=')
            if not equals or not key:
                parser.error(f'{option_string} {item!r}: each item must be KEY=VALUE, e.g. '
                             'train_cfg.max_iters=100')
            try:
                self._parse_iterable(value)
            except AssertionError as error:  # mmengine's check of the brackets
                parser.error(f'{option_string} {item!r}: {error}')
        super().__call__(parser, namespace, values, option_string)


def add_cfg_options(parser: argparse.ArgumentParser, example: str) -> None:
    """``--cfg-options KEY=VALUE ...``, parsed by :class:`ConfigOptions`."""
    parser.add_argument('--cfg-options', nargs='+', action=ConfigOptions, metavar='KEY=VALUE',
                        help=f'override config entries, e.g. {example}')


def add_launcher_arguments(parser: argparse.ArgumentParser) -> None:
    """``--launcher none|pytorch|slurm`` and the hidden ``--local-rank`` that
    ``torch.distributed.launch`` passes; call :func:`export_local_rank` after parsing."""
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm'], default='none',
                        help='how processes were started: none (one process), pytorch '
                        '(torchrun), slurm (srun)')
    # torch.distributed.launch passes --local_rank (older) or --local-rank (newer).
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0,
                        help=argparse.SUPPRESS)


def export_local_rank(args: argparse.Namespace) -> None:
    """``LOCAL_RANK`` (what mmengine's distributed set-up reads) from ``--local-rank``,
    unless the launcher (torchrun) has set it."""
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))


def add_test_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``tools/test.py`` (and of the tools that test a checkpoint the same
    way, e.g. ``tools/sweep_extrapolation.py``): config, checkpoint, converter, work dir,
    ``--cfg-options``, launcher, and the generation options of ``GenerationLoop``."""
    parser.add_argument('config', help='config file path')
    parser.add_argument('checkpoint', help='checkpoint file, or an official reference '
                        'checkpoint (converted on the fly)')
    parser.add_argument('--converter', help='converter of an official checkpoint (dit, sit, '
                        '...); default: the one the checkpoint and the config agree on')
    parser.add_argument('--work-dir', help='where logs and metrics go')
    add_cfg_options(parser, 'test_dataloader.batch_size=4')
    add_launcher_arguments(parser)
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


def usable_cpus() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, 'sched_getaffinity'):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1

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


def usable_cpus() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, 'sched_getaffinity'):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1

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

from flexgen.cli import add_test_arguments, export_local_rank


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Evaluate a flexgen checkpoint')
    add_test_arguments(parser)
    args = parser.parse_args(argv)
    export_local_rank(args)
    return args


def build_runner(argv=None):
    """Parse ``argv``, load the config and the checkpoint, and build (not run) the Runner."""
    args = parse_args(argv)  # first: --help answers before anything heavy loads
    from flexgen.apis.runners import build_test_runner
    return build_test_runner(args)


def main(argv=None):
    return build_runner(argv).test()


if __name__ == '__main__':
    main()
    from flexgen.apis.runners import end_distributed
    end_distributed()

"""From a config file and a command line to a Runner: what ``tools/train.py``,
``tools/test.py`` and ``tools/sweep_extrapolation.py`` share (their arguments are in
:mod:`flexgen.cli`).

- :func:`load_config`: the config with the command line folded in (``--cfg-options``, work
  dir, launcher), and every top-level key checked (:func:`check_config_keys`);
- :func:`apply_train_options`: ``--resume``, ``--seed``, ``--amp``;
- :func:`build_runner`: the process group for a CPU run under torchrun, then the config's
  ``runner_type`` or flexgen's :class:`~flexgen.engine.runner.FlexRunner`;
- :func:`build_test_runner`: the same for testing a checkpoint (an official reference
  checkpoint is converted on the fly), with the generation options applied (``--sizes``
  parsed by :func:`parse_sizes`).
"""
import difflib
import importlib.util
import inspect
import os.path as osp
from typing import List, Optional, Tuple

from mmengine.config import Config
from mmengine.config.lazy import LazyAttr, LazyObject

# Keys mmengine reads from the config outside Runner.__init__ (Runner.from_cfg, wrap_model,
# FlexibleRunner) and flexgen's own top-level keys.
MMENGINE_CFG_KEYS = {'model_wrapper_cfg', 'compile', 'runner_type', 'custom_imports', 'strategy',
                     'gpu_ids', 'sync_bn', 'find_unused_parameters', 'activation_checkpointing',
                     'efficient_conv_bn_eval'}
FLEXGEN_KEYS = {'vis_backends'}


def config_keys() -> set:
    """Every top-level key something reads: the Runner's constructor arguments, the keys
    mmengine reads from the config elsewhere, and flexgen's."""
    from mmengine.runner import Runner
    arguments = set(inspect.signature(Runner.__init__).parameters) - {'self', 'cfg'}
    return arguments | MMENGINE_CFG_KEYS | FLEXGEN_KEYS


def check_config_keys(cfg: Config, filename: Optional[str] = None) -> None:
    """Refuse top-level keys that nothing reads: a misspelled ``trian_cfg`` would
    otherwise be ignored and the run would silently use the base config's value.
    Helper variables of a config start with an underscore and are skipped."""
    known = config_keys()
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


def load_config(path: str, launcher: str = 'none', cfg_options: Optional[dict] = None,
                work_dir: Optional[str] = None) -> Config:
    """The config at ``path`` with ``cfg_options`` merged (command line > config), the
    launcher, and the work dir (the config's, else ``./work_dirs/<config name>``)."""
    import flexgen
    flexgen.register_all_modules()
    cfg = Config.fromfile(path)
    cfg.launcher = launcher
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(path))[0])
    return cfg


def apply_train_options(cfg: Config, resume: Optional[str] = None, seed: Optional[int] = None,
                        amp: bool = False) -> Config:
    """``resume``: ``'auto'`` (the work dir's last checkpoint) or a checkpoint path;
    ``seed`` overrides ``randomness.seed``; ``amp`` trains in bfloat16 autocast
    (:class:`~flexgen.engine.optim_wrappers.AutocastOptimWrapper`). Adds TensorBoard to
    the visualizer when the package is installed."""
    if resume == 'auto':
        cfg.resume, cfg.load_from = True, None
    elif resume is not None:
        cfg.resume, cfg.load_from = True, resume
    if seed is not None:
        cfg.randomness = dict(cfg.get('randomness') or {}, seed=seed)
    if amp:
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


def end_distributed() -> None:
    """Destroy the process group of a finished run, on every rank together: a gloo group
    left alive at interpreter exit can abort the process ("terminate called without an
    active exception") after the work is done, which torchrun reports as a failure."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def build_runner(cfg: Config, filename: Optional[str] = None):
    """Check the config's keys, set up a CPU run under torchrun, and build (not run) the
    config's ``runner_type``, else flexgen's Runner (a readable console, sharding)."""
    check_config_keys(cfg, filename)
    use_cpu_ddp(cfg)
    init_cpu_distributed(cfg.get('launcher', 'none'))
    from flexgen.registry import RUNNERS
    if 'runner_type' in cfg:
        return RUNNERS.build(cfg)
    from flexgen.engine.runner import FlexRunner
    return FlexRunner.from_cfg(cfg)


def parse_sizes(sizes: Optional[List[str]]) -> Optional[List[Tuple[int, int]]]:
    """``--sizes`` (``'HxW'`` each) as ``(H, W)`` pairs; a bad one ends the program, named."""
    from flexgen.evaluation.utils import parse_size_key
    try:
        return None if sizes is None else [parse_size_key(s) for s in sizes]
    except ValueError as error:
        raise SystemExit(f'--sizes: {error}') from None


def build_test_runner(args, test_cfg: Optional[dict] = None,
                      sizes: Optional[List[Tuple[int, int]]] = None):
    """The Runner that tests ``args.checkpoint`` (arguments of
    :func:`flexgen.cli.add_test_arguments`); ``test_cfg`` entries (e.g. another test loop)
    override the config's; ``sizes``: ``args.sizes`` already parsed (:func:`parse_sizes`)."""
    from mmengine.model import is_model_wrapper

    from flexgen.apis.official import convert_for_config, is_official_checkpoint
    from flexgen.engine.generation_loop import apply_generation_options
    cfg = load_config(args.config, args.launcher, args.cfg_options, args.work_dir)
    if test_cfg is not None:
        cfg.test_cfg = dict(cfg.get('test_cfg') or {}, **test_cfg)
    if sizes is None:
        sizes = parse_sizes(args.sizes)
    apply_generation_options(
        cfg, sizes=sizes, num_samples=args.num_samples, batch_size=args.batch_size,
        out_dir=args.out_dir, cfg_scale=args.cfg_scale, cfg_interval=args.cfg_interval,
        sampler=args.sampler, steps=args.steps, precision=args.precision)
    official = is_official_checkpoint(args.checkpoint)
    converted = (convert_for_config(cfg, args.checkpoint, args.converter) if official
                 else None)
    cfg.load_from, cfg.resume = (None if official else args.checkpoint), False
    runner = build_runner(cfg, args.config)
    if converted is not None:
        # Before test(): an EMA hook copies the model when the run starts, so the EMA
        # weights it swaps in for testing are these.
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        model.backbone.load_state_dict(converted.state_dict, strict=True)
    return runner

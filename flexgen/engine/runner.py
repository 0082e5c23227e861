"""The Runner the tools build: mmengine's ``Runner`` with a console a user can read and
sharded (FSDP2) training.

Console: the start-up dumps (environment, config, hook order) stay in the log file.

For a model that is not sharded it is otherwise mmengine's ``Runner``. When the config
selects :class:`~flexgen.engine.fsdp.FullyShardedWrapper` (``model_wrapper_cfg``), it

- builds the wrapper from flexgen's registry (mmengine's ``wrap_model`` looks wrappers up in
  its own root registry only) and skips the Runner's weight-initialisation broadcast, which
  has no rule for sharded tensors (the wrapper broadcasts before it shards);
- saves every checkpoint as a sharded directory (:mod:`flexgen.engine.sharded_checkpoint`),
  each rank writing its shards, atomically as a whole; this holds for a single-process
  run of such a config as well, so checkpoints of one config always have one format and
  load at any world size;
- resumes from such a directory (model, optimizer, EMA, schedulers, message hub, iteration)
  at any world size, and loads initial weights (``load_from``) from a sharded directory
  (its EMA weights when it has them, as mmengine's ``load_from`` takes the averaged
  weights of a single-file checkpoint) or a single file (``.pth``, ``.safetensors``);
- refuses what would break sharded training: mmengine's ``EMAHook`` (it deep-copies the
  model: use ``FlexEMAHook``), ``ZeroRedundancyOptimizer`` (FSDP already shards the
  optimizer state), several optimizers (``OptimWrapperDict``) and resuming a sharded run
  from a single-file checkpoint (its optimizer state is not keyed by parameter name).
"""
import logging
import os.path as osp
import time

import mmengine
import torch
from mmengine.device import get_device
from mmengine.hooks import EMAHook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.optim import OptimWrapperDict
from mmengine.runner import Runner
from mmengine.runner.checkpoint import _load_checkpoint
from mmengine.utils import apply_to, get_git_hash

from flexgen.fileio import all_finite
from flexgen.registry import MODEL_WRAPPERS, RUNNERS
from .activation_checkpointing import turn_on_activation_checkpointing
from .ema import FlexEMAHook, _local
from .fsdp import FullyShardedWrapper, is_sharded_wrapper_cfg
from .sharded_checkpoint import (is_sharded_checkpoint, load_sharded, read_train_state,
                                 save_sharded, sharded_keys)


class StartupDumpFilter(logging.Filter):
    """Drops the Runner's start-up dumps (system environment, the whole config, the hook
    order: hundreds of lines) from a handler; the log file keeps them."""

    PREFIXES = ('System environment:', 'Config:\n', 'Hooks will be executed in the following')

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage() if isinstance(record.msg, str) else ''
        return not message.lstrip('\n-').startswith(self.PREFIXES)


@RUNNERS.register_module()
class FlexRunner(Runner):
    """mmengine's ``Runner`` whose console leaves out the start-up dumps (environment,
    config, hook order) and says where they are instead: the log file in
    ``work_dir/<timestamp>/`` has everything, and the config is also dumped to the work
    dir as a file; and that trains, saves and resumes sharded models (see the module
    docstring). ``tools/train.py`` and ``tools/test.py`` build it unless the config names a
    ``runner_type``; its arguments are the Runner's."""

    def __init__(self, *args, **kwargs):
        self._resuming = False
        self._resume_optimizer = True
        super().__init__(*args, **kwargs)
        self.sharded_checkpoints = is_sharded_wrapper_cfg(self.cfg.get('model_wrapper_cfg'))
        if self.sharded_checkpoints:
            self._check_sharded_setup()

    def build_logger(self, log_level='INFO', log_file=None, **kwargs):
        logger = super().build_logger(log_level, log_file, **kwargs)
        files = [h.baseFilename for h in logger.handlers if isinstance(h, logging.FileHandler)]
        for handler in logger.handlers:
            console = isinstance(handler, logging.StreamHandler) and \
                not isinstance(handler, logging.FileHandler)
            if console and not any(isinstance(f, StartupDumpFilter) for f in handler.filters):
                handler.addFilter(StartupDumpFilter())
        if files:
            logger.info(f'Environment, full config and hook order: {files[0]}')
        return logger

    # ------------------------------------------------------------------ set-up
    def _check_sharded_setup(self) -> None:
        for hook in self.hooks:
            if isinstance(hook, EMAHook) and not isinstance(hook, FlexEMAHook):
                raise ValueError(
                    f"model_wrapper_cfg selects FullyShardedWrapper, but custom_hooks has "
                    f"mmengine's {type(hook).__name__}, which deep-copies the model (not "
                    "possible for a sharded one) and saves into a single file: use "
                    "dict(type='FlexEMAHook', ...) with the same arguments")
            if getattr(hook, 'published_keys', None):
                raise ValueError('checkpoint published_keys re-reads a single-file checkpoint; '
                                 'a sharded run publishes with tools/consolidate_checkpoint.py')
        optimizer = (self.optim_wrapper or {}).get('optimizer', {}) \
            if isinstance(self.optim_wrapper, dict) else {}
        if isinstance(optimizer, dict) and 'ZeroRedundancy' in str(optimizer.get('type', '')):
            raise ValueError('optim_wrapper.optimizer is ZeroRedundancyOptimizer, but '
                             'model_wrapper_cfg selects FullyShardedWrapper, which shards the '
                             'optimizer state already: use the plain optimizer (e.g. AdamW)')

    def wrap_model(self, model_wrapper_cfg, model):
        if not is_sharded_wrapper_cfg(model_wrapper_cfg):
            return super().wrap_model(model_wrapper_cfg, model)
        model = model.to(get_device())
        if not self.distributed:
            self.logger.info('FullyShardedWrapper: one process, nothing to shard; the model '
                             'trains unwrapped and checkpoints are still written sharded')
            return model
        cfg = dict(model_wrapper_cfg)
        if isinstance(cfg['type'], str) and cfg['type'].startswith('flexgen.'):
            cfg['type'] = cfg['type'][len('flexgen.'):]
        wrapper = MODEL_WRAPPERS.build(cfg, default_args=dict(module=model))
        wrapper.runner_checked = True
        return wrapper

    def train(self):
        # mmengine's train() would wrap these modules itself (reentrant checkpoint); the
        # key is hidden from it for the call and applied in _init_model_weights, its place
        # in mmengine's order (after before_run, so EMA copies are not wrapped)
        modules = self._checkpointed = self.cfg.pop('activation_checkpointing', None)
        try:
            return super().train()
        finally:
            if modules is not None:
                self.cfg['activation_checkpointing'] = modules

    def _init_model_weights(self) -> None:
        if not isinstance(self.model, FullyShardedWrapper):
            super()._init_model_weights()  # the wrapper initialised before sharding
        modules = getattr(self, '_checkpointed', None)
        if modules:
            self.logger.info(f'Activation checkpointing (non-reentrant): {modules}')
            turn_on_activation_checkpointing(self._plain_model(), modules)
            self._checkpointed = None  # once per model

    def _plain_model(self):
        return self.model.module if is_model_wrapper(self.model) else self.model

    # ------------------------------------------------------------------ saving
    def save_checkpoint(self, out_dir, filename, file_client_args=None, save_optimizer=True,
                        save_param_scheduler=True, meta=None, by_epoch=True,
                        backend_args=None):
        """mmengine's ``save_checkpoint``; for a sharded config a collective that writes a
        sharded checkpoint directory ``out_dir/filename`` (every rank calls it)."""
        if not self.sharded_checkpoints:
            return super().save_checkpoint(out_dir, filename, file_client_args,
                                           save_optimizer, save_param_scheduler, meta,
                                           by_epoch, backend_args)
        from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                             get_optimizer_state_dict)
        if '://' in str(out_dir):
            raise ValueError(f'sharded checkpoints are written to a local directory, not '
                             f'{out_dir}')
        # The meta mmengine's save_checkpoint writes.
        meta = dict(meta or {})
        meta.setdefault('epoch', self.epoch + 1 if by_epoch else self.epoch)
        meta.setdefault('iter', self.iter if by_epoch else self.iter + 1)
        meta.update(cfg=self.cfg.pretty_text, seed=self.seed,
                    experiment_name=self.experiment_name,
                    time=time.strftime('%Y%m%d_%H%M%S', time.localtime()),
                    mmengine_version=mmengine.__version__ + get_git_hash(),
                    world_size=self.world_size)
        if hasattr(self.train_dataloader.dataset, 'metainfo'):
            meta.update(dataset_meta=self.train_dataloader.dataset.metainfo)
        train_state = dict(sharded=True, meta=meta, message_hub=apply_to(
            self.message_hub.state_dict(), lambda x: hasattr(x, 'cpu'), lambda x: x.cpu()))

        model = self._plain_model()
        states = dict(model=get_model_state_dict(model))
        self._check_finite(states['model'])
        if save_optimizer:
            optimizer = self._single_optimizer()
            full = get_optimizer_state_dict(model, optimizer)
            extra = set(self.optim_wrapper.state_dict()) - {'state', 'param_groups'}
            if extra:
                raise ValueError(f'{type(self.optim_wrapper).__name__} keeps state beyond the '
                                 f'optimizer ({sorted(extra)}), which sharded checkpoints do '
                                 'not store (float16 loss scaling): train in bfloat16')
            states['optimizer'] = dict(state=full['state'])
            train_state['optimizer_param_groups'] = full['param_groups']
        if save_param_scheduler and self.param_schedulers:
            if isinstance(self.param_schedulers, dict):
                train_state['param_schedulers'] = {
                    name: [s.state_dict() for s in schedulers]
                    for name, schedulers in self.param_schedulers.items()}
            else:
                train_state['param_schedulers'] = [s.state_dict() for s in self.param_schedulers]
        # Hooks see the plain part (FlexCheckpointHook makes it weights_only-loadable);
        # hooks with sharded state (FlexEMAHook) hand it over for the shards.
        self.call_hook('before_save_checkpoint', checkpoint=train_state)
        for hook in self.hooks:
            if hasattr(hook, 'sharded_state'):
                states.update(hook.sharded_state())
        save_sharded(osp.join(out_dir, filename), states, train_state)

    def _check_finite(self, weights: dict) -> None:
        """Refuse to save NaN / inf weights (as FlexCheckpointHook does for single files),
        on every rank together: each checks its own shards."""
        local = [_local(v) for v in weights.values() if isinstance(v, torch.Tensor)]
        local += [_local(v) for hook in self.hooks if isinstance(hook, FlexEMAHook)
                  for v in hook.ema_model.averages.values()]
        finite = torch.tensor(float(all_finite(local)))
        if self.distributed:
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        if not finite.item():
            raise FloatingPointError(
                f'Iteration {self.iter}: the model weights hold NaN or inf values, so no '
                'checkpoint was saved and none was pruned; the previous ones are whole. '
                'Training diverged: lower the learning rate or clip gradients, then resume.')

    def _single_optimizer(self):
        if isinstance(self.optim_wrapper, OptimWrapperDict):
            raise ValueError('sharded checkpoints store one optimizer; the config has several '
                             '(OptimWrapperDict)')
        return self.optim_wrapper.optimizer

    # ------------------------------------------------------------------ loading
    def resume(self, filename, resume_optimizer=True, resume_param_scheduler=True,
               map_location='default'):
        if is_sharded_checkpoint(filename):
            self._resuming, self._resume_optimizer = True, resume_optimizer
            try:
                # mmengine's resume does the rest (iteration, seed, message hub,
                # schedulers) from what load_checkpoint returns.
                return super().resume(filename, resume_optimizer, resume_param_scheduler,
                                      map_location)
            finally:
                self._resuming = False
        if self.sharded_checkpoints:
            raise ValueError(
                f'{filename}: a sharded run resumes from a sharded checkpoint directory; a '
                'single-file checkpoint keys its optimizer state by position, not by '
                'parameter name. To start sharded training from its weights, use '
                'load_from (and no resume)')
        return super().resume(filename, resume_optimizer, resume_param_scheduler,
                              map_location)

    def load_checkpoint(self, filename, map_location='cpu', strict=False,
                        revise_keys=[(r'^module.', '')]):
        if is_sharded_checkpoint(filename):
            checkpoint = self._load_sharded(filename, resume=self._resuming)
        elif isinstance(self.model, FullyShardedWrapper):
            checkpoint = self._load_full_into_shards(filename, strict)
        else:
            return super().load_checkpoint(filename, map_location, strict, revise_keys)
        self._has_loaded = True
        self.logger.info(f'Load checkpoint from {filename}')
        return checkpoint

    def _load_sharded(self, path, resume):
        from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                             get_optimizer_state_dict,
                                                             set_model_state_dict,
                                                             set_optimizer_state_dict)
        train_state = read_train_state(path)
        self.call_hook('after_load_checkpoint', checkpoint=train_state)
        model = self._plain_model()
        weights = get_model_state_dict(model)
        if not resume:
            # load_from: the averaged weights when the run kept them (as mmengine's
            # load_from reads the EMA weights a single-file checkpoint holds).
            if any(key.startswith('ema.module.') for key in sharded_keys(path)):
                load_sharded(path, dict(ema={f'module.{k}': v for k, v in weights.items()}))
                self.logger.info(f'{path}: initial weights are the EMA weights')
            else:
                load_sharded(path, dict(model=weights))
            set_model_state_dict(model, weights)
            return train_state

        states = dict(model=weights)
        optimizer = None
        if self._resume_optimizer and 'optimizer_param_groups' in train_state:
            optimizer = self._single_optimizer()
            states['optimizer'] = dict(state=get_optimizer_state_dict(model, optimizer)['state'])
        for hook in self.hooks:
            if hasattr(hook, 'sharded_state'):
                states.update(hook.sharded_state())
        load_sharded(path, states)
        set_model_state_dict(model, weights)
        if optimizer is not None:
            set_optimizer_state_dict(model, optimizer, dict(
                state=states['optimizer']['state'],
                param_groups=train_state['optimizer_param_groups']))
        return train_state

    def _load_full_into_shards(self, filename, strict):
        """A single-file checkpoint's (full) weights into the sharded model: every rank
        reads the file and keeps its own shards."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             set_model_state_dict)
        checkpoint = _load_checkpoint(filename, map_location='cpu')
        self.call_hook('after_load_checkpoint', checkpoint=checkpoint)
        state = checkpoint.get('state_dict', checkpoint)
        state = {k[len('module.'):] if k.startswith('module.') else k: v
                 for k, v in state.items()}
        missing, unexpected = set_model_state_dict(
            self._plain_model(), state,
            options=StateDictOptions(full_state_dict=True, strict=strict))
        if missing or unexpected:
            print_log(f'{filename}: missing keys {list(missing)[:10]}, unexpected keys '
                      f'{list(unexpected)[:10]}', logger='current', level=logging.WARNING)
        return checkpoint

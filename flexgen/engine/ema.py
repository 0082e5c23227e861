"""An exponential moving average of the weights that works on sharded models.

mmengine's ``EMAHook`` builds ``ExponentialMovingAverage``, which deep-copies the model: a
second full model per rank, and impossible once FSDP has sharded it. Here the average is a
list of tensors, one per parameter, each with the parameter's own sharding: a rank holds
and updates only the average of its shard (``1 / world_size`` of the EMA's memory), with
no communication. Averaging is elementwise, so the shards of the average are the average of
the shards: consolidating them gives what an unsharded EMA gives.
"""
import logging
from collections import OrderedDict

import torch
from mmengine.hooks import EMAHook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper

from flexgen.fileio import CheckpointError, weights_problems
from flexgen.registry import HOOKS


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The rank's own part of a (possibly sharded) tensor, sharing its storage."""
    return tensor.to_local() if hasattr(tensor, 'to_local') else tensor


def copy_into(target: torch.Tensor, source: torch.Tensor) -> None:
    """``target.copy_(source)`` where ``target`` may be a sharded ``DTensor`` and
    ``source`` either a ``DTensor`` of the same layout or the full tensor (then this rank
    takes its own shard of it, without communication)."""
    if hasattr(target, 'to_local') and not hasattr(source, 'to_local'):
        from torch.distributed.tensor import distribute_tensor
        source = distribute_tensor(source.to(target.device, target.dtype), target.device_mesh,
                                   target.placements, src_data_rank=None)
    _local(target).copy_(_local(source))


class ShardedEMA:
    """The EMA of a model's parameters, kept per local shard.

    ``averaged = (1 - momentum) * averaged + momentum * current`` (mmengine's
    ``ExponentialMovingAverage`` formula and argument meaning: ``momentum`` is
    ``1 - decay``), updated every ``interval`` calls, the first call copying the weights.
    Buffers are copied (or averaged with ``update_buffers=True``), as mmengine does.

    ``state_dict()`` has mmengine's keys (``steps`` and ``module.<name>``) with sharded
    values where the model is sharded, so it is saved as shards by
    ``torch.distributed.checkpoint`` and, unsharded, reads like mmengine's EMA.
    """

    def __init__(self, model: torch.nn.Module, momentum: float = 0.0002, interval: int = 1,
                 update_buffers: bool = False):
        if not 0.0 < momentum < 1.0:
            raise ValueError(f'ShardedEMA: momentum must be in (0, 1), got {momentum}')
        self.momentum, self.interval, self.update_buffers = momentum, interval, update_buffers
        self.steps = torch.tensor(0, dtype=torch.long)
        self.param_names = {name for name, _ in model.named_parameters()}
        with torch.no_grad():
            self.averages = OrderedDict(
                (name, value.detach().clone()) for name, value in self._sources(model).items())
        # What the update averages: floating-point parameters (and buffers); the rest is copied.
        self.averaged = [name for name, value in self.averages.items()
                         if value.dtype.is_floating_point
                         and (update_buffers or name in self.param_names)]

    @staticmethod
    def _sources(model) -> 'OrderedDict[str, torch.Tensor]':
        """The model's parameters and persistent buffers by state-dict name."""
        return OrderedDict((name, value.detach())
                           for name, value in model.state_dict(keep_vars=True).items())

    @torch.no_grad()
    def update_parameters(self, model: torch.nn.Module) -> None:
        sources = self._sources(model)
        if int(self.steps) == 0:
            for name, average in self.averages.items():
                copy_into(average, sources[name])
        elif int(self.steps) % self.interval == 0:
            torch._foreach_lerp_([_local(self.averages[n]) for n in self.averaged],
                                 [_local(sources[n]) for n in self.averaged], self.momentum)
        if not self.update_buffers:
            for name, average in self.averages.items():
                if name not in self.param_names:
                    copy_into(average, sources[name])
        self.steps += 1

    @torch.no_grad()
    def copy_from(self, model: torch.nn.Module) -> None:
        """Set every average to the model's current value (before the EMA begins)."""
        sources = self._sources(model)
        for name, average in self.averages.items():
            copy_into(average, sources[name])

    @torch.no_grad()
    def swap(self, model: torch.nn.Module, with_buffers: bool) -> None:
        """Exchange the model's weights (and buffers) with the averages, shard by shard."""
        sources = self._sources(model)
        for name, average in self.averages.items():
            if name in self.param_names or with_buffers:
                local_avg, local_src = _local(average), _local(sources[name])
                held = local_avg.clone()
                local_avg.copy_(local_src)
                local_src.copy_(held)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> 'OrderedDict[str, torch.Tensor]':
        state = OrderedDict(steps=self.steps)
        state.update((f'module.{name}', value) for name, value in self.averages.items())
        return state

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict, strict: bool = True) -> None:
        expected = set(self.state_dict())
        missing, unexpected = expected - set(state_dict), set(state_dict) - expected
        if strict and (missing or unexpected):
            raise KeyError(f'ShardedEMA.load_state_dict: missing {sorted(missing)[:5]}, '
                           f'unexpected {sorted(unexpected)[:5]}')
        given = {name: state_dict[f'module.{name}'] for name in self.averages
                 if f'module.{name}' in state_dict}
        problems = weights_problems({name: self.averages[name] for name in given}, given)
        if problems:
            raise CheckpointError('its weights do not fit the model (' + '; '.join(problems)
                                  + ')')
        if 'steps' in state_dict:
            self.steps = torch.as_tensor(state_dict['steps'], dtype=torch.long).cpu().clone()
        for name, average in self.averages.items():
            if f'module.{name}' in state_dict:
                copy_into(average, state_dict[f'module.{name}'])


@HOOKS.register_module()
class FlexEMAHook(EMAHook):
    """mmengine's ``EMAHook`` with the average kept per shard (:class:`ShardedEMA`).

    Same arguments, same behaviour (validation and testing with the averaged weights;
    ``begin_iter`` / ``begin_epoch``), the same numbers, and: no copy of the model (so it
    works sharded, ``FullyShardedWrapper``), one ``foreach`` update for all tensors, and
    no host sync per step (mmengine's average tests a step count kept on the device).
    Every flexgen config uses it. In a single-file checkpoint (``.pth``) it
    writes mmengine's layout (``state_dict`` holds the averaged weights, ``ema_state_dict``
    the raw ones as ``module.*`` plus ``steps``); in a sharded checkpoint the runner saves
    the average as ``ema`` (``ema.steps``, ``ema.module.*``) next to ``model``.

    Args:
        momentum: ``1 - decay`` of the average (mmengine's meaning).
        interval: update every ``interval`` iterations.
        update_buffers: average floating-point buffers too (else they are copied).
        strict_load, begin_iter, begin_epoch: as in ``EMAHook``.
    """

    def __init__(self, momentum: float = 0.0002, interval: int = 1, update_buffers: bool = False,
                 strict_load: bool = False, begin_iter: int = 0, begin_epoch: int = 0,
                 ema_type: str = 'ExponentialMovingAverage'):
        if ema_type != 'ExponentialMovingAverage':
            raise ValueError(f"FlexEMAHook averages as ExponentialMovingAverage; "
                             f"ema_type={ema_type!r} is not supported")
        super().__init__(strict_load=strict_load, begin_iter=begin_iter,
                         begin_epoch=begin_epoch, momentum=momentum, interval=interval,
                         update_buffers=update_buffers)
        self.momentum, self.interval, self.update_buffers = momentum, interval, update_buffers

    def before_run(self, runner) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        self.src_model = model
        self.ema_model = ShardedEMA(model, self.momentum, self.interval, self.update_buffers)

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        if self._ema_started(runner):
            self.ema_model.update_parameters(self.src_model)
        else:
            self.ema_model.copy_from(self.src_model)

    def _swap_ema_parameters(self) -> None:
        self.ema_model.swap(self.src_model, with_buffers=self.update_buffers)

    def sharded_state(self) -> dict:
        """What a sharded checkpoint saves for this hook (``FlexRunner`` asks)."""
        return {'ema': self.ema_model}

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        if 'state_dict' in checkpoint:  # a single-file checkpoint: mmengine's layout
            super().before_save_checkpoint(runner, checkpoint)

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        try:
            self._load_average(runner, checkpoint)
        except CheckpointError as error:
            raise CheckpointError(f'{runner._load_from or "the checkpoint"} does not fit the '
                                  f"config's model: {error}") from None

    def _load_average(self, runner, checkpoint: dict) -> None:
        if 'state_dict' not in checkpoint:
            return  # a sharded checkpoint: the runner loaded the average with the weights
        if 'ema_state_dict' in checkpoint and runner._resume:
            self._swap_ema_state_dict(checkpoint)
            self.ema_model.load_state_dict(checkpoint['ema_state_dict'], strict=self.strict_load)
            return
        if runner._resume:
            print_log('There is no `ema_state_dict` in checkpoint. `FlexEMAHook` starts '
                      'the average from `state_dict`', 'current', logging.WARNING)
        self.ema_model.load_state_dict(
            {f'module.{k}': v for k, v in checkpoint['state_dict'].items()}, strict=False)

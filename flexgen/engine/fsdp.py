"""Sharded data parallelism with torch's FSDP2 (``torch.distributed.fsdp.fully_shard``).

ZeRO-3 (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion
Parameter Models") as torch implements it: every parameter is a ``DTensor`` sharded on its
first dimension over the data-parallel ranks, so parameters, gradients and optimizer state
cost ``1 / world_size`` of their size per rank. Each transformer block is one unit: its
parameters are all-gathered just before its forward (and again before its backward) and
freed after; gradients are reduce-scattered (averaged, like DDP's all-reduce) as soon as
the block's backward is done.

Selected from a config::

    model_wrapper_cfg = dict(type='FullyShardedWrapper',
                             mixed_precision=dict(param_dtype='bfloat16',
                                                  reduce_dtype='float32'))
    custom_hooks = [dict(type='FlexEMAHook', momentum=1e-4, priority='ABOVE_NORMAL')]

Design: a model wrapper (mmengine's ``model_wrapper_cfg``, the key that already chooses
DDP) shards the model, and :class:`~flexgen.engine.runner.FlexRunner` (flexgen's Runner)
saves and resumes sharded state through ``torch.distributed.checkpoint``. mmengine's
``FlexibleRunner`` strategies were not used: FlexibleRunner is a separate, experimental
build path (it reads ``batch_size`` off samplers that packing samplers lack, and its
checkpoint flow breaks ``EMAHook``), whereas the Runner is the path every flexgen config,
loop and hook is built and tested on; its FSDP strategy is FSDP1, which refuses CPUs.
"""
from contextlib import contextmanager, nullcontext
from operator import attrgetter
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from flexgen.registry import MODEL_WRAPPERS

_DTYPES = {'float32': torch.float32, 'fp32': torch.float32, 'bfloat16': torch.bfloat16,
           'bf16': torch.bfloat16}


def _dtype(value, field: str) -> Optional[torch.dtype]:
    if value is None or isinstance(value, torch.dtype):
        dtype = value
    elif isinstance(value, str) and value in _DTYPES:
        dtype = _DTYPES[value]
    else:
        raise ValueError(f'FullyShardedWrapper: mixed_precision.{field}={value!r} is not one '
                         f'of {sorted(_DTYPES)} (float16 would need loss scaling across '
                         'shards, which this wrapper does not do: use bfloat16)')
    if dtype not in (None, torch.float32, torch.bfloat16):
        raise ValueError(f'FullyShardedWrapper: mixed_precision.{field}={dtype} must be '
                         'float32 or bfloat16')
    return dtype


def is_sharded_wrapper_cfg(model_wrapper_cfg) -> bool:
    """Whether a ``model_wrapper_cfg`` selects :class:`FullyShardedWrapper` (or a subclass)."""
    if not model_wrapper_cfg:
        return False
    kind = model_wrapper_cfg.get('type')
    if isinstance(kind, str):
        try:
            kind = MODEL_WRAPPERS.get(kind[len('flexgen.'):] if kind.startswith('flexgen.')
                                      else kind)
        except KeyError:  # a wrapper flexgen does not know (mmengine's wrap_model decides)
            return False
    return isinstance(kind, type) and issubclass(kind, FullyShardedWrapper)


def _broadcast_from_rank0(module: nn.Module) -> None:
    """Every rank starts from rank 0's weights (what DDP does on construction): the shards
    cut from each rank's own copy must come from one model."""
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor, src=0)


@MODEL_WRAPPERS.register_module()
class FullyShardedWrapper(nn.Module):
    """Shards a model with FSDP2: one unit per transformer block plus the rest as the root.

    The wrapped model is ``self.module`` (as with DDP), so hooks that reach the model
    through ``runner.model.module`` find it; its parameters become sharded ``DTensor`` s.
    Build it from a config (``model_wrapper_cfg``) under ``torchrun ... --launcher pytorch``
    with :class:`~flexgen.engine.runner.FlexRunner` (the Runner flexgen's tools build),
    which writes sharded checkpoints; mmengine's ``EMAHook`` deep-copies the model, which a
    sharded model cannot do: use :class:`~flexgen.engine.ema.FlexEMAHook`.

    Args:
        module: the model (an mmengine ``BaseModel``).
        blocks: paths of ``ModuleList`` s whose every element is sharded as its own unit
            (all-gathered for its forward and backward only). Paths that the model lacks
            are an error.
        mixed_precision: ``None`` (float32 everywhere), or ``dict(param_dtype=...,
            reduce_dtype=...)`` with ``'bfloat16'`` / ``'float32'``: the sharded master
            weights and optimizer stay float32; the all-gathered weights (and so the
            compute, which runs under ``torch.autocast`` of ``param_dtype``) are
            ``param_dtype``; gradients are reduce-scattered in ``reduce_dtype``.
        reshard_after_forward: free each block's gathered weights after its forward
            (ZeRO-3; gathered again for the backward) or keep them until the backward
            (ZeRO-2-like: one all-gather fewer per block and step, the blocks' full
            weights held through the forward).
    """

    def __init__(self, module: nn.Module, blocks: Sequence[str] = ('backbone.blocks',),
                 mixed_precision: Optional[dict] = None, reshard_after_forward: bool = True):
        super().__init__()
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        unknown = set(mixed_precision or {}) - {'param_dtype', 'reduce_dtype'}
        if unknown:
            raise ValueError(f'FullyShardedWrapper: mixed_precision takes param_dtype and '
                             f'reduce_dtype, not {sorted(unknown)}')
        mixed_precision = mixed_precision or {}
        self.param_dtype = _dtype(mixed_precision.get('param_dtype'), 'param_dtype')
        reduce_dtype = _dtype(mixed_precision.get('reduce_dtype'), 'reduce_dtype')
        units = []
        for path in ([blocks] if isinstance(blocks, str) else list(blocks)):
            try:
                container = attrgetter(path)(module)
            except AttributeError:
                raise ValueError(f'FullyShardedWrapper: blocks={path!r} is not a sub-module of '
                                 f'{type(module).__name__}') from None
            if not isinstance(container, (nn.ModuleList, nn.Sequential)):
                raise ValueError(f'FullyShardedWrapper: blocks={path!r} is a '
                                 f'{type(container).__name__}, not a ModuleList of blocks')
            units.extend(container)
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError('FullyShardedWrapper needs a process group: launch with '
                               'torchrun ... tools/train.py CONFIG --launcher pytorch')

        if hasattr(module, 'init_weights'):
            module.init_weights()  # before sharding (FlexRunner does not call it again)
        _broadcast_from_rank0(module)
        device = next(module.parameters()).device.type
        mesh = init_device_mesh(device, (dist.get_world_size(),))
        # Inputs are not cast: the compute dtype is autocast's, so RoPE tables, times and
        # the loss keep float32 where autocast keeps it.
        policy = MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=reduce_dtype,
                                      cast_forward_inputs=False)
        self.reshard_after_forward = reshard_after_forward
        for unit in units:
            fully_shard(unit, mesh=mesh, mp_policy=policy,
                        reshard_after_forward=reshard_after_forward)
        # The root's own weights (embedders, final layer) are needed again at the start of
        # the backward: kept gathered after the forward.
        fully_shard(module, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
        self.module = module
        self.device_type = device
        self.runner_checked = False  # FlexRunner sets it; see train_step

    # ------------------------------------------------------------------ steps
    def _autocast(self):
        if self.param_dtype in (None, torch.float32):
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.param_dtype)

    def train_step(self, data, optim_wrapper):
        if not self.runner_checked:
            raise RuntimeError(
                "FullyShardedWrapper trains under flexgen's FlexRunner only (what "
                'tools/train.py builds unless the config names another runner_type): '
                "mmengine's Runner saves checkpoints from rank 0 alone and would lose the "
                'other shards')
        # Gradient accumulation: reduce-scatter only on the micro-step that updates.
        self.module.set_requires_gradient_sync(optim_wrapper.should_sync())
        with self._autocast():
            return self.module.train_step(data, optim_wrapper)

    def val_step(self, data):
        with self.gathered():
            return self.module.val_step(data)

    def test_step(self, data):
        with self.gathered():
            return self.module.test_step(data)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    # ------------------------------------------------------------------ evaluation
    def _units(self):
        from torch.distributed.fsdp import FSDPModule
        return [m for m in self.module.modules() if isinstance(m, FSDPModule)]

    @contextmanager
    def gathered(self):
        """The model with its full weights on every rank, computing in ``param_dtype``,
        for the duration; a collective: every rank enters.

        For evaluation and sample previews: generation runs each rank's own requests
        through the model a number of times that may differ between ranks (adaptive ODE
        solvers), or on one rank only; with every unit gathered and kept gathered, a
        forward needs no communication, so ranks cannot deadlock.
        """
        units = self._units()
        for unit in units:
            unit.unshard()
            unit.set_reshard_after_forward(False, recurse=False)
        try:
            with self._autocast():
                yield self.module
        finally:
            for unit in units:
                unit.set_reshard_after_forward(
                    self.reshard_after_forward if unit is not self.module else False,
                    recurse=False)
            # Reshards every unit and forgets the order of the forwards just run (the next
            # backward prefetches by it; ranks that ran different forwards would disagree).
            self.module.reset_iter_state()

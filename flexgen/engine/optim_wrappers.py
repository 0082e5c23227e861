"""Optimiser wrappers: no host sync per step, mixed precision on any device."""
from contextlib import contextmanager

import torch
from mmengine.optim import OptimWrapper

from flexgen.registry import OPTIM_WRAPPERS

_DTYPES = {'bfloat16': torch.bfloat16, 'bf16': torch.bfloat16,
           'float16': torch.float16, 'fp16': torch.float16, 'half': torch.float16}


@OPTIM_WRAPPERS.register_module()
class FlexOptimWrapper(OptimWrapper):
    """mmengine's ``OptimWrapper`` that keeps the clipped gradient norm on the device
    (``last_grad_norm``) instead of reading it to the host at every step (mmengine's
    ``float(grad)``, a device sync per step); ``FlexTrainLoop`` logs it with the other
    scalars of the step at its next flush. Arguments are ``OptimWrapper``'s."""

    last_grad_norm = None

    def _clip_grad(self) -> None:
        params = [p for group in self.optimizer.param_groups for p in group['params']
                  if p.requires_grad and p.grad is not None]
        if params:
            norm = self.clip_func(params, **self.clip_grad_kwargs)
            if hasattr(norm, 'full_tensor'):  # sharded (FSDP) gradients give a DTensor norm
                norm = norm.full_tensor()
            self.last_grad_norm = None if norm is None else norm.detach()


@OPTIM_WRAPPERS.register_module()
class AutocastOptimWrapper(FlexOptimWrapper):
    """``OptimWrapper`` that runs the forward pass under ``torch.autocast``.

    mmengine's ``AmpOptimWrapper`` requires CUDA (or NPU/MLU/MUSA) and always builds a
    CUDA grad scaler; this one autocasts on whatever device the model is on, CPU
    included. bfloat16 (the default) has float32's exponent range, so gradients need no
    loss scaling and there is no scaler. float16 gets a ``torch.amp.GradScaler``
    (dynamic loss scaling) whose state is saved with the optimizer.

    Args:
        dtype: ``'bfloat16'`` (default), ``'float16'`` or a ``torch.dtype``.
        device_type: the autocast device (``'cpu'``, ``'cuda'``, ...); by default the
            device of the optimizer's first parameter.
        **kwargs: ``OptimWrapper``'s (``optimizer``, ``accumulative_counts``,
            ``clip_grad``).
    """

    def __init__(self, dtype='bfloat16', device_type: str = None, **kwargs):
        super().__init__(**kwargs)
        if isinstance(dtype, str):
            if dtype not in _DTYPES:
                raise ValueError(f'AutocastOptimWrapper: dtype={dtype!r} is not one of '
                                 f'{sorted(_DTYPES)}')
            dtype = _DTYPES[dtype]
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f'AutocastOptimWrapper: dtype={dtype} must be torch.bfloat16 '
                             'or torch.float16')
        self.cast_dtype = dtype
        self.device_type = device_type or self._param_device_type()
        self.loss_scaler = (torch.amp.GradScaler(self.device_type)
                            if dtype == torch.float16 else None)

    def _param_device_type(self) -> str:
        for group in self.optimizer.param_groups:
            for param in group['params']:
                return param.device.type
        return 'cpu'

    @contextmanager
    def optim_context(self, model):
        with super().optim_context(model), \
                torch.autocast(self.device_type, dtype=self.cast_dtype):
            yield

    def backward(self, loss: torch.Tensor, **kwargs) -> None:
        if self.loss_scaler is None:
            return super().backward(loss, **kwargs)
        self.loss_scaler.scale(loss).backward(**kwargs)
        self._inner_count += 1

    def step(self, **kwargs) -> None:
        if self.loss_scaler is None:
            return super().step(**kwargs)
        if self.clip_grad_kwargs:
            self.loss_scaler.unscale_(self.optimizer)  # clip the true gradients
            self._clip_grad()
        self.loss_scaler.step(self.optimizer, **kwargs)
        self.loss_scaler.update()

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.loss_scaler is not None:
            state['loss_scaler'] = self.loss_scaler.state_dict()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        scaler_state = state_dict.pop('loss_scaler', None)
        if scaler_state is not None and self.loss_scaler is not None:
            self.loss_scaler.load_state_dict(scaler_state)
        super().load_state_dict(state_dict)

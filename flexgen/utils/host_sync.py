"""Counting the host-device synchronisations of a piece of code, on any machine.

On a GPU, ``torch.cuda.set_sync_debug_mode('warn')`` reports the syncs torch makes; a CPU
has none to report. :class:`HostSyncCounter` finds the same ones by watching every torch
call (a ``TorchFunctionMode``) and tracking which tensors *would* live on the device:
the model's parameters and buffers, what the data preprocessor moved there, and every
result of an operation on them (tensors made with ``device=`` the model's device too).
It counts, as the GPU would sync for them:

- reads of a device tensor's values on the host: ``item``, ``tolist``, ``numpy``,
  ``cpu`` / ``to('cpu')``, ``bool`` / ``int`` / ``float`` / ``index``, ``equal``;
- operations whose output size depends on values: ``nonzero``, ``unique``,
  ``masked_select``, boolean-mask indexing, ``repeat_interleave`` without
  ``output_size``, one-argument ``where``;
- blocking host-to-device copies: a host tensor moved to the device without
  ``non_blocking=True``, ``torch.tensor`` / ``as_tensor`` of host data onto the device.

Each count keeps a short stack, so a test failure says where. ``phase`` names the part
of the code being counted (e.g. ``'step'`` vs ``'engine'``).
"""
import contextlib
import traceback
import weakref
from collections import defaultdict
from typing import Dict, List

import torch
from torch.overrides import TorchFunctionMode, resolve_name
from torch.utils._pytree import tree_flatten

_READS = {'item', 'tolist', 'numpy', 'cpu', '__bool__', '__int__', '__float__', '__index__',
          '__format__', 'equal', 'allclose'}
_VALUE_SHAPED = {'nonzero', 'unique', 'unique_consecutive', 'masked_select', 'argwhere',
                 'nonzero_static'}
_FACTORIES = {'tensor', 'as_tensor', 'zeros', 'ones', 'empty', 'full', 'arange', 'rand',
              'randn', 'randint', 'linspace', 'zeros_like', 'ones_like', 'empty_like',
              'full_like', 'eye'}


_ACTIVE: List['HostSyncCounter'] = []  # the counters now counting, innermost last


@contextlib.contextmanager
def host_work():
    """Code that only builds host-side data inside a counted region (e.g. a packed layout
    made in a forward, then pinned and moved without blocking): on a GPU machine it syncs
    nothing, so an active :class:`HostSyncCounter` files what it sees there under the
    ``'data'`` phase (host work), as it does for the data loader."""
    counter = _ACTIVE[-1] if _ACTIVE else None
    if counter is None:
        yield
        return
    phase, counter.phase = counter.phase, 'data'
    try:
        yield
    finally:
        counter.phase = phase


def _name(func) -> str:
    name = resolve_name(func) or getattr(func, '__name__', str(func))
    return name.rsplit('.', 1)[-1]


class HostSyncCounter(TorchFunctionMode):
    """A context that counts host syncs by phase (see the module docstring).

    Args:
        device: the device the model runs on (on a CPU test machine, ``'cpu'``: a tensor
            counts as a device tensor by how it was made, not by where it is).
    """

    def __init__(self, device='cpu'):
        super().__init__()
        self.device = torch.device(device)
        self.phase = 'default'
        self.events: Dict[str, List[str]] = defaultdict(list)
        self._device = {}  # id -> weak reference (tensors hash and compare elementwise)

    def __enter__(self):
        _ACTIVE.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        _ACTIVE.remove(self)
        return super().__exit__(*exc)

    # ------------------------------------------------------------------ tagging
    def mark(self, *objects) -> None:
        """Take every tensor inside ``objects`` (modules, containers, batches) as living
        on the device."""
        for obj in objects:
            if isinstance(obj, torch.nn.Module):
                for tensor in list(obj.parameters()) + list(obj.buffers()):
                    self._add(tensor)
                continue
            if hasattr(obj, '__dict__') and not isinstance(obj, torch.Tensor):
                obj = vars(obj)
            for leaf in tree_flatten(obj)[0]:
                if isinstance(leaf, torch.Tensor):
                    self._add(leaf)
                elif hasattr(leaf, '__dict__') and not isinstance(leaf, type):
                    self.mark(vars(leaf))

    def _add(self, tensor) -> None:
        key = id(tensor)
        self._device[key] = weakref.ref(tensor, lambda _, key=key: self._device.pop(key, None))

    def on_device(self, tensor) -> bool:
        ref = self._device.get(id(tensor)) if isinstance(tensor, torch.Tensor) else None
        return ref is not None and ref() is tensor

    def count(self, what: str) -> None:
        stack = ''.join(traceback.format_stack(limit=8)[:-2])
        self.events[self.phase].append(f'{what}\n{stack}')

    def counts(self) -> Dict[str, int]:
        return {phase: len(events) for phase, events in self.events.items()}

    # ------------------------------------------------------------------ the mode
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _name(func)
        leaves = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)]
        from_device = any(self.on_device(x) for x in leaves)
        target = self._target_device(name, args, kwargs)
        moves_here = self._moves_to_device(name, args, kwargs, target)
        if name == 'copy_' and len(args) > 1 and self.on_device(args[0]) and \
                isinstance(args[1], torch.Tensor) and not self.on_device(args[1]):
            if not kwargs.get('non_blocking', args[2] if len(args) > 2 else False):
                self.count('copy_() of host data into a device tensor, blocking')
        elif from_device:
            if name in _READS or name in _VALUE_SHAPED:
                self.count(f'{name}() of a device tensor')
            elif name in ('to', 'copy_') and target is not None and target.type == 'cpu' \
                    and self.device.type != 'cpu':
                self.count(f'{name}() to the host')
            elif name == 'repeat_interleave' and 'output_size' not in kwargs and \
                    any(isinstance(a, torch.Tensor) for a in args[1:2]):
                self.count('repeat_interleave() without output_size')
            elif name == 'where' and len(args) + len(kwargs) == 1:
                self.count('where(condition)')
            elif name in ('__getitem__', 'index_put_', '__setitem__') and any(
                    isinstance(x, torch.Tensor) and x.dtype == torch.bool for x in leaves[1:]):
                self.count(f'{name} with a boolean mask')
        elif moves_here and not kwargs.get('non_blocking', False):
            self.count(f'{name}() of host data onto the device, blocking')
        with torch._C.DisableTorchFunction():
            result = func(*args, **kwargs)
            if moves_here and not from_device and leaves and result is leaves[0]:
                # a move to the CPU "device" of a CPU tensor returns it as is: keep the
                # host original apart from its device copy
                result = result.clone()
        if from_device or moves_here or (name in _FACTORIES and target == self.device):
            self.mark(result)
        return result

    def _target_device(self, name, args, kwargs):
        device = kwargs.get('device')
        if device is None and name in ('to', 'cuda'):
            for arg in args[1:]:
                if isinstance(arg, (str, torch.device)):
                    try:
                        return torch.device(arg)
                    except RuntimeError:
                        continue
                if isinstance(arg, torch.Tensor):
                    return self.device if self.on_device(arg) else arg.device
        if name == 'cuda':
            return torch.device('cuda')
        return torch.device(device) if isinstance(device, (str, torch.device)) else None

    def _moves_to_device(self, name, args, kwargs, target) -> bool:
        """Whether the call copies host data onto the model's device."""
        if name in ('to', 'cuda', 'tensor', 'as_tensor'):
            return target is not None and target == self.device
        return False


# ----------------------------------------------------------------------------- runners
@contextlib.contextmanager
def counting_batches_as_device(counter: HostSyncCounter):
    """While active, the batch flexgen's data preprocessor moves counts as on the device
    with its geometry (on a CPU the move keeps the geometry's tensors as they are)."""
    from flexgen.models.data_preprocessor import FlexDataPreprocessor
    real = FlexDataPreprocessor.forward

    def forward(self, data, training=False):
        data = real(self, data, training)
        inputs = data.get('inputs') if isinstance(data, dict) else None
        if hasattr(inputs, 'geometry'):
            counter.mark(inputs.geometry.tensors, inputs.geometry.plans)
        return data

    FlexDataPreprocessor.forward = forward
    try:
        yield counter
    finally:
        FlexDataPreprocessor.forward = real


def count_training_syncs(runner, start_iter: int = 1) -> HostSyncCounter:
    """Train ``runner`` counting host syncs from iteration ``start_iter`` (the first ones
    build optimizer state) in phases: ``'step'`` (``model.train_step``: forward, backward,
    optimizer), ``'checkpoint'`` (saving), ``'data'`` (loading and collating, host work:
    not a sync on a GPU machine) and ``'engine'`` (everything else: hooks, logging)."""
    from mmengine.hooks import Hook
    counter = HostSyncCounter('cpu')

    class Phases(Hook):
        def before_train_fetch(self, runner):  # FlexTrainLoop's hook point
            counter.phase = 'data'

        def before_train_iter(self, runner, batch_idx, data_batch=None):
            if runner.iter == start_iter:
                counter.mark(runner.model, *[value for hook in runner.hooks
                                             for value in vars(hook).values()
                                             if isinstance(value, torch.nn.Module)])
                counter.__enter__()
            counter.phase = 'engine'

        def after_train(self, runner):
            counter.__exit__(None, None, None)

    def in_phase(name, fn):
        def wrapped(*args, **kwargs):
            counter.phase = name
            try:
                return fn(*args, **kwargs)
            finally:
                counter.phase = 'engine'
        return wrapped

    runner.register_hook(Phases(), priority='VERY_HIGH')
    runner.model.train_step = in_phase('step', runner.model.train_step)
    runner.save_checkpoint = in_phase('checkpoint', runner.save_checkpoint)
    with counting_batches_as_device(counter):
        runner.train()
    return counter

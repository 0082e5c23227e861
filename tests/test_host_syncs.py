"""The training step of the tiny packed config (NiT's recipe on the demo shapes: packs,
RoPE, QK-norm, direction loss, EMA, gradient clipping) makes no host-device sync: none in
forward + backward + optimizer step, and the engine's own (logging, checks) only at its
flushes. Counted on CPU by flexgen.utils.host_sync, which tracks which tensors would live
on the GPU (tools/gpu_check.py counts the real ones with CUDA's sync debug mode)."""
import os.path as osp
import uuid

import torch

import flexgen
from flexgen.models.data_preprocessor import FlexDataPreprocessor
from flexgen.utils.host_sync import HostSyncCounter, count_training_syncs, host_work
from helpers import load_tool

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIG = osp.join(ROOT, 'configs', 'nit', 'nit_tiny_shapes_pack.py')
STEPS, LOG_EVERY = 9, 4


def test_tiny_packed_training_step_makes_no_host_sync():
    flexgen.register_all_modules()
    torch.set_num_threads(1)
    runner = load_tool('train').build_runner([
        CONFIG, '--work-dir', f'/tmp/flexgen_syncs_{uuid.uuid4().hex[:8]}', '--cfg-options',
        'model.backbone.hidden_size=32', 'model.backbone.depth=2',
        'model.backbone.num_heads=2', 'train_dataloader.dataset.num_samples=400',
        'train_dataloader.batch_sampler.max_tokens=512', f'train_cfg.max_iters={STEPS}',
        f'default_hooks.logger.interval={LOG_EVERY}', 'default_hooks.checkpoint.interval=1000',
        'val_cfg=None', 'val_dataloader=None', 'val_evaluator=None',
        f'experiment_name=syncs_{uuid.uuid4().hex[:8]}'])
    events = count_training_syncs(runner).events

    assert type(runner.model.data_preprocessor) is FlexDataPreprocessor
    assert runner.message_hub.get_scalar('train/loss').data[0].size == STEPS
    assert not events['step'], '\n'.join(events['step'][:3])
    # The engine reads the steps' scalars once per flush: iterations 4 and 8 (logger) and
    # 9 (the last), counted from iteration 2. Saving the last checkpoint copies the weights
    # out (its own phase, once per save).
    assert len(events['engine']) <= len({4, 8, STEPS}), '\n'.join(events['engine'][:4])
    assert events['checkpoint']  # the counter sees the copies a save makes


def test_host_work_is_filed_as_data_not_as_a_sync_of_the_step():
    """A layout built on the host inside a counted forward (then moved without blocking)
    is host work, as in the data loader; the same factory outside it counts."""
    model = torch.nn.Linear(2, 2)
    with HostSyncCounter('cpu') as counter:
        counter.mark(model)
        with host_work():
            torch.tensor([[1, 4], [1, 5]], device='cpu').tolist()
        model.weight.sum().item()
    with host_work():  # no counter: a plain context
        torch.tensor([1])
    assert [e.splitlines()[0] for e in counter.events['default']] == ['item() of a device tensor']
    assert [e.splitlines()[0] for e in counter.events['data']] == [
        'tensor() of host data onto the device, blocking', 'tolist() of a device tensor']

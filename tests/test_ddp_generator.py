"""Two-process DDP (torchrun, gloo on CPU) training the real DiffusionGenerator on the demo
shapes with BucketBatchSampler equals one process at the same global batch, and the ranks
see disjoint images that together make up the single process's batches."""
import json
import os.path as osp
import uuid

import pytest
import torch
from mmengine.dist import get_dist_info
from mmengine.hooks import Hook

from flexgen.registry import HOOKS
from helpers import train_ok

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
STEPS, GLOBAL_BATCH = 6, 8

# The demo config shrunk: a 2-block width-32 FlexDiT, no evaluation or preview sampling,
# and this file's hook (custom_imports; PYTHONPATH holds tests/) recording each rank's data.
TINY = f'''
_base_ = [{osp.join(ROOT, 'configs', 'demo', 'shapes_flexdit_rf.py')!r}]
custom_imports = dict(imports=['test_ddp_generator'], allow_failed_imports=False)
model = dict(backbone=dict(hidden_size=32, depth=2, num_heads=2))
train_dataloader = dict(batch_size={GLOBAL_BATCH}, dataset=dict(num_samples=240))
train_cfg = dict(max_iters={STEPS}, val_interval={STEPS + 1})
param_scheduler = []
# SGD, not the demo's AdamW: Adam's step lr g / (|g| + eps) multiplies float32 summation-order
# differences by up to lr / (4 eps) for gradients near eps (1.7e-5 after 6 steps, measured);
# SGD's step is linear in the gradient, so it keeps them at float32 rounding.
optim_wrapper = dict(optimizer=dict(_delete_=True, type='SGD', lr=0.1, momentum=0.9))
val_dataloader = None
val_cfg = None
val_evaluator = None
test_dataloader = None
test_cfg = None
test_evaluator = None
custom_hooks = [dict(type='FlexEMAHook', momentum=0.1, priority='ABOVE_NORMAL'),
                dict(type='BatchRecorderHook')]
default_hooks = dict(checkpoint=dict(interval={STEPS}, save_last=False))
randomness = dict(seed=3)
'''


@HOOKS.register_module()
class BatchRecorderHook(Hook):
    """Writes the dataset indices and image sizes of every step this rank trained on to
    ``work_dir/batches_rank<r>.json``."""

    def before_train(self, runner):
        self.batches = []

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        self.batches.append(dict(index=data_batch['data_samples']['index'].tolist(),
                                 sizes=[list(x.shape[1:]) for x in data_batch['inputs']]))

    def after_train(self, runner):
        rank, _ = get_dist_info()
        with open(osp.join(runner.work_dir, f'batches_rank{rank}.json'), 'w') as f:
            json.dump(self.batches, f)


def train(config, work_dir, nproc):
    train_ok(config, work_dir, nproc, options=[
        f'train_dataloader.batch_size={GLOBAL_BATCH // nproc}',
        f'experiment_name=ddp_gen_{uuid.uuid4().hex[:8]}'])


def read_batches(work_dir, rank):
    with open(work_dir / f'batches_rank{rank}.json') as f:
        return json.load(f)


@pytest.mark.slow
def test_two_processes_equal_one_at_the_same_global_batch(tmp_path):
    config = tmp_path / 'tiny_ddp.py'
    config.write_text(TINY)
    train(config, tmp_path / 'one', nproc=1)
    train(config, tmp_path / 'ddp', nproc=2)

    # Data: at every step each rank holds half of the one-process batch, in order, all of
    # one size (a bucket), and the ranks' images are disjoint over the whole run.
    one = read_batches(tmp_path / 'one', 0)
    rank0, rank1 = read_batches(tmp_path / 'ddp', 0), read_batches(tmp_path / 'ddp', 1)
    assert len(one) == len(rank0) == len(rank1) == STEPS
    for single, a, b in zip(one, rank0, rank1):
        assert len(a['index']) == len(b['index']) == GLOBAL_BATCH // 2
        assert a['index'] + b['index'] == single['index']
        assert len({tuple(s) for s in a['sizes'] + b['sizes']}) == 1
        assert a['sizes'] + b['sizes'] == single['sizes']
    seen0 = {i for batch in rank0 for i in batch['index']}
    seen1 = {i for batch in rank1 for i in batch['index']}
    assert not seen0 & seen1 and len(seen0) == len(seen1) == STEPS * GLOBAL_BATCH // 2
    assert len({tuple(b['sizes'][0]) for b in one}) > 1  # several sizes over the steps

    # Weights: the same images and per-image draws (time, label drop, noise seeded by
    # (seed, step, index)); only the float32 summation order of the gradient differs
    # (measured < 5e-7 after 6 steps; a wrong sample or seed moves weights by ~1e-3).
    single = torch.load(tmp_path / 'one' / f'iter_{STEPS}.pth', weights_only=True)
    ddp = torch.load(tmp_path / 'ddp' / f'iter_{STEPS}.pth', weights_only=True)
    for key in ('state_dict', 'ema_state_dict'):
        assert single[key].keys() == ddp[key].keys()
        for name, value in single[key].items():
            torch.testing.assert_close(ddp[key][name], value, rtol=0, atol=1e-5,
                                       msg=lambda m, name=name: f'{key} {name}: {m}')
    # ... and training moved them: the zero-initialised output layer is no longer zero
    # by far more than the tolerance (the runs are not two copies of the initialisation).
    assert single['state_dict']['backbone.final_layer.linear.weight'].abs().max() > 1e-3

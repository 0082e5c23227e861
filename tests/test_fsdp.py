"""Sharded training on a CPU: FullyShardedWrapper (FSDP2), FlexEMAHook, sharded
checkpoints through torch.distributed.checkpoint, FlexRunner, the consolidation tool.

Fast tests run one process (a sharded config still writes sharded checkpoints, and one
process is what the world-size-1 side of resharding is); the slow ones run the tiny NiT and
FiT recipes on 2 gloo ranks with torchrun against DDP, kill a save halfway, resume, and
reshard to one process.
"""
import os
import os.path as osp
import pickle
import signal
import uuid

import numpy as np
import pytest
import torch
from mmengine.model import ExponentialMovingAverage
from PIL import Image
from safetensors import safe_open

from flexgen.engine.ema import ShardedEMA
from flexgen.engine.sharded_checkpoint import (TRAIN_STATE, consolidate, load_full_tensors,
                                               read_train_state)
from flexgen.fileio import CheckpointError
from helpers import ROOT, load_tool, run_train, train_ok

TOY = osp.join(ROOT, 'tests', 'configs', 'toy_train.py')
NIT = osp.join(ROOT, 'configs', 'nit', 'nit_tiny_shapes_pack.py')
FIT = osp.join(ROOT, 'configs', 'fit', 'fitv2_xl_2.py')
KILL_ENV = 'FLEXGEN_TEST_KILL_WHILE_SAVING'
train_tool = load_tool('train')


def _arm_kill(name: str) -> None:
    """In a torchrun worker: rank 1 is SIGKILLed right after it wrote its shards of the
    checkpoint ``name`` (rank 0 then waits in the save's collective until torchrun stops
    the job), so the save dies halfway."""
    import torch.distributed as dist
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    write_data = HuggingFaceStorageWriter.write_data

    def write_then_die(self, plan, planner):
        written = write_data(self, plan, planner)
        if str(self.path).endswith(f'.{name}.tmp') and dist.get_rank() == 1:
            written.wait()
            os.kill(os.getpid(), signal.SIGKILL)
        return written

    HuggingFaceStorageWriter.write_data = write_then_die


if os.environ.get(KILL_ENV):  # imported by a training worker (custom_imports)
    _arm_kill(os.environ[KILL_ENV])



def sharded(base, ema_momentum=0.1, extra='', wrapper='', hooks=''):
    """A config file's text: ``base`` trained with FullyShardedWrapper (``wrapper``: more
    of its arguments) and FlexEMAHook (``hooks``: more hooks)."""
    return (f'_base_ = [{base!r}]\n'
            f"model_wrapper_cfg = dict(type='FullyShardedWrapper'{wrapper})\n"
            f"custom_hooks = [dict(type='FlexEMAHook', momentum={ema_momentum}, "
            f"priority='ABOVE_NORMAL'){hooks}]\n" + extra)


def unsharded(base, ema_momentum=0.1, extra='', hooks=''):
    return (f'_base_ = [{base!r}]\n'
            f"custom_hooks = [dict(type='FlexEMAHook', momentum={ema_momentum}, "
            f"priority='ABOVE_NORMAL'){hooks}]\n" + extra)


def write(path, text):
    path.write_text(text)
    return str(path)


def run_in_process(config, work_dir, *options, resume=None):
    argv = [config, '--work-dir', str(work_dir)]
    if resume is not None:
        argv += ['--resume', str(resume)]
    argv += ['--cfg-options', f'experiment_name=fsdp_{uuid.uuid4().hex[:8]}', *options]
    runner = train_tool.build_runner(argv)
    runner.train()
    return runner


def assert_same_tensors(a: dict, b: dict, atol=0.0):
    assert a.keys() == b.keys()
    for key, value in a.items():
        if atol == 0.0:
            assert torch.equal(value, b[key]), key
        else:
            torch.testing.assert_close(b[key], value, rtol=0, atol=atol,
                                       msg=lambda m, key=key: f'{key}: {m}')


# --------------------------------------------------------------------------- the EMA
@pytest.mark.parametrize('update_buffers', [False, True])
def test_sharded_ema_equals_mmengine_ema(update_buffers):
    """ShardedEMA (foreach lerp on local tensors) gives mmengine's ExponentialMovingAverage
    bit for bit: first call copies, updates every `interval` calls, buffers copied or
    averaged; the state dicts have the same keys in the same order."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8),
                                torch.nn.Linear(8, 2))
    reference = ExponentialMovingAverage(model, momentum=0.3, interval=2,
                                         update_buffers=update_buffers)
    ours = ShardedEMA(model, momentum=0.3, interval=2, update_buffers=update_buffers)
    for _ in range(7):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(5, 4))  # moves the BatchNorm statistics
        reference.update_parameters(model)
        ours.update_parameters(model)
    expected, got = reference.state_dict(), ours.state_dict()
    assert list(expected) == list(got)
    assert_same_tensors(expected, got)
    # ... and they are not the model's weights (the average did something).
    assert not torch.equal(got['module.0.weight'], model[0].weight)
    # Swapping in and out is exact.
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ours.swap(model, with_buffers=update_buffers)
    assert torch.equal(model[0].weight, expected['module.0.weight'])
    ours.swap(model, with_buffers=update_buffers)
    assert_same_tensors(before, model.state_dict())


def test_sharded_ema_refuses_a_state_that_does_not_fit_and_keeps_its_own():
    """A checkpoint's averages with another shape or a NaN are refused by name, and the
    averages in use are left as they were."""
    from flexgen.fileio import CheckpointError
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    ema = ShardedEMA(model, momentum=0.3)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    bad_shape = dict(before, **{'module.1.weight': torch.zeros(2, 9)})
    with pytest.raises(CheckpointError, match=r'shape mismatches: 1\.weight \(2, 9\) != \(2, 8\)'):
        ema.load_state_dict(bad_shape)
    nan = dict(before, **{'module.0.bias': torch.full((8,), float('nan'))})
    with pytest.raises(CheckpointError, match=r'non-finite values .* 0\.bias'):
        ema.load_state_dict(nan)
    assert_same_tensors(before, ema.state_dict())


# --------------------------------------------------------------------------- one process
@pytest.fixture(scope='module')
def toy_runs(tmp_path_factory):
    """The toy recipe, 8 steps, once as mmengine writes it (EMAHook, single files) and
    once as a sharded config in one process (FlexEMAHook, sharded checkpoints)."""
    root = tmp_path_factory.mktemp('toy')
    options = ['default_hooks.checkpoint.interval=4', 'default_hooks.checkpoint.max_keep_ckpts=2']
    plain = write(root / 'plain.py', unsharded(TOY, extra='randomness = dict(seed=5)\n'))
    shard = write(root / 'sharded.py', sharded(TOY, extra='randomness = dict(seed=5)\n',
                                               wrapper=", blocks=['net']"))
    ema_only = write(root / 'ema_only.py', (
        f'_base_ = [{TOY!r}]\nrandomness = dict(seed=5)\n'
        "custom_hooks = [dict(type='FlexEMAHook', momentum=0.1, priority='ABOVE_NORMAL')]\n"))
    run_in_process(plain, root / 'plain', *options)
    run_in_process(shard, root / 'sharded', *options)
    run_in_process(ema_only, root / 'ema_only', *options)
    return root


def test_sharded_ema_hook_writes_and_resumes_mmengine_single_files(toy_runs, tmp_path):
    """Unsharded, FlexEMAHook is mmengine's EMAHook: the same single-file checkpoint
    (state_dict = EMA, ema_state_dict = raw weights + steps), and resuming from it is exact."""
    expected = torch.load(toy_runs / 'plain' / 'iter_8.pth', weights_only=True)
    ours = torch.load(toy_runs / 'ema_only' / 'iter_8.pth', weights_only=True)
    for key in ('state_dict', 'ema_state_dict'):
        assert list(expected[key]) == list(ours[key])
        assert_same_tensors(expected[key], ours[key])
    run_in_process(str(toy_runs / 'ema_only.py'), tmp_path,
                   resume=toy_runs / 'ema_only' / 'iter_4.pth')
    resumed = torch.load(tmp_path / 'iter_8.pth', weights_only=True)
    for key in ('state_dict', 'ema_state_dict'):
        assert_same_tensors(ours[key], resumed[key])


def test_sharded_checkpoint_of_one_process_equals_mmengine_checkpoint(toy_runs):
    """One process: the sharded checkpoint holds exactly what mmengine's single file holds
    (weights, EMA, Adam moments, steps, hyper-parameters), in its own layout."""
    single = torch.load(toy_runs / 'plain' / 'iter_8.pth', weights_only=True)
    path = str(toy_runs / 'sharded' / 'iter_8.pth')
    # mmengine's EMAHook layout: state_dict = EMA, ema_state_dict = raw weights.
    assert_same_tensors(single['state_dict'], consolidate(path, 'ema'))
    raw = {k[len('module.'):]: v for k, v in single['ema_state_dict'].items()
           if k.startswith('module.')}
    assert_same_tensors(raw, consolidate(path, 'model'))
    assert not torch.equal(raw['net.0.weight'], single['state_dict']['net.0.weight'])
    assert torch.equal(load_full_tensors(path, 'ema.')['steps'],
                       single['ema_state_dict']['steps'])
    # Adam's state: by position in mmengine's file, by parameter name in the shards.
    names = list(raw)
    optimizer = load_full_tensors(path, 'optimizer.state.')
    for index, state in single['optimizer']['state'].items():
        for key, value in state.items():
            assert torch.equal(optimizer[f'{names[index]}.{key}'], value), (index, key)
    train_state = read_train_state(path)
    assert train_state['meta']['iter'] == single['meta']['iter'] == 8
    groups = train_state['optimizer_param_groups']
    assert [g['lr'] for g in groups] == [g['lr'] for g in single['optimizer']['param_groups']]
    assert train_state['param_schedulers'] == single['param_schedulers']
    saved = [n for n in os.listdir(toy_runs / 'sharded') if n.startswith('iter_')]
    assert sorted(saved) == ['iter_4.pth', 'iter_8.pth']
    assert all(osp.isdir(toy_runs / 'sharded' / n) for n in saved)


def test_resume_from_a_sharded_checkpoint_is_bit_identical(toy_runs, tmp_path):
    path = toy_runs / 'sharded' / 'iter_4.pth'
    run_in_process(str(toy_runs / 'sharded.py'), tmp_path, resume=path)
    assert_same_tensors(load_full_tensors(str(toy_runs / 'sharded' / 'iter_8.pth'), ''),
                        load_full_tensors(str(tmp_path / 'iter_8.pth'), ''))


def test_load_from_a_sharded_checkpoint_takes_its_ema_weights(toy_runs, tmp_path):
    """``load_from`` a sharded directory initialises the model with the EMA weights, as
    mmengine's ``load_from`` of a single file does (its state_dict holds the EMA)."""
    runner = train_tool.build_runner([str(toy_runs / 'sharded.py'), '--work-dir',
                                      str(tmp_path)])
    path = str(toy_runs / 'sharded' / 'iter_8.pth')
    runner.load_checkpoint(path)
    assert_same_tensors(consolidate(path, 'ema'), runner.model.state_dict())


def test_sharded_checkpoint_files_hold_no_pickle(toy_runs, tmp_path):
    """Every file of a sharded checkpoint is safetensors or weights_only; DCP's pickled
    ``.metadata`` is neither written nor read, and a planted one never runs."""
    import shutil
    path = tmp_path / 'iter_8.pth'
    shutil.copytree(toy_runs / 'sharded' / 'iter_8.pth', path)
    names = sorted(os.listdir(path))
    assert names == ['shard-00001-model-00001-of-00001.safetensors', TRAIN_STATE]
    with safe_open(str(path / names[0]), 'pt') as f:
        assert f.metadata()['DCP_SHARDING_INFO'].startswith('{')  # JSON offsets
    torch.load(path / TRAIN_STATE, weights_only=True)

    marker = tmp_path / 'code_ran'

    class Payload:  # unpickling it would create the marker file
        def __reduce__(self):
            return (open, (str(marker), 'w'))

    with open(path / '.metadata', 'wb') as f:
        pickle.dump(Payload(), f, protocol=2)
    expected = consolidate(str(toy_runs / 'sharded' / 'iter_8.pth'))
    assert_same_tensors(expected, consolidate(str(path)))
    assert not marker.exists()
    # A train state carrying code is refused, and the code does not run.
    with open(path / TRAIN_STATE, 'wb') as f:
        pickle.dump(Payload(), f, protocol=2)
    with pytest.raises(CheckpointError, match='pickled'):
        read_train_state(str(path))
    assert not marker.exists()


def test_consolidated_weights_are_what_tools_test_and_init_generator_read(toy_runs, tmp_path):
    """tools/consolidate_checkpoint.py writes the EMA weights as one safetensors file with
    the model's keys; init_generator loads them, and tools/test.py scores the file exactly
    as it scores the single-file checkpoint holding the same EMA weights."""
    out = str(tmp_path / 'toy_ema.safetensors')
    tensors = load_tool('consolidate_checkpoint').main(
        [str(toy_runs / 'sharded' / 'iter_8.pth'), out])
    with safe_open(out, 'pt') as f:
        assert sorted(f.keys()) == sorted(tensors) == ['net.0.bias', 'net.0.weight',
                                                       'net.2.bias', 'net.2.weight']
        assert f.metadata()['weights'] == 'ema' and f.metadata()['iter'] == '8'
    from flexgen.apis import init_generator
    assert_same_tensors(tensors, init_generator(TOY, out).state_dict())
    test_tool = load_tool('test')
    from_file = test_tool.main([str(toy_runs / 'sharded.py'), out, '--work-dir',
                                str(tmp_path / 'a')])
    from_pth = test_tool.main([TOY, str(toy_runs / 'plain' / 'iter_8.pth'), '--work-dir',
                               str(tmp_path / 'b')])
    assert from_file == from_pth and from_file['toy/loss'] > 0


def test_sharded_setup_refusals(tmp_path):
    with pytest.raises(ValueError, match="use dict\\(type='FlexEMAHook'"):
        train_tool.build_runner([write(tmp_path / 'a.py', unsharded(
            TOY, extra="model_wrapper_cfg = dict(type='FullyShardedWrapper', blocks=[])\n"
            "custom_hooks = [dict(type='EMAHook', momentum=0.1)]\n"))])  # mmengine's
    with pytest.raises(ValueError, match='ZeroRedundancyOptimizer.*shards the optimizer'):
        train_tool.build_runner([write(tmp_path / 'b.py', sharded(
            TOY, wrapper=', blocks=[]', extra="optim_wrapper = dict(optimizer=dict("
            "_delete_=True, type='ZeroRedundancyOptimizer', optimizer_type='AdamW', "
            "lr=1e-3))\n"))])
    from flexgen.engine import FullyShardedWrapper
    model = torch.nn.Module()
    model.blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2)])
    with pytest.raises(ValueError, match='float16 would need loss scaling'):
        FullyShardedWrapper(model, blocks='blocks', mixed_precision=dict(param_dtype='float16'))
    with pytest.raises(ValueError, match="blocks='backbone.blocks' is not a sub-module"):
        FullyShardedWrapper(model)
    with pytest.raises(RuntimeError, match='needs a process group'):
        FullyShardedWrapper(model, blocks='blocks')


def test_a_sharded_run_does_not_resume_from_a_single_file(toy_runs, tmp_path):
    config = write(tmp_path / 'c.py', sharded(TOY, wrapper=', blocks=[]'))
    with pytest.raises(ValueError, match='use load_from'):
        run_in_process(config, tmp_path, resume=toy_runs / 'plain' / 'iter_4.pth')


# --------------------------------------------------------------------------- two ranks
NIT_OPTIONS = ['model.backbone.hidden_size=32', 'model.backbone.depth=2',
               'model.backbone.num_heads=2', 'train_dataloader.dataset.num_samples=2000',
               'train_dataloader.batch_sampler.max_tokens=512', 'param_scheduler=[]',
               'optim_wrapper.optimizer.lr=3e-3', 'train_cfg.max_iters=10',
               'default_hooks.checkpoint.interval=5', 'default_hooks.checkpoint.max_keep_ckpts=2',
               'val_cfg=None', 'val_dataloader=None', 'val_evaluator=None', 'test_cfg=None',
               'test_dataloader=None', 'test_evaluator=None', 'randomness.seed=3']


@pytest.fixture(scope='module')
def nit_runs(tmp_path_factory):
    """The tiny NiT recipe (packs, token-mean loss, direction loss, clipping, AdamW) on 2
    ranks for 10 steps, with EMA sample previews every 5: DDP with mmengine's EMAHook, and
    sharded."""
    root = tmp_path_factory.mktemp('nit')
    extra = "custom_imports = dict(imports=['test_fsdp'], allow_failed_imports=False)\n"
    preview = ", dict(type='SamplePreviewHook', interval=5, sizes=[(8, 8), (8, 12)])"
    train_ok(write(root / 'ddp.py', unsharded(NIT, extra=extra, hooks=preview)), root / 'ddp',
             2, options=NIT_OPTIONS)
    train_ok(write(root / 'sharded.py', sharded(NIT, extra=extra, hooks=preview)),
             root / 'sharded', 2, options=NIT_OPTIONS)
    return root


@pytest.mark.slow
def test_nit_sharded_training_and_ema_equal_ddp(nit_runs):
    """Same images, same keyed per-image draws: after 10 steps the sharded weights and
    the sharded EMA equal DDP's (and mmengine's unsharded EMA) to float32 summation order
    (measured <= 1.2e-7 at lr 3e-3; a wrong shard, sample or EMA step moves them by >= 1e-4)."""
    ddp = torch.load(nit_runs / 'ddp' / 'iter_10.pth', weights_only=True)
    path = str(nit_runs / 'sharded' / 'iter_10.pth')
    ema, weights = consolidate(path, 'ema'), consolidate(path, 'model')
    assert_same_tensors(ddp['state_dict'], ema, atol=1e-6)  # mmengine: state_dict = EMA
    raw = {k[len('module.'):]: v for k, v in ddp['ema_state_dict'].items() if k != 'steps'}
    assert_same_tensors(raw, weights, atol=1e-6)
    assert (weights['backbone.final_layer.linear.weight']
            - ema['backbone.final_layer.linear.weight']).abs().max() > 1e-3
    # The sharded previews (rank 0 samples the gathered model with the EMA swapped in)
    # are DDP's (mmengine's EMA copy), to a grey level, and previews left training alone.
    for name in ('iter_5.png', 'iter_10.png'):
        ours, theirs = (np.asarray(Image.open(nit_runs / run / 'previews' / name), np.int16)
                        for run in ('sharded', 'ddp'))
        assert ours.shape == theirs.shape and np.abs(ours - theirs).max() <= 1
    shards = sorted(n for n in os.listdir(path) if n.endswith('.safetensors'))
    assert shards == ['shard-00001-model-00001-of-00001.safetensors',
                      'shard-00002-model-00001-of-00001.safetensors']
    with safe_open(osp.join(path, shards[1]), 'pt') as f:  # rank 1 holds the second halves
        qkv = f.get_slice('model.backbone.blocks.0.attn.qkv.weight').get_shape()
    assert qkv == [48, 32]  # of [96, 32]


@pytest.mark.slow
def test_nit_kill_while_saving_then_resume_is_bit_identical(nit_runs, tmp_path):
    """Rank 1 dies halfway through writing iter_10: iter_5 and the pointer to it stay
    whole; `--resume` finishes the run with exactly the uninterrupted run's state."""
    config = str(nit_runs / 'sharded.py')
    proc = run_train(config, tmp_path, 2, options=NIT_OPTIONS,
                     env={KILL_ENV: 'iter_10.pth'})
    assert proc.returncode != 0
    names = os.listdir(tmp_path)
    assert '.iter_10.pth.tmp' in names and 'iter_10.pth' not in names
    assert open(tmp_path / 'last_checkpoint').read() == str(tmp_path / 'iter_5.pth')
    assert_same_tensors(load_full_tensors(str(nit_runs / 'sharded' / 'iter_5.pth'), ''),
                        load_full_tensors(str(tmp_path / 'iter_5.pth'), ''))

    train_ok(config, tmp_path, 2, options=NIT_OPTIONS, args=['--resume'])
    assert '.iter_10.pth.tmp' not in os.listdir(tmp_path)
    expected = load_full_tensors(str(nit_runs / 'sharded' / 'iter_10.pth'), '')
    assert_same_tensors(expected, load_full_tensors(str(tmp_path / 'iter_10.pth'), ''))
    assert len(expected) > 150  # model, EMA, Adam moments and steps


FIT_TINY = '''
model = dict(
    backbone=dict(in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=6,
                  modulation=dict(type='AdaLNLoRA', rank=8)),
    sampler=dict(_delete_=True, type='EulerODE', num_steps=4),
    autoencoder=dict(_delete_=True, type='IdentityAutoencoder'), inputs_are_latents=False)
train_dataloader = dict(
    _delete_=True, batch_size=4, num_workers=0,
    dataset=dict(type='ProceduralShapes', num_samples=400, seed=0,
                 sizes=[(16, 16), (16, 24), (24, 16), (24, 24)]),
    sampler=dict(type='DefaultSampler', shuffle=True, seed=0),
    collate_fn=dict(type='flexgen.jagged_collate', patch_size=2, max_length=144))
optim_wrapper = dict(optimizer=dict(lr=1e-3, fused=True))
param_scheduler = []
auto_scale_lr = dict(enable=False)
train_cfg = dict(max_iters=10, val_interval=1000)
test_dataloader = None
test_cfg = None
test_evaluator = None
default_hooks = dict(checkpoint=dict(interval=5, max_keep_ckpts=2))
randomness = dict(seed=4)
'''


@pytest.fixture(scope='module')
def fit_runs(tmp_path_factory):
    """The tiny FiTv2 recipe (padded batches, image-mean loss, AdaLN-LoRA, fused AdamW,
    clipping) on 2 ranks for 10 steps: DDP, and sharded with activation checkpointing of
    both blocks."""
    root = tmp_path_factory.mktemp('fit')
    per_rank = ['train_dataloader.batch_size=2']  # global batch 4
    train_ok(write(root / 'ddp.py', unsharded(FIT, extra=FIT_TINY)), root / 'ddp', 2,
             options=per_rank)
    train_ok(write(root / 'sharded.py', sharded(FIT, extra=FIT_TINY + (
        "activation_checkpointing = ['backbone.blocks.0', 'backbone.blocks.1']\n"))),
        root / 'sharded', 2, options=per_rank)
    return root


@pytest.mark.slow
def test_fit_sharded_with_checkpointing_equals_ddp(fit_runs):
    """Measured <= 3e-8 after 10 steps (float32 summation order through Adam)."""
    ddp = torch.load(fit_runs / 'ddp' / 'iter_10.pth', weights_only=True)
    path = str(fit_runs / 'sharded' / 'iter_10.pth')
    assert_same_tensors(ddp['state_dict'], consolidate(path, 'ema'), atol=1e-6)
    raw = {k[len('module.'):]: v for k, v in ddp['ema_state_dict'].items() if k != 'steps'}
    assert_same_tensors(raw, consolidate(path, 'model'), atol=1e-6)
    assert raw['backbone.final_layer.linear.weight'].abs().max() > 1e-3


@pytest.mark.slow
def test_fit_sharded_checkpoint_resumes_in_one_process(fit_runs, tmp_path):
    """The 2-rank sharded iter_5 resumed by ONE process (DCP reshards 2 -> 1) at the same
    global batch reaches the 2-rank iter_10: weights, EMA and Adam moments."""
    one = run_in_process(str(fit_runs / 'sharded.py'), tmp_path,
                         resume=fit_runs / 'sharded' / 'iter_5.pth')
    assert one.iter == 10 and not hasattr(one.model, 'module')  # one process: unwrapped
    assert_same_tensors(load_full_tensors(str(fit_runs / 'sharded' / 'iter_10.pth'), ''),
                        load_full_tensors(str(tmp_path / 'iter_10.pth'), ''), atol=1e-6)


@pytest.mark.slow
def test_fit_partial_fine_tune_loads_a_single_file_into_shards(fit_runs, tmp_path):
    """FiTv2's high-resolution recipe in small: load_from a single-file checkpoint (the DDP
    run's; its state_dict holds the EMA) into a sharded model whose weights are mostly
    frozen (FlexDiT trainable=...): every rank keeps its shards of the file, the frozen
    weights stay exactly the file's and only the trainable ones train and have Adam state."""
    trainable = ('x_embedder', 'bias', 'LN', 'final_layer')
    tiny = FIT_TINY.replace("rank=8)),", f"rank=8), trainable={trainable!r}),")
    assert tiny != FIT_TINY
    config = write(tmp_path / 'hr.py', sharded(FIT, extra=tiny + (
        f"load_from = {str(fit_runs / 'ddp' / 'iter_10.pth')!r}\n")))
    train_ok(config, tmp_path / 'hr', 2, options=[
        'train_dataloader.batch_size=2', 'train_cfg.max_iters=3',
        'default_hooks.checkpoint.interval=3'])
    start = torch.load(fit_runs / 'ddp' / 'iter_10.pth', weights_only=True)['state_dict']
    path = str(tmp_path / 'hr' / 'iter_3.pth')
    weights = consolidate(path, 'model')
    frozen = [k for k in weights if not any(t in k for t in trainable)]
    moved = [k for k in weights if any(t in k for t in trainable)
             and not torch.equal(weights[k], start[k])]
    assert frozen and all(torch.equal(weights[k], start[k]) for k in frozen)
    assert 'backbone.final_layer.linear.weight' in moved
    adam = {k.rsplit('.', 1)[0] for k in load_full_tensors(path, 'optimizer.state.')}
    assert adam and all(any(t in k for t in trainable) for k in adam)


@pytest.mark.slow
def test_zero_redundancy_optimizer_saves_and_resumes_under_ddp(tmp_path):
    """ZeRO-1 with DDP (gradient_as_bucket_view) on 2 ranks: every rank joins the
    consolidation of the optimizer state (no hang at the first save), and resuming from
    iter_4 gives iter_8 exactly."""
    zero = ['optim_wrapper.optimizer.type=ZeroRedundancyOptimizer',
            'optim_wrapper.optimizer.optimizer_type=AdamW', 'train_dataloader.batch_size=4',
            'model_wrapper_cfg.gradient_as_bucket_view=True']
    train_ok(TOY, tmp_path / 'a', 2, options=zero, timeout=240)
    train_ok(TOY, tmp_path / 'b', 2, options=zero, timeout=240,
             args=['--resume', str(tmp_path / 'a' / 'iter_4.pth')])
    a = torch.load(tmp_path / 'a' / 'iter_8.pth', weights_only=True)
    b = torch.load(tmp_path / 'b' / 'iter_8.pth', weights_only=True)
    assert sorted(a['optimizer']['state']) == [0, 1, 2, 3]  # both ranks' partitions
    assert_same_tensors(a['state_dict'], b['state_dict'])
    for index, state in a['optimizer']['state'].items():
        assert_same_tensors(state, b['optimizer']['state'][index])


# --------------------------------------------------------------------------- mixed precision
@pytest.fixture
def one_rank_group():
    """A one-rank gloo process group in this process (FSDP2 shards over one rank)."""
    import torch.distributed as dist
    dist.init_process_group('gloo', store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def tiny_nit_generator():
    from flexgen.registry import MODELS
    torch.manual_seed(0)
    model = MODELS.build(dict(
        type='DiffusionGenerator', transport=dict(type='RectifiedFlow'),
        backbone=dict(type='FlexDiT', in_channels=3, patch_size=2, hidden_size=32, depth=2,
                      num_heads=2, num_classes=6, pos_embed=None, time_scale=1.0,
                      qk_norm=dict(type='layernorm_affine', eps=1e-5),
                      rope=dict(type='AxialRoPE2D', layout='nit')),
        sampler=dict(type='EulerODE', num_steps=3), loss_reduction='token'))
    with torch.no_grad():  # zero-initialised adaLN / output layers would hide the compute
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    g = torch.Generator().manual_seed(2)
    images = [torch.rand(3, h, w, generator=g) * 2 - 1 for h, w in [(8, 12), (12, 8), (8, 8)]]
    samples = dict(label=torch.tensor([0, 5, 2]), seed=7, step=3, index=torch.tensor([4, 9, 1]))
    return model, dict(inputs=images, data_samples=samples)


def test_bf16_compute_over_fp32_master_weights(one_rank_group):
    """mixed_precision=dict(param_dtype='bfloat16', reduce_dtype='float32'): the sharded
    master weights and their gradients stay float32, the blocks compute with bfloat16
    weights, and the loss is the float32 model's up to bfloat16 rounding (and not equal to
    it: the compute really is bfloat16). Generation under ``gathered()`` works too."""
    from torch.distributed.tensor import DTensor

    from flexgen.engine import FullyShardedWrapper
    reference, data = tiny_nit_generator()
    expected = reference(**data, mode='loss')['loss']
    expected_images = reference.generate([1, 2], [(8, 8), (8, 12)], seeds=[0, 1])

    model, _ = tiny_nit_generator()
    wrapper = FullyShardedWrapper(model, mixed_precision=dict(param_dtype='bfloat16',
                                                              reduce_dtype='float32'))
    seen = []
    model.backbone.blocks[0].attn.qkv.register_forward_pre_hook(
        lambda module, args: seen.append(module.weight.dtype))
    with wrapper._autocast():
        loss = wrapper.module(**data, mode='loss')['loss']
    loss.backward()
    assert seen == [torch.bfloat16]
    qkv = model.backbone.blocks[0].attn.qkv.weight
    assert isinstance(qkv, DTensor) and qkv.dtype == torch.float32
    assert qkv.grad.dtype == torch.float32 and qkv.grad.abs().sum() > 0
    torch.testing.assert_close(loss.float(), expected, rtol=2e-2, atol=0)
    assert loss.float() != expected

    with wrapper.gathered() as full:
        images = full.generate([1, 2], [(8, 8), (8, 12)], seeds=[0, 1])
    for image, reference_image in zip(images, expected_images):
        torch.testing.assert_close(image.float(), reference_image, rtol=0, atol=0.1)
    assert isinstance(model.backbone.blocks[0].attn.qkv.weight, DTensor)  # resharded

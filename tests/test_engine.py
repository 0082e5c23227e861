"""flexgen.engine: resume without replay, step-seeded noise, crash-safe weights_only
checkpoints, autocast optim wrapper."""
import os
import os.path as osp
import signal
import subprocess
import sys
import textwrap
import uuid

import numpy as np
import pytest
import torch
from mmengine.config import ConfigDict
from mmengine.fileio import get_file_backend
from mmengine.hooks import EMAHook, Hook
from mmengine.logging import HistoryBuffer
from mmengine.runner import Runner

import flexgen.engine  # noqa: F401  (registers the engine)
from flexgen.engine import AutocastOptimWrapper, atomic_write, to_plain
from flexgen.registry import HOOKS

import toy_modules  # noqa: F401  (registers the toy model, data, sampler, metric)
from toy_modules import ToyFlowModel, image_generator

TESTS = osp.dirname(osp.abspath(__file__))
ROOT = osp.dirname(TESTS)


@HOOKS.register_module()
class _RecordBatchHook(Hook):
    """Keeps (seed, step, indices) of every training batch the model sees."""

    def __init__(self):
        self.seen = []

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        samples = data_batch['data_samples']
        self.seen.append((samples['seed'], samples['step'], samples['index'].tolist()))


def runner_cfg(work_dir, max_iters, interval=3, resume=False, batch_sampler=True,
               max_keep_ckpts=-1, optim_wrapper=None, seed=0):
    loader = dict(dataset=dict(type='ToyVectorDataset', num=20), batch_size=4, num_workers=0,
                  collate_fn=dict(type='default_collate'))
    if batch_sampler:
        loader.update(sampler=dict(type='DefaultSampler', shuffle=False),
                      batch_sampler=dict(type='ToyStepBatchSampler'))
    else:
        loader.update(sampler=dict(type='InfiniteSampler', shuffle=True))
    return dict(
        model=dict(type='ToyFlowModel'), work_dir=str(work_dir),
        experiment_name=f'engine_{uuid.uuid4().hex[:8]}',
        train_dataloader=loader,
        train_cfg=dict(type='FlexTrainLoop', max_iters=max_iters),
        optim_wrapper=optim_wrapper or dict(optimizer=dict(type='AdamW', lr=1e-2)),
        param_scheduler=[dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0,
                              end=4)],
        default_hooks=dict(
            checkpoint=dict(type='FlexCheckpointHook', interval=interval,
                            max_keep_ckpts=max_keep_ckpts),
            logger=dict(type='LoggerHook', interval=1, log_metric_by_epoch=False)),
        custom_hooks=[dict(type='FlexEMAHook', momentum=0.1, priority='ABOVE_NORMAL'),
                      dict(type='_RecordBatchHook')],
        log_processor=dict(by_epoch=False), default_scope='flexgen',
        randomness=dict(seed=seed), resume=resume)


def hook(runner, cls):
    return next(h for h in runner.hooks if isinstance(h, cls))


def losses(runner):
    return runner.message_hub.get_scalar('train/loss').data[0].tolist()


def assert_same_state(a, b):
    for (name, pa), (_, pb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(pa, pb), name
    ema_a, ema_b = hook(a, EMAHook).ema_model, hook(b, EMAHook).ema_model
    for (name, pa), (_, pb) in zip(ema_a.state_dict().items(), ema_b.state_dict().items()):
        assert torch.equal(pa, pb), f'ema {name}'
    sa, sb = a.optim_wrapper.state_dict(), b.optim_wrapper.state_dict()
    assert sa['state'].keys() == sb['state'].keys()
    for key in sa['state']:
        for name, value in sa['state'][key].items():
            assert torch.equal(value, sb['state'][key][name]), (key, name)
    assert [g['lr'] for g in sa['param_groups']] == [g['lr'] for g in sb['param_groups']]
    assert losses(a) == losses(b)


@pytest.mark.parametrize('batch_sampler', [True, False], ids=['set_start_iter', 'replay'])
def test_resume_is_bit_identical(tmp_path, batch_sampler):
    k = 3
    full = Runner(**runner_cfg(tmp_path / 'full', 2 * k, batch_sampler=batch_sampler))
    full.train()

    Runner(**runner_cfg(tmp_path / 'split', k, batch_sampler=batch_sampler)).train()
    resumed = Runner(**runner_cfg(tmp_path / 'split', 2 * k, resume=True,
                                  batch_sampler=batch_sampler))
    resumed.train()

    assert resumed.iter == full.iter == 2 * k
    assert_same_state(full, resumed)
    # The resumed run saw the second half of the batches, seeded by the global step.
    assert hook(resumed, _RecordBatchHook).seen == hook(full, _RecordBatchHook).seen[k:]
    loaded = resumed.train_dataloader.dataset.loaded
    log = open(osp.join(resumed.log_dir, f'{resumed.timestamp}.log')).read()
    if batch_sampler:  # positioned at iteration k: only k batches of 4 were loaded
        assert loaded == k * 4
        assert 'set_start_iter' in log and 'replays' not in log
    else:  # mmengine's replay, announced with the sampler's name
        assert loaded == 2 * k * 4
        assert 'BatchSampler(sampler=InfiniteSampler) has no set_start_iter()' in log


def test_loop_seeds_every_batch_from_runner_seed_and_step(tmp_path):
    runner = Runner(**runner_cfg(tmp_path, 3, interval=100, seed=7))
    runner.train()
    seen = hook(runner, _RecordBatchHook).seen
    assert [(seed, step) for seed, step, _ in seen] == [(7, 0), (7, 1), (7, 2)]
    # The model's noise for image i at step 2 is the generator (seed, step, index_i)'s.
    model = ToyFlowModel()
    x = torch.zeros(2, model.dim)
    noise, t = model.draw(x, dict(seed=7, step=2, index=torch.tensor(seen[2][2][:2])), True)
    g = image_generator(7, 2, seen[2][2][0])
    assert torch.equal(noise[0], torch.randn(model.dim, generator=g))


def test_model_refuses_unseeded_training_batch():
    model = ToyFlowModel()
    with pytest.raises(KeyError, match='seed'):
        model(torch.zeros(2, model.dim), dict(index=torch.arange(2)), mode='loss')


# --------------------------------------------------------------------- checkpoints
def test_checkpoint_is_weights_only_and_restores_message_hub(tmp_path):
    runner = Runner(**runner_cfg(tmp_path, 3, interval=3))
    runner.train()
    path = osp.join(tmp_path, 'iter_3.pth')
    ckpt = torch.load(path, weights_only=True)
    buffer = ckpt['message_hub']['log_scalars']['train/loss']
    assert buffer['type'] == 'HistoryBuffer'
    assert buffer['log_history'].tolist() == losses(runner)
    assert 'ema_state_dict' in ckpt and 'param_schedulers' in ckpt

    fresh = Runner(**runner_cfg(tmp_path, 3, resume=True))
    fresh.train()  # resumes at iteration 3 = max_iters: loads, trains nothing
    restored = fresh.message_hub.get_scalar('train/loss')
    assert isinstance(restored, HistoryBuffer)
    assert restored.data[0].tolist() == losses(runner)


class _Payload:
    """Unpickling this would run code (it calls `_record`)."""
    ran = []

    def __reduce__(self):
        return (_Payload.ran.append, ('executed',))


def test_checkpoint_with_pickled_code_is_refused_and_not_run(tmp_path):
    runner = Runner(**runner_cfg(tmp_path, 1))
    path = osp.join(tmp_path, 'evil.pth')
    torch.save(dict(state_dict=runner.model.state_dict(), meta=dict(x=_Payload())), path)
    with pytest.raises(RuntimeError, match='never runs code from a checkpoint'):
        runner.load_checkpoint(path)
    assert _Payload.ran == []


def test_to_plain_converts_numpy_and_drops_code():
    dropped = []
    plain = to_plain(dict(a=np.float32(1.5), b=np.arange(3), c=ConfigDict(d=(np.int64(2), 'x')),
                          fn=len, keep=[1, 2]), dropped=dropped)
    assert plain == dict(a=1.5, b=plain['b'], c=dict(d=(2, 'x')), keep=[1, 2])
    assert type(plain['c']) is dict and torch.equal(plain['b'], torch.arange(3))
    assert dropped == ["checkpoint['fn'] (builtin_function_or_method)"]


def test_atomic_backend_replaces_whole_files(tmp_path):
    backend = get_file_backend(str(tmp_path), backend_args=dict(backend='atomic_local'))
    target = tmp_path / 'sub' / 'a.bin'
    backend.put(b'old', target)
    backend.put(b'new content', target)
    backend.put_text('text', tmp_path / 't.txt')
    assert target.read_bytes() == b'new content' and (tmp_path / 't.txt').read_text() == 'text'
    assert sorted(os.listdir(tmp_path)) == ['sub', 't.txt']
    assert os.listdir(tmp_path / 'sub') == ['a.bin']


def test_atomic_write_failure_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / 'a.bin'
    atomic_write(b'old', target)

    def fail(f, data):
        f.write(data[:1])
        raise OSError('disk full')

    monkeypatch.setattr('flexgen.fileio._write', fail)
    with pytest.raises(OSError, match='disk full'):
        atomic_write(b'new', target)
    assert target.read_bytes() == b'old' and os.listdir(tmp_path) == ['a.bin']


def test_max_keep_ckpts_prunes_after_saving(tmp_path):
    Runner(**runner_cfg(tmp_path, 6, interval=2, max_keep_ckpts=2)).train()
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith('.pth')) == \
        ['iter_4.pth', 'iter_6.pth']
    assert (tmp_path / 'last_checkpoint').read_text() == str(tmp_path / 'iter_6.pth')


KILLER = textwrap.dedent('''
    import os, signal, sys
    sys.path[:0] = [{tests!r}, {root!r}]
    import flexgen.fileio as ck
    import test_engine
    from mmengine.runner import Runner

    real, count = ck._write, [0]

    def killing_write(f, data):  # the {nth}-th write of {victim}: half the bytes, then die
        if os.path.basename(f.name).startswith('.{victim}.'):
            count[0] += 1
            if count[0] == {nth}:
                f.write(data[:len(data) // 2])
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        real(f, data)

    ck._write = killing_write
    Runner(**test_engine.runner_cfg({work_dir!r}, 4, interval=2, max_keep_ckpts=1)).train()
''')


@pytest.mark.parametrize('victim,nth', [('iter_4.pth', 1), ('last_checkpoint', 2)])
def test_kill_while_saving_keeps_previous_checkpoint(tmp_path, victim, nth):
    """SIGKILL halfway through writing (the checkpoint, or the last_checkpoint pointer)
    leaves the previous checkpoint and the pointer to it whole, and training resumes."""
    work_dir = str(tmp_path)
    script = KILLER.format(tests=TESTS, root=ROOT, victim=victim, nth=nth, work_dir=work_dir)
    proc = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert any(name.endswith('.tmp') for name in os.listdir(work_dir))  # the torn write

    previous = osp.join(work_dir, 'iter_2.pth')
    assert open(osp.join(work_dir, 'last_checkpoint')).read() == previous
    assert torch.load(previous, weights_only=True)['meta']['iter'] == 2

    resumed = Runner(**runner_cfg(work_dir, 4, interval=2, max_keep_ckpts=1, resume=True))
    resumed.train()
    assert resumed.iter == 4
    assert not any(name.endswith('.tmp') for name in os.listdir(work_dir))
    assert sorted(f for f in os.listdir(work_dir) if f.endswith('.pth')) == ['iter_4.pth']


# --------------------------------------------------------------------- autocast
def test_autocast_optim_wrapper_runs_forward_in_bf16_and_trains(tmp_path):
    runner = Runner(**runner_cfg(
        tmp_path, 4, interval=100,
        optim_wrapper=dict(type='AutocastOptimWrapper', dtype='bfloat16',
                           optimizer=dict(type='AdamW', lr=1e-2),
                           clip_grad=dict(max_norm=1.0))))
    dtypes = []
    runner.model.net[0].register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    before = [p.detach().clone() for p in runner.model.parameters()]
    runner.train()
    assert isinstance(runner.optim_wrapper, AutocastOptimWrapper)
    assert runner.optim_wrapper.loss_scaler is None
    assert dtypes == [torch.bfloat16] * 4
    assert all(p.dtype == torch.float32 for p in runner.model.parameters())
    assert all(not torch.equal(a, b) for a, b in zip(before, runner.model.parameters()))
    assert all(np.isfinite(losses(runner)))
    assert runner.message_hub.get_scalar('train/grad_norm') is not None


def test_autocast_optim_wrapper_float16_scaler_state_round_trips():
    model = torch.nn.Linear(4, 2)
    wrapper = AutocastOptimWrapper(dtype='float16',
                                   optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with wrapper.optim_context(model):
        out = model(torch.ones(3, 4))
    assert out.dtype == torch.float16
    wrapper.update_params(out.float().pow(2).mean())
    state = wrapper.state_dict()
    assert 'scale' in state['loss_scaler']
    other = AutocastOptimWrapper(dtype='float16',
                                 optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    other.load_state_dict(state)
    assert other.loss_scaler.get_scale() == wrapper.loss_scaler.get_scale()


def test_autocast_optim_wrapper_rejects_unknown_dtype():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="dtype='float8'"):
        AutocastOptimWrapper(dtype='float8', optimizer=torch.optim.SGD(model.parameters(), 0.1))


# --------------------------------------------------------------------- TF32
def backend_flags():
    """Every process-wide numerics switch a Runner could touch."""
    return dict(matmul_tf32=torch.backends.cuda.matmul.allow_tf32,
                cudnn_tf32=torch.backends.cudnn.allow_tf32,
                matmul_precision=torch.get_float32_matmul_precision(),
                cudnn_benchmark=torch.backends.cudnn.benchmark,
                cudnn_deterministic=torch.backends.cudnn.deterministic,
                bf16_reduced=torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction,
                fp16_reduced=torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction)


@HOOKS.register_module()
class _RecordTF32Hook(Hook):
    """The TF32 switches as the training steps see them."""

    def __init__(self):
        self.seen = []

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        self.seen.append((torch.backends.cuda.matmul.allow_tf32,
                          torch.backends.cudnn.allow_tf32))


@pytest.fixture()
def restore_tf32():
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


@pytest.mark.parametrize('allow_tf32', [True, False])
def test_tf32_switch_holds_while_the_runner_runs(tmp_path, restore_tf32, allow_tf32):
    """default_runtime's TF32Hook sets both switches for the run (the flags exist without
    CUDA) and leaves every switch as it found it afterwards."""
    from mmengine.config import Config
    cfg = Config.fromfile(osp.join(ROOT, 'configs', '_base_', 'default_runtime.py'))
    assert cfg.default_hooks.tf32 == dict(type='TF32Hook', allow_tf32=True)
    toy = runner_cfg(tmp_path, 2, interval=100)
    toy['custom_hooks'].append(dict(type='_RecordTF32Hook'))
    cfg.merge_from_dict(dict(toy, visualizer=None))
    if not allow_tf32:  # the README's command-line override
        cfg.merge_from_dict({'default_hooks.tf32.allow_tf32': False})
    # Start from the opposite setting, so the run's own setting is visible.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not allow_tf32
    before = backend_flags()
    runner = Runner.from_cfg(cfg)
    assert backend_flags() == before  # building applies nothing
    runner.train()
    assert hook(runner, _RecordTF32Hook).seen == [(allow_tf32, allow_tf32)] * 2
    assert backend_flags() == before


def test_tf32_is_on_in_every_shipped_config_and_refuses_non_bools():
    from mmengine.config import Config

    from flexgen.engine import TF32Hook
    for path in ('configs/nit/nit_xl_pack_16384.py', 'configs/dit/dit_xl_2_256.py',
                 'configs/fit/fitv2_xl_2.py', 'configs/demo/shapes_flexdit_rf.py'):
        hooks = Config.fromfile(osp.join(ROOT, path)).default_hooks
        assert hooks.tf32 == dict(type='TF32Hook', allow_tf32=True), path
    with pytest.raises(ValueError, match="allow_tf32 must be True or False, got 'no'.*"
                                         'default_hooks.tf32.allow_tf32'):
        TF32Hook(allow_tf32='no')

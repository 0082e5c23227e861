"""What a user reads: a console without the start-up dumps (they stay in the work dir),
progress bars while generating and while the judge trains, the training step's own
`time` in the logs, and sample previews in TensorBoard."""
import io
import json
import os
import os.path as osp
import subprocess
import sys
import time
import uuid

import numpy as np
from mmengine.hooks import Hook
from mmengine.runner import Runner
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import flexgen.engine  # noqa: F401  (registers the engine)
from flexgen.evaluation.classifier import train_classifier

import toy_modules  # noqa: F401  (registers the toy model, data, sampler, metric)
from helpers import load_tool, one_torch_thread

TESTS = osp.dirname(osp.abspath(__file__))
ROOT = osp.dirname(TESTS)
TOY_CFG = osp.join('tests', 'configs', 'toy_train.py')
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, TESTS, os.environ.get('PYTHONPATH', '')]))


def run(*argv):
    proc = subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_console_shows_progress_and_metrics_the_log_keeps_the_dumps(tmp_path):
    train = run('tools/train.py', TOY_CFG, '--work-dir', tmp_path, '--cfg-options',
                'train_cfg.max_iters=4', 'default_hooks.logger.interval=4')
    test = run('tools/test.py', TOY_CFG, tmp_path / 'iter_4.pth', '--work-dir', tmp_path / 'test')
    for proc, work_dir in ((train, tmp_path), (test, tmp_path / 'test')):
        console = proc.stdout
        assert 'Config:' not in console and 'System environment' not in console
        assert 'Hooks will be executed' not in console
        (log_file,) = [osp.join(work_dir, d, f'{d}.log') for d in os.listdir(work_dir)
                       if osp.isdir(osp.join(work_dir, d)) and d[:8].isdigit()]
        assert f'Environment, full config and hook order: {log_file}' in console
        log = open(log_file).read()
        assert 'System environment:' in log and 'Config:\n' in log
        assert 'Hooks will be executed in the following order' in log
        assert 'train_cfg = dict(' in open(osp.join(work_dir, 'toy_train.py')).read()
        assert len(console.splitlines()) < 20, console
    assert 'Iter(train) [4/4]' in train.stdout
    assert 'Iter(test) [2/2]' in test.stdout and 'toy/loss:' in test.stdout
    # The progress bar of the test run: 32 vectors in batches of 16.
    assert 'test: 100%' in test.stderr and '2/2' in test.stderr


def test_judge_training_shows_a_progress_bar(tmp_path, capsys):
    train_classifier(dict(type='ProceduralShapes', num_samples=40, sizes=[(16, 16)], seed=0),
                     dict(widths=(4, 8)), epochs=2, batch_size=8, cache_dir=str(tmp_path))
    bar = capsys.readouterr().err.split('\r')[-1]
    # 40 images, 8 held out: 32 to train on, 4 batches of 8 per epoch, 2 epochs.
    assert bar.startswith('training the judge classifier: 100%') and '8/8' in bar, bar


class Pause(Hook):
    """Takes ``seconds`` after every training iteration (after the timer, as previews and
    checkpoints do) and after every validation."""

    priority = 'LOW'

    def __init__(self, seconds):
        self.seconds = seconds

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        time.sleep(self.seconds)

    def after_val_epoch(self, runner, metrics=None):
        time.sleep(self.seconds)


def timed_run(work_dir, timer, log_processor, pause):
    loader = dict(dataset=dict(type='ToyVectorDataset', num=16), batch_size=4, num_workers=0,
                  sampler=dict(type='DefaultSampler', shuffle=False),
                  batch_sampler=dict(type='ToyStepBatchSampler'),
                  collate_fn=dict(type='default_collate'))
    val_loader = dict(loader, batch_sampler=None)
    runner = Runner(
        model=dict(type='ToyFlowModel'), work_dir=str(work_dir),
        experiment_name=f'timer_{uuid.uuid4().hex[:8]}', train_dataloader=loader,
        train_cfg=dict(type='FlexTrainLoop', max_iters=6, val_interval=3),
        val_dataloader=val_loader, val_cfg=dict(type='ValLoop'),
        val_evaluator=dict(type='ToyLossMetric'),
        optim_wrapper=dict(optimizer=dict(type='AdamW', lr=1e-2)),
        default_hooks=dict(timer=dict(type=timer), checkpoint=None,
                           logger=dict(type='LoggerHook', interval=1,
                                       log_metric_by_epoch=False)),
        custom_hooks=[Pause(pause)],
        log_processor=dict(type=log_processor, by_epoch=False, window_size=1),
        default_scope='flexgen')
    runner.train()
    with open(osp.join(runner.log_dir, 'vis_data', 'scalars.json')) as f:
        records = [json.loads(line) for line in f]
    return [r for r in records if 'loss' in r], [r for r in records if 'toy/loss' in r]


def test_train_time_is_the_train_step_alone(tmp_path):
    pause = 0.5
    train, val = timed_run(tmp_path / 'flexgen', 'TrainStepTimerHook', 'FlexLogProcessor', pause)
    assert [r['step'] for r in train] == [1, 2, 3, 4, 5, 6]
    # A toy step takes milliseconds: no step counts the pauses of the hooks and validation.
    assert all(r['time'] < pause / 2 and r['data_time'] < pause / 2 for r in train), train
    assert [r['step'] for r in val] == [3, 6]
    assert all('time' not in r and 'data_time' not in r for r in val)
    assert all(0 < r['val/time'] < pause / 2 and 'val/data_time' in r for r in val)
    # mmengine's timer and log processor, the same run: every step after the first counts
    # the previous step's pause (step 4: the pause after the validation), and the
    # validation's time joins the training curve under the same name.
    train, val = timed_run(tmp_path / 'mmengine', 'IterTimerHook', 'LogProcessor', pause)
    assert all(r['time'] >= pause for r in train[1:])
    assert all('time' in r for r in val)


def test_preview_grids_reach_tensorboard(tmp_path):
    config = tmp_path / 'tiny.py'
    config.write_text(f'''
_base_ = [{osp.join(TESTS, 'configs', 'tiny_generator.py')!r}]
custom_hooks = [dict(type='SamplePreviewHook', interval=1, sizes=[(8, 8), (8, 12)],
                     classes=[0, 1])]
''')
    with one_torch_thread():
        runner = load_tool('train').build_runner([str(config), '--work-dir',
                                                  str(tmp_path / 'run')])
        runner.train()
    events = EventAccumulator(osp.join(runner.log_dir, 'vis_data'), size_guidance={'images': 0})
    events.Reload()
    previews = events.Images('preview')
    assert [p.step for p in previews] == [1, 2]
    for preview in previews:
        shown = np.asarray(Image.open(io.BytesIO(preview.encoded_image_string)).convert('RGB'))
        written = np.asarray(Image.open(tmp_path / 'run' / 'previews' / f'iter_{preview.step}.png'))
        assert shown.shape == written.shape == (2 * 10 + 2, 2 * 14 + 2, 3)
        assert np.array_equal(shown, written)

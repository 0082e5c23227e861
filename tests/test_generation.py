"""Sharded, resumable generation (GenerationLoop through tools/test.py), the per-size table
and the RoPE extrapolation sweep, on a tiny demo-like checkpoint written by the Runner."""
import json
import os
import os.path as osp
import subprocess
import sys
import uuid

import numpy as np
import pytest
import torch
from mmengine.config import Config
from PIL import Image

import flexgen
from flexgen.evaluation import (GeneratedClassAccuracy, classify, feature_statistics,
                                frechet_distance, to_uint8)
from flexgen.evaluation import generation as generation_module
from flexgen.fileio import read_checkpoint, select_weights
from flexgen.models.generator import DiffusionGenerator
from flexgen.registry import DATASETS, MODELS
from helpers import load_tool
from test_train_tool import free_port

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
SIZES = [(16, 16), (16, 32), (24, 16)]
PER_SIZE = 7  # 21 requests: uneven over 2 ranks and over shards of 4
# The demo shrunk: a 2-block width-32 FlexDiT trained 12 steps at a high learning rate (so
# its attention, and with it RoPE, shapes the samples), a 4-step sampler, and a judge
# trained on 300 shapes for one epoch.
TINY = f'''
_base_ = [{osp.join(ROOT, 'configs', 'demo', 'shapes_flexdit_rf.py')!r}]
model = dict(backbone=dict(hidden_size=32, depth=2, num_heads=2), sampler=dict(num_steps=4))
train_dataloader = dict(batch_size=8, dataset=dict(num_samples=240))
train_cfg = dict(max_iters=12, val_interval=1000)
optim_wrapper = dict(optimizer=dict(lr=1e-2))
param_scheduler = []
val_dataloader = None
val_cfg = None
val_evaluator = None
test_dataloader = dict(batch_size=4, num_workers=0,
                       dataset=dict(_delete_=True, type='GenerationRequests', num_classes=6,
                                    sizes={SIZES!r},
                                    num_samples={PER_SIZE}, seed=1),
                       sampler=dict(type='DefaultSampler', shuffle=False),
                       collate_fn=dict(type='flexgen.jagged_collate'))
test_cfg = dict(type='GenerationLoop', shard_size=4)
test_evaluator = dict(classifier_dataset=dict(num_samples=300), num_real=100,
                      train_cfg=dict(epochs=1, max_train_images=None))
custom_hooks = [dict(type='FlexEMAHook', momentum=0.1, priority='ABOVE_NORMAL')]
default_hooks = dict(checkpoint=dict(interval=12))
'''


def experiment():
    return f'experiment_name=gen_{uuid.uuid4().hex[:8]}'


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    """The tiny config and its 12-step checkpoint (tools/train.py, the Runner)."""
    root = tmp_path_factory.mktemp('generation')
    config = root / 'tiny.py'
    config.write_text(TINY)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv('FLEXGEN_CACHE_DIR', str(root / 'cache'))
        load_tool('train').main([str(config), '--work-dir', str(root / 'train'),
                                 '--cfg-options', experiment()])
    return dict(config=str(config), checkpoint=str(root / 'train' / 'iter_12.pth'),
                cache=str(root / 'cache'), root=root)


@pytest.fixture
def cache(tiny, monkeypatch):
    monkeypatch.setenv('FLEXGEN_CACHE_DIR', tiny['cache'])


def run_test_tool(tiny, out_dir, *options):
    return load_tool('test').main([tiny['config'], tiny['checkpoint'], '--work-dir',
                                   str(tiny['root'] / 'test'), '--out-dir', str(out_dir),
                                   *options, '--cfg-options', experiment()])


@pytest.fixture(scope='module')
def uninterrupted(tiny):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv('FLEXGEN_CACHE_DIR', tiny['cache'])
        metrics = run_test_tool(tiny, tiny['root'] / 'whole')
    return tiny['root'] / 'whole', metrics


def requests():
    flexgen.register_all_modules()
    return DATASETS.build(dict(type='GenerationRequests', num_classes=6, sizes=SIZES,
                               num_samples=PER_SIZE, seed=1))


def ema_model(tiny, rule=None):
    """The config's model with the checkpoint's EMA weights (what the test hooks swap in),
    read by flexgen's one checkpoint reader."""
    cfg = Config.fromfile(tiny['config'])
    if rule is not None:
        cfg.model.backbone.rope.rule = rule
    model = MODELS.build(cfg.model)
    weights, kind = select_weights(read_checkpoint(tiny['checkpoint']), use_ema=True)
    assert kind == 'ema'
    model.load_state_dict(weights)
    return model.eval()


def direct_images(model, indices, batch=4):
    """uint8 [N, H, W, 3] of requests ``indices`` generated directly, ``batch`` at a time
    (as the loop batches a shard)."""
    items, out = requests(), []
    for begin in range(0, len(indices), batch):
        chunk = [items[i]['data_samples'] for i in indices[begin:begin + batch]]
        images = model.generate([s['label'] for s in chunk], [s['size'] for s in chunk],
                                [s['seed'] for s in chunk])
        out += [to_uint8((x + 1) / 2).permute(1, 2, 0).numpy() for x in images]
    return np.stack(out)


def read_npz(path):
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def test_generation_writes_adm_npz_and_the_size_table(tiny, uninterrupted, cache):
    out_dir, metrics = uninterrupted
    items = requests()
    model = ema_model(tiny)
    judge_cfg = Config.fromfile(tiny['config']).test_evaluator.to_dict()
    judge = GeneratedClassAccuracy(**{k: v for k, v in judge_cfg.items() if k != 'type'})
    for s, (h, w) in enumerate(SIZES):
        npz = read_npz(out_dir / f'samples_{h}x{w}.npz')
        indices = list(range(s * PER_SIZE, (s + 1) * PER_SIZE))
        # ADM's layout: arr_0 uint8 [N, H, W, 3] in request order, arr_1 the labels.
        assert npz['arr_0'].dtype == np.uint8 and npz['arr_0'].shape == (PER_SIZE, h, w, 3)
        assert npz['arr_1'].tolist() == [items.get_label(i) for i in indices]
        # Each image is the request's own, pixel for pixel (shards of 4: batches 4 and 3).
        expected = np.concatenate([direct_images(model, indices[:4]),
                                   direct_images(model, indices[4:])])
        assert np.array_equal(npz['arr_0'], expected)
        # The table's figures for this size: the judge's accuracy on this size's images
        # alone, and the Frechet distance of their judge features to real ones of the size.
        pixels = [torch.from_numpy(x).permute(2, 0, 1).float() / 255 for x in npz['arr_0']]
        judge.process(None, [dict(image=x, label=int(y)) for x, y in zip(pixels, npz['arr_1'])])
        assert metrics[f'gen/accuracy/{h}x{w}'] == judge.evaluate(PER_SIZE)['gen/accuracy']
        _, features = classify(judge.trained.model, [x * 2 - 1 for x in pixels])
        assert metrics[f'gen/frechet_distance/{h}x{w}'] == pytest.approx(frechet_distance(
            *feature_statistics(features), *judge.real_statistics((h, w))), rel=1e-6)

    with open(out_dir / 'metrics.json') as f:
        table = json.load(f)
    rows = table['rows']
    assert [r['size'] for r in rows] == ['16x16', '16x32', '24x16']
    assert [r['aspect'] for r in rows] == ['1:1', '1:2', '3:2']
    assert [r['tokens'] for r in rows] == [16, 32, 24]  # (H / 4) (W / 4), patch 4 in pixels
    assert all(r['images'] == PER_SIZE and r['seconds'] > 0 for r in rows)
    for row in rows:
        assert row['gen/accuracy'] == metrics[f"gen/accuracy/{row['size']}"]
    assert table['manifest']['shard_size'] == 4 and table['manifest']['precision'] == 'fp32'
    markdown = (out_dir / 'metrics.md').read_text().splitlines()
    assert markdown[0] == ('| size | aspect | tokens | images | gen/accuracy | '
                           'gen/frechet_distance | seconds |')
    assert markdown[3].startswith(f"| 16x32 | 1:2 | 32 | 7 | {rows[1]['gen/accuracy']:.4g} |")
    # 21 requests in shards of 4 that never cross a size: 4 + 3 per size.
    names = sorted(os.listdir(out_dir / 'shards'))
    assert names == ['16x16_0000000_0000004.npz', '16x16_0000004_0000007.npz',
                     '16x32_0000007_0000011.npz', '16x32_0000011_0000014.npz',
                     '24x16_0000014_0000018.npz', '24x16_0000018_0000021.npz']


def test_killed_generation_resumes_without_redoing_finished_shards(tiny, uninterrupted,
                                                                   cache, monkeypatch):
    out_dir = tiny['root'] / 'killed'
    real_write, written = generation_module.write_shard, []

    def write_then_die(folder, shard, data):
        if len(written) == 2:
            raise RuntimeError('simulated kill')
        real_write(folder, shard, data)
        written.append(shard.name)

    monkeypatch.setattr(generation_module, 'write_shard', write_then_die)
    with pytest.raises(RuntimeError, match='simulated kill'):
        run_test_tool(tiny, out_dir)
    monkeypatch.setattr(generation_module, 'write_shard', real_write)
    shard_dir = out_dir / 'shards'
    assert sorted(os.listdir(shard_dir)) == sorted(written)
    before = {n: (os.stat(shard_dir / n).st_ino, os.stat(shard_dir / n).st_mtime_ns)
              for n in written}
    # What a SIGKILL in the middle of a write leaves: atomic_write's temporary file.
    stale = shard_dir / '.16x32_0000007_0000011.npz.999.deadbeef.tmp'
    stale.write_bytes(b'half a shard')

    generated = []
    real_predict = DiffusionGenerator.predict

    def recording_predict(self, data_samples):
        generated.extend(int(i) for i in data_samples['index'])
        return real_predict(self, data_samples)

    monkeypatch.setattr(DiffusionGenerator, 'predict', recording_predict)
    metrics = run_test_tool(tiny, out_dir)
    assert sorted(generated) == list(range(7, 21))  # only the 4 unfinished shards
    assert not stale.exists()
    for name, stamp in before.items():
        assert (os.stat(shard_dir / name).st_ino, os.stat(shard_dir / name).st_mtime_ns) \
            == stamp
    whole, whole_metrics = uninterrupted
    for h, w in SIZES:
        resumed = read_npz(out_dir / f'samples_{h}x{w}.npz')
        reference = read_npz(whole / f'samples_{h}x{w}.npz')
        assert np.array_equal(resumed['arr_0'], reference['arr_0'])
        assert np.array_equal(resumed['arr_1'], reference['arr_1'])
    assert metrics == whole_metrics

    # The same folder with other settings is refused, naming what changed.
    with pytest.raises(ValueError, match=r'other settings.*model\.guidance\.scale: 5\.0 -> 3\.0'):
        run_test_tool(tiny, out_dir, '--cfg-scale', '3')


def run_in_subprocess(tiny, out_dir, nproc):
    launcher = [sys.executable, 'tools/test.py'] if nproc == 1 else [
        sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={nproc}',
        f'--master_port={free_port()}', 'tools/test.py', '--launcher', 'pytorch']
    env = dict(os.environ, OMP_NUM_THREADS='1', FLEXGEN_CACHE_DIR=tiny['cache'],
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get('PYTHONPATH', '')]))
    proc = subprocess.run(launcher + [tiny['config'], tiny['checkpoint'], '--work-dir',
                                      str(tiny['root'] / 'sub'), '--out-dir', str(out_dir),
                                      '--cfg-options', experiment()],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out_dir / 'metrics.json') as f:
        return json.load(f)


@pytest.mark.slow
def test_two_ranks_equal_one_process_image_for_image(tiny):
    one = run_in_subprocess(tiny, tiny['root'] / 'one', nproc=1)
    two = run_in_subprocess(tiny, tiny['root'] / 'two', nproc=2)
    for h, w in SIZES:
        a = read_npz(tiny['root'] / 'one' / f'samples_{h}x{w}.npz')
        b = read_npz(tiny['root'] / 'two' / f'samples_{h}x{w}.npz')
        assert np.array_equal(a['arr_0'], b['arr_0']) and np.array_equal(a['arr_1'], b['arr_1'])
    ranks = [int(read_npz(tiny['root'] / 'two' / 'shards' / name)['rank'])
             for name in sorted(os.listdir(tiny['root'] / 'two' / 'shards'))]
    assert ranks == [0, 1, 0, 1, 0, 1]  # the shards were dealt to both processes
    # The evaluator saw every image once across the ranks (21 images: rank 1 pads one).
    for key, value in one['metrics'].items():
        assert two['metrics'][key] == pytest.approx(value, rel=1e-5), key
    assert [r['images'] for r in two['rows']] == [PER_SIZE] * 3


def test_extrapolation_sweep_table_and_grid(tiny, cache):
    sweep_tool = load_tool('sweep_extrapolation')
    out_dir = tiny['root'] / 'sweep'
    sizes = [(16, 16), (32, 32), (24, 40)]
    # L = 4 patches: 16x16 (4 x 4 patches) is inside it, 32x32 and 24x40 are beyond it.
    metrics = sweep_tool.main([
        tiny['config'], tiny['checkpoint'], '--rules', 'no', 'dynntk', 'YaRN', '--sizes',
        '16x16', '32x32', '24x40', '--ori-max-pe-len', '4', '--num-samples', '2',
        '--work-dir', str(tiny['root'] / 'test'), '--out-dir', str(out_dir),
        '--cfg-options', experiment()])
    with open(out_dir / 'sweep.json') as f:
        sweep = json.load(f)
    names = ['Extrapolation', 'NTKAware', 'NTKAware-decouple', 'YaRN', 'YaRN-decouple']
    assert [v['name'] for v in sweep['variants']] == names
    rows = sweep['rows']
    assert [(r['rule'], r['decouple'], r['size']) for r in rows] == [
        (name.split('-')[0], name.endswith('decouple'), f'{h}x{w}')
        for name in names for h, w in sizes]
    for row in rows:
        name = row['rule'] + ('-decouple' if row['decouple'] else '')
        assert row['gen/accuracy'] == metrics[f"{name}/gen/accuracy/{row['size']}"]
    assert (out_dir / 'sweep.md').read_text().count('\n') == 2 + len(rows)

    def images(name, size):
        return read_npz(out_dir / name / f'samples_{size[0]}x{size[1]}.npz')['arr_0']

    # Inside the training grid every rule is plain RoPE; on a square grid one scale per
    # axis is the same scale; beyond the grid on a non-square one it is not.
    for name in names[1:]:
        assert np.array_equal(images(name, (16, 16)), images('Extrapolation', (16, 16)))
        assert not np.array_equal(images(name, (32, 32)), images('Extrapolation', (32, 32)))
    for rule in ('NTKAware', 'YaRN'):
        assert np.array_equal(images(rule, (32, 32)), images(rule + '-decouple', (32, 32)))
        assert not np.array_equal(images(rule, (24, 40)), images(rule + '-decouple', (24, 40)))
    # The rule really is the one named: YaRN-decouple's images are the model's with it.
    rule = dict(type='YaRN', decouple=True, ori_max_pe_len=4)
    yarn = ema_model(tiny, rule=rule)
    items = DATASETS.build(dict(type='GenerationRequests', num_classes=6, sizes=sizes,
                                num_samples=2, seed=1))
    chunk = [items[i]['data_samples'] for i in (4, 5)]  # the two requests of 24x40
    direct = yarn.generate([s['label'] for s in chunk], [s['size'] for s in chunk],
                           [s['seed'] for s in chunk])
    assert np.array_equal(images('YaRN-decouple', (24, 40)),
                          np.stack([to_uint8((x + 1) / 2).permute(1, 2, 0).numpy()
                                    for x in direct]))

    # The grid: rows = variants, columns = sizes, each cell request 0 of its size
    # (image_grid's layout: cells of the largest image plus 2 px of padding).
    grid = np.asarray(Image.open(out_dir / 'sweep_grid.png'))
    cell_h, cell_w = 32 + 2, 40 + 2
    assert grid.shape == (len(names) * cell_h + 2, len(sizes) * cell_w + 2, 3)
    for r, name in enumerate(names):
        for c, (h, w) in enumerate(sizes):
            top, left = r * cell_h + 2, c * cell_w + 2
            assert np.array_equal(grid[top:top + h, left:left + w], images(name, (h, w))[0])


def test_generation_options_edit_the_config():
    from flexgen.engine import apply_generation_options
    from flexgen.evaluation.generation import precision_context
    flexgen.register_all_modules()
    cfg = Config.fromfile(osp.join(ROOT, 'configs', 'dit', 'dit_xl_2_256.py'))
    apply_generation_options(cfg, sizes=[(512, 512)], num_samples=10, batch_size=8,
                             out_dir='somewhere', cfg_scale=4.0, cfg_interval=(0.0, 0.7),
                             steps=100, precision='bf16', shard_size=64)
    assert cfg.test_dataloader.dataset.sizes == [(512, 512)]
    assert cfg.test_dataloader.dataset.num_samples == 10
    assert 'num_per_class' not in cfg.test_dataloader.dataset
    assert cfg.test_dataloader.batch_size == 8
    assert cfg.test_cfg == dict(type='GenerationLoop', out_dir='somewhere', precision='bf16',
                                shard_size=64)
    assert cfg.model.guidance.scale == 4.0 and cfg.model.guidance.interval == (0.0, 0.7)
    assert cfg.model.guidance.channels == (0, 1, 2)  # the rest of the guidance is kept
    assert cfg.model.sampler == dict(type='DDPMAncestral', num_steps='100')  # respacing: str
    apply_generation_options(cfg, sampler='EulerODE', steps=50)
    assert cfg.model.sampler == dict(type='EulerODE', num_steps=50)  # a new type's defaults
    demo = Config.fromfile(osp.join(ROOT, 'configs', 'demo', 'shapes_flexdit_rf.py'))
    demo.model.guidance = None
    with pytest.raises(ValueError, match='no guidance.*give --cfg-scale'):
        apply_generation_options(demo, cfg_interval=(0.0, 0.5))
    apply_generation_options(demo, cfg_scale=2.0)
    assert demo.model.guidance == dict(type='ClassifierFreeGuidance', scale=2.0)
    toy = Config.fromfile(osp.join(ROOT, 'tests', 'configs', 'toy_train.py'))
    with pytest.raises(ValueError, match="need test_cfg=dict\\(type='GenerationLoop'\\)"):
        apply_generation_options(toy, precision='bf16')
    with pytest.raises(ValueError, match="GenerationRequests', got 'ToyVectorDataset'"):
        apply_generation_options(toy, num_samples=4)
    # Precision: autocast to bfloat16 (also on a CPU); fp32 leaves matmuls alone.
    x = torch.ones(2, 2)
    with precision_context('bf16', torch.device('cpu')):
        assert (x @ x).dtype == torch.bfloat16
    with precision_context('fp32', torch.device('cpu')):
        assert (x @ x).dtype == torch.float32
    with pytest.raises(ValueError, match='precision must be one of'):
        with precision_context('fp8', torch.device('cpu')):
            pass


def test_bad_sizes_and_rules_are_refused_before_generating(tiny, cache):
    out_dir = tiny['root'] / 'refused'
    with pytest.raises(ValueError, match=r"\['18x18'\] are not divisible by 4"):
        run_test_tool(tiny, out_dir, '--sizes', '16x16', '18x18')
    sweep_tool = load_tool('sweep_extrapolation')
    with pytest.raises(ValueError, match='YaRN: ori_max_pe_len is required'):
        sweep_tool.main([tiny['config'], tiny['checkpoint'], '--rules', 'no', 'yarn',
                         '--sizes', '16x16', '--work-dir', str(tiny['root'] / 'test'),
                         '--out-dir', str(out_dir), '--cfg-options', experiment()])
    assert not out_dir.exists()  # nothing was generated


@pytest.mark.slow
def test_inception_metrics_through_the_generation_loop(tiny, cache, tmp_path):
    """tools/test.py with InceptionMetrics (a random Inception of ADM's architecture, a
    reference .npz in ADM's layout): FID and IS of the generated .npz, as computed directly
    from its images."""
    from helpers import random_inception_weights
    from test_inception_metrics import direct_fid, direct_inception_score, shapes

    from flexgen.evaluation import InceptionFeatures
    weights = tmp_path / 'inception.pth'
    random_inception_weights(weights, seed=1)
    reference = tmp_path / 'ref.npz'
    np.savez(reference, arr_0=shapes(20, seed=4, size=(16, 16), palette='grey'))
    config = tmp_path / 'tiny_inception.py'
    config.write_text(f"""_base_ = [{tiny['config']!r}]
test_evaluator = dict(_delete_=True, type='InceptionMetrics', reference={str(reference)!r},
                      inception_weights={str(weights)!r}, scores=('fid', 'is'),
                      cache_dir={str(tmp_path / 'cache')!r})
""")
    metrics = load_tool('test').main([
        str(config), tiny['checkpoint'], '--work-dir', str(tiny['root'] / 'test'),
        '--out-dir', str(tmp_path / 'out'), '--sizes', '16x16', '--num-samples', '12',
        '--cfg-options', experiment()])
    assert set(metrics) == {'inception/fid', 'inception/is'}
    images = read_npz(tmp_path / 'out' / 'samples_16x16.npz')['arr_0']
    inception = InceptionFeatures(str(weights), device='cpu')

    def features(array):  # batched as the loop feeds the metric: 4 images a call
        parts = [inception(torch.from_numpy(array[b:b + 4]).permute(0, 3, 1, 2))
                 for b in range(0, len(array), 4)]
        return {k: torch.cat([p[k] for p in parts]).double().numpy() for k in parts[0]}

    generated = features(images)
    with np.load(reference) as ref:
        real = inception(torch.from_numpy(ref['arr_0']).permute(0, 3, 1, 2))['pool']
    fid = direct_fid(generated['pool'], real.double().numpy())
    assert metrics['inception/fid'] == pytest.approx(fid, rel=1e-6)
    assert metrics['inception/is'] == pytest.approx(
        direct_inception_score(generated['logits']), rel=1e-6)

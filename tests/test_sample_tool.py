"""tools/sample.py end to end: a checkpoint in, a PNG grid out (one row per size, one column
per class), pixel-exact against the inference API and reproducible from the seed."""
import importlib.util
import os.path as osp
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from flexgen.apis import init_generator
from helpers import randomise

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TINY = f'''
_base_ = [{osp.join(ROOT, 'configs', '_base_', 'models', 'flexdit_pixel_tiny.py')!r}]
model = dict(backbone=dict(hidden_size=32, depth=2, num_heads=2),
             sampler=dict(num_steps=8))
'''
PAD = 2  # flexgen.apis.image_grid's default padding


@pytest.fixture
def one_thread():
    """Tiny tensors: torch's thread hand-off costs more than it saves."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def sample_tool():
    spec = importlib.util.spec_from_file_location('flexgen_tool_sample',
                                                  osp.join(ROOT, 'tools', 'sample.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def checkpoints(tmp_path):
    """A tiny config, its randomly initialised weights as .safetensors, and a training
    checkpoint (.pth) whose EMA weights are those and whose raw weights differ."""
    config = tmp_path / 'tiny.py'
    config.write_text(TINY)
    model = init_generator(str(config))
    randomise(model.backbone, seed=0, std=0.1)
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(weights, tmp_path / 'weights.safetensors')
    raw = {k: v + 0.05 for k, v in weights.items()}
    # mmengine's EMAHook layout: it swaps the two state dicts when saving, so `state_dict`
    # holds the EMA weights and `ema_state_dict` the raw ones (test_ema_weights.py checks
    # this against checkpoints the Runner writes).
    torch.save(dict(state_dict=weights,
                    ema_state_dict={'steps': torch.tensor(10),
                                    **{f'module.{k}': v for k, v in raw.items()}}),
               tmp_path / 'train.pth')
    return str(config), model, tmp_path


def run(sample_tool, monkeypatch, *argv):
    monkeypatch.setattr(sys, 'argv', ['sample.py', *map(str, argv), '--device', 'cpu'])
    sample_tool.main()


def read(path):
    return np.asarray(Image.open(path))


def test_grid_layout_pixels_and_seed(sample_tool, checkpoints, monkeypatch, one_thread):
    config, model, tmp = checkpoints
    classes, sizes = [0, 3, 5], [(16, 24), (24, 16), (8, 32)]
    out = tmp / 'grid.png'
    run(sample_tool, monkeypatch, config, tmp / 'weights.safetensors', '--classes', *classes,
        '--height', *[h for h, _ in sizes], '--width', *[w for _, w in sizes],
        '--seed', 7, '--out', out)
    grid = read(out)
    # Equal cells of the largest height and width plus padding: 3 rows (sizes) x 3 columns.
    cell_h, cell_w = 24 + PAD, 32 + PAD
    assert grid.shape == (3 * cell_h + PAD, 3 * cell_w + PAD, 3)

    # Cell (row r, column c) holds class c at size r, drawn with seed 7 * 1_000_003 + index.
    labels = [c for _ in sizes for c in classes]
    seeds = [7 * 1_000_003 + i for i in range(len(labels))]
    images = model.generate(labels, [s for s in sizes for _ in classes], seeds)
    filled = np.zeros(grid.shape[:2], dtype=bool)
    for i, image in enumerate(images):
        r, c = divmod(i, len(classes))
        h, w = sizes[r]
        top, left = r * cell_h + PAD, c * cell_w + PAD
        expected = (((image + 1) / 2).clamp(0, 1) * 255).round().to(torch.uint8)
        assert np.array_equal(grid[top:top + h, left:left + w], expected.permute(1, 2, 0).numpy())
        filled[top:top + h, left:left + w] = True
    assert (grid[~filled] == 128).all()  # gray padding around and between the images
    assert len({grid[r * cell_h + PAD:r * cell_h + PAD + 8, PAD:PAD + 8].tobytes()
                for r in range(3)}) == 3  # the samples are not blank

    # The same seed gives the same file, byte for byte; another seed does not.
    again = tmp / 'again.png'
    run(sample_tool, monkeypatch, config, tmp / 'weights.safetensors', '--classes', *classes,
        '--height', *[h for h, _ in sizes], '--width', *[w for _, w in sizes],
        '--seed', 7, '--out', again)
    assert out.read_bytes() == again.read_bytes()
    other = tmp / 'other.png'
    run(sample_tool, monkeypatch, config, tmp / 'weights.safetensors', '--classes', *classes,
        '--height', *[h for h, _ in sizes], '--width', *[w for _, w in sizes],
        '--seed', 8, '--out', other)
    assert read(other).shape == grid.shape and not np.array_equal(read(other), grid)


def test_single_height_repeats_and_checkpoint_weights(sample_tool, checkpoints, monkeypatch,
                                                     one_thread):
    config, _, tmp = checkpoints
    common = ['--classes', 1, 2, '--height', 16, '--width', 16, 32, '--steps', 4]
    run(sample_tool, monkeypatch, config, tmp / 'weights.safetensors', *common,
        '--out', tmp / 'st.png')
    grid = read(tmp / 'st.png')
    # Sizes (16, 16) and (16, 32): 2 rows x 2 columns of 18 x 34 cells.
    assert grid.shape == (2 * (16 + PAD) + PAD, 2 * (32 + PAD) + PAD, 3)
    # A training checkpoint samples from its EMA weights (the same as the safetensors
    # file); --no-ema takes the raw weights instead.
    run(sample_tool, monkeypatch, config, tmp / 'train.pth', *common, '--out', tmp / 'ema.png')
    run(sample_tool, monkeypatch, config, tmp / 'train.pth', *common, '--no-ema',
        '--out', tmp / 'raw.png')
    assert (tmp / 'ema.png').read_bytes() == (tmp / 'st.png').read_bytes()
    assert not np.array_equal(read(tmp / 'raw.png'), grid)


def test_mismatched_sizes_are_refused(sample_tool, checkpoints, monkeypatch):
    config, _, tmp = checkpoints
    with pytest.raises(SystemExit, match='--height has 2 values and --width 3'):
        run(sample_tool, monkeypatch, config, tmp / 'weights.safetensors',
            '--height', 16, 24, '--width', 16, 24, 32, '--out', tmp / 'x.png')
    assert not (tmp / 'x.png').exists()


def test_rope_interpolation_flags(sample_tool, checkpoints, monkeypatch, one_thread):
    """--interpolation sets the backbone RoPE's rule: samples beyond the training grid
    change, and equal generating with that rule set on the model directly."""
    config, model, tmp = checkpoints
    common = ['--classes', 1, '--height', 32, '--width', 48, '--seed', 3]
    run(sample_tool, monkeypatch, config, tmp / 'weights.safetensors', *common,
        '--out', tmp / 'plain.png')
    run(sample_tool, monkeypatch, config, tmp / 'weights.safetensors', *common,
        '--interpolation', 'yarn', '--decouple', '--ori-max-pe-len', 8, '--out', tmp / 'yarn.png')
    model.backbone.rope.set_rule(dict(type='YaRN', ori_max_pe_len=8, decouple=True))
    image = model.generate([1], [(32, 48)], [3 * 1_000_003])[0]
    expected = (((image + 1) / 2).clamp(0, 1) * 255).round().to(torch.uint8)
    yarn = read(tmp / 'yarn.png')
    assert np.array_equal(yarn[PAD:PAD + 32, PAD:PAD + 48], expected.permute(1, 2, 0).numpy())
    assert not np.array_equal(yarn, read(tmp / 'plain.png'))
    with pytest.raises(SystemExit, match='ori_max_pe_len is required'):
        run(sample_tool, monkeypatch, config, tmp / 'weights.safetensors', *common,
            '--interpolation', 'yarn')
    with pytest.raises(SystemExit, match='need --interpolation'):
        run(sample_tool, monkeypatch, config, tmp / 'weights.safetensors', *common, '--decouple')


def test_cfg_flags_guide_classifier_free(sample_tool, checkpoints, monkeypatch, one_thread):
    """--cfg-scale / --cfg-interval set classifier-free guidance: a config's AutoGuidance
    gives way to it (its interval and scale kept, its defaults where the config names
    none), and on a config without guidance --cfg-interval alone means scale 1, no
    guidance."""
    from flexgen.samplers.guidance import ClassifierFreeGuidance
    config, model, tmp = checkpoints
    weak = dict(type='FlexDiT', in_channels=3, patch_size=2, hidden_size=32, depth=1,
                num_heads=2, num_classes=6, mlp=dict(type='GeluMlp'), pos_embed=None,
                rope=dict(type='AxialRoPE2D'))

    def child(name, guidance):
        path = tmp / f'{name}.py'
        path.write_text(f'_base_ = [{config!r}]\nmodel = dict(guidance={guidance!r})\n')
        return path

    auto = child('auto', dict(_delete_=True, type='AutoGuidance', weak_model=weak,
                              interval=(0.2, 0.9)))
    unguided = child('unguided', None)

    def sample(config_path, *flags):
        out = tmp / 'cell.png'
        run(sample_tool, monkeypatch, config_path, tmp / 'weights.safetensors', '--classes', 4,
            '--height', 16, '--width', 16, '--seed', 5, *flags, '--out', out)
        return read(out)[PAD:PAD + 16, PAD:PAD + 16]

    def expected(guidance):
        image = model.generate([4], [(16, 16)], [5 * 1_000_003], guidance=guidance)[0]
        return (((image + 1) / 2).clamp(0, 1) * 255).round().to(torch.uint8) \
            .permute(1, 2, 0).numpy()

    scaled = sample(auto, '--cfg-scale', 3.0)
    assert np.array_equal(scaled, expected(ClassifierFreeGuidance(3.0, (0.2, 0.9))))
    assert np.array_equal(sample(auto, '--cfg-interval', 0.1, 0.6),  # AutoGuidance's scale 2
                          expected(ClassifierFreeGuidance(2.0, (0.1, 0.6))))
    plain = sample(unguided, '--cfg-interval', 0.0, 0.5)
    assert np.array_equal(plain, expected(None))
    assert not np.array_equal(plain, scaled)

"""tools/sample.py as a new user meets it: bad requests refused before anything loads, one PNG
per image, and images that do not depend on --batch-size. The checkpoint is written by the
Runner (tools/train.py's build_runner)."""
import os.path as osp
import subprocess
import sys

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

from flexgen.models.autoencoders import DiffusersAutoencoder
from helpers import load_tool, one_torch_thread

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TINY = osp.join(ROOT, 'tests', 'configs', 'tiny_generator.py')

sample_tool = load_tool('sample')


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """(config, checkpoint) of the tiny model, trained and saved by the Runner."""
    work = tmp_path_factory.mktemp('tiny')
    with one_torch_thread():
        load_tool('train').build_runner([TINY, '--work-dir', str(work / 'run')]).train()
    return TINY, str(work / 'run' / 'iter_2.pth')


def run_tool(*argv, timeout=120):
    """tools/sample.py in a fresh interpreter; also reports whether torch was imported."""
    code = ('import runpy, sys\n'
            f'sys.argv = ["sample.py", *{[str(a) for a in argv]!r}]\n'
            'try:\n'
            '    runpy.run_path("tools/sample.py", run_name="__main__")\n'
            '    code = 0\n'
            'except SystemExit as exit:\n'
            '    code = exit.code if isinstance(exit.code, int) else 1\n'
            '    if not isinstance(exit.code, int): print(exit.code, file=sys.stderr)\n'
            'print("torch imported:", "torch" in sys.modules, file=sys.stderr)\n'
            'sys.exit(code)\n')
    return subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


# (extra arguments, expected error text). tiny_generator.py: 6 classes, patch 2, pixel space.
BAD_REQUESTS = [
    (['--classes', '6'], "--classes 6: the config's model has 6 classes "
                         '(model.backbone.num_classes), ids 0 to 5'),
    (['--classes', '2', '9', '7'], '--classes 9 7: the config'),
    (['--classes', '-1'], 'argument --classes: class ids are >= 0, got -1'),
    (['--height', '15'], "--height 15: sizes must be multiples of 2 pixels (the autoencoder's "
                         'downsampling 1 x the patch size 2), e.g. 14 or 16'),
    (['--width', '16', '33'], '--width 33: sizes must be multiples of 2'),
    (['--height', '0'], 'argument --height: must be a positive integer, got 0'),
    (['--width', '-8'], 'argument --width: must be a positive integer, got -8'),
    (['--steps', '0'], 'argument --steps: must be a positive integer, got 0'),
    (['--steps', '-3'], 'argument --steps: must be a positive integer, got -3'),
    (['--batch-size', '0'], 'argument --batch-size: must be a positive integer, got 0'),
    (['--cfg-interval', '0.8', '0.2'], '--cfg-interval 0.8 0.2: needs 0 <= LOW <= HIGH <= 1'),
    (['--cfg-options', 'model.sampler.num_steps'],
     "--cfg-options 'model.sampler.num_steps': each item must be KEY=VALUE"),
    (['--cfg-options', 'model.backbone.num_classes=3', '--classes', '3'],
     "--classes 3: the config's model has 3 classes"),
]


@pytest.mark.parametrize('extra, message', BAD_REQUESTS,
                         ids=[' '.join(extra) for extra, _ in BAD_REQUESTS])
def test_bad_request_is_refused_before_the_model_loads(trained, tmp_path, extra, message):
    config, checkpoint = trained
    out = tmp_path / 'grid.png'
    proc = run_tool(config, checkpoint, '--height', 16, '--width', 16, '--out', out, *extra)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr
    # Refused from the config alone: torch (and so the model) never loaded.
    assert 'torch imported: False' in proc.stderr
    assert not out.exists()


def test_per_image_pngs_do_not_depend_on_the_batch_size(trained, tmp_path):
    config, checkpoint = trained
    classes, sizes = [0, 3, 5], [(16, 24), (24, 16), (8, 32)]
    request = [config, checkpoint, '--classes', *classes,
               '--height', *[h for h, _ in sizes], '--width', *[w for _, w in sizes],
               '--seed', 7, '--device', 'cpu']
    outputs = {}
    for batch_size in (None, 1, 4):
        out = tmp_path / f'batch_{batch_size}'
        extra = [] if batch_size is None else ['--batch-size', batch_size]
        with one_torch_thread():
            sample_tool.main([str(a) for a in
                              [*request, *extra, '--out-dir', out, '--out', out / 'grid.png']])
        outputs[batch_size] = out

    # One file per (class, size), named by class, size and the image's own seed.
    index = [(c, size) for size in sizes for c in classes]
    names = [f'class{c}_{h}x{w}_seed{7 * 1_000_003 + i}.png' for i, (c, (h, w)) in
             enumerate(index)]
    assert sorted(p.name for p in outputs[None].iterdir()) == sorted(names + ['grid.png'])
    reference = {name: np.asarray(Image.open(outputs[None] / name)) for name in names}
    for name, (c, (h, w)) in zip(names, index):
        assert reference[name].shape == (h, w, 3)
    assert len({image.tobytes() for image in reference.values()}) == len(names)  # distinct

    # The grid holds the same images (top-left of its cells: 2 px padding, 26 x 34 cells).
    grid = np.asarray(Image.open(outputs[None] / 'grid.png'))
    for name, i in zip(names, range(len(names))):
        r, col = divmod(i, len(classes))
        h, w = sizes[r]
        top, left = 2 + r * 26, 2 + col * 34
        assert np.array_equal(grid[top:top + h, left:left + w], reference[name])

    # Batches of 1 and 4 (mixed sizes, jagged) give the same images: every image draws from
    # its own seed. Float rounding of a differently shaped batch (measured <= 7e-7) may move
    # a pixel by one 8-bit level, rarely; a seed that followed the batch position would
    # change every pixel.
    for batch_size in (1, 4):
        for name in names:
            image = np.asarray(Image.open(outputs[batch_size] / name)).astype(int)
            difference = np.abs(image - reference[name])
            assert difference.max() <= 1 and (difference == 0).mean() > 0.99, (batch_size, name)


def test_autoencoder_downsample_read_from_config_json_matches_the_model(tmp_path):
    """The pre-load size check reads a diffusers autoencoder's config.json; it must agree
    with what DiffusersAutoencoder computes once loaded (KL: SD-VAE's kind; DC: NiT's)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        kl = diffusers.AutoencoderKL(
            block_out_channels=(8, 16, 16), down_block_types=('DownEncoderBlock2D',) * 3,
            up_block_types=('UpDecoderBlock2D',) * 3, latent_channels=4, norm_num_groups=4,
            layers_per_block=1)
        dc = diffusers.AutoencoderDC(
            in_channels=3, latent_channels=4, attention_head_dim=8,
            encoder_block_types=('ResBlock',) * 4, decoder_block_types=('ResBlock',) * 4,
            encoder_block_out_channels=(8, 8, 16, 16), decoder_block_out_channels=(8, 8, 16, 16),
            encoder_layers_per_block=(1,) * 4, decoder_layers_per_block=(1,) * 4,
            encoder_qkv_multiscales=((),) * 4, decoder_qkv_multiscales=((),) * 4,
            upsample_block_type='interpolate', downsample_block_type='Conv')
    kl.save_pretrained(tmp_path / 'kl')
    dc.save_pretrained(tmp_path / 'pipeline' / 'vae')
    cases = [dict(type='DiffusersAutoencoder', path=str(tmp_path / 'kl')),
             dict(type='DiffusersAutoencoder', path=str(tmp_path / 'pipeline'),
                  subfolder='vae', kind='AutoencoderDC')]
    for cfg, expected in zip(cases, (4, 8)):
        built = DiffusersAutoencoder(**{k: v for k, v in cfg.items() if k != 'type'})
        assert sample_tool.autoencoder_downsample(cfg) == built.downsample == expected
    assert sample_tool.autoencoder_downsample(dict(type='IdentityAutoencoder')) == 1
    # Not knowable without loading: no pre-load check (the model's own check applies).
    assert sample_tool.autoencoder_downsample(
        dict(type='DiffusersAutoencoder', path=str(tmp_path / 'nowhere'))) is None
    assert sample_tool.autoencoder_downsample(dict(type='MyAutoencoder')) is None

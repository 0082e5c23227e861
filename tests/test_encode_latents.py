"""tools/encode_latents.py with the FiT and NiT latent writers: FiT's / NiT's resize and crop
rules, the folder split, latents equal to the autoencoder's encoding of the resized (and
mirrored) image, readable by FiTLatents / NiTLatents, resumable and atomic."""
import importlib.util
import json
import os
import os.path as osp

import diffusers
import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image
from safetensors.torch import load_file

from flexgen.datasets.fit_latents import FiTLatents, FiTLatentWriter, fit_resize_size
from flexgen.datasets.image_folder import center_crop_arr
from flexgen.datasets.nit_latents import nit_resize_size

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
L = 64  # tokens; the tiny VAE downsamples 2x, patch 2: m = 4 px per token side, S = 32 px
SCALE, SHIFT = 0.5, 0.1


def load_tool():
    spec = importlib.util.spec_from_file_location(
        'flexgen_tool_encode_latents', osp.join(ROOT, 'tools', 'encode_latents.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tool = load_tool()

# (class folder, file, (W, H) px) -> where it goes and the resized (W, H) worked out by hand.
IMAGES = {
    ('a_cat', 'wide.png'): ((40, 28), 'greater_than_64', (36, 24)),  # sqrt(40/28)*32 = 38.25
    ('a_cat', 'plain.png'): ((24, 20), 'from_16_to_64', (24, 20)),     # kept: 30 tokens
    ('b_dog', 'sub/floor.PNG'): ((30, 18), 'from_16_to_64', (28, 16)),  # floored: 28 tokens
    ('b_dog', 'thin.png'): ((3, 60), 'from_16_to_64', (4, 80)),       # w < 4: raised to 4
    ('b_dog', 'small.png'): ((12, 12), 'less_than_16', (12, 12)),     # 9 tokens
}


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    """Tiny convolutions: torch's threads only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def vae_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp('vae')
    with torch.random.fork_rng():  # diffusers initialises from the global RNG
        torch.manual_seed(0)
        vae = diffusers.AutoencoderKL(
            block_out_channels=(8, 16), down_block_types=('DownEncoderBlock2D',) * 2,
            up_block_types=('UpDecoderBlock2D',) * 2, latent_channels=4, norm_num_groups=4,
            layers_per_block=1, sample_size=32, scaling_factor=SCALE, shift_factor=SHIFT)
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope='module')
def image_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('images')
    rng = np.random.default_rng(0)
    for (cls, file), ((w, h), _, _) in IMAGES.items():
        os.makedirs(osp.dirname(root / cls / file), exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / cls / file)
    (root / 'b_dog' / 'notes.txt').write_text('not an image')
    return root


def run(image_root, out, vae_dir, *extra):
    return tool.main([str(image_root), str(out), '--vae', str(vae_dir), '--target-len', str(L),
                      '--workers', '0', '--batch-size', '2', '--device', 'cpu', *extra])


def encode(vae_dir, image):
    """The autoencoder's normalised posterior mean of a PIL image, straight from diffusers."""
    vae = diffusers.AutoencoderKL.from_pretrained(vae_dir).eval()
    x = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
    with torch.no_grad():
        return (vae.encode(x[None]).latent_dist.mean[0] - SHIFT) * SCALE


def test_resize_rule_matches_fit():
    """resize_arr's cases at S = 256, m = 16 (worked out by hand)."""
    assert fit_resize_size(500, 375, 256, 16) == (288, 208)  # sqrt(4/3)*256 = 295.6
    assert fit_resize_size(256, 256, 256, 16) == (256, 256)
    assert fit_resize_size(200, 120, 256, 16) == (192, 112)  # floored only
    assert fit_resize_size(10, 100, 256, 16) == (16, 160)    # narrow: w -> 16
    assert fit_resize_size(100, 12, 256, 16) == (128, 16)    # low: h -> 16, w 133 -> 128
    assert fit_resize_size(1024, 256, 256, 16) == (512, 128)


def test_center_crop_is_adms():
    image = Image.fromarray(np.arange(140 * 100 * 3, dtype=np.uint8).reshape(100, 140, 3) % 251)
    crop = center_crop_arr(image, 32)  # 140x100: BOX-halved to 70x50, BICUBIC to 45x32
    expected = image.resize((70, 50), Image.BOX).resize((45, 32), Image.BICUBIC)
    assert np.array_equal(np.asarray(crop), np.asarray(expected)[:, 6:38])


def test_encode_then_read_back(tmp_path, image_root, vae_dir):
    out = tmp_path / 'latents'
    assert run(image_root, out, vae_dir) == dict(total=5, skipped=0, written=5)
    # Files are named by the image's path under the root, '/' written '%2F'.
    folders = {'from_16_to_64': ['a_cat%2Fplain', 'b_dog%2Fsub%2Ffloor', 'b_dog%2Fthin'],
               'greater_than_64_resize': ['a_cat%2Fwide'],
               'greater_than_64_crop': ['a_cat%2Fwide'], 'less_than_16': ['b_dog%2Fsmall']}
    for folder, names in folders.items():
        assert sorted(os.listdir(out / folder)) == [f'{n}.safetensors' for n in names]
    small = load_file(out / 'less_than_16' / 'b_dog%2Fsmall.safetensors')
    assert small['size'].tolist() == [3, 3] and small['feature'].shape == (2, 3, 3, 16)

    plain = FiTLatents(str(out), target_len=L, choice='resize', flip_prob=0.0)
    mirror = FiTLatents(str(out), target_len=L, choice='resize', flip_prob=1.0)
    crop = FiTLatents(str(out), target_len=L, choice='crop', flip_prob=0.0)
    assert len(plain) == 4
    by_name = {osp.basename(e[0])[:-len('.safetensors')]: i for i, e in enumerate(plain.entries)}
    labels = {'a_cat': 0, 'b_dog': 1}
    for (cls, file), ((w, h), _, (new_w, new_h)) in IMAGES.items():
        if file == 'small.png':
            continue
        i = by_name[FiTLatentWriter.file_name(f'{cls}/{osp.splitext(file)[0]}')]
        image = Image.open(image_root / cls / file).convert('RGB')
        resized = image if (new_w, new_h) == (w, h) else image.resize((new_w, new_h),
                                                                       Image.BICUBIC)
        assert plain.get_size(i) == (new_h // 2, new_w // 2)
        assert plain[i]['data_samples']['label'] == labels[cls] == plain.get_label(i)
        torch.testing.assert_close(plain[i]['inputs'], encode(vae_dir, resized),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mirror[i]['inputs'],
                                   encode(vae_dir, resized.transpose(Image.FLIP_LEFT_RIGHT)),
                                   rtol=1e-5, atol=1e-5)
    wide = Image.open(image_root / 'a_cat' / 'wide.png')
    cropped = wide.resize((46, 32), Image.BICUBIC).crop((7, 0, 39, 32))  # 40x28 -> 32x32
    torch.testing.assert_close(crop[by_name['a_cat%2Fwide']]['inputs'], encode(vae_dir, cropped),
                               rtol=1e-5, atol=1e-5)


def test_second_run_skips_and_interrupted_run_resumes(tmp_path, image_root, vae_dir,
                                                      monkeypatch):
    clean = tmp_path / 'clean'
    run(image_root, clean, vae_dir)
    stamps = {p: os.stat(p).st_mtime_ns for p in clean.rglob('*.safetensors')}
    assert run(image_root, clean, vae_dir) == dict(total=5, skipped=5, written=0)
    assert {p: os.stat(p).st_mtime_ns for p in clean.rglob('*.safetensors')} == stamps

    # Interrupt the 3rd file write half-way (wide.png's crop, after its resize file): no
    # final file, the partial temporary one removed, and wide.png counts as not done.
    out, real_save, saved = tmp_path / 'resumed', safetensors.torch.save_file, []

    def crashing_save(tensors, path, metadata=None):
        if len(saved) == 2:
            with open(path, 'wb') as f:
                f.write(b'partial')
            raise KeyboardInterrupt
        saved.append(path)
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, 'save_file', crashing_save)
    with pytest.raises(KeyboardInterrupt):
        run(image_root, out, vae_dir)
    assert sorted(str(p.relative_to(out)) for p in out.rglob('*.safetensors')) == [
        'from_16_to_64/a_cat%2Fplain.safetensors',
        'greater_than_64_resize/a_cat%2Fwide.safetensors']
    assert [p.name for p in out.rglob('*') if p.is_file() and p.suffix != '.safetensors'] \
        == ['meta.json']
    monkeypatch.setattr(safetensors.torch, 'save_file', real_save)
    FiTLatents(str(out), target_len=L)  # the partial state is readable
    stats = run(image_root, out, vae_dir)
    assert stats == dict(total=5, skipped=1, written=4)
    files = sorted(p.relative_to(clean) for p in clean.rglob('*.safetensors'))
    assert sorted(p.relative_to(out) for p in out.rglob('*.safetensors')) == files
    for rel in files:
        a, b = load_file(clean / rel), load_file(out / rel)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_other_settings_in_the_same_folder_stop(tmp_path, image_root, vae_dir):
    out = tmp_path / 'latents'
    run(image_root, out, vae_dir)
    with pytest.raises(SystemExit, match='dtype'):
        run(image_root, out, vae_dir, '--dtype', 'float16')


def test_same_file_name_in_two_class_folders(tmp_path, vae_dir):
    """cat/0.png and dog/0.png are two images: both encoded, both read back by each format's
    dataset with their own label and latent."""
    root = tmp_path / 'images'
    rng = np.random.default_rng(1)
    images = {}
    for cls in ('cat', 'dog'):
        os.makedirs(root / cls)
        images[cls] = Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8))
        images[cls].save(root / cls / '0.png')
    assert run(root, tmp_path / 'fit', vae_dir) == dict(total=2, skipped=0, written=2)
    fit = FiTLatents(str(tmp_path / 'fit'), target_len=L, choice='resize', flip_prob=0.0)
    assert [osp.basename(e[0]) for e in fit.entries] == ['cat%2F0.safetensors',
                                                         'dog%2F0.safetensors']
    assert run_nit(root, tmp_path / 'nit', vae_dir, '--nit-types', 'native-resolution') == \
        dict(total=2, skipped=0, written=2)
    from flexgen.datasets.nit_latents import NiTLatents
    nit = NiTLatents(str(tmp_path / 'nit' / 'data_meta' / 'native-resolution_meta.jsonl'),
                     {'native-resolution': str(tmp_path / 'nit' / 'native-resolution')},
                     flip_prob=0.0)
    for dataset in (fit, nit):
        assert len(dataset) == 2
        for i, cls in enumerate(('cat', 'dog')):
            assert dataset[i]['data_samples']['label'] == i == dataset.get_label(i)
            torch.testing.assert_close(dataset[i]['inputs'], encode(vae_dir, images[cls]),
                                       rtol=1e-5, atol=1e-5)


def test_names_that_only_differ_in_extension_and_missing_root(tmp_path, vae_dir):
    root = tmp_path / 'dup'
    os.makedirs(root / 'x')
    Image.new('RGB', (16, 16)).save(root / 'x' / 'same.png')
    Image.new('RGB', (16, 16)).save(root / 'x' / 'same.jpg')
    with pytest.raises(ValueError, match=r"differ only in their extension.*'x/same'"):
        run(root, tmp_path / 'out', vae_dir)
    with pytest.raises(FileNotFoundError, match='nowhere'):
        run(tmp_path / 'nowhere', tmp_path / 'out', vae_dir)


def test_default_workers_fit_the_machine(monkeypatch):
    """4 loader processes, or one per usable core where there are fewer (torch's DataLoader
    warns when asked for more workers than cores)."""
    for cores, workers in ((2, 2), (1, 1), (16, 4)):
        monkeypatch.setattr(os, 'sched_getaffinity', lambda pid, n=cores: set(range(n)),
                            raising=False)
        assert tool.parse_args(['root', 'out', '--vae', 'v']).workers == workers


# ---------------------------------------------------------------------- --format nit
# Tiny VAE: d = 2, NiT's patch 1: sides are multiples of a = --min-image-size 4;
# --max-image-size 32 (area 1024 px). (W, H) after NiT's native rule, worked out by hand:
NIT_NATIVE = {'wide': (36, 24),    # 40x28 = 1120 >= 1024: sqrt(40/28)*32 = 38.25 -> 36, 24
              'plain': (24, 20),   # floored only (already multiples of 4)
              'floor': (28, 16),   # 30x18 floored to 28x16
              'thin': (4, 60),     # max(1, 3 // 4) * 4 = 4: raised to a
              'small': (12, 12)}
NIT_TYPES = 'native-resolution,fixed-16x16'


def run_nit(image_root, out, vae_dir, *extra):
    return tool.main([str(image_root), str(out), '--vae', str(vae_dir), '--format', 'nit',
                      '--nit-types', NIT_TYPES, '--min-image-size', '4',
                      '--max-image-size', '32', '--workers', '0', '--batch-size', '2',
                      '--device', 'cpu', *extra])


def test_nit_resize_rule_matches_nit():
    """native_resolution_resize at a = 32, S = 2048 (NiT's preprocessing config)."""
    assert nit_resize_size(580, 403, 32, 2048) == (576, 384)  # the README's example
    assert nit_resize_size(20, 50, 32, 2048) == (32, 32)      # sides raised to 32
    assert nit_resize_size(3000, 2000, 32, 2048) == (2496, 1664)  # area 2048^2
    assert nit_resize_size(2048, 2048, 32, 2048) == (2048, 2048)


def test_nit_encode_then_read_back(tmp_path, image_root, vae_dir):
    from flexgen.datasets.nit_latents import NiTLatents
    out = tmp_path / 'nit'
    assert run_nit(image_root, out, vae_dir) == dict(total=5, skipped=0, written=5)
    meta = out / 'data_meta'
    assert sorted(os.listdir(meta)) == ['fixed-16x16_meta.jsonl', 'merge_meta.jsonl',
                                        'native-resolution_meta.jsonl']
    native = [json.loads(x) for x in (meta / 'native-resolution_meta.jsonl').open()]
    fixed = [json.loads(x) for x in (meta / 'fixed-16x16_meta.jsonl').open()]
    merged = [json.loads(x) for x in (meta / 'merge_meta.jsonl').open()]
    assert merged == native + fixed and len(native) == 5
    # Images in the tool's list order: class, then folder, then file.
    assert [m['image_file'] for m in native] == ['a_cat/plain.png', 'a_cat/wide.png',
                                                'b_dog/small.png', 'b_dog/thin.png',
                                                'b_dog/sub/floor.PNG']
    wide = native[1]
    assert wide == dict(image_file='a_cat/wide.png', latent_file='a_cat/wide.safetensors',
                        ori_w=40, ori_h=28, latent_h=12, latent_w=18, image_h=24, image_w=36,
                        type='native-resolution', label=0)
    assert fixed[4]['latent_file'] == 'b_dog/sub/floor.safetensors'
    assert (fixed[4]['latent_h'], fixed[4]['latent_w'], fixed[4]['label']) == (8, 8, 1)
    stored = load_file(out / 'native-resolution' / 'a_cat' / 'wide.safetensors')
    assert stored['latent'].shape == (2, 4, 12, 18) and stored['label'].shape == ()

    dirs = {'native-resolution': str(out / 'native-resolution'),
            'fixed-16x16': str(out / 'fixed-16x16')}
    plain = NiTLatents(str(meta / 'merge_meta.jsonl'), dirs, flip_prob=0.0)
    mirror = NiTLatents(str(meta / 'merge_meta.jsonl'), dirs, flip_prob=1.0)
    assert len(plain) == 10
    for i, line in enumerate(merged):
        name = os.path.splitext(os.path.basename(line['image_file']))[0]
        image = Image.open(image_root / line['image_file']).convert('RGB')
        if line['type'] == 'native-resolution':
            size = NIT_NATIVE[name]
            view = image if size == image.size else image.resize(size, Image.BICUBIC)
        else:
            view = center_crop_arr(image, 16)
        assert plain.get_size(i) == (view.size[1] // 2, view.size[0] // 2)
        assert plain.get_label(i) == line['label'] == plain[i]['data_samples']['label']
        torch.testing.assert_close(plain[i]['inputs'], encode(vae_dir, view),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mirror[i]['inputs'],
                                   encode(vae_dir, view.transpose(Image.FLIP_LEFT_RIGHT)),
                                   rtol=1e-5, atol=1e-5)


def test_nit_interrupted_run_resumes_to_the_same_files(tmp_path, image_root, vae_dir,
                                                        monkeypatch):
    clean = tmp_path / 'clean'
    run_nit(image_root, clean, vae_dir)
    assert run_nit(image_root, clean, vae_dir) == dict(total=5, skipped=5, written=0)

    out, real_save, saved = tmp_path / 'resumed', safetensors.torch.save_file, []

    def crashing_save(tensors, path, metadata=None):
        if len(saved) == 3:  # the 2nd image's 2nd type: its 1st file is already in place
            raise KeyboardInterrupt
        saved.append(path)
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, 'save_file', crashing_save)
    with pytest.raises(KeyboardInterrupt):
        run_nit(image_root, out, vae_dir)
    monkeypatch.setattr(safetensors.torch, 'save_file', real_save)
    assert run_nit(image_root, out, vae_dir) == dict(total=5, skipped=1, written=4)
    files = sorted(p.relative_to(clean) for p in clean.rglob('*') if p.is_file())
    assert sorted(p.relative_to(out) for p in out.rglob('*') if p.is_file()) == files
    for rel in files:
        if rel.suffix == '.safetensors':
            a, b = load_file(clean / rel), load_file(out / rel)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        elif rel.suffix == '.jsonl':
            assert (clean / rel).read_text() == (out / rel).read_text()


def test_nit_bad_types_stop(tmp_path, image_root, vae_dir):
    with pytest.raises(ValueError, match='fixed-15x15'):
        run_nit(image_root, tmp_path / 'a', vae_dir, '--nit-types', 'fixed-15x15')
    with pytest.raises(ValueError, match='square-ish'):
        run_nit(image_root, tmp_path / 'b', vae_dir, '--nit-types', 'square-ish')


def test_nit_finish_names_an_image_that_is_not_encoded(tmp_path):
    """finish() indexes every image of the job (the job calls it once all are written): a
    missing file is an error naming it, never a jsonl that silently lacks the image."""
    from flexgen.datasets.nit_latents import NiTLatentWriter
    writer = NiTLatentWriter(str(tmp_path), downsample=2)
    with pytest.raises(FileNotFoundError, match=r"a_cat/wide.safetensors is missing: image "
                                                r"'a_cat/wide' is not encoded"):
        writer.finish([('x/a_cat/wide.png', 0, 'a_cat/wide')])

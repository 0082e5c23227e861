"""configs/nit: NiT's five sizes with the reference's recipe and pack lengths, parameter
counts of the full networks, the official-weights config, the data pipeline of the
ImageNet configs (NiTLatents + OfflinePackSampler) on a tiny fake NiT dataset, and every
config's generator builds and takes a loss step (tiny widths)."""
import glob
import json
import os.path as osp

import diffusers
import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.runner import Runner
from PIL import Image
from safetensors.torch import save_file

import flexgen
from flexgen.apis.official import backbone_mismatches
from flexgen.models.converters.nit import NiTConverter
from flexgen.registry import MODELS

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIGS = sorted(glob.glob(osp.join(ROOT, 'configs', 'nit', '*.py')))

flexgen.register_all_modules()

# name -> (depth, width, heads, REPA block, projector width, encoder feature width,
#          pack tokens, lr, steps, AdaLN-LoRA rank); the reference's configs/c2i/*.yaml.
SIZES = {
    'nit_s_pack_65536.py': (12, 384, 6, 4, 768, 768, 65536, 1e-4, 2_000_000, None),
    'nit_b_pack_65536.py': (12, 768, 12, 4, 2048, 1280, 65536, 1e-4, 2_000_000, None),
    'nit_l_pack_16384.py': (24, 1024, 16, 6, 2048, 1280, 16384, 2.5e-5, 2_000_000, None),
    'nit_xl_pack_16384.py': (28, 1152, 16, 8, 2048, 1280, 16384, 1e-4, 2_000_000, None),
    'nit_xxl_pack_8192.py': (40, 1536, 24, 8, 2048, 1280, 8192, 1e-4, 1_000_000, 512),
}
# The reference notes' parameter counts in millions: (without, with the REPA projector).
MILLIONS = {'nit_s_pack_65536.py': (32.9, 34.4), 'nit_b_pack_65536.py': (130.3, 138.7),
            'nit_l_pack_16384.py': (457.9, 466.8), 'nit_xl_pack_16384.py': (674.9, 684.0),
            'nit_xxl_pack_8192.py': (1362.7, 1372.7)}


def path_of(name):
    return osp.join(ROOT, 'configs', 'nit', name)


def reference_shapes(width, depth, heads, lora=None, channels=32, classes=1000,
                     projector=(2048, 1280)):
    """Key -> shape of the reference ``NiT`` state dict (reference notes, section 7)."""
    d, hd = width, width // heads
    shapes = {'x_embedder.proj.weight': (d, channels, 1, 1), 'x_embedder.proj.bias': (d,),
              't_embedder.mlp.0.weight': (d, 256), 't_embedder.mlp.0.bias': (d,),
              't_embedder.mlp.2.weight': (d, d), 't_embedder.mlp.2.bias': (d,),
              'y_embedder.embedding_table.weight': (classes + 1, d),
              'final_layer.linear.weight': (channels, d), 'final_layer.linear.bias': (channels,),
              'final_layer.adaLN_modulation.1.weight': (2 * d, d),
              'final_layer.adaLN_modulation.1.bias': (2 * d,)}
    p, z = projector
    shapes.update({'projector.0.weight': (p, d), 'projector.0.bias': (p,),
                   'projector.2.weight': (p, p), 'projector.2.bias': (p,),
                   'projector.4.weight': (z, p), 'projector.4.bias': (z,)})
    for i in range(depth):
        b = f'blocks.{i}.'
        shapes.update({b + 'attn.qkv.weight': (3 * d, d), b + 'attn.qkv.bias': (3 * d,),
                       b + 'attn.q_norm.weight': (hd,), b + 'attn.q_norm.bias': (hd,),
                       b + 'attn.k_norm.weight': (hd,), b + 'attn.k_norm.bias': (hd,),
                       b + 'attn.proj.weight': (d, d), b + 'attn.proj.bias': (d,),
                       b + 'mlp.fc1.weight': (4 * d, d), b + 'mlp.fc1.bias': (4 * d,),
                       b + 'mlp.fc2.weight': (d, 4 * d), b + 'mlp.fc2.bias': (d,)})
        if lora:
            shapes.update({b + 'adaLN_modulation.1.weight': (lora, d),
                           b + 'adaLN_modulation.1.bias': (lora,),
                           b + 'adaLN_modulation.2.weight': (6 * d, lora),
                           b + 'adaLN_modulation.2.bias': (6 * d,)})
        else:
            shapes.update({b + 'adaLN_modulation.1.weight': (6 * d, d),
                           b + 'adaLN_modulation.1.bias': (6 * d,)})
    return shapes


def meta_state_dict(name):
    depth, width, heads, _, proj, z, _, _, _, lora = SIZES[name]
    return {k: torch.empty(s, device='meta')
            for k, s in reference_shapes(width, depth, heads, lora, projector=(proj, z)).items()}


def test_the_five_sizes_the_tiny_and_the_official_config_exist():
    assert {osp.basename(p) for p in CONFIGS} == set(SIZES) | {
        'nit_tiny_shapes_pack.py', 'nit_xl_official.py', 'nit_xl_official_multires.py'}


@pytest.mark.parametrize('name', sorted(SIZES))
def test_sizes_and_recipe(name):
    cfg = Config.fromfile(path_of(name))
    depth, width, heads, block, proj, _, pack, lr, steps, lora = SIZES[name]
    backbone, model = cfg.model.backbone, cfg.model
    assert (backbone.depth, backbone.hidden_size, backbone.num_heads) == (depth, width, heads)
    assert (backbone.in_channels, backbone.patch_size, backbone.num_classes,
            backbone.learn_sigma, backbone.pos_embed) == (32, 1, 1000, False, None)
    assert dict(backbone.qk_norm) == dict(type='layernorm_affine', eps=1e-5)
    assert dict(backbone.rope) == dict(type='AxialRoPE2D', theta=10000.0, layout='nit',
                                       index_mode='rowcol')
    assert dict(backbone.modulation) == (dict(type='AdaLNLoRA', rank=lora) if lora else
                                         dict(type='AdaLNZero'))
    assert (backbone.time_scale, backbone.time_flip, backbone.output_scale) == (1.0, False, 1.0)
    assert backbone.attn_backend == 'auto'  # flash-attn varlen on GPUs, grouped SDPA else
    # Loss: linear flow, logit-normal(0, 1), MSE + direction, REPA 1 - cos, token means.
    assert model.transport.type == 'RectifiedFlow'
    assert dict(model.time_sampler) == dict(type='LogitNormalTime', mean=0.0, std=1.0)
    assert dict(model.direction_loss) == dict(type='DirectionLoss', weight=1.0)
    assert (model.loss_reduction, model.class_dropout_prob, model.inputs_are_latents) == (
        'token', 0.1, True)
    repa = model.repa
    assert (repa.type, repa.feature_block, repa.projector_dim, repa.weight, repa.reduction,
            repa.form) == ('REPAHead', block, proj, 1.0, 'token', 'one_minus_cos')
    radio = 'radio-v2.5-b_half' if name.startswith('nit_s_') else 'radio_v2.5-h'
    assert repa.encoder.type == 'RADIOEncoder' and radio in repa.encoder.checkpoint
    # Optimiser: AdamW (0.9, 0.95), wd 0.01, eps 1e-6, constant lr, clip 1.0, bf16, EMA.
    optim = cfg.optim_wrapper
    assert (optim.type, optim.dtype, dict(optim.clip_grad)) == (
        'AutocastOptimWrapper', 'bfloat16', dict(max_norm=1.0))
    assert (optim.optimizer.type, tuple(optim.optimizer.betas), optim.optimizer.weight_decay,
            optim.optimizer.eps, optim.optimizer.lr) == ('AdamW', (0.9, 0.95), 0.01, 1e-6, lr)
    assert cfg.param_scheduler == []
    ema = [h for h in cfg.custom_hooks if h.type == 'FlexEMAHook']
    assert len(ema) == 1 and ema[0].momentum == pytest.approx(1e-4)
    assert cfg.train_cfg.max_iters == steps
    assert (cfg.default_hooks.checkpoint.interval, cfg.default_hooks.checkpoint.max_keep_ckpts
            ) == (2000, 2)
    # Data: one pack of `pack` tokens per GPU and step, NiT's LPFHP file of that length.
    loader = cfg.train_dataloader
    assert loader.batch_size == 1
    assert (loader.batch_sampler.type, loader.batch_sampler.max_tokens,
            loader.batch_sampler.patch_size) == ('OfflinePackSampler', pack, 1)
    assert loader.batch_sampler.meta_file.endswith(f'_merge_LPFHP_{pack}.json')
    dataset = loader.dataset
    assert (dataset.type, dataset.image_mode, dataset.image_scale, dataset.latent_channels,
            dataset.flip_prob) == ('NiTLatents', 'image', 16, 32, 0.5)
    assert list(dataset.data_types) == ['native-resolution', 'fixed-256x256', 'fixed-512x512']
    # Sampling: the README's 256 px setting.
    assert model.sampler.type == 'EulerMaruyamaSDE' and model.sampler.num_steps == 250
    assert (model.guidance.scale, tuple(model.guidance.interval)) == (2.25, (0.0, 0.7))
    assert 'channels' not in model.guidance  # all 32 channels guided


def reference_count(width, depth, heads, lora=None, projector=None):
    """The reference network's parameters from its key shapes (+ projector if given)."""
    shapes = reference_shapes(width, depth, heads, lora,
                              projector=projector or (1, 1))
    if projector is None:
        shapes = {k: s for k, s in shapes.items() if not k.startswith('projector.')}
    return sum(int(np.prod(s)) for s in shapes.values())


@pytest.mark.parametrize('name', sorted(SIZES))
def test_full_size_parameter_count(name):
    """Built on the meta device (no memory): FlexDiT equals the reference's count, which
    rounds to the notes' figures (README: 33M / 131M / 457M / 675M / 1.37B)."""
    depth, width, heads, _, proj, z, _, _, _, lora = SIZES[name]
    cfg = Config.fromfile(path_of(name))
    with torch.device('meta'):
        backbone = MODELS.build(dict(cfg.model.backbone))
        projector = MODELS.build(dict(type='REPAProjector', hidden_size=width, z_dim=z,
                                      projector_dim=proj))
    count = sum(p.numel() for p in backbone.parameters())
    total = count + sum(p.numel() for p in projector.parameters())
    assert count == reference_count(width, depth, heads, lora)
    assert total == reference_count(width, depth, heads, lora, projector=(proj, z))
    assert (round(count / 1e6, 1), round(total / 1e6, 1)) == MILLIONS[name]


@pytest.mark.parametrize('name', sorted(SIZES))
def test_official_weights_of_each_size_need_only_the_legacy_index_mode(name):
    """The converter's settings for a full-size reference state dict (meta tensors) agree
    with the config except RoPE's index mode (NiT's quirk; nit_xl_official.py sets it)."""
    converted = NiTConverter()(meta_state_dict(name))
    backbone = dict(Config.fromfile(path_of(name)).model.backbone)
    problems = backbone_mismatches(backbone, converted.backbone)
    assert len(problems) == 1 and "'index_mode': 'nit_legacy'" in problems[0]
    backbone['rope'] = dict(backbone['rope'], index_mode='nit_legacy')
    assert backbone_mismatches(backbone, converted.backbone) == []
    depth, width, heads, block, proj, z, *_ = SIZES[name]
    assert converted.repa == dict(hidden_size=width, projector_dim=proj, z_dims=[z])


def test_official_config_is_the_xl_with_legacy_positions_and_no_repa():
    cfg = Config.fromfile(path_of('nit_xl_official.py'))
    assert cfg.model.repa is None and cfg.model.backbone.rope.index_mode == 'nit_legacy'
    converted = NiTConverter()(meta_state_dict('nit_xl_pack_16384.py'))
    assert backbone_mismatches(dict(cfg.model.backbone), converted.backbone) == []


# --------------------------------------------------------------------------- tiny builds
def tiny_encoder(patch=16):
    return dict(type='TimmViTEncoder', model_name='vit_tiny_patch16_224', img_size=32,
                model_kwargs=dict(embed_dim=24, depth=1, num_heads=2, patch_size=patch))


def tiny_model_cfg(name, keep_autoencoder=False):
    """The config's generator at width 32 (depth = its REPA block), a tiny random encoder
    in place of RADIO, no DC-AE (unless ``keep_autoencoder``)."""
    cfg = Config.fromfile(path_of(name))
    model = cfg.model
    depth = model.repa.feature_block if model.get('repa') else 2
    options = {'model.backbone.hidden_size': 32, 'model.backbone.depth': depth,
               'model.backbone.num_heads': 2}
    if model.autoencoder.type == 'DiffusersAutoencoder' and not keep_autoencoder:
        options['model.autoencoder'] = dict(_delete_=True, type='IdentityAutoencoder',
                                            channels=32)
    if model.get('repa'):
        options['model.repa.encoder'] = dict(_delete_=True, **tiny_encoder())
    if model.backbone.modulation.type == 'AdaLNLoRA':
        options['model.backbone.modulation.rank'] = 8
    cfg.merge_from_dict(options)
    return cfg.model


@pytest.mark.parametrize('path', CONFIGS, ids=osp.basename)
def test_every_config_builds_and_takes_a_loss_step(path):
    name = osp.basename(path)
    model = MODELS.build(tiny_model_cfg(name))
    g = torch.Generator().manual_seed(0)
    sizes = [(2, 3), (4, 4), (3, 1)]
    channels = model.backbone.in_channels
    scale = 1 if channels == 32 else 8  # latents (patch 1) or shapes pixels (patch 2)
    inputs = [torch.randn(channels, h * scale, w * scale, generator=g) for h, w in sizes]
    samples = dict(label=torch.tensor([1, 2, 3]), seed=0, step=0, index=torch.arange(3))
    if model.repa is not None:  # NiTLatents' REPA images: 16 px per latent cell, uint8
        samples['image'] = [np.random.default_rng(i).integers(0, 256, (16 * h, 16 * w, 3),
                                                               dtype=np.uint8)
                            for i, (h, w) in enumerate(sizes)]
    losses = model(inputs, samples, mode='loss')
    expected = {'loss', 'loss_direction'} | ({'loss_repa'} if model.repa is not None else set())
    assert set(losses) == expected
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    assert model.backbone.final_layer.linear.weight.grad.abs().sum() > 0
    if model.repa is not None:
        assert model.repa.projectors[0][4].weight.grad.abs().sum() > 0
        assert not any('encoders' in k for k in model.state_dict())


def tiny_dc_ae():
    """A DC-AE of the f32c32 shape (32 latent channels, 32 px per latent pixel), tiny."""
    widths = (4, 4, 4, 8, 16, 32)
    with torch.random.fork_rng():  # diffusers initialises from the global RNG
        torch.manual_seed(0)
        return diffusers.AutoencoderDC(
            latent_channels=32, attention_head_dim=8, encoder_block_types=('ResBlock',) * 6,
            decoder_block_types=('ResBlock',) * 6, encoder_block_out_channels=widths,
            decoder_block_out_channels=widths, encoder_layers_per_block=(1,) * 6,
            decoder_layers_per_block=(1,) * 6, encoder_qkv_multiscales=((),) * 6,
            decoder_qkv_multiscales=((),) * 6, scaling_factor=0.41)


def test_the_dc_ae_loads_only_when_something_decodes(tmp_path, monkeypatch):
    """Training on latents needs no autoencoder: the NiT generator builds, moves and trains
    with an unreachable hub id; the first decode loads the network (a tiny local DC-AE)."""
    load, calls = diffusers.AutoencoderDC.from_pretrained.__func__, []

    def offline_hub(cls, path, *args, **kwargs):
        calls.append(str(path))
        if not osp.isdir(path):
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        return load(cls, path, *args, **kwargs)

    monkeypatch.setattr(diffusers.AutoencoderDC, 'from_pretrained', classmethod(offline_hub))
    cfg = tiny_model_cfg('nit_xl_pack_16384.py', keep_autoencoder=True)
    hub_id = 'mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers'
    assert cfg.autoencoder.path == hub_id
    model = MODELS.build(cfg).to('cpu')
    sizes = [(2, 3), (1, 2)]
    inputs = [torch.randn(32, h, w, generator=torch.Generator().manual_seed(i))
              for i, (h, w) in enumerate(sizes)]
    samples = dict(label=torch.tensor([1, 2]), seed=0, step=0, index=torch.arange(2),
                   image=[np.zeros((16 * h, 16 * w, 3), np.uint8) for h, w in sizes])
    sum(model(inputs, samples, mode='loss').values()).backward()
    assert calls == [] and not model.autoencoder.loaded
    euler = dict(type='EulerODE', num_steps=2)
    with pytest.raises(FileNotFoundError, match=hub_id):
        model.generate([3], [(64, 96)], seeds=[0], sampler=euler)

    tiny_dc_ae().save_pretrained(tmp_path / 'dc-ae')
    cfg.autoencoder.path = str(tmp_path / 'dc-ae')
    model = MODELS.build(cfg).to('cpu')
    # The same network with no autoencoder: its samples are the latents.
    latent_model = MODELS.build(tiny_model_cfg('nit_xl_pack_16384.py'))
    latent_model.load_state_dict(model.state_dict())
    calls.clear()
    assert not model.autoencoder.loaded
    images = model.generate([3, 5], [(64, 96), (32, 64)], seeds=[0, 1], sampler=euler)
    assert calls == [str(tmp_path / 'dc-ae')] and model.autoencoder.loaded
    latents = latent_model.generate([3, 5], [(2, 3), (1, 2)], seeds=[0, 1], sampler=euler)
    dc_ae = diffusers.AutoencoderDC.from_pretrained(tmp_path / 'dc-ae').eval()
    assert [tuple(x.shape) for x in images] == [(3, 64, 96), (3, 32, 64)]
    for image, z in zip(images, latents):
        with torch.no_grad():
            expected = dc_ae.decode(z[None] / 0.41).sample[0]
        torch.testing.assert_close(image, expected)


def test_missing_encoder_weights_name_the_file():
    cfg = tiny_model_cfg('nit_xl_pack_16384.py')
    cfg.repa.encoder = Config.fromfile(path_of('nit_xl_pack_16384.py')).model.repa.encoder
    with pytest.raises(FileNotFoundError, match='radio_v2.5-h.pth.tar'):
        MODELS.build(cfg)


# --------------------------------------------------------------------------- data pipeline
LATENT_SIZES = [(2, 3), (3, 2), (2, 2), (1, 4), (4, 1), (3, 3), (2, 3), (1, 1)]
PACKS = [[0, 1], [2, 3, 4], [5, 6], [7]]  # at most 16 tokens each


@pytest.fixture()
def nit_data(tmp_path):
    """A NiT-format dataset (native-resolution latents of 32 channels, their images, the
    merged jsonl) and a sampler-meta file of four packs."""
    rng = np.random.default_rng(0)
    latent_dir = tmp_path / 'latents'
    for i, (h, w) in enumerate(LATENT_SIZES):
        Image.fromarray(rng.integers(0, 256, (h * 40, w * 40, 3), dtype=np.uint8)).save(
            tmp_path / f'{i}.png')
        (latent_dir / 'n0').mkdir(parents=True, exist_ok=True)
        save_file(dict(latent=torch.randn(2, 32, h, w, generator=torch.Generator().manual_seed(i)),
                       label=torch.tensor(i % 5)), latent_dir / 'n0' / f'{i}.safetensors')
    with open(tmp_path / 'meta.jsonl', 'w') as f:
        for i, (h, w) in enumerate(LATENT_SIZES):
            f.write(json.dumps(dict(image_file=f'{i}.png', latent_file=f'n0/{i}.safetensors',
                                    latent_h=h, latent_w=w, type='native-resolution')) + '\n')
    with open(tmp_path / 'packs.json', 'w') as f:
        json.dump(PACKS, f)
    return tmp_path


def xl_loader_cfg(root):
    cfg = Config.fromfile(path_of('nit_xl_pack_16384.py'))
    cfg.merge_from_dict({
        'train_dataloader.num_workers': 0, 'train_dataloader.persistent_workers': False,
        'train_dataloader.pin_memory': False,
        'train_dataloader.dataset.data_meta': str(root / 'meta.jsonl'),
        'train_dataloader.dataset.data_types': ['native-resolution'],
        'train_dataloader.dataset.latent_dirs': [str(root / 'latents')],
        'train_dataloader.dataset.image_dir': str(root),
        'train_dataloader.batch_sampler.meta_file': str(root / 'packs.json'),
        'train_dataloader.batch_sampler.max_tokens': 16})
    return cfg


def test_the_imagenet_data_pipeline_serves_packs_with_repa_images(nit_data):
    """The XL config's dataloader (paths pointed at a fake NiT dataset, budget 16 tokens):
    every step is one whole pack of the file, the REPA image of each latent is 16 px per
    latent cell, and a NiT generator trains on it with all three loss terms."""
    cfg = xl_loader_cfg(nit_data)
    loader = Runner.build_dataloader(cfg.train_dataloader, seed=0)
    packs = {frozenset(p) for p in PACKS}
    seen = []
    for step, batch in zip(range(4), loader):
        index = batch['data_samples']['index'].tolist()
        seen.append(frozenset(index))
        tokens = batch['inputs']  # patchified in the collate (patch 1)
        assert tokens.tokens.shape[0] <= 16 and tokens.tokens.shape[1] == 32
        assert tokens.sizes.tolist() == [list(LATENT_SIZES[i]) for i in index]
        groups = batch['data_samples']['image']  # REPA's images, stacked per size
        assert sorted(i for ids in groups.index for i in ids.tolist()) == list(range(len(index)))
        for stack, ids in zip(groups.images, groups.index):
            for row, position in enumerate(ids.tolist()):
                h, w = LATENT_SIZES[index[position]]
                assert stack[row].shape == (3, 16 * h, 16 * w) and stack.dtype == torch.uint8
    assert set(seen) == packs  # one epoch of 4 steps: every pack once
    model = MODELS.build(tiny_model_cfg('nit_xl_pack_16384.py'))
    losses = model(batch['inputs'], dict(batch['data_samples'], seed=0, step=0), mode='loss')
    assert set(losses) == {'loss', 'loss_direction', 'loss_repa'}
    assert all(torch.isfinite(v) for v in losses.values())


def test_missing_data_paths_fail_with_clear_errors(nit_data):
    cfg = xl_loader_cfg(nit_data)
    cfg.train_dataloader.dataset.image_dir = None  # the config's default
    with pytest.raises(ValueError, match='image_dir'):
        Runner.build_dataloader(cfg.train_dataloader, seed=0)
    cfg = xl_loader_cfg(nit_data)
    cfg.train_dataloader.batch_sampler.meta_file = str(nit_data / 'missing_LPFHP.json')
    with pytest.raises(FileNotFoundError, match='missing_LPFHP.json'):
        Runner.build_dataloader(cfg.train_dataloader, seed=0)
    default = Config.fromfile(path_of('nit_xl_pack_16384.py')).train_dataloader
    default.dataset.image_dir = str(nit_data)
    with pytest.raises(FileNotFoundError, match='merge_meta.jsonl|native-resolution'):
        Runner.build_dataloader(default, seed=0)

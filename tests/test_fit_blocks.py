"""FiT / FiTv2 building blocks in FlexDiT, and the configs/fit recipes.

Blocks: AdaLN-LoRA + global adaLN (equal to a dense adaLN of the summed product weight),
FiT's padded masked attention (zero on padding, equal to per-image attention), QK-norm
variants, SwiGLU widths and names, the FiTv1 time clamp, partial fine-tuning.
Configs: the reference sizes (parameter counts of the released models), recipes and the
boundary settings the official converters require.
"""
import glob
import importlib
import os.path as osp

import pytest
import torch
import torch.nn.functional as F
from helpers import randomise
from mmengine.config import Config

import flexgen
from flexgen.models import FlexDiT
from flexgen.models.layers import PaddedAttention, SwiGLUMlp, build_attention_backend, build_norm
from flexgen.registry import MODELS
from flexgen.structures import TokenBatch, patchify

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIGS = sorted(glob.glob(osp.join(ROOT, 'configs', 'fit', '*.py')))
TINY = dict(in_channels=4, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=10,
            pos_embed=None, rope=dict(type='AxialRoPE2D'))
FITV2 = dict(TINY, mlp=dict(type='SwiGLUMlp'), qk_norm='layernorm',
             modulation=dict(type='AdaLNLoRA', rank=32), global_modulation=dict(type='AdaLNZero'))


def _inputs(seed=0, sizes=((2, 3), (4, 4), (3, 1))):
    g = torch.Generator().manual_seed(seed)
    batch = patchify([torch.randn(4, 2 * h, 2 * w, generator=g) for h, w in sizes], 2)
    t = torch.rand(len(sizes), generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (len(sizes),), generator=g)
    return batch, t, y


# ------------------------------------------------------------------ modulation
def test_lora_plus_global_adaln_at_full_rank_equals_dense_adaln():
    """FiTv2's block modulation ``up(down(SiLU c)) + global(SiLU c)`` with rank = width is
    a dense adaLN whose weight is ``W_up W_down + W_g`` (bias ``W_up b_down + b_up + b_g``)."""
    lora = randomise(FlexDiT(**FITV2), std=0.2).double()
    dense = FlexDiT(**dict(FITV2, modulation=dict(type='AdaLNZero'),
                           global_modulation=None)).double()
    dense_state = {k: v for k, v in lora.state_dict().items()
                   if 'adaLN_modulation' not in k or k.startswith('final_layer')}
    glob_w, glob_b = lora.global_adaLN_modulation[1].weight, lora.global_adaLN_modulation[1].bias
    for i, block in enumerate(lora.blocks):
        down, up = block.adaLN_modulation[1], block.adaLN_modulation[2]
        dense_state[f'blocks.{i}.adaLN_modulation.1.weight'] = up.weight @ down.weight + glob_w
        dense_state[f'blocks.{i}.adaLN_modulation.1.bias'] = (up.weight @ down.bias + up.bias
                                                              + glob_b)
    dense.load_state_dict(dense_state, strict=True)
    batch, t, y = _inputs()
    batch = batch.replace(batch.tokens.double())
    with torch.no_grad():
        torch.testing.assert_close(lora(batch, t, y), dense(batch, t, y), rtol=1e-10, atol=1e-10)


def test_global_modulation_reaches_every_block_and_starts_at_zero():
    model = FlexDiT(**FITV2)
    last = model.global_adaLN_modulation[-1]
    assert torch.equal(last.weight, torch.zeros_like(last.weight))
    assert [k for k in model.state_dict() if k.startswith('global')] == [
        'global_adaLN_modulation.1.weight', 'global_adaLN_modulation.1.bias']
    randomise(model, std=0.2)
    batch, t, y = _inputs()
    with torch.no_grad():
        before = model(batch, t, y)
        model.global_adaLN_modulation[1].bias[5] += 1.0  # a shift of block inputs
        assert not torch.allclose(model(batch, t, y), before)


def test_blocks_without_global_modulation_are_called_as_dit_blocks():
    """A custom block taking no extra_modulation still works when none is configured."""
    calls = []

    class Recorder(torch.nn.Module):
        def forward(self, *args):
            calls.append(len(args))
            return args[0]

    model = FlexDiT(**TINY)
    model.blocks = torch.nn.ModuleList([Recorder()])
    batch, t, y = _inputs()
    model(batch, t, y)
    assert calls == [4]


# ------------------------------------------------------------------ attention
def _padded_case(seed=0, sizes=((2, 3), (4, 4), (1, 1), (3, 2))):
    g = torch.Generator().manual_seed(seed)
    batch = TokenBatch(torch.zeros(sum(h * w for h, w in sizes), 1), torch.tensor(sizes))
    q, k, v = (torch.randn(batch.tokens.shape[0], 2, 8, generator=g, dtype=torch.float64)
               for _ in range(3))
    return batch, q, k, v


def test_fit_masked_attention_zeroes_padding_and_ignores_its_content():
    batch, q, k, v = _padded_case()
    (qp, valid), (kp, _), (vp, _) = (PaddedAttention.pad(x, batch) for x in (q, k, v))
    out = PaddedAttention.attend(qp, kp, vp, valid)
    assert out.shape == (4, 16, 2, 8)
    assert torch.equal(out[~valid], torch.zeros_like(out[~valid]))
    # valid rows: per-image softmax attention on that image's tokens only
    reference = torch.cat([F.scaled_dot_product_attention(*(x.transpose(0, 1) for x in xs))
                           .transpose(0, 1) for xs in zip(batch.split(q), batch.split(k),
                                                          batch.split(v))])
    torch.testing.assert_close(out[valid], reference, rtol=1e-12, atol=1e-12)
    # garbage in the padded slots changes nothing on the valid ones
    g = torch.Generator().manual_seed(5)
    noisy = [x + 3 * torch.randn(x.shape, generator=g, dtype=x.dtype) * (~valid)[..., None, None]
             for x in (qp, kp, vp)]
    again = PaddedAttention.attend(*noisy, valid)
    torch.testing.assert_close(again[valid], out[valid], rtol=1e-12, atol=1e-12)
    assert torch.equal(again[~valid], torch.zeros_like(again[~valid]))


def test_padded_backend_equals_per_image_backend():
    batch, q, k, v = _padded_case(seed=1)
    torch.testing.assert_close(build_attention_backend('padded')(q, k, v, batch),
                               build_attention_backend('per_image')(q, k, v, batch),
                               rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ norms, MLP
def test_qk_norms():
    x = torch.randn(5, 3, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    layer = build_norm('layernorm', 16).double()
    assert not list(layer.parameters())
    centred = x - x.mean(-1, keepdim=True)
    torch.testing.assert_close(layer(x), centred / (centred.pow(2).mean(-1, keepdim=True)
                                                    + 1e-6).sqrt())
    rms = build_norm(dict(type='rmsnorm', affine=False), 16).double()
    assert not list(rms.parameters())
    torch.testing.assert_close(rms(x), x / (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt())
    assert [p.shape for p in build_norm('rmsnorm', 16).parameters()] == [(16,)]
    assert len(list(build_norm(dict(type='layernorm', affine=True), 16).parameters())) == 2
    with pytest.raises(ValueError, match="unknown norm 'rms'"):
        build_norm('rms', 16)
    with pytest.raises(ValueError, match=r"unexpected options \['weight'\]"):
        build_norm(dict(type='rmsnorm', weight=True), 16)


@pytest.mark.parametrize('width,large,hidden', [(1152, True, 4608), (1152, False, 3072),
                                                (2304, False, 6144)])
def test_swiglu_widths_and_timm_names(width, large, hidden):
    with torch.device('meta'):
        mlp = SwiGLUMlp(width, large=large)
    assert {k: tuple(v.shape) for k, v in mlp.state_dict().items()} == {
        'fc1_g.weight': (hidden, width), 'fc1_g.bias': (hidden,),
        'fc1_x.weight': (hidden, width), 'fc1_x.bias': (hidden,),
        'fc2.weight': (width, hidden), 'fc2.bias': (width,)}


def test_swiglu_formula():
    mlp = randomise(SwiGLUMlp(8, hidden_features=6)).double()
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = mlp.fc2(F.silu(mlp.fc1_g(x)) * mlp.fc1_x(x))
    torch.testing.assert_close(mlp(x), expected)


# ------------------------------------------------------------------ time and fine-tuning
def test_time_max_clamps_the_model_time_only_when_asked():
    model = randomise(FlexDiT(**dict(TINY, time_max=1.0)))
    plain = randomise(FlexDiT(**TINY))
    batch, _, y = _inputs(sizes=((2, 2), (2, 2)))
    y = y[:1].repeat(2)
    steps = torch.tensor([250, 999], dtype=torch.float64) / 1000
    with torch.no_grad():
        clamped = model(batch, steps, y).view(2, -1)
        raw = plain(batch, steps, y).view(2, -1)
        one = model(batch, torch.full((2,), 1e-3, dtype=torch.float64), y).view(2, -1)
    assert torch.equal(clamped[0], one[0]) and torch.equal(clamped[1], one[1])
    assert not torch.allclose(raw[0], raw[1])


def test_trainable_freezes_everything_else():
    patterns = ('x_embedder', 'bias', 'LN', 'final_layer')
    model = FlexDiT(**dict(FITV2, trainable=patterns))
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert {'x_embedder.proj.weight', 'blocks.0.attn.qkv.bias',
            'blocks.1.adaLN_modulation.1.weight', 'blocks.1.adaLN_modulation.2.weight', 'global_adaLN_modulation.1.weight',
            'final_layer.linear.weight', 't_embedder.mlp.0.bias'} <= trained
    assert frozen == {'t_embedder.mlp.0.weight', 't_embedder.mlp.2.weight',
                      'y_embedder.embedding_table.weight'} | {
        f'blocks.{i}.{name}.weight' for i in range(2)
        for name in ('attn.qkv', 'attn.proj', 'mlp.fc1_g', 'mlp.fc1_x', 'mlp.fc2')}
    randomise(model)
    batch, t, y = _inputs()
    model(batch, t, y).square().sum().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n in frozen)
    assert all(p.grad is not None for n, p in model.named_parameters() if n in trained)
    with pytest.raises(ValueError, match="pattern 'lora' matches no parameter"):
        FlexDiT(**dict(TINY, trainable=('lora',)))


def test_hr_finetune_start_keeps_fresh_init_for_excluded_tensors():
    """The FiTv2 converter's ``exclude`` + a non-strict load = the reference's
    ``ignore_keys``: excluded tensors keep FlexDiT's (the reference's) initialisation."""
    from flexgen.models.converters.fit import FiTv2Converter
    pretrained = randomise(FlexDiT(**FITV2), seed=3)
    patterns = ('x_embedder', 'bias', 'LN', 'final_layer')
    converted = FiTv2Converter(num_heads=2, exclude=patterns)(pretrained.state_dict())
    assert converted.info['excluded'] == sorted(
        k for k in pretrained.state_dict() if any(p in k for p in patterns))
    torch.manual_seed(0)
    model = FlexDiT(**dict(FITV2, trainable=patterns))
    missing, unexpected = model.load_state_dict(converted.state_dict, strict=False)
    assert sorted(missing) == converted.info['excluded'] and not unexpected
    state = model.state_dict()
    assert torch.equal(state['blocks.0.attn.qkv.weight'],
                       pretrained.state_dict()['blocks.0.attn.qkv.weight'])
    for key in ('blocks.0.attn.qkv.bias', 'blocks.1.adaLN_modulation.2.weight',
                'global_adaLN_modulation.1.weight', 'final_layer.linear.weight'):
        assert torch.equal(state[key], torch.zeros_like(state[key])), key
    assert state['x_embedder.proj.weight'].abs().max() > 0  # xavier, not pretrained
    assert not torch.equal(state['x_embedder.proj.weight'],
                           pretrained.state_dict()['x_embedder.proj.weight'])


# ------------------------------------------------------------------ configs
flexgen.register_all_modules()
# The configs' samplers register on import (until flexgen.samplers imports them itself).
for _module in ('flexgen.samplers.ddpm', 'flexgen.samplers.ode'):
    importlib.import_module(_module)

# Released models: (depth, width, heads, LoRA rank or None), parameters, state-dict keys.
RELEASED = {'fit_xl_2.py': ((28, 1152, 16, None), 823_599_392, 347),
            'fitv2_xl_2.py': ((36, 1152, 16, 288), 671_045_776, 517),
            'fitv2_3b_2.py': ((40, 2304, 24, 576), 2_971_928_080, 573),
            'fitv2_hr_xl_2.py': ((36, 1152, 16, 288), 671_045_776, 517),
            'fitv2_hr_3b_2.py': ((40, 2304, 24, 576), 2_971_928_080, 573)}
# FiTv2-XL/2 evaluated at the sizes of FiT's tables (an extrapolation rule, more sizes).
RELEASED['fitv2_xl_2_multires.py'] = RELEASED['fitv2_xl_2.py']


def test_every_fit_config_is_listed():
    assert {osp.basename(p) for p in CONFIGS} == set(RELEASED)


@pytest.mark.parametrize('path', CONFIGS, ids=osp.basename)
def test_config_sizes_and_parameter_count(path):
    """The full-size network on the meta device: the released models' counts (README:
    824M, 671M, 3B) and key counts."""
    (depth, width, heads, rank), count, keys = RELEASED[osp.basename(path)]
    backbone = Config.fromfile(path).model.backbone
    assert (backbone.depth, backbone.hidden_size, backbone.num_heads) == (depth, width, heads)
    with torch.device('meta'):
        model = MODELS.build(dict(backbone))
    assert sum(p.numel() for p in model.parameters()) == count
    assert len(model.state_dict()) == keys
    if rank is not None:
        assert model.blocks[0].adaLN_modulation[1].out_features == rank


@pytest.mark.parametrize('path', CONFIGS, ids=osp.basename)
def test_config_fits_the_official_converter(path):
    """The config's backbone is what the converter derives from official weights of
    that shape (apis.official refuses a mismatch): built here from a meta state dict."""
    from flexgen.apis.official import backbone_mismatches
    from flexgen.models.converters.fit import FiTv1Converter, FiTv2Converter
    cfg = Config.fromfile(path)
    with torch.device('meta'):
        state = MODELS.build(dict(cfg.model.backbone, trainable=None)).state_dict()
    converter = FiTv1Converter() if 'fit_' in osp.basename(path) else FiTv2Converter()
    assert converter.matches(state)
    assert backbone_mismatches(dict(cfg.model.backbone), converter(state).backbone) == []


@pytest.mark.parametrize('path', CONFIGS, ids=osp.basename)
def test_config_recipe(path):
    cfg = Config.fromfile(path)
    name = osp.basename(path)
    v1, hr = name.startswith('fit_'), '_hr_' in name
    optimizer = cfg.optim_wrapper.optimizer
    assert (optimizer.type, optimizer.lr, optimizer.weight_decay, optimizer.eps) == (
        'AdamW', 1e-4, 0.0, 1e-8)
    assert tuple(optimizer.betas) == (0.9, 0.999)
    assert cfg.optim_wrapper.clip_grad == dict(max_norm=1.0)
    assert cfg.auto_scale_lr == dict(base_batch_size=256, enable=True)
    assert [h.momentum for h in cfg.custom_hooks
            if h.type in ('EMAHook', 'FlexEMAHook')] == [1e-4]  # 3B: sharded
    data = cfg.train_dataloader
    assert data.dataset.type == 'FiTLatents'
    assert data.dataset.target_len == data.collate_fn.max_length == (1024 if hr else 256)
    assert data.dataset.choice == ('resize' if v1 else 'random')
    assert data.batch_size == (32 if v1 else 16)
    model = cfg.model
    assert model.class_dropout_prob == 0.1 and model.loss_reduction == 'image'
    assert model.inputs_are_latents and dict(model.autoencoder) == dict(
        type='DiffusersAutoencoder', path='stabilityai/sd-vae-ft-ema', latent_channels=4,
        downsample=8, scaling_factor=0.18215)
    assert tuple(model.guidance.channels) == (0, 1, 2)
    assert model.guidance.scale == (1.65 if name == 'fitv2_hr_xl_2.py' else 1.5)
    if v1:
        assert dict(model.transport) == dict(type='DDPM', num_timesteps=1000,
                                             beta_schedule='linear', prediction='eps',
                                             variance='learned_range', loss='hybrid')
        assert dict(model.time_sampler) == dict(type='DiscreteUniformTime', num_timesteps=1000)
        assert model.sampler.type == 'DDPMAncestral' and model.sampler.num_steps == '250'
        assert cfg.train_cfg.max_iters == 2_000_000 and cfg.param_scheduler == []
        return
    assert (model.transport.type, model.transport.path, model.transport.prediction) == (
        'Interpolant', 'linear', 'velocity')
    assert dict(model.time_sampler) == dict(type='LogitNormalTime', mean=0.0, std=1.0)
    assert dict(model.sampler) == dict(type='AdaptiveODE', atol=1e-6, rtol=1e-3)
    if not hr:
        assert cfg.train_cfg.max_iters == 2_000_000
        (warmup,) = cfg.param_scheduler
        assert (warmup.type, warmup.start_factor, warmup.end) == ('LinearLR', 1e-4, 50_000)
        assert 'trainable' not in model.backbone
        if name == 'fitv2_xl_2_multires.py':
            assert dict(model.backbone.rope.rule) == dict(type='NTKPro2', ori_max_pe_len=16,
                                                          decouple=True)
            assert cfg.test_dataloader.dataset.sizes == [(256, 256), (320, 320), (224, 448),
                                                         (160, 480)]
        else:
            assert 'rule' not in model.backbone.rope
        return
    assert cfg.param_scheduler == []
    assert cfg.train_cfg.max_iters == (400_000 if 'xl' in name else 200_000)
    assert tuple(model.backbone.trainable) == ('x_embedder', 'bias', 'LN', 'final_layer')
    assert dict(model.backbone.rope.rule) == dict(type='NTKAware', ori_max_pe_len=16,
                                                  decouple=True)
    assert model.backbone.rope.scale_in_training
    assert cfg.load_from.endswith('_hr_init.pth')
    if '3b' in name:
        assert cfg.activation_checkpointing == [f'backbone.blocks.{i}' for i in range(40)]


@pytest.mark.parametrize('path', CONFIGS, ids=osp.basename)
def test_config_generator_builds_and_trains_one_step(path):
    """Each config's generator at a tiny width (and no VAE): the loss on a mixed-size
    batch of latents is finite and gives every trainable parameter a gradient."""
    from flexgen.apis.runners import check_config_keys
    cfg = Config.fromfile(path)
    check_config_keys(cfg, path)
    cfg.model.backbone.update(hidden_size=32, depth=2, num_heads=2)
    cfg.model.autoencoder = dict(type='IdentityAutoencoder', channels=4)  # no VAE download
    if cfg.model.backbone.modulation.type == 'AdaLNLoRA':
        cfg.model.backbone.modulation.rank = 8
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    randomise(model.backbone)
    g = torch.Generator().manual_seed(0)
    latents = [torch.randn(4, h, w, generator=g) for h, w in [(8, 12), (16, 16), (6, 4)]]
    samples = dict(label=torch.tensor([1, 2, 3]), index=torch.tensor([0, 1, 2]), seed=0, step=0)
    loss = model.loss(latents, samples)['loss']
    assert torch.isfinite(loss)
    loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)

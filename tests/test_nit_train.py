"""NiT training in flexgen: the generator's REPA and direction-loss terms (exact values from
the hidden tokens, the output and the clean images), the tiny packed config training
through tools/train.py, the float64 model time in ``generate``, and (slow) two-process
torchrun training in which the ranks see disjoint packs."""
import json
import os
import os.path as osp
import sys
import uuid

import pytest
import torch
import torch.nn.functional as F
from mmengine.dist import get_dist_info
from mmengine.hooks import Hook

import flexgen
from flexgen.registry import HOOKS, MODELS
from flexgen.samplers import Sampler
from flexgen.structures import patchify
from helpers import train_ok

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TINY = osp.join(ROOT, 'configs', 'nit', 'nit_tiny_shapes_pack.py')
sys.path.insert(0, osp.join(ROOT, 'tools'))

flexgen.register_all_modules()


def nit_backbone(**overrides):
    """A tiny FlexDiT with NiT's blocks on 3-channel pixels, patch 2."""
    return dict(dict(type='FlexDiT', in_channels=3, patch_size=2, hidden_size=32, depth=3,
                     num_heads=2, num_classes=6, pos_embed=None, time_scale=1.0,
                     qk_norm=dict(type='layernorm_affine', eps=1e-5),
                     rope=dict(type='AxialRoPE2D', layout='nit')), **overrides)


def encoder():
    """A frozen random ViT with patch 8 (pixel images: 4 px per token at patch 2 would do
    too; the encoder resizes each image to its token grid)."""
    return dict(type='TimmViTEncoder', model_name='vit_tiny_patch16_224', img_size=32,
                model_kwargs=dict(embed_dim=24, depth=1, num_heads=2, patch_size=8))


def generator(repa=True, direction=True, **kwargs):
    torch.manual_seed(0)  # the backbone's initialisation
    model = MODELS.build(dict(
        type='DiffusionGenerator', backbone=nit_backbone(), transport=dict(type='RectifiedFlow'),
        time_sampler=dict(type='LogitNormalTime'), loss_reduction='token',
        direction_loss=dict(type='DirectionLoss', weight=0.5) if direction else None,
        repa=dict(type='REPAHead', encoder=encoder(), feature_block=2, projector_dim=16,
                  weight=0.7, reduction='token', form='one_minus_cos') if repa else None,
        **kwargs))
    with torch.no_grad():  # adaLN and output layers start at zero: make them matter
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def batch_of_images():
    g = torch.Generator().manual_seed(2)
    images = [torch.rand(3, h, w, generator=g) * 2 - 1 for h, w in [(8, 12), (12, 8), (8, 8)]]
    samples = dict(label=torch.tensor([0, 5, 2]), seed=7, step=3, index=torch.tensor([4, 9, 1]))
    return images, samples


def test_repa_and_direction_terms_are_their_formulas():
    model = generator()
    images, samples = batch_of_images()
    seen = {}
    model.backbone.register_forward_pre_hook(
        lambda m, args, kwargs: seen.update(batch=args[0], t=args[1]), with_kwargs=True)
    model.backbone.blocks[1].register_forward_hook(lambda m, a, out: seen.update(hidden=out))
    model.backbone.register_forward_hook(lambda m, a, out: seen.update(out=out))
    losses = model.loss(images, samples)
    assert set(losses) == {'loss', 'loss_direction', 'loss_repa'}

    batch, x0 = seen['batch'], patchify(images, 2).tokens
    output, hidden = seen['out']
    assert torch.equal(hidden, seen['hidden'])  # the tokens after block feature_block = 2
    # Direction: 0.5 * mean over tokens of 1 - cos(v_pred, eps - x0), per pixel over RGB.
    t_tok = batch.per_token(seen['t'].float())[:, None]
    target = (batch.tokens - x0) / t_tok  # x_t = (1 - t) x0 + t eps  =>  eps - x0
    cos = F.cosine_similarity(output.reshape(-1, 3, 4), target.reshape(-1, 3, 4), dim=1)
    torch.testing.assert_close(losses['loss_direction'], 0.5 * (1 - cos.mean(-1)).mean())
    torch.testing.assert_close(losses['loss'], (output - target).pow(2).mean())
    # REPA: 0.7 * (1 - mean over tokens of cos(projector(hidden), encoder features)) with
    # the clean input images (pixel-space training) on each image's token grid.
    features = torch.cat(model.repa.encoders[0](images, batch.sizes))
    projected = model.repa.projectors[0](hidden)
    expected = 0.7 * (1 - F.cosine_similarity(projected, features, dim=-1).mean())
    torch.testing.assert_close(losses['loss_repa'], expected)

    # The gradient of REPA reaches the projector and the blocks up to feature_block only.
    model.zero_grad()
    losses['loss_repa'].backward()
    assert model.repa.projectors[0][0].weight.grad.abs().sum() > 0
    assert model.backbone.blocks[1].attn.qkv.weight.grad.abs().sum() > 0
    assert model.backbone.blocks[2].attn.qkv.weight.grad is None



def test_repa_sees_the_clean_pixels_not_an_autoencoder_round_trip():
    """Pixel-space training with an encoding autoencoder: REPA's vision encoder gets the
    input images themselves (a decode(encode(x)) would be a blurred reconstruction)."""
    class Halving(torch.nn.Module):
        downsample, latent_channels = 2, 3

        def encode(self, images, generator=None):
            return [F.avg_pool2d(im[None], 2)[0] for im in images]

        def decode(self, latents):
            return [F.interpolate(lat[None], scale_factor=2.0)[0] for lat in latents]

    MODELS.register_module('_HalvingAutoencoder', module=Halving, force=True)
    model = generator(direction=False, autoencoder=dict(type='_HalvingAutoencoder'))
    g = torch.Generator().manual_seed(5)
    images = [torch.rand(3, h, w, generator=g) * 2 - 1 for h, w in [(16, 24), (16, 16)]]
    samples = dict(label=torch.tensor([1, 3]), seed=0, step=0, index=torch.tensor([0, 1]))
    seen = []
    encoder = model.repa.encoders[0]
    encoder.register_forward_pre_hook(lambda m, args: seen.append(args))
    model.loss(images, samples)
    (given, grids), = seen
    assert len(given) == 2 and all(torch.equal(a, b) for a, b in zip(given, images))
    assert [tuple(s) for s in torch.as_tensor(grids).tolist()] == [(4, 6), (4, 4)]


def test_extra_terms_leave_the_denoising_loss_unchanged_and_log_their_sum():
    images, samples = batch_of_images()
    plain = generator(repa=False, direction=False).loss(images, samples)
    full_model = generator()
    full = full_model.loss(images, samples)
    assert set(plain) == {'loss'}
    torch.testing.assert_close(full['loss'], plain['loss'])  # same draws, same weights
    total, log_vars = full_model.parse_losses(full)
    torch.testing.assert_close(total, full['loss'] + full['loss_direction'] + full['loss_repa'])
    assert list(log_vars) == ['loss', 'loss_denoise', 'loss_direction', 'loss_repa']
    torch.testing.assert_close(log_vars['loss'], total)
    torch.testing.assert_close(log_vars['loss_denoise'], full['loss'].detach())
    total, log_vars = generator(repa=False, direction=False).parse_losses(plain)
    assert list(log_vars) == ['loss'] and torch.equal(total, plain['loss'])


def test_repa_configuration_errors():
    images, samples = batch_of_images()
    latents = generator(inputs_are_latents=True)
    with pytest.raises(ValueError, match="data_samples\\['image'\\]"):
        latents.loss(images, samples)
    # With the images given (as NiTLatents does) the latent generator trains.
    assert 'loss_repa' in latents.loss(images, dict(samples, image=list(images)))
    with pytest.raises(ValueError, match='feature_block=5'):
        MODELS.build(dict(type='DiffusionGenerator', backbone=nit_backbone(),
                          transport=dict(type='RectifiedFlow'),
                          repa=dict(type='REPAHead', encoder=encoder(), feature_block=5)))
    class NoTarget:  # a transport that cannot say what the network regresses
        pass
    with pytest.raises(TypeError, match='training_target'):
        MODELS.build(dict(type='DiffusionGenerator', backbone=nit_backbone(),
                          transport=NoTarget(), direction_loss=dict(type='DirectionLoss')))


def test_generate_feeds_float64_time_so_dit_steps_are_exact():
    """A DiT-style backbone (model time 1000 t): a step k given by a sampler as the python
    float k / 1000 reaches the backbone in float64 and its timestep embedder as exactly k,
    also for the steps where float32(k / 1000) * 1000 is one ulp off."""
    float32_misses = [k for k in range(1000) if (torch.tensor(k / 1000) * 1000).item() != k]
    assert float32_misses  # why the vector is float64 (e.g. 253, 502, 506: DiT's steps)
    steps = float32_misses + list(range(0, 1000, 97))
    model = MODELS.build(dict(type='DiffusionGenerator',
                              backbone=nit_backbone(depth=1, time_scale=1000.0),
                              transport=dict(type='RectifiedFlow')))
    given, embedded = [], []
    model.backbone.register_forward_pre_hook(lambda m, args: given.append(args[1]))
    model.backbone.t_embedder.register_forward_pre_hook(lambda m, args: embedded.append(args[0]))

    class EveryStep(Sampler):
        def __call__(self, model_fn, transport, x, noise_like=None, callback=None):
            for k in steps:
                model_fn(x, k / 1000)
            return x

    model.generate([1], [(4, 4)], seeds=[0], sampler=EveryStep(), guidance=None)
    assert all(t.dtype == torch.float64 for t in given)
    assert torch.equal(torch.cat(given), torch.tensor(steps, dtype=torch.float64) / 1000)
    assert torch.cat(embedded).tolist() == [float(k) for k in steps]


# --------------------------------------------------------------------------- tools/train.py
@HOOKS.register_module()
class PackRecorderHook(Hook):
    """Writes each step's dataset indices and token count to work_dir/packs_rank<r>.json."""

    def before_train(self, runner):
        self.steps = []

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        self.steps.append(dict(index=data_batch['data_samples']['index'].tolist(),
                               tokens=data_batch['inputs'].tokens.shape[0]))

    def after_train(self, runner):
        rank, _ = get_dist_info()
        with open(osp.join(runner.work_dir, f'packs_rank{rank}.json'), 'w') as f:
            json.dump(self.steps, f)


SMALL = ['model.backbone.hidden_size=32', 'model.backbone.depth=2', 'model.backbone.num_heads=2',
         'train_dataloader.dataset.num_samples=2000',
         'train_dataloader.batch_sampler.max_tokens=512', 'param_scheduler=[]',
         'optim_wrapper.optimizer.lr=3e-3',
         'val_cfg=None', 'val_dataloader=None', 'val_evaluator=None', 'test_cfg=None',
         'test_dataloader=None', 'test_evaluator=None', 'default_hooks.logger.interval=1']


def recording_config(tmp_path, imports=(), extra=''):
    """The tiny config plus this file's recorder hook (and the modules to import)."""
    config = tmp_path / 'nit_tiny_recorded.py'
    text = (f'_base_ = [{TINY!r}]\n'
            "custom_hooks = [dict(type='FlexEMAHook', momentum=1e-3, priority='ABOVE_NORMAL'), "
            "dict(type='PackRecorderHook')]\n") + extra
    if imports:
        text += f'custom_imports = dict(imports={list(imports)!r}, allow_failed_imports=False)\n'
    config.write_text(text)
    return config


def test_tiny_packed_config_trains_with_falling_loss(tmp_path):
    from train import build_runner
    steps = 30
    runner = build_runner([str(recording_config(tmp_path)), '--work-dir', str(tmp_path),
                           '--cfg-options', *SMALL, f'train_cfg.max_iters={steps}',
                           f'experiment_name=nit_{uuid.uuid4().hex[:8]}',
                           f'default_hooks.checkpoint.interval={steps}'])
    sampler = runner.train_dataloader.batch_sampler
    assert type(sampler).__name__ == 'OnlinePackSampler' and sampler.max_tokens == 512
    assert runner.model.loss_reduction == 'token' and runner.model.direction_loss is not None
    runner.train()
    losses, _ = runner.message_hub.get_scalar('train/loss').data
    denoise, _ = runner.message_hub.get_scalar('train/loss_denoise').data
    assert len(losses) == steps and all(map(torch.isfinite, torch.tensor(losses)))
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5])
    assert sum(denoise[-5:]) < 0.9 * sum(denoise[:5])
    with open(tmp_path / 'packs_rank0.json') as f:
        packs = json.load(f)
    # Every step one pack of mixed sizes within the budget, no image twice in the epoch.
    assert all(p['tokens'] <= 512 and len(p['index']) > 1 for p in packs)
    seen = [i for p in packs for i in p['index']]
    assert len(seen) == len(set(seen))
    assert (tmp_path / f'iter_{steps}.pth').exists()


# --------------------------------------------------------------------------- torchrun
def torchrun(config, work_dir, nproc, packs_per_step, steps):
    train_ok(config, work_dir, nproc, timeout=550, options=SMALL + [
        f'train_dataloader.batch_size={packs_per_step}', f'train_cfg.max_iters={steps}',
        f'default_hooks.checkpoint.interval={steps}',
        f'experiment_name=nit_ddp_{uuid.uuid4().hex[:8]}'])


def logged_losses(work_dir):
    (run,) = [d for d in os.listdir(work_dir) if osp.isdir(osp.join(work_dir, d))]
    with open(osp.join(work_dir, run, 'vis_data', 'scalars.json')) as f:
        return [json.loads(line)['loss'] for line in f if '"loss"' in line]


# SGD, not AdamW: Adam's g / (|g| + eps) magnifies float32 summation-order differences of
# near-zero gradients; SGD keeps them at rounding level (test_ddp_generator.py measures it).
SGD = "optim_wrapper = dict(optimizer=dict(_delete_=True, type='SGD', lr=0.5, momentum=0.9))\n"


@pytest.mark.slow
def test_torchrun_two_ranks_train_on_disjoint_packs(tmp_path):
    """``torchrun --nproc_per_node 2 tools/train.py configs/nit/nit_tiny_shapes_pack.py
    --launcher pytorch``: each rank gets its own pack every step, the packs of the two
    ranks never share an image, and together they are what one process taking two packs
    per step sees; the packs hold different token counts, yet the weights and the logged
    loss equal one process's, because the token mean is over the global batch."""
    config = recording_config(tmp_path, ['test_nit_train'], extra=SGD)  # the recorder hook
    steps = 6
    torchrun(config, tmp_path / 'ddp', nproc=2, packs_per_step=1, steps=steps)
    torchrun(config, tmp_path / 'one', nproc=1, packs_per_step=2, steps=steps)
    ranks = [json.load(open(tmp_path / 'ddp' / f'packs_rank{r}.json')) for r in (0, 1)]
    single = json.load(open(tmp_path / 'one' / 'packs_rank0.json'))
    assert len(ranks[0]) == len(ranks[1]) == len(single) == steps
    for a, b, one in zip(*ranks, single):
        assert a['tokens'] <= 512 and b['tokens'] <= 512
        assert not set(a['index']) & set(b['index'])
        assert a['index'] + b['index'] == one['index']
    seen = [i for rank in ranks for step in rank for i in step['index']]
    assert len(seen) == len(set(seen))
    assert any(a['tokens'] != b['tokens'] for a, b in zip(*ranks))  # unequal packs
    ddp = torch.load(tmp_path / 'ddp' / f'iter_{steps}.pth', weights_only=True)
    one = torch.load(tmp_path / 'one' / f'iter_{steps}.pth', weights_only=True)
    # Measured: 1.2e-10 apart; dividing by each rank's own token count instead put them
    # 5.3e-6 apart (and the logged loss 4e-4 off), so 1e-7 tells the two apart.
    for key in ('state_dict', 'ema_state_dict'):
        for name, value in one[key].items():
            torch.testing.assert_close(ddp[key][name], value, rtol=0, atol=1e-7,
                                       msg=lambda m, name=name: f'{key} {name}: {m}')
    assert one['state_dict']['backbone.final_layer.linear.weight'].abs().max() > 1e-4
    torch.testing.assert_close(torch.tensor(logged_losses(tmp_path / 'ddp')),
                               torch.tensor(logged_losses(tmp_path / 'one')), rtol=1e-5, atol=0)

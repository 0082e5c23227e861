import pytest
import torch
from helpers import randomise

from flexgen.models import DiffusionGenerator, FlexDiT
from flexgen.structures import Geometry, TokenBatch, patchify, unpatchify

TINY = dict(type='FlexDiT', in_channels=3, patch_size=2, hidden_size=32, depth=2, num_heads=2,
            num_classes=4)


@pytest.mark.parametrize('variant', [dict(), dict(pos_embed=None, rope=dict(type='AxialRoPE2D'),
                                                   mlp=dict(type='SwiGLUMlp'),
                                                   qk_norm='layernorm')])
def test_backbone_jagged_batch_equals_images_one_by_one(variant):
    torch.manual_seed(0)
    backbone = randomise(FlexDiT(**{k: v for k, v in TINY.items() if k != 'type'}, **variant))
    g = torch.Generator().manual_seed(1)
    images = [torch.randn(3, h, w, generator=g) for h, w in [(4, 6), (8, 8), (6, 2)]]
    t, y = torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0, 3, 4])
    together = backbone(patchify(images, 2), t, y)
    alone = torch.cat([backbone(patchify([im], 2), t[i:i + 1], y[i:i + 1])
                       for i, im in enumerate(images)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_backbone_output_is_zero_at_init():
    backbone = FlexDiT(**{k: v for k, v in TINY.items() if k != 'type'})
    batch = patchify([torch.randn(3, 4, 4)], 2)
    assert torch.equal(backbone(batch, torch.tensor([0.5]), torch.tensor([1])),
                       torch.zeros(4, 12))


def _generator(**kwargs):
    return DiffusionGenerator(backbone=TINY, transport=dict(type='RectifiedFlow'), **kwargs)


def test_loss_draws_depend_only_on_seed_step_and_index():
    torch.manual_seed(0)
    model = _generator()
    randomise(model.backbone)
    g = torch.Generator().manual_seed(3)
    images = [torch.randn(3, 4, 4, generator=g) for _ in range(4)]
    samples = dict(label=torch.tensor([0, 1, 2, 3]), index=torch.tensor([10, 11, 12, 13]),
                   seed=5, step=7)
    full = model.loss(images, samples)['loss']
    again = model.loss(images, samples)['loss']
    assert torch.equal(full, again)
    # the two halves computed apart average to the whole (the per-image draws do not move)
    halves = [model.loss(images[i:i + 2], dict(label=samples['label'][i:i + 2],
                                               index=samples['index'][i:i + 2], seed=5, step=7))
              ['loss'] for i in (0, 2)]
    torch.testing.assert_close(full, (halves[0] + halves[1]) / 2)
    other_step = model.loss(images, dict(samples, step=8))['loss']
    assert not torch.equal(full, other_step)


def test_generate_with_exact_velocity_reaches_the_gaussian_map():
    """An oracle backbone returning the exact Gaussian velocity: generation must land on
    mu + s z for the per-image noise z, at every size in one mixed batch."""
    mu, s = 0.5, 0.2
    model = _generator(sampler=dict(type='EulerODE', num_steps=200))

    def oracle(batch, t, y):
        t = t[0].item()
        a, var = 1 - t, (1 - t) ** 2 * s * s + t * t
        x = batch.tokens
        return t / var * (x - a * mu) - (mu + a * s * s / var * (x - a * mu))

    model.network = oracle
    sizes = [(4, 6), (8, 4)]
    images = model.generate([0, 1], sizes, seeds=[11, 12])
    geometry = Geometry(torch.tensor(sizes) // model.patch_size)
    noise = model.sampling_noise(torch.tensor([11, 12]), geometry, 0)
    for z, image in zip(unpatchify(noise, geometry.sizes, model.patch_size), images):
        torch.testing.assert_close(image, mu + s * z, atol=0.02, rtol=0)  # Euler error; miswiring is O(1)
    # an image depends on its own seed only, not on the batch it is generated in
    alone = model.generate([1], [sizes[1]], seeds=[12])[0]
    torch.testing.assert_close(alone, images[1], atol=1e-6, rtol=0)


def test_generate_rejects_sizes_not_divisible_by_patch():
    with pytest.raises(ValueError, match='5x4 is not a positive multiple of 2'):
        _generator().generate([0], [(5, 4)], seeds=[0])


def test_short_training_run_lowers_the_loss():
    torch.manual_seed(0)
    model = _generator(class_dropout_prob=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    # two classes of constant images: learnable in a few steps
    images = [torch.full((3, 4, 4), 0.8) if i % 2 else torch.full((3, 4, 4), -0.8)
              for i in range(16)]
    samples = dict(label=torch.tensor([i % 2 for i in range(16)]), index=torch.arange(16),
                   seed=0)
    losses = []
    for step in range(60):
        loss = model.loss(images, dict(samples, step=step))['loss']
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.6 * sum(losses[:10]) / 10, losses


def test_latent_inputs_skip_the_encoder_but_generation_decodes():
    class Doubling(torch.nn.Module):
        downsample, latent_channels = 1, 3

        def encode(self, images):
            return [2 * im for im in images]

        def decode(self, latents):
            return [-lat for lat in latents]

    from flexgen.registry import MODELS
    MODELS.register_module('_DoublingAutoencoder', module=Doubling, force=True)
    pixels = _generator(autoencoder=dict(type='_DoublingAutoencoder'))
    latents = _generator(autoencoder=dict(type='_DoublingAutoencoder'), inputs_are_latents=True)
    randomise(pixels.backbone)
    latents.load_state_dict(pixels.state_dict())
    images = [torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    samples = dict(label=torch.tensor([0, 1]), index=torch.tensor([0, 1]), seed=0, step=0)
    encoded = [2 * im for im in images]
    assert torch.equal(latents.loss(encoded, samples)['loss'], pixels.loss(images, samples)['loss'])
    a = latents.generate([1], [(4, 4)], seeds=[3], guidance=None)[0]
    b = pixels.generate([1], [(4, 4)], seeds=[3], guidance=None)[0]
    assert torch.equal(a, b)
    latents.autoencoder.decode = lambda lats: list(lats)
    assert torch.equal(latents.generate([1], [(4, 4)], seeds=[3], guidance=None)[0], -a)


def test_parts_that_do_not_follow_their_contract_are_refused_by_name():
    """Transport, time sampler, sampler and guidance are checked against their base
    classes when the generator is built (and a sampler / guidance given to generate)."""
    from flexgen.registry import MODELS, SAMPLERS, TIME_SAMPLERS

    @SAMPLERS.register_module(name='_NotASampler', force=True)
    class NotASampler:
        def __call__(self, model_fn, transport, noise, noise_like=None, callback=None):
            return noise

    @TIME_SAMPLERS.register_module(name='_NotATimeSampler', force=True)
    class NotATimeSampler:
        def __call__(self, draws, seqlens=None):
            return draws.uniform('time')

    backbone = dict(type='FlexDiT', in_channels=3, patch_size=2, hidden_size=16, depth=1,
                    num_heads=2, num_classes=4, pos_embed=None, rope=dict(type='AxialRoPE2D'))
    base = dict(type='DiffusionGenerator', backbone=backbone, transport=dict(type='RectifiedFlow'))
    with pytest.raises(TypeError, match=r'DiffusionGenerator: sampler must be a Sampler \(the '
                                        r'contract in flexgen.samplers.base\), got NotASampler'):
        MODELS.build(dict(base, sampler=dict(type='_NotASampler')))
    with pytest.raises(TypeError, match=r'time_sampler must be a TimeSampler .*NotATimeSampler'):
        MODELS.build(dict(base, time_sampler=dict(type='_NotATimeSampler')))
    model = MODELS.build(base)
    with pytest.raises(TypeError, match=r'generate: sampler must be a Sampler .*function'):
        model.generate([1], [(4, 4)], [0], sampler=lambda *args, **kwargs: None)
    with pytest.raises(TypeError, match=r'generate: guidance must be a Guidance .*object'):
        model.generate([1], [(4, 4)], [0], guidance=object())

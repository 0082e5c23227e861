"""Autoencoders: the wrapper reproduces diffusers' own encode / decode with the latent
normalisation z = (E(x) - shift) * scale, per image, for mixed sizes."""
import copy
import json

import diffusers
import pytest
import torch

from flexgen.models import autoencoders
from flexgen.models.autoencoders import (DiffusersAutoencoder, IdentityAutoencoder,
                                         diffusers_downsample)
from flexgen.registry import MODELS

SIZES = [(16, 16), (16, 24), (16, 16), (24, 16)]


def _images(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=g) * 2 - 1 for h, w in SIZES]


def _tiny(kind):
    # diffusers initialises from the global RNG: seed it inside fork_rng, which restores it.
    with torch.random.fork_rng():
        torch.manual_seed(0)
        if kind == 'AutoencoderKL':
            return diffusers.AutoencoderKL(
                block_out_channels=(8, 16), down_block_types=('DownEncoderBlock2D',) * 2,
                up_block_types=('UpDecoderBlock2D',) * 2, latent_channels=4,
                norm_num_groups=4, layers_per_block=1, sample_size=32,
                scaling_factor=0.5, shift_factor=0.1)
        return diffusers.AutoencoderDC(
            latent_channels=4, attention_head_dim=8,
            encoder_block_out_channels=(8, 16), decoder_block_out_channels=(8, 16),
            encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
            encoder_qkv_multiscales=((), ()), decoder_qkv_multiscales=((), ()),
            scaling_factor=0.41)


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
    """kind -> (directory, the diffusers model loaded back from it)."""
    root = tmp_path_factory.mktemp('autoencoders')
    out = {}
    for kind in DiffusersAutoencoder.KINDS:
        _tiny(kind).save_pretrained(root / kind)
        out[kind] = (root / kind, getattr(diffusers, kind).from_pretrained(root / kind).eval())
    return out


def _by_shape(images):
    groups = {}
    for i, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(i)
    return groups.values()


def _direct_encode(model, kind, x, scale, shift, generator=None):
    with torch.no_grad():
        if kind == 'AutoencoderDC':
            z = model.encode(x).latent
        elif generator is None:
            z = model.encode(x).latent_dist.mean
        else:
            z = model.encode(x).latent_dist.sample(generator)
    return (z - shift) * scale


def test_identity_autoencoder():
    ae = MODELS.build(dict(type='IdentityAutoencoder', channels=4))
    assert (ae.latent_channels, ae.downsample) == (4, 1)
    images = [torch.randn(4, 3, 5), torch.randn(4, 2, 2)]
    assert all(a is b for a, b in zip(ae.encode(images), images))
    assert all(a is b for a, b in zip(ae.decode(images), images))
    with pytest.raises(ValueError, match='item 1 must be a Tensor\\[4, H, W\\]'):
        IdentityAutoencoder(4).encode([torch.randn(4, 2, 2), torch.randn(3, 2, 2)])


@pytest.mark.parametrize('kind', DiffusersAutoencoder.KINDS)
def test_encode_decode_equal_diffusers(saved, kind):
    path, model = saved[kind]
    ae = MODELS.build(dict(type='DiffusersAutoencoder', path=str(path), kind=kind))
    scale = model.config.scaling_factor
    shift = 0.1 if kind == 'AutoencoderKL' else 0.0  # DC configs have no shift_factor
    assert (ae.scaling_factor, ae.shift_factor) == (scale, shift)
    assert (ae.latent_channels, ae.downsample) == (4, 2)

    images = _images()
    latents = ae.encode(images)
    assert [tuple(z.shape) for z in latents] == [(4, h // 2, w // 2) for h, w in SIZES]
    decoded = ae.decode(latents)
    assert [tuple(x.shape) for x in decoded] == [(3, h, w) for h, w in SIZES]

    for indices in _by_shape(images):
        x = torch.stack([images[i] for i in indices])
        z = torch.stack([latents[i] for i in indices])
        assert torch.equal(z, _direct_encode(model, kind, x, scale, shift))
        with torch.no_grad():
            expected = model.decode(z / scale + shift).sample
            own_round_trip = model.decode(_direct_encode(model, kind, x, 1.0, 0.0)).sample
        assert torch.equal(torch.stack([decoded[i] for i in indices]), expected)
        # Normalising and un-normalising costs only float rounding.
        torch.testing.assert_close(torch.stack([decoded[i] for i in indices]), own_round_trip,
                                   rtol=1e-5, atol=1e-5)


def test_overrides_and_posterior_sampling(saved):
    path, model = saved['AutoencoderKL']
    ae = DiffusersAutoencoder(path, scaling_factor=2.0, shift_factor=-0.3, sample_posterior=True)
    assert (ae.scaling_factor, ae.shift_factor) == (2.0, -0.3)
    images = [_images()[1]] * 2  # two equal images: independent samples differ

    z1 = ae.encode(images, generator=torch.Generator().manual_seed(7))
    z2 = ae.encode(images, generator=torch.Generator().manual_seed(7))
    z3 = ae.encode(images, generator=torch.Generator().manual_seed(8))
    assert all(torch.equal(a, b) for a, b in zip(z1, z2))
    assert not torch.equal(z1[0], z3[0]) and not torch.equal(z1[0], z1[1])
    expected = _direct_encode(model, 'AutoencoderKL', torch.stack(images), 2.0, -0.3,
                              torch.Generator().manual_seed(7))
    assert torch.equal(torch.stack(z1), expected)
    mean = DiffusersAutoencoder(path, scaling_factor=2.0, shift_factor=-0.3).encode(images)
    assert (z1[0] - mean[0]).abs().max() > 0  # a sample is not the mean


def test_frozen_and_out_of_the_state_dict(saved):
    path, model = saved['AutoencoderKL']
    ae = DiffusersAutoencoder(path)
    assert len(ae.state_dict()) == 0 and len(list(ae.parameters())) == 0
    assert not any(p.requires_grad for p in ae.vae.parameters()) and not ae.vae.training
    ae.train()
    assert not ae.vae.training
    assert copy.deepcopy(ae).vae is ae.vae  # EMA copies share the frozen weights
    ae.to(torch.float64)
    assert next(ae.vae.parameters()).dtype == torch.float64
    latents = ae.encode(_images()[:1])
    assert latents[0].dtype == torch.float32


def test_errors(saved, tmp_path, monkeypatch):
    path, _ = saved['AutoencoderKL']
    with pytest.raises(ValueError, match='supported kinds: AutoencoderKL, AutoencoderDC'):
        DiffusersAutoencoder(path, kind='VQModel')
    with pytest.raises(ValueError, match='deterministic'):
        DiffusersAutoencoder(saved['AutoencoderDC'][0], kind='AutoencoderDC',
                             sample_posterior=True)
    with pytest.raises(ValueError, match='item 0 has size 15x16.*divisible by the '
                                         'downsampling factor 2'):
        DiffusersAutoencoder(path).encode([torch.zeros(3, 15, 16)])
    missing = tmp_path / 'no' / 'such-vae'
    with pytest.raises(FileNotFoundError, match='neither a local directory') as info:
        DiffusersAutoencoder(missing)
    assert str(missing) in str(info.value)

    def offline(*args, **kwargs):
        raise OSError('We couldn\'t connect to https://huggingface.co')
    monkeypatch.setattr(diffusers.AutoencoderKL, 'from_pretrained', offline)
    unreachable = DiffusersAutoencoder('someone/some-vae', latent_channels=4, downsample=8)
    with pytest.raises(FileNotFoundError, match="'someone/some-vae' is neither a local "
                                                'directory nor reachable'):
        unreachable.decode([torch.zeros(4, 2, 2)])
    with pytest.raises(ValueError, match='downsample must be a positive int'):
        DiffusersAutoencoder(path, downsample=0)


def counting_loads(monkeypatch, kind):
    """Record every from_pretrained call of the diffusers class ``kind``."""
    cls = getattr(diffusers, kind)
    load, calls = cls.from_pretrained.__func__, []

    def counted(cls, path, *args, **kwargs):
        calls.append(str(path))
        return load(cls, path, *args, **kwargs)

    monkeypatch.setattr(cls, 'from_pretrained', classmethod(counted))
    return calls


def test_network_loads_on_first_use_and_takes_earlier_moves(saved, monkeypatch):
    path, model = saved['AutoencoderKL']
    calls = counting_loads(monkeypatch, 'AutoencoderKL')
    ae = DiffusersAutoencoder(path, latent_channels=4, downsample=2, shift_factor=0.1)
    assert (ae.latent_channels, ae.downsample, ae.shift_factor) == (4, 2, 0.1)
    ema = copy.deepcopy(ae)
    ae.to(torch.float64)
    assert calls == [] and not ae.loaded and 'loaded=False' in repr(ae)
    latents = [torch.randn(4, 3, 2, generator=torch.Generator().manual_seed(1))]
    decoded = ema.decode(latents)  # the copy loads the shared network, as moved before
    assert calls == [str(path)] and ae.loaded and ema.vae is ae.vae
    assert {p.dtype for p in ae.vae.parameters()} == {torch.float64}
    assert not ae.vae.training and not any(p.requires_grad for p in ae.vae.parameters())
    with torch.no_grad():
        expected = model.double().decode(latents[0][None].double() / 0.5 + 0.1).sample
    model.float()
    assert decoded[0].dtype == torch.float32
    torch.testing.assert_close(decoded[0], expected[0].float())
    ae.encode(_images()[:1])
    assert calls == [str(path)]  # loaded once
    # A device move before the load applies too (the meta device stands in for a GPU).
    later = DiffusersAutoencoder(path).to('meta')
    assert calls == [str(path)]
    assert {p.device.type for p in later.vae.parameters()} == {'meta'}
    # Settings not given come from the network's config: reading them loads it.
    assert (later.latent_channels, later.downsample, later.scaling_factor) == (4, 2, 0.5)


@pytest.mark.parametrize('field, value', [('latent_channels', 8), ('downsample', 4)])
def test_given_shapes_are_checked_when_the_network_loads(saved, field, value):
    path, _ = saved['AutoencoderDC']
    ae = DiffusersAutoencoder(path, kind='AutoencoderDC', **{field: value})
    with pytest.raises(ValueError, match=f'{field}={value} was given, but the network at '
                                         f"'{path}' has {field}=.*model.autoencoder.{field}"):
        ae.vae


@pytest.mark.parametrize('kind', DiffusersAutoencoder.KINDS)
def test_config_is_read_once_at_the_load(saved, kind, monkeypatch):
    path, _ = saved[kind]
    reads = []
    read = autoencoders._read_config
    monkeypatch.setattr(autoencoders, '_read_config', lambda *a: reads.append(1) or read(*a))
    ae = DiffusersAutoencoder(path, kind=kind)
    for _ in range(3):
        assert (ae.latent_channels, ae.downsample, ae.in_channels) == (4, 2, 3)
    ae.decode([torch.zeros(4, 2, 2)])
    assert len(reads) == 1


@pytest.mark.parametrize('kind', DiffusersAutoencoder.KINDS)
def test_downsample_rule_reads_config_json_as_the_network_does(saved, kind):
    path, model = saved[kind]
    with open(path / 'config.json') as f:
        config = json.load(f)
    assert diffusers_downsample(kind, config) == diffusers_downsample(kind, model.config) == 2
    latent = _direct_encode(model, kind, torch.zeros(1, 3, 16, 24), 1.0, 0.0)
    assert latent.shape[-2:] == (16 // 2, 24 // 2)

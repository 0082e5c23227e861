"""REPA: vision encoders on the token grid (timm DINOv2-style ViT, RADIO from a local
checkpoint), weights from local files, the projector / REPAHead, the alignment loss and
NiT's direction loss in closed form, and a projector that learns to align."""
import argparse
import copy

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from flexgen.losses.direction import DirectionLoss, direction_loss
from flexgen.losses.repa import REPALoss, repa_alignment_loss
from flexgen.models.backbones import FlexDiT
from flexgen.models.repa import REPAHead, REPAProjector
from flexgen.models.vision_encoders import (CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD,
                                            DINOv2Encoder, EncoderWeightsError, RADIOEncoder)
from flexgen.registry import MODELS
from flexgen.structures import patchify
from helpers import randomise

TINY = dict(depth=2, embed_dim=32, num_heads=2)
DINO = dict(type='DINOv2Encoder', arch='dinov2-vit-s', img_size=28, model_kwargs=TINY)


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    """Tiny matmuls on a shared 2-core machine: threads only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_dino(**kwargs):
    cfg = dict(DINO, **kwargs)
    cfg.pop('type')
    return DINOv2Encoder(**cfg)


def images(seed=0, sizes=((40, 60), (28, 28), (50, 30))):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=g) * 2 - 1 for h, w in sizes]


def normalise(x, mean, std):
    return ((x + 1) / 2 - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


# ---------------------------------------------------------------------- encoders
def test_image_alignment_gives_the_token_grid_for_non_square_sizes(monkeypatch):
    enc = tiny_dino()
    seen, embed, packed = [], enc.embed, []
    monkeypatch.setattr(enc, 'embed', lambda x: seen.append(tuple(x.shape)) or embed(x))
    encode_packed = enc.encode_packed
    monkeypatch.setattr(enc, 'encode_packed',
                        lambda xs: packed.append([len(x) for x in xs]) or encode_packed(xs))
    grids = [(3, 5), (2, 2), (4, 1)]
    feats = enc(images(), grids)
    assert sorted(seen) == sorted([(1, 3, 42, 70), (1, 3, 28, 28), (1, 3, 56, 14)])
    assert [tuple(f.shape) for f in feats] == [(15, 32), (4, 32), (4, 32)]
    assert [sorted(lengths) for lengths in packed] == [[1 + 4, 1 + 4, 1 + 15]]  # one call
    # Images of one size are embedded together.
    seen.clear()
    enc(images(sizes=((30, 40),) * 3), [(2, 3)] * 3)
    assert seen == [(3, 3, 28, 42)]


@pytest.mark.parametrize('kind', ['dinov2', 'dinov2_registers', 'features_align'])
def test_packed_blocks_give_the_features_of_one_call_per_size(kind):
    """One packed trunk over images of many sizes (block-diagonal attention) equals timm's
    own forward run once per size: prefix and register tokens, grids of any shape."""
    def build(packed):
        if kind == 'dinov2_registers':
            enc = DINOv2Encoder(arch='dinov2reg-vit-s', img_size=28, model_kwargs=TINY,
                                packed=packed)
        else:
            enc = tiny_dino(packed=packed,
                            **(dict(align='features') if kind == 'features_align' else {}))
        randomise(enc.net, seed=3)
        return enc

    packed, per_size = build(True), build(False)
    assert packed.packs and not per_size.packs
    sizes = ((40, 60), (28, 28), (50, 30), (28, 28), (64, 20), (40, 60))
    grids = [(3, 5), (2, 2), (4, 1), (2, 2), (5, 2), (2, 6)]
    for a, b in zip(packed(images(sizes=sizes), grids), per_size(images(sizes=sizes), grids)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_an_encoder_with_its_own_encode_runs_it_once_per_size():
    """A subclass that computes features its own way keeps its encode (never packed)."""
    class Doubled(DINOv2Encoder):
        def encode(self, x):
            return 2 * super().encode(x)

    enc = Doubled(arch='dinov2-vit-s', img_size=28, model_kwargs=TINY)
    plain = tiny_dino()
    assert plain.packs and not enc.packs
    grids = [(3, 5), (2, 2), (4, 1)]
    for a, b in zip(enc(images(), grids), plain(images(), grids)):
        torch.testing.assert_close(a, 2 * b, rtol=1e-5, atol=1e-5)


def test_features_are_the_timm_patch_tokens_of_the_normalised_resized_image():
    enc = tiny_dino()
    image, (h, w) = images()[0], (3, 5)
    x = normalise(image, IMAGENET_MEAN, IMAGENET_STD)
    x = F.interpolate(x[None], size=(h * 14, w * 14), mode='bicubic', align_corners=False)
    with torch.no_grad():
        expected = enc.net.forward_features(x)[0, 1:]  # drop the class token
    torch.testing.assert_close(enc([image], [(h, w)])[0], expected)
    # uint8 [H, W, 3] arrays (what NiTLatents returns) are the same pixels.
    pixels = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    as_float = torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1
    torch.testing.assert_close(enc([pixels], [(h, w)])[0], enc([as_float], [(h, w)])[0])


def test_feature_alignment_resamples_the_feature_map_bilinearly():
    enc = tiny_dino(align='features')
    image = images(sizes=((60, 45),))[0]  # encoded at 56 x 42 px: a 4 x 3 patch grid
    x = normalise(image, IMAGENET_MEAN, IMAGENET_STD)
    x = F.interpolate(x[None], size=(56, 42), mode='bicubic', align_corners=False)
    with torch.no_grad():
        fmap = enc.net.forward_features(x)[0, 1:].T.reshape(1, 32, 4, 3)
    expected = F.interpolate(fmap, size=(2, 5), mode='bilinear', align_corners=False)
    torch.testing.assert_close(enc([image], [(2, 5)])[0], expected[0].flatten(1).T)
    fixed = tiny_dino(align='features', input_size=28)
    assert fixed([image], [(3, 3)])[0].shape == (9, 32)


def test_random_init_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a, b, c = tiny_dino(), tiny_dino(), tiny_dino(init_seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    x = images()[:1]
    assert torch.equal(a(x, [(2, 2)])[0], b(x, [(2, 2)])[0])
    assert not torch.allclose(a(x, [(2, 2)])[0], c(x, [(2, 2)])[0])


@pytest.mark.parametrize('fmt', ['safetensors', 'pth', 'hub'])
def test_weights_from_a_local_file_round_trip(tmp_path, fmt):
    source = tiny_dino(init_seed=0)
    state = {k: v.clone() for k, v in source.net.state_dict().items()}
    if fmt == 'safetensors':
        path = tmp_path / 'dino.safetensors'
        save_file(state, path)
    else:
        if fmt == 'hub':  # the original DINOv2 release carries a mask token timm drops
            state['mask_token'] = torch.zeros(1, 32)
        path = tmp_path / 'dino.pth'
        torch.save(state, path)
    loaded = tiny_dino(init_seed=1, weights=str(path))
    x, grids = images(), [(3, 5), (2, 2), (1, 4)]
    for got, want in zip(loaded(x, grids), source(x, grids)):
        torch.testing.assert_close(got, want)


def test_bad_weight_files_are_named(tmp_path):
    (tmp_path / 'junk.safetensors').write_bytes(b'junk')
    with pytest.raises(EncoderWeightsError, match='junk.safetensors'):
        tiny_dino(weights=str(tmp_path / 'junk.safetensors'))
    wider = DINOv2Encoder('dinov2-vit-s', img_size=28, model_kwargs=dict(TINY, embed_dim=48))
    save_file(dict(wider.net.state_dict()), tmp_path / 'wider.safetensors')
    with pytest.raises(EncoderWeightsError, match='wider.safetensors.*do not fit'):
        tiny_dino(weights=str(tmp_path / 'wider.safetensors'))
    with pytest.raises(FileNotFoundError, match='absent.pth'):
        tiny_dino(weights=str(tmp_path / 'absent.pth'))


# ---------------------------------------------------------------------- RADIO
def radio_backbone(dim=32, depth=2, hidden=None, grid=8, prefix=3, p=16, seed=7):
    """Random weights under RADIO's own key names (a timm ViT whose patch embedding, class /
    register tokens and position embedding are RADIO's CPE patch generator)."""
    g = torch.Generator().manual_seed(seed)
    hidden = hidden or 4 * dim

    def rand(*shape, std=0.1):
        return torch.randn(*shape, generator=g) * std

    backbone = {}
    for i in range(depth):
        for name, shape in (('norm1', (dim,)), ('attn.qkv', (3 * dim, dim)),
                            ('attn.proj', (dim, dim)), ('norm2', (dim,)),
                            ('mlp.fc1', (hidden, dim)), ('mlp.fc2', (dim, hidden))):
            backbone[f'blocks.{i}.{name}.weight'] = rand(*shape) + (1 if len(shape) == 1 else 0)
            backbone[f'blocks.{i}.{name}.bias'] = rand(shape[0])
    backbone['patch_generator.embedder.weight'] = rand(dim, 3 * p * p, std=0.05)
    backbone['patch_generator.pos_embed'] = rand(1, grid * grid, dim, std=1.0)
    backbone['patch_generator.cls_token.token'] = rand(prefix, dim, std=1.0)
    return backbone


def vit_blocks(backbone, x, heads):
    """A timm-style pre-norm ViT written out (LayerNorm eps 1e-6, softmax attention with
    ``heads`` heads, exact GELU MLP) on tokens ``[n, d]``, from the checkpoint's keys."""
    depth = 1 + max(int(k.split('.')[1]) for k in backbone if k.startswith('blocks.'))
    n, d = x.shape
    for i in range(depth):
        w = {k[len(f'blocks.{i}.'):]: v for k, v in backbone.items()
             if k.startswith(f'blocks.{i}.')}
        y = F.layer_norm(x, (d,), w['norm1.weight'], w['norm1.bias'], eps=1e-6)
        qkv = y @ w['attn.qkv.weight'].T + w['attn.qkv.bias']
        q, k, v = qkv.reshape(n, 3, heads, d // heads).unbind(1)
        attn = (torch.einsum('nhc,mhc->hnm', q, k) / (d // heads) ** 0.5).softmax(-1)
        x = x + torch.einsum('hnm,mhc->nhc', attn, v).reshape(n, d) @ w['attn.proj.weight'].T
        x = x + w['attn.proj.bias']
        y = F.layer_norm(x, (d,), w['norm2.weight'], w['norm2.bias'], eps=1e-6)
        y = F.gelu(y @ w['mlp.fc1.weight'].T + w['mlp.fc1.bias'])
        x = x + y @ w['mlp.fc2.weight'].T + w['mlp.fc2.bias']
    return x


def radio_reference(backbone, image, h, w, heads, p=16):
    """RADIO's inference forward, written out: CLIP normalisation, (c, y, x) patches times
    the embedder, CPE resized to max(h, w)^2 (align_corners) and cropped top-left, summary /
    register tokens first, the blocks, prefix dropped."""
    x = normalise(image, CLIP_MEAN, CLIP_STD)
    x = F.interpolate(x[None], size=(h * p, w * p), mode='bicubic', align_corners=False)[0]
    patches = x.reshape(3, h, p, w, p).permute(1, 3, 0, 2, 4).reshape(h * w, 3 * p * p)
    tokens = patches @ backbone['patch_generator.embedder.weight'].T
    side = int(backbone['patch_generator.pos_embed'].shape[1] ** 0.5)
    pos = backbone['patch_generator.pos_embed'].reshape(side, side, -1).permute(2, 0, 1)[None]
    m = max(h, w)
    pos = F.interpolate(pos, size=(m, m), mode='bilinear', align_corners=True)[0, :, :h, :w]
    tokens = tokens + pos.flatten(1).T
    prefix = backbone['patch_generator.cls_token.token']
    out = vit_blocks(backbone, torch.cat([prefix, tokens]), heads)
    return out[len(prefix):]


def save_radio_release(path, backbone, model, **args):
    """A checkpoint in RADIO's release layout: ``state_dict_ema`` with ``base_model.*`` and
    ``input_conditioner.*`` keys, the training arguments as an ``argparse.Namespace``."""
    state = {f'base_model.{k}': v for k, v in backbone.items()}
    state['input_conditioner.norm_mean'] = torch.tensor(CLIP_MEAN).reshape(3, 1, 1)
    state['input_conditioner.norm_std'] = torch.tensor(CLIP_STD).reshape(3, 1, 1)
    args = dict(dict(model=model, teachers=[dict(name='clip'), dict(name='dino_v2'),
                                           dict(name='sam')], cls_token_per_teacher=True,
                     cpe_max_size=2048, register_multiple=8, model_norm=False,
                     spectral_reparam=False, model_kwargs={}), **args)
    torch.save(dict(state_dict_ema=state, args=argparse.Namespace(**args)), path)
    return path


RADIO_GRIDS = [(2, 3), (5, 2)]  # non-square: CPE resized to 3x3 / 5x5, then cropped


def test_radio_release_checkpoint_matches_radio_forward(tmp_path):
    backbone = radio_backbone()
    # A name timm registers: its definition gives the heads, overridden here for the width.
    path = save_radio_release(tmp_path / 'radio_v2.5-tiny.pth.tar', backbone,
                              'vit_small_patch16_224')
    enc = RADIOEncoder(str(path), model_kwargs=dict(num_heads=2))
    assert (enc.patch_size, enc.z_dim, len(enc.net.blocks)) == (16, 32, 2)
    x = images(sizes=((40, 60), (100, 30)))
    for got, image, (h, w) in zip(enc(x, RADIO_GRIDS), x, RADIO_GRIDS):
        torch.testing.assert_close(got, radio_reference(backbone, image, h, w, heads=2),
                                   rtol=1e-4, atol=1e-4)
    # The Hugging Face layout (safetensors, radio_model.* keys) gives the same encoder.
    hf = {f'radio_model.model.{k}': v.contiguous() for k, v in backbone.items()}
    save_file(hf, tmp_path / 'radio.safetensors')
    same = RADIOEncoder(str(tmp_path / 'radio.safetensors'), arch='vit_small_patch16_224',
                        model_kwargs=dict(num_heads=2))
    torch.testing.assert_close(same(x, RADIO_GRIDS)[1], enc(x, RADIO_GRIDS)[1])
    torch.save(dict(state_dict=dict(hf)), tmp_path / 'no_arch.pth')
    with pytest.raises(EncoderWeightsError, match='no_arch.pth.*pass arch'):
        RADIOEncoder(str(tmp_path / 'no_arch.pth'))


@pytest.mark.parametrize('model, dim, hidden, heads', [
    ('vit_huge_patch16_224', 64, 256, 16),     # RADIO v2.5-H's name (1280 wide, 16 heads)
    ('vit_so400m_patch16_224', 48, 179, 16),   # MLP not a whole multiple (4304 / 1152)
    ('vit_giant_patch16_224', 48, 192, 24),    # RADIO's giant: 24 heads (timm's g/14: 16)
])
def test_radio_names_timm_does_not_know(tmp_path, model, dim, hidden, heads):
    """RADIO's own architecture names build the ViT RADIO defines: shapes from the weights,
    heads from RADIO's definition of the name; features equal the written-out forward."""
    assert not timm.is_model(model)
    backbone = radio_backbone(dim=dim, depth=3, hidden=hidden, prefix=8, seed=11)
    path = save_radio_release(tmp_path / f'{model}.pth.tar', backbone, model)
    enc = RADIOEncoder(str(path))
    net = enc.net
    assert (enc.arch, enc.patch_size, enc.z_dim, len(net.blocks)) == (model, 16, dim, 3)
    assert net.blocks[0].attn.num_heads == heads
    assert net.blocks[0].mlp.fc1.out_features == hidden
    x = images(sizes=((40, 60), (100, 30)))
    got = enc(x, RADIO_GRIDS)
    for feats, image, (h, w) in zip(got, x, RADIO_GRIDS):
        torch.testing.assert_close(feats, radio_reference(backbone, image, h, w, heads),
                                   rtol=1e-4, atol=1e-4)
    # The head count matters: another one gives other features.
    assert not torch.allclose(got[0], radio_reference(backbone, x[0], 2, 3, heads // 2),
                              rtol=1e-3, atol=1e-3)
    # RADIO passes args.model_kwargs to timm: a num_heads saved there wins over the name.
    saved = save_radio_release(tmp_path / 'saved_heads.pth.tar', backbone, model,
                               model_kwargs=dict(num_heads=heads // 2))
    torch.testing.assert_close(RADIOEncoder(str(saved))(x[:1], RADIO_GRIDS[:1])[0],
                               radio_reference(backbone, x[0], 2, 3, heads // 2),
                               rtol=1e-4, atol=1e-4)


def test_radio_names_that_do_not_fit_are_refused(tmp_path):
    backbone = radio_backbone()
    unknown = save_radio_release(tmp_path / 'unknown.pth.tar', backbone,
                                 'vit_mystery_patch16_224')
    with pytest.raises(EncoderWeightsError, match="unknown.pth.tar.*'vit_mystery_patch16_224'"
                                                  ".*vit_huge_patch16_224"):
        RADIOEncoder(str(unknown))
    patch14 = save_radio_release(tmp_path / 'patch14.pth.tar', backbone, 'vit_huge_patch14_224')
    with pytest.raises(EncoderWeightsError, match='patch14.pth.tar.*patch 14.*16x16'):
        RADIOEncoder(str(patch14))
    scaled = save_radio_release(tmp_path / 'scaled.pth.tar', backbone, 'vit_giant_patch16_224',
                                model_kwargs=dict(scaled_ln=True))
    with pytest.raises(EncoderWeightsError, match='scaled.pth.tar.*scaled_ln=True'):
        RADIOEncoder(str(scaled))
    normed = dict(backbone, **{'patch_generator.patch_normalizer.weight': torch.ones(32)})
    normed = save_radio_release(tmp_path / 'normed.pth.tar', normed, 'vit_huge_patch16_224')
    with pytest.raises(EncoderWeightsError, match='normed.pth.tar.*patch_normalizer'):
        RADIOEncoder(str(normed))


# ---------------------------------------------------------------------- losses
def orthogonal_pair(n, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g))
    return q[:n], q[n:2 * n]  # rows of one orthogonal matrix: pairwise orthogonal


def test_repa_loss_closed_forms():
    a, b = orthogonal_pair(4)
    seqlens = torch.tensor([1, 3])
    assert REPALoss(0.5)(a, a * 3.0, seqlens).item() == pytest.approx(-0.5)  # identical
    assert REPALoss(0.5)(a, b, seqlens).item() == pytest.approx(0.0, abs=1e-6)  # orthogonal
    assert REPALoss(1.0, 'token', 'one_minus_cos')(a, a, seqlens).item() == pytest.approx(0.0)
    assert REPALoss(1.0, 'token', 'one_minus_cos')(a, b).item() == pytest.approx(1.0)
    # Image 0 (1 token) aligned, image 1 (3 tokens) orthogonal: REPA averages per image,
    # NiT over tokens.
    mixed = torch.cat([a[:1], b[1:]])
    assert repa_alignment_loss(mixed, a, seqlens).item() == pytest.approx(-0.5)
    assert repa_alignment_loss(mixed, a, reduction='token').item() == pytest.approx(-0.25)
    # Several encoders: their losses are averaged.
    assert REPALoss(2.0)([a, a], [a, b], seqlens).item() == pytest.approx(-1.0)
    with pytest.raises(ValueError, match='seqlens'):
        repa_alignment_loss(a, a)


def test_direction_loss_closed_forms():
    target = torch.tensor([[1.0, 2.0, -1.0, 0.5]])
    assert direction_loss(2.5 * target, target).item() == pytest.approx(0.0, abs=1e-6)
    assert direction_loss(-target, target).item() == pytest.approx(2.0)
    ortho = torch.tensor([[2.0, -1.0, 0.0, 0.0]])  # dot product 0
    assert direction_loss(ortho, target).item() == pytest.approx(1.0)
    # Extra (learned-variance) columns are ignored.
    assert direction_loss(torch.cat([target, target], 1), target).item() == pytest.approx(
        0, abs=1e-6)
    # channels=2, p*p = 2 pixels per token in (c, p1, p2) order: pixel 0 is (t[0], t[2]),
    # pixel 1 is (t[1], t[3]). Flip pixel 1 only: (0 + 2) / 2 = 1.
    pred = target * torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    assert direction_loss(pred, target, channels=2).item() == pytest.approx(1.0)
    assert DirectionLoss(weight=0.5)(-target, target).tolist() == pytest.approx([1.0])


def test_direction_loss_equals_torch_cosine_similarity():
    """Values and gradients equal torch's cosine similarity (the per-pixel cosine along C of
    [N, C, p*p] tokens, and over whole tokens), zero vectors included."""
    gen = torch.Generator().manual_seed(3)
    pred = torch.randn(50, 3 * 16, generator=gen, dtype=torch.float64)
    target = torch.randn(50, 3 * 16, generator=gen, dtype=torch.float64)
    pred[0] = 0  # a zero token: cos 0, finite gradients
    target[1, ::16] = 0  # one pixel of token 1 has a zero target

    def reference(p, t, channels):
        if channels is None:
            return 1 - F.cosine_similarity(p, t, dim=-1)
        return 1 - F.cosine_similarity(p.reshape(50, channels, -1), t.reshape(50, channels, -1),
                                       dim=1).mean(-1)

    for channels in (None, 3, 12):
        ours_in = pred.clone().requires_grad_()
        ref_in = pred.clone().requires_grad_()
        ours, ref = direction_loss(ours_in, target, channels), reference(ref_in, target, channels)
        torch.testing.assert_close(ours, ref.float(), rtol=1e-6, atol=1e-6)
        (ours * torch.arange(50.0)).sum().backward()
        (ref * torch.arange(50.0)).sum().backward()
        assert torch.isfinite(ours_in.grad).all()
        torch.testing.assert_close(ours_in.grad, ref_in.grad, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- projector / head
def test_projector_layout_and_init():
    proj = REPAProjector(16, 8, projector_dim=64)
    assert [k for k in proj.state_dict()] == ['0.weight', '0.bias', '2.weight', '2.bias',
                                              '4.weight', '4.bias']
    assert [tuple(proj[i].weight.shape) for i in (0, 2, 4)] == [(64, 16), (64, 64), (8, 64)]
    assert all(torch.count_nonzero(proj[i].bias) == 0 for i in (0, 2, 4))
    bound = (6 / (16 + 64)) ** 0.5  # xavier uniform
    assert proj[0].weight.abs().max() <= bound


def test_head_state_dict_holds_projectors_only_and_copies_share_the_encoder():
    head = MODELS.build(dict(type='REPAHead', encoder=DINO, hidden_size=16, feature_block=2,
                             projector_dim=64))
    assert list(head.state_dict()) == [f'projectors.0.{i}.{n}' for i in (0, 2, 4)
                                       for n in ('weight', 'bias')]
    assert sum(p.numel() for p in head.parameters()) == sum(
        p.numel() for p in head.projectors.parameters())
    ema = copy.deepcopy(head)
    assert ema.encoders[0].net is head.encoders[0].net
    head.double()
    assert next(head.encoders[0].net.parameters()).dtype == torch.float64
    with pytest.raises(ValueError, match='z_dim 7'):
        REPAHead(DINO, hidden_size=16, z_dims=[7])
    with pytest.raises(ValueError, match='1-based'):
        REPAHead(DINO, hidden_size=16, feature_block=0)


def test_head_on_flexdit_features_trains_only_the_blocks_up_to_k():
    model = randomise(FlexDiT(in_channels=4, patch_size=2, hidden_size=16, depth=3,
                              num_heads=2, num_classes=10), std=0.2)
    head = REPAHead(DINO, hidden_size=16, feature_block=2, projector_dim=64)
    latents = [torch.randn(4, 6, 10, generator=torch.Generator().manual_seed(1)),
               torch.randn(4, 4, 4, generator=torch.Generator().manual_seed(2))]
    batch = patchify(latents, 2)
    out, hidden = model(batch, torch.tensor([0.3, 0.7]), torch.tensor([1, 2]),
                        feature_block=head.feature_block)
    loss = head.loss(hidden, head.targets(images(sizes=((48, 80), (32, 32))), batch), batch)
    loss.backward()
    assert -0.5 <= loss.item() <= 0.5
    assert all(p.grad is None for p in model.blocks[2].parameters())
    assert all(p.grad is None for p in model.final_layer.parameters())
    assert model.blocks[1].attn.qkv.weight.grad.abs().sum() > 0
    assert head.projectors[0][4].weight.grad.abs().sum() > 0


def test_training_the_projector_aligns_it_with_a_random_encoder():
    head = REPAHead(DINO, hidden_size=24, feature_block=1, projector_dim=64)
    batch = patchify([torch.zeros(4, 2 * h, 2 * w) for h, w in ((3, 5), (2, 2), (4, 3))], 2)
    pixels = images(seed=4)
    targets = head.targets(pixels, batch)[0]
    g = torch.Generator().manual_seed(0)
    # Hidden tokens carry the encoder features through a fixed random map (plus noise).
    hidden = targets @ torch.randn(32, 24, generator=g) + 0.1 * torch.randn(
        len(targets), 24, generator=g)
    optimizer = torch.optim.Adam(head.parameters(), lr=3e-3)
    before = head.loss(hidden, head.targets(pixels, batch), batch).item()
    losses = []
    for _ in range(30):  # the encoder is frozen: its features are computed once
        loss = head.criterion(head.project(hidden), [targets], batch.seqlens)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    after = head.loss(hidden, head.targets(pixels, batch), batch).item()
    assert abs(before) < 0.1 and after < -0.4  # weight 0.5: -0.5 is perfect alignment
    assert losses[0] == pytest.approx(before, abs=1e-6)
    assert all(b <= a + 1e-3 for a, b in zip(losses[::10], losses[10::10]))


def test_jagged_mean_closed_forms_and_global_normaliser():
    from flexgen.losses.reduction import global_counts, jagged_mean
    values = torch.tensor([1., 2., 3., 4., 5., 6.])
    seqlens = torch.tensor([1, 2, 3])
    assert jagged_mean(values, seqlens, 'token').item() == pytest.approx(21 / 6)
    assert jagged_mean(values, seqlens, 'image').item() == pytest.approx((1 + 2.5 + 5) / 3)
    # With the global count per rank as normaliser, the ranks' mean is the global mean:
    # rank A holds 2 tokens, rank B 4; the whole batch's token mean is 21 / 6.
    a, b = values[:2], values[2:]
    per_rank = (6 + 0.0) / 2
    shares = [jagged_mean(a, torch.tensor([2]), 'token', normalizer=per_rank),
              jagged_mean(b, torch.tensor([4]), 'token', normalizer=per_rank)]
    assert (sum(shares) / 2).item() == pytest.approx(21 / 6)
    assert global_counts(6, 3, 'cpu', distributed=False) == dict(token=6.0, image=3.0)
    with pytest.raises(ValueError, match="reduction must be one of"):
        jagged_mean(values, seqlens, 'pixel')

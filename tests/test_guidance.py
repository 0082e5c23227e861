"""Classifier-free guidance and autoguidance against closed forms with toy networks."""
import math

import pytest
import torch
import torch.nn as nn

from flexgen.fileio import CheckpointError
from flexgen.registry import GUIDANCE
from flexgen.samplers.guidance import AutoGuidance, ClassifierFreeGuidance
from flexgen.structures import TokenBatch

NULL = 10
# two images (2x2 and 1x2 patches), p = 2, 3 latent channels + 3 learned-variance channels
BATCH = TokenBatch(torch.zeros(4 + 2, 12), torch.tensor([[2, 2], [1, 2]]))
LABELS = torch.tensor([1, 2])
WIDTH, AREA = 12, 4  # prediction columns per token (3 channels x 2 x 2), p * p


class Recorder:
    """A fake backbone: output column j of a token = (1 + y) * (j + 1) + t for a class,
    -(j + 1) - t without one (y = NULL); 24 columns (prediction + learned variance)."""

    def __init__(self):
        self.calls = []

    def __call__(self, batch, t, y):
        self.calls.append((batch.num_images, t.clone(), y.clone()))
        columns = torch.arange(1, 25, dtype=torch.float32)
        per_image = torch.where((y == NULL)[:, None], -columns, (1.0 + y[:, None]) * columns)
        return batch.per_token(per_image + t[:, None])


def conditional(t):
    return Recorder()(BATCH, torch.full((2,), t), LABELS)


def unconditional(t):
    return Recorder()(BATCH, torch.full((2,), t), torch.full((2,), NULL))


def test_cfg_scale_one_is_the_conditional_model_in_one_evaluation():
    net = Recorder()
    fn = ClassifierFreeGuidance(scale=1.0).wrap(net, BATCH, LABELS, NULL, WIDTH, AREA)
    out = fn(BATCH.tokens, 0.5)
    assert torch.equal(out, conditional(0.5))
    assert len(net.calls) == 1 and net.calls[0][0] == 2 and torch.equal(net.calls[0][2], LABELS)


def test_cfg_formula_all_channels_variance_unguided():
    net = Recorder()
    fn = ClassifierFreeGuidance(scale=3.0).wrap(net, BATCH, LABELS, NULL, WIDTH, AREA)
    out = fn(BATCH.tokens, 0.5)
    c, u = conditional(0.5), unconditional(0.5)
    assert net.calls[0][0] == 4  # one doubled batch
    assert torch.equal(out[:, :WIDTH], u[:, :WIDTH] + 3.0 * (c[:, :WIDTH] - u[:, :WIDTH]))
    assert torch.equal(out[:, WIDTH:], c[:, WIDTH:])


def test_interval_switches_exactly_at_low_and_high():
    low, high = 0.25, 0.75
    net = Recorder()
    fn = ClassifierFreeGuidance(scale=2.0, interval=(low, high)).wrap(
        net, BATCH, LABELS, NULL, WIDTH, AREA)
    for t, guided in ((math.nextafter(low, 0), False), (low, True), (0.5, True), (high, True),
                      (math.nextafter(high, 1), False)):
        out = fn(BATCH.tokens, t)
        assert (net.calls[-1][0] == 4) == guided, t
        assert torch.equal(out, conditional(t)) != guided, t


def test_channel_subset_leaves_the_other_channels_conditional():
    fn = ClassifierFreeGuidance(scale=4.0, channels=(1,)).wrap(
        Recorder(), BATCH, LABELS, NULL, WIDTH, AREA)
    out, c, u = fn(BATCH.tokens, 0.5), conditional(0.5), unconditional(0.5)
    guided = slice(1 * AREA, 2 * AREA)  # channel 1 = columns 4..7 in (c, p1, p2) order
    assert torch.equal(out[:, guided], u[:, guided] + 4.0 * (c[:, guided] - u[:, guided]))
    keep = torch.ones(24, dtype=torch.bool)
    keep[guided] = False
    assert torch.equal(out[:, keep], c[:, keep])


# ---------------------------------------------------------------------- autoguidance
class Affine(nn.Module):
    """A toy backbone: per-token ``x W + (t + y) b`` (``(batch, t, y)`` like FlexDiT)."""

    def __init__(self, seed, width=WIDTH, out=24):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(width, out, generator=g))
        self.bias = nn.Parameter(torch.randn(out, generator=g))
        self.calls = 0

    def forward(self, batch, t, y):
        self.calls += 1
        return batch.tokens @ self.weight + batch.per_token((t.float() + y)[:, None]) * self.bias


def test_autoguidance_closed_form_interval_and_scale_one():
    main, weak = Affine(0), Affine(1)
    x = torch.randn(6, WIDTH, generator=torch.Generator().manual_seed(2))
    guidance = AutoGuidance(weak, scale=2.5, interval=(0.1, 0.9))
    fn = guidance.wrap(main, BATCH, LABELS, NULL, WIDTH, AREA)
    with torch.no_grad():
        out = fn(x, 0.5)
        m, w = main(BATCH.replace(x), torch.full((2,), 0.5), LABELS), weak(
            BATCH.replace(x), torch.full((2,), 0.5), LABELS)  # both with the class
        assert torch.allclose(out[:, :WIDTH], w[:, :WIDTH] + 2.5 * (m[:, :WIDTH] - w[:, :WIDTH]))
        assert torch.equal(out[:, WIDTH:], m[:, WIDTH:])
        calls = weak.calls
        outside = fn(x, 0.95)
        assert weak.calls == calls  # outside the interval: the main model alone
        assert torch.equal(outside, main(BATCH.replace(x), torch.full((2,), 0.95), LABELS))
        one = AutoGuidance(weak, scale=1.0).wrap(main, BATCH, LABELS, NULL, WIDTH, AREA)
        assert torch.equal(one(x, 0.5), m) and weak.calls == calls
    assert not weak.training and not any(p.requires_grad for p in weak.parameters())
    assert not any(k.startswith('weak') for k in main.state_dict())


TINY = dict(type='FlexDiT', in_channels=3, patch_size=2, hidden_size=32, depth=1,
            num_heads=2, num_classes=4, pos_embed=None, rope=dict(type='AxialRoPE2D'))


def test_autoguidance_from_config_and_checkpoints(tmp_path):
    from safetensors.torch import save_file

    from flexgen.registry import MODELS
    source = MODELS.build(TINY)
    with torch.no_grad():
        for i, p in enumerate(source.parameters()):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    save_file(source.state_dict(), str(tmp_path / 'weak.safetensors'))
    torch.save({'state_dict': {f'backbone.{k}': v for k, v in source.state_dict().items()},
                'meta': {}}, tmp_path / 'generator.pth')
    for name in ('weak.safetensors', 'generator.pth'):
        guidance = GUIDANCE.build(dict(type='AutoGuidance', weak_model=TINY, scale=2.0,
                                       checkpoint=str(tmp_path / name)))
        for a, b in zip(guidance.weak_model.state_dict().values(),
                        source.state_dict().values()):
            assert torch.equal(a, b), name
    torch.save({'state_dict': {'other.weight': torch.zeros(1)}}, tmp_path / 'bad.pth')
    with pytest.raises(CheckpointError, match='bad.pth'):
        AutoGuidance(TINY, checkpoint=str(tmp_path / 'bad.pth'))
    with pytest.raises(TypeError, match='weak_model'):
        AutoGuidance('FlexDiT')
    with pytest.raises(ValueError, match='interval'):
        ClassifierFreeGuidance(scale=2.0, interval=(0.8, 0.2))


def test_generator_samples_with_autoguidance():
    """In DiffusionGenerator.generate: scale 1 equals no guidance; scale 2 with the main
    model as its own weak model changes nothing either (weak = main)."""
    from flexgen.models.generator import DiffusionGenerator
    from flexgen.registry import MODELS
    torch.manual_seed(0)
    model = DiffusionGenerator(backbone=TINY, transport=dict(type='RectifiedFlow'),
                               sampler=dict(type='EulerODE', num_steps=3))
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
    kwargs = dict(labels=[0, 3], sizes=[[8, 8], [4, 8]], seeds=[5, 6])
    plain = model.generate(**kwargs, guidance=None)
    weak = MODELS.build(TINY)
    weak.load_state_dict(model.backbone.state_dict())
    same = model.generate(**kwargs, guidance=AutoGuidance(weak, scale=2.0))
    for a, b in zip(plain, same):
        assert torch.allclose(a, b, atol=1e-6)
    with torch.no_grad():
        for p in weak.parameters():
            p.add_(0.05)
    moved = model.generate(**kwargs, guidance=AutoGuidance(weak, scale=2.0))
    assert all(a.shape == b.shape for a, b in zip(plain, moved))
    assert not torch.allclose(plain[0], moved[0], atol=1e-4)
    one = model.generate(**kwargs, guidance=AutoGuidance(weak, scale=1.0))
    assert all(torch.equal(a, b) for a, b in zip(plain, one))

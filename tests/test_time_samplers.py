"""Training-time samplers of t: moments, the shift's closed form, per-image keyed draws."""
import math

import pytest
import torch

from flexgen.registry import TIME_SAMPLERS, build
from flexgen.rng import KeyedDraws, mix
from flexgen.transports.time_samplers import (DiscreteUniformTime, LogitNormalTime,
                                              ResolutionShiftedTime, ShiftedTime, UniformTime,
                                              time_shift)


def gens(n, offset=0):
    """Keyed draws of images offset .. offset + n - 1 (seed 0, step 0)."""
    return KeyedDraws(mix(0, 0, torch.arange(offset, offset + n)))


def test_draws_depend_on_the_keys_alone():
    for sampler in (UniformTime(), LogitNormalTime(), DiscreteUniformTime(10),
                    ShiftedTime(shift=2.0)):
        t = sampler(gens(5))
        assert torch.equal(t, sampler(gens(5), seqlens=[4, 4, 9, 16, 1]))
        assert torch.equal(t[2:], sampler(gens(3, offset=2)))  # not on the batch
        assert t.shape == (5,) and not torch.equal(t, sampler(gens(5, offset=5)))


def test_time_shift_closed_form():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    for s in (0.3, 1.0, 3.0):
        shifted = time_shift(t, s)
        assert shifted[0] == 0 and shifted[-1] == 1
        # the shift multiplies the odds t / (1 - t) by s (SNR divided by s^2 on the linear path)
        inner = slice(1, -1)
        assert torch.allclose(shifted[inner] / (1 - shifted[inner]), s * t[inner] / (1 - t[inner]))
        assert torch.allclose(time_shift(shifted, 1 / s), t)
    assert time_shift(torch.tensor(0.5), 3.0).item() == pytest.approx(0.75)


def test_discrete_uniform_time_gives_k_over_T():
    T = 8
    t = DiscreteUniformTime(T)(gens(16000))
    k = t * T
    assert torch.equal(k, k.round()) and k.min() == 0 and k.max() == T - 1
    counts = torch.bincount(k.long(), minlength=T).double()
    assert (counts / 16000 - 1 / T).abs().max() < 0.01
    t1000 = DiscreteUniformTime(1000)(gens(5000))
    assert torch.equal((t1000 * 1000).round(), (t1000.double() * 1000).round())
    assert abs(t1000.mean().item() - 999 / 2000) < 0.01
    with pytest.raises(ValueError, match='num_timesteps'):
        DiscreteUniformTime(0)


def test_shifted_uniform_moments_and_median():
    s = 3.0
    t = build(TIME_SAMPLERS, dict(type='ShiftedTime', base=dict(type='UniformTime'),
                                  shift=s))(gens(20000))
    c = s - 1  # E[s u / (1 + c u)] for u ~ U[0, 1]
    assert t.mean().item() == pytest.approx(s / c * (1 - math.log(1 + c) / c), abs=0.005)
    assert t.median().item() == pytest.approx(s * 0.5 / (1 + c * 0.5), abs=0.01)
    assert torch.allclose(t, time_shift(UniformTime()(gens(20000)), s))


def test_shifted_logit_normal_is_logit_normal_with_shifted_mean():
    base = LogitNormalTime(mean=0.2, std=0.8)
    shifted = ShiftedTime(base=base, shift=3.0)(gens(2000))
    plain = base(gens(2000))
    logit = torch.log(shifted / (1 - shifted))
    assert torch.allclose(logit, torch.log(plain / (1 - plain)) + math.log(3.0), atol=1e-4)


def test_resolution_shift_per_image():
    sampler = ResolutionShiftedTime(base=dict(type='UniformTime'), base_tokens=256)
    seqlens = [256, 1024, 64, 4096]
    assert torch.allclose(sampler.shift_for(seqlens),
                          torch.tensor([1.0, 2.0, 0.5, 4.0], dtype=torch.float64))
    t = sampler(gens(4), seqlens=seqlens)
    u = UniformTime()(gens(4))
    assert torch.allclose(t, time_shift(u, torch.tensor([1.0, 2.0, 0.5, 4.0])))
    # an image's draw depends only on its own generator and size, not on the batch
    alone = sampler(gens(1, offset=1), seqlens=torch.tensor([1024]))
    assert alone.item() == pytest.approx(t[1].item(), abs=1e-7)
    flux = ResolutionShiftedTime(rule='exp_linear')
    assert torch.allclose(flux.shift_for([256, 4096, 2176]),
                          torch.tensor([math.exp(0.5), math.exp(1.15), math.exp(0.825)],
                                       dtype=torch.float64))
    sd3 = ResolutionShiftedTime(base_tokens=4096, shift=3.0)  # SD3: 3 at 1024^2 (4096 tokens)
    assert sd3.shift_for([4096, 1024]).tolist() == pytest.approx([3.0, 1.5])
    with pytest.raises(ValueError, match='seqlens'):
        sampler(gens(2))
    with pytest.raises(ValueError, match='rule'):
        ResolutionShiftedTime(rule='log')


def test_large_images_train_at_higher_noise():
    sampler = ResolutionShiftedTime(base=dict(type='LogitNormalTime'))
    small = sampler(gens(4000), seqlens=[64] * 4000)
    large = sampler(gens(4000), seqlens=[4096] * 4000)
    # logit shifts by log(shift): log(sqrt(64/256)) = -log 2, log(sqrt(4096/256)) = log 4
    assert torch.allclose(torch.logit(large.double()) - torch.logit(small.double()),
                          torch.full((4000,), math.log(8.0), dtype=torch.float64), atol=1e-3)

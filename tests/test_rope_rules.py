"""RoPE extrapolation rules: each rule against its closed form (written out here with numpy,
independently of flexgen), against the tables the reference code used (copied from the
golden fixtures), and the invariants every rule must keep."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import flexgen.position_encodings.rope  # noqa: F401  (registers the rules)
from flexgen.position_encodings.rope import AxialRoPE2D, apply_rotary
from flexgen.registry import POSITION_ENCODINGS
from flexgen.structures import TokenBatch

THETA = 10000.0
RULES = ['Extrapolation', 'PositionInterpolation', 'NTKAware', 'DynamicNTK', 'NTKByParts',
         'YaRN', 'NTKPro1', 'NTKPro2', 'ProportionScale1', 'ProportionScale2']
PROPORTIONAL = {'NTKPro1', 'NTKPro2', 'ProportionScale1', 'ProportionScale2'}
TABLES = json.loads((Path(__file__).parent / 'fixtures' / 'rope_reference_tables.json')
                    .read_text())


# ---------------------------------------------------------------- closed forms (numpy)
def np_base(d, theta=THETA):
    return np.array([theta ** (-2.0 * i / d) for i in range(d // 2)])


def np_ntk(d, s, theta=THETA):
    return np.array([(theta * s ** (d / (d - 2.0))) ** (-2.0 * i / d) for i in range(d // 2)])


def np_ramp(beta_lo, beta_hi, d, L, theta=THETA):
    """YaRN's ramp from the rotation counts: r(b) = d ln(L/(2 pi b)) / (2 ln theta)."""
    r = lambda b: d * np.log(L / (2 * np.pi * b)) / (2 * np.log(theta))  # noqa: E731
    lo, hi = max(int(np.floor(r(beta_lo))), 0), min(int(np.ceil(r(beta_hi))), d - 1)
    if lo == hi:
        hi = hi + 0.001
    return np.clip((np.arange(d // 2) - lo) / (hi - lo), 0.0, 1.0)


def np_yarn(d, s, L):
    m = 1 - np_ramp(32, 1, d, L)
    return np_base(d) / s * (1 - m) + np_base(d) * m


def np_partntk(d, s, L):
    m1, m2 = 1 - np_ramp(1.25, 0.75, d, L), 1 - np_ramp(16, 2, d, L)
    f = np_base(d) / s * (1 - m1) + np_ntk(d, s) * m1
    return f * (1 - m2) + np_base(d) * m2


def scale(x, L):
    return max(x / L, 1.0)


def rope_for(rule, head_dim=32, **kwargs):
    return AxialRoPE2D(head_dim, rule=rule, **kwargs).eval()


def make_batch(sizes):
    sizes = torch.tensor(sizes)
    return TokenBatch(torch.zeros(int(sizes.prod(1).sum()), 1), sizes)


def close(a, b, rtol=1e-12):
    np.testing.assert_allclose(np.asarray(a, dtype=np.float64), np.asarray(b), rtol=rtol,
                               atol=0)


# ---------------------------------------------------------------- closed forms
@pytest.mark.parametrize('decouple', [False, True])
@pytest.mark.parametrize('hw', [(10, 14), (24, 40), (40, 12)])
def test_frequency_rules_match_closed_forms(decouple, hw):
    d, L = 36, 16
    h, w = hw
    s_h, s_w = ((scale(h, L), scale(w, L)) if decouple
                else (scale(max(h, w), L),) * 2)
    expected = {
        'Extrapolation': lambda s: np_base(d),
        'PositionInterpolation': lambda s: np_base(d) / s,
        'NTKAware': lambda s: np_ntk(d, s),
        'DynamicNTK': lambda s: np_ntk(d, s),
        'NTKByParts': lambda s: np_partntk(d, s, L),
        'YaRN': lambda s: np_yarn(d, s, L),
        'NTKPro1': lambda s: np_ntk(d, s),
        'NTKPro2': lambda s: np_ntk(d, s),
        'ProportionScale1': lambda s: np_base(d),
        'ProportionScale2': lambda s: np_base(d),
    }
    for name in RULES:
        rope = rope_for(dict(type=name, ori_max_pe_len=L, decouple=decouple), head_dim=2 * d)
        rows, cols, _ = rope.frequencies(h, w)
        close(rows, expected[name](s_h))
        close(cols, expected[name](s_w))


def test_ntk_keeps_the_highest_and_divides_the_lowest_frequency_by_s():
    rows, _, _ = rope_for(dict(type='NTKAware', ori_max_pe_len=16), head_dim=72).frequencies(20, 20)
    base = np_base(36)
    assert rows[0].item() == 1.0
    close(rows[-1] / base[-1], 1 / 1.25)
    # the reference note's ratios for FiT-XL (d = 36) at s = 1.25
    close((rows / torch.from_numpy(base))[[1, 2]], [1.25 ** (-2 / 34), 1.25 ** (-4 / 34)])


def test_dynamic_ntk_factor_follows_hf_formula():
    d, L, factor, l = 16, 8, 2.0, 14
    rows, cols, _ = rope_for(dict(type='DynamicNTK', ori_max_pe_len=L, factor=factor)
                             ).frequencies(10, l)
    theta = THETA * ((factor * l / L) - (factor - 1)) ** (d / (d - 2))
    close(rows, [theta ** (-2 * i / d) for i in range(d // 2)])
    close(cols, rows)
    inside, _, _ = rope_for(dict(type='DynamicNTK', ori_max_pe_len=L, factor=3.0)).frequencies(8, 5)
    close(inside, np_base(d))


def test_yarn_and_partntk_concrete_values_from_the_reference_note():
    """FiT-XL (d = 36), L = 16: YaRN's ramp is (0, 2), NTK-by-parts' are (1, 3) and (0, 1)."""
    base = torch.from_numpy(np_base(36))
    yarn, _, _ = rope_for(dict(type='YaRN', ori_max_pe_len=16), head_dim=72).frequencies(32, 32)
    lin = base / 2
    close(yarn[0], base[0])
    close(yarn[1], (base[1] + lin[1]) / 2)
    close(yarn[2:], lin[2:])
    parts, _, _ = rope_for(dict(type='NTKByParts', ori_max_pe_len=16), head_dim=72
                           ).frequencies(32, 32)
    np.testing.assert_allclose((parts / base)[:5].numpy(), [1.0, 0.96, 0.7108, 0.5, 0.5],
                               atol=5e-5)


@pytest.mark.parametrize('s,mscale', [(1.25, 1.0223), (2.0, 1.0693), (4.0, 1.1386), (0.5, 1.0)])
def test_yarn_temperature(s, mscale):
    rope = rope_for(dict(type='YaRN', ori_max_pe_len=16, decouple=True))
    side = int(16 * s)
    # never decoupled: the longer side decides, whatever the shorter one is
    factor = rope.frequencies(side, 3)[2]
    assert factor == pytest.approx(1.0 if s <= 1 else 0.1 * math.log(s) + 1, abs=1e-12)
    assert factor == pytest.approx(mscale, abs=1e-4)
    assert rope.frequencies(3, side)[2] == factor


@pytest.mark.parametrize('hw,p1,p2', [((20, 20), 1.1535, 1.0979), ((32, 32), 1.2247, 1.1726),
                                      ((10, 20), 1.1535, 1.0395), ((64, 16), 1.3229, 1.1726),
                                      ((16, 16), 1.1180, 1.0607), ((8, 8), 1.0, 1.0)])
def test_proportional_factors(hw, p1, p2):
    h, w, L = hw[0], hw[1], 16
    closed1 = 1.0 if 2 * max(h, w) <= L else math.sqrt(math.log(2 * max(h, w)) / math.log(L))
    closed2 = 1.0 if 2 * h * w <= L * L else math.sqrt(math.log(2 * h * w) / math.log(L * L))
    for name, closed, quoted in [('NTKPro1', closed1, p1), ('ProportionScale1', closed1, p1),
                                 ('NTKPro2', closed2, p2), ('ProportionScale2', closed2, p2)]:
        factor = rope_for(dict(type=name, ori_max_pe_len=L)).frequencies(h, w)[2]
        assert factor == pytest.approx(closed, abs=1e-12)
        assert factor == pytest.approx(quoted, abs=1e-4)


def test_proportional_without_the_reference_doubling():
    rope = rope_for(dict(type='NTKPro1', ori_max_pe_len=16, length_multiplier=1))
    assert rope.frequencies(16, 16)[2] == 1.0
    assert rope.frequencies(32, 8)[2] == pytest.approx(math.sqrt(math.log(32) / math.log(16)))


def test_factor_multiplies_attention_logits_by_its_square():
    """What attention must do with a rule's temperature: nothing beyond rotating q and k
    with the returned cos / sin: the logits come out multiplied by factor^2."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(6, 2, 32, generator=g), torch.randn(6, 2, 32, generator=g)
    batch = make_batch([[2, 3]])
    plain = AxialRoPE2D(32)(batch)
    rope = rope_for(dict(type='ProportionScale2', ori_max_pe_len=2))  # plain freqs, factor p2
    p2 = math.sqrt(math.log(2 * 6) / math.log(4))
    scaled = rope(batch)
    logits = lambda cs: torch.einsum('nhd,mhd->hnm', apply_rotary(q, *cs),  # noqa: E731
                                     apply_rotary(k, *cs))
    torch.testing.assert_close(logits(scaled), logits(plain) * p2 ** 2)
    torch.testing.assert_close(rope.attention_factors(batch), torch.tensor([p2]))


# ---------------------------------------------------------------- the reference's own tables
def test_tables_equal_the_reference_fit_tables():
    for case in TABLES['fit']:
        rule = (None if case['custom_freqs'] == 'normal' else
                dict(type=case['custom_freqs'], ori_max_pe_len=case['ori_max_pe_len'],
                     decouple=case['decouple']))
        rope = rope_for(rule)
        if case['online']:
            for (h, w), fh, fw in zip(case['sizes'], case['freqs_h'], case['freqs_w']):
                rows, cols, factor = rope.frequencies(h, w)
                np.testing.assert_allclose(rows, fh, rtol=1e-6)
                np.testing.assert_allclose(cols, fw, rtol=1e-6)
            continue
        rows, cols, factor = rope.frequencies(*(v or 1 for v in case['max_pe_len']))
        np.testing.assert_allclose(rows, case['freqs_h'], rtol=1e-6, err_msg=str(case))
        np.testing.assert_allclose(cols, case['freqs_w'], rtol=1e-6, err_msg=str(case))
        assert factor == pytest.approx(case['attn_factor'], rel=1e-6)


def test_nit_legacy_positions_equal_the_reference_grid():
    for case in TABLES['nit']:
        batch = make_batch(case['hw_list'])
        rope = AxialRoPE2D(16, layout='nit', index_mode='nit_legacy')
        pos = rope.positions(batch)
        # layout 'nit': the first half rotates with the column, the second with the row
        assert pos[:, 1].tolist() == case['rope_grid'][0]
        assert pos[:, 0].tolist() == case['rope_grid'][1]


# ---------------------------------------------------------------- invariants of every rule
@pytest.mark.parametrize('name', RULES)
def test_inside_the_training_grid_every_rule_is_plain_rope(name):
    L = 8
    rope = rope_for(dict(type=name, ori_max_pe_len=L, decouple=True))
    plain = AxialRoPE2D(32)
    # up to half the training side: everything equal, bit for bit
    batch = make_batch([[4, 4], [2, 3], [1, 4]])
    for a, b in zip(rope(batch), plain(batch)):
        assert torch.equal(a, b)
    # up to the full side the frequencies stay plain; only the proportional rules'
    # doubled length (the reference quirk) gives a factor above 1
    base = plain.base_frequencies('cpu').double()
    for hw in [(8, 8), (5, 8), (8, 6)]:
        rows, cols, factor = rope.frequencies(*hw)
        assert torch.equal(rows.float(), base.float()) and torch.equal(cols.float(), base.float())
        assert (factor > 1) == (name in PROPORTIONAL)


@pytest.mark.parametrize('name', RULES)
def test_decouple_with_equal_sides_equals_coupled(name):
    coupled = rope_for(dict(type=name, ori_max_pe_len=8, decouple=False))
    decoupled = rope_for(dict(type=name, ori_max_pe_len=8, decouple=True))
    for side in (8, 13, 30):
        for a, b in zip(coupled.frequencies(side, side), decoupled.frequencies(side, side)):
            assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))


@pytest.mark.parametrize('name', ['NTKAware', 'YaRN', 'NTKPro2', 'NTKByParts'])
def test_mixed_batch_equals_each_image_alone(name):
    rope = rope_for(dict(type=name, ori_max_pe_len=4, decouple=True))
    sizes = [[3, 3], [6, 2], [5, 9], [6, 2], [2, 7]]
    cos, sin = rope(make_batch(sizes))
    alone = [rope_for(dict(type=name, ori_max_pe_len=4, decouple=True))(make_batch([s]))
             for s in sizes]
    assert torch.equal(cos, torch.cat([a[0] for a in alone]))
    assert torch.equal(sin, torch.cat([a[1] for a in alone]))
    # the images really got different tables (targets are per image)
    assert not torch.equal(alone[2][0][:4], alone[0][0][:4])


def test_tables_computed_once_per_distinct_size():
    rope = rope_for(dict(type='YaRN', ori_max_pe_len=4))
    calls = []
    original = rope.rule.tables
    rope.rule.tables = lambda *a: calls.append(a[:2]) or original(*a)
    batch = make_batch([[5, 6], [2, 2], [5, 6], [6, 5], [2, 2]])
    rope(batch)
    rope(batch)
    assert sorted(calls) == [(2, 2), (5, 6), (6, 5)]


def test_fixed_max_pe_len_scales_every_image_alike():
    rule = dict(type='YaRN', ori_max_pe_len=4, decouple=True)
    fixed = rope_for(rule, max_pe_len=(10, 14))
    batch = make_batch([[3, 3], [10, 14]])
    cos, sin = fixed(batch)
    # equal to a per-image rope whose images all have the fixed size, at the same positions
    per_image = rope_for(rule)
    ref_cos, ref_sin = per_image(make_batch([[10, 14]]))
    positions = batch.positions
    index = positions[:, 0] * 14 + positions[:, 1]
    assert torch.equal(cos, ref_cos[index]) and torch.equal(sin, ref_sin[index])
    # bare positions work with a fixed target, and need one otherwise
    assert torch.equal(fixed(positions)[0], cos)
    with pytest.raises(ValueError, match='max_pe_len'):
        per_image(positions)


def test_rule_acts_in_training_only_when_asked():
    rule = dict(type='NTKAware', ori_max_pe_len=4, decouple=True)
    batch = make_batch([[6, 8], [3, 3]])
    plain = AxialRoPE2D(32)(batch)
    sampling = rope_for(rule)(batch)
    training = AxialRoPE2D(32, rule=rule).train()(batch)
    online = AxialRoPE2D(32, rule=rule, scale_in_training=True).train()(batch)
    assert torch.equal(training[0], plain[0])
    assert torch.equal(online[0], sampling[0]) and not torch.equal(online[0], plain[0])


def test_angles_stay_float32_whatever_the_model_dtype():
    rope = rope_for(dict(type='YaRN', ori_max_pe_len=4))
    batch = make_batch([[9, 7]])
    before = rope(batch)
    rope.to(torch.bfloat16)
    after = rope(batch)
    assert after[0].dtype == torch.float32
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    assert not any(b.is_floating_point() for b in rope.buffers())


def test_rule_configs_and_reference_names():
    ntk = rope_for(dict(type='dynntk', ori_max_pe_len=16, decouple=True))
    assert type(ntk.rule).__name__ == 'NTKAware' and ntk.rule.decouple
    for ref, name in [('linear', 'PositionInterpolation'), ('partntk', 'NTKByParts'),
                      ('ntk-aware-pro2', 'NTKPro2'), ('scale1', 'ProportionScale1'),
                      ('normal', 'Extrapolation'), ('yarn', 'YaRN')]:
        assert type(rope_for(dict(type=ref, ori_max_pe_len=16)).rule).__name__ == name
    built = POSITION_ENCODINGS.build(dict(type='AxialRoPE2D', head_dim=16, layout='nit',
                                          rule=dict(type='YaRN', ori_max_pe_len=16)))
    assert built.layout == 'nit' and type(built.rule).__name__ == 'YaRN'
    with pytest.raises(KeyError, match='position encoding'):
        rope_for(dict(type='Yarn2', ori_max_pe_len=16))
    with pytest.raises(ValueError, match='ori_max_pe_len is required'):
        rope_for(dict(type='YaRN'))
    # Plain extrapolation needs no training length ('no' / --interpolation no): plain RoPE.
    plain = rope_for(dict(type='no', decouple=True))
    rows, cols, factor = plain.rule.tables(24, 40, 8, 10000.0)
    assert torch.equal(rows, cols) and factor == 1.0
    assert torch.equal(rows, plain.rule.tables(2, 2, 8, 10000.0)[0])
    with pytest.raises(ValueError, match='layout'):
        AxialRoPE2D(16, layout='lumina')
    with pytest.raises(ValueError, match='index_mode'):
        AxialRoPE2D(16, index_mode='colrow')
    with pytest.raises(TypeError, match='not a RoPE extrapolation rule'):
        rope_for(dict(type='SinCos2D', dim=8))

"""Keyed draws: pinned values (a refactor of the hash or of Box-Muller must not move
anyone's noise, time or label drops: resumed and re-run trainings rely on it)."""
import torch

from flexgen import rng
from flexgen.rng import KeyedDraws, mix


def _draws():
    return KeyedDraws(mix(7, 3, torch.arange(4)))


def test_draws_are_pinned():
    draws = _draws()
    # Uniforms are integer hashes turned into floats: exact on every machine.
    assert draws.uniform('time').tolist() == [
        0.3865019381046295, 0.04185476899147034, 0.9151400327682495, 0.24442586302757263]
    assert draws.uniform('time', torch.float64).tolist() == [
        0.3865019226213917, 0.04185478750150651, 0.9151400813134387, 0.24442588270176202]
    # Normals go through log / cos / sin, whose last bit may differ between CPUs.
    normals = torch.tensor([-0.6239481568336487, -0.17608755826950073, 1.209867000579834,
                            -0.8472684025764465])
    torch.testing.assert_close(draws.normal('noise'), normals, rtol=0, atol=1e-6)
    ids, local = torch.tensor([0, 0, 1, 2, 2, 2]), torch.tensor([0, 1, 0, 0, 1, 2])
    tokens = draws.normal_tokens('noise', ids, local, 3)
    expected = torch.tensor([
        [-0.6239481568336487, -1.5237932205200195, -1.0304619073867798],
        [-1.0644525289535522, 0.06543897092342377, -0.538824737071991],
        [-0.17608755826950073, 0.8496773838996887, -2.204899549484253],
        [1.209867000579834, 0.46433842182159424, 1.1926100254058838],
        [-0.7224743962287903, 0.22967936098575592, -0.9729931354522705],
        [-0.7907567024230957, 0.9853194355964661, 0.9106693863868713]])
    torch.testing.assert_close(tokens, expected, rtol=0, atol=1e-6)
    # A token's first normal is its image's per-key normal of the same stream (counter 0).
    assert torch.equal(tokens[local == 0, 0], draws.normal('noise')[:3])


def test_a_draw_hashes_its_stream_key_once(monkeypatch):
    calls = []

    def counted(*keys):
        calls.append(keys)
        return mix(*keys)

    monkeypatch.setattr(rng, 'mix', counted)
    draws = _draws()
    draws.normal('noise')
    draws.normal_tokens('noise', torch.tensor([0, 1]), torch.tensor([0, 0]), 5)
    draws.uniform('time')
    assert len(calls) == 3

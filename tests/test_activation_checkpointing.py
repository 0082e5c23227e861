"""Activation checkpointing of named modules (a config's ``activation_checkpointing``):
non-reentrant, the same gradients and training as without it."""
import warnings

import pytest
import torch
import torch.nn as nn
from mmengine.config import Config
from mmengine.hooks import EMAHook

from flexgen.engine.activation_checkpointing import turn_on_activation_checkpointing
from flexgen.engine.runner import FlexRunner

from test_engine import hook, runner_cfg


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(6, 6)

    def forward(self, x, scale=1.0):
        return torch.tanh(self.linear(x)) * scale


def _grads(model, x):
    model.zero_grad()
    model(x, scale=0.5).pow(2).sum().backward()
    return [p.grad.clone() for p in model.parameters()]


def test_frozen_input_still_gives_the_module_its_gradients():
    """The first block after a frozen embedding: its input needs no gradient. Reentrant
    checkpointing (mmengine's wrapper) gives its parameters none; this one gives the
    plain module's, and passes keyword arguments through."""
    torch.manual_seed(0)
    plain, checkpointed = _Block(), _Block()
    checkpointed.load_state_dict(plain.state_dict())
    turn_on_activation_checkpointing(checkpointed, 'linear')
    x = torch.randn(5, 6)  # requires_grad=False
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # neither the reentrant deprecation nor "no grad"
        got = _grads(checkpointed, x)
    for a, b in zip(got, _grads(plain, x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_unknown_module_is_named():
    with pytest.raises(ValueError, match=r"'blocks\.7'.*_Block"):
        turn_on_activation_checkpointing(_Block(), ['blocks.7'])


def test_runner_checkpoints_the_named_modules_and_trains_the_same(tmp_path):
    def run(name, **extra):
        runner = FlexRunner.from_cfg(Config(dict(runner_cfg(tmp_path / name, 3), **extra)))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            runner.train()
        assert not [w for w in caught if 'use_reentrant' in str(w.message)]
        return runner

    plain = run('plain')
    checkpointed = run('checkpointed', activation_checkpointing=['net'])
    assert 'forward' in vars(checkpointed.model.net)  # wrapped, by flexgen
    assert checkpointed.cfg.activation_checkpointing == ['net']  # the config is kept
    for a, b in ((plain.model, checkpointed.model),
                 (hook(plain, EMAHook).ema_model, hook(checkpointed, EMAHook).ema_model)):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), name

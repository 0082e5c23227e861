import pytest
import torch

import flexgen
from flexgen.registry import MODELS, SAMPLERS, TRANSPORTS


def test_unknown_type_names_registry_and_closest_names():
    flexgen.register_all_modules()
    with pytest.raises(KeyError) as error:
        MODELS.build(dict(type='FlexDit', in_channels=3))
    message = str(error.value)
    assert "'model' registry of scope 'flexgen'" in message
    assert "'FlexDiT'" in message
    with pytest.raises(KeyError, match="'sampler' registry.*'EulerODE'"):
        SAMPLERS.build(dict(type='EulerOde'))


def test_unknown_type_through_mmengine_root_registry():
    """The Runner builds through mmengine's root registries with default scope 'flexgen'."""
    from mmengine.registry import MODELS as ROOT_MODELS
    flexgen.register_all_modules()
    with pytest.raises(KeyError, match="Closest registered names: 'DiffusionGenerator'"):
        ROOT_MODELS.build(dict(type='DiffusionGenerater'))


def test_misspelled_argument_suggests_the_field():
    with pytest.raises(TypeError, match="Did you mean 'num_steps'.*EulerODE"):
        SAMPLERS.build(dict(type='EulerODE', num_step=10))


def test_registered_modules_build():
    transport = TRANSPORTS.build(dict(type='RectifiedFlow'))
    x0, noise = torch.ones(2, 3), torch.zeros(2, 3)
    assert torch.equal(transport.interpolate(x0, noise, torch.full((2, 1), 0.25)),
                       torch.full((2, 3), 0.75))
    assert 'RectifiedFlow' in TRANSPORTS and 'Nope' not in TRANSPORTS

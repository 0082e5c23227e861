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


def test_build_errors_name_the_config_that_failed():
    """A config key that does not fit a constructor is reported for that config's class,
    however deep it is nested; what a constructor raises itself passes through unchanged."""
    flexgen.register_all_modules()
    backbone = dict(type='FlexDiT', in_channels=3, patch_size=2, hidden_size=32, depth=1,
                    num_heads=2, num_classes=4)
    with pytest.raises(TypeError) as error:
        MODELS.build(dict(backbone, block=dict(type='AdaLNZeroBlock', qkv_biass=False)))
    message = str(error.value)
    assert message.startswith("`AdaLNZeroBlock` (model registry): unexpected argument "
                              "'qkv_biass'. Did you mean 'qkv_bias'?")
    assert 'FlexDiT' not in message
    with pytest.raises(TypeError, match=r"^`FlexDiT` \(model registry\): unexpected argument "
                                        r"'depht'\. Did you mean 'depth'\?"):
        MODELS.build(dict(backbone, depht=2))
    with pytest.raises(TypeError, match=r"`FlexDiT` \(model registry\): missing argument "
                                        r"'num_heads'\. `FlexDiT` accepts: in_channels, "):
        MODELS.build({k: v for k, v in backbone.items() if k != 'num_heads'})

    def helper(count):
        return count

    class Broken:
        def __init__(self, size=1):
            helper(size=size)  # a bug inside the class, not a config typo

    MODELS.register_module('_TestRegistryBroken', module=Broken, force=True)
    with pytest.raises(TypeError) as error:
        MODELS.build(dict(type='_TestRegistryBroken', size=2))
    assert str(error.value).endswith("helper() got an unexpected keyword argument 'size'")
    assert 'Broken' not in str(error.value).split('helper')[0]

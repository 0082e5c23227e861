"""A checkpoint converter written only from its contract (flexgen.models.converters.base)
is found by ``matches`` and loads through ``load_official`` like the reference ones."""
import os.path as osp

import pytest
import torch
from helpers import ROOT, randomise
from mmengine.config import Config

import flexgen
from flexgen.apis.official import build_converter, convert_for_config, load_official
from flexgen.models.converters import CheckpointConverter, ConvertedCheckpoint
from flexgen.registry import CHECKPOINT_CONVERTERS, MODELS
from flexgen.structures import patchify

flexgen.register_all_modules()
PREFIX = '_contract_reference.'


@CHECKPOINT_CONVERTERS.register_module(name='_ContractReference', force=True)
class PrefixedConverter(CheckpointConverter):
    """A made-up reference that stores FlexDiT's tensors under a prefix, with its width and
    depth only in the shapes."""

    name = '_ContractReference'

    def matches(self, checkpoint):
        return isinstance(checkpoint, dict) and bool(checkpoint) and \
            all(isinstance(k, str) and k.startswith(PREFIX) for k in checkpoint)

    def __call__(self, checkpoint, use_ema=True):
        if not self.matches(checkpoint):
            raise KeyError(f'{self.name} converter: keys do not start with {PREFIX!r}')
        state = {k[len(PREFIX):]: v for k, v in checkpoint.items()}
        depth = 1 + max(int(k.split('.')[1]) for k in state if k.startswith('blocks.'))
        return ConvertedCheckpoint(state, dict(hidden_size=state['x_embedder.proj.weight'].shape[0],
                                               depth=depth), dict(source='prefixed'))


def test_a_converter_from_the_contract_is_matched_and_loads():
    cfg = Config.fromfile(osp.join(ROOT, 'tests', 'configs', 'tiny_generator.py'))
    torch.manual_seed(0)
    original = randomise(MODELS.build(cfg.model)).eval()
    reference = {PREFIX + k: v for k, v in original.backbone.state_dict().items()}

    converted = convert_for_config(cfg, reference)  # no converter named: matches() chose
    assert isinstance(converted, ConvertedCheckpoint) and converted.info == dict(source='prefixed')
    model = load_official(cfg, reference)
    assert model.official_info == dict(source='prefixed')
    g = torch.Generator().manual_seed(1)
    batch = patchify([torch.randn(3, 8, 12, generator=g), torch.randn(3, 4, 4, generator=g)], 2)
    t, y = torch.tensor([0.3, 0.8], dtype=torch.float64), torch.tensor([1, 6])
    with torch.no_grad():
        assert torch.equal(model.backbone(batch, t, y), original.backbone(batch, t, y))
    # the settings it derives are checked against the config
    with pytest.raises(ValueError, match=r'model.backbone.depth is 2, the checkpoint needs 3'):
        convert_for_config(cfg, {PREFIX + 'blocks.2.x': torch.zeros(1), **reference})
    assert build_converter(PrefixedConverter()).name == '_ContractReference'
    with pytest.raises(TypeError, match='CheckpointConverter, got function'):
        build_converter(lambda checkpoint, use_ema=True: None)

"""tools/memory_plan.py's numbers: parameter and optimizer bytes against closed forms and a
real AdamW, activations per token against the saved tensors of the whole autograd graph of
a full-depth model (found by walking the graph, not by the planner's hooks)."""
import copy
import importlib.util
import os.path as osp

import pytest
import torch
from mmengine.config import Config

import flexgen
from flexgen.registry import MODELS
from flexgen.utils.memory_plan import (Setup, _training_forward, configured_setup,
                                       count_parameters, measure_activations, plan_memory,
                                       tokens_per_gpu)
from test_configs_dit_sit import official_dit_parameters

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
flexgen.register_all_modules()

TINY_DIT = dict(backbone=dict(
    type='FlexDiT', in_channels=4, patch_size=2, hidden_size=64, depth=3, num_heads=4,
    num_classes=10, learn_sigma=True, mlp_ratio=4.0, pos_embed=dict(type='SinCos2D')))


def test_parameter_and_optimizer_bytes_are_their_closed_forms():
    counts = count_parameters(TINY_DIT)
    grid = 8  # any: flexgen computes the sin-cos table, the reference stores [T, D]
    params = official_dit_parameters(3, 64, 2, grid, 4, True, 10, 4.0) - grid * grid * 64
    assert counts.params == counts.trainable == params
    assert counts.depth == 3 and counts.root == params - 3 * counts.block
    assert counts.block == 6 * 64 * 64 + 6 * 64 + 3 * 64 * 64 + 3 * 64 + 64 * 64 + 64 \
        + 2 * 4 * 64 * 64 + 4 * 64 + 64  # adaLN, qkv, proj, MLP

    act = measure_activations(TINY_DIT, 'float32', grids=((4, 4), (8, 8)))
    ddp = plan_memory(counts, act, 512, 8, Setup(compute_dtype='float32'))
    fsdp = plan_memory(counts, act, 512, 8, Setup(wrapper='fsdp', compute_dtype='float32',
                                                  fused_optimizer=True))
    assert ddp.parts['weights'] == ddp.parts['gradients'] == ddp.parts['buckets'] == 4 * params
    assert ddp.parts['optimizer'] == 8 * params and ddp.parts['step'] == 4 * params
    assert ddp.parts['ema'] == 4 * params + counts.buffer_bytes
    assert fsdp.parts['weights'] == 4 * params / 8 and fsdp.parts['optimizer'] == params
    assert fsdp.parts['buckets'] == fsdp.parts['step'] == 0
    assert fsdp.peak < ddp.peak

    # AdamW's real state after one step: two float32 moments per parameter (+ 0-d steps).
    torch.manual_seed(0)
    model = MODELS.build(copy.deepcopy(TINY_DIT['backbone']))
    optimizer = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    moments = sum(v.numel() * v.element_size() for s in optimizer.state.values()
                  for k, v in s.items() if k != 'step')
    assert moments == ddp.parts['optimizer']


def graph_saved_bytes(loss) -> int:
    """Every tensor the autograd graph of ``loss`` keeps (``grad_fn._saved_*``), each
    storage once: what the backward will read."""
    storages, seen, stack = {}, set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for name in dir(node):
            if name.startswith('_saved_'):
                value = getattr(node, name)
                for t in value if isinstance(value, (tuple, list)) else [value]:
                    if isinstance(t, torch.Tensor):
                        storage = t.untyped_storage()
                        storages[storage.data_ptr()] = storage.nbytes()
        stack.extend(fn for fn, _ in node.next_functions)
    return sum(storages.values())


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_activation_measure_equals_the_full_models_graph(dtype):
    """Per token, one measured block x depth + the rest is what the autograd graph of the
    full-depth model keeps, at other token counts than the ones measured."""
    act = measure_activations(TINY_DIT, dtype, grids=((4, 4), (8, 8)))
    torch.manual_seed(0)
    model = MODELS.build(copy.deepcopy(TINY_DIT['backbone']))
    saved = []
    for grid in ((6, 6), (12, 10)):
        loss = _training_forward(model, None, None, grid, 3, dtype)
        saved.append((3 * grid[0] * grid[1], graph_saved_bytes(loss)))
    (n1, b1), (n2, b2) = saved
    direct = (b2 - b1) / (n2 - n1)
    planned = 3 * act.block + act.rest
    assert abs(planned - direct) <= 0.01 * direct, (planned, direct)
    assert act.checkpointed < act.block / 5  # a checkpointed block keeps its inputs only


def test_configs_are_read_as_they_train():
    fit = Config.fromfile(osp.join(ROOT, 'configs', 'fit', 'fitv2_3b_2.py'))
    assert tokens_per_gpu(fit) == 16 * 256  # padded to 256 tokens, 16 images per GPU
    setup = configured_setup(fit)
    assert (setup.wrapper, setup.compute_dtype, setup.fused_optimizer) == ('fsdp', 'bfloat16',
                                                                           True)
    nit = Config.fromfile(osp.join(ROOT, 'configs', 'nit', 'nit_xl_pack_16384.py'))
    assert tokens_per_gpu(nit) == 16384
    assert configured_setup(nit).compute_dtype == 'bfloat16'
    dit = Config.fromfile(osp.join(ROOT, 'configs', 'dit', 'dit_xl_2_256.py'))
    assert tokens_per_gpu(dit) == 32 * (256 // 8 // 2) ** 2
    assert configured_setup(dit) == Setup(compute_dtype='float32')


def test_memory_plan_tool_says_what_fits(capsys):
    spec = importlib.util.spec_from_file_location(
        'flexgen_tool_memory_plan', osp.join(ROOT, 'tools', 'memory_plan.py'))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    path = osp.join(ROOT, 'configs', 'dit', 'dit_s_2_256.py')
    tool.main([path, '--gpus', '2', '--gpu-memory', '1', '--cfg-options',
               'model.backbone.depth=4'])
    out = capsys.readouterr().out
    # 1 GiB: the configured run does not fit, sharding and checkpointing do
    assert 'DDP + float32' in out and '-> switch on: FSDP' in out

"""Bad input, as a table: each case is an input a user can give, the error it must raise
and the words that error must say. None of them may pass silently, lose a checkpoint or
advise turning a safety off."""
import os
import os.path as osp
import uuid

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import flexgen
from flexgen.apis import init_generator
from flexgen.fileio import CheckpointError, read_checkpoint
from helpers import load_tool

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TOY = osp.join(ROOT, 'tests', 'configs', 'toy_train.py')
SHAPES = osp.join(ROOT, 'tests', 'configs', 'tiny_shapes_ema.py')
flexgen.register_all_modules()


train_tool, test_tool = load_tool('train'), load_tool('test')


def train_toy(work_dir, *options):
    return train_tool.main([TOY, '--work-dir', str(work_dir), '--cfg-options',
                            f'experiment_name=bad_{uuid.uuid4().hex[:8]}', *options])


@pytest.fixture(scope='module')
def toy_run(tmp_path_factory):
    """A toy model trained 8 steps by the Runner (checkpoints at 4 and 8)."""
    work_dir = tmp_path_factory.mktemp('toy')
    train_toy(work_dir)
    return work_dir


@pytest.fixture(scope='module')
def shapes_model():
    torch.manual_seed(0)
    return init_generator(SHAPES)


# ----------------------------------------------------------------------------- the cases
def generate_label_too_large(tmp_path, shapes_model, toy_run):
    shapes_model.generate([6], [(16, 16)], seeds=[0])


def generate_negative_label(tmp_path, shapes_model, toy_run):
    shapes_model.generate([-1], [(16, 16)], seeds=[0])


def generate_fewer_seeds_than_labels(tmp_path, shapes_model, toy_run):
    shapes_model.generate([0, 1], [(16, 16)], seeds=[0])


def generate_zero_height(tmp_path, shapes_model, toy_run):
    shapes_model.generate([0], [(0, 16)], seeds=[0])


def generate_sizes_and_labels_differ(tmp_path, shapes_model, toy_run):
    shapes_model.generate([0, 1, 2], [(16, 16), (16, 24)], seeds=[0, 1, 2])


def training_label_equal_to_num_classes(tmp_path, shapes_model, toy_run):
    images = [torch.zeros(3, 16, 16)] * 2
    shapes_model.loss(images, dict(label=torch.tensor([0, 6]), index=torch.tensor([0, 1]),
                                   seed=0, step=0))


def latents_with_more_channels_than_the_model(tmp_path, shapes_model, toy_run):
    shapes_model.inputs_are_latents = True
    try:
        shapes_model.loss([torch.zeros(4, 16, 16)], dict(label=torch.tensor([0]),
                                                         index=torch.tensor([0]), seed=0, step=0))
    finally:
        shapes_model.inputs_are_latents = False


def image_folder_with_more_classes_than_the_model(tmp_path, shapes_model, toy_run):
    for i in range(7):  # the model has 6 classes
        os.makedirs(tmp_path / 'images' / f'class_{i}')
        Image.fromarray(np.full((16, 16, 3), 20 * i, np.uint8)).save(
            tmp_path / 'images' / f'class_{i}' / 'a.png')
    config = tmp_path / 'folder.py'
    config.write_text(f"_base_ = [{SHAPES!r}]\n"
                      f"train_dataloader = dict(dataset=dict(_delete_=True, type='ImageFolder', "
                      f"data_root={str(tmp_path / 'images')!r}, resolution=16))\n")
    train_tool.main([str(config), '--work-dir', str(tmp_path / 'work')])


def misspelled_checkpoint_hook_argument(tmp_path, shapes_model, toy_run):
    train_tool.build_runner([TOY, '--work-dir', str(tmp_path), '--cfg-options',
                             'default_hooks.checkpoint.max_keep_ckpt=2']).train()


def evaluate_a_checkpoint_of_another_model(tmp_path, shapes_model, toy_run):
    test_tool.main([TOY, str(toy_run / 'iter_8.pth'), '--work-dir', str(tmp_path),
                    '--cfg-options', 'model.hidden=16'])


def load_from_a_checkpoint_of_another_model(tmp_path, shapes_model, toy_run):
    train_toy(tmp_path, f'load_from={toy_run / "iter_8.pth"}', 'model.hidden=16')


def corrupt_checkpoint(tmp_path, shapes_model, toy_run):
    data = (toy_run / 'iter_8.pth').read_bytes()
    (tmp_path / 'torn.pth').write_bytes(data[:len(data) // 2])
    read_checkpoint(str(tmp_path / 'torn.pth'))


def checkpoint_with_pickled_code(tmp_path, shapes_model, toy_run):
    torch.save({'state_dict': {}, 'payload': Payload()}, tmp_path / 'evil.pth')
    init_generator(SHAPES, str(tmp_path / 'evil.pth'))


def empty_checkpoint_file(tmp_path, shapes_model, toy_run):
    (tmp_path / 'empty.pth').write_bytes(b'')
    init_generator(SHAPES, str(tmp_path / 'empty.pth'))


def safetensors_with_nan(tmp_path, shapes_model, toy_run):
    weights = {k: v.clone().contiguous() for k, v in shapes_model.state_dict().items()}
    weights['backbone.final_layer.linear.weight'][0, 0] = float('nan')
    save_file(weights, tmp_path / 'nan.safetensors')
    init_generator(SHAPES, str(tmp_path / 'nan.safetensors'))


def safetensors_with_integer_weights(tmp_path, shapes_model, toy_run):
    weights = {k: v.clone().contiguous() for k, v in shapes_model.state_dict().items()}
    weights['backbone.final_layer.linear.weight'] = \
        weights['backbone.final_layer.linear.weight'].to(torch.int32)
    save_file(weights, tmp_path / 'int.safetensors')
    init_generator(SHAPES, str(tmp_path / 'int.safetensors'))


class Payload:
    def __reduce__(self):
        return (os.system, ('touch /tmp/flexgen_payload_ran',))


CASES = {
    'generate: label = num_classes': (generate_label_too_large, ValueError,
                                      r'class ids \[6\] are outside \[0, 6\)'),
    'generate: negative label': (generate_negative_label, ValueError, r'class ids \[-1\]'),
    'generate: fewer seeds than labels': (generate_fewer_seeds_than_labels, ValueError,
                                          '2 labels but 1 seeds'),
    'generate: height 0': (generate_zero_height, ValueError, '0x16 is not a positive multiple'),
    'generate: 3 labels, 2 sizes': (generate_sizes_and_labels_differ, ValueError,
                                    '3 labels but 2 sizes'),
    'loss: label = num_classes': (training_label_equal_to_num_classes, ValueError,
                                  r'training batch: class ids \[6\] \(dataset items \[1\]\).*reserved for "no class"'),
    'loss: latents of other channels': (latents_with_more_channels_than_the_model, ValueError,
                                        r'training tokens have 64 values \(4 channels x 4\^2\), but model.backbone.in_channels is 3'),
    'ImageFolder: 7 classes, model 6': (image_folder_with_more_classes_than_the_model,
                                        ValueError, 'ImageFolder has 7 classes.*num_classes is 6'),
    'checkpoint hook: max_keep_ckpt': (misspelled_checkpoint_hook_argument, TypeError,
                                       "'max_keep_ckpt' \\(did you mean 'max_keep_ckpts'\\?\\)"),
    'tools/test.py: checkpoint of another model': (
        evaluate_a_checkpoint_of_another_model, CheckpointError,
        r'iter_8.pth does not fit .*shape mismatches: net.0.(bias|weight) \(32'),
    'load_from: checkpoint of another model': (
        load_from_a_checkpoint_of_another_model, CheckpointError,
        r'iter_8.pth does not fit .*shape mismatches'),
    'read_checkpoint: torn file': (corrupt_checkpoint, CheckpointError,
                                   'torn.pth is not a readable checkpoint'),
    'init_generator: pickled code': (checkpoint_with_pickled_code, CheckpointError,
                                     'evil.pth holds pickled Python objects.*never runs code'),
    'init_generator: empty file': (empty_checkpoint_file, CheckpointError,
                                   r'empty.pth is empty \(0 bytes\)'),
    'init_generator: NaN weight': (safetensors_with_nan, CheckpointError,
                                   r'non-finite values .*final_layer.linear.weight'),
    'init_generator: integer weight': (safetensors_with_integer_weights, CheckpointError,
                                       'final_layer.linear.weight is torch.int32'),
}


@pytest.mark.parametrize('name', list(CASES))
def test_bad_input_is_refused_with_a_clear_error(name, tmp_path, shapes_model, toy_run):
    case, error, words = CASES[name]
    torch.set_num_threads(1)
    with pytest.raises(error, match=words) as info:
        case(tmp_path, shapes_model, toy_run)
    assert 'weights_only=False' not in str(info.value)
    assert not osp.exists('/tmp/flexgen_payload_ran')


# ----------------------------------------------------------------------------- stateful cases
def test_non_finite_loss_stops_training_and_keeps_the_finite_checkpoints(tmp_path):
    """SGD at lr 1e12 overflows within a few steps: training stops with an error naming
    the step; every checkpoint on disk is finite and last_checkpoint names one."""
    with pytest.raises(FloatingPointError, match=r'Non-finite loss at iteration \d+ \(loss='):
        train_toy(tmp_path, 'optim_wrapper.optimizer.type=SGD',
                  'optim_wrapper.optimizer.lr=1e12', 'param_scheduler=[]',
                  'default_hooks.checkpoint.interval=1', 'default_hooks.checkpoint.max_keep_ckpts=1',
                  'train_cfg.max_iters=20')
    kept = [f for f in os.listdir(tmp_path) if f.endswith('.pth')]
    assert len(kept) == 1
    state = torch.load(tmp_path / kept[0], weights_only=True)
    assert all(torch.isfinite(v).all() for v in state['state_dict'].values())
    assert open(tmp_path / 'last_checkpoint').read() == str(tmp_path / kept[0])


def test_non_finite_weights_are_never_saved(tmp_path):
    """A model whose weights turned NaN with a finite loss (e.g. a NaN gradient step
    after the loss was computed) is not saved, and the older checkpoint stays."""
    runner = train_toy(tmp_path, 'train_cfg.max_iters=4', 'default_hooks.checkpoint.interval=4')
    with torch.no_grad():
        runner.model.net[0].weight[0, 0] = float('nan')
    hook = next(h for h in runner.hooks if type(h).__name__ == 'FlexCheckpointHook')
    with pytest.raises(FloatingPointError, match='NaN or inf'):
        hook._save_checkpoint_with_step(runner, 5, dict())
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith('.pth')) == ['iter_4.pth']
    assert open(tmp_path / 'last_checkpoint').read() == str(tmp_path / 'iter_4.pth')


@pytest.mark.parametrize('pointer', ['', 'garbage-that-names-nothing'])
def test_bad_last_checkpoint_pointer_falls_back_to_the_newest_checkpoint(tmp_path, pointer,
                                                                        caplog):
    train_toy(tmp_path, 'train_cfg.max_iters=8')
    (tmp_path / 'last_checkpoint').write_text(pointer)
    resumed = train_tool.main([TOY, '--work-dir', str(tmp_path), '--resume', '--cfg-options',
                               'train_cfg.max_iters=12', f'experiment_name=r_{uuid.uuid4().hex[:8]}'])
    assert resumed.iter == 12
    log = ''.join(open(osp.join(folder, name)).read()
                  for folder, _, names in os.walk(tmp_path) for name in names
                  if name.endswith('.log'))
    assert 'last_checkpoint' in log and 'resuming from the newest whole checkpoint' in log
    assert 'iter_8.pth' in log and 'Resumed the dataloader at iteration 8' in log


def test_fit_latent_with_nan_is_named(tmp_path):
    from flexgen.datasets.fit_latents import FiTFileError, FiTLatents
    from flexgen.datasets.latent_writer import save_tensors
    root = tmp_path / 'latents' / 'from_16_to_256'
    for folder in ('from_16_to_256', 'greater_than_256_resize', 'greater_than_256_crop'):
        os.makedirs(tmp_path / 'latents' / folder)
    feature = torch.zeros(2, 4, 4, 16)
    feature[1, 2, 3, 5] = float('nan')
    save_tensors(dict(feature=feature, grid=torch.stack(torch.meshgrid(
        torch.arange(4), torch.arange(4), indexing='xy')).reshape(2, 16).int(),
        size=torch.tensor([4, 4]), label=torch.tensor(3)), str(root / 'bad.safetensors'))
    dataset = FiTLatents(str(tmp_path / 'latents'), target_len=256, flip_prob=1.0)
    with pytest.raises(FiTFileError, match=r"bad.safetensors'?: 'feature' holds NaN or inf "
                                           r'values \(1 of 256\)'):
        dataset[0]

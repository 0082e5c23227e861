"""Small helpers shared by the tests."""
import os
import os.path as osp
import socket
import subprocess
import sys
from contextlib import contextmanager
from itertools import islice

import torch

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def randomise(module, seed=0, std=0.1):
    """Overwrite every parameter with seeded N(0, std^2) values (the zero-initialised
    adaLN and output layers would otherwise hide most of the computation)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def per_image_attention(q, k, v, batch):
    """Per-image softmax attention written out: softmax(q_i k_i^T / sqrt(d)) v_i."""
    outs = []
    for qi, ki, vi in zip(batch.split(q), batch.split(k), batch.split(v)):
        logits = torch.einsum('nhd,mhd->hnm', qi, ki) / qi.shape[-1] ** 0.5
        outs.append(torch.einsum('hnm,mhd->nhd', logits.softmax(-1), vi))
    return torch.cat(outs)


class SizedDataset:
    """Only what the data samplers read: a length and get_size."""

    def __init__(self, sizes):
        self.sizes = [tuple(s) for s in sizes]

    def __len__(self):
        return len(self.sizes)

    def get_size(self, index):
        return self.sizes[index]


class Wrapped:
    """Stands in for mmengine's DefaultSampler: the batch samplers read `.dataset`."""

    def __init__(self, dataset, seed=None):
        self.dataset, self.seed = dataset, seed


def take(sampler, n):
    """The first ``n`` items of a sampler."""
    return list(islice(iter(sampler), n))


def load_tool(name):
    """``tools/<name>.py`` as a module (``tools/`` on the path: test.py imports train.py)."""
    import importlib.util
    tools = osp.join(ROOT, 'tools')
    if tools not in sys.path:
        sys.path.insert(0, tools)
    spec = importlib.util.spec_from_file_location(f'flexgen_tool_{name}',
                                                  osp.join(tools, f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextmanager
def one_torch_thread():
    """Tiny tensors: torch's thread hand-off costs more than it saves."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def run_train(config, work_dir, nproc=1, options=(), args=(), timeout=500, env=None):
    """``tools/train.py CONFIG`` in a subprocess: one process, or ``torchrun
    --nproc_per_node nproc ... --launcher pytorch`` (gloo on a CPU). ``tests/`` is on the
    path (``custom_imports`` of test modules). Returns the finished process."""
    launcher = [sys.executable, 'tools/train.py'] if nproc == 1 else [
        sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={nproc}',
        f'--master_port={free_port()}', 'tools/train.py', '--launcher', 'pytorch']
    env = dict(os.environ, OMP_NUM_THREADS='1', **(env or {}), PYTHONPATH=os.pathsep.join(
        [ROOT, osp.join(ROOT, 'tests'), os.environ.get('PYTHONPATH', '')]))
    command = launcher + [str(config), '--work-dir', str(work_dir), *args]
    if options:
        command += ['--cfg-options', *options]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def train_ok(*args, **kwargs):
    """:func:`run_train` that must succeed (the output tail is the failure message)."""
    proc = run_train(*args, **kwargs)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def random_inception_weights(path, seed=0):
    """A seeded random state dict of torch-fidelity's FeatureExtractorInceptionV3 (ADM's
    Inception architecture), saved as ``path`` (``.pth`` or ``.safetensors``): He-normal
    convolutions, near-identity batch norms. Returns the state dict."""
    import io
    import math

    from safetensors.torch import save_file
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Architecture(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True):
            """Only the layer names and shapes are wanted here."""

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    names = _Architecture('inception-v3-compat', ['2048'],
                          feature_extractor_weights_path=empty).state_dict()
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, value in names.items():
        if name.endswith('conv.weight'):
            state[name] = torch.randn(value.shape, generator=g) * math.sqrt(2 / value[0].numel())
        elif name.endswith('bn.weight'):
            state[name] = 1 + 0.1 * torch.randn(value.shape, generator=g)
        elif name.endswith('bn.bias') or name == 'fc.bias':
            state[name] = 0.1 * torch.randn(value.shape, generator=g)
        elif name.endswith('running_mean'):
            state[name] = torch.zeros(value.shape)
        elif name.endswith('running_var'):
            state[name] = torch.ones(value.shape)
        elif name.endswith('num_batches_tracked'):
            state[name] = torch.zeros((), dtype=torch.long)
        elif name == 'fc.weight':
            state[name] = torch.randn(value.shape, generator=g) / math.sqrt(value.shape[1])
        else:
            raise KeyError(f'random_inception_weights: unexpected parameter {name}')
    if str(path).endswith('.safetensors'):
        save_file(state, str(path))
    else:
        torch.save(state, str(path))
    return state

"""How much GPU memory a training recipe needs per GPU, and what makes it fit.

Counted, not guessed, where it can be: parameters (trainable and frozen, per block and
outside the blocks, in ``nn.Linear`` s) from the config's backbone built on the ``meta``
device; activations per token from one block of the real width run on a few tokens of the
CPU under the recipe's compute dtype, every tensor autograd saves for the backward caught by
``torch.autograd.graph.saved_tensors_hooks`` (each storage once), as the slope between two
token counts (so weight copies and per-image terms drop out), then scaled by the tokens per
GPU and the depth. The rest is the arithmetic of the wrappers, per GPU:

================  ===========================  =====================================
                  DDP                          FSDP (FullyShardedWrapper, N GPUs)
================  ===========================  =====================================
weights           4 P (fp32)                   4 P / N (fp32 master shards)
gradients         4 Pt                         4 Pt / N
DDP buckets       4 Pt (0: bucket view)        -
optimizer         8 Pt (Adam: 2 fp32 moments)  8 Pt / N
EMA               4 P (+ buffers)              4 P / N (+ buffers)
gathered / casts  2 Plin (bf16 autocast        2 Proot + 2 x 2 Pblock (bf16 units in
                  copies of the linears)       flight) + 2 x 4 Pblock (fp32 unit grads)
step temporaries  4 Pt (foreach AdamW; fused:  4 Pt / N (foreach; fused: 0)
                  0)
activations       tokens x (L a_block + a_rest); with activation checkpointing of every
                  block: tokens x (L a_ckpt + a_block + a_rest)
================  ===========================  =====================================

``P`` all parameters, ``Pt`` trainable ones, ``Plin`` those of linear layers, ``L`` depth,
``a_*`` bytes per token. Peak = weights + optimizer + EMA + buffers + gradients + buckets
+ max(activations + gathered / casts, step temporaries). Not counted: frozen modules built
from files outside the parameters (the autoencoder, REPA's vision encoder) and their
no-grad activations, the CUDA context and NCCL buffers: a plan fits when its peak is at
most ``usable`` (default 90%) of the GPU memory.
"""
import copy
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

GIB = 2 ** 30
# Pixels per latent pixel of the autoencoders the shipped configs name (their files are
# not opened here): SD-VAE (AutoencoderKL, 8x) and DC-AE f32c32 (32x).
LATENT_DOWNSAMPLE = {'IdentityAutoencoder': 1, 'AutoencoderKL': 8, 'AutoencoderDC': 32}
OPTIMIZER_STATES = {'Adam': 2, 'AdamW': 2, 'SGD': 1}  # fp32 tensors per parameter


@dataclass
class ModelCounts:
    """Parameter counts of a generator's trainable network (backbone + REPA projector)."""
    params: int
    trainable: int
    linear: int          # parameters of nn.Linear layers (what autocast casts)
    block: int           # parameters of the largest block
    root: int            # parameters outside the blocks
    depth: int
    buffer_bytes: int


@dataclass
class Activations:
    """Bytes autograd saves per token: one block, one checkpointed block, the rest."""
    block: float
    checkpointed: float
    rest: float
    dtype: str


@dataclass
class Setup:
    """What a plan assumes about the run."""
    wrapper: str = 'ddp'                 # 'ddp' or 'fsdp'
    compute_dtype: str = 'bfloat16'      # autocast / FSDP param dtype
    fused_optimizer: bool = False
    bucket_view: bool = False            # DDP gradient_as_bucket_view
    checkpointing: bool = False          # activation checkpointing of every block
    optimizer_states: int = 2
    ema: bool = True

    def describe(self) -> str:
        parts = ['FSDP' if self.wrapper == 'fsdp' else 'DDP', self.compute_dtype]
        if self.fused_optimizer:
            parts.append('fused AdamW')
        if self.bucket_view and self.wrapper == 'ddp':
            parts.append('gradient_as_bucket_view')
        if self.checkpointing:
            parts.append('activation checkpointing')
        return ' + '.join(parts)


@dataclass
class Plan:
    setup: Setup
    parts: Dict[str, float] = field(default_factory=dict)   # bytes per GPU
    peak: float = 0.0

    def fits(self, gpu_memory_gib: float, usable: float = 0.9) -> bool:
        return self.peak <= usable * gpu_memory_gib * GIB


# --------------------------------------------------------------------------- counting
def _repa_projector(repa: Optional[dict], hidden_size: int, z_dim: int) -> Optional[nn.Module]:
    if not repa:
        return None
    from flexgen.models.repa import REPAProjector
    dims = repa.get('z_dims') or [z_dim]
    return nn.ModuleList(REPAProjector(hidden_size, z, repa.get('projector_dim', 2048))
                         for z in dims)


def count_parameters(model_cfg: dict, repa_z_dim: int = 1280) -> ModelCounts:
    """Counts of ``model_cfg``'s backbone (and REPA projector: ``repa_z_dim`` is the vision
    encoder's feature width when the config does not state ``z_dims``), built on the meta
    device: no memory, no time."""
    from flexgen.registry import MODELS
    backbone_cfg = copy.deepcopy(dict(model_cfg['backbone']))
    with torch.device('meta'):
        backbone = MODELS.build(backbone_cfg)
        projector = _repa_projector(model_cfg.get('repa'), backbone.hidden_size, repa_z_dim)
    modules = [backbone] + ([projector] if projector is not None else [])
    params = [p for m in modules for p in m.parameters()]
    blocks = list(getattr(backbone, 'blocks', []))
    block = max((sum(p.numel() for p in b.parameters()) for b in blocks), default=0)
    linear = sum(p.numel() for m in modules for sub in m.modules() if isinstance(sub, nn.Linear)
                 for p in sub.parameters(recurse=False))
    total = sum(p.numel() for p in params)
    return ModelCounts(
        params=total, trainable=sum(p.numel() for p in params if p.requires_grad),
        linear=linear, block=block, root=total - sum(p.numel() for b in blocks
                                                     for p in b.parameters()),
        depth=len(blocks),
        buffer_bytes=sum(b.numel() * b.element_size() for m in modules for b in m.buffers()))


# --------------------------------------------------------------------------- measuring
class SavedTensorMeter:
    """Bytes of the storages autograd saves for the backward inside a ``with`` block, each
    storage once; ``window`` names a sub-module whose forward's saves are counted apart."""

    def __init__(self, window: Optional[nn.Module] = None):
        self.window, self.inside = window, False
        self.total: Dict[int, int] = {}
        self.in_window: Dict[int, int] = {}

    def _pack(self, tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in self.total:
            self.total[key] = storage.nbytes()
            if self.inside:
                self.in_window[key] = storage.nbytes()
        return tensor

    def __enter__(self):
        handles = []
        if self.window is not None:
            handles.append(self.window.register_forward_pre_hook(
                lambda *args: setattr(self, 'inside', True)))
            handles.append(self.window.register_forward_hook(
                lambda *args: setattr(self, 'inside', False)))
        self._handles = handles
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        for handle in self._handles:
            handle.remove()

    @property
    def total_bytes(self) -> int:
        return sum(self.total.values())

    @property
    def window_bytes(self) -> int:
        return sum(self.in_window.values())


def _training_forward(backbone, projector, feature_block, grid, images, dtype, seed=0):
    """One training forward of ``backbone`` (+ REPA projector, + an MSE loss) on
    ``images`` latents of ``grid`` tokens each, under the compute dtype."""
    from flexgen.structures import patchify
    g = torch.Generator().manual_seed(seed)
    p, c = backbone.patch_size, backbone.in_channels
    latents = [torch.randn(c, grid[0] * p, grid[1] * p, generator=g) for _ in range(images)]
    batch = patchify(latents, p)
    t = torch.rand(images, generator=g)
    y = torch.randint(0, backbone.num_classes, (images,), generator=g)
    autocast = (torch.autocast('cpu', dtype=torch.bfloat16) if dtype == 'bfloat16'
                else torch.autocast('cpu', enabled=False))
    with autocast:
        if projector is None:
            out = backbone(batch, t, y)
        else:
            out, hidden = backbone(batch, t, y, feature_block=feature_block)
            out = out.float().sum() + sum(proj(hidden).float().sum() for proj in projector)
        loss = out.float().pow(2).mean()
    return loss


def measure_activations(model_cfg: dict, dtype: str = 'bfloat16', repa_z_dim: int = 1280,
                        grids: Sequence = ((8, 8), (16, 16)), images: int = 2
                        ) -> Activations:
    """Bytes autograd keeps per token at the real width: one block (depth 1 on the CPU),
    the same block under activation checkpointing, and everything outside the
    blocks, as slopes between ``images`` images of each of two token ``grids``."""
    from flexgen.engine.activation_checkpointing import turn_on_activation_checkpointing
    from flexgen.registry import MODELS
    cfg = dict(copy.deepcopy(dict(model_cfg['backbone'])), depth=1)
    repa = model_cfg.get('repa')

    def measure(checkpointed: bool):
        torch.manual_seed(0)
        backbone = MODELS.build(cfg)
        projector = _repa_projector(repa, backbone.hidden_size, repa_z_dim)
        if checkpointed:
            turn_on_activation_checkpointing(backbone, ['blocks.0'])
        points = []
        for grid in grids:
            with SavedTensorMeter(backbone.blocks[0]) as meter:
                _training_forward(backbone, projector, 1, grid, images, dtype)
            points.append((images * grid[0] * grid[1], meter.window_bytes,
                           meter.total_bytes - meter.window_bytes))
        (n1, w1, r1), (n2, w2, r2) = points
        return (w2 - w1) / (n2 - n1), (r2 - r1) / (n2 - n1)

    block, rest = measure(False)
    checkpointed, _ = measure(True)
    return Activations(block=block, checkpointed=checkpointed, rest=rest, dtype=dtype)


# --------------------------------------------------------------------------- planning
def plan_memory(counts: ModelCounts, act: Activations, tokens: int, gpus: int,
                setup: Setup) -> Plan:
    """Bytes per GPU of every part (see the module docstring) and the peak."""
    P, Pt, n = counts.params, counts.trainable, max(gpus, 1)
    shard = n if setup.wrapper == 'fsdp' else 1
    low = setup.compute_dtype == 'bfloat16'
    parts = {
        'weights': 4 * P / shard,
        'gradients': 4 * Pt / shard,
        'buckets': 4 * Pt if setup.wrapper == 'ddp' and not setup.bucket_view and n > 1 else 0,
        'optimizer': 4 * setup.optimizer_states * Pt / shard,
        'ema': (4 * P / shard + counts.buffer_bytes) if setup.ema else 0,
        'buffers': counts.buffer_bytes,
        'step': 0 if setup.fused_optimizer else 4 * Pt / shard,
    }
    if setup.wrapper == 'fsdp':
        param_bytes = 2 if low else 4
        parts['gathered'] = (param_bytes * counts.root + 2 * param_bytes * counts.block
                             + 2 * 4 * counts.block)
    else:
        parts['gathered'] = 2 * counts.linear if low else 0
    per_token = (counts.depth * act.checkpointed + act.block + act.rest if setup.checkpointing
                 else counts.depth * act.block + act.rest)
    parts['activations'] = tokens * per_token
    static = sum(parts[k] for k in ('weights', 'optimizer', 'ema', 'buffers', 'gradients',
                                    'buckets'))
    peak = static + max(parts['activations'] + parts['gathered'], parts['step'])
    return Plan(setup=setup, parts=parts, peak=peak)


def candidate_setups(configured: Setup) -> List[Setup]:
    """The configured setup, then what to switch on, cheapest in step time first: fused
    AdamW and DDP's gradient_as_bucket_view (free), FSDP with bf16 compute (its all-gathers
    and reduce-scatters overlap the compute), activation checkpointing under DDP, then
    under FSDP (checkpointing recomputes every block's forward: about a third more
    compute per step)."""
    from dataclasses import replace
    ddp_cheap = replace(configured, fused_optimizer=True, bucket_view=True)
    fsdp = replace(configured, wrapper='fsdp', compute_dtype='bfloat16', fused_optimizer=True,
                   checkpointing=False)
    setups = [configured, ddp_cheap, fsdp, replace(ddp_cheap, checkpointing=True),
              replace(fsdp, checkpointing=True)]
    unique = {}
    for setup in setups:
        if setup.wrapper == 'fsdp':
            setup = replace(setup, bucket_view=False)  # a DDP option
        unique.setdefault(setup.describe(), setup)
    return list(unique.values())


# --------------------------------------------------------------------------- configs
def tokens_per_gpu(cfg) -> int:
    """The most tokens one GPU trains on per step, from the config's train dataloader:
    packs (``max_tokens`` x packs per GPU), FiT's padding (``max_length`` x images), or
    images of the dataset's ``resolution`` through the autoencoder and the patch."""
    loader = cfg.train_dataloader
    batch = loader.get('batch_size', 1)
    sampler = loader.get('batch_sampler') or {}
    if sampler.get('max_tokens'):
        return int(sampler['max_tokens']) * batch
    collate = loader.get('collate_fn') or {}
    if collate.get('max_length'):
        return int(collate['max_length']) * batch
    resolution = (loader.get('dataset') or {}).get('resolution')
    if resolution:
        ae = cfg.model.get('autoencoder') or {}
        kind = ae.get('kind', 'AutoencoderKL') if ae.get('type') == 'DiffusersAutoencoder' \
            else ae.get('type', 'IdentityAutoencoder')
        side = int(resolution) // LATENT_DOWNSAMPLE[kind] // cfg.model.backbone.patch_size
        return side * side * batch
    raise ValueError(f'{cfg.filename}: cannot tell the tokens per GPU from train_dataloader '
                     '(no batch_sampler.max_tokens, collate_fn.max_length or '
                     'dataset.resolution); pass them explicitly')


def configured_setup(cfg) -> Setup:
    """The setup a config trains with (wrapper, compute dtype, optimizer, checkpointing)."""
    from flexgen.engine.fsdp import is_sharded_wrapper_cfg
    wrapper_cfg = cfg.get('model_wrapper_cfg') or {}
    sharded = is_sharded_wrapper_cfg(wrapper_cfg)
    optim = cfg.get('optim_wrapper') or {}
    optimizer = optim.get('optimizer') or {}
    kind = optimizer.get('type', 'AdamW')
    if kind == 'ZeroRedundancyOptimizer':
        kind = optimizer.get('optimizer_type', 'AdamW')
    states = OPTIMIZER_STATES.get(kind, 2)
    if kind == 'SGD' and not optimizer.get('momentum'):
        states = 0
    if sharded:
        dtype = (wrapper_cfg.get('mixed_precision') or {}).get('param_dtype') or 'float32'
    else:
        dtype = ('bfloat16' if optim.get('type') in ('AutocastOptimWrapper', 'AmpOptimWrapper')
                 else 'float32')
    dtype = {'bf16': 'bfloat16', 'fp32': 'float32'}.get(str(dtype), str(dtype))
    ema = any('EMA' in str(h.get('type', '')) for h in (cfg.get('custom_hooks') or []))
    blocks = getattr(cfg.model.backbone, 'depth', 0)
    checkpointed = cfg.get('activation_checkpointing') or []
    return Setup(wrapper='fsdp' if sharded else 'ddp', compute_dtype=dtype,
                 fused_optimizer=bool(optimizer.get('fused')),
                 bucket_view=bool(wrapper_cfg.get('gradient_as_bucket_view')),
                 checkpointing=len(checkpointed) >= blocks > 0, optimizer_states=states,
                 ema=ema)

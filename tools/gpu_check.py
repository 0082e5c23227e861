"""What a GPU shows, in one command: attention backends against per-image attention in
bf16, and training steps of the headline recipes with their speed, MFU, memory and host
syncs, printed as one table and written as JSON.

    python tools/gpu_check.py [--out gpu_check.json] [--only attention nit_xl nit_xl_repa
                              dit_xl fitv2_xl sharded]
    python tools/gpu_check.py --tiny      # the same checks at toy sizes (CPU: a smoke test)

One process, a few minutes on one H100 / H200; it needs the project and the packages the
README lists (flash-attn / xformers are checked where installed; torch_varlen, PyTorch's
own FlashAttention-2 varlen kernel, needs torch >= 2.10).

- attention: every registered backend (sdpa, per_image, flex, flash_varlen, torch_varlen,
  xformers) on an ImageNet-like pack (tools/data/imagenet_like_latent_sizes.json, NiT's
  latents at patch 1) in bf16, forward and gradients, against per-image attention
  (computed in float32 from the same bf16 inputs), and its forward+backward time over the
  per-image limit (dense attention on each image alone).
- nit_xl: NiT-XL (configs/nit/nit_xl_pack_16384.py) on synthetic 16384-token packs;
  dit_xl: DiT-XL/2 (configs/dit/dit_xl_2_256.py) at batch 32 of 256 px latents; fitv2_xl:
  FiTv2-XL/2 (configs/fit/fitv2_xl_2.py) at batch 32 of images up to 256 tokens;
  nit_xl_repa: NiT-XL with its REPA encoder's network (RADIO v2.5-H is a timm ViT-H/16;
  random weights, bf16) on each pack's images (16 px per latent cell, as NiTLatents gives
  them), the headline command's whole step. The backbone trains on latents (no
  autoencoder) with the config's optimiser and precision: step time (CUDA events, median
  over steps after warm-up), tokens/s, model FLOPs utilisation
  ``MFU = (3 x forward FLOPs + REPA encoder FLOPs) / step time / peak`` (FLOPs counted by
  torch's FlopCounterMode on the step's own batch, attention included; backward = 2 x
  forward; the frozen encoder runs forward only; peak: the GPU's dense bf16 rate), peak
  memory, and host syncs per step (CUDA's sync
  debug mode; on a CPU, flexgen.utils.HostSyncCounter). NiT-XL also with its blocks
  compiled (``compile_blocks=True``), compile time included in the table. One profiled
  step per recipe gives the kernel time by kind of work (``kind_of``), the top kernels,
  and the share of the step's time the kernels kept the GPU busy.
- sharded: the sharded path (FSDP2 over nccl, bf16 compute, sharded safetensors
  checkpoints through torch.distributed.checkpoint, FlexEMAHook, activation checkpointing)
  in one process, a world of one rank, on the tiny packed NiT recipe through the Runner:
  6 steps straight against 3 steps, a checkpoint and a resume, weights and EMA compared.
"""
import argparse
import json
import math
import os
import os.path as osp
import statistics
import time
import warnings

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
# Dense bf16 tensor-core peaks (NVIDIA data sheets, SXM parts).
PEAK_BF16 = {'H100': 989.4e12, 'H200': 989.4e12, 'H800': 989.4e12, 'A100': 312e12,
             'B200': 2250e12}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--only', nargs='+', default=CHECKS, choices=CHECKS,
                        help='checks to run (default: all)')
    parser.add_argument('--out', default='gpu_check.json', help='where the JSON goes')
    parser.add_argument('--steps', type=int, default=10, help='timed steps per recipe')
    parser.add_argument('--warmup', type=int, default=3, help='untimed steps first')
    parser.add_argument('--no-compile', action='store_true',
                        help='skip the compiled NiT-XL run (its compile takes minutes)')
    parser.add_argument('--tiny', action='store_true',
                        help='toy widths and packs (a smoke test of this script, on a CPU)')
    parser.add_argument('--device', default=None, help='default: cuda if available, else cpu')
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------- helpers
class Timer:
    """Seconds of a device's work: CUDA events on a GPU, wall time on a CPU."""

    def __init__(self, device):
        import torch
        self.cuda = device.type == 'cuda'
        self.torch = torch

    def __call__(self, fn, repeats):
        torch = self.torch
        times = []
        for _ in range(repeats):
            if self.cuda:
                start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                begin = time.perf_counter()
                fn()
                times.append(time.perf_counter() - begin)
        return times


def peak_flops(device):
    import torch
    if device.type != 'cuda':
        return None, 'n/a (not a GPU)'
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16.items():
        if key in name:
            return value, f'{name}: {value / 1e12:.1f} TFLOP/s dense bf16'
    return None, f'{name}: peak unknown (MFU not computed)'


def count_syncs(device, fn, model=None):
    """Host syncs made by ``fn()``: CUDA's sync debug mode on a GPU (each sync warns),
    flexgen.utils.HostSyncCounter on a CPU."""
    import torch
    if device.type == 'cuda':
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            torch.cuda.set_sync_debug_mode('warn')
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode('default')
        found = [w for w in caught if 'called a synchronizing' in str(w.message)]
        return len(found), [str(w.message).splitlines()[0] for w in found[:3]]
    from flexgen.utils.host_sync import HostSyncCounter, counting_batches_as_device
    counter = HostSyncCounter(device)
    counter.mark(model)
    with counting_batches_as_device(counter), counter:
        fn()
    events = counter.events['default']
    return len(events), [e.splitlines()[0] for e in events[:3]]


# ----------------------------------------------------------------------------- attention
def check_attention(args, device):
    import torch

    from flexgen.models.layers.attention_backends import build_attention_backend
    from flexgen.registry import ATTENTION_BACKENDS
    from flexgen.structures import TokenBatch
    from flexgen.utils.latent_sizes import draw_sizes
    tokens, heads, head_dim = (512, 2, 8) if args.tiny else (16384, 16, 72)
    sizes = draw_sizes(tokens, seed=0)
    batch = TokenBatch(torch.zeros(int(sizes.prod(1).sum()), 1, device=device), sizes)
    n = batch.tokens.shape[0]
    g = torch.Generator().manual_seed(0)
    q, k, v, grad = (torch.randn(n, heads, head_dim, generator=g).to(device, torch.bfloat16)
                     for _ in range(4))
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]

    def reference():
        """Per-image attention in float32 from the bf16 inputs, and its gradients."""
        qs, ks, vs = (x.detach().float().requires_grad_(True) for x in (q, k, v))
        out = torch.cat([torch.nn.functional.scaled_dot_product_attention(
            *(x.transpose(0, 1) for x in parts)).transpose(0, 1)
            for parts in zip(batch.split(qs), batch.split(ks), batch.split(vs))])
        grads = torch.autograd.grad(out, (qs, ks, vs), grad.float())
        return out.detach(), grads

    ref_out, ref_grads = reference()
    scale = ref_out.abs().max().item()
    alone = [[x.detach().transpose(0, 1)[None].contiguous().requires_grad_(True)
              for x in parts] for parts in zip(batch.split(q), batch.split(k), batch.split(v))]
    alone_grads = [g_.transpose(0, 1)[None].contiguous() for g_ in batch.split(grad)]

    def limit():
        for (qi, ki, vi), gi in zip(alone, alone_grads):
            out = torch.nn.functional.scaled_dot_product_attention(qi, ki, vi)
            torch.autograd.grad(out, (qi, ki, vi), gi)

    timer = Timer(device)
    limit_time = statistics.median(timer(limit, 1 + (2 if args.tiny else 5))[1:])
    # FLOPs of exact block-diagonal attention, forward (QK^T and PV: 4 n^2 d per head)
    # plus backward (2.5 x forward, FlashAttention's count)
    attention_flops = 3.5 * 4 * heads * head_dim * sum(x * x for x in batch.seqlens_list)
    rows = []
    for name in sorted(ATTENTION_BACKENDS.module_dict):
        if name in ('auto', 'padded'):
            continue
        row = dict(check='attention', backend=name, tokens=n, images=len(sizes))
        try:
            backend = build_attention_backend(name)

            def run():
                out = backend(*leaves, batch)
                return out, torch.autograd.grad(out, leaves, grad)

            out, grads = run()
            errors = [((a.float() - b).abs().max().item()) for a, b in
                      zip((out,) + tuple(grads), (ref_out,) + tuple(ref_grads))]
            row.update(max_error_out=errors[0], max_error_grad=max(errors[1:]),
                       relative_error=max(errors) / max(scale, 1e-12),
                       ok=max(errors) / max(scale, 1e-12) < 3e-2)
            times = timer(lambda: run(), 1 + (2 if args.tiny else 5))[1:]
            row.update(ms=statistics.median(times) * 1e3,
                       x_limit=statistics.median(times) / limit_time,
                       tflops=attention_flops / statistics.median(times) / 1e12)
        except Exception as error:  # noqa: BLE001 - report and go on
            row.update(ok=None, note=f'{type(error).__name__}: {str(error)[:160]}')
        rows.append(row)
    rows.append(dict(check='attention', backend='per-image limit', tokens=n,
                     images=len(sizes), ms=limit_time * 1e3, x_limit=1.0, ok=True,
                     tflops=attention_flops / limit_time / 1e12))
    return rows


# ----------------------------------------------------------------------------- training
RECIPES = {
    'nit_xl': ('configs/nit/nit_xl_pack_16384.py', 'packs'),
    'nit_xl_repa': ('configs/nit/nit_xl_pack_16384.py', 'packs'),
    'dit_xl': ('configs/dit/dit_xl_2_256.py', 'batch'),
    'fitv2_xl': ('configs/fit/fitv2_xl_2.py', 'fit'),
}
CHECKS = ['attention', 'nit_xl', 'nit_xl_repa', 'dit_xl', 'fitv2_xl', 'sharded']


def build_recipe(name, args, device, compile_blocks=False):
    """The recipe's generator (backbone trained on latents) and its optimiser wrapper."""
    import torch
    from mmengine.config import Config

    import flexgen
    from flexgen.registry import MODELS, OPTIM_WRAPPERS
    flexgen.register_all_modules()
    cfg = Config.fromfile(osp.join(ROOT, RECIPES[name][0]))
    model_cfg = cfg.model.to_dict()
    backbone = model_cfg['backbone']
    if args.tiny:
        backbone.update(hidden_size=64, depth=2, num_heads=2, num_classes=10)
    if compile_blocks:
        backbone['compile_blocks'] = True
    repa = None
    if name == 'nit_xl_repa':  # RADIO v2.5-H's network (timm ViT-H/16), random weights
        from flexgen.models.vision_encoders import CLIP_MEAN, CLIP_STD
        encoder = dict(type='TimmViTEncoder', mean=CLIP_MEAN, std=CLIP_STD,
                       model_name='vit_tiny_patch16_224' if args.tiny else 'vit_huge_patch16_224',
                       dtype='bfloat16' if device.type == 'cuda' else 'float32')
        repa = dict(model_cfg['repa'], encoder=encoder)
        if args.tiny:
            repa.update(feature_block=1, projector_dim=32)
    model_cfg.update(repa=repa, inputs_are_latents=True,
                     autoencoder=dict(type='IdentityAutoencoder',
                                      channels=backbone['in_channels']))
    torch.manual_seed(0)
    model = MODELS.build(model_cfg).to(device).train()
    wrapper_cfg = cfg.optim_wrapper.to_dict()
    wrapper_cfg.setdefault('type', 'FlexOptimWrapper')
    if wrapper_cfg['type'] in ('OptimWrapper', 'FlexOptimWrapper'):
        # every recipe trains in bf16 autocast on GPUs (DiT / SiT: tf32 + fp32 in the
        # papers, flexgen's --amp); the same precision for all rows of the table
        wrapper_cfg.update(type='AutocastOptimWrapper', dtype='bfloat16')
    optimizer = dict(wrapper_cfg.pop('optimizer'))
    if device.type == 'cuda':
        optimizer['fused'] = True
    optimizer = getattr(torch.optim, optimizer.pop('type'))(model.parameters(), **optimizer)
    wrapper = OPTIM_WRAPPERS.build(dict(wrapper_cfg, optimizer=optimizer))
    return model, wrapper


def recipe_batches(name, args, model, count):
    """``count`` collated batches (host, pinned on a GPU machine) for the recipe."""
    import torch

    from flexgen.datasets.collate import jagged_collate
    from flexgen.utils.latent_sizes import draw_sizes
    channels, patch = model.backbone.in_channels, model.backbone.patch_size
    batches = []
    for seed in range(count):
        g = torch.Generator().manual_seed(seed)
        if RECIPES[name][1] == 'packs':
            grids = draw_sizes(1024 if args.tiny else 16384, seed=seed).tolist()
        elif RECIPES[name][1] == 'batch':
            grids = [(4, 4) if args.tiny else (16, 16)] * (4 if args.tiny else 32)
        else:  # FiT: up to 256 tokens per image, aspect ratios of the histogram
            cap = 64 if args.tiny else 256
            grids = []
            for h, w in draw_sizes(64 * cap, seed=seed).tolist()[:4 if args.tiny else 32]:
                shrink = min(1.0, math.sqrt(cap / (h * w)))
                grids.append((max(1, int(h * shrink)), max(1, int(w * shrink))))
        items = [dict(inputs=torch.randn(channels, h * patch, w * patch, generator=g),
                      data_samples=dict(label=i % model.num_classes, index=seed * 1000 + i))
                 for i, (h, w) in enumerate(grids)]
        if model.repa is not None:  # NiTLatents' REPA images: uint8, 16 px per latent cell
            for item, (h, w) in zip(items, grids):
                item['data_samples']['image'] = torch.randint(
                    0, 256, (16 * h * patch, 16 * w * patch, 3), generator=g,
                    dtype=torch.uint8).numpy()
        batch = jagged_collate(items, patch_size=patch)
        if torch.cuda.is_available():
            batch = dict(inputs=batch['inputs'].pin_memory(),
                         data_samples={k: v.pin_memory() for k, v in
                                       batch['data_samples'].items()})
        batches.append(batch)
    return batches


def check_recipe(name, args, device, peak, compile_blocks=False, flops_per_token=None):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        row = _check_recipe(name, args, device, peak, compile_blocks, flops_per_token)
    notes = sorted({str(w.message)[:400] for w in caught
                    if 'attention backend' in str(w.message)})
    if notes:
        row['warnings'] = notes
    return row


def _check_recipe(name, args, device, peak, compile_blocks=False, flops_per_token=None):
    import torch

    from flexgen.utils.flops import forward_flops
    label = name + (' (compiled blocks)' if compile_blocks else '')
    row = dict(check='train', recipe=label, config=RECIPES[name][0])
    try:
        if device.type == 'cuda':
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        begin = time.perf_counter()
        model, wrapper = build_recipe(name, args, device, compile_blocks)
        batches = recipe_batches(name, args, model, 3)
        step_index = [0]

        def step():
            batch = batches[step_index[0] % len(batches)]
            data = dict(inputs=batch['inputs'],
                        data_samples=dict(batch['data_samples'], seed=0, step=step_index[0]))
            step_index[0] += 1
            return model.train_step(data, wrapper)

        for _ in range(args.warmup):
            step()
        if device.type == 'cuda':
            torch.cuda.synchronize()
        setup = time.perf_counter() - begin
        times = Timer(device)(step, args.steps)
        seconds = statistics.median(times)
        if compile_blocks and device.type != 'cuda':
            # the CPU counter is a TorchFunctionMode, which compiled code would trace into
            syncs, where = float('nan'), ['not counted: compiled blocks on a CPU']
        else:
            syncs, where = count_syncs(device, lambda: [step() for _ in range(2)], model)
        tokens = [b['inputs'].tokens.shape[0] for b in batches]
        images = [b['inputs'].num_images for b in batches]
        row['profile'] = profile_step(device, step, seconds)
        encoder_flops_per_token = 0.0
        if flops_per_token is None:
            # forward FLOPs of each batch's backbone pass (counted eagerly: compiled
            # kernels bypass the counter), under the training precision
            # counted with 'sdpa' (exact block-diagonal work; a compiled FlexAttention
            # kernel cannot run under the counter)
            from flexgen.models.layers.attention_backends import SDPAAttention
            layers = [m for m in model.modules() if hasattr(m, 'backend')]
            backends = [m.backend for m in layers]
            for layer in layers:
                layer.backend = SDPAAttention()
            encoders = model.repa.encoders if model.repa is not None else []
            encoder_backends = [e.attention for e in encoders]
            for encoder in encoders:
                encoder.attention = SDPAAttention()
            flops, encoder_flops = [], []
            for b in batches:
                data = model.data_preprocessor(dict(inputs=b['inputs'], data_samples=dict(
                    b['data_samples'])), True)
                tb = data['inputs']
                t = torch.rand(tb.num_images, device=device)
                with wrapper.optim_context(model):
                    flops.append(forward_flops(model.backbone, tb, t,
                                               data['data_samples']['label']))
                if encoders:  # REPA's frozen encoder: forward only
                    from torch.utils.flop_counter import FlopCounterMode
                    with FlopCounterMode(display=False) as counter:
                        model.repa.targets(data['data_samples']['image'], tb)
                    encoder_flops.append(counter.get_total_flops())
            for layer, backend in zip(layers, backends):
                layer.backend = backend
            for encoder, backend in zip(encoders, encoder_backends):
                encoder.attention = backend
            flops_per_token = sum(flops) / sum(tokens)
            encoder_flops_per_token = sum(encoder_flops) / sum(tokens)
        tokens_per_s = statistics.mean(tokens) / seconds
        step_flops_per_token = 3 * flops_per_token + encoder_flops_per_token
        row.update(step_ms=seconds * 1e3, tokens_per_step=statistics.mean(tokens),
                   images_per_step=statistics.mean(images), tokens_per_s=tokens_per_s,
                   train_tflops=step_flops_per_token * tokens_per_s / 1e12,
                   mfu=(step_flops_per_token * tokens_per_s / peak) if peak else None,
                   encoder_flops_per_token=encoder_flops_per_token,
                   peak_memory_gib=(torch.cuda.max_memory_allocated(device) / 2 ** 30
                                    if device.type == 'cuda' else None),
                   syncs_per_step=syncs / 2, sync_examples=where,
                   setup_s=setup, flops_per_token=flops_per_token,
                   attention=attention_used(model.backbone.blocks[0].attn.backend),
                   parameters=sum(p.numel() for p in model.parameters()), ok=True)
    except Exception as error:  # noqa: BLE001 - report and go on
        row.update(ok=False, note=f'{type(error).__name__}: {str(error)[:300]}')
    return row


# What a kernel (GPU) or an operator (CPU) spends its time on, first match wins: attention
# before matmul (FlexAttention's templates are "triton_tem_fused_..."), then Inductor's
# other kernels as one kind (each fuses several of the kinds below), the optimizer and EMA
# before the elementwise rest.
KINDS = (
    ('attention', ('flash', 'fmha', 'attention', 'flex')),
    ('matmul', ('gemm', 'nvjet', 'cutlass', 'xmma', 'cublas', 'aten::mm', 'aten::addmm',
                'aten::bmm', 'aten::matmul', 'fused_mm', 'fused_addmm')),
    ('compiled (fused)', ('triton',)),
    ('optimizer + EMA', ('adam', 'multi_tensor', 'foreach', 'lerp')),
    ('norm', ('layer_norm', 'rms_norm', 'group_norm')),
    ('copy / cast', ('copy', 'cast', 'aten::to', 'convert')),
    ('index / gather', ('index', 'gather', 'scatter', 'embedding')),
    ('reduction', ('reduce', 'aten::sum', 'aten::mean', 'aten::max')),
)


def kind_of(name):
    """The kind of work a kernel or operator ``name`` does (``KINDS``), else
    ``'elementwise / other'``."""
    lowered = name.lower()
    for kind, needles in KINDS:
        if any(needle in lowered for needle in needles):
            return kind
    return 'elementwise / other'


# ----------------------------------------------------------------------------- sharding
def check_sharded(args, device):
    """FSDP2 in one process (a world of one rank: nccl on a GPU, gloo on a CPU) on the tiny
    packed NiT recipe (configs/nit/nit_tiny_shapes_pack.py; blocks sharded, bf16 compute
    on a GPU, FlexEMAHook, every block checkpointed): 6 steps in one run against 3 steps,
    a sharded checkpoint and a resume to 6, the trained and EMA weights compared."""
    import shutil
    import socket
    import tempfile
    import uuid

    import torch

    from flexgen.apis.runners import (apply_train_options, build_runner, end_distributed,
                                      load_config)
    from flexgen.engine.sharded_checkpoint import consolidate
    row = dict(check='sharded', recipe='nit_tiny_shapes_pack, FSDP2 + activation checkpointing')
    own_group = not torch.distributed.is_initialized()
    saved_env = dict(os.environ)
    if own_group:
        with socket.socket() as free:
            free.bind(('127.0.0.1', 0))
            port = free.getsockname()[1]
        os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK='0',
                          LOCAL_RANK='0', WORLD_SIZE='1')
    config = osp.join(ROOT, 'configs', 'nit', 'nit_tiny_shapes_pack.py')
    wrapper = dict(type='FullyShardedWrapper')
    if device.type == 'cuda':
        wrapper['mixed_precision'] = dict(param_dtype='bfloat16', reduce_dtype='float32')
    root = tempfile.mkdtemp(prefix='flexgen_gpu_check_')

    def train(name, iters, resume=None):
        options = {'model_wrapper_cfg': wrapper, 'train_cfg.max_iters': iters,
                   'default_hooks.checkpoint.interval': 3, 'default_hooks.logger.interval': 1,
                   'val_cfg': None, 'val_dataloader': None, 'val_evaluator': None,
                   'train_dataloader.num_workers': 0,
                   'train_dataloader.persistent_workers': False,
                   'activation_checkpointing': [f'backbone.blocks.{i}' for i in range(4)],
                   'experiment_name': f'gpu_check_{uuid.uuid4().hex[:8]}'}
        cfg = load_config(config, launcher='pytorch', cfg_options=options,
                          work_dir=osp.join(root, name))
        runner = build_runner(apply_train_options(cfg, resume=resume), config)
        runner.train()
        row['wrapper'] = type(runner.model).__name__
        return osp.join(root, name, f'iter_{iters}.pth')

    try:
        begin = time.perf_counter()
        straight = train('straight', 6)
        train('split', 3)
        resumed = train('split', 6, resume=osp.join(root, 'split', 'iter_3.pth'))
        diffs, finite = {}, True
        for weights in ('model', 'ema'):
            a, b = consolidate(straight, weights), consolidate(resumed, weights)
            diffs[weights] = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
            finite = finite and all(bool(torch.isfinite(v).all()) for v in a.values())
        # a GPU's atomics (attention and scatter backward) may reorder float sums
        tolerance = 1e-3 if device.type == 'cuda' else 0.0
        row.update(seconds=time.perf_counter() - begin, resume_max_diff=diffs,
                   ok=(finite and max(diffs.values()) <= tolerance
                       and row['wrapper'] == 'FullyShardedWrapper'),
                   world_size=torch.distributed.get_world_size(),
                   backend=torch.distributed.get_backend())
    except Exception as error:  # noqa: BLE001 - report and go on
        row.update(ok=False, note=f'{type(error).__name__}: {str(error)[:300]}')
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if own_group:
            end_distributed()
            os.environ.clear()
            os.environ.update(saved_env)
    return row


def attention_used(backend):
    """A layer's backend by its registered name; for 'auto', the backends it chose."""
    from flexgen.registry import ATTENTION_BACKENDS
    names = {cls: name for name, cls in ATTENTION_BACKENDS.module_dict.items()}
    chosen = getattr(backend, '_chosen', None)
    if chosen is None:
        return names.get(type(backend), type(backend).__name__)
    return 'auto -> ' + ', '.join(sorted({names.get(type(b), type(b).__name__)
                                          for b in chosen.values()}))


def profile_step(device, step, step_seconds=None, top=10):
    """One step under the profiler: the ``top`` GPU kernels by time (operators by own host
    time on a CPU), the time by kind of work (``kind_of``), and on a GPU the share of the
    step's time (``step_seconds``, measured unprofiled) that kernels kept the GPU busy."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == 'cuda'
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    if cuda:  # kernels only: an operator's device time would count its kernels again
        timed = [(e.key, e.device_time_total, e.count) for e in prof.key_averages()
                 if e.device_type == DeviceType.CUDA]
    else:
        timed = [(e.key, e.self_cpu_time_total, e.count) for e in prof.key_averages()]
    timed.sort(key=lambda item: item[1], reverse=True)
    total = sum(t for _, t, _ in timed) or 1
    by_kind = {}
    for name, t, _ in timed:
        by_kind[kind_of(name)] = by_kind.get(kind_of(name), 0.0) + t / total
    result = dict(
        top=[f'{100 * t / total:5.1f}%  {count:>5}x  {name[:70]}'
             for name, t, count in timed[:top]],
        by_kind=dict(sorted(by_kind.items(), key=lambda item: item[1], reverse=True)))
    if cuda and step_seconds:
        result['gpu_busy'] = total / 1e6 / step_seconds  # profiler times are microseconds
    return result


# ----------------------------------------------------------------------------- report
def print_table(env, rows):
    print(f"\n== {env['device_name']} | torch {env['torch']} | CUDA {env['cuda']} | "
          f"flash_attn {env['flash_attn']} | xformers {env['xformers']}")
    print('attention (bf16 forward + gradients vs per-image attention in float32):')
    print(f'  {"backend":<18}{"ms":>9}{"x limit":>9}{"TFLOP/s":>9}{"rel. error":>12}  ok')
    for r in rows:
        if r['check'] != 'attention':
            continue
        if r.get('note'):
            print(f'  {r["backend"]:<18}{"":>30}  {r["note"][:90]}')
            continue
        err = f'{r["relative_error"]:.2e}' if 'relative_error' in r else ''
        print(f'  {r["backend"]:<18}{r["ms"]:>9.2f}{r["x_limit"]:>9.2f}{r["tflops"]:>9.1f}'
              f'{err:>12}  {r["ok"]}')
    print(f'training steps (bf16 autocast, fused AdamW; MFU = (3 x forward FLOPs + REPA '
          f'encoder FLOPs) / step time / peak, {env["peak"]}):')
    print(f'  {"recipe":<30}{"step ms":>9}{"tokens/s":>11}{"MFU":>7}{"TFLOP/s":>9}'
          f'{"peak GiB":>10}{"syncs/step":>11}{"setup s":>9}')
    for r in rows:
        if r['check'] != 'train':
            continue
        if not r['ok']:
            print(f'  {r["recipe"]:<30} FAILED: {r.get("note", "")[:100]}')
            continue
        mfu = f'{100 * r["mfu"]:.1f}%' if r['mfu'] is not None else 'n/a'
        memory = f'{r["peak_memory_gib"]:.1f}' if r['peak_memory_gib'] is not None else 'n/a'
        syncs = 'n/a' if math.isnan(r['syncs_per_step']) else f'{r["syncs_per_step"]:g}'
        print(f'  {r["recipe"]:<30}{r["step_ms"]:>9.1f}{r["tokens_per_s"]:>11.0f}{mfu:>7}'
              f'{r["train_tflops"]:>9.1f}{memory:>10}{syncs:>11}{r["setup_s"]:>9.1f}')
    for r in rows:
        if r['check'] == 'sharded':
            result = (f'resumed vs straight max |diff| model {r["resume_max_diff"]["model"]:.2e}, '
                      f'EMA {r["resume_max_diff"]["ema"]:.2e} ({r["wrapper"]}, {r["backend"]}, '
                      f'{r["seconds"]:.0f} s)' if 'resume_max_diff' in r else r.get('note'))
            print(f'sharded training: {r["recipe"]}: {result}  ok {r["ok"]}')
    for r in rows:
        if r['check'] == 'train' and r.get('profile'):
            profile = r['profile']
            busy = (f'; kernels busy {100 * profile["gpu_busy"]:.0f}% of the step'
                    if 'gpu_busy' in profile else '')
            print(f'  {r["recipe"]}: {r.get("attention")}{busy}; time by kind: ' +
                  ', '.join(f'{kind} {100 * share:.0f}%'
                            for kind, share in profile['by_kind'].items()))
            for line in profile['top'][:8]:
                print(f'      {line}')


def main(argv=None):
    args = parse_args(argv)
    import importlib.util

    import torch
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    peak, peak_note = peak_flops(device)
    env = dict(torch=torch.__version__, cuda=torch.version.cuda,
               device_name=(torch.cuda.get_device_name(device) if device.type == 'cuda'
                            else 'cpu'),
               flash_attn=importlib.util.find_spec('flash_attn') is not None,
               xformers=importlib.util.find_spec('xformers') is not None, peak=peak_note,
               tiny=args.tiny)
    rows, began = [], time.perf_counter()
    if 'attention' in args.only:
        rows += check_attention(args, device)
    for name in ('nit_xl', 'nit_xl_repa', 'dit_xl', 'fitv2_xl'):
        if name in args.only:
            rows.append(check_recipe(name, args, device, peak))
    if 'nit_xl' in args.only and not args.no_compile:
        eager = next(r for r in rows if r.get('recipe') == 'nit_xl')
        rows.append(check_recipe('nit_xl', args, device, peak, compile_blocks=True,
                                 flops_per_token=eager.get('flops_per_token')))
    if 'sharded' in args.only:
        rows.append(check_sharded(args, device))
    env['seconds'] = time.perf_counter() - began
    print_table(env, rows)
    with open(args.out, 'w') as f:
        json.dump(dict(environment=env, rows=rows), f, indent=1)
    print(f'\nwrote {args.out} ({env["seconds"]:.0f} s)')
    return dict(environment=env, rows=rows)


if __name__ == '__main__':
    main()

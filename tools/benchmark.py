"""Benchmarks that print ratios measured within one run. Timings on a shared machine are
noisy: compare numbers from the same run, not across runs; candidates are timed in
interleaved rounds and compared by their median per-round ratio.

    python tools/benchmark.py [--tokens 16384] [--threads 2] [--only attention packed train
                                                             repa sampling host]

- attention: forward+backward time of each attention backend on an ImageNet-like pack of
  ``--tokens`` tokens (image sizes drawn from the native histogram of
  tools/data/imagenet_like_latent_sizes.json: DC-AE f32 latents at patch 1, as NiT), over
  the per-image limit: dense SDPA on each image alone, image after image. Backends missing
  here (GPU kernels) say why. On CPU, flex_attention has no backward: its compiled forward
  is compared with the other forwards instead. Dense masked SDPA over the whole pack costs
  (sum n)^2 and runs only with --dense-masked.
- packed: tokens/s of a training step of a small FlexDiT on the same images packed (jagged,
  the fastest backend above) and padded as FiT pads (every image to a fixed max length,
  a multiple of 256 holding the longest image; masked attention; the network runs on the
  padding too), on ``--packs`` packs, since one pack's longest image decides the padding.
- train: one training step (forward, backward, AdamW) of the demo model at the demo batch.
- host: the CPU-side figures of the GPU path: host syncs per training step (flexgen's
  engine vs mmengine's stock hooks), the per-image modulation's saved bytes at NiT-XL
  width, and torch.compile's compilations over packs (regional vs the whole backbone).
- repa: REPA's frozen encoder (a random timm ViT, ``--repa-encoder``) on the images of an
  ImageNet-like pack (``--repa-tokens`` tokens, images of 16 px per token as NiT feeds
  RADIO/16): the blocks packed once over all images vs one network call per image size.
- sampling: every generation sampler at (about) the same number of network evaluations
  (NFE): wall time per image on a tiny random FlexDiT, and accuracy on Gaussian data with
  the exact velocity (ODE samplers: error against a fine adaptive solution; SDE samplers:
  error of the sample mean and standard deviation, since they follow no single path).
"""
import argparse
import os
import os.path as osp
import statistics
import time
import warnings

# torch and flexgen are imported where they are used: --help answers without loading them.

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def timed(fn, min_run_time=1.0):
    """Median seconds per call of ``fn`` (torch.utils.benchmark handles warm-up)."""
    from torch.utils.benchmark import Timer
    return Timer(stmt='fn()', globals=dict(fn=fn)).blocked_autorange(
        min_run_time=min_run_time).median


def interleaved(candidates, rounds):
    """Seconds per call of each ``name -> fn``, measured in ``rounds`` interleaved rounds
    (one call of every candidate per round, after one warm-up call each), so that load on
    the shared machine hits all candidates alike: ``name -> [seconds per round]``."""
    import torch
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for fn in candidates.values():
        fn()
    times = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def ratio(times, name, reference):
    """Median of the per-round ratios ``name / reference`` (paired within each round)."""
    return statistics.median(a / b for a, b in zip(times[name], times[reference]))


def bench_attention(args):
    """Forward+backward of every attention backend on an ImageNet-like pack, over the
    per-image limit; returns the fastest backend's name."""
    import torch
    import torch.nn.functional as F

    from flexgen.models.layers.attention_backends import AutoAttention, build_attention_backend
    from flexgen.registry import ATTENTION_BACKENDS
    from flexgen.structures import TokenBatch
    from flexgen.utils.latent_sizes import draw_sizes
    build_attention_backend('sdpa')  # registers the optional backends' names too
    sizes = draw_sizes(args.tokens)
    n = int(sizes.prod(1).sum())
    heads, head_dim = args.heads, args.head_dim
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    batch = TokenBatch(torch.zeros(n, 1, device=device), sizes)
    g = torch.Generator().manual_seed(0)

    def randn(*shape, requires_grad=False):
        x = torch.randn(*shape, generator=g).to(device, dtype)
        return x.requires_grad_(requires_grad)

    q, k, v = (randn(n, heads, head_dim, requires_grad=True) for _ in range(3))
    grad = randn(n, heads, head_dim)
    lengths = batch.seqlens_list
    # the limit: dense SDPA on each image alone, on its own contiguous [1, H, n, d] tensors
    alone = [[randn(1, heads, n_i, head_dim, requires_grad=True) for _ in range(3)] +
             [randn(1, heads, n_i, head_dim)] for n_i in lengths]

    def limit():
        for qi, ki, vi, gi in alone:
            torch.autograd.grad(F.scaled_dot_product_attention(qi, ki, vi), (qi, ki, vi), gi)

    def fwd_bwd(attention):
        def run():
            torch.autograd.grad(attention(q, k, v, batch), (q, k, v), grad)
        return run

    candidates, notes = {'limit: per-image dense sum': limit}, {}
    for name in sorted(ATTENTION_BACKENDS.module_dict):
        if name == 'flex' and q.device.type == 'cpu':
            notes[name] = ('n/a: flex_attention has no CPU backward (it would run \'sdpa\'); '
                           'forward-only below')
            continue
        if name == 'auto':
            notes[name] = f"-> {AutoAttention.choose(q.device, q.dtype)!r} here"
            continue
        if name in ('flash_varlen', 'torch_varlen', 'xformers') and device.type != 'cuda':
            notes[name] = 'n/a: a CUDA kernel (--device cuda; pip install flexgen[gpu])'
            continue
        try:
            candidates[name] = fwd_bwd(build_attention_backend(name))
            candidates[name]()
        except (ImportError, RuntimeError, TypeError, ValueError) as error:
            candidates.pop(name, None)
            notes[name] = f'n/a ({type(error).__name__}: {str(error).split(". ")[0]})'
        if name == 'sdpa':  # the plan the default does not take here
            other = 'grouped' if device.type == 'cpu' else 'runs'
            candidates[f'sdpa, {other}'] = fwd_bwd(
                build_attention_backend(dict(type='sdpa', strategy=other)))
    times = interleaved(candidates, args.rounds)

    print(f'\n== attention: an ImageNet-like pack of {len(lengths)} images, {n} tokens '
          f'(NiT latent sizes at patch 1, {min(lengths)}..{max(lengths)} tokens, '
          f'{len(set(lengths))} distinct lengths), {heads} heads x {head_dim}, '
          f'{args.dtype} on {device}, forward+backward, {torch.get_num_threads()} threads, '
          f'median of {args.rounds} interleaved rounds; load average '
          f'{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores')
    print(f'{"backend":<28}{"ms":>10}{"x limit":>10}')
    limit_name = 'limit: per-image dense sum'
    for name in [limit_name] + sorted(set(candidates) - {limit_name} | set(notes)):
        if name in notes:
            print(f'{name:<28}{"":>10}{"":>10}   {notes[name]}'[:130])
            continue
        print(f'{name:<28}{statistics.median(times[name]) * 1e3:>10.1f}'
              f'{ratio(times, name, limit_name):>10.2f}')
    if args.dense_masked:
        ids = batch.image_ids

        def masked_whole(q_, k_, v_, batch_):
            mask = ids[:, None] == ids[None, :]
            out = F.scaled_dot_product_attention(
                q_.transpose(0, 1)[None], k_.transpose(0, 1)[None], v_.transpose(0, 1)[None],
                attn_mask=mask)
            return out[0].transpose(0, 1)

        start = time.perf_counter()
        fwd_bwd(masked_whole)()
        seconds = time.perf_counter() - start
        print(f'{"(dense masked, whole pack)":<28}{seconds * 1e3:>10.1f}'
              f'{seconds / statistics.median(times[limit_name]):>10.2f}   (one run)')
    else:
        print(f'{"(dense masked, whole pack)":<28}{"":>10}{"":>10}   not run: it costs '
              f'(sum n)^2 / sum n^2 = {n * n / sum(x * x for x in lengths):.0f}x the pairs; '
              f'--dense-masked runs it once')
    if 'flex' in ATTENTION_BACKENDS.module_dict and device.type == 'cpu' and args.flex:
        bench_flex_forward(args, batch, alone)
    # the packing backends: not 'padded' (it pads), not the forced sdpa plans
    best = min((name for name in candidates
                if name not in (limit_name, 'padded') and ',' not in name),
               key=lambda name: statistics.median(times[name]))
    print(f'fastest packed backend: {best!r} at {ratio(times, best, limit_name):.2f}x the '
          f'per-image limit (goal <= 1.15x)')
    if torch.get_num_threads() > 1 and os.getloadavg()[0] > 1.5 * os.cpu_count():
        print('   note: the machine is oversubscribed; with more than one thread, every kernel '
              'call then waits for its threads to be scheduled, so times above count kernel '
              'calls more than work (compare with --threads 1)')
    return best


def bench_flex_forward(args, batch, alone):
    """CPU only: is torch.compile-d flex_attention worth it for inference (no grad)?"""
    import torch
    import torch.nn.functional as F

    from flexgen.models.layers.attention_flex import FlexAttention
    from flexgen.registry import ATTENTION_BACKENDS
    q, k, v = (torch.randn(batch.tokens.shape[0], args.heads, args.head_dim,
                           generator=torch.Generator().manual_seed(i)).to(alone[0][0].dtype)
               for i in range(3))
    alone = [[x.detach() for x in tensors[:3]] for tensors in alone]
    flex, sdpa = FlexAttention(), ATTENTION_BACKENDS.build(dict(type='sdpa'))
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        flex(q, k, v, batch)
    compile_seconds = time.perf_counter() - start
    fell_back = [str(w.message) for w in caught if 'flex' in str(w.message)]

    def limit():
        for qi, ki, vi in alone:
            F.scaled_dot_product_attention(qi, ki, vi)

    times = interleaved({'limit': limit, 'sdpa': lambda: sdpa(q, k, v, batch),
                         'flex (compiled)': lambda: flex(q, k, v, batch)}, args.rounds)
    print(f'   forward only (inference), same pack: per-image limit '
          f'{statistics.median(times["limit"]) * 1e3:.1f} ms; sdpa '
          f'{ratio(times, "sdpa", "limit"):.2f}x; flex compiled '
          f'{ratio(times, "flex (compiled)", "limit"):.2f}x after a first call of '
          f'{compile_seconds:.1f} s (compilation)' +
          (f'; compile FAILED, flex ran sdpa: {fell_back[0][:160]}' if fell_back else ''))


def bench_packed_vs_padded(args, backend):
    """Tokens/s of a FlexDiT training step on the same images, packed vs FiT-padded, on
    ``--packs`` packs drawn with seeds 0, 1, ...: one pack is not representative, since
    whether it holds an image longer than 256 tokens decides the padded length."""
    import torch

    from flexgen.models.backbones.flex_dit import FlexDiT
    from flexgen.models.layers import PaddedAttention
    from flexgen.structures import TokenBatch
    from flexgen.utils.latent_sizes import draw_sizes
    channels, device = 32, torch.device(args.device)

    def model(attn_backend):
        torch.manual_seed(0)
        net = FlexDiT(in_channels=channels, patch_size=1, hidden_size=args.train_width,
                      depth=args.train_depth, num_heads=args.train_width // args.head_dim,
                      num_classes=1000, qk_norm='layernorm_affine', pos_embed=None,
                      rope=dict(type='AxialRoPE2D'), attn_backend=attn_backend)
        for p in net.parameters():  # random weights (DiT's zero init would skip work)
            torch.nn.init.normal_(p, std=0.02)
        net.to(device)
        return net, torch.optim.AdamW(net.parameters(), lr=1e-4)

    print(f'\n== training step, packed vs padded: FlexDiT {args.train_width} wide, '
          f'{args.train_depth} blocks, {args.train_width // args.head_dim} heads, patch 1 on '
          f'{channels}-channel latents, QK-LayerNorm + 2D RoPE, AdamW; packed: jagged, '
          f'attention {backend!r}; padded as FiT pads: every image to a fixed max length, '
          f'a multiple of 256 tokens that holds the pack\'s longest image, masked SDPA; '
          f'{torch.get_num_threads()} threads, median of {args.train_rounds} interleaved '
          f'rounds per pack')
    print(f'{"pack":>4} {"images":>6} {"tokens":>6} {"longest":>7} {"pad to":>6} '
          f'{"computed":>8} {"packed tok/s":>12} {"padded tok/s":>12} {"ratio":>6}')
    ratios = []
    for seed in range(args.packs):
        sizes = draw_sizes(args.tokens, seed=seed)
        lengths = sizes.prod(1)
        num, n = len(lengths), int(lengths.sum())
        pad_to = -(-int(lengths.max()) // 256) * 256
        valid = torch.arange(pad_to)[None, :] < lengths[:, None]
        g = torch.Generator().manual_seed(seed)
        tokens = torch.randn(n, channels, generator=g).to(device)
        target = torch.randn(n, channels, generator=g).to(device)
        t = torch.rand(num, generator=g).to(device)
        y = torch.randint(0, 1000, (num,), generator=g).to(device)
        valid = valid.to(device)

        class FiTMaskedAttention:
            """FiT's attention on [B, pad_to] slots: valid to valid, padding to padding."""

            def __call__(self, q, k, v, batch_, valid=valid):
                return PaddedAttention.attend(*(x.unflatten(0, valid.shape) for x in (q, k, v)),
                                              valid).flatten(0, 1)

        packed_net, packed_opt = model(backend)
        padded_net, padded_opt = model(FiTMaskedAttention())
        padded_tokens = tokens.new_zeros(num, pad_to, channels)
        padded_tokens[valid] = tokens
        batches = {'packed': TokenBatch(tokens, sizes),
                   # a 16-wide grid: positions do not change the cost
                   'padded': TokenBatch(padded_tokens.flatten(0, 1),
                                        torch.tensor([[pad_to // 16, 16]] * num))}
        select = {'packed': lambda out: out,
                  'padded': lambda out: out.unflatten(0, valid.shape)[valid]}

        def step(name, net, opt):
            def run():
                loss = (select[name](net(batches[name], t, y)) - target).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            return run

        times = interleaved({'packed': step('packed', packed_net, packed_opt),
                             'padded': step('padded', padded_net, padded_opt)},
                            args.train_rounds)
        ratios.append(ratio(times, 'padded', 'packed'))
        per_s = {k: n / statistics.median(v) for k, v in times.items()}
        print(f'{seed:>4} {num:>6} {n:>6} {int(lengths.max()):>7} {pad_to:>6} '
              f'{num * pad_to / n:>7.2f}x {per_s["packed"]:>12,.0f} {per_s["padded"]:>12,.0f} '
              f'{ratios[-1]:>5.2f}x')
    print(f'packed / padded tokens/s, median over {args.packs} packs: '
          f'{statistics.median(ratios):.2f}x (goal >= 2x; "computed" is the padded step\'s '
          f'tokens over the real ones, and its linear layers cost in proportion)')
    lucky = [draw_sizes(args.tokens, seed=s).prod(1).max() <= 256 for s in range(200)]
    print(f'(packs of {args.tokens} tokens whose longest image fits in 256 tokens, the '
          f'padded step\'s best case: {sum(lucky) / len(lucky):.0%} of 200 draws)')


def bench_train(args):
    import torch
    from mmengine.config import Config

    import flexgen
    from flexgen.registry import DATASETS, FUNCTIONS, MODELS
    flexgen.register_all_modules()
    cfg = Config.fromfile(args.config)
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    dataset = DATASETS.build(cfg.train_dataloader.dataset)
    size = dataset.get_size(0)
    same = [i for i in range(len(dataset)) if dataset.get_size(i) == size]
    batch_size = cfg.train_dataloader.batch_size
    collate = FUNCTIONS.get(cfg.train_dataloader.collate_fn.type)
    data = collate([dataset[i] for i in same[:batch_size]])
    data['data_samples'].update(seed=0, step=0)

    def step():
        loss, _ = model.parse_losses(model(**data, mode='loss'))  # every configured term
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    seconds = timed(step, 3.0)
    tokens = sum(x.shape[1] * x.shape[2] for x in data['inputs']) // model.patch_size ** 2
    params = sum(p.numel() for p in model.parameters())
    print(f'\n== train step: {args.config}, {params / 1e6:.2f}M params, batch {batch_size} '
          f'x {size[0]}x{size[1]} px ({tokens} tokens)')
    print(f'{seconds * 1e3:.1f} ms/step, {tokens / seconds:,.0f} tokens/s, '
          f'{batch_size / seconds:,.1f} images/s')


def sampler_table(nfe):
    """``(name, sampler)`` pairs with (about) ``nfe`` network evaluations each."""
    from flexgen.samplers.ode import AdaptiveODE, EulerODE, HeunODE
    from flexgen.samplers.sde import EulerMaruyamaSDE, HeunSDE
    half = (nfe + 1) // 2
    return [(f'EulerODE({nfe})', EulerODE(num_steps=nfe)),
            (f'HeunODE({half})', HeunODE(num_steps=half)),  # 2 half - 1: last step Euler
            ('AdaptiveODE', AdaptiveODE(atol=1e-6, rtol=1e-3)),
            (f'EulerMaruyamaSDE({nfe})', EulerMaruyamaSDE(num_steps=nfe)),
            (f'HeunSDE({half})', HeunSDE(num_steps=half))]


class CountingModel:
    """Wraps a ``model_fn`` and counts its calls (NFE)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, x, t):
        self.calls += 1
        return self.fn(x, t)


def bench_repa(args):
    import numpy as np
    import torch

    from flexgen.models.vision_encoders import TimmViTEncoder
    from flexgen.utils.latent_sizes import draw_sizes
    device = torch.device(args.device)
    encoders = {name: TimmViTEncoder(args.repa_encoder, packed=packed).to(device)
                for name, packed in (('packed', True), ('per size', False))}  # same weights
    grids = draw_sizes(args.repa_tokens, seed=0).tolist()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (16 * h, 16 * w, 3), dtype=np.uint8) for h, w in grids]
    times = interleaved({name: (lambda e=e: e(images, grids)) for name, e in encoders.items()},
                        args.train_rounds)
    print(f'\n== REPA encoder ({args.repa_encoder}, random weights, {device}) on the images of '
          f'an ImageNet-like pack: {len(grids)} images of {len({tuple(g) for g in grids})} '
          f'sizes, {sum(h * w for h, w in grids)} patches')
    for name in times:
        print(f'   {name:<9} {statistics.median(times[name]):.3f} s')
    print(f'   packed / one call per size: {ratio(times, "packed", "per size"):.2f}x the time')


def bench_sampling(args):
    import math
    import statistics
    import time

    import torch

    from flexgen.models.generator import DiffusionGenerator
    from flexgen.samplers.ode import AdaptiveODE, dopri5
    from flexgen.structures import patchify
    from flexgen.transports.interpolants import Interpolant
    transport = Interpolant('linear', 'velocity')
    nfe, n_img, size = args.nfe, args.sampling_images, args.sampling_size
    model = DiffusionGenerator(
        backbone=dict(type='FlexDiT', in_channels=4, patch_size=2, hidden_size=128, depth=4,
                      num_heads=4, num_classes=10, pos_embed=None,
                      rope=dict(type='AxialRoPE2D')),
        transport=dict(type='RectifiedFlow')).eval()
    with torch.no_grad():  # random weights everywhere (DiT's zero init would output zeros)
        g = torch.Generator().manual_seed(0)
        for p in model.backbone.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    batch = patchify([torch.randn(4, size, size, generator=torch.Generator().manual_seed(i))
                      for i in range(n_img)], 2)
    labels = torch.arange(n_img) % 10

    def network_fn(x, t):
        return model.network(batch.replace(x), torch.full((n_img,), float(t)), labels)

    def seeded_noise(seed):
        g = torch.Generator().manual_seed(seed)
        return lambda x: torch.randn(x.shape, generator=g, dtype=x.dtype)

    # Gaussian data N(mu, s^2) per dimension on the linear path, exact velocity.
    mu, s, n = 1.5, 0.5, 4096

    def gaussian_velocity(x, t):
        a = 1 - t
        var = a * a * s * s + t * t
        return t / var * (x - a * mu) - (mu + a * s * s / var * (x - a * mu))

    z = torch.randn(n, 1, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    fine = dopri5(gaussian_velocity, z, 1.0, 0.0, atol=1e-12, rtol=1e-12)
    gap = (fine - (mu + s * z)).abs().max().item()

    rows = []
    for name, sampler in sampler_table(nfe):
        counted = CountingModel(network_fn)
        with torch.no_grad():
            sampler(counted, transport, batch.tokens, noise_like=seeded_noise(1))  # warm-up
        rows.append(dict(name=name, sampler=sampler, nfe=counted.calls, seconds=[]))
    # the machine is shared: interleave the samplers over rounds and keep each one's median
    for _ in range(args.sampling_rounds):
        for row in rows:
            start = time.perf_counter()
            with torch.no_grad():
                row['sampler'](network_fn, transport, batch.tokens, noise_like=seeded_noise(1))
            row['seconds'].append(time.perf_counter() - start)

    print(f'\n== sampling at an NFE budget of {nfe}. Time: a tiny random FlexDiT (128 wide, '
          f'4 deep), {n_img} images of {size}x{size}x4 latents ({batch.tokens.shape[0]} tokens),'
          f' no guidance, threads: {torch.get_num_threads()}, median of '
          f'{args.sampling_rounds} interleaved rounds.')
    print(f'   Accuracy: Gaussian data N({mu}, {s}^2) with the exact velocity (a closed form, '
          f'not a network), {n} samples. ODE rows: RMS / max error against dopri5 at '
          f'rtol=atol=1e-12 (itself {gap:.0e} from the closed form). SDE rows: |mean - mu| and '
          f'|std - s| of the samples (no single path to compare; sampling noise '
          f'~{s / math.sqrt(n):.0e}). AdaptiveODE: SiT\'s tolerance (rtol 1e-3, atol 1e-6) '
          f'on the FlexDiT; on the Gaussian the loosest rtol 10^-k that spends >= the budget.')
    print(f'{"sampler":<24}{"NFE":>5}{"ms/image":>10}{"ms/img/NFE":>12}{"NFE(gauss)":>12}'
          f'   error (Gaussian)')
    for row in rows:
        sampler, seconds = row['sampler'], statistics.median(row['seconds'])
        if isinstance(sampler, AdaptiveODE):
            rtol = next(r for r in (10.0 ** -k for k in range(2, 12))
                        if _gaussian_nfe(r, gaussian_velocity, z) >= nfe)
            sampler = AdaptiveODE(atol=rtol * 1e-3, rtol=rtol)
        gauss = CountingModel(gaussian_velocity)
        out = sampler(gauss, transport, z.clone(), noise_like=seeded_noise(3))
        if hasattr(sampler, 'diffusion_form'):
            error = (f'mean {abs(out.mean().item() - mu):.1e}  '
                     f'std {abs(out.std().item() - s):.1e}')
        else:
            error = (f'rms {(out - fine).pow(2).mean().sqrt().item():.1e}  '
                     f'max {(out - fine).abs().max().item():.1e}')
            if isinstance(sampler, AdaptiveODE):
                error += f'  (rtol {sampler.rtol:.0e})'
        print(f'{row["name"]:<24}{row["nfe"]:>5}{seconds / n_img * 1e3:>10.2f}'
              f'{seconds / n_img / row["nfe"] * 1e3:>12.3f}{gauss.calls:>12}   {error}')


def _gaussian_nfe(rtol, velocity, z):
    from flexgen.samplers.ode import dopri5
    return dopri5(velocity, z, 1.0, 0.0, atol=rtol * 1e-3, rtol=rtol,
                  return_info=True)[1]['nfe']


def bench_host(args):
    """The CPU-side figures of the GPU path: host syncs per training step (flexgen's engine
    vs mmengine's stock EMAHook / OptimWrapper / RuntimeInfoHook, on the tiny packed NiT
    config), saved bytes of the per-image modulation at NiT-XL width, and compilations of
    regional vs whole-backbone torch.compile over packs of other lengths."""
    import uuid

    import torch

    from flexgen.apis.runners import apply_train_options, build_runner, load_config
    from flexgen.utils.host_sync import count_training_syncs
    from flexgen.utils.latent_sizes import draw_sizes
    steps, log_every = 9, 4

    def syncs(stock):
        config = osp.join(ROOT, 'configs', 'nit', 'nit_tiny_shapes_pack.py')
        options = {'model.backbone.hidden_size': 32, 'model.backbone.depth': 2,
                   'model.backbone.num_heads': 2, 'train_dataloader.dataset.num_samples': 400,
                   'train_dataloader.batch_sampler.max_tokens': 512,
                   'train_cfg.max_iters': steps, 'default_hooks.logger.interval': log_every,
                   'default_hooks.checkpoint.interval': 1000,
                   'default_hooks.checkpoint.save_last': False, 'val_cfg': None,
                   'val_dataloader': None, 'val_evaluator': None,
                   'experiment_name': f'bench_{uuid.uuid4().hex[:8]}'}
        if stock:
            options.update({
                'custom_hooks': [dict(type='EMAHook', momentum=1e-3, priority='ABOVE_NORMAL')],
                'optim_wrapper.type': 'OptimWrapper',
                'default_hooks.runtime_info.type': 'RuntimeInfoHook'})
        # as tools/train.py builds it
        cfg = load_config(config, cfg_options=options,
                          work_dir=f'/tmp/flexgen_bench_{uuid.uuid4().hex[:8]}')
        runner = build_runner(apply_train_options(cfg), config)
        events = count_training_syncs(runner).events
        return len(events['step']), len(events['engine'])

    print(f'\n== host syncs over training steps 2..{steps} of configs/nit/nit_tiny_shapes_pack.py '
          f'(logger every {log_every}; counted on CPU by flexgen.utils.HostSyncCounter)')
    for label, stock in (("flexgen's engine (FlexEMAHook, FlexOptimWrapper, step scalars "
                          'flushed at logging)', False),
                         ("mmengine's stock EMAHook, OptimWrapper, RuntimeInfoHook", True)):
        step_syncs, engine_syncs = syncs(stock)
        print(f'   {label}: model hot path {step_syncs}, engine {engine_syncs} '
              f'({engine_syncs / (steps - 1):.2f} per step)')

    # modulation: saved bytes of one modulate + gate pair at NiT-XL width on a pack
    from flexgen.models.layers import gate, modulate
    from flexgen.structures import TokenBatch
    sizes = draw_sizes(args.tokens)
    batch = TokenBatch(torch.zeros(int(sizes.prod(1).sum()), 1), sizes)
    n, width = batch.tokens.shape[0], 1152
    x = torch.randn(n, width, requires_grad=True)
    shift, scale, g = (torch.randn(len(sizes), width, requires_grad=True) for _ in range(3))

    def saved(fn):
        total = []
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: total.append(t.numel() * t.element_size()) or t, lambda t: t):
            fn()
        return sum(total)

    ids = batch.image_ids
    ours = saved(lambda: gate(modulate(x, shift, scale, batch), g, batch))
    gathered = saved(lambda: (x * (1 + scale[ids]) + shift[ids]) * g[ids])
    print(f'\n== modulation, {n} tokens x {width} (NiT-XL width), modulate + gate: saved for '
          f'backward {ours / 2**20:.0f} MiB per-image (flexgen) vs {gathered / 2**20:.0f} MiB '
          f'with per-token gathers; a block has two such pairs ({2 * (gathered - ours) / 2**20:.0f}'
          f' MiB less per block, {56 * (gathered - ours) / 2**30:.1f} GiB over 28 blocks)')

    # compilations over packs of other lengths
    from torch._dynamo.utils import counters
    from flexgen.registry import MODELS
    from flexgen.structures import patchify
    cfg = dict(type='FlexDiT', in_channels=3, patch_size=2, hidden_size=32, depth=3,
               num_heads=2, num_classes=6, pos_embed=None,
               qk_norm=dict(type='layernorm_affine', eps=1e-5),
               rope=dict(type='AxialRoPE2D', layout='nit'), attn_backend='sdpa')

    def compilations(make):
        torch._dynamo.reset()
        counters.clear()
        model = make()
        start = time.perf_counter()
        for step in range(5):
            g_ = torch.Generator().manual_seed(step)
            count = 3 + step
            images = [torch.randn(3, 2 * (2 + (3 * i + step) % 5), 2 * (2 + (5 * i + step) % 4),
                                  generator=g_) for i in range(count)]
            out = model(patchify(images, 2), torch.rand(count), torch.randint(0, 6, (count,)))
            out.pow(2).mean().backward()
        return counters['frames']['total'], time.perf_counter() - start

    regional = compilations(lambda: MODELS.build(dict(cfg, compile_blocks=True)))
    whole = compilations(lambda: torch.compile(MODELS.build(cfg), dynamic=True))
    print(f'\n== torch.compile over 5 packs of 3-7 images (tiny FlexDiT, CPU): regional '
          f'(compile_blocks=True) {regional[0]} frame compilations in {regional[1]:.0f} s; '
          f'the whole backbone (torch.compile(model, dynamic=True)) {whole[0]} in '
          f'{whole[1]:.0f} s')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--only', nargs='+',
                        choices=['attention', 'packed', 'train', 'repa', 'sampling', 'host'],
                        default=['attention', 'packed', 'train', 'repa', 'sampling', 'host'],
                        metavar='SECTION', help='sections to run (default: all): attention, '
                        'packed, train, repa, sampling, host')
    parser.add_argument('--repa-encoder', default='vit_small_patch16_224',
                        help='repa: the timm ViT (random weights; RADIO v2.5-H is '
                        'vit_huge_patch16_224)')
    parser.add_argument('--repa-tokens', type=int, default=4096,
                        help="repa: tokens of the pack whose images the encoder sees")
    parser.add_argument('--tokens', type=int, default=16384,
                        help='attention / packed: tokens in the ImageNet-like pack')
    parser.add_argument('--rounds', type=int, default=7, help='attention: interleaved rounds')
    parser.add_argument('--device', default='cpu', help='attention / packed: cpu or cuda')
    parser.add_argument('--dtype', default='float32',
                        help="attention: e.g. 'bfloat16' for flash-attn on cuda")
    parser.add_argument('--dense-masked', action='store_true',
                        help='attention: also time dense masked SDPA over the whole pack once')
    parser.add_argument('--no-flex', dest='flex', action='store_false',
                        help='attention: skip the compiled flex forward on CPU (compiles ~20 s)')
    parser.add_argument('--train-width', type=int, default=256,
                        help='packed: width of the FlexDiT')
    parser.add_argument('--train-depth', type=int, default=2,
                        help='packed: blocks of the FlexDiT')
    parser.add_argument('--train-rounds', type=int, default=5,
                        help='packed: interleaved rounds per pack')
    parser.add_argument('--packs', type=int, default=5,
                        help='packed: how many packs (seeds 0, 1, ...) to time')
    parser.add_argument('--heads', type=int, default=4, help='attention / packed: heads')
    parser.add_argument('--head-dim', type=int, default=64,
                        help='attention / packed: channels per head')
    parser.add_argument('--threads', type=int, nargs='+', default=[2],
                        help='attention runs once per value; the other sections use the first')
    parser.add_argument('--config', default='configs/demo/shapes_flexdit_rf.py',
                        help='train: the config whose model and batch are timed')
    parser.add_argument('--nfe', type=int, default=32, help='sampling: evaluations per sampler')
    parser.add_argument('--sampling-images', type=int, default=8,
                        help='sampling: images generated together')
    parser.add_argument('--sampling-size', type=int, default=16, help='latent side (pixels/8)')
    parser.add_argument('--sampling-rounds', type=int, default=5,
                        help='sampling: interleaved rounds')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import torch
    best = 'auto'
    if 'attention' in args.only:
        for threads in args.threads[::-1]:
            torch.set_num_threads(threads)
            best = bench_attention(args)
    torch.set_num_threads(args.threads[0])
    if 'packed' in args.only:
        bench_packed_vs_padded(args, best)
    if 'train' in args.only:
        bench_train(args)
    if 'repa' in args.only:
        bench_repa(args)
    if 'sampling' in args.only:
        bench_sampling(args)
    if 'host' in args.only:
        bench_host(args)


if __name__ == '__main__':
    main()

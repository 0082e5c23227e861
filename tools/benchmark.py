"""Benchmarks that print ratios measured in one run (this machine is shared and noisy:
compare numbers from the same run, not across runs).

    python tools/benchmark.py [--tokens 4096] [--threads 2] [--only attention train]

- attention: forward+backward time of each attention backend on a variable-size batch
  drawn from the ImageNet-like size histogram (tools/data/imagenet_like_latent_sizes.json),
  over the limit: the sum of dense attention timed image by image. The dense masked SDPA
  over the whole concatenated batch is shown for contrast (it costs (sum n)^2).
- train: one training step (forward, backward, AdamW) of the demo model at the demo batch.
- sampling: every generation sampler at (about) the same number of network evaluations
  (NFE): wall time per image on a tiny random FlexDiT, and accuracy on Gaussian data with
  the exact velocity (ODE samplers: error against a fine adaptive solution; SDE samplers:
  error of the sample mean and standard deviation, since they follow no single path).
"""
import argparse
import json
import os.path as osp

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer

from flexgen.registry import ATTENTION_BACKENDS
from flexgen.structures import TokenBatch

HISTOGRAM = osp.join(osp.dirname(__file__), 'data', 'imagenet_like_latent_sizes.json')


def timed(fn, min_run_time=1.0):
    """Median seconds per call of ``fn`` (torch.utils.benchmark handles warm-up)."""
    return Timer(stmt='fn()', globals=dict(fn=fn)).blocked_autorange(
        min_run_time=min_run_time).median


def draw_sizes(total_tokens, seed=0):
    """Image sizes (h, w) in tokens drawn from the native histogram until ``total_tokens``."""
    table = json.load(open(HISTOGRAM))['native']
    sizes = torch.tensor([[h, w] for h, w, _ in table])
    counts = torch.tensor([c for _, _, c in table], dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    chosen, used = [], 0
    while True:
        h, w = sizes[torch.multinomial(counts, 1, generator=g)].squeeze(0).tolist()
        if used + h * w > total_tokens:
            return torch.tensor(chosen)
        chosen.append((h, w))
        used += h * w


def bench_attention(args):
    ATTENTION_BACKENDS.import_from_location()
    sizes = draw_sizes(args.tokens)
    n = int(sizes.prod(1).sum())
    heads, head_dim = args.heads, args.head_dim
    batch = TokenBatch(torch.zeros(n, 1), sizes)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, heads, head_dim, generator=g, requires_grad=True)
               for _ in range(3))
    grad = torch.randn(n, heads, head_dim, generator=g)

    def fwd_bwd(attention):
        def run():
            out = attention(q, k, v, batch)
            torch.autograd.grad(out, (q, k, v), grad)
        return run

    def dense_alone(length):
        qi, ki, vi = (torch.randn(1, heads, length, head_dim, requires_grad=True)
                      for _ in range(3))
        gi = torch.randn(1, heads, length, head_dim)

        def run():
            torch.autograd.grad(F.scaled_dot_product_attention(qi, ki, vi), (qi, ki, vi), gi)
        return run

    lengths = batch.seqlens_list
    per_length = {n_i: timed(dense_alone(n_i), 0.2) for n_i in sorted(set(lengths))}
    limit = sum(per_length[n_i] for n_i in lengths)

    def masked_whole(q_, k_, v_, batch_):
        ids = batch_.image_ids
        mask = ids[:, None] == ids[None, :]
        out = F.scaled_dot_product_attention(q_.transpose(0, 1)[None], k_.transpose(0, 1)[None],
                                             v_.transpose(0, 1)[None], attn_mask=mask)
        return out[0].transpose(0, 1)

    print(f'\n== attention: {len(lengths)} images, {n} tokens (sizes {min(lengths)}..'
          f'{max(lengths)} tokens), {heads} heads x {head_dim}, forward+backward, '
          f'{torch.get_num_threads()} threads')
    print(f'{"backend":<28}{"ms":>10}{"x limit":>10}')
    print(f'{"limit: per-image dense sum":<28}{limit * 1e3:>10.2f}{1.0:>10.2f}')
    for name in sorted(ATTENTION_BACKENDS.module_dict):
        try:
            seconds = timed(fwd_bwd(ATTENTION_BACKENDS.build(dict(type=name))))
        except (ImportError, RuntimeError) as error:  # GPU-only backends on a CPU machine
            print(f'{name:<28}{"n/a":>10}   ({type(error).__name__}: {error})'[:110])
            continue
        print(f'{name:<28}{seconds * 1e3:>10.2f}{seconds / limit:>10.2f}')
    seconds = timed(fwd_bwd(masked_whole))
    print(f'{"(dense masked, whole batch)":<28}{seconds * 1e3:>10.2f}{seconds / limit:>10.2f}')


def bench_train(args):
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
        loss = model(**data, mode='loss')['loss']
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


def bench_sampling(args):
    import math
    import statistics
    import time

    from flexgen.models.generator import DiffusionGenerator
    from flexgen.samplers.ode import AdaptiveODE, dopri5
    from flexgen.structures import patchify
    try:
        from flexgen.schedulers.interpolants import Interpolant
        transport = Interpolant('linear', 'velocity')
    except ImportError:  # before interpolants existed: no score, so no SDE rows
        from flexgen.schedulers import RectifiedFlow
        transport = RectifiedFlow()
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
        if hasattr(sampler, 'diffusion_form') and not hasattr(transport, 'score'):
            continue
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--only', nargs='+', choices=['attention', 'train', 'sampling'],
                        default=['attention', 'train', 'sampling'])
    parser.add_argument('--tokens', type=int, default=4096, help='tokens in the attention batch')
    parser.add_argument('--heads', type=int, default=4)
    parser.add_argument('--head-dim', type=int, default=64)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--config', default='configs/demo/shapes_flexdit_rf.py')
    parser.add_argument('--nfe', type=int, default=32, help='sampling: evaluations per sampler')
    parser.add_argument('--sampling-images', type=int, default=8)
    parser.add_argument('--sampling-size', type=int, default=16, help='latent side (pixels/8)')
    parser.add_argument('--sampling-rounds', type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if 'attention' in args.only:
        bench_attention(args)
    if 'train' in args.only:
        bench_train(args)
    if 'sampling' in args.only:
        bench_sampling(args)


if __name__ == '__main__':
    main()

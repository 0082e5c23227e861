"""Benchmarks that print ratios measured in one run (this machine is shared and noisy:
compare numbers from the same run, not across runs).

    python tools/benchmark.py [--tokens 4096] [--threads 2] [--only attention train]

- attention: forward+backward time of each attention backend on a variable-size batch
  drawn from the ImageNet-like size histogram (tools/data/imagenet_like_latent_sizes.json),
  over the limit: the sum of dense attention timed image by image. The dense masked SDPA
  over the whole concatenated batch is shown for contrast (it costs (sum n)^2).
- train: one training step (forward, backward, AdamW) of the demo model at the demo batch.
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--only', nargs='+', choices=['attention', 'train'],
                        default=['attention', 'train'])
    parser.add_argument('--tokens', type=int, default=4096, help='tokens in the attention batch')
    parser.add_argument('--heads', type=int, default=4)
    parser.add_argument('--head-dim', type=int, default=64)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--config', default='configs/demo/shapes_flexdit_rf.py')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if 'attention' in args.only:
        bench_attention(args)
    if 'train' in args.only:
        bench_train(args)


if __name__ == '__main__':
    main()

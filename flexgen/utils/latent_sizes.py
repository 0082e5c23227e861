"""ImageNet-like packs for the benchmarks (``tools/benchmark.py``, ``tools/gpu_check.py``):
image sizes drawn from the native size histogram of NiT's DC-AE f32 latents, kept in the
repository as ``tools/data/imagenet_like_latent_sizes.json`` (``{kind: [[h, w, count],
...]}``, sizes in latent pixels = tokens at patch 1)."""
import functools
import json
import os.path as osp

IMAGENET_LIKE_SIZES = osp.join(osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))),
                               'tools', 'data', 'imagenet_like_latent_sizes.json')


@functools.lru_cache(maxsize=None)
def native_histogram(path: str = IMAGENET_LIKE_SIZES):
    """Sizes ``[K, 2]`` (tokens) and image counts ``[K]`` of the histogram's native kind."""
    import torch
    with open(path) as f:
        table = json.load(f)['native']
    return (torch.tensor([[h, w] for h, w, _ in table]),
            torch.tensor([c for _, _, c in table], dtype=torch.float64))


def draw_sizes(total_tokens: int, seed: int = 0, path: str = IMAGENET_LIKE_SIZES):
    """Image sizes ``(h, w)`` in tokens drawn from the native histogram until
    ``total_tokens``: a ``[N, 2]`` tensor whose areas sum to at most ``total_tokens``."""
    import torch
    sizes, counts = native_histogram(path)
    g = torch.Generator().manual_seed(seed)
    chosen, used = [], 0
    while True:
        h, w = sizes[torch.multinomial(counts, 1, generator=g)].squeeze(0).tolist()
        if used + h * w > total_tokens:
            return torch.tensor(chosen)
        chosen.append((h, w))
        used += h * w

"""Small helpers shared by the model tests."""
import torch


def randomise(module, seed=0, std=0.1):
    """Overwrite every parameter with seeded N(0, std^2) values (the zero-initialised
    adaLN and output layers would otherwise hide most of the computation)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module

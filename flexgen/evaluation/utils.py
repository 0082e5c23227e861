"""What the evaluators share: 8-bit pixels, size keys, the cache folder, weight digests."""
import hashlib
import os
import os.path as osp
from typing import Dict, Tuple

import numpy as np
import torch

from flexgen.utils.images import to_uint8  # noqa: F401 (re-exported: the evaluators' pixels)


def size_key(size) -> str:
    """``(H, W)`` -> ``'HxW'``, the suffix of per-size metric names and file names."""
    h, w = (int(x) for x in size)
    return f'{h}x{w}'


def parse_size_key(key: str) -> Tuple[int, int]:
    """``'HxW'`` -> ``(H, W)``; a ValueError naming the key otherwise."""
    try:
        h, w = (int(x) for x in key.lower().split('x'))
    except ValueError:
        raise ValueError(f"size {key!r} is not 'HxW' (e.g. '256x256')") from None
    if h < 1 or w < 1:
        raise ValueError(f"size {key!r} must have positive sides")
    return h, w


def user_cache_dir(*parts: str) -> str:
    """flexgen's cache of things computed once and reused by any run from any folder
    (classifier judges, reference statistics): ``$FLEXGEN_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/flexgen``, else ``~/.cache/flexgen``; ``parts`` appended."""
    root = os.environ.get('FLEXGEN_CACHE_DIR')
    if not root:
        base = os.environ.get('XDG_CACHE_HOME') or osp.join(osp.expanduser('~'), '.cache')
        root = osp.join(base, 'flexgen')
    return osp.join(root, *parts)


def hwc_uint8(images) -> np.ndarray:
    """A stack of images as numpy uint8 ``[N, H, W, 3]`` (ADM's layout) from a tensor
    ``[N, 3, H, W]`` in [0, 1] or uint8."""
    return to_uint8(images).permute(0, 2, 3, 1).contiguous().cpu().numpy()


def state_dict_digest(state: Dict[str, torch.Tensor]) -> str:
    """A sha256 of a state dict (names, dtypes, shapes, values): what anything computed
    with these weights is keyed by. Sharded tensors (FSDP's DTensors) are gathered first,
    a collective: under FSDP every rank must call this."""
    digest = hashlib.sha256()
    for name in sorted(state):
        value = state[name].detach()
        if hasattr(value, 'full_tensor'):
            value = value.full_tensor()
        value = value.cpu().contiguous()
        digest.update(f'{name}:{value.dtype}:{tuple(value.shape)};'.encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()

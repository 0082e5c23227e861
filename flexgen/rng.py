"""Keyed random numbers: every draw is a pure function of integer keys.

flexgen never draws from a global RNG or from generator state carried between steps. An
image's noise, time and label drop at training step ``s`` are functions of ``(seed, s,
dataset index)``; a generated image's noise of its request seed; a data sampler's order of
``(seed, epoch)``. So a number does not depend on which batch or process an image lands
in, on resuming, or on how many images were drawn before it.

One hash serves every use: :func:`mix` turns any integers (Python ints or int64 tensors,
broadcast) into 62-bit keys with tensor operations, so keys and draws are computed where
the data lives (on the GPU in training: no host round trip, no kernel per image).

- :func:`keyed_generator`: a ``torch.Generator`` seeded by ``mix(*keys)``, for host-side
  draws (permutations of a data sampler).
- :class:`KeyedDraws`: counter-based draws of a batch of keys (Salmon et al. 2011,
  "Parallel random numbers: as easy as 1, 2, 3": the ``n``-th number of key ``k`` is
  ``hash(k, n)``), uniform or normal (Box-Muller), per key or per token.

The hash is a chain of 32-bit avalanche steps (``lowbias32``, C. Wellons' hash
prospector), written with int64 tensor operations that never overflow, so CPU and GPU
compute the same keys bit for bit.
"""
import math
import zlib
from typing import Union

import torch
from torch import Tensor

_M32 = 0xFFFFFFFF
_M31 = 0x7FFFFFFF
_M62 = (1 << 62) - 1
_GOLDEN = 0x9E3779B9
_LANES = (0x85EBCA6B, 0xC2B2AE35)  # two salts: a key is two independent 31-bit lanes

Key = Union[int, Tensor]


def _mul32(x, c: int):
    """``x * c mod 2**32`` for ``0 <= x < 2**32`` (a Python int or an int64 tensor) without
    int64 overflow (16-bit halves of ``c``: every product stays below ``2**48``)."""
    low, high = c & 0xFFFF, c >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & _M32


def _avalanche(x):
    """``lowbias32``: a bijection of 32-bit values in which every input bit flips about
    half of the output bits (Python ints and int64 tensors alike)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _absorb(h, word):
    return _avalanche((_avalanche(h) + word + _GOLDEN) & _M32)


def _words(key: Key):
    """A key (taken modulo ``2**62``) as its two 31-bit words: Python ints, or int64
    tensors."""
    if isinstance(key, Tensor):
        key = (key if key.dtype == torch.int64 else key.to(torch.int64)) & _M62
    else:
        key = int(key) & _M62
    return key & _M31, key >> 31


def _flatten(keys):
    for key in keys:
        if isinstance(key, (tuple, list)):
            yield from _flatten(key)
        else:
            yield key


def stream_id(name: str) -> int:
    """A stable integer for a named stream of draws (``'noise'``, ``'time'``, ...)."""
    return zlib.crc32(name.encode())


def mix(*keys: Key) -> Tensor:
    """One 62-bit key (int64, ``>= 0``) from integers: Python ints (any size: taken
    modulo ``2**62``; tuples of them are flattened) or int64 tensors, broadcast
    together, on the tensors' device.
    Different key sequences give independent keys (order matters). Leading Python ints
    are hashed in Python, so ``mix(seed, step, index)`` costs a few tensor operations."""
    if not keys:
        raise ValueError('mix: needs at least one key')
    words = [w for k in _flatten(keys) for w in _words(k)]
    lanes = []
    for salt in _LANES:
        h = salt
        for word in words:
            h = _absorb(h, word)
        lanes.append(h >> 1)  # 31 bits
    key = (lanes[0] << 31) | lanes[1]
    return key if isinstance(key, Tensor) else torch.tensor(key, dtype=torch.int64)


def keyed_generator(*keys: Key) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded by ``mix(*keys)`` (host-side draws such as a data
    sampler's permutation of epoch ``e``: ``keyed_generator(seed, e)``)."""
    key = mix(*keys)
    if key.dim():
        raise ValueError(f'keyed_generator: keys must be scalars, got shape {tuple(key.shape)}')
    return torch.Generator().manual_seed(int(key))


def _uniform(bits: Tensor, dtype=torch.float32) -> Tensor:
    """32 random bits -> a uniform in the open interval (0, 1) (24 bits in float32, 32 in
    float64), never 0 (so ``log`` is finite) nor 1."""
    if dtype == torch.float64:
        return (bits.to(torch.float64) + 0.5) * 2.0 ** -32
    return ((bits >> 8).to(torch.float32) + 0.5) * 2.0 ** -24


class KeyedDraws:
    """Draws for a batch of keys ``[B]`` (int64, from :func:`mix`), each a function of
    its key, a stream name and a counter only.

    Args:
        keys: ``[B]`` int64 keys, on the device the draws are wanted on.
    """

    def __init__(self, keys: Tensor):
        if not isinstance(keys, Tensor) or keys.dtype != torch.int64 or keys.dim() != 1:
            raise TypeError('KeyedDraws: keys must be a 1-D int64 tensor (see flexgen.rng.mix)')
        self.keys = keys

    def _lanes(self, stream: str, rows, dims: int):
        """The two 31-bit lanes of each key's ``stream`` key, hashed once per call and
        shaped to broadcast against ``dims``-dimensional counters; ``rows`` picks each
        counter's key (default: counters ``[B, ...]`` line up with the keys)."""
        base = mix(self.keys, stream_id(stream))
        if rows is not None:
            base = base[rows]
        while base.dim() < dims:
            base = base.unsqueeze(-1)
        return base >> 31, base & _M31

    def _normal_pairs(self, stream: str, counters: Tensor, rows=None):
        """Two standard normals per counter (Box-Muller's cosine and sine) from a uniform of
        each lane: a pair depends on all 62 bits of the stream key."""
        high, low = self._lanes(stream, rows, counters.dim())
        return _box_muller(_uniform(_absorb(high, counters)), _uniform(_absorb(low, counters)))

    def uniform(self, stream: str, dtype=torch.float32) -> Tensor:
        """One uniform in (0, 1) per key, ``[B]``."""
        zero = torch.zeros(len(self.keys), dtype=torch.int64, device=self.keys.device)
        high, _ = self._lanes(stream, None, zero.dim())
        return _uniform(_absorb(high, zero), dtype)

    def normal(self, stream: str) -> Tensor:
        """One standard normal per key, ``[B]`` float32 (Box-Muller)."""
        zero = torch.zeros(len(self.keys), dtype=torch.int64, device=self.keys.device)
        return self._normal_pairs(stream, zero)[0]

    def normal_tokens(self, stream: str, image_ids: Tensor, local_index: Tensor,
                      width: int) -> Tensor:
        """Standard normals ``[N, width]`` float32 for the tokens of a jagged batch: token
        ``j`` of image ``b`` (``image_ids[n] = b``, ``local_index[n] = j``) gets pairs
        ``j * ceil(width / 2) + c`` of key ``b``'s stream, whatever else is in the batch.
        Each pair of uniforms gives two normals (Box-Muller's cosine and sine)."""
        pairs = (width + 1) // 2
        counter = local_index[:, None] * pairs + torch.arange(pairs, device=local_index.device)
        z_cos, z_sin = self._normal_pairs(stream, counter, image_ids)
        return torch.stack([z_cos, z_sin], dim=-1).flatten(1)[:, :width]


def _box_muller(u1: Tensor, u2: Tensor):
    """Two independent uniforms in (0, 1) -> two independent standard normals (Box &
    Muller 1958): ``r cos(2 pi u2)``, ``r sin(2 pi u2)`` with ``r = sqrt(-2 ln u1)``."""
    radius, angle = torch.sqrt(-2 * torch.log(u1)), (2 * math.pi) * u2
    return radius * torch.cos(angle), radius * torch.sin(angle)


def uniforms(*keys: Key, dtype=torch.float64) -> Tensor:
    """Uniforms in (0, 1), one per element of the broadcast keys: a pure function of
    ``keys`` (host-side per-item draws such as a dataset's flip of item ``i``:
    ``uniforms(seed, i, stream_id('flip'))``)."""
    return _uniform(mix(*keys) & _M32, dtype)

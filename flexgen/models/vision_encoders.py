"""Frozen vision encoders for REPA (Yu et al. 2024): patch features of an image, on the token
grid of the diffusion transformer, at any resolution.

One interface: ``encoder(images, grids) -> [Tensor[h*w, z_dim]]``, one per image, where
``images`` are ``[3, H, W]`` float in [-1, 1] (flexgen's pixel convention; uint8 arrays
``[H, W, 3]`` / tensors ``[3, H, W]`` as datasets return them are accepted too) and ``grids``
the ``(h, w)`` token grid each image's features must cover, rows in row-major order (the
order of the image's tokens in a :class:`~flexgen.structures.TokenBatch`).

How the encoder's patch grid meets the token grid (``align``):

- ``'image'`` (default): the image is resized (``interpolation``, REPA: bicubic, no
  antialias) to ``(h * p, w * p)`` pixels, ``p`` the encoder's patch size, so the encoder
  sees exactly ``h x w`` patches and no feature is interpolated. This is REPA's rule
  (DINOv2-B/14 at 224 px for SiT's 16x16 tokens of a 256 px image; 448 px at 512) and
  NiT's (RADIO/16 on images of ``16 * latent`` pixels), generalised to any aspect ratio.
- ``'features'``: the image is resized to ``input_size`` (or its own size floored to a
  multiple of ``p``), encoded, and the ``[gh, gw, z]`` feature map is resampled bilinearly
  (``align_corners=False``) to ``(h, w)``.

Preprocessing: ``[-1, 1] -> [0, 1]``, then the encoder's mean / std (ImageNet for DINOv2,
as REPA's ``preprocess_raw_image``; OpenAI CLIP's for RADIO, as its input conditioner).
Features are the final-normed patch tokens (prefix / register tokens dropped: DINOv2's
``x_norm_patchtokens``; RADIO's spatial features).

Images of many sizes (a NiT pack holds 24-31 distinct sizes of about 100 images) run as one
packed sequence: each size group is embedded (patches, position, prefix tokens), then the
transformer blocks run once over all images' tokens with block-diagonal attention (an
attention backend, ``'auto'``: a varlen kernel on a GPU) and every other op token-wise. That
is one network call per batch instead of one per size, and the same features (timm ViT
blocks; other block types fall back to one call per size).

The network is deliberately not a registered sub-module (as ``DiffusersAutoencoder``): its
frozen weights stay out of the generator's ``state_dict``, ``parameters()`` (EMA, DDP,
optimisers) and are shared by ``deepcopy``; ``.to()`` still moves it. Weights come from a
local file (safetensors, or a torch checkpoint read with ``weights_only=True``);
``pretrained=True`` asks timm for its hub weights (needs the network).
"""
import argparse
import contextlib
import copy
import math
import os
import os.path as osp
import re
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from flexgen.models.layers.attention_backends import build_attention_backend
from flexgen.registry import MODELS
from flexgen.structures import Geometry, ImageGroups, TokenBatch, channels_first
from flexgen.utils.host_sync import host_work

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ALIGN_MODES = ('image', 'features')
DINOV2_ARCHS = {  # REPA's enc-type names -> timm architectures
    'dinov2-vit-s': 'vit_small_patch14_dinov2', 'dinov2-vit-b': 'vit_base_patch14_dinov2',
    'dinov2-vit-l': 'vit_large_patch14_dinov2', 'dinov2-vit-g': 'vit_giant_patch14_dinov2',
    'dinov2reg-vit-s': 'vit_small_patch14_reg4_dinov2',
    'dinov2reg-vit-b': 'vit_base_patch14_reg4_dinov2',
    'dinov2reg-vit-l': 'vit_large_patch14_reg4_dinov2',
    'dinov2reg-vit-g': 'vit_giant_patch14_reg4_dinov2',
}
# The ViTs RADIO registers with timm itself (NVlabs/RADIO radio/extra_timm_models.py), which
# timm does not know: name -> attention heads, the one fact their weights do not tell. RADIO's
# widths for reference: tiny 192, small 384, base 768, so400m 1152, huge 1280 (depth 32,
# MLP 5120: RADIO v2.5-H), giant 1536 (depth 40), bigG 1664; so400m's MLP is 4304 (v2: 4320).
# Left out: *_mlpnorm (a torch LayerNorm, eps 1e-5, inside the MLP) and the DyT variant.
RADIO_VIT_HEADS = {
    'vit_tiny_patch14_224': 3, 'vit_small_patch14_224': 6, 'vit_base_patch14_224': 12,
    'vit_base_patch16_v2_224': 12, 'vit_large_patch16_v2_224': 16,
    'vit_so400m_patch16_224': 16, 'vit_so400m_v2_patch16_224': 16,
    'vit_huge_patch16_224': 16, 'vit_giant_patch16_224': 24, 'vit_bigG_patch14_224': 16,
}
# RADIO's patch generator: the keys read here; any other one would change the features.
RADIO_PATCH_KEYS = ('patch_generator.embedder.weight', 'patch_generator.embedder.bias',
                    'patch_generator.pos_embed', 'patch_generator.cls_token.token')


class EncoderWeightsError(ValueError):
    """A weights file that cannot be read or does not fit the encoder (names the file)."""


# ---------------------------------------------------------------------- helpers
def as_pixels(image) -> Tensor:
    """One image as ``[3, H, W]`` float32 in [-1, 1]: float tensors pass through; uint8
    tensors ``[3, H, W]`` and uint8 numpy arrays ``[H, W, 3]`` (0..255) are converted."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f'as_pixels: a numpy image must be uint8 [H, W, 3], got '
                             f'{image.dtype} {image.shape}')
        image = channels_first(image)
    if not isinstance(image, Tensor) or image.dim() != 3 or image.shape[0] != 3:
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f'as_pixels: expected an image [3, H, W], got {shape}')
    return _signed_float(image)


def _signed_float(pixels: Tensor) -> Tensor:
    """uint8 pixels (0..255) -> float32 in [-1, 1]; float pixels (already so) as float32."""
    return pixels.float() / 127.5 - 1 if pixels.dtype == torch.uint8 else pixels.float()


def load_state_dict_file(path: str) -> Dict[str, Tensor]:
    """Tensors of a local weights file: ``.safetensors``, or a torch checkpoint loaded with
    ``weights_only=True`` (no pickled code runs; ``argparse.Namespace``, which RADIO's
    checkpoints carry, is allowed as plain data)."""
    path = os.fspath(path)
    if not osp.isfile(path):
        raise FileNotFoundError(f'vision encoder weights {path!r} do not exist')
    try:
        if path.endswith('.safetensors'):
            from safetensors.torch import load_file
            return load_file(path)
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as error:  # noqa: BLE001 - any reader failure is the file's fault
        raise EncoderWeightsError(
            f'cannot read vision encoder weights {path!r}: {error} (a checkpoint holding '
            'pickled objects other than tensors / plain containers must be converted to '
            'safetensors first)') from error


@contextlib.contextmanager
def _seeded(init_seed: int):
    """Random initialisation from ``init_seed`` without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        yield


def _check_grids(images: Sequence, grids) -> List[Tuple[int, int]]:
    grids = torch.as_tensor(grids).reshape(-1, 2).tolist()
    if len(grids) != len(images):
        raise ValueError(f'vision encoder: {len(images)} images but {len(grids)} token grids')
    for h, w in grids:
        if h < 1 or w < 1:
            raise ValueError(f'vision encoder: token grid {h}x{w} is empty')
    return [(int(h), int(w)) for h, w in grids]


def _packed_vit_block(block: nn.Module, x: Tensor, batch: TokenBatch, attention) -> Tensor:
    """timm's ViT ``Block`` (inference) on packed tokens ``[N, D]``: its own layers, with
    the attention of each image over its own tokens only (``attention(q, k, v, batch)``).
    timm's block takes ``[B, L, D]`` of one length; its dense mask over a pack would cost
    ``(sum L)^2``."""
    attn, n = block.attn, x.shape[0]
    q, k, v = attn.qkv(block.norm1(x)).view(n, 3, attn.num_heads, attn.head_dim).unbind(1)
    q, k = attn.q_norm(q).to(v.dtype), attn.k_norm(k).to(v.dtype)  # one dtype, as Attention
    out = attn.proj(attn.norm(attention(q, k, v, batch).reshape(n, -1)))
    x = x + block.ls1(out)
    return x + block.ls2(block.mlp(block.norm2(x)))


# ---------------------------------------------------------------------- base
class FrozenVisionEncoder(nn.Module):
    """Base of the encoders: preprocessing, grid alignment, per-size batching.

    Subclasses set ``self.net`` (via :meth:`_set_net`), ``patch_size``, ``embed_dim``,
    ``mean`` / ``std`` and implement :meth:`encode` (``[B, 3, H, W]`` normalised ->
    ``[B, H/p * W/p, z]`` patch tokens, row-major).

    Args:
        align: ``'image'`` or ``'features'`` (module docstring).
        interpolation: image resize mode (``'bicubic'``, ``'bilinear'``, ...).
        antialias: antialiasing when downsizing images (REPA: False).
        input_size: ``align='features'`` only: the encoder's input ``(H, W)`` or side.
        dtype: the dtype the network runs in; features come back float32.
        packed: run the blocks once over all images (module docstring) where the network
            allows it; ``False``: one network call per image size.
    """

    def __init__(self, align: str = 'image', interpolation: str = 'bicubic',
                 antialias: bool = False, input_size=None, dtype: str = 'float32',
                 packed: bool = True):
        super().__init__()
        if align not in ALIGN_MODES:
            raise ValueError(f'{type(self).__name__}: align must be one of {ALIGN_MODES}, '
                             f'got {align!r}')
        if input_size is not None and align != 'features':
            raise ValueError(f"{type(self).__name__}: input_size applies to align='features'")
        self.run_dtype = getattr(torch, str(dtype), None)
        if not isinstance(self.run_dtype, torch.dtype):
            raise ValueError(f'{type(self).__name__}: dtype {dtype!r} is not a torch dtype')
        self.align, self.interpolation, self.antialias = align, interpolation, bool(antialias)
        self.input_size = None if input_size is None else tuple(
            [input_size] * 2 if isinstance(input_size, int) else input_size)
        self.packed = bool(packed)
        self.attention = build_attention_backend('auto')

    # ------------------------------------------------------------------ module plumbing
    def _set_net(self, net: nn.Module, mean, std) -> None:
        net.eval().requires_grad_(False).to(self.run_dtype)
        object.__setattr__(self, 'net', net)  # not a sub-module: see the module docstring
        self.register_buffer('mean', torch.tensor(mean, dtype=torch.float32).reshape(3, 1, 1),
                             persistent=False)
        self.register_buffer('std', torch.tensor(std, dtype=torch.float32).reshape(3, 1, 1),
                             persistent=False)

    def _apply(self, fn, recurse=True):
        if 'net' in self.__dict__:
            self.net._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def __deepcopy__(self, memo):
        memo[id(self.net)] = self.net  # frozen: a copy (EMA) shares the weights
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = copy.deepcopy(value, memo)
        return new

    @property
    def z_dim(self) -> int:
        return self.embed_dim

    # ------------------------------------------------------------------ geometry
    def input_size_for(self, grid: Tuple[int, int], image_size: Tuple[int, int]
                       ) -> Tuple[int, int]:
        """The ``(H, W)`` pixels the encoder sees for a token grid / an image size."""
        p = self.patch_size
        if self.align == 'image':
            return grid[0] * p, grid[1] * p
        if self.input_size is not None:
            return self.input_size
        h, w = (max(p, s - s % p) for s in image_size)
        return h, w

    def preprocess(self, images: Tensor, size: Tuple[int, int]) -> Tensor:
        """``[k, 3, H, W]`` (float in [-1, 1], or uint8) -> normalised ``[k, 3, *size]``
        (normalised first, then resized, as REPA; the two commute)."""
        x = _signed_float(images.to(self.mean.device, non_blocking=True))
        x = ((x + 1) / 2 - self.mean) / self.std
        if tuple(x.shape[-2:]) != tuple(size):
            align_corners = False if self.interpolation in ('bilinear', 'bicubic') else None
            x = F.interpolate(x, size=tuple(size), mode=self.interpolation,
                              align_corners=align_corners, antialias=self.antialias)
        return x

    #: tokens before the patches that :meth:`embed` prepends (class / register tokens)
    num_prefix_tokens = 0

    def embed(self, x: Tensor) -> Tensor:
        """Normalised ``[B, 3, H, W]`` -> the first block's input ``[B, prefix + h*w, D]``
        (patches, position embedding, prefix tokens)."""
        raise NotImplementedError

    def encode(self, x: Tensor) -> Tensor:
        """Normalised ``[B, 3, H, W]`` of one size -> patch tokens ``[B, h*w, z]``."""
        tokens = self.net.norm(self.net.blocks(self.embed(x)))
        return tokens[:, self.num_prefix_tokens:]

    @property
    def packs(self) -> bool:
        """Whether the blocks run packed: asked to (``packed``), and :meth:`encode` is this
        class's (embed, blocks, final norm) over timm ViT blocks with the default attention
        scale; anything else (an encoder with its own ``encode``) runs one call per size."""
        from timm.models.vision_transformer import Attention, Block
        if not self.packed or type(self).encode is not FrozenVisionEncoder.encode:
            return False
        blocks = getattr(self.net, 'blocks', None)
        return isinstance(blocks, nn.Sequential) and all(
            type(b) is Block and type(b.attn) is Attention and getattr(b.attn, 'gate', None)
            is None and math.isclose(b.attn.scale, b.attn.head_dim ** -0.5) for b in blocks)

    def encode_packed(self, embedded: Sequence[Tensor]) -> List[Tensor]:
        """Embedded images ``[L_i, D]`` (any lengths) -> patch tokens ``[L_i - prefix, z]``:
        the blocks over one packed sequence with block-diagonal attention, the final norm."""
        lengths = [x.shape[0] for x in embedded]
        x = torch.cat(list(embedded))
        with host_work():  # the layout on the host, moved without blocking (as a collate)
            layout = Geometry([[1, n] for n in lengths]).build()
            if x.is_cuda:
                layout = layout.pin_memory()
        batch = TokenBatch(x, geometry=layout.to(x.device, non_blocking=True))
        for block in self.net.blocks:
            x = _packed_vit_block(block, x, batch, self.attention)
        return [t[self.num_prefix_tokens:] for t in self.net.norm(x).split(lengths)]

    @torch.no_grad()
    def forward(self, images, grids) -> List[Tensor]:
        """Patch features ``[h*w, z_dim]`` (float32, row-major) of every image on its token
        grid ``(h, w)``. ``images``: a list (tensors ``[3, H, W]``, uint8 arrays
        ``[H, W, 3]``) or :class:`~flexgen.structures.ImageGroups`; one network call for
        all of them (see the module docstring)."""
        if not isinstance(images, ImageGroups):
            images = ImageGroups.from_items([as_pixels(image) for image in images])
        grids = _check_grids(range(len(images)), grids)
        groups = []  # (image ids, token grid, encoder grid, network input or its tokens)
        for stack, index in zip(images.images, images.index):
            ids = index.tolist()  # host-side
            by_grid = defaultdict(list)
            for row, i in enumerate(ids):
                by_grid[grids[i]].append(row)
            for grid, rows in by_grid.items():
                part = stack if len(rows) == len(stack) else stack[rows]
                size = self.input_size_for(grid, tuple(part.shape[-2:]))
                x = self.preprocess(part, size).to(self.run_dtype)
                groups.append(([ids[r] for r in rows], grid,
                               (size[0] // self.patch_size, size[1] // self.patch_size), x))
        if self.packs:
            embedded = [self.embed(x) for *_, x in groups]
            flat = self.encode_packed([t for e in embedded for t in e])
            starts = np.cumsum([0] + [len(e) for e in embedded])
            tokens = [torch.stack(flat[a:b]) for a, b in zip(starts[:-1], starts[1:])]
        else:
            tokens = [self.encode(x) for *_, x in groups]
        outputs: List[Optional[Tensor]] = [None] * len(grids)
        for (ids, grid, (gh, gw), _), feats in zip(groups, tokens):
            feats = feats.float()
            if feats.shape[1] != gh * gw:
                raise RuntimeError(f'{type(self).__name__}: {feats.shape[1]} patch tokens '
                                   f'for a {gh}x{gw} patch grid')
            if (gh, gw) != grid:
                fmap = feats.transpose(1, 2).reshape(len(ids), -1, gh, gw)
                fmap = F.interpolate(fmap, size=grid, mode='bilinear', align_corners=False)
                feats = fmap.flatten(2).transpose(1, 2)
            for i, f in zip(ids, feats):
                outputs[i] = f.contiguous()
        return outputs

    def extra_repr(self) -> str:
        return (f'patch_size={self.patch_size}, z_dim={self.embed_dim}, align={self.align!r}, '
                f'interpolation={self.interpolation!r}, antialias={self.antialias}')


# ---------------------------------------------------------------------- timm ViTs
@MODELS.register_module()
class TimmViTEncoder(FrozenVisionEncoder):
    """Any timm ViT as a frozen patch-feature encoder (DINOv2, DINOv1, MAE, CLIP, ...).

    Built with ``timm.create_model(model_name, pretrained, num_classes=0,
    dynamic_img_size=True, img_size=img_size, **model_kwargs)``; the position embedding is
    resampled by timm to every input's patch grid (from the ``img_size`` grid). Features:
    ``forward_features(x)[:, num_prefix_tokens:]`` (final-normed patch tokens).

    Args:
        model_name: a timm architecture, e.g. ``'vit_base_patch14_dinov2'``.
        weights: a local weights file (timm's keys, or the original release's keys where
            timm's ``checkpoint_filter_fn`` converts them, e.g. DINOv2's hub ``.pth``); its
            position embedding is resampled to ``img_size`` on load (REPA resamples
            DINOv2's to 16x16 = 224 px).
        pretrained: let timm fetch its own hub weights (needs the network).
        img_size: the grid the stored position embedding is kept at.
        model_kwargs: extra timm arguments (e.g. a tiny ``depth`` / ``embed_dim`` for tests).
        mean, std: override the pretrained config's normalisation.
        init_seed: seeds the random initialisation (used as is when there are no weights).
        align, interpolation, antialias, input_size, dtype: see :class:`FrozenVisionEncoder`.
    """

    def __init__(self, model_name: str, weights: Optional[str] = None, pretrained: bool = False,
                 img_size: Union[int, Tuple[int, int]] = 224, model_kwargs: Optional[dict] = None,
                 mean=None, std=None, init_seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        if weights is not None and pretrained:
            raise ValueError(f'{type(self).__name__}: give weights or pretrained=True, not both')
        with _seeded(init_seed):
            net = timm.create_model(model_name, pretrained=pretrained, num_classes=0,
                                    dynamic_img_size=True, img_size=img_size,
                                    **(model_kwargs or {}))
        if weights is not None:
            self._load(net, weights)
        cfg = getattr(net, 'pretrained_cfg', None) or {}
        self.model_name, self.weights = model_name, None if weights is None else str(weights)
        self.patch_size = int(net.patch_embed.patch_size[0])
        if net.patch_embed.patch_size[0] != net.patch_embed.patch_size[1]:
            raise ValueError(f'{type(self).__name__}: non-square patches are not supported')
        self.embed_dim = int(net.embed_dim)
        self.num_prefix_tokens = int(net.num_prefix_tokens)
        self._set_net(net, mean or cfg.get('mean', IMAGENET_MEAN),
                      std or cfg.get('std', IMAGENET_STD))

    @staticmethod
    def _load(net: nn.Module, path: str) -> None:
        from timm.models.vision_transformer import checkpoint_filter_fn
        state = load_state_dict_file(path)
        try:
            state = checkpoint_filter_fn(state, net)
            missing, unexpected = net.load_state_dict(state, strict=False)
        except (RuntimeError, KeyError, ValueError) as error:
            raise EncoderWeightsError(f'vision encoder weights {path!r} do not fit the '
                                      f'model: {error}') from error
        if missing or unexpected:
            raise EncoderWeightsError(f'vision encoder weights {path!r} do not fit the model: '
                                      f'missing keys {missing[:8]}, unexpected keys '
                                      f'{unexpected[:8]}')

    def embed(self, x: Tensor) -> Tensor:
        net = self.net  # timm's forward_features up to the blocks
        return net.norm_pre(net.patch_drop(net._pos_embed(net.patch_embed(x))))


@MODELS.register_module()
class DINOv2Encoder(TimmViTEncoder):
    """DINOv2 (Oquab et al. 2023), REPA's default encoder (``dinov2-vit-b``), through timm.

    ``arch``: a REPA name (``'dinov2-vit-s'``, ``-b``, ``-l``, ``-g``, ``'dinov2reg-vit-b'``,
    ...) or a timm name (``'vit_base_patch14_dinov2'``). Patch 14, ImageNet mean / std;
    other arguments as :class:`TimmViTEncoder` (``weights``: a local file, e.g. the hub's
    ``dinov2_vitb14_pretrain.pth`` or a timm safetensors).
    """

    def __init__(self, arch: str = 'dinov2-vit-b', **kwargs):
        model_name = DINOV2_ARCHS.get(arch, arch)
        if 'dinov2' not in model_name:
            raise ValueError(f'DINOv2Encoder: unknown arch {arch!r}; one of '
                             f'{sorted(DINOV2_ARCHS)} or a timm *_dinov2 name')
        kwargs.setdefault('mean', IMAGENET_MEAN)
        kwargs.setdefault('std', IMAGENET_STD)
        super().__init__(model_name, **kwargs)


# ---------------------------------------------------------------------- RADIO
@MODELS.register_module()
class RADIOEncoder(FrozenVisionEncoder):
    """NVIDIA RADIO (Ranzinger et al. 2024, AM-RADIO; v2.5: "RADIO Amplified") from a local
    checkpoint, with the ViT built by timm. NiT's REPA encoder (v2.5-H for B/L/XL/XXL, v2.5-B
    for S), on images of ``16 x`` the latent grid so that ``h x w`` patches come out.

    What is reproduced (RADIO's ``ViTPatchGenerator`` at inference): patches are embedded by
    the checkpoint's ``embedder`` (a linear map of flattened ``(c, y, x)`` patches = timm's
    conv), plus the CPE position embedding: the stored ``G x G`` grid is resized (bilinear,
    ``align_corners``) to ``m x m``, ``m = max(h, w)``, and its top-left ``h x w`` kept;
    then the summary / register tokens (``cls_token.token``) are prepended, the timm blocks
    run, the final norm applies if the checkpoint has one, and the prefix tokens are dropped.
    Normalisation: the checkpoint's input conditioner (OpenAI CLIP's mean / std).

    Architecture names: RADIO's checkpoints name a timm architecture in ``args.model``, and
    RADIO registers some of them with timm itself (``radio/extra_timm_models.py``), e.g.
    v2.5-H's ``'vit_huge_patch16_224'`` (ViT-H/16: width 1280, depth 32, 16 heads, MLP 5120),
    which timm does not know. The ViT is built from the weights: patch size and width from
    the embedder, depth from the ``blocks.<i>`` keys, MLP width from ``fc1``, LayerScale
    (RADIO's ``grandma`` = timm's ``gamma``), qkv bias, QK norm, MLP norm and final norm from
    the keys present. The head count, which weights do not tell, comes from timm's own
    definition for a name timm registers (``vit_base_patch16_224``, ``vit_large_patch16_224``,
    ...) and from :data:`RADIO_VIT_HEADS` (RADIO's definitions) for RADIO's own names
    (``vit_huge_patch16_224`` 16, ``vit_giant_patch16_224`` 24, ``vit_so400m_patch16_224``
    16, ...), unless the checkpoint's ``args.model_kwargs`` (which RADIO passes to timm) sets
    ``num_heads``; ``model_kwargs`` overrides all of them. A name known to neither, or whose
    ``patch<N>`` contradicts the weights, is refused.

    Checkpoint layouts read: RADIO's release ``.pth.tar`` (``state_dict_ema`` or
    ``state_dict`` with ``base_model.*`` and ``input_conditioner.*`` keys, ``args.model``
    naming the architecture) and the Hugging Face layout (``radio_model.model.*``,
    ``radio_model.input_conditioner.*``; safetensors; ``arch`` passed). Not verified against
    the real v2.5 weights (not downloadable here): the key layout follows RADIO's loader;
    spectral reparametrisation (non-EMA training states), patch normalisers, ViTDet windows,
    adaptors and the training-time random CPE crops are not supported.

    Args:
        checkpoint: the local file.
        arch: the architecture name (default: ``args.model`` of the checkpoint, e.g.
            ``'vit_huge_patch16_224'``); ``model_kwargs`` adds / overrides timm arguments.
        align_corners: of the CPE resize. RADIO's code used True up to the C-RADIOv3
            releases (v2.5 included) and False since mid-2025 (timm notes the same); which
            one NiT's vendored copy uses was not checked here: True by default.
        other arguments: see :class:`FrozenVisionEncoder`.
    """

    PREFIXES = ('base_model.', 'radio_model.model.')
    CONDITIONER = ('input_conditioner.', 'radio_model.input_conditioner.')

    def __init__(self, checkpoint: str, arch: Optional[str] = None, align_corners: bool = True,
                 model_kwargs: Optional[dict] = None, **kwargs):
        super().__init__(**kwargs)
        raw = load_state_dict_file(checkpoint)
        state, args = raw, None
        if isinstance(raw, dict) and ('state_dict_ema' in raw or 'state_dict' in raw):
            state, args = raw.get('state_dict_ema', raw.get('state_dict')), raw.get('args')
        arch = arch or getattr(args, 'model', None)
        if arch is None:
            raise EncoderWeightsError(f'RADIOEncoder: {checkpoint!r} names no architecture '
                                      "(no args.model): pass arch, e.g. 'vit_huge_patch16_224'")
        backbone, cond = self._split(state, checkpoint)
        if any('parametrizations' in k for k in backbone):
            raise EncoderWeightsError(f'RADIOEncoder: {checkpoint!r} holds spectral-reparam '
                                      'weights (a training state); use its state_dict_ema')
        need = ('patch_generator.embedder.weight', 'patch_generator.pos_embed',
                'patch_generator.cls_token.token')
        missing = [k for k in need if k not in backbone]
        if missing:
            raise EncoderWeightsError(f'RADIOEncoder: {checkpoint!r} has no {missing} (not a '
                                      'RADIO checkpoint?)')
        unsupported = [k for k in backbone
                       if k.startswith('patch_generator.') and k not in RADIO_PATCH_KEYS]
        if unsupported:
            raise EncoderWeightsError(f'RADIOEncoder: {checkpoint!r} has patch-generator '
                                      f'weights this encoder does not apply: {unsupported[:4]}')
        embed = backbone['patch_generator.embedder.weight']
        dim, p = embed.shape[0], math.isqrt(embed.shape[1] // 3)
        saved_kwargs = getattr(args, 'model_kwargs', None) or {}
        if saved_kwargs.get('scaled_ln'):  # a norm scale held by no weight
            raise EncoderWeightsError(f'RADIOEncoder: {checkpoint!r} was trained with '
                                      'scaled_ln=True, which this encoder does not apply')
        saved_heads = saved_kwargs.get('num_heads')
        net = self._build_vit(arch, backbone, checkpoint, dim, p, model_kwargs or {},
                              saved_heads)
        timm_state = {k.replace('.grandma', '.gamma'): v for k, v in backbone.items()
                      if k.startswith(('blocks.', 'norm.'))}
        timm_state['patch_embed.proj.weight'] = embed.reshape(dim, 3, p, p)
        timm_state['patch_embed.proj.bias'] = backbone.get('patch_generator.embedder.bias',
                                                           embed.new_zeros(dim))
        try:
            missing, unexpected = net.load_state_dict(timm_state, strict=False)
        except RuntimeError as error:  # shape mismatches
            raise EncoderWeightsError(f'RADIOEncoder: {checkpoint!r} does not fit {arch!r}: '
                                      f'{error}') from error
        if missing or unexpected:
            raise EncoderWeightsError(f'RADIOEncoder: {checkpoint!r} does not fit timm {arch!r}:'
                                      f' missing {missing[:8]}, unexpected {unexpected[:8]}')
        pos = backbone['patch_generator.pos_embed'].float()
        side = math.isqrt(pos.shape[-2])
        if side * side != pos.shape[-2]:
            raise EncoderWeightsError(f'RADIOEncoder: {checkpoint!r}: pos_embed of '
                                      f'{pos.shape[-2]} positions is not a square grid')
        self.checkpoint, self.arch, self.align_corners = str(checkpoint), arch, align_corners
        self.patch_size, self.embed_dim = p, dim
        self.register_buffer('pos_grid', pos.reshape(side, side, dim).permute(2, 0, 1)[None],
                             persistent=False)
        self.register_buffer('prefix', backbone['patch_generator.cls_token.token'].float(),
                             persistent=False)
        mean = cond.get('norm_mean', torch.tensor(CLIP_MEAN)).reshape(-1).tolist()
        std = cond.get('norm_std', torch.tensor(CLIP_STD)).reshape(-1).tolist()
        self._set_net(net, mean, std)

    @staticmethod
    def _build_vit(arch: str, backbone: dict, path: str, dim: int, p: int,
                   model_kwargs: dict, saved_heads: Optional[int]) -> VisionTransformer:
        """The timm ViT of ``arch`` with the shapes of the checkpoint (class docstring);
        ``saved_heads``: ``args.model_kwargs['num_heads']`` where the checkpoint has it."""
        named_patch = re.search(r'_patch(\d+)', arch)
        if named_patch and int(named_patch[1]) != p:
            raise EncoderWeightsError(f'RADIOEncoder: {path!r} names {arch!r} (patch '
                                      f'{named_patch[1]}) but its embedder has {p}x{p} patches')
        registered = timm.is_model(arch)
        if not registered and arch not in RADIO_VIT_HEADS:
            raise EncoderWeightsError(
                f'RADIOEncoder: {path!r} names {arch!r}, which neither timm nor RADIO_VIT_HEADS '
                f'(RADIO\'s own ViTs: {sorted(RADIO_VIT_HEADS)}) knows; pass arch=<a timm '
                'name> and model_kwargs=dict(num_heads=...)')
        blocks = {int(k.split('.')[1]) for k in backbone if k.startswith('blocks.')}
        if 'blocks.0.mlp.fc1.weight' not in backbone:
            raise EncoderWeightsError(f'RADIOEncoder: {path!r} has no blocks.0.mlp.fc1.weight '
                                      '(not a timm ViT checkpoint?)')
        hidden = backbone['blocks.0.mlp.fc1.weight'].shape[0]
        mlp_ratio = hidden / dim
        if int(dim * mlp_ratio) < hidden:  # timm's Block takes int(dim * mlp_ratio)
            mlp_ratio = math.nextafter(mlp_ratio, math.inf)
        shapes = dict(
            patch_size=p, embed_dim=dim, depth=max(blocks) + 1, mlp_ratio=mlp_ratio,
            qkv_bias='blocks.0.attn.qkv.bias' in backbone,
            qk_norm='blocks.0.attn.q_norm.weight' in backbone,
            scale_mlp_norm='blocks.0.mlp.norm.weight' in backbone,
            init_values=1e-5 if any('.ls1.' in k for k in backbone) else None,
            final_norm='norm.weight' in backbone)
        if saved_heads is not None:
            shapes['num_heads'] = int(saved_heads)
        elif not registered:
            shapes['num_heads'] = RADIO_VIT_HEADS[arch]
        # RADIO's CPE replaces timm's class token, registers and position embedding.
        vit_args = dict(shapes, num_classes=0, global_pool='', class_token=False, reg_tokens=0,
                        pos_embed='none', no_embed_class=True, dynamic_img_size=True)
        vit_args.update(model_kwargs)
        with _seeded(0):
            if registered:
                return timm.create_model(arch, pretrained=False, **vit_args)
            return VisionTransformer(**vit_args)

    def _split(self, state: dict, path: str):
        for prefix, cond_prefix in zip(self.PREFIXES, self.CONDITIONER):
            backbone = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if backbone:
                cond = {k[len(cond_prefix):]: v for k, v in state.items()
                        if k.startswith(cond_prefix)}
                return backbone, cond
        raise EncoderWeightsError(f'RADIOEncoder: {path!r} has no keys under '
                                  f'{self.PREFIXES} (found e.g. {list(state)[:5]})')

    def cpe(self, h: int, w: int) -> Tensor:
        """RADIO's inference-time position embedding of an ``h x w`` patch grid:
        ``[h*w, dim]``."""
        m = max(h, w)
        grid = self.pos_grid
        if grid.shape[-1] != m:
            grid = F.interpolate(grid, size=(m, m), mode='bilinear',
                                 align_corners=self.align_corners)
        return grid[0, :, :h, :w].flatten(1).T

    @property
    def num_prefix_tokens(self) -> int:
        return self.prefix.shape[-2]

    def embed(self, x: Tensor) -> Tensor:
        net = self.net
        patches = net.patch_embed(x)  # [B, h, w, D] (dynamic_img_size: NHWC)
        b, h, w, d = patches.shape
        tokens = patches.reshape(b, h * w, d) + self.cpe(h, w).to(patches.dtype)
        prefix = self.prefix.to(patches.dtype).expand(b, -1, -1)
        return net.norm_pre(torch.cat([prefix, tokens], dim=1))

    def extra_repr(self) -> str:
        return f'checkpoint={self.checkpoint!r}, arch={self.arch!r}, ' + super().extra_repr()

"""Autoencoders: the map between images and the space a diffusion transformer models.

Latent diffusion (Rombach et al., 2022, "High-Resolution Image Synthesis with Latent
Diffusion Models", sec. 3 and D.1) trains the generator on ``z = (E(x) - shift) * scale``,
where ``E`` is a frozen autoencoder and ``scale`` / ``shift`` bring the latents to roughly
unit variance, and decodes samples with ``D(z / scale + shift)``.

Every autoencoder here has one interface, per image (images may differ in size):

- ``encode(images, generator=None)``: list of ``[3, H, W]`` in [-1, 1] -> list of ``[C, h, w]``;
- ``decode(latents)``: list of ``[C, h, w]`` -> list of ``[3, H, W]`` (about [-1, 1], not clamped);
- ``latent_channels`` (C) and ``downsample`` (pixels per latent pixel: ``H = h * downsample``).

Images of the same size go through the network together, different sizes separately.
"""
import copy
import functools
import os
import re
from collections import defaultdict
from typing import List, Optional

import torch
from torch import Tensor, nn

from flexgen.registry import MODELS


def _check_images(images: List[Tensor], channels: int, multiple: int, who: str) -> None:
    for i, image in enumerate(images):
        if not isinstance(image, Tensor) or image.dim() != 3 or image.shape[0] != channels:
            shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
            raise ValueError(f'{who}: item {i} must be a Tensor[{channels}, H, W], got {shape}')
        if image.shape[1] % multiple or image.shape[2] % multiple:
            raise ValueError(f'{who}: item {i} has size {image.shape[1]}x{image.shape[2]}, '
                             f'which is not divisible by the downsampling factor {multiple}')


def _per_size_group(fn, tensors: List[Tensor]) -> List[Tensor]:
    """Apply ``fn`` (batch -> batch) to the tensors stacked by shape; keep their order."""
    groups = defaultdict(list)
    for i, tensor in enumerate(tensors):
        groups[tuple(tensor.shape)].append(i)
    outputs = [None] * len(tensors)
    for indices in groups.values():
        result = fn(torch.stack([tensors[i] for i in indices]))
        for i, out in zip(indices, result):
            outputs[i] = out
    return outputs


@MODELS.register_module()
class IdentityAutoencoder(nn.Module):
    """Pixel space (or data already encoded): ``encode`` and ``decode`` return their input.

    Args:
        channels: channels of the images (and of the "latents").
    """

    downsample = 1

    def __init__(self, channels: int = 3):
        super().__init__()
        self.latent_channels = channels

    def encode(self, images: List[Tensor], generator=None) -> List[Tensor]:
        _check_images(images, self.latent_channels, 1, 'IdentityAutoencoder.encode')
        return list(images)

    def decode(self, latents: List[Tensor]) -> List[Tensor]:
        _check_images(latents, self.latent_channels, 1, 'IdentityAutoencoder.decode')
        return list(latents)

    def extra_repr(self) -> str:
        return f'channels={self.latent_channels}'


_HUB_ID = re.compile(r'[A-Za-z0-9][\w.-]*(/[\w.-]+)?')


def _where(path: str, subfolder: Optional[str]) -> str:
    return f'{path!r}' + (f' (subfolder {subfolder!r})' if subfolder else '')


def _check_model_path(path: str, subfolder: Optional[str]) -> None:
    """Refuse, without reading anything, a path that can be neither a local directory nor a
    Hub id."""
    if not os.path.isdir(path) and (not _HUB_ID.fullmatch(path) or os.path.exists(path)):
        raise FileNotFoundError(
            f'DiffusersAutoencoder: path {_where(path, subfolder)} is neither a local directory '
            'nor a Hugging Face Hub id (owner/name); pass the directory written by '
            'save_pretrained.')


def _load_diffusers_model(kind: str, path, subfolder: Optional[str], torch_dtype):
    """``diffusers.<kind>.from_pretrained`` from a local directory, the local Hugging Face
    cache, or the Hub, with an error that names the path when none of them has it."""
    import diffusers
    cls = getattr(diffusers, kind)
    path = os.fspath(path)
    kwargs = dict(subfolder=subfolder, torch_dtype=torch_dtype)
    if os.path.isdir(path):
        return cls.from_pretrained(path, **kwargs)
    where = _where(path, subfolder)
    try:
        # The cache first: a downloaded model then loads offline without retrying the network.
        return cls.from_pretrained(path, local_files_only=True, **kwargs)
    except (OSError, ValueError):
        pass
    try:
        return cls.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise FileNotFoundError(
            f'DiffusersAutoencoder: path {where} is neither a local directory nor reachable on '
            f'the Hugging Face Hub ({reason}). Download it where there is network '
            '(e.g. `huggingface-cli download <id> --local-dir <dir>`) and pass the local '
            'directory.') from error


def diffusers_downsample(kind: str, config) -> int:
    """Pixels per latent pixel of a diffusers autoencoder of class ``kind`` from its config
    (the model's ``config`` or its ``config.json`` as a dict): each encoder block after the
    first halves the resolution (diffusers' ``spatial_compression_ratio``)."""
    key = 'block_out_channels' if kind == 'AutoencoderKL' else 'encoder_block_out_channels'
    return 2 ** (len(config[key]) - 1)


def _read_config(kind: str, vae) -> dict:
    """The settings a diffusers autoencoder's config holds."""
    config = vae.config
    shift = getattr(config, 'shift_factor', None)
    return dict(latent_channels=int(config.latent_channels), in_channels=int(config.in_channels),
                downsample=diffusers_downsample(kind, config),
                scaling_factor=float(config.scaling_factor),
                shift_factor=0.0 if shift is None else float(shift))


def _load_checked(kind: str, path: str, subfolder: Optional[str], torch_dtype, given: dict):
    """Load the network and read its settings; the shapes a config gave must be the
    network's. Returns ``(network, settings)``."""
    vae = _load_diffusers_model(kind, path, subfolder, torch_dtype)
    found = _read_config(kind, vae)
    for name in ('latent_channels', 'downsample'):
        if given.get(name) is not None and given[name] != found[name]:
            raise ValueError(f'DiffusersAutoencoder: {name}={given[name]} was given, but the '
                             f'network at {_where(path, subfolder)} has {name}={found[name]}; '
                             f'fix model.autoencoder.{name}')
    return vae, found


class _LazyModel:
    """A frozen network loaded on first use. Moves made before (``Module._apply``: ``.to()``,
    ``.cuda()``, ``.half()``, ...) are applied to an empty probe tensor, and the network is
    brought to the probe's device and dtype when it loads, as if it had been moved itself.
    Shared, not copied, by the deepcopies of its owner: one load serves them all.

    ``load()`` returns the network and the settings read from it at the load
    (``settings``, None before)."""

    def __init__(self, load, dtype: torch.dtype):
        self._load, self.model, self.settings, self.dtype = load, None, None, dtype
        self.probe = torch.empty(0, dtype=dtype)

    def apply(self, fn) -> None:
        if self.model is not None:
            self.model._apply(fn)
        self.probe = fn(self.probe)

    def get(self) -> nn.Module:
        if self.model is None:
            model, settings = self._load()
            model = model.eval().requires_grad_(False).to(self.probe.device)
            if self.probe.dtype != self.dtype:  # cast only when a move asked for it
                model.to(self.probe.dtype)
            self.model, self.settings = model, settings
        return self.model


@MODELS.register_module()
class DiffusersAutoencoder(nn.Module):
    """A frozen diffusers autoencoder with latent normalisation ``z = (E(x) - shift) * scale``.

    The network is loaded when something first encodes or decodes (or reads a property that
    only its config knows), not when the module is built: training on latents
    (``inputs_are_latents=True``) never loads it, so a hub id needs no network there and the
    GPUs hold no unused weights (NiT's DC-AE: 353M parameters). Moves (``.to(device)``,
    dtype casts) made before the load apply to the network when it loads.

    Args:
        path: a local directory written by ``save_pretrained``, or a Hub id (needs the
            network unless it is already in the local Hugging Face cache).
        kind: the diffusers class: ``'AutoencoderKL'`` (SD-VAE: DiT, SiT, FiT) or
            ``'AutoencoderDC'`` (DC-AE, Chen et al. 2024: NiT).
        latent_channels, downsample: the latents' channels and pixels per latent pixel
            (SD-VAE: 4, 8; DC-AE f32c32: 32, 32). Given, they are known without loading
            (``generate``'s size checks) and checked against the network when it loads;
            omitted, reading them loads the network.
        scaling_factor, shift_factor: override the model config's values (its
            ``scaling_factor``; its ``shift_factor`` if it has one, else 0).
        sample_posterior: KL only: sample ``z ~ N(mean, std)`` (with the generator passed to
            ``encode``) instead of taking the posterior mean.
        subfolder: the model's folder inside ``path`` (e.g. ``'vae'`` of a pipeline).
        dtype: the dtype the network runs in (``'float32'``, ``'bfloat16'``, ...); inputs
            and outputs stay float32.

    The diffusers model is deliberately not a registered sub-module: its frozen weights stay
    out of the generator's ``state_dict`` (checkpoints hold trainable weights only), out of
    ``parameters()`` (EMA, DDP, optimisers) and are shared, not copied, by ``deepcopy``
    (mmengine's EMA). ``.to()`` / ``.cuda()`` / ``.half()`` still move it.
    """

    KINDS = ('AutoencoderKL', 'AutoencoderDC')

    def __init__(self, path, kind: str = 'AutoencoderKL', latent_channels: Optional[int] = None,
                 downsample: Optional[int] = None, scaling_factor: Optional[float] = None,
                 shift_factor: Optional[float] = None, sample_posterior: bool = False,
                 subfolder: Optional[str] = None, dtype: str = 'float32'):
        super().__init__()
        if kind not in self.KINDS:
            raise ValueError(f'DiffusersAutoencoder: kind {kind!r} is not supported; '
                             f'supported kinds: {", ".join(self.KINDS)}')
        if sample_posterior and kind != 'AutoencoderKL':
            raise ValueError(f'DiffusersAutoencoder: sample_posterior=True needs a posterior '
                             f"distribution (kind='AutoencoderKL'); {kind} is deterministic")
        torch_dtype = getattr(torch, str(dtype), None)
        if not isinstance(torch_dtype, torch.dtype):
            raise ValueError(f'DiffusersAutoencoder: dtype {dtype!r} is not a torch dtype name')
        for name, value in (('latent_channels', latent_channels), ('downsample', downsample)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ValueError(f'DiffusersAutoencoder: {name} must be a positive int, '
                                 f'got {value!r}')
        path = os.fspath(path)
        _check_model_path(path, subfolder)
        self.kind, self.path, self.sample_posterior = kind, path, sample_posterior
        self._given = dict(latent_channels=latent_channels, downsample=downsample,
                           scaling_factor=None if scaling_factor is None else float(scaling_factor),
                           shift_factor=None if shift_factor is None else float(shift_factor))
        self._vae = _LazyModel(functools.partial(_load_checked, kind, path, subfolder,
                                                 torch_dtype, dict(self._given)), torch_dtype)

    def _setting(self, name: str):
        """A given value, or the loaded network's (this loads it; its config is read once,
        at the load)."""
        given = self._given.get(name)
        if given is not None:
            return given
        self._vae.get()
        return self._vae.settings[name]

    # ------------------------------------------------------------------ properties
    @property
    def vae(self) -> nn.Module:
        """The diffusers network (loaded on first access)."""
        return self._vae.get()

    @property
    def loaded(self) -> bool:
        return self._vae.model is not None

    latent_channels = property(lambda self: self._setting('latent_channels'))
    downsample = property(lambda self: self._setting('downsample'))
    in_channels = property(lambda self: self._setting('in_channels'))
    scaling_factor = property(lambda self: self._setting('scaling_factor'))
    shift_factor = property(lambda self: self._setting('shift_factor'))

    # ------------------------------------------------------------------ module plumbing
    def _apply(self, fn, recurse=True):
        self._vae.apply(fn)
        return super()._apply(fn, recurse)

    def __deepcopy__(self, memo):
        memo[id(self._vae)] = self._vae  # frozen: a copy (EMA) shares the (lazy) weights
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = copy.deepcopy(value, memo)
        return new

    def extra_repr(self) -> str:
        given = [f'{k}={v}' for k, v in self._given.items() if v is not None]
        return ', '.join([f'kind={self.kind}', f'path={self.path!r}', *given,
                          f'sample_posterior={self.sample_posterior}', f'loaded={self.loaded}'])

    def _to_vae(self, x: Tensor) -> Tensor:
        weight = next(self.vae.parameters())
        return x.to(weight.device, weight.dtype)

    # ------------------------------------------------------------------ interface
    @torch.no_grad()
    def encode(self, images: List[Tensor], generator: Optional[torch.Generator] = None
               ) -> List[Tensor]:
        """Images ``[3, H, W]`` in [-1, 1] -> normalised latents ``[C, H/d, W/d]`` (float32)."""
        _check_images(images, self.in_channels, self.downsample, 'DiffusersAutoencoder.encode')

        def encode_batch(x):
            if self.kind == 'AutoencoderKL':
                posterior = self.vae.encode(self._to_vae(x)).latent_dist
                z = posterior.sample(generator) if self.sample_posterior else posterior.mean
            else:
                z = self.vae.encode(self._to_vae(x)).latent
            return ((z.float() - self.shift_factor) * self.scaling_factor).to(x.device)

        return _per_size_group(encode_batch, images)

    @torch.no_grad()
    def decode(self, latents: List[Tensor]) -> List[Tensor]:
        """Normalised latents ``[C, h, w]`` -> images ``[3, h*d, w*d]`` (float32, not clamped)."""
        _check_images(latents, self.latent_channels, 1, 'DiffusersAutoencoder.decode')

        def decode_batch(z):
            x = self.vae.decode(self._to_vae(z / self.scaling_factor + self.shift_factor)).sample
            return x.to(z.device, torch.float32)

        return _per_size_group(decode_batch, latents)

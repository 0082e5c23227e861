"""The class-conditional generator: backbone + transport + sampler + autoencoder."""
import itertools
from collections import OrderedDict
from typing import List

import torch
import torch.distributed as dist
from mmengine.model import BaseModel

from flexgen.losses.reduction import global_counts, jagged_mean
from flexgen.registry import (GUIDANCE, MODELS, SAMPLERS, TIME_SAMPLERS, TRANSPORTS,
                              build_part)
from flexgen.rng import KeyedDraws, mix
from flexgen.samplers.base import Sampler
from flexgen.samplers.guidance_base import Guidance
from flexgen.structures import Geometry, TokenBatch, patchify, unpatchify
from flexgen.transports.base import Transport
from flexgen.transports.time_sampler_base import TimeSampler

TRAINING_KEYS = ('seed', 'step', 'index')


@MODELS.register_module()
class DiffusionGenerator(BaseModel):
    """An mmengine model that trains a diffusion transformer and generates with it.

    ``forward(inputs, data_samples, mode)``:

    - ``mode='loss'``: ``inputs`` is a :class:`~flexgen.structures.TokenBatch` (what
      ``jagged_collate(patch_size=p)`` makes of latents / pixels: patchified, its geometry
      built in the data workers) or a list of images / latents ``[C, H, W]`` of any sizes;
      ``data_samples`` a dict with ``label`` ``[B]``, the dataset ``index`` ``[B]`` and,
      from flexgen's train loop, ``seed`` and ``step``. Returns ``dict(loss=...)``.
    - ``mode='predict'``: ``data_samples`` holds the requests: ``label`` ``[B]``, ``size``
      ``[B, 2]`` (image pixels) and ``seed`` ``[B]``. Returns one dict per image with
      ``image`` (``[3, H, W]`` in [0, 1]), ``label``, ``index``.

    Randomness: every image's draws (time, label drop, noise) are keyed draws
    (:mod:`flexgen.rng`) of ``(seed, step, dataset index)`` in training and of its request
    seed in generation, computed on the model's device: they do not depend on batching,
    process count, resumption or device. A missing key is an error, never a fallback to
    a global RNG.

    Args:
        backbone: the network, e.g. ``FlexDiT``.
        transport: the noise process, e.g. ``RectifiedFlow``.
        time_sampler: the training distribution of t.
        sampler: the generation sampler, e.g. ``EulerODE``.
        guidance: e.g. ``ClassifierFreeGuidance``; ``None`` samples the conditional model.
        autoencoder: ``IdentityAutoencoder`` (pixel space, or data already in latents) or
            ``DiffusersAutoencoder``.
        inputs_are_latents: the training data are already latents as the backbone sees them
            (FiT / NiT latent datasets, scaled): ``loss`` skips the encoder, generation
            still decodes with it.
        class_dropout_prob: probability of replacing a training label by "no class".
        loss_reduction: ``'image'`` (mean per image, then over images; DiT / FiT) or
            ``'token'`` (mean over all tokens; NiT's packs).
        direction_loss: e.g. ``dict(type='DirectionLoss', weight=1.0)``: NiT's
            ``1 - cos(v_pred, v)`` per token (over the latent channels of each pixel),
            reduced like the denoising loss (against the transport's ``training_target``).
        repa: e.g. ``dict(type='REPAHead', encoder=..., feature_block=8, weight=1.0)``
            (``hidden_size`` defaults to the backbone's): REPA's alignment of the hidden
            tokens after block ``feature_block`` with a frozen encoder's features of the
            clean images (``data_samples['image']``, e.g. ``NiTLatents(image_mode='image')``;
            pixel-space training uses the input images themselves).

    ``loss`` returns ``loss`` (the denoising term) and, when configured, ``loss_direction``
    and ``loss_repa`` (already weighted); the optimiser minimises their sum, which the
    logs show as ``loss`` (the denoising term alone as ``loss_denoise``).
    """

    def __init__(self, backbone, transport, time_sampler=dict(type='UniformTime'),
                 sampler=dict(type='EulerODE'), guidance=None,
                 autoencoder=dict(type='IdentityAutoencoder'), inputs_are_latents=False,
                 class_dropout_prob=0.1, loss_reduction='image', direction_loss=None,
                 repa=None, data_preprocessor=dict(type='FlexDataPreprocessor'),
                 init_cfg=None):
        # built here, from flexgen's registry, whatever the default scope
        if isinstance(data_preprocessor, dict):
            data_preprocessor = MODELS.build(data_preprocessor)
        super().__init__(data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        self.backbone = MODELS.build(backbone)
        self.autoencoder = MODELS.build(autoencoder)
        name = 'DiffusionGenerator'
        self.transport = build_part(TRANSPORTS, transport, Transport, name, 'transport',
                                    'interpolate, training_target, loss, velocity')
        self.time_sampler = build_part(TIME_SAMPLERS, time_sampler, TimeSampler, name,
                                       'time_sampler')
        self.sampler = build_part(SAMPLERS, sampler, Sampler, name, 'sampler')
        self.guidance = build_part(GUIDANCE, guidance, Guidance, name, 'guidance')
        if loss_reduction not in ('image', 'token'):
            raise ValueError(f"loss_reduction must be 'image' or 'token', got {loss_reduction!r}")
        self.class_dropout_prob, self.loss_reduction = class_dropout_prob, loss_reduction
        self.inputs_are_latents = inputs_are_latents
        self.num_classes = self.backbone.num_classes
        self.patch_size = self.backbone.patch_size
        self.direction_loss = None
        if direction_loss is not None:
            self.direction_loss = MODELS.build(
                dict(dict(channels=self.backbone.in_channels), **direction_loss))
        self.repa = None
        if repa is not None:
            self.repa = MODELS.build(dict(dict(hidden_size=self.backbone.hidden_size), **repa))
            depth = len(getattr(self.backbone, 'blocks', ()))
            if depth and not 1 <= self.repa.feature_block <= depth:
                raise ValueError(f'repa.feature_block={self.repa.feature_block} is not a block '
                                 f'of the backbone (1..{depth})')

    @property
    def pixels_per_token(self) -> int:
        """Image pixels along each side of one token: autoencoder downsampling x patch
        size (every generated size is a multiple of it)."""
        return self.autoencoder.downsample * self.patch_size

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def training_draws(data_samples: dict, device) -> KeyedDraws:
        """The keyed draws of a training batch: keys ``(seed, step, dataset index)``."""
        missing = [k for k in TRAINING_KEYS if k not in data_samples]
        if missing:
            raise KeyError(f'DiffusionGenerator.loss: data_samples has no {missing}. Every '
                           "draw of a training image is keyed by (seed, step, index): flexgen's "
                           'FlexTrainLoop adds seed and step, every flexgen dataset item has '
                           'its index; outside the loop pass all three.')
        index = torch.as_tensor(data_samples['index']).to(device, non_blocking=True)
        return KeyedDraws(mix(int(data_samples['seed']), int(data_samples['step']), index))

    def token_batch(self, inputs) -> TokenBatch:
        """The model's tokens of a training batch: a collated :class:`TokenBatch` as it is,
        or images / latents patchified here (encoded first unless ``inputs_are_latents``)."""
        if isinstance(inputs, TokenBatch):
            if inputs.patch_size not in (None, self.patch_size):
                raise ValueError(f'the batch was patchified with patch_size '
                                 f'{inputs.patch_size} (collate_fn.patch_size) but '
                                 f'model.backbone.patch_size is {self.patch_size}')
            if not self.inputs_are_latents and self.autoencoder.downsample != 1:
                raise ValueError('the collate patchified the images, but the model encodes '
                                 'them first (inputs_are_latents=False with an autoencoder): '
                                 'drop collate_fn.patch_size')
            batch = inputs
        elif self.inputs_are_latents:
            batch = patchify(list(inputs), self.patch_size)
        else:
            with torch.no_grad():
                batch = patchify(self.autoencoder.encode(inputs), self.patch_size)
        width = self.backbone.in_channels * self.patch_size ** 2
        if batch.tokens.shape[1] != width:
            raise ValueError(f'training tokens have {batch.tokens.shape[1]} values '
                             f'({batch.tokens.shape[1] // self.patch_size ** 2} channels x '
                             f'{self.patch_size}^2), but model.backbone.in_channels is '
                             f'{self.backbone.in_channels}: the data were encoded by another '
                             "autoencoder (the latent datasets' latent_channels option checks "
                             'files as they are read)')
        return batch

    def network(self, batch: TokenBatch, t, y, feature_block=None):
        """The backbone's raw output tokens for model inputs in flexgen's convention
        (with ``feature_block=k`` also the hidden tokens after block ``k``)."""
        if feature_block is None:
            return self.backbone(batch, t, y)
        return self.backbone(batch, t, y, feature_block=feature_block)

    def _reduce(self, per_token, batch: TokenBatch, normalizers):
        """Per-token losses ``[N]`` -> a scalar, as ``loss_reduction`` says, divided by
        the global batch's count (:mod:`flexgen.losses.reduction`)."""
        return jagged_mean(per_token, batch.seqlens, self.loss_reduction, batch.image_ids,
                           normalizers[self.loss_reduction])

    def _repa_images(self, inputs, data_samples):
        """The clean images REPA's encoder sees, one per training image: the dataset's
        ``data_samples['image']``, else the pixel inputs themselves (never an autoencoder
        round trip: REPA aligns with features of the real image)."""
        images = data_samples.get('image')
        if images is not None:
            return images
        if self.inputs_are_latents:
            raise ValueError("repa: the batch has no data_samples['image'] (the clean images "
                             'for the vision encoder); latent datasets must provide them, '
                             "e.g. NiTLatents(image_mode='image', image_dir=...)")
        if isinstance(inputs, TokenBatch):  # pixels patchified by the collate (downsample 1)
            return unpatchify(inputs.tokens, inputs.sizes, inputs.patch_size or self.patch_size)
        return list(inputs)

    def parse_losses(self, losses):
        """mmengine's sum of every ``loss*`` term; the log's ``loss`` is that sum and the
        denoising term is logged as ``loss_denoise``. Under data parallelism the logged
        values are the global batch's (the mean over ranks of terms normalised by the
        global counts), the returned total stays this rank's share for backward."""
        total, log_vars = super().parse_losses(losses)
        if len(losses) > 1 and 'loss' in losses:
            items = [('loss', total), ('loss_denoise', losses['loss'].detach().mean())]
            items += [(k, v) for k, v in log_vars.items() if k != 'loss']
            log_vars = OrderedDict(items)
        if self.training and dist.is_available() and dist.is_initialized() and \
                dist.get_world_size() > 1:
            values = torch.stack([v.detach().float() for v in log_vars.values()])
            dist.all_reduce(values)
            values /= dist.get_world_size()
            log_vars = OrderedDict(zip(log_vars, values))
        return total, log_vars

    # ------------------------------------------------------------------ modes
    def forward(self, inputs=None, data_samples=None, mode='tensor'):
        if mode == 'loss':
            return self.loss(inputs, data_samples)
        if mode == 'predict':
            return self.predict(data_samples)
        if mode == 'tensor':
            batch = inputs if isinstance(inputs, TokenBatch) else patchify(inputs,
                                                                           self.patch_size)
            return self.network(batch, data_samples['t'], data_samples['label'])
        raise ValueError(f"mode must be 'loss', 'predict' or 'tensor', got {mode!r}")

    def check_labels(self, labels, where: str, indices=None) -> None:
        """Class ids must lie in ``[0, num_classes)``: ``num_classes`` itself is the
        model's "no class" (the label CFG drops to), and larger ids do not exist."""
        labels = torch.as_tensor(labels)
        bad = (labels < 0) | (labels >= self.num_classes)
        if labels.numel() and bad.any():
            items = ('' if indices is None else
                     f' (dataset items {torch.as_tensor(indices)[bad.cpu()].tolist()[:8]})')
            raise ValueError(f'{where}: class ids {sorted(set(labels[bad].tolist()))[:8]}'
                             f'{items} are outside [0, {self.num_classes}) '
                             f'(model.backbone.num_classes = {self.num_classes}; id '
                             f'{self.num_classes} is reserved for "no class"). Check the '
                             "dataset's classes against the model.")

    _labels_checked = False

    def train_step(self, data, optim_wrapper):
        # Labels are checked while they are on the host: after the data preprocessor
        # moved them, a check would cost a device sync every step.
        samples = data.get('data_samples') if isinstance(data, dict) else None
        if isinstance(samples, dict) and isinstance(samples.get('label'), torch.Tensor):
            self.check_labels(samples['label'], 'training batch', samples.get('index'))
        self._labels_checked = True
        try:
            return super().train_step(data, optim_wrapper)
        finally:
            self._labels_checked = False

    def loss(self, inputs, data_samples: dict) -> dict:
        labels = torch.as_tensor(data_samples['label'])
        if not self._labels_checked:  # called directly, not by train_step
            self.check_labels(labels, 'training batch', data_samples.get('index'))
        batch = self.token_batch(inputs)
        device = batch.device
        labels = labels.to(device, non_blocking=True)
        draws = self.training_draws(data_samples, device)
        # REPA's targets first: the frozen encoder's work is queued before the backbone's.
        targets = (self.repa.targets(self._repa_images(inputs, data_samples), batch)
                   if self.repa is not None else None)
        t = self.transport.train_time(self.time_sampler(draws, seqlens=batch.seqlens))
        drop = draws.uniform('label_drop') < self.class_dropout_prob
        labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        x0 = batch.tokens
        noise = draws.normal_tokens('noise', batch.image_ids, batch.local_index,
                                    x0.shape[1]).to(x0.dtype)

        t_tok = batch.per_token(t.float())[:, None]  # float32 even for bf16 latents: DDPM steps
        xt = self.transport.interpolate(x0, noise, t_tok)
        if self.repa is None:
            output = self.network(batch.replace(xt), t, labels)
        else:
            output, hidden = self.network(batch.replace(xt), t, labels,
                                          feature_block=self.repa.feature_block)
        # An eval-mode loss (on one rank, say) must not wait for the other ranks.
        normalizers = global_counts(batch.tokens.shape[0], batch.num_images, device,
                                    distributed=None if self.training else False)
        losses = dict(loss=self._reduce(self.transport.loss(output, x0, noise, t_tok), batch,
                                        normalizers))
        if self.direction_loss is not None:
            target = self.transport.training_target(x0, noise, t_tok)
            losses['loss_direction'] = self._reduce(self.direction_loss(output, target), batch,
                                                    normalizers)
        if self.repa is not None:
            losses['loss_repa'] = self.repa.loss(hidden, targets, batch, normalizers)
        return losses

    @torch.no_grad()
    def generate(self, labels, sizes, seeds, sampler=None, guidance='default',
                 callback=None) -> List[torch.Tensor]:
        """Generate one image per label at its ``(H, W)`` size (pixels), in [-1, 1].

        Image ``i`` depends only on ``(labels[i], sizes[i], seeds[i])``: its starting noise
        and every noise a stochastic sampler adds are keyed draws of its seed
        (:mod:`flexgen.rng`). Images of different sizes are generated together in one
        jagged batch. ``sampler`` / ``guidance`` override the configured ones for this call.
        """
        sampler = (self.sampler if sampler is None else
                   build_part(SAMPLERS, sampler, Sampler, 'generate', 'sampler'))
        guidance = (self.guidance if guidance == 'default' else
                    build_part(GUIDANCE, guidance, Guidance, 'generate', 'guidance'))
        device = next(self.backbone.parameters()).device
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        self.check_labels(labels, 'generate')
        labels = labels.to(device)
        sizes = torch.as_tensor(sizes, dtype=torch.long).reshape(-1, 2)
        if len(sizes) == 1 and len(labels) > 1:
            sizes = sizes.repeat(len(labels), 1)
        if len(sizes) != len(labels):
            raise ValueError(f'generate: {len(labels)} labels but {len(sizes)} sizes (give '
                             'one size per label, or one size for all)')
        seeds = torch.as_tensor(seeds, dtype=torch.long).reshape(-1)
        if len(seeds) != len(labels):
            raise ValueError(f'generate: {len(labels)} labels but {len(seeds)} seeds (one '
                             'seed per image)')
        step = self.pixels_per_token
        for h, w in sizes.tolist():
            if h <= 0 or w <= 0 or h % step or w % step:
                raise ValueError(f'generate: size {h}x{w} is not a positive multiple of '
                                 f'{step} (autoencoder downsampling x patch size)')
        geometry = Geometry(sizes // step, device)
        width = self.backbone.in_channels * self.patch_size ** 2
        seeds = seeds.to(device)
        batch = TokenBatch(self.sampling_noise(seeds, geometry, 0), geometry=geometry,
                           patch_size=self.patch_size)
        if guidance is None:
            def model_fn(x, t):
                # float64: the backbone's time map (e.g. DiT's 1000 t) then hits k / 1000
                # steps exactly before the sinusoid casts to float32.
                t_vec = torch.full((batch.num_images,), float(t), dtype=torch.float64,
                                   device=device)
                return self.network(batch.replace(x), t_vec, labels)
        else:
            model_fn = guidance.wrap(self.network, batch, labels, self.num_classes, width,
                                     self.patch_size ** 2)

        calls = itertools.count(1)

        def noise_like(x):
            return self.sampling_noise(seeds, geometry, next(calls)).to(x.dtype)

        x0 = sampler(model_fn, self.transport, batch.tokens, noise_like=noise_like,
                     callback=callback)
        latents = unpatchify(x0, batch.sizes, self.patch_size)
        return self.autoencoder.decode(latents)

    def sampling_noise(self, seeds: torch.Tensor, geometry: Geometry, call: int):
        """Standard normal tokens ``[N, C*p*p]`` of images of ``seeds`` ``[B]`` laid out as
        ``geometry``: ``call`` 0 is the starting noise of :meth:`generate`, calls 1, 2, ...
        what a stochastic sampler adds, in order. A pure function of (seed, call)."""
        draws = KeyedDraws(mix(seeds, call))
        return draws.normal_tokens('sampling_noise', geometry.tensor('image_ids'),
                                   geometry.tensor('local_index'),
                                   self.backbone.in_channels * self.patch_size ** 2)

    def predict(self, data_samples: dict) -> List[dict]:
        labels = data_samples['label']
        if 'seed' not in data_samples:
            raise KeyError("DiffusionGenerator.predict: data_samples has no 'seed' (one per "
                           'request; GenerationRequests provides them)')
        images = self.generate(labels, data_samples['size'], data_samples['seed'])
        indices = data_samples.get('index', torch.arange(len(images)))
        return [dict(image=((img.float().cpu() + 1) / 2).clamp(0, 1), label=int(y),
                     index=int(i))
                for img, y, i in zip(images, torch.as_tensor(labels).tolist(),
                                     torch.as_tensor(indices).tolist())]

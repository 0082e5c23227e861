"""The class-conditional generator: backbone + transport + sampler + autoencoder."""
from collections import OrderedDict
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist
from mmengine.model import BaseModel

from flexgen.losses.reduction import global_counts, jagged_mean
from flexgen.registry import (GUIDANCE, MODELS, SAMPLERS, TIME_SAMPLERS, TRANSPORTS,
                              build)
from flexgen.structures import TokenBatch, patchify, unpatchify

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, step, index) over 64 bits


def image_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix-style), the same in every process."""
    value = 0
    for part in parts:
        value = (value ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) * _MIX & 0xFFFFFFFFFFFFFFFF
        value ^= value >> 31
    return value & 0x7FFFFFFFFFFFFFFF


@MODELS.register_module()
class DiffusionGenerator(BaseModel):
    """An mmengine model that trains a diffusion transformer and generates with it.

    ``forward(inputs, data_samples, mode)``:

    - ``mode='loss'``: ``inputs`` is a list of images / latents ``[C, H, W]`` of any sizes,
      ``data_samples`` a dict with ``label`` ``[B]`` (and, from flexgen's train loop,
      ``seed``, ``step`` and the dataset ``index`` ``[B]``). Returns ``dict(loss=...)``.
    - ``mode='predict'``: ``data_samples`` holds the requests: ``label`` ``[B]``, ``size``
      ``[B, 2]`` (image pixels) and ``seed`` ``[B]``. Returns one dict per image with
      ``image`` (``[3, H, W]`` in [0, 1]), ``label``, ``index``.

    Randomness: every image's draws (time, noise, label drop) come from its own
    ``torch.Generator`` seeded by ``(seed, step, dataset index)`` in training and by its
    request seed in generation, so the numbers do not depend on batching, process count
    or resumption.

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
            reduced like the denoising loss; needs a transport with ``training_target``.
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
                 repa=None, data_preprocessor=None, init_cfg=None):
        super().__init__(data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        self.backbone = MODELS.build(backbone)
        self.autoencoder = MODELS.build(autoencoder)
        self.transport = build(TRANSPORTS, transport)
        self.time_sampler = build(TIME_SAMPLERS, time_sampler)
        self.sampler = build(SAMPLERS, sampler)
        self.guidance = build(GUIDANCE, guidance)
        if loss_reduction not in ('image', 'token'):
            raise ValueError(f"loss_reduction must be 'image' or 'token', got {loss_reduction!r}")
        self.class_dropout_prob, self.loss_reduction = class_dropout_prob, loss_reduction
        self.inputs_are_latents = inputs_are_latents
        self.num_classes = self.backbone.num_classes
        self.patch_size = self.backbone.patch_size
        self.direction_loss = None
        if direction_loss is not None:
            if not hasattr(self.transport, 'training_target'):
                raise ValueError(f'direction_loss needs a transport with training_target '
                                 f'(an Interpolant), got {type(self.transport).__name__}')
            self.direction_loss = MODELS.build(
                dict(dict(channels=self.backbone.in_channels), **direction_loss))
        self.repa = None
        if repa is not None:
            self.repa = MODELS.build(dict(dict(hidden_size=self.backbone.hidden_size), **repa))
            depth = len(getattr(self.backbone, 'blocks', ()))
            if depth and not 1 <= self.repa.feature_block <= depth:
                raise ValueError(f'repa.feature_block={self.repa.feature_block} is not a block '
                                 f'of the backbone (1..{depth})')

    # ------------------------------------------------------------------ helpers
    def _generators(self, seeds: Optional[Sequence[int]], count: int):
        if seeds is None:
            return [None] * count
        return [torch.Generator().manual_seed(int(s)) for s in seeds]

    @staticmethod
    def _training_seeds(data_samples):
        """Per-image seeds from the train loop's (seed, step) and the dataset index."""
        if not all(k in data_samples for k in ('seed', 'step', 'index')):
            return None  # called outside flexgen's loop: global RNG
        seed, step = int(data_samples['seed']), int(data_samples['step'])
        return [image_seed(seed, step, i) for i in data_samples['index'].tolist()]

    @staticmethod
    def _noise_like(batch: TokenBatch, generators):
        parts = [torch.randn(part.shape, generator=g, dtype=torch.float32)
                 for part, g in zip(batch.split(batch.tokens), generators)]
        return torch.cat(parts).to(batch.device, batch.tokens.dtype)

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
        """The clean images REPA's encoder sees, one per training image."""
        images = data_samples.get('image')
        if images is not None:
            return images
        if self.inputs_are_latents:
            raise ValueError("repa: the batch has no data_samples['image'] (the clean images "
                             'for the vision encoder); latent datasets must provide them, '
                             "e.g. NiTLatents(image_mode='image', image_dir=...)")
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
            batch = patchify(inputs, self.patch_size)
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

    def loss(self, inputs: List[torch.Tensor], data_samples: dict) -> dict:
        self.check_labels(data_samples['label'], 'training batch', data_samples.get('index'))
        if self.inputs_are_latents:
            latents = list(inputs)
            wrong = sorted({int(x.shape[0]) for x in latents} - {self.backbone.in_channels})
            if wrong:
                raise ValueError(f'training latents have {wrong} channels, but '
                                 f'model.backbone.in_channels is {self.backbone.in_channels}: '
                                 'the data were encoded by another autoencoder (the latent '
                                 "datasets' latent_channels option checks files as they are read)")
        else:
            with torch.no_grad():
                latents = self.autoencoder.encode(inputs)
        batch = patchify(latents, self.patch_size)
        labels = data_samples['label'].to(batch.device)
        generators = self._generators(self._training_seeds(data_samples), batch.num_images)
        # Draw order per image: time, label drop, noise (a fixed order keeps runs comparable).
        t = self.transport.train_time(
            self.time_sampler(generators, batch.device, seqlens=batch.seqlens_list))
        drop = torch.cat([torch.rand(1, generator=g) for g in generators]).to(batch.device)
        labels = torch.where(drop < self.class_dropout_prob,
                             torch.full_like(labels, self.num_classes), labels)
        noise = self._noise_like(batch, generators)

        x0 = batch.tokens
        t_tok = batch.per_token(t.float())[:, None]  # float32 even for bf16 latents: DDPM steps
        xt = self.transport.interpolate(x0, noise, t_tok)
        if self.repa is None:
            output = self.network(batch.replace(xt), t, labels)
        else:
            output, hidden = self.network(batch.replace(xt), t, labels,
                                          feature_block=self.repa.feature_block)
        # An eval-mode loss (on one rank, say) must not wait for the other ranks.
        normalizers = global_counts(batch.tokens.shape[0], batch.num_images, batch.device,
                                    distributed=None if self.training else False)
        losses = dict(loss=self._reduce(self.transport.loss(output, x0, noise, t_tok), batch,
                                        normalizers))
        if self.direction_loss is not None:
            target = self.transport.training_target(x0, noise, t_tok)
            losses['loss_direction'] = self._reduce(self.direction_loss(output, target), batch,
                                                    normalizers)
        if self.repa is not None:
            losses['loss_repa'] = self.repa.loss(
                hidden, self._repa_images(inputs, data_samples), batch, normalizers)
        return losses

    @torch.no_grad()
    def generate(self, labels, sizes, seeds=None, sampler=None, guidance='default',
                 callback=None) -> List[torch.Tensor]:
        """Generate one image per label at its ``(H, W)`` size (pixels), in [-1, 1].

        Images of different sizes are generated together in one jagged batch.
        ``sampler`` / ``guidance`` override the configured ones for this call.
        """
        sampler = build(SAMPLERS, sampler) if sampler is not None else self.sampler
        guidance = self.guidance if guidance == 'default' else build(GUIDANCE, guidance)
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
        seeds = list(range(len(labels))) if seeds is None else [int(s) for s in seeds]
        if len(seeds) != len(labels):
            raise ValueError(f'generate: {len(labels)} labels but {len(seeds)} seeds (one '
                             'seed per image)')
        step = self.autoencoder.downsample * self.patch_size
        for h, w in sizes.tolist():
            if h <= 0 or w <= 0 or h % step or w % step:
                raise ValueError(f'generate: size {h}x{w} is not a positive multiple of '
                                 f'{step} (autoencoder downsampling x patch size)')
        channels = self.backbone.in_channels
        noise_images = [torch.randn(channels, h // self.autoencoder.downsample,
                                    w // self.autoencoder.downsample, generator=g)
                        for (h, w), g in zip(sizes.tolist(), self._generators(seeds, len(seeds)))]
        batch = patchify([n.to(device) for n in noise_images], self.patch_size)
        width = channels * self.patch_size ** 2
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

        sample_generators = self._generators([image_seed(s, 1) for s in seeds], len(seeds))

        def noise_like(x):
            return self._noise_like(batch.replace(x), sample_generators)

        x0 = sampler(model_fn, self.transport, batch.tokens, noise_like=noise_like,
                     callback=callback)
        latents = unpatchify(x0, batch.sizes, self.patch_size)
        return self.autoencoder.decode(latents)

    def predict(self, data_samples: dict) -> List[dict]:
        labels = data_samples['label']
        images = self.generate(labels, data_samples['size'], data_samples.get('seed'))
        indices = data_samples.get('index', torch.arange(len(images)))
        return [dict(image=((img.float().cpu() + 1) / 2).clamp(0, 1), label=int(y),
                     index=int(i))
                for img, y, i in zip(images, torch.as_tensor(labels).tolist(),
                                     torch.as_tensor(indices).tolist())]

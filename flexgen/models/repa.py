"""REPA: representation alignment of a diffusion transformer's hidden tokens with a frozen
vision encoder (Yu et al. 2024, arXiv 2410.06940; used by NiT, Wang et al. 2025).

The hidden tokens after block ``k`` (REPA: 8 of SiT-XL's 28; NiT: 4 / 6 / 8 by size) go
through a projector MLP and are aligned, token by token, with the encoder's patch features
of the clean image (:mod:`flexgen.losses.repa`). Only training uses it; sampling never
runs the projector or the encoder.
"""
from typing import List, Sequence, Union

import torch
from torch import Tensor, nn

from flexgen.losses.repa import REPALoss
from flexgen.registry import MODELS


@MODELS.register_module()
class REPAProjector(nn.Sequential):
    """REPA's ``build_mlp``: ``Linear(D, hidden) - SiLU - Linear(hidden, hidden) - SiLU -
    Linear(hidden, z_dim)``, applied per token; keys ``0.*``, ``2.*``, ``4.*`` (REPA's
    checkpoint: ``projectors.{k}.{0,2,4}``; NiT's: ``projector.{0,2,4}``). Linear weights
    xavier-uniform, biases zero (both references)."""

    def __init__(self, hidden_size: int, z_dim: int, projector_dim: int = 2048):
        super().__init__(nn.Linear(hidden_size, projector_dim), nn.SiLU(),
                         nn.Linear(projector_dim, projector_dim), nn.SiLU(),
                         nn.Linear(projector_dim, z_dim))
        for layer in self:
            if isinstance(layer, nn.Linear):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)


@MODELS.register_module()
class REPAHead(nn.Module):
    """Encoder(s) + projector(s) + alignment loss, for one backbone block.

    ``targets(images, batch)``: every encoder's features ``[N, z_k]`` of the clean images
    of the batch, one per image of ``batch`` in its order (``[3, H, W]`` in [-1, 1], uint8
    ``[H, W, 3]`` arrays as ``NiTLatents`` returns, or the collate's
    :class:`~flexgen.structures.ImageGroups`; any size: the encoder resizes them so its
    patch grid is the token grid), on the token grids of ``batch`` (its ``sizes``),
    concatenated in its token order.

    ``loss(hidden_tokens, targets, batch, normalizers=None)``: ``weight * L_REPA`` (a scalar)
    of the backbone's tokens after block ``feature_block`` ``[N, D]``
    (``FlexDiT(batch, t, y, feature_block=head.feature_block)`` returns them second) against
    those targets.

    Args:
        encoder: a vision-encoder config (``DINOv2Encoder``, ``RADIOEncoder``,
            ``TimmViTEncoder``) or a list of them (REPA's multi-encoder option).
        hidden_size: D of the backbone.
        feature_block: 1-based block whose output is aligned (REPA XL: 8; NiT: the
            ``encoder_depth`` of its config).
        projector_dim: hidden width of the projector (REPA / NiT: 2048; NiT-S: 768).
        z_dims: output width per encoder; default the encoders' feature widths.
        weight: lambda (REPA: 0.5; NiT: 1.0).
        reduction, form: the loss's (:class:`~flexgen.losses.repa.REPALoss`): REPA
            ``'image'`` / ``'neg_cos'``; NiT ``'token'`` / ``'one_minus_cos'``.

    ``state_dict``: ``projectors.{k}.{0,2,4}.{weight,bias}`` (the encoders' frozen weights
    are not part of it). A converter maps NiT's ``projector.*`` and REPA's
    ``projectors.{k}.*`` onto it.

    In the generator's training loss (``DiffusionGenerator(repa=dict(type='REPAHead', ...))``),
    the frozen encoder runs first, then the backbone::

        targets = self.repa.targets(images, batch)
        output, hidden = self.backbone(batch.replace(xt), t, labels,
                                       feature_block=self.repa.feature_block)
        losses['loss_repa'] = self.repa.loss(hidden, targets, batch, normalizers)

    ``images`` are the clean images of the batch: a latent dataset's ``image`` field
    (``NiTLatents(image_mode='image')``, mirrored with the latent), or the inputs themselves
    when the generator encodes pixels on the fly (``ImageFolder``: mirrored by the dataset).
    """

    def __init__(self, encoder: Union[dict, Sequence[dict]], hidden_size: int,
                 feature_block: int = 8, projector_dim: int = 2048, z_dims=None,
                 weight: float = 0.5, reduction: str = 'image', form: str = 'neg_cos'):
        super().__init__()
        configs = [encoder] if isinstance(encoder, (dict, nn.Module)) else list(encoder)
        if not configs:
            raise ValueError('REPAHead: needs at least one encoder')
        if not isinstance(feature_block, int) or feature_block < 1:
            raise ValueError(f'REPAHead: feature_block is 1-based (the block after which '
                             f'tokens are aligned), got {feature_block!r}')
        self.encoders = nn.ModuleList(
            [c if isinstance(c, nn.Module) else MODELS.build(c) for c in configs])
        z_dims = list(z_dims) if z_dims is not None else [e.z_dim for e in self.encoders]
        if len(z_dims) != len(self.encoders):
            raise ValueError(f'REPAHead: {len(z_dims)} z_dims for {len(self.encoders)} encoders')
        for e, z in zip(self.encoders, z_dims):
            if z != e.z_dim:
                raise ValueError(f'REPAHead: z_dim {z} does not match the encoder '
                                 f"{type(e).__name__}'s feature width {e.z_dim}")
        self.projectors = nn.ModuleList(
            [REPAProjector(hidden_size, z, projector_dim) for z in z_dims])
        self.criterion = REPALoss(weight, reduction, form)
        self.feature_block, self.hidden_size = feature_block, hidden_size

    @property
    def weight(self) -> float:
        return self.criterion.weight

    def project(self, hidden_tokens: Tensor) -> List[Tensor]:
        """``[N, D]`` -> one ``[N, z_k]`` per encoder."""
        if hidden_tokens.dim() != 2 or hidden_tokens.shape[1] != self.hidden_size:
            raise ValueError(f'REPAHead: hidden tokens must be [N, {self.hidden_size}], got '
                             f'{tuple(hidden_tokens.shape)}')
        return [projector(hidden_tokens) for projector in self.projectors]

    @torch.no_grad()
    def targets(self, images: Sequence, batch) -> List[Tensor]:
        """Every encoder's features ``[N, z_k]`` of ``images`` on ``batch``'s token grids."""
        if images is None:
            raise ValueError("REPAHead: REPA needs the batch's clean images (e.g. "
                             "NiTLatents(image_mode='image', image_dir=...)), got None")
        if len(images) != batch.num_images:
            raise ValueError(f'REPAHead: {len(images)} images for a batch of '
                             f'{batch.num_images}')
        return [torch.cat(encoder(images, batch.sizes)).to(batch.device)
                for encoder in self.encoders]

    def loss(self, hidden_tokens: Tensor, targets: List[Tensor], batch,
             normalizers=None) -> Tensor:
        projected = self.project(hidden_tokens)
        if targets[0].shape[0] != hidden_tokens.shape[0]:
            raise ValueError(f'REPAHead: {hidden_tokens.shape[0]} hidden tokens but the '
                             f'encoder gave {targets[0].shape[0]} features')
        return self.criterion(projected, targets, batch.seqlens, normalizers)

    def extra_repr(self) -> str:
        return f'feature_block={self.feature_block}, hidden_size={self.hidden_size}'

"""Guidance: steer a sampler by extrapolating from a weaker prediction to a stronger one,

    out = weak + s (strong - weak),

applied only while ``low <= t <= high`` (guidance interval, Kynkaanniemi et al. 2024) and
on chosen latent channels. ``wrap(network, batch, labels, null_label, guided_width,
patch_area)`` turns ``network(batch, t [B], y [B])`` into a sampler's ``model_fn(x, t)``.

- :class:`ClassifierFreeGuidance` (Ho & Salimans 2022): strong = the network with the
  class, weak = the same network without it (``null_label``).
- :class:`AutoGuidance` (Karras et al. 2024, "Guiding a diffusion model with a bad version
  of itself"): strong = the network, weak = a smaller / less trained model, both with the
  class.
"""
import torch
import torch.nn as nn

from flexgen.fileio import CheckpointError, load_checked, read_checkpoint, select_weights
from flexgen.registry import GUIDANCE, MODELS

from .guidance_base import Guidance


@GUIDANCE.register_module()
class ClassifierFreeGuidance(Guidance):
    """Classifier-free guidance ``u + s (c - u)`` (``c``, ``u``: the network with and
    without the class), both branches in one doubled batch. Arguments: ``scale``,
    ``interval``, ``channels`` (see :class:`Guidance`)."""

    def wrap(self, network, batch, labels, null_label, guided_width, patch_area):
        """``model_fn(x_tokens, t)`` for a sampler: ``network(batch, t [B], y [B])`` with
        guidance. ``guided_width`` is the number of prediction columns per token and
        ``patch_area`` = p*p (token columns are ``(c, p1, p2)``-ordered)."""
        double = batch.repeat(2)
        both_labels = torch.cat([labels, torch.full_like(labels, null_label)])
        columns = self.columns(guided_width, patch_area)

        def model_fn(x, t):
            t_vec = torch.full((batch.num_images,), float(t), device=x.device, dtype=torch.float64)
            if not self.active(t):
                return network(batch.replace(x), t_vec, labels)
            out = network(double.replace(torch.cat([x, x])), t_vec.repeat(2), both_labels)
            cond, uncond = out.chunk(2)
            return self.combine(cond, uncond, columns)

        return model_fn


@GUIDANCE.register_module()
class AutoGuidance(Guidance):
    """Autoguidance (Karras et al. 2024): ``weak + s (main - weak)`` where ``weak`` is a
    second, weaker model of the same task (fewer parameters and / or fewer training
    steps), both called with the class. The weak model is frozen, in eval mode and kept
    out of the generator's state dict; it follows the input to its device.

    Args:
        weak_model: an ``nn.Module`` called like the backbone, ``(batch, t [B], y [B])``, or
            its config (e.g. ``dict(type='FlexDiT', ...)``, built from ``MODELS``).
        checkpoint: weights for it: a ``.safetensors`` file, or a flexgen / mmengine
            checkpoint read with ``weights_only=True`` (EMA weights when ``use_ema`` and the
            file has them). Keys under ``prefix`` (a whole generator's ``'backbone.'``) are
            taken and stripped; without such keys the file is the module's own state dict.
        scale, interval, channels: as for :class:`ClassifierFreeGuidance`.
    """

    def __init__(self, weak_model, scale=2.0, interval=(0.0, 1.0), channels=None,
                 checkpoint=None, use_ema=True, prefix='backbone.'):
        super().__init__(scale, interval, channels)
        if isinstance(weak_model, dict):
            weak_model = MODELS.build(weak_model)
        if not isinstance(weak_model, nn.Module):
            raise TypeError(f'AutoGuidance: weak_model must be an nn.Module or a model config '
                            f'dict, got {type(weak_model).__name__}')
        if checkpoint is not None:
            load_weak_weights(weak_model, checkpoint, use_ema, prefix)
        self.weak_model = weak_model.eval().requires_grad_(False)

    def wrap(self, network, batch, labels, null_label, guided_width, patch_area):
        """As :meth:`ClassifierFreeGuidance.wrap` (``null_label`` is unused)."""
        columns = self.columns(guided_width, patch_area)

        def model_fn(x, t):
            t_vec = torch.full((batch.num_images,), float(t), device=x.device, dtype=torch.float64)
            main = network(batch.replace(x), t_vec, labels)
            if not self.active(t):
                return main
            weak = self.weak_model.to(x.device)(batch.replace(x), t_vec, labels)
            return self.combine(main, weak.to(main.dtype), columns)

        return model_fn


def load_weak_weights(module, path, use_ema=True, prefix='backbone.'):
    """Load ``path`` into ``module`` (every key, shape and dtype checked), see
    :class:`AutoGuidance`."""
    state, _ = select_weights(read_checkpoint(path), use_ema, where=path)
    if prefix and any(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    try:
        load_checked(module, state, f'checkpoint {path}')
    except CheckpointError as error:
        raise CheckpointError(f'AutoGuidance weak model: {error}') from None

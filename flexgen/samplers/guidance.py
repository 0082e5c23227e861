"""Classifier-free guidance (Ho & Salimans 2022) with a guidance interval
(Kynkaanniemi et al. 2024): ``out = u + s (c - u)`` where ``c`` and ``u`` are the network's
outputs with and without the class, applied only while ``low <= t <= high``."""
import torch

from flexgen.registry import GUIDANCE


@GUIDANCE.register_module()
class ClassifierFreeGuidance:
    """Args:
        scale: guidance scale ``s``; 1 is the conditional model alone (one evaluation).
        interval: ``(low, high)`` in flexgen time (t = 1 noise); outside it, no guidance.
        channels: latent channels to guide (DiT's legacy ``(0, 1, 2)``); ``None`` guides
            every predicted channel. Extra output channels (learned variance) are never
            guided; they come from the conditional branch.
    """

    def __init__(self, scale=1.0, interval=(0.0, 1.0), channels=None):
        self.scale, self.interval = float(scale), tuple(interval)
        self.channels = channels

    def active(self, t):
        low, high = self.interval
        return self.scale != 1.0 and low <= t <= high

    def wrap(self, network, batch, labels, null_label, guided_width, patch_area):
        """``model_fn(x_tokens, t)`` for a sampler: ``network(batch, t [B], y [B])`` with
        guidance. ``guided_width`` is the number of prediction columns per token and
        ``patch_area`` = p*p (token columns are ``(c, p1, p2)``-ordered)."""
        double = batch.repeat(2)
        null = torch.full_like(labels, null_label)
        both_labels = torch.cat([labels, null])
        columns = slice(0, guided_width) if self.channels is None else torch.cat(
            [torch.arange(c * patch_area, (c + 1) * patch_area) for c in self.channels])

        def model_fn(x, t):
            t_vec = torch.full((batch.num_images,), float(t), device=x.device)
            if not self.active(t):
                return network(batch.replace(x), t_vec, labels)
            out = network(double.replace(torch.cat([x, x])), t_vec.repeat(2), both_labels)
            cond, uncond = out.chunk(2)
            guided = cond.clone()
            guided[:, columns] = uncond[:, columns] + self.scale * (cond[:, columns] -
                                                                    uncond[:, columns])
            return guided

        return model_fn

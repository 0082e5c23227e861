"""The Inception-v3 of the FID / IS literature, through torch-fidelity's port.

DiT, SiT, FiT and NiT report numbers from ADM's evaluation suite (Dhariwal & Nichol 2021,
``guided-diffusion/evaluations``): TensorFlow's 2015-12-05 Inception graph fed uint8 images
of any size, resized to 299 x 299 bilinearly inside the graph. torch-fidelity's
``FeatureExtractorInceptionV3`` is a PyTorch port of that graph with TensorFlow 1's
resize, so its features are those of the suite up to float rounding. From one forward pass
this module returns ADM's three feature sets:

- ``pool``: the 2048-d ``pool_3`` features (FID, precision / recall);
- ``logits``: ``pool_3 @ W`` without the bias, the 1008 logits ADM's Inception Score
  takes the softmax of (torch-fidelity's ``logits_unbiased``);
- ``spatial``: the first 7 channels of ``mixed_6/conv`` (the 1x1 branch of block Mixed_6d,
  17 x 17 x 7 = 2023 values in TensorFlow's HWC order), ADM's sFID features.

Weights: a local file (``.pth`` state dict or ``.safetensors``), or, when none is given,
torch-fidelity's released file in torch's hub cache (``torch.hub.get_dir()``), fetched
there once when online. The file is read with ``weights_only=True`` / safetensors: no code
from it is ever run.
"""
import io
import os.path as osp
from typing import Dict, Optional

import torch
from torch import nn

from .utils import state_dict_digest

FEATURES = ('pool', 'logits', 'spatial')
_SPATIAL_CHANNELS = 7


def import_torch_fidelity():
    """torch-fidelity, or an ImportError that says how to install it."""
    try:
        from torch_fidelity import feature_extractor_inceptionv3
    except ImportError as error:
        raise ImportError(
            'Inception metrics (FID, IS, precision / recall) need torch-fidelity: '
            "pip install torch-fidelity (or pip install -e '.[eval]')") from error
    return feature_extractor_inceptionv3


def default_weights_path() -> str:
    """Where torch-fidelity's Inception weights live in torch's hub cache."""
    url = import_torch_fidelity().URL_INCEPTION_V3
    return osp.join(torch.hub.get_dir(), 'checkpoints', osp.basename(url))


def resolve_weights(weights: Optional[str] = None, download: bool = True) -> str:
    """The local path of the Inception weights: ``weights`` itself (it must exist), or
    the hub-cache copy of torch-fidelity's file, fetched first if ``download``."""
    if weights is not None:
        weights = osp.expanduser(str(weights))
        if not osp.isfile(weights):
            raise FileNotFoundError(
                f'Inception weights {weights!r} do not exist (inception_weights= in the '
                'metric config: a .pth state dict or .safetensors of torch-fidelity\'s '
                'FeatureExtractorInceptionV3)')
        return weights
    path = default_weights_path()
    if osp.isfile(path):
        return path
    url = import_torch_fidelity().URL_INCEPTION_V3
    if not download:
        raise FileNotFoundError(
            f'No Inception weights: {path} is not there and download=False. Fetch {url} '
            'there, or give inception_weights=PATH in the metric config')
    try:
        torch.hub.download_url_to_file(url, path, progress=True)
    except Exception as error:  # offline, proxy, ...
        raise RuntimeError(
            f'Could not fetch the Inception weights from {url} into {path} ({error}). '
            'Offline: copy the file there, or give inception_weights=PATH in the metric '
            'config') from error
    return path


def read_weights(path: str) -> Dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a weights-only ``torch.load``."""
    if path.endswith('.safetensors'):
        from safetensors.torch import load_file
        return load_file(path)
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as error:
        raise RuntimeError(f'Inception weights {path!r} could not be read as a weights-only '
                           f'state dict (flexgen never unpickles code): {error}') from error
    if isinstance(state, dict) and 'state_dict' in state and isinstance(state['state_dict'],
                                                                         dict):
        state = state['state_dict']
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise ValueError(f'Inception weights {path!r}: expected a dict of tensors (a state '
                         f'dict), got {type(state).__name__}')
    return state


class InceptionFeatures(nn.Module):
    """ADM's Inception features of uint8 images (see the module docstring).

    Args:
        weights: a local weights file; ``None``: torch-fidelity's file from the hub cache.
        download: fetch that file when it is not cached (never when ``weights`` is given).
        device: where the network runs (default: CUDA when available).
    """

    def __init__(self, weights: Optional[str] = None, download: bool = True,
                 device: Optional[str] = None):
        super().__init__()
        extractor_module = import_torch_fidelity()
        self.weights_path = resolve_weights(weights, download)
        state = read_weights(self.weights_path)
        self.digest = state_dict_digest(state)
        # torch-fidelity reads its weights file with weights_only=False; it gets an in-memory
        # copy of the tensors read safely above, never the file itself.
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        try:
            self.net = extractor_module.FeatureExtractorInceptionV3(
                'inception-v3-compat', ['2048', 'logits_unbiased'],
                feature_extractor_weights_path=buffer)
        except RuntimeError as error:  # load_state_dict: missing / unexpected keys, shapes
            raise ValueError(f'Inception weights {self.weights_path!r} do not fit '
                             f'torch-fidelity\'s InceptionV3: '
                             f'{" ".join(str(error).split())}') from error
        self._spatial = None
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)
        self.to(torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu')))
        self.eval()

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def _keep_spatial(self, module, inputs, output):
        self._spatial = output[:, :_SPATIAL_CHANNELS]

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """uint8 ``[B, 3, H, W]`` (any H, W) -> ``pool [B, 2048]``, ``logits [B, 1008]``,
        ``spatial [B, 2023]`` (float32, on the CPU)."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError('InceptionFeatures: images must be uint8 [B, 3, H, W], got '
                             f'{images.dtype} {tuple(images.shape)}')
        pool, logits = self.net(images.to(self.device))
        spatial = self._spatial.permute(0, 2, 3, 1).reshape(len(images), -1)
        self._spatial = None
        return dict(pool=pool.float().cpu(), logits=logits.float().cpu(),
                    spatial=spatial.float().cpu())

"""The Frechet distance between two Gaussians fitted to feature sets (the "F" of FID).

Heusel et al., 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local
Nash Equilibrium": for N(mu1, S1) and N(mu2, S2),

    d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)).
"""
from typing import Tuple

import numpy as np


def _as_float64(x) -> np.ndarray:
    if hasattr(x, 'detach'):  # a torch tensor
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def feature_statistics(features) -> Tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and unbiased covariance ``[D, D]`` (float64) of features ``[N, D]``."""
    features = _as_float64(features)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError('feature_statistics: features must be [N, D] with N >= 2, '
                         f'got shape {features.shape}')
    return features.mean(0), np.cov(features, rowvar=False).reshape(features.shape[1], -1)


def _noise_free(values: np.ndarray) -> np.ndarray:
    """Eigenvalues of a symmetric PSD matrix with the rounding noise of its null space set
    to 0: below ``d * eps * max`` (numpy's matrix_rank tolerance) a value is zero up to
    float64 rounding, and the square roots of 2000 such values (a covariance of fewer
    images than features) would add up to a visible error."""
    tolerance = len(values) * np.finfo(np.float64).eps * max(float(values.max()), 0.0)
    return np.where(values > tolerance, values, 0.0)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(_noise_free(values))) @ vectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """``|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))``, computed in float64."""
    mu1, mu2 = _as_float64(mu1).reshape(-1), _as_float64(mu2).reshape(-1)
    sigma1, sigma2 = _as_float64(sigma1), _as_float64(sigma2)
    d = mu1.shape[0]
    for name, value, shape in (('mu2', mu2, (d,)), ('sigma1', sigma1, (d, d)),
                               ('sigma2', sigma2, (d, d))):
        if value.shape != shape:
            raise ValueError(f'frechet_distance: {name} has shape {value.shape}, '
                             f'expected {shape} (mu1 has {d} features)')
    # No scipy.linalg.sqrtm of the non-symmetric S1 S2 (scipy is not a dependency, and sqrtm
    # returns complex noise on near-singular covariances): S1 S2 has the eigenvalues of the
    # symmetric PSD matrix S1^(1/2) S2 S1^(1/2), so Tr (S1 S2)^(1/2) = sum of the square roots
    # of that matrix's eigenvalues, which a symmetric eigendecomposition gives stably.
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    trace_sqrt = np.sqrt(_noise_free(np.linalg.eigvalsh((middle + middle.T) / 2))).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)

"""Frechet distance between feature distributions (the FID formula), for reward-vs-drift checks.

Each set of features is summarised by a Gaussian ``N(mu, C)``; the Frechet (2-Wasserstein)
distance between two Gaussians is::

    d^2 = |mu1 - mu2|^2 + tr(C1) + tr(C2) - 2 tr((C1^{1/2} C2 C1^{1/2})^{1/2})

The last trace equals ``tr((C1 C2)^{1/2})`` of the usual FID statement, but is computed from
symmetric PSD matrices only: ``C1^{1/2}`` by an eigendecomposition with eigenvalues clipped at 0,
then the eigenvalues of ``M = C1^{1/2} C2 C1^{1/2}``, clipped at 0, square-rooted and summed.
This stays real and finite for singular covariances (fewer samples than dimensions), where a
general ``sqrtm(C1 @ C2)`` returns complex noise. Everything is float64 NumPy on the host.
"""

from __future__ import annotations

import numpy as np


def gaussian_stats(features) -> tuple[np.ndarray, np.ndarray]:
  """Mean (D,) and unbiased covariance (D, D) (divisor N - 1) of features (N, D), in float64."""
  x = np.asarray(features, np.float64)
  if x.ndim != 2 or x.shape[0] < 2:
    raise ValueError(f"features must be (N >= 2, D), got shape {x.shape}")
  mu = x.mean(axis=0)
  xc = x - mu
  return mu, xc.T @ xc / (x.shape[0] - 1)


def _psd_sqrt(c: np.ndarray) -> np.ndarray:
  """Symmetric square root of a PSD matrix (symmetrised first, negative eigenvalues -> 0)."""
  w, v = np.linalg.eigh((c + c.T) / 2)
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
  """Squared Frechet distance between N(mu1, cov1) and N(mu2, cov2) (formula above), >= 0."""
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
  if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != mu1.shape * 2:
    raise ValueError(f"shape mismatch: mu {mu1.shape} {mu2.shape}, cov {cov1.shape} {cov2.shape}")
  s1 = _psd_sqrt(cov1)
  m = s1 @ cov2 @ s1
  cross = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum()
  d2 = np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2 * cross
  # Rounding can leave a tiny negative value for (near-)identical inputs.
  return float(max(d2, 0.0))

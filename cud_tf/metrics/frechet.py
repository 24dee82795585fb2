"""Fréchet distance between Gaussian fits of two feature sets (Heusel et al. 2017), with streaming statistics.

    FD = ||mu_1 - mu_2||^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)).
"""
import dataclasses

import numpy as np
import scipy.linalg


class FeatureStats:
    """Running mean and covariance of features `[B, D]` fed batch by batch, accumulated in float64."""

    def __init__(self, dim):
        self.dim = dim
        self.n = 0
        self._sum = np.zeros([dim], np.float64)
        self._outer = np.zeros([dim, dim], np.float64)

    def update(self, features):
        """Adds a batch `[B, D]` (any float dtype)."""
        f = np.asarray(features, np.float64).reshape(-1, self.dim)
        self.n += f.shape[0]
        self._sum += f.sum(axis=0)
        self._outer += f.T @ f

    def mean_cov(self):
        """(mu `[D]`, unbiased covariance `[D, D]`); needs at least two examples."""
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.n}")
        mu = self._sum / self.n
        cov = (self._outer - self.n * np.outer(mu, mu)) / (self.n - 1)
        return mu, cov


@dataclasses.dataclass
class Gaussian:
    """A Gaussian fit of features: mean `[D]`, covariance `[D, D]`, from n examples."""

    mu: np.ndarray
    cov: np.ndarray
    n: int

    @classmethod
    def from_stats(cls, stats: FeatureStats):
        mu, cov = stats.mean_cov()
        return cls(mu, cov, stats.n)

    @classmethod
    def from_features(cls, features):
        features = np.asarray(features)
        stats = FeatureStats(features.shape[-1])
        stats.update(features)
        return cls.from_stats(stats)

    def save(self, path):
        np.savez(path, mu=self.mu, cov=self.cov, n=self.n)

    @classmethod
    def load(cls, path):
        with np.load(path) as d:
            return cls(d["mu"], d["cov"], int(d["n"]))


def sqrtm_product(cov1, cov2, eps=1e-6):
    """(cov1 cov2)^(1/2) `[D, D]` by scipy's sqrtm; when the product is near singular (non-finite result),
    both covariances get eps I added first, as in the TTUR / pytorch-fid reference code."""
    covmean = scipy.linalg.sqrtm(cov1 @ cov2)
    if not np.isfinite(covmean).all():
        offset = np.eye(cov1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((cov1 + offset) @ (cov2 + offset))
    if np.iscomplexobj(covmean):
        # Round-off gives tiny imaginary parts; a large one means the inputs are not covariances.
        max_imag = np.max(np.abs(covmean.imag))
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"matrix square root has an imaginary component of {max_imag:.3g}: "
                             "the covariances are not positive semi-definite")
        covmean = covmean.real
    return covmean


def frechet_distance(a: Gaussian, b: Gaussian) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), in float64."""
    if a.mu.shape != b.mu.shape:
        raise ValueError(f"feature dimensions differ: {a.mu.shape} vs {b.mu.shape}")
    diff = a.mu - b.mu
    covmean = sqrtm_product(a.cov, b.cov)
    value = diff @ diff + np.trace(a.cov) + np.trace(b.cov) - 2.0 * np.trace(covmean)
    return float(max(value, 0.0))

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

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])

    def save(self, path):
        """Writes `mu` `[D]`, `sigma` `[D, D]` and `n` to an .npz: the keys pytorch-fid, TTUR and EDM use for their
        statistics files, so the file is also a valid reference for those tools."""
        np.savez(path, mu=self.mu, sigma=self.cov, n=self.n)

    @classmethod
    def load(cls, path):
        """Reads `load_statistics(path)` (no image batches)."""
        return load_statistics(path)


def min_samples(dim: int) -> int:
    """Feature vectors needed for a nonsingular covariance of `dim`-d features (an unbiased covariance of n
    vectors has rank at most n - 1)."""
    return dim + 1


def load_statistics(path, features=None, batch_size=100) -> Gaussian:
    """Feature statistics from an .npz in one of the published formats:

    - `mu` `[D]` and `sigma` `[D, D]`: pytorch-fid (`--save-stats`), TTUR's precalculated statistics, EDM's
      reference files (e.g. cifar10-32x32.npz) and guided-diffusion's reference batches (whose other arrays,
      `arr_0` images and `mu_s`/`sigma_s` spatial statistics, are then ignored); with `n`, the example count,
      when this project wrote the file (0 when unknown).
    - `mu` and `cov`: this project's older files.
    - only `arr_0`: `[N, D]` activations (mean and covariance taken here), or `[N, H, W, C]` uint8 images
      (guided-diffusion's sample batches), turned into statistics with `features(images [B, H, W, C] float in
      [-1, 1]) -> [B, D]` in batches of `batch_size`.

    ValueError (one line) for anything else.
    """
    try:
        d = np.load(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read statistics file {path}: {str(e).splitlines()[0]}") from None
    with d:
        keys = set(d.files)
        if "mu" in keys and ("sigma" in keys or "cov" in keys):
            mu = np.asarray(d["mu"], np.float64)
            cov = np.asarray(d["sigma"] if "sigma" in keys else d["cov"], np.float64)
            n = int(d["n"]) if "n" in keys else 0
            if mu.ndim != 1 or cov.shape != (mu.shape[0], mu.shape[0]):
                raise ValueError(f"{path}: mu {mu.shape} and sigma {cov.shape} are not a mean [D] and a "
                                 "covariance [D, D]")
            return Gaussian(mu, cov, n)
        if "arr_0" not in keys:
            raise ValueError(f"{path} holds {sorted(keys)}; expected mu and sigma (pytorch-fid, TTUR, EDM, "
                             "guided-diffusion) or arr_0 (activations or images)")
        arr = d["arr_0"]
    if arr.ndim == 2:
        return Gaussian.from_features(arr)
    if arr.ndim == 4:
        if features is None:
            raise ValueError(f"{path} holds images {arr.shape} but no feature extractor was given to compute "
                             "their statistics")
        stats = None
        for i in range(0, len(arr), batch_size):
            batch = np.asarray(arr[i:i + batch_size], np.float32) / 127.5 - 1.0
            f = np.asarray(features(batch))
            stats = stats or FeatureStats(f.shape[-1])
            stats.update(f)
        if stats is None:
            raise ValueError(f"{path}: arr_0 holds no images")
        return Gaussian.from_stats(stats)
    raise ValueError(f"{path}: arr_0 has shape {arr.shape}; expected activations [N, D] or images [N, H, W, C]")


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


# Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium".
def frechet_distance(a: Gaussian, b: Gaussian) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), in float64."""
    if a.mu.shape != b.mu.shape:
        raise ValueError(f"feature dimensions differ: {a.mu.shape} vs {b.mu.shape}")
    diff = a.mu - b.mu
    covmean = sqrtm_product(a.cov, b.cov)
    value = diff @ diff + np.trace(a.cov) + np.trace(b.cov) - 2.0 * np.trace(covmean)
    return float(max(value, 0.0))

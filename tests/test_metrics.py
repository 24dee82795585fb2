"""Fréchet distance against closed forms, streaming statistics, the InceptionV3 weights check, and the MNIST
classifier's cache."""
import json
import os

import numpy as np
import pytest

from cud_tf.metrics import FeatureStats, Gaussian, InceptionFeatures, frechet_distance, mnist_classifier


def _rotation(d, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q


def test_frechet_distance_matches_the_closed_form_of_commuting_gaussians():
    # S_a = R diag(a) R^T and S_b = R diag(b) R^T commute: FD = |mu_a - mu_b|^2 + sum (sqrt(a) - sqrt(b))^2.
    d = 6
    r = _rotation(d, 0)
    a, b = np.linspace(0.5, 3.0, d), np.linspace(2.0, 0.1, d)
    mu_a, mu_b = np.arange(d, dtype=float), np.ones(d)
    ga = Gaussian(mu_a, r @ np.diag(a) @ r.T, 0)
    gb = Gaussian(mu_b, r @ np.diag(b) @ r.T, 0)
    expected = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(ga, gb) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(gb, ga) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_of_samples_of_known_gaussians():
    rng = np.random.default_rng(1)
    n, d = 200_000, 3
    x = rng.normal(size=(n, d)) * 2.0 + 1.0  # N(1, 4 I)
    y = rng.normal(size=(n, d))  # N(0, I)
    expected = d * 1.0 + d * (2.0 - 1.0) ** 2
    assert frechet_distance(Gaussian.from_features(x), Gaussian.from_features(y)) == pytest.approx(expected, rel=0.02)


def test_streaming_statistics_equal_the_whole_set_in_float64():
    x = np.random.default_rng(2).normal(size=(1001, 5)).astype(np.float32) * 100 + 1e3
    stats = FeatureStats(5)
    for i in range(0, len(x), 64):
        stats.update(x[i:i + 64])
    mu, cov = stats.mean_cov()
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(cov, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-9)
    with pytest.raises(ValueError, match="at least 2"):
        FeatureStats(3).mean_cov()


def test_identical_sets_give_zero_even_when_the_covariance_is_singular():
    rng = np.random.default_rng(3)
    full = rng.normal(size=(500, 8))
    few = rng.normal(size=(10, 64))  # rank 9 covariance of 64-d features
    for x in (full, few):
        g = Gaussian.from_features(x)
        assert frechet_distance(g, Gaussian.from_features(x.copy())) == pytest.approx(0.0, abs=1e-4)
    shifted = Gaussian.from_features(few + 1.0)
    assert frechet_distance(Gaussian.from_features(few), shifted) == pytest.approx(64.0, rel=1e-3)


def test_inception_needs_a_local_weights_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="--inception_weights"):
        InceptionFeatures(str(tmp_path / "missing.h5"))


TINY_CLASSIFIER = mnist_classifier.ClassifierConfig(epochs=1, train_examples=2000, min_accuracy=0.5)


def test_classifier_is_trained_once_then_loaded_from_its_cache(mnist_data_dir, tmp_path, monkeypatch):
    cache = str(tmp_path / "clf")
    clf = mnist_classifier.load_or_train(cache, mnist_data_dir, TINY_CLASSIFIER, log=None)
    with open(os.path.join(cache, mnist_classifier.INFO)) as f:
        info = json.load(f)
    assert 0.5 <= info["test_accuracy"] <= 1.0 and info["train_examples"] == 2000
    assert clf.reference.mu.shape == (mnist_classifier.FEATURE_DIM,) and clf.reference.n == 10000

    def no_training(*a, **k):
        raise AssertionError("retrained although the cache was valid")

    monkeypatch.setattr(mnist_classifier, "train", no_training)
    again = mnist_classifier.load_or_train(cache, mnist_data_dir, TINY_CLASSIFIER, log=None)
    x = np.random.default_rng(0).uniform(-1, 1, size=(4, 28, 28, 1)).astype(np.float32)
    np.testing.assert_allclose(again.features(x).numpy(), clf.features(x).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(again.reference.cov, clf.reference.cov)
    monkeypatch.undo()

    # An accuracy floor above what the cached classifier reached: load refuses, training again fails too,
    # and the cache stays as it was.
    with pytest.raises(mnist_classifier.ClassifierError, match="test accuracy"):
        mnist_classifier.load(cache, min_accuracy=0.9999)
    strict = mnist_classifier.ClassifierConfig(epochs=1, train_examples=256, min_accuracy=0.9999)
    with pytest.raises(mnist_classifier.ClassifierError, match="below the floor"):
        mnist_classifier.load_or_train(cache, mnist_data_dir, strict, log=None)
    assert mnist_classifier.load(cache, min_accuracy=0.5).info == info

"""Fréchet distance against closed forms, streaming statistics, the published statistics formats, FID's Inception
graph loader (on a small stand-in GraphDef with the real one's tensor names), the Keras InceptionV3 weights check,
and the MNIST classifier's cache."""
import json
import os

import numpy as np
import pytest
import scipy.linalg
import tensorflow as tf

from helpers import write_test_inception_graph
from cud_tf.metrics import (
    FeatureStats,
    Gaussian,
    InceptionFeatures,
    InceptionGraph,
    fid_inception,
    frechet_distance,
    load_statistics,
    mnist_classifier,
)


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


def test_inception_graph_batches_equal_the_graph_fed_one_image_at_a_time(tmp_path):
    path = str(tmp_path / "classify_image_graph_def.pb")
    per_image = write_test_inception_graph(path)
    metric = InceptionGraph(path, batch_size=3)
    assert metric.dim == 16 and metric.info()["graph_sha256"] == fid_inception.file_sha256(path)
    images = np.random.default_rng(4).integers(0, 256, size=(7, 20, 20, 3)).astype(np.uint8)  # 3 + 3 + 1
    expected = np.stack([per_image(im) for im in images])
    assert np.std(expected) > 0.01  # features that differ between images
    got = metric.features_uint8_range(images.astype(np.float32)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # Images in [-1, 1] are quantised to the integers 0..255 and grey ones repeated to three channels.
    grey = images[..., :1]
    in_unit_range = grey.astype(np.float32) / 127.5 - 1.0 + 1e-3  # off the grid: rounding must bring it back
    expected_grey = np.stack([per_image(np.repeat(im, 3, -1)) for im in grey])
    np.testing.assert_allclose(metric.features(in_unit_range).numpy(), expected_grey, rtol=1e-5, atol=1e-6)


def test_fid_through_the_graph_equals_the_reference_formula(tmp_path):
    # Loader, batching, streaming statistics and the Fréchet distance against numpy/scipy on the per-image
    # features: mu, np.cov and ||mu1 - mu2||^2 + tr(S1 + S2 - 2 sqrtm(S1 S2)) as TTUR writes it.
    path = str(tmp_path / "g.pb")
    per_image = write_test_inception_graph(path, dim=8)
    metric = InceptionGraph(path, batch_size=16)
    rng = np.random.default_rng(5)
    a = rng.integers(0, 256, size=(60, 16, 16, 3)).astype(np.uint8)
    b = np.clip(a.astype(int) // 2 + rng.integers(0, 60, size=a.shape), 0, 255).astype(np.uint8)
    stats = {}
    for name, images in (("a", a), ("b", b)):
        s = FeatureStats(metric.dim)
        for i in range(0, len(images), 25):
            s.update(metric.features_uint8_range(images[i:i + 25].astype(np.float32)).numpy())
        stats[name] = Gaussian.from_stats(s)
    fa, fb = (np.stack([per_image(im) for im in x]).astype(np.float64) for x in (a, b))
    s1, s2 = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    expected = np.sum((fa.mean(0) - fb.mean(0)) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert expected > 0.1
    assert frechet_distance(stats["a"], stats["b"]) == pytest.approx(expected, rel=1e-4)


def test_inception_graph_refuses_files_that_are_not_ttur_graphs(tmp_path):
    with pytest.raises(FileNotFoundError, match="classify_image_graph_def.pb"):
        InceptionGraph(str(tmp_path / "missing.pb"))
    garbage = tmp_path / "garbage.pb"
    garbage.write_bytes(b"\xff\x00 not a protobuf" * 10)
    with pytest.raises(ValueError, match="not a TensorFlow GraphDef"):
        InceptionGraph(str(garbage))
    other = tf.function(lambda x: tf.identity(x * 2.0, name="out"), [tf.TensorSpec([None, 3], tf.float32)])
    (tmp_path / "other.pb").write_bytes(other.get_concrete_function().graph.as_graph_def().SerializeToString())
    with pytest.raises(ValueError, match="no node 'ExpandDims'"):
        InceptionGraph(str(tmp_path / "other.pb"))


def test_statistics_files_of_every_published_format_round_trip(tmp_path):
    rng = np.random.default_rng(6)
    feats = rng.normal(size=(300, 4)) @ rng.normal(size=(4, 4)) + 3.0
    g = Gaussian.from_features(feats)
    g.save(tmp_path / "ours.npz")
    with np.load(tmp_path / "ours.npz") as d:
        assert set(d.files) == {"mu", "sigma", "n"}  # what pytorch-fid / TTUR / EDM read
    back = load_statistics(str(tmp_path / "ours.npz"))
    np.testing.assert_array_equal(back.mu, g.mu)
    np.testing.assert_array_equal(back.cov, g.cov)
    assert back.n == 300
    np.savez_compressed(tmp_path / "pytorch_fid.npz", mu=g.mu, sigma=g.cov)  # pytorch-fid --save-stats, EDM
    np.savez(tmp_path / "legacy.npz", mu=g.mu, cov=g.cov, n=300)  # this project's older files
    images = rng.integers(0, 256, size=(5, 8, 8, 3)).astype(np.uint8)
    np.savez(tmp_path / "guided.npz", arr_0=images, mu=g.mu, sigma=g.cov, mu_s=g.mu[:2], sigma_s=g.cov[:2, :2])
    np.savez(tmp_path / "activations.npz", feats)
    for name in ("pytorch_fid", "legacy", "guided", "activations"):
        loaded = load_statistics(str(tmp_path / f"{name}.npz"))
        np.testing.assert_allclose(loaded.mu, g.mu, rtol=1e-12)
        np.testing.assert_allclose(loaded.cov, g.cov, rtol=1e-10)
        assert frechet_distance(loaded, g) == pytest.approx(0.0, abs=1e-6)
    assert load_statistics(str(tmp_path / "pytorch_fid.npz")).n == 0  # unknown

    # A sample batch of images only (guided-diffusion): statistics of their features, images given in [-1, 1].
    many = rng.integers(0, 256, size=(40, 8, 8, 3)).astype(np.uint8)
    np.savez(tmp_path / "images.npz", arr_0=many)

    def features(x):
        assert x.min() >= -1.0 and x.max() <= 1.0
        return x.reshape(len(x), -1)[:, :5] * 2.0

    from_images = load_statistics(str(tmp_path / "images.npz"), features, batch_size=16)
    expected = Gaussian.from_features(features(many.astype(np.float32) / 127.5 - 1.0))
    np.testing.assert_allclose(from_images.mu, expected.mu, rtol=1e-9)
    np.testing.assert_allclose(from_images.cov, expected.cov, rtol=1e-9)
    with pytest.raises(ValueError, match="no feature extractor"):
        load_statistics(str(tmp_path / "images.npz"))
    np.savez(tmp_path / "bad.npz", mean=g.mu)
    with pytest.raises(ValueError, match="expected mu and sigma"):
        load_statistics(str(tmp_path / "bad.npz"))
    with pytest.raises(ValueError, match="cannot read"):
        load_statistics(str(tmp_path / "missing.npz"))


def test_two_gaussians_from_stored_statistics_give_the_closed_form(tmp_path):
    # Non-commuting covariances: FD = |mu_a - mu_b|^2 + tr(A) + tr(B) - 2 tr((A B)^(1/2)); for A = I the root is
    # B^(1/2), whose trace is the sum of the square roots of B's eigenvalues.
    d = 5
    q = _rotation(d, 7)
    eig = np.array([0.25, 1.0, 2.25, 4.0, 9.0])
    b = q @ np.diag(eig) @ q.T
    np.savez(tmp_path / "a.npz", mu=np.zeros(d), sigma=np.eye(d))
    np.savez(tmp_path / "b.npz", mu=np.full(d, 2.0), sigma=b)
    expected = d * 4.0 + d + eig.sum() - 2 * np.sqrt(eig).sum()
    got = frechet_distance(load_statistics(str(tmp_path / "a.npz")), load_statistics(str(tmp_path / "b.npz")))
    assert got == pytest.approx(expected, rel=1e-9)


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

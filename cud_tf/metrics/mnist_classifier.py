"""A small MNIST CNN whose penultimate features (128-d) give "FD (MNIST classifier)", a Fréchet distance in the
spirit of FID for the offline data set (never to be reported as FID), and whose argmax checks class-conditional
samples. Trained once on the train split with Keras `fit`, cached on disk with its measured test accuracy and the
reference statistics (mean, covariance) of the real test split's features.
"""
import dataclasses
import json
import os
import shutil
import tempfile
import time

import numpy as np
import tensorflow as tf

from cud_tf.metrics.frechet import FeatureStats, Gaussian

DEFAULT_DIR = os.path.join("~", ".cache", "cud_tf", "mnist_classifier")
WEIGHTS, INFO, REFERENCE = "classifier.weights.h5", "classifier.json", "reference_test.npz"
FEATURE_DIM = 128


class ClassifierError(RuntimeError):
    """The classifier cannot be used (accuracy below the floor, data missing), with the reason in one line."""


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    epochs: int = 4
    batch_size: int = 128
    learning_rate: float = 2e-3  # cosine-decayed to 0 over the epochs
    train_examples: int = 0  # 0: the whole train split (50k); tests use a few hundred
    min_accuracy: float = 0.99  # refuse a classifier whose test accuracy is lower
    seed: int = 0


def build_model():
    """images `[B, 28, 28, 1]` in [-1, 1] -> (features `[B, 128]`, logits `[B, 10]`)."""
    import keras
    from keras import layers

    x = inputs = keras.Input((28, 28, 1))
    for channels in (16, 32):
        x = layers.MaxPooling2D()(layers.Conv2D(channels, 5, padding="same", activation="relu")(x))
    x = layers.Dropout(0.25)(layers.Flatten()(x))
    features = layers.Dense(FEATURE_DIM, activation="relu", name="features")(x)
    logits = layers.Dense(10, name="logits")(layers.Dropout(0.5)(features))
    return keras.Model(inputs, [features, logits], name="mnist_classifier")


def load_split(data_dir, split):
    """(images float32 `[N, 28, 28, 1]` in [-1, 1], labels int64 `[N]`) of `mnist_offline`."""
    import tensorflow_datasets as tfds
    from cud_tf import data

    builder = data.get_builder(data.DataConfig(dataset="mnist_offline", data_dir=data_dir))
    arrays = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
    return arrays["image"].astype(np.float32) / 127.5 - 1.0, arrays["label"]


# Heusel et al. 2017 (the Fréchet distance of FID), on the features of this project's own MNIST CNN.
class MnistClassifier:
    """Features, labels and the real-data reference Gaussian of a trained classifier."""

    name = "FD (MNIST classifier)"
    dim = FEATURE_DIM

    def __init__(self, model, info: dict, reference: Gaussian):
        self.model, self.info, self.reference = model, info, reference
        self._fn = tf.function(lambda x: self.model(x, training=False), reduce_retracing=True)

    def features_and_logits(self, images):
        """images `[B, 28, 28, 1]` in [-1, 1] -> (features `[B, 128]`, logits `[B, 10]`)."""
        return self._fn(tf.convert_to_tensor(images, tf.float32))

    def features(self, images):
        return self.features_and_logits(images)[0]

    def predict(self, images):
        """Predicted classes `[B]` int64."""
        return tf.argmax(self.features_and_logits(images)[1], axis=-1)


def _batched(fn, x, batch=1000):
    return [fn(x[i:i + batch]) for i in range(0, len(x), batch)]


def train(cache_dir, data_dir, cfg: ClassifierConfig, log=print) -> MnistClassifier:
    """Trains on the train split, measures test accuracy, writes the cache atomically; ClassifierError below
    `cfg.min_accuracy` (the cache is then left as it was)."""
    import keras

    start = time.perf_counter()
    x_train, y_train = load_split(data_dir, f"train[:{cfg.train_examples}]" if cfg.train_examples else "train")
    x_test, y_test = load_split(data_dir, "test")
    keras.utils.set_random_seed(cfg.seed)
    model = build_model()
    train_model = keras.Model(model.input, model.outputs[1])
    steps = cfg.epochs * (-(-len(x_train) // cfg.batch_size))
    lr = keras.optimizers.schedules.CosineDecay(cfg.learning_rate, steps)
    train_model.compile(optimizer=keras.optimizers.Adam(lr),
                        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    train_model.fit(x_train, y_train, batch_size=cfg.batch_size, epochs=cfg.epochs, shuffle=True,
                    verbose=2 if log else 0)
    tf.random.set_seed(None)
    seconds = time.perf_counter() - start
    clf = MnistClassifier(model, {}, None)
    stats, correct = FeatureStats(FEATURE_DIM), 0
    for i in range(0, len(x_test), 1000):
        feats, logits = clf.features_and_logits(x_test[i:i + 1000])
        stats.update(feats.numpy())
        correct += int(np.sum(np.argmax(logits.numpy(), -1) == y_test[i:i + 1000]))
    accuracy = correct / len(x_test)
    if accuracy < cfg.min_accuracy:
        raise ClassifierError(f"the MNIST classifier reached {accuracy:.4f} test accuracy, below the floor "
                              f"{cfg.min_accuracy}; train longer (more epochs) or lower the accuracy floor")
    info = dict(test_accuracy=accuracy, test_examples=len(x_test), train_examples=len(x_train), epochs=cfg.epochs,
                batch_size=cfg.batch_size, learning_rate=cfg.learning_rate, seed=cfg.seed, train_seconds=seconds,
                feature_dim=FEATURE_DIM, reference="mnist_offline test split, penultimate (Dense 128) features")
    clf.info, clf.reference = info, Gaussian.from_stats(stats)
    _write_cache(cache_dir, clf)
    if log:
        log(f"MNIST classifier: test accuracy {accuracy:.4f} after {seconds:.0f} s; cached in {cache_dir}")
    return clf


def _write_cache(cache_dir, clf: MnistClassifier):
    parent = os.path.dirname(os.path.abspath(cache_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".mnist_classifier_", dir=parent)
    os.chmod(tmp, 0o755)
    clf.model.save_weights(os.path.join(tmp, WEIGHTS))
    clf.reference.save(os.path.join(tmp, REFERENCE))
    with open(os.path.join(tmp, INFO), "w") as f:
        json.dump(clf.info, f, indent=1, sort_keys=True)
    if os.path.isdir(cache_dir):
        shutil.rmtree(cache_dir)
    os.replace(tmp, cache_dir)


def load(cache_dir, min_accuracy=0.99) -> MnistClassifier:
    """The cached classifier; ClassifierError if it is missing, incomplete or below `min_accuracy`."""
    paths = [os.path.join(cache_dir, name) for name in (WEIGHTS, INFO, REFERENCE)]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise ClassifierError(f"no cached MNIST classifier in {cache_dir} (missing {os.path.basename(missing[0])})")
    with open(paths[1]) as f:
        info = json.load(f)
    if info["test_accuracy"] < min_accuracy:
        raise ClassifierError(f"the cached MNIST classifier in {cache_dir} has test accuracy "
                              f"{info['test_accuracy']:.4f} < {min_accuracy}")
    model = build_model()
    model.load_weights(paths[0])
    return MnistClassifier(model, info, Gaussian.load(paths[2]))


def load_or_train(cache_dir=None, data_dir=None, cfg: ClassifierConfig = ClassifierConfig(), log=print):
    """The classifier cached in `cache_dir` (default ~/.cache/cud_tf/mnist_classifier); trained and cached
    first when there is none, or when the cached one is below `cfg.min_accuracy`."""
    cache_dir = os.path.expanduser(cache_dir or DEFAULT_DIR)
    try:
        return load(cache_dir, cfg.min_accuracy)
    except ClassifierError as e:
        if log:
            log(f"{e}: training one on mnist_offline's train split")
    return train(cache_dir, data_dir, cfg, log)

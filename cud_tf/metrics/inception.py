"""A Fréchet distance on Keras' InceptionV3 pool features (2048-d), from a local weights file (never downloaded).

Not FID as papers report it: Keras' `inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5` is another
training of InceptionV3 than the 2015-12-05 graph that TTUR, pytorch-fid and EDM use (`fid_inception.py`), so
its distances are not comparable with published FIDs. Kept for a local, relative comparison (docs/fid.md).
"""
import os

import tensorflow as tf

INCEPTION_SIZE = 299
WEIGHTS_FILE = "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"
WEIGHTS_URL = ("https://storage.googleapis.com/tensorflow/keras-applications/inception_v3/" + WEIGHTS_FILE)


# Szegedy et al. 2016, "Rethinking the Inception Architecture for Computer Vision" (InceptionV3, Keras weights).
class InceptionFeatures:
    """`features(images [B, H, W, C] in [-1, 1]) -> [B, 2048]`: images resized to 299x299 (bilinear),
    grey images repeated to 3 channels, already in the [-1, 1] range that Keras' Inception preprocessing gives."""

    name = "FD (Keras InceptionV3, not FID)"
    dim = 2048

    def __init__(self, weights_path):
        import keras

        if not weights_path or not os.path.isfile(weights_path):
            raise FileNotFoundError(
                f"InceptionV3 weights file {weights_path!r} not found; download {WEIGHTS_URL} once and pass its "
                "path with --inception_weights (nothing is downloaded at run time)")
        self.model = keras.applications.InceptionV3(
            include_top=False, weights=None, pooling="avg", input_shape=(INCEPTION_SIZE, INCEPTION_SIZE, 3))
        self.model.load_weights(weights_path)
        self._fn = tf.function(self._features, reduce_retracing=True)

    def _features(self, images):
        x = tf.image.resize(tf.cast(images, tf.float32), [INCEPTION_SIZE, INCEPTION_SIZE], method="bilinear")
        if x.shape[-1] == 1:
            x = tf.repeat(x, 3, axis=-1)
        return self.model(tf.clip_by_value(x, -1.0, 1.0), training=False)

    def features(self, images):
        return self._fn(images)

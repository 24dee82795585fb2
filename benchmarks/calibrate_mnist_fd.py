"""What "FD (MNIST classifier)" values mean: the distance of known image sets to the evaluator's reference.

    python benchmarks/calibrate_mnist_fd.py [--classifier_dir=DIR] [--data_dir=DIR] [--out_json=FILE]

Scores, with the classifier, reference statistics and scoring code the evaluator uses
(`cud_tf.evaluation.load_classifier` and `cud_tf.evaluation.score`: images clipped to [-1, 1], the test split's
statistics as reference), `--num_images` images of each set: real train images (the floor a perfect model
reaches with that many samples), the test images themselves (the reference's own images: ~0, a sanity check),
test digits blurred with a Gaussian of `--blur_sigma` px, 50/50 averages of two different test digits, uniform
noise in [-1, 1], and N(0, 1) noise clipped to [-1, 1] (the sampler's input). Prints JSON and a markdown table.
"""
import json
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's cud_tf
FLAGS = flags.FLAGS
flags.DEFINE_string("classifier_dir", None, "MNIST classifier cache (default ~/.cache/cud_tf/mnist_classifier; "
                    "trained there on first use, as by the evaluator).")
flags.DEFINE_string("data_dir", None, "tfds data directory holding mnist_offline (default: tfds' own).")
flags.DEFINE_float("min_accuracy", 0.99, "Test-accuracy floor of the classifier (the evaluator's default).",
                   lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_integer("num_images", 10000, "Images per set (at most 10000: the test split).", lower_bound=129,
                     upper_bound=10000)
flags.DEFINE_float("blur_sigma", 1.0, "Standard deviation of the Gaussian blur, in pixels.", lower_bound=0.01)
flags.DEFINE_integer("batch_size", 500, "Images scored per batch.", lower_bound=1)
flags.DEFINE_integer("seed", 0, "Seed of the pairs and of the noise.")
flags.DEFINE_string("out_json", None, "Also write the JSON here.")


def gaussian_blur(images, sigma):
    """images `[N, 28, 28, 1]` in [-1, 1] -> blurred, same shape: a separable Gaussian of radius ceil(3 sigma),
    applied to intensities in [0, 1] with zero (background) padding."""
    import numpy as np
    import tensorflow as tf

    radius = int(np.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k = (k / k.sum()).astype(np.float32)
    x = (tf.constant(images, tf.float32) + 1.0) / 2.0
    x = tf.nn.conv2d(x, k.reshape(-1, 1, 1, 1), 1, "SAME")
    x = tf.nn.conv2d(x, k.reshape(1, -1, 1, 1), 1, "SAME")
    return (x * 2.0 - 1.0).numpy()


def image_sets(x_train, x_test, n, sigma, seed):
    """[(name, images `[n, 28, 28, 1]`)] of the calibration sets."""
    import numpy as np

    rng = np.random.default_rng(seed)
    test = x_test[:n]
    partner = (np.arange(n) + rng.integers(1, n, size=n)) % n  # never the digit itself
    shape = test.shape
    return [
        ("real train images (floor)", x_train[:n]),
        ("real test images (the reference's own; sanity check)", test),
        (f"test digits blurred, Gaussian sigma = {sigma:g} px", gaussian_blur(test, sigma)),
        ("50/50 average of two test digits", 0.5 * (test + test[partner])),
        ("uniform noise U[-1, 1]", rng.uniform(-1, 1, size=shape).astype(np.float32)),
        ("Gaussian noise N(0, 1), clipped to [-1, 1]", rng.normal(size=shape).astype(np.float32)),
    ]


def main(argv):
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}; every option is a --flag")
    import tensorflow as tf

    from cud_tf import evaluation
    from cud_tf.data import DataNotPreparedError
    from cud_tf.metrics import ClassifierError, mnist_classifier

    t0 = time.perf_counter()
    mcfg = evaluation.MetricConfig(classifier_dir=FLAGS.classifier_dir,
                                   classifier=mnist_classifier.ClassifierConfig(min_accuracy=FLAGS.min_accuracy))
    try:
        clf = evaluation.load_classifier(mcfg, "mnist_offline", FLAGS.data_dir, (28, 28, 1))
        x_train, _ = mnist_classifier.load_split(FLAGS.data_dir, f"train[:{FLAGS.num_images}]")
        x_test, _ = mnist_classifier.load_split(FLAGS.data_dir, "test")
    except (ClassifierError, DataNotPreparedError, ValueError) as e:
        sys.exit(f"error: {str(e).splitlines()[0]}")
    n = FLAGS.num_images
    rows = []
    for name, images in image_sets(x_train, x_test, n, FLAGS.blur_sigma, FLAGS.seed):
        fd, _, _ = evaluation.score(lambda i, s, b, images=images: tf.constant(images[s:s + b]), clf, n,
                                    FLAGS.batch_size)
        rows.append(dict(images=name, distance=fd, num_samples=n))
        print(f"{name}: {fd:.3f}", flush=True)
    result = dict(metric=clf.name, reference=clf.reference_info, classifier=clf.info, rows=rows,
                  seconds=time.perf_counter() - t0)
    lines = [f"| images ({n} each) | {clf.name} |", "|---|---|"] + [
        f"| {r['images']} | {r['distance']:.2f} |" for r in rows]
    print(json.dumps(result))
    print("\n".join(lines))
    if FLAGS.out_json:
        with open(FLAGS.out_json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    app.run(main)

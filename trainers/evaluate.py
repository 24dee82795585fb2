"""Sample quality against NFE: `python -m trainers.evaluate --run_dir=RUN --nfe=1,2,4,8,16 --num_samples=10000`.

The entry point of `cud_tf.evaluation` (which documents the outputs): flags -> EvalConfig / MetricConfig -> the
library. FID as papers report it: `--fid_inception_graph=classify_image_graph_def.pb [--fid_ref=STATS.npz]`;
reference statistics of a tfds split: `--fid_stats_out=STATS.npz --dataset=cifar10 --fid_inception_graph=...`
(docs/fid.md). Bad input exits 2 with one line.
"""
import functools

from absl import flags

from trainers import common

FLAGS = flags.FLAGS


# This tool's own flags: not settings of a training run (never in its flags.txt).
_define = functools.partial(common.define, record=False)


def define_flags():
    d = flags
    _define(d.DEFINE_string, "run_dir", None, "Run directory written by a trainer (arch.json, checkpoints/).")
    _define(d.DEFINE_list, "nfe", ["1", "2", "4", "8", "16"], "Numbers of velocity evaluations to evaluate.")
    _define(d.DEFINE_integer, "num_samples", 10000, "Generated images per NFE (at least the metric's feature "
            "dimension + 1: 129 for the MNIST classifier, 2049 for FID).", lower_bound=2)
    _define(d.DEFINE_integer, "eval_batch_size", 500, "Images generated per batch.", lower_bound=1)
    _define(d.DEFINE_string, "sampler", "euler", "Fixed-step sampler: euler, heun, rk3, rk4, reference3.")
    _define(d.DEFINE_integer, "head", 1, "Head g_k that drives the sampler (1-based).", lower_bound=1)
    _define(d.DEFINE_boolean, "rk45", False, "Also sample with adaptive Dormand-Prince (RK45), reporting its NFE.")
    _define(d.DEFINE_float, "rk45_tol", 1e-5, "rtol = atol of RK45.", lower_bound=0.0)
    _define(d.DEFINE_list, "guidance_scale", ["1.0"], "Classifier-free guidance scales (class-conditional runs).")
    _define(d.DEFINE_enum, "metric", "mnist_classifier", ["mnist_classifier", "fid", "inceptionv3_keras", "inception"],
            "Features of the Fréchet distance: the project's MNIST classifier; fid (TTUR's Inception graph, "
            "--fid_inception_graph; the default when that is given); inceptionv3_keras (Keras weights, not FID).")
    _define(d.DEFINE_string, "fid_inception_graph", None, "TTUR's classify_image_graph_def.pb (docs/fid.md).")
    _define(d.DEFINE_string, "fid_ref", None, "FID reference statistics .npz (mu/sigma of pytorch-fid, TTUR, EDM, "
            "guided-diffusion; or arr_0); default: computed from --reference_split and cached in --out_dir.")
    _define(d.DEFINE_string, "fid_stats_out", None, "Write the FID statistics of --dataset's --reference_split to "
            "this .npz and exit (no --run_dir).")
    _define(d.DEFINE_integer, "fid_reference_examples", 0, "Images of --reference_split for computed FID "
            "statistics (0: all).", lower_bound=0)
    _define(d.DEFINE_integer, "fid_batch_size", 50, "Images per pass through the Inception graph.", lower_bound=1)
    # The trainers' default (trainers/common.py), so that whichever defines it first, both read the same.
    _define(d.DEFINE_string, "dataset", "mnist_offline", "tfds name of the data set of --fid_stats_out.")
    _define(d.DEFINE_string, "inception_weights", None,
            "Local file inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5 (--metric=inceptionv3_keras).")
    _define(d.DEFINE_string, "reference_split", "train", "Split of the real images of computed references.")
    _define(d.DEFINE_string, "classifier_dir", None, "Cache of the MNIST classifier "
            "(default ~/.cache/cud_tf/mnist_classifier); trained there on first use.")
    _define(d.DEFINE_float, "min_accuracy", 0.99, "Test-accuracy floor of the MNIST classifier.",
            lower_bound=0.0, upper_bound=1.0)
    _define(d.DEFINE_integer, "classifier_epochs", 4, "Epochs when the MNIST classifier is trained.", lower_bound=1)
    _define(d.DEFINE_integer, "classifier_train_examples", 0, "Train examples of the classifier (0: all).",
            lower_bound=0)
    _define(d.DEFINE_string, "data_dir", None, "tfds data directory (default: the run's own).")
    _define(d.DEFINE_string, "out_dir", None, "Output directory (default <run_dir>/eval).")
    _define(d.DEFINE_enum, "weights", "ema", ["ema", "train"], "Which weights of the run to evaluate.")
    _define(d.DEFINE_string, "checkpoint", None, "A checkpoint prefix of the run, e.g. <run_dir>/checkpoints/ckpt-400 "
            "(default: the latest).")
    _define(d.DEFINE_integer, "eval_seed", 0, "Seed of the evaluation noise (the same for every NFE and run).")
    _define(d.DEFINE_integer, "num_grid_images", 10, "Images per row of the sample grids.", lower_bound=1)
    _define(d.DEFINE_boolean, "jit_compile", None, "Compile the samplers with XLA. Unset: graph mode or XLA, "
            "whichever a timed sampler step finds faster for this network and machine (cached; cud_tf.execution).")


def _floats(values, name):
    try:
        return tuple(float(v) for v in values)
    except ValueError:
        raise flags.ValidationError(f"--{name} must be a comma-separated list of numbers, got {values}") from None


def metric_config():
    """MetricConfig from the flags (`--fid_inception_graph` alone selects FID)."""
    from cud_tf import evaluation
    from cud_tf.metrics import mnist_classifier

    kind = FLAGS.metric
    if kind == "inception":
        raise flags.ValidationError("--metric=inception was Keras' InceptionV3, which is not FID: use "
                                    "--fid_inception_graph=PATH (FID, docs/fid.md) or --metric=inceptionv3_keras")
    if FLAGS.fid_inception_graph and not FLAGS["metric"].present:
        kind = "fid"
    return evaluation.MetricConfig(
        kind=kind, fid_inception_graph=FLAGS.fid_inception_graph, fid_ref=FLAGS.fid_ref,
        fid_batch_size=FLAGS.fid_batch_size, reference_split=FLAGS.reference_split,
        reference_examples=FLAGS.fid_reference_examples, inception_weights=FLAGS.inception_weights,
        classifier_dir=FLAGS.classifier_dir, classifier=mnist_classifier.ClassifierConfig(
            epochs=FLAGS.classifier_epochs, train_examples=FLAGS.classifier_train_examples,
            min_accuracy=FLAGS.min_accuracy))


def eval_config():
    """EvalConfig from the flags."""
    from cud_tf import evaluation
    return evaluation.EvalConfig(
        nfes=common.int_list(FLAGS.nfe, "nfe"), num_samples=FLAGS.num_samples, batch_size=FLAGS.eval_batch_size,
        sampler=FLAGS.sampler, head=FLAGS.head, rk45=FLAGS.rk45, rk45_tol=FLAGS.rk45_tol,
        guidance_scales=_floats(FLAGS.guidance_scale, "guidance_scale"), seed=FLAGS.eval_seed,
        num_grid_images=FLAGS.num_grid_images, jit_compile=FLAGS.jit_compile, weights=FLAGS.weights,
        checkpoint=FLAGS.checkpoint)


def run(log=print):
    """Evaluates --run_dir (returns the result dict, also written as JSON), or writes --fid_stats_out (returns
    its frechet.Gaussian)."""
    from cud_tf import evaluation

    mcfg = metric_config()
    if FLAGS.fid_stats_out:
        if FLAGS.run_dir:
            raise flags.ValidationError("--fid_stats_out writes the statistics of --dataset and takes no --run_dir")
        return evaluation.reference_statistics(mcfg, FLAGS.dataset, FLAGS.data_dir, FLAGS.fid_stats_out, log)
    if not FLAGS.run_dir:
        raise flags.ValidationError("--run_dir is required (the run directory of a trainer)")
    return evaluation.evaluate(FLAGS.run_dir, eval_config(), mcfg, FLAGS.out_dir, FLAGS.data_dir, log)


def main(argv):
    from cud_tf.data import DataNotPreparedError
    from cud_tf.metrics import ClassifierError
    common.run_or_fail(argv, run, ClassifierError, DataNotPreparedError, FileNotFoundError)


def cli():
    common.cli(define_flags, main)


if __name__ == "__main__":
    cli()

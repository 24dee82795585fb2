"""Sample quality against NFE: `python -m trainers.evaluate --run_dir=RUN --nfe=1,2,4,8,16 --num_samples=10000`.

Generates `--num_samples` images from fixed noise with the run's EMA weights for every NFE (one tf.function
trace for all of them: the step count is a tensor), and optionally with the adaptive RK45 solver; measures the
Fréchet distance of their features to the real data's ("FD (MNIST classifier)" by default, FID proper with
`--metric=inception --inception_weights=FILE`) and, for class-conditional networks, how often the MNIST
classifier assigns each sample the class it was asked for. Writes to `--out_dir` (default RUN/eval):
eval_<sampler>_head<k>.json, .md (table), .png (plot) and samples_<sampler>_head<k>[_w<w>].png (one row per NFE).
"""
import json
import os
import time

from absl import app, flags

from trainers import common

FLAGS = flags.FLAGS


def _define(define, name, *args, **kw):
    if name not in FLAGS:
        define(name, *args, **kw)


def define_flags():
    d = flags
    _define(d.DEFINE_string, "run_dir", None, "Run directory written by a trainer (arch.json, checkpoints/).")
    _define(d.DEFINE_list, "nfe", ["1", "2", "4", "8", "16"], "Numbers of velocity evaluations to evaluate.")
    _define(d.DEFINE_integer, "num_samples", 10000, "Generated images per NFE.", lower_bound=2)
    _define(d.DEFINE_integer, "eval_batch_size", 500, "Images generated per batch.", lower_bound=1)
    _define(d.DEFINE_string, "sampler", "euler", "Fixed-step sampler: euler, heun, rk3, rk4, reference3.")
    _define(d.DEFINE_integer, "head", 1, "Head g_k that drives the sampler (1-based).", lower_bound=1)
    _define(d.DEFINE_boolean, "rk45", False, "Also sample with adaptive Dormand-Prince (RK45), reporting its NFE.")
    _define(d.DEFINE_float, "rk45_tol", 1e-5, "rtol = atol of RK45.", lower_bound=0.0)
    _define(d.DEFINE_list, "guidance_scale", ["1.0"], "Classifier-free guidance scales (class-conditional runs).")
    _define(d.DEFINE_enum, "metric", "mnist_classifier", ["mnist_classifier", "inception"],
            "Features of the Fréchet distance: the project's MNIST classifier, or InceptionV3 (FID proper).")
    _define(d.DEFINE_string, "inception_weights", None,
            "Local file inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5 (--metric=inception).")
    _define(d.DEFINE_string, "reference_split", "train", "Split of the real images for --metric=inception.")
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
    _define(d.DEFINE_boolean, "jit_compile", True, "Compile the samplers with XLA.")


def _floats(values, name):
    try:
        return tuple(float(v) for v in values)
    except ValueError:
        raise flags.ValidationError(f"--{name} must be a comma-separated list of numbers, got {values}") from None


def noise(seed, batch_index, batch, image_shape):
    """The fixed evaluation noise of batch `batch_index` `[batch, H, W, C]`."""
    import tensorflow as tf
    return tf.random.stateless_normal([batch, *image_shape], seed=[seed, batch_index])


def batches(num_samples, batch_size):
    """(index, start, size) of the generation batches."""
    return [(i, s, min(batch_size, num_samples - s)) for i, s in enumerate(range(0, num_samples, batch_size))]


def score(images_fn, metric, classifier, num_samples, batch_size, labels_of, num_grid):
    """Streams generated batches into feature statistics. images_fn(batch_index, start, size) -> `[b,H,W,C]`.

    Returns (distance, class accuracy or None, first `num_grid` images)."""
    import numpy as np
    import tensorflow as tf
    from cud_tf.metrics import FeatureStats, Gaussian, frechet_distance

    stats, correct, grid = FeatureStats(metric.dim), 0, None
    for i, start, size in batches(num_samples, batch_size):
        x = tf.clip_by_value(images_fn(i, start, size), -1.0, 1.0)
        if grid is None:
            grid = x[:num_grid].numpy()
        stats.update(metric.features(x).numpy())
        if labels_of is not None:
            correct += int(np.sum(classifier.predict(x).numpy() == labels_of(start, size)))
    accuracy = correct / num_samples if labels_of is not None else None
    return frechet_distance(Gaussian.from_stats(stats), metric.reference), accuracy, grid


def inception_metric(data_cfg, num_reference, batch_size, out_dir, log):
    """InceptionV3 features with the reference Gaussian of `num_reference` real images (cached in out_dir)."""
    from cud_tf import data
    from cud_tf.metrics import FeatureStats, Gaussian, InceptionFeatures

    metric = InceptionFeatures(FLAGS.inception_weights)
    path = os.path.join(out_dir, f"inception_reference_{data_cfg.dataset}_{data_cfg.split}_{num_reference}.npz")
    if os.path.exists(path):
        metric.reference = Gaussian.load(path)
        return metric
    log(f"computing InceptionV3 statistics of {num_reference} real images ({data_cfg.split} split)")
    stats = FeatureStats(metric.dim)
    for batch in data.make_dataset(data_cfg, batch_size, 0, repeat=False, shuffle=False).take(
            -(-num_reference // batch_size)):
        stats.update(metric.features(batch["image"]).numpy())
    metric.reference = Gaussian.from_stats(stats)
    metric.reference.save(path)
    return metric


def run(log=print):
    """Evaluates the run; returns the result dict (also written as JSON)."""
    import numpy as np
    import tensorflow as tf

    from cud_tf import data, sampling, solvers, summaries
    from cud_tf import run_dir as run_dir_lib
    from cud_tf.metrics import mnist_classifier

    if not FLAGS.run_dir:
        raise flags.ValidationError("--run_dir is required (the run directory of a trainer)")
    nfes = common.int_list(FLAGS.nfe, "nfe")
    if not nfes or min(nfes) < 1:
        raise flags.ValidationError(f"--nfe must list positive integers, got {FLAGS.nfe}")
    scales = _floats(FLAGS.guidance_scale, "guidance_scale")
    solvers.get_tableau(FLAGS.sampler)
    loaded = run_dir_lib.load_run(FLAGS.run_dir, weights=FLAGS.weights, checkpoint=FLAGS.checkpoint)
    net, cfg = loaded.net, loaded.config
    if FLAGS.head > cfg.num_heads:
        raise flags.ValidationError(f"--head={FLAGS.head} but the network of {FLAGS.run_dir} has "
                                    f"{cfg.num_heads} head(s)")
    out_dir = FLAGS.out_dir or os.path.join(FLAGS.run_dir, "eval")
    os.makedirs(out_dir, exist_ok=True)
    dataset = loaded.flags.get("dataset", "mnist_offline")
    data_dir = FLAGS.data_dir or loaded.flags.get("data_dir")
    is_mnist = dataset in ("mnist_offline", "mnist")
    conditional = cfg.num_classes > 0
    if not conditional:
        scales = (1.0,)

    classifier = None
    if FLAGS.metric == "mnist_classifier" or (conditional and is_mnist):
        if not is_mnist or cfg.image_shape != (28, 28, 1):
            raise flags.ValidationError(f"the MNIST classifier cannot score {dataset} images {cfg.image_shape}; "
                                        "use --metric=inception --inception_weights=FILE")
        classifier = mnist_classifier.load_or_train(
            FLAGS.classifier_dir, data_dir, mnist_classifier.ClassifierConfig(
                epochs=FLAGS.classifier_epochs, train_examples=FLAGS.classifier_train_examples,
                min_accuracy=FLAGS.min_accuracy), log)
    if FLAGS.metric == "inception":
        data_cfg = data.DataConfig(dataset=dataset, data_dir=data_dir, split=FLAGS.reference_split)
        metric = inception_metric(data_cfg, FLAGS.num_samples, FLAGS.eval_batch_size, out_dir, log)
    else:
        metric = classifier

    shape, n, bs = cfg.image_shape, FLAGS.num_samples, FLAGS.eval_batch_size
    labels_of = (lambda start, size: (np.arange(start, start + size) % cfg.num_classes)) if conditional else None
    method, head, seed = FLAGS.sampler, FLAGS.head, FLAGS.eval_seed
    steps_of = {}
    for k in nfes:
        try:
            steps = solvers.steps_for_nfe(method, k)
        except ValueError as e:
            log(f"skipping NFE {k}: {e}")
            continue
        if steps in steps_of.values():
            log(f"skipping NFE {k}: {method} with {steps} step(s) (NFE {solvers.nfe(method, steps)}) is already there")
        else:
            steps_of[k] = steps
    rows, grids, t_total = [], {}, time.perf_counter()
    for w in scales:
        sig = [tf.TensorSpec([None, *shape], tf.float32), tf.TensorSpec([], tf.int32), tf.TensorSpec([None], tf.int32)]

        @tf.function(input_signature=sig, jit_compile=FLAGS.jit_compile)
        def generate(z, num_steps, y, w=w):
            return sampling.generate(net, z, num_steps, method, head, y if conditional else None, w)

        def labels(start, size):
            return tf.constant(labels_of(start, size) if conditional else np.zeros(size), tf.int32)

        grid_rows = []
        for k, steps in steps_of.items():
            t0 = time.perf_counter()
            fd, acc, grid = score(lambda i, s, b: generate(noise(seed, i, b, shape), tf.constant(steps), labels(s, b)),
                                  metric, classifier, n, bs, labels_of, FLAGS.num_grid_images)
            rows.append(dict(solver=method, guidance_scale=w, nfe=solvers.nfe(method, steps), nfe_requested=k,
                             steps=steps, distance=fd, class_accuracy=acc, seconds=time.perf_counter() - t0))
            grid_rows.append(grid)
            log(_row_line(rows[-1], metric.name))
        if FLAGS.rk45:
            t0, nfe_used = time.perf_counter(), []

            def rk45_images(i, s, b):
                v = sampling.velocity_fn(net, head, labels(s, b) if conditional else None, w)
                x, used = solvers.sample_rk45(v, noise(seed, i, b, shape), FLAGS.rk45_tol, FLAGS.rk45_tol)
                nfe_used.append(used)
                return x

            fd, acc, grid = score(rk45_images, metric, classifier, n, bs, labels_of, FLAGS.num_grid_images)
            rows.append(dict(solver="rk45", guidance_scale=w, nfe=float(np.mean(nfe_used)), nfe_requested=None,
                             steps=None, distance=fd, class_accuracy=acc, seconds=time.perf_counter() - t0))
            grid_rows.append(grid)
            log(_row_line(rows[-1], metric.name))
        grids[w] = grid_rows

    tag = f"{method}_head{head}"
    result = dict(run_dir=os.path.abspath(FLAGS.run_dir), checkpoint=loaded.checkpoint, step=loaded.step,
                  weights=FLAGS.weights, metric=metric.name, sampler=method, head=head, num_samples=n,
                  eval_seed=seed, conditional=conditional, rows=rows, seconds=time.perf_counter() - t_total)
    if classifier is not None:
        result["classifier"] = classifier.info
    prefix = os.path.join(out_dir, f"eval_{tag}")
    with open(prefix + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(prefix + ".md", "w") as f:
        f.write(markdown_table(result))
    plot(result, prefix + ".png")
    for w, grid_rows in grids.items():
        suffix = f"_w{w:g}" if conditional else ""
        summaries.write_png(os.path.join(out_dir, f"samples_{tag}{suffix}.png"), summaries.image_grid(grid_rows))
    log(f"wrote {prefix}.json, .md, .png and the sample grids in {out_dir} ({result['seconds']:.0f} s)")
    return result


def _row_line(row, metric_name):
    acc = "" if row["class_accuracy"] is None else f", class accuracy {row['class_accuracy']:.3f}"
    return (f"{row['solver']} w={row['guidance_scale']:g} NFE {row['nfe']:g}: {metric_name} {row['distance']:.3f}"
            f"{acc} ({row['seconds']:.1f} s)")


def markdown_table(result):
    """The rows of a result as a markdown table (one line per solver, guidance scale and NFE)."""
    cond = result["conditional"]
    head = ["sampler", *(["guidance"] if cond else []), "NFE", result["metric"], *(["class accuracy"] if cond else []),
            "seconds"]
    lines = [f"{result['run_dir']} (step {result['step']}, {result['weights']} weights, head {result['head']}, "
             f"{result['num_samples']} samples)", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    for r in result["rows"]:
        cells = [r["solver"], *([f"{r['guidance_scale']:g}"] if cond else []), f"{r['nfe']:g}", f"{r['distance']:.3f}",
                 *([f"{r['class_accuracy']:.3f}"] if cond else []), f"{r['seconds']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(result, path):
    """Distance against NFE (log scale), one line per guidance scale, RK45 as single points."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for w in sorted({r["guidance_scale"] for r in result["rows"]}):
        fixed = [r for r in result["rows"] if r["guidance_scale"] == w and r["solver"] != "rk45"]
        label = result["sampler"] + (f" w={w:g}" if result["conditional"] else "")
        ax.plot([r["nfe"] for r in fixed], [r["distance"] for r in fixed], "o-", label=label)
        for r in result["rows"]:
            if r["guidance_scale"] == w and r["solver"] == "rk45":
                ax.plot([r["nfe"]], [r["distance"]], "s", label="RK45" + (f" w={w:g}" if result["conditional"] else ""))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("NFE")
    ax.set_ylabel(result["metric"])
    ax.set_title(f"{os.path.basename(result['run_dir'].rstrip('/'))} (head {result['head']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv):
    from cud_tf.data import DataNotPreparedError
    from cud_tf.metrics import ClassifierError
    from cud_tf.run_dir import RunError
    common.run_or_fail(argv, run, RunError, ClassifierError, DataNotPreparedError, FileNotFoundError)


if __name__ == "__main__":
    define_flags()
    app.run(main)

"""Sample quality of a trained run against NFE: the library behind `python -m trainers.evaluate`.

    from cud_tf import evaluation
    result = evaluation.evaluate("runs/mnist_quick", evaluation.EvalConfig(nfes=(1, 2, 4), num_samples=2000))

generates `num_samples` images from fixed noise with the run's EMA weights for every NFE (one tf.function trace
for all of them: the step count is a tensor), and optionally with the adaptive RK45 solver; measures the Fréchet
distance of their features to the real data's (`MetricConfig.kind`: "mnist_classifier", the project's
"FD (MNIST classifier)"; "fid", FID as TTUR computes it from its Inception graph; "inceptionv3_keras", a
distance on Keras' InceptionV3 that is not comparable with published FIDs) and, for class-conditional MNIST
networks, how often the MNIST classifier assigns each sample the class it was asked for. Writes to `out_dir`
(default RUN/eval): eval_<sampler>_head<k>.json, .md (table), .png (plot) and samples_<sampler>_head<k>[_w<w>].png
(one row per NFE). Every distance is reported with the sample count it was measured on. With
`EvalConfig.jit_compile=None` the sampler runs in graph mode or under XLA, whichever a timed one-step call finds
faster (cached, `cud_tf.execution.choose_sampler_xla`); the JSON's "jit_compile" says which and why.
"""
import dataclasses
import json
import os
import time

import numpy as np
import tensorflow as tf

from cud_tf import execution
from cud_tf import run_dir as run_dir_lib
from cud_tf import sampling, solvers, summaries
from cud_tf.metrics import frechet, mnist_classifier

METRICS = ("mnist_classifier", "fid", "inceptionv3_keras")
MNIST_DATASETS = ("mnist_offline", "mnist")


class EvalError(ValueError):
    """An evaluation that cannot run as asked (bad option, too few samples, wrong data), in one line."""


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """What to sample and how."""

    nfes: tuple = (1, 2, 4, 8, 16)  # velocity evaluations per sample of the fixed-step sampler
    num_samples: int = 10000  # generated images per NFE (>= feature dimension + 1)
    batch_size: int = 500  # images generated per batch
    sampler: str = "euler"  # euler, heun, rk3, rk4, reference3
    head: int = 1  # head g_k (1-based) that drives the sampler
    rk45: bool = False  # also sample with adaptive Dormand-Prince, reporting its mean NFE
    rk45_tol: float = 1e-5  # rtol = atol of RK45
    guidance_scales: tuple = (1.0,)  # classifier-free guidance scales (class-conditional runs only)
    seed: int = 0  # seed of the evaluation noise, the same for every NFE and run
    num_grid_images: int = 10  # images per row of the sample grids
    jit_compile: bool | None = None  # compile the samplers with XLA; None: whichever is faster (measured, cached)
    weights: str = "ema"  # "ema" or "train" weights of the run
    checkpoint: str | None = None  # a checkpoint prefix of the run (default: the latest)

    def __post_init__(self):
        if not self.nfes or min(self.nfes) < 1:
            raise EvalError(f"nfe must list positive integers, got {list(self.nfes)}")
        if self.num_samples < 2 or self.batch_size < 1 or self.num_grid_images < 1:
            raise EvalError(f"num_samples={self.num_samples} (>= 2), batch_size={self.batch_size} and "
                            f"num_grid_images={self.num_grid_images} (>= 1) are out of range")
        if self.head < 1:
            raise EvalError(f"head={self.head}; heads are numbered from 1")
        if self.weights not in ("ema", "train"):
            raise EvalError(f"weights={self.weights!r}; expected 'ema' or 'train'")
        solvers.get_tableau(self.sampler)


@dataclasses.dataclass(frozen=True)
class MetricConfig:
    """Which features the distance uses, and the real data's statistics."""

    kind: str = "mnist_classifier"  # one of METRICS
    fid_inception_graph: str | None = None  # TTUR's classify_image_graph_def.pb (kind "fid")
    fid_ref: str | None = None  # reference statistics .npz (mu/sigma, or arr_0); default: computed and cached
    fid_batch_size: int = 50  # images per pass through the Inception graph
    reference_split: str = "train"  # split of the run's data set for computed references ("fid", "inceptionv3_keras")
    reference_examples: int = 0  # images of that split for "fid" (0: all); "inceptionv3_keras" uses num_samples
    inception_weights: str | None = None  # Keras' InceptionV3 notop .h5 (kind "inceptionv3_keras")
    classifier_dir: str | None = None  # MNIST classifier cache (default ~/.cache/cud_tf/mnist_classifier)
    classifier: mnist_classifier.ClassifierConfig = dataclasses.field(
        default_factory=mnist_classifier.ClassifierConfig)

    def __post_init__(self):
        if self.kind not in METRICS:
            raise EvalError(f"metric {self.kind!r}; expected one of {', '.join(METRICS)}")
        if self.kind == "fid" and not self.fid_inception_graph:
            raise EvalError("the FID metric needs the Inception graph: pass fid_inception_graph="
                            "PATH/classify_image_graph_def.pb (docs/fid.md)")
        if self.kind == "inceptionv3_keras" and not self.inception_weights:
            raise EvalError("the Keras InceptionV3 metric needs inception_weights=FILE (docs/quality.md)")
        if self.fid_ref and self.kind == "mnist_classifier":
            raise EvalError("fid_ref is a reference for the Inception features; the MNIST classifier brings its "
                            "own (its test-split statistics)")


def noise(seed, batch_index, batch, image_shape):
    """The fixed evaluation noise of batch `batch_index`: float32 `[batch, H, W, C]`."""
    return tf.random.stateless_normal([batch, *image_shape], seed=[seed, batch_index])


def batches(num_samples, batch_size):
    """[(index, start, size)] of the generation batches."""
    return [(i, s, min(batch_size, num_samples - s)) for i, s in enumerate(range(0, num_samples, batch_size))]


def steps_for_nfes(method, nfes, log=print):
    """{requested NFE: step count} of a fixed-step sampler; an NFE that no step count reaches, or whose step
    count is already there (NFE-matched Heun: 2N - 1), is skipped with a log line."""
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
    return steps_of


def check_sample_count(num_samples, dim, what):
    """EvalError unless `num_samples` feature vectors give a nonsingular `dim`-d covariance."""
    need = frechet.min_samples(dim)
    if num_samples < need:
        raise EvalError(f"num_samples={num_samples} is too few for {what}: its {dim}-d features need at least "
                        f"{need} samples for a nonsingular covariance")


def score(images_fn, metric, num_samples, batch_size, classifier=None, labels_of=None, num_grid=10):
    """Streams generated batches into feature statistics.

    images_fn(batch_index, start, size) -> images `[size, H, W, C]` (clipped to [-1, 1] here); metric: an object
    with `dim`, `features(images [B, H, W, C] in [-1, 1]) -> [B, dim]` and `reference` (frechet.Gaussian).
    labels_of(start, size) -> requested classes `[size]`, checked with `classifier.predict` when given.
    Returns (distance, class accuracy or None, the first `num_grid` images `[num_grid, H, W, C]`).
    """
    stats, correct, grid = frechet.FeatureStats(metric.dim), 0, None
    for i, start, size in batches(num_samples, batch_size):
        x = tf.clip_by_value(images_fn(i, start, size), -1.0, 1.0)
        if grid is None:
            grid = x[:num_grid].numpy()
        stats.update(np.asarray(metric.features(x)))
        if labels_of is not None:
            correct += int(np.sum(classifier.predict(x).numpy() == labels_of(start, size)))
    accuracy = correct / num_samples if labels_of is not None else None
    return frechet.frechet_distance(frechet.Gaussian.from_stats(stats), metric.reference), accuracy, grid


def metric_dim(mcfg: MetricConfig):
    """Feature dimension of a metric without building it (None for "fid": the graph says)."""
    return {"mnist_classifier": mnist_classifier.FEATURE_DIM, "inceptionv3_keras": 2048}.get(mcfg.kind)


def _reference_name(prefix, dataset, split, count):
    return f"{prefix}_{dataset}_{split.replace('[', '_').replace(']', '').replace(':', '-')}_{count or 'all'}.npz"


def feature_extractor(mcfg: MetricConfig, num_samples):
    """The Inception feature extractor of a "fid" or "inceptionv3_keras" metric, without its reference (None for
    "mnist_classifier", see `load_classifier`); EvalError when `num_samples` is too few for its features."""
    from cud_tf.metrics import fid_inception, inception

    dim = metric_dim(mcfg)
    if dim is not None:
        check_sample_count(num_samples, dim, mcfg.kind)
    if mcfg.kind == "mnist_classifier":
        return None
    if mcfg.kind == "inceptionv3_keras":
        return inception.InceptionFeatures(mcfg.inception_weights)
    metric = fid_inception.InceptionGraph(mcfg.fid_inception_graph, mcfg.fid_batch_size)
    check_sample_count(num_samples, metric.dim, "FID")
    return metric


def set_reference(metric, mcfg: MetricConfig, dataset, data_dir, num_samples, cache_dir, log=print):
    """Sets `metric.reference` (frechet.Gaussian) and `metric.reference_info`: `mcfg.fid_ref` when given, else
    the statistics of `mcfg.reference_split` of `dataset` (all of it, or `mcfg.reference_examples` images, for
    FID; `num_samples` images for Keras' InceptionV3), computed once and cached in `cache_dir`."""
    from cud_tf import data
    from cud_tf.metrics import fid_inception

    if mcfg.fid_ref:
        metric.reference = frechet.load_statistics(mcfg.fid_ref, metric.features)
        if metric.reference.dim != metric.dim:
            raise EvalError(f"{mcfg.fid_ref} holds {metric.reference.dim}-d statistics but the features are "
                            f"{metric.dim}-d")
        metric.reference_info = dict(source=os.path.abspath(mcfg.fid_ref), n=metric.reference.n)
        return metric
    if mcfg.kind == "fid":
        count, prefix = mcfg.reference_examples, f"fid_reference_{metric.sha256[:12]}"
    else:
        count, prefix = num_samples, "inceptionv3_keras_reference"
    path = os.path.join(cache_dir, _reference_name(prefix, dataset, mcfg.reference_split, count))
    if os.path.exists(path):
        metric.reference = frechet.Gaussian.load(path)
    else:
        log(f"computing {metric.name} statistics of the real images ({dataset} {mcfg.reference_split})")
        data_cfg = data.DataConfig(dataset=dataset, data_dir=data_dir, split=mcfg.reference_split)
        metric.reference = fid_inception.dataset_statistics(metric, data_cfg, 500, count, log)
        os.makedirs(cache_dir, exist_ok=True)
        metric.reference.save(path)
    metric.reference_info = dict(source=path, dataset=dataset, split=mcfg.reference_split, n=metric.reference.n)
    return metric


def load_classifier(mcfg: MetricConfig, dataset, data_dir, image_shape, log=print):
    """The MNIST classifier (trained and cached on first use); EvalError for images it cannot score."""
    if dataset not in MNIST_DATASETS or tuple(image_shape) != (28, 28, 1):
        raise EvalError(f"the MNIST classifier cannot score {dataset} images {tuple(image_shape)}; use the FID "
                        "metric (fid_inception_graph=PATH)")
    clf = mnist_classifier.load_or_train(mcfg.classifier_dir, data_dir, mcfg.classifier, log)
    clf.reference_info = dict(source="MNIST classifier cache", dataset="mnist_offline", split="test",
                              n=clf.reference.n)
    return clf


def evaluated_weights(weights: str, run_config: dict) -> str:
    """What `weights` ("ema" or "train") of a run hold: "train", "ema", or, where the run keeps its raw network in
    the EMA slots (the one-step stage's and DisBack's `eval_weights`: "student", "generator"), that name."""
    held = run_config.get("eval_weights", "ema")
    return held if weights == "ema" else weights


def run_dataset(loaded: run_dir_lib.LoadedRun, data_dir=None):
    """(tfds name, data dir) the run was trained on (cud_tf.run_dir.data_location); `data_dir` overrides the
    run's."""
    dataset, recorded = run_dir_lib.data_location(loaded.run_dir)
    return dataset, data_dir or recorded


def evaluate(run_dir, cfg: EvalConfig = EvalConfig(), metric_cfg: MetricConfig = MetricConfig(), out_dir=None,
             data_dir=None, log=print) -> dict:
    """Loads the run, builds the metric (`feature_extractor` + `set_reference`, or the MNIST classifier) and,
    for class-conditional MNIST runs, the classifier; samples and scores every NFE, and writes the outputs
    (`write_outputs`). Returns the result dict (also the JSON). Bad input (EvalError, run_dir_lib.RunError,
    mnist_classifier.ClassifierError, FileNotFoundError) is refused before any sampling or writing."""
    loaded = run_dir_lib.load_run(run_dir, weights=cfg.weights, checkpoint=cfg.checkpoint)
    if cfg.head > loaded.config.num_heads:
        raise EvalError(f"head={cfg.head} but the network of {run_dir} has {loaded.config.num_heads} head(s)")
    if not cfg.rk45 and not steps_for_nfes(cfg.sampler, cfg.nfes, lambda _: None):
        raise EvalError(f"sampler {cfg.sampler} reaches none of the NFEs {list(cfg.nfes)} (it needs more "
                        "evaluations per step)")
    out_dir = out_dir or os.path.join(run_dir, "eval")
    dataset, data_dir = run_dataset(loaded, data_dir)
    shape, conditional = loaded.config.image_shape, loaded.config.num_classes > 0
    needs_classifier = conditional and dataset in MNIST_DATASETS
    metric = feature_extractor(metric_cfg, cfg.num_samples)  # refuses too few samples before any costly work
    classifier = load_classifier(metric_cfg, dataset, data_dir, shape, log) if (
        needs_classifier or metric is None) else None
    if metric is None:
        metric = classifier
    else:
        set_reference(metric, metric_cfg, dataset, data_dir, cfg.num_samples, out_dir, log)
    result, grids = sample_and_score(loaded, cfg, metric, classifier, metric_cfg.kind, log)
    write_outputs(result, grids, out_dir, log)
    return result


def sample_and_score(loaded: run_dir_lib.LoadedRun, cfg: EvalConfig, metric, classifier=None, metric_id="",
                     log=print):
    """Generates and scores `cfg.num_samples` images per NFE (and RK45), per guidance scale.

    metric: as in `score`; classifier: the MNIST classifier for the class accuracy of conditional runs (None:
    no accuracy). Returns (result dict, {guidance scale: [grid images `[num_grid, H, W, C]` per row]})."""
    net, netcfg = loaded.net, loaded.config
    check_sample_count(cfg.num_samples, metric.dim, metric.name)
    conditional = netcfg.num_classes > 0
    scales = tuple(cfg.guidance_scales) if conditional else (1.0,)
    shape, n, bs, method, head, seed = netcfg.image_shape, cfg.num_samples, cfg.batch_size, cfg.sampler, cfg.head, \
        cfg.seed
    def requested_classes(start, size):  # checked by the classifier
        return np.arange(start, start + size) % netcfg.num_classes

    labels_of = requested_classes if conditional and classifier is not None else None
    steps_of = steps_for_nfes(method, cfg.nfes, log)
    rows, grids, t_total = [], {}, time.perf_counter()

    def labels(start, size):
        return tf.constant(np.arange(start, start + size) % netcfg.num_classes if conditional else np.zeros(size),
                           tf.int32)

    sig = [tf.TensorSpec([None, *shape], tf.float32), tf.TensorSpec([], tf.int32), tf.TensorSpec([None], tf.int32)]

    def make_generate(jit, w):
        @tf.function(input_signature=sig, jit_compile=jit)
        def generate(z, num_steps, y):
            return sampling.generate(net, z, num_steps, method, head, y if conditional else None, w)
        return generate

    execution_info = dict(xla=cfg.jit_compile, source="flag")
    for w in scales:
        if execution_info["xla"] is None:  # measured once, on the first guidance scale and the first batch
            b = min(bs, n)
            generate, execution_info = execution.choose_sampler_xla(
                lambda jit, w=w: make_generate(jit, w), (noise(seed, 0, b, shape), tf.constant(1), labels(0, b)),
                net, method, extra=dict(head=head, guided=conditional and w != 1.0), log=log)
            timing = (f" (one sampler step of {b} images: graph {execution_info['graph_s'] * 1e3:.0f} ms, XLA "
                      f"{execution_info['xla_s'] * 1e3:.0f} ms)") if execution_info["source"] == "measured" else ""
            log(f"--jit_compile unset: sampler XLA {'on' if execution_info['xla'] else 'off'}, "
                f"{execution_info['source']}{timing}; pass --jit_compile or --nojit_compile to choose")
        else:
            generate = make_generate(bool(execution_info["xla"]), w)

        grid_rows = []

        def add(row, grid, t0, grid_rows=grid_rows):
            row.update(num_samples=n, seconds=time.perf_counter() - t0)
            rows.append(row)
            grid_rows.append(grid)
            log(row_line(row, metric.name))

        for k, steps in steps_of.items():
            t0 = time.perf_counter()
            fd, acc, grid = score(
                lambda i, s, b, steps=steps: generate(noise(seed, i, b, shape), tf.constant(steps), labels(s, b)),
                metric, n, bs, classifier, labels_of, cfg.num_grid_images)
            add(dict(solver=method, guidance_scale=w, nfe=solvers.nfe(method, steps), nfe_requested=k, steps=steps,
                     distance=fd, class_accuracy=acc), grid, t0)
        if cfg.rk45:
            t0, nfe_used = time.perf_counter(), []

            def rk45_images(i, s, b, w=w, nfe_used=nfe_used):
                v = sampling.velocity_fn(net, head, labels(s, b) if conditional else None, w)
                x, used = solvers.sample_rk45(v, noise(seed, i, b, shape), cfg.rk45_tol, cfg.rk45_tol)
                nfe_used.append(used)
                return x

            fd, acc, grid = score(rk45_images, metric, n, bs, classifier, labels_of, cfg.num_grid_images)
            add(dict(solver="rk45", guidance_scale=w, nfe=float(np.mean(nfe_used)), nfe_requested=None, steps=None,
                     distance=fd, class_accuracy=acc), grid, t0)
        grids[w] = grid_rows

    result = dict(run_dir=os.path.abspath(loaded.run_dir), checkpoint=loaded.checkpoint, step=loaded.step,
                  weights=cfg.weights, evaluated_weights=evaluated_weights(cfg.weights, loaded.run_config),
                  metric=metric.name, metric_id=metric_id, feature_dim=metric.dim,
                  reference=getattr(metric, "reference_info", dict(n=metric.reference.n)), sampler=method, head=head,
                  num_samples=n, eval_seed=seed, conditional=conditional, rows=rows, jit_compile=execution_info,
                  seconds=time.perf_counter() - t_total)
    if hasattr(metric, "info") and callable(metric.info):
        result["feature_extractor"] = metric.info()
    if classifier is not None:
        result["classifier"] = classifier.info
    return result, grids


def output_prefix(result, out_dir):
    return os.path.join(out_dir, f"eval_{result['sampler']}_head{result['head']}")


def write_outputs(result, grids, out_dir, log=print):
    """Writes eval_<sampler>_head<k>.json / .md / .png and samples_<sampler>_head<k>[_w<w>].png in `out_dir`."""
    os.makedirs(out_dir, exist_ok=True)
    prefix = output_prefix(result, out_dir)
    with open(prefix + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(prefix + ".md", "w") as f:
        f.write(markdown_table(result))
    plot(result, prefix + ".png")
    tag = os.path.basename(prefix)[len("eval_"):]
    for w, grid_rows in grids.items():
        suffix = f"_w{w:g}" if result["conditional"] else ""
        labels = [f"NFE {r['nfe']:.3g}" if r["solver"] != "rk45" else f"RK45 ({r['nfe']:.1f})"
                  for r in result["rows"] if r["guidance_scale"] == w]
        summaries.write_png(os.path.join(out_dir, f"samples_{tag}{suffix}.png"),
                            summaries.sample_grid(grid_rows, labels))
    write_events(result, prefix + ".png", os.path.join(out_dir, "tb"))
    log(f"wrote {prefix}.json, .md, .png, the sample grids and TensorBoard events (tb/) in {out_dir} "
        f"({result['seconds']:.0f} s)")


def write_events(result, plot_path, tb_dir):
    """The distances to TensorBoard: one scalar series per sampler and guidance scale, whose step is the NFE
    (`eval/<sampler>_head<k>[_w<w>]`; RK45 at its mean NFE, rounded), and the plot as an image."""
    writer = tf.summary.create_file_writer(tb_dir)
    with writer.as_default():
        for r in result["rows"]:
            tag = f"eval/{r['solver']}_head{result['head']}" + (f"_w{r['guidance_scale']:g}" if result["conditional"]
                                                                 else "")
            tf.summary.scalar(tag, r["distance"], step=int(round(r["nfe"])),
                              description=f"{result['metric']} against NFE, {r['num_samples']} samples")
        png = tf.io.decode_png(tf.io.read_file(plot_path), channels=3)
        tf.summary.image(f"eval/{result['sampler']}_head{result['head']}_plot", png[None], step=result["step"])
    writer.flush()


def row_line(row, metric_name):
    """One log line of a result row."""
    acc = "" if row["class_accuracy"] is None else f", class accuracy {row['class_accuracy']:.3f}"
    return (f"{row['solver']} w={row['guidance_scale']:g} NFE {row['nfe']:g}: {metric_name} {row['distance']:.3f} "
            f"({row['num_samples']} samples){acc} ({row['seconds']:.1f} s)")


def markdown_table(result):
    """The rows of a result as a markdown table (one line per solver, guidance scale and NFE), the sample count
    beside each distance."""
    cond = result["conditional"]
    acc = any(r["class_accuracy"] is not None for r in result["rows"])
    head = ["sampler", *(["guidance"] if cond else []), "NFE", result["metric"], "samples",
            *(["class accuracy"] if acc else []), "seconds"]
    ref = result.get("reference", {})
    lines = [(f"{result['run_dir']} (step {result['step']}, {result['evaluated_weights']} weights, "
              f"head {result['head']}, {result['num_samples']} samples; reference: {ref.get('n') or 'unknown'} "
              "real images)"), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        cells = [r["solver"], *([f"{r['guidance_scale']:g}"] if cond else []), f"{r['nfe']:g}", f"{r['distance']:.3f}",
                 str(r["num_samples"]), *([f"{r['class_accuracy']:.3f}"] if acc else []), f"{r['seconds']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(result, path):
    """Distance against NFE (log scale), one line per guidance scale, RK45 as single points; PNG at `path`."""
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
    ax.set_ylabel(f"{result['metric']} ({result['num_samples']} samples)")
    ax.set_title(f"{os.path.basename(result['run_dir'].rstrip('/'))} (head {result['head']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def reference_statistics(mcfg: MetricConfig, dataset, data_dir=None, out_path=None, log=print):
    """Statistics of `mcfg.reference_split` of a tfds data set under the FID Inception graph (the first
    `mcfg.reference_examples` images when > 0), written to `out_path` (.npz: mu, sigma, n; the format
    pytorch-fid, TTUR and EDM read) when given. Returns the frechet.Gaussian."""
    from cud_tf import data
    from cud_tf.metrics import fid_inception

    if mcfg.kind != "fid":
        raise EvalError("reference statistics are written for the FID metric only (fid_inception_graph=PATH)")
    metric = fid_inception.InceptionGraph(mcfg.fid_inception_graph, mcfg.fid_batch_size)
    data_cfg = data.DataConfig(dataset=dataset, data_dir=data_dir, split=mcfg.reference_split)
    g = fid_inception.dataset_statistics(metric, data_cfg, 500, mcfg.reference_examples, log)
    check_sample_count(g.n, metric.dim, f"FID statistics of {dataset} {mcfg.reference_split}")
    if out_path:
        parent = os.path.dirname(os.path.abspath(out_path))
        os.makedirs(parent, exist_ok=True)
        g.save(out_path)
        log(f"wrote {out_path} ({g.n} images, {g.dim}-d; graph sha256 {metric.sha256[:12]})")
    return g


class TrainingEvaluation:
    """`--eval_every`: the distance of the EMA weights at `nfes` every `every` steps of training, as TensorBoard
    scalars `eval/fd_nfe<k>` (step = training step) in `<run_dir>/tb/eval`, and one line each time. The
    training loop's `on_step` hook; only the chief evaluates (the others return at once)."""

    def __init__(self, model, run_dir, image_shape, dataset, data_dir, every: int, cfg: EvalConfig,
                 metric_cfg: MetricConfig = MetricConfig(), chief: bool = True, log=print):
        self.model, self.every, self.cfg, self.chief, self.log = model, every, cfg, chief, log
        self.shape, self.steps_of = tuple(image_shape), steps_for_nfes(cfg.sampler, cfg.nfes, lambda _: None)
        if not chief:
            return
        if metric_cfg.kind == "mnist_classifier":
            self.metric = load_classifier(metric_cfg, dataset, data_dir, image_shape, log)
        else:
            self.metric = feature_extractor(metric_cfg, cfg.num_samples)
            set_reference(self.metric, metric_cfg, dataset, data_dir, cfg.num_samples,
                          os.path.join(run_dir, "eval"), log)
        check_sample_count(cfg.num_samples, self.metric.dim, "--eval_samples")
        net = model.ema_net
        classes = net.config.num_classes

        @tf.function(jit_compile=bool(cfg.jit_compile))  # None (unmeasured here): graph mode
        def generate(z, num_steps, y):
            return sampling.generate(net, z, num_steps, cfg.sampler, cfg.head, y if classes else None)

        self.generate, self.classes = generate, classes
        self.writer = tf.summary.create_file_writer(os.path.join(run_dir, "tb", "eval"))

    def __call__(self, step: int):
        if not self.chief or step == 0 or step % self.every:
            return
        self.model.sync_ema()
        cfg, distances = self.cfg, {}
        for k, steps in self.steps_of.items():
            def images(i, start, size, steps=steps):
                y = tf.range(start, start + size) % max(self.classes, 1)
                return self.generate(noise(cfg.seed, i, size, self.shape), tf.constant(steps), y)
            distances[k], _, _ = score(images, self.metric, cfg.num_samples, cfg.batch_size)
        with self.writer.as_default(step=step):
            for k, d in distances.items():
                tf.summary.scalar(f"eval/fd_nfe{k}", d, description=f"{self.metric.name}, {cfg.num_samples} "
                                  "samples, EMA weights")
        self.writer.flush()
        self.log(f"eval at step {step}: " + ", ".join(f"NFE {k} {d:.2f}" for k, d in distances.items()) +
                 f" ({self.metric.name}, {cfg.num_samples} samples)")

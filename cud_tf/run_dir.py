"""The one owner of a run directory: create it, lock it, check its architecture, record the resolved
configuration, read it back, find its checkpoints and load its networks (docs/architecture.md).

A run directory holds:
  arch.json       what the checkpoints' variables are (compared on every resume)
  config.json     the resolved, frozen configuration of what is trained (dataclasses as JSON; compared too)
  flags.txt       the flags of the last invocation: `--flagfile=<run>/flags.txt` repeats (resumes) the run
  history.jsonl   one line per invocation (time, host, pid, command, the flags it changed)
  lock            present while a trainer runs (host, pid); evaluators and exporters read without it
  checkpoints/    tf.train.CheckpointManager's; tb/ TensorBoard events; samples.png / samples.npy

Only the chief worker writes. Every write of a small file goes through `write_atomically`.
"""
import copy
import dataclasses
import datetime
import errno
import json
import os
import socket
import sys
from typing import Callable, Dict, Iterable

import tensorflow as tf

from cud_tf.models.base import OptimConfig, copy_weights, ema_variables, make_group_optimizer
from cud_tf.networks.unet import UNetConfig, VelocityUNet, checkpoint_variables, noise_encoder_config

ARCH, CONFIG, FLAGS_FILE, HISTORY, LOCK = "arch.json", "config.json", "flags.txt", "history.jsonl", "lock"


class RunError(RuntimeError):
    """A run directory that cannot be used as asked, with the reason and the way out in one line."""


def write_atomically(path, write: Callable, mode="w"):
    """Writes `path` through a temporary file and a rename, so that a reader never sees half a file.
    `write(f)` writes the content to the open temporary file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj):
    write_atomically(path, lambda f: json.dump(obj, f, indent=1, sort_keys=True))


def read_json(path, default=None):
    if not os.path.exists(path):
        return default
    with open(path) as f:
        return json.load(f)


def to_json(obj):
    """Dataclasses, tuples and nested dicts as plain JSON values (tuples become lists)."""
    def plain(o):
        return dataclasses.asdict(o) if dataclasses.is_dataclass(o) else list(o)
    return json.loads(json.dumps(obj, default=plain))


# -- The lock: one trainer at a time. ---------------------------------------------------------------------------

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM
    return True


class RunLock:
    """`<run_dir>/lock`, created atomically (O_EXCL) with the holder's host and pid and removed on release.

    A lock left by a dead process on this host is taken over with a message; a live holder, or one on another
    host, makes `acquire` raise RunError naming it."""

    def __init__(self, run_dir, log: Callable[[str], None] = print):
        self.path, self.log, self.held = os.path.join(run_dir, LOCK), log, False

    def acquire(self):
        me = dict(host=socket.gethostname(), pid=os.getpid(), since=_now(), command=" ".join(sys.argv))
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = read_json(self.path, default={}) if os.path.getsize(self.path) else {}
                if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) and not _alive(
                        holder["pid"]):
                    self.log(f"taking over the stale lock of {os.path.dirname(self.path)} (pid {holder['pid']} on "
                             f"{holder['host']} is gone)")
                    os.remove(self.path)
                    continue
                raise RunError(
                    f"{os.path.dirname(self.path)} is in use by pid {holder.get('pid', '?')} on host "
                    f"{holder.get('host', '?')} since {holder.get('since', '?')}; wait for that trainer to end (or "
                    f"stop it), or train into another --run_dir") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise RunError(f"cannot take the lock {self.path}; remove it if no trainer uses this run directory")

    def release(self):
        if self.held:
            self.held = False
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# -- Creating and resuming a run. --------------------------------------------------------------------------------

def _diff(old: dict, new: dict):
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}


def check_architecture(run_dir, arch: dict):
    """Raises RunError when `run_dir` holds checkpoints of another architecture than `arch`."""
    old = read_json(os.path.join(run_dir, ARCH))
    if old is None:
        return
    # A U-Net option added after the run was written reads as its default (the network it built then).
    defaults = to_json({f.name: f.default for f in dataclasses.fields(UNetConfig)})
    old = {**{k: v for k, v in defaults.items() if k in arch}, **old}
    diff = _diff(old, to_json(arch))
    if diff:
        detail = ", ".join(f"{k}: {a} in the checkpoint vs {b} now" for k, (a, b) in diff.items())
        hint = "pass the --dataset it was trained on, " if "image_shape" in diff else ""
        raise RunError(f"{run_dir} holds a checkpoint of another architecture ({detail}); {hint}use a new "
                       f"--run_dir, or resume with the same flags: --flagfile={os.path.join(run_dir, FLAGS_FILE)}")


def parse_flags_file(path, definitions, names: Iterable[str]) -> Dict[str, object]:
    """The values of a flagfile parsed by absl itself against the definitions of flags `names` in `definitions`
    (an absl FlagValues, whose own values are left alone): {name: typed value} for each of `names`."""
    from absl import flags
    fv = flags.FlagValues()
    for name in names:
        flag = copy.deepcopy(definitions[name])
        flag.unparse()
        fv[name] = flag
    fv(["run_dir.parse_flags_file", f"--flagfile={path}"], known_only=True)
    return {name: fv[name].value for name in fv}


def open_run(run_dir, *, arch: dict, config: dict, flags_text: str, definitions, names: Iterable[str],
             mutable: Iterable[str], chief: bool = True):
    """Before training: checks that `run_dir` may take this run, then (chief only) records it.

    arch: the checkpoints' architecture; config: the resolved configuration of what is trained (no loop or
    logging settings); flags_text: this invocation's flags as a flagfile; definitions: the absl FlagValues that
    parsed them (flags.txt is read back against it); names: the project's flags among them; mutable: the flags
    that may change on a resume (how the run is observed or how long it runs). A resume whose other flags,
    configuration or architecture differ from the recorded ones raises RunError listing them, before anything is
    written. Every invocation is appended to history.jsonl."""
    check_architecture(run_dir, arch)
    config = to_json(config)
    recorded_config = read_json(os.path.join(run_dir, CONFIG))
    flags_path = os.path.join(run_dir, FLAGS_FILE)
    changed = {}
    if os.path.exists(flags_path):
        names = list(names)
        recorded = parse_flags_file(flags_path, definitions, names)
        changed = _diff({n: recorded[n] for n in names}, {n: definitions[n].value for n in names})
        fixed = {k: v for k, v in changed.items() if k not in set(mutable)}
        if fixed:
            detail = ", ".join(f"--{k}: {a} recorded vs {b} now" for k, (a, b) in fixed.items())
            raise RunError(f"{run_dir} was trained with other settings ({detail}); resume with "
                           f"--flagfile={flags_path} (changing only how long it runs or how it is logged), or "
                           "train into a new --run_dir")
    differs = list(_flat_diff(recorded_config, config)) if recorded_config is not None else []
    if differs:
        detail = ", ".join(f"{k}: {a} recorded vs {b} now" for k, (a, b) in differs)
        raise RunError(f"{run_dir} was trained with another configuration ({detail}); resume with "
                       f"--flagfile={flags_path}, or train into a new --run_dir")
    if not chief:
        return
    try:
        os.makedirs(run_dir, exist_ok=True)
        if recorded_config is None:
            write_json(os.path.join(run_dir, ARCH), to_json(arch))
            write_json(os.path.join(run_dir, CONFIG), config)
        write_atomically(flags_path, lambda f: f.write(flags_text))
        entry = dict(time=_now(), host=socket.gethostname(), pid=os.getpid(), command=sys.argv,
                     changed={k: b for k, (a, b) in changed.items()} if recorded_config is not None else "created")
        with open(os.path.join(run_dir, HISTORY), "a") as f:
            f.write(json.dumps(to_json(entry)) + "\n")
    except OSError as e:
        raise RunError(f"cannot write the run directory {run_dir}: {e.strerror or e}; choose a writable "
                       "--run_dir with free space") from None


def _flat_diff(old, new, prefix=""):
    """(dotted key, (old, new)) of each difference between two configurations. A key that only `new` has is a
    field added to cud-tf after `old` was recorded, not a difference: its flag, absent from the recorded flags.txt,
    took its default, and open_run's flags comparison has already checked it."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(old):
            yield from _flat_diff(old[k], new.get(k), f"{prefix}{k}.")
    elif old != new:
        yield prefix.rstrip("."), (old, new)


# -- Reading a run back. -----------------------------------------------------------------------------------------

@dataclasses.dataclass
class LoadedRun:
    run_dir: str
    net: VelocityUNet  # the velocity network holding the requested weights (EMA by default)
    config: UNetConfig
    run_config: dict  # config.json: the resolved configuration the run was trained with ({} for old runs)
    step: int
    checkpoint: str


def read_config(run_dir) -> dict:
    """config.json: {"trainer", "flags", "data", "optim", "objective", ...} as recorded by the trainer."""
    return read_json(os.path.join(run_dir, CONFIG), default={})


def read_arch(run_dir):
    """(UNetConfig, uses a noise encoder) from arch.json."""
    arch = read_json(os.path.join(run_dir, ARCH))
    if arch is None:
        raise RunError(f"{run_dir} is not a training run directory (no {ARCH}); pass the --run_dir of a run")
    encoder = bool(arch.pop("noise_encoder", False))
    fields = {f.name for f in dataclasses.fields(UNetConfig)}
    cfg = UNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in arch.items() if k in fields})
    return cfg, encoder


def data_location(run_dir):
    """(tfds name, data dir or None) of the data a run was trained on: the name from config.json, the directory
    from its flags.txt (parsed by absl); for a run distilled from another (one-step stage, TRACT, DisBack) that
    did not name a directory, the source run's."""
    from absl import flags
    config = read_config(run_dir)
    data_dir = None
    if os.path.exists(os.path.join(run_dir, FLAGS_FILE)):
        fv = flags.FlagValues()
        flags.DEFINE_string("data_dir", None, "", flag_values=fv)
        data_dir = parse_flags_file(os.path.join(run_dir, FLAGS_FILE), fv, ["data_dir"])["data_dir"]
    source = (config.get("init") or config.get("teacher") or {}).get("run_dir")
    if data_dir is None and source and os.path.abspath(source) != os.path.abspath(run_dir):
        data_dir = data_location(source)[1]
    return config.get("dataset", "mnist_offline"), data_dir


def latest_checkpoint(run_dir, checkpoint=None) -> str:
    """`checkpoint`, or the newest checkpoint of `<run_dir>/checkpoints`; RunError when there is none."""
    path = checkpoint or tf.train.latest_checkpoint(os.path.join(run_dir, "checkpoints"))
    if not path:
        raise RunError(f"no checkpoint in {os.path.join(run_dir, 'checkpoints')}; train first or pass --checkpoint")
    return path


_LOSS_SCALE_KEY = "optimizer_velocity/dynamic_scale/.ATTRIBUTES/VARIABLE_VALUE"  # a mixed_float16 run's


def load_run(run_dir, weights="ema", checkpoint=None, name="velocity") -> LoadedRun:
    """Rebuilds the run's velocity network and restores its EMA (or training, `weights="train"`) weights."""
    cfg, has_encoder = read_arch(run_dir)
    path = latest_checkpoint(run_dir, checkpoint)
    net = VelocityUNet(cfg, name=name).build_variables()
    variables = list(net.trainable_variables)
    items = {"net": checkpoint_variables(net)}
    if has_encoder:
        encoder = VelocityUNet(noise_encoder_config(cfg), name="encoder").build_variables()
        items["encoder"] = checkpoint_variables(encoder)
        variables += encoder.trainable_variables
    run_config = read_config(run_dir)
    # Keras keeps optimizer variables in a positional list whose layout depends on the schedule: rebuild it alike,
    # inside a LossScaleOptimizer for a mixed_float16 run (its checkpoint nests the AdamW as inner_optimizer).
    warmup_steps = int(run_config.get("optim", {}).get("warmup_steps", 0))
    try:
        loss_scaled = tf.train.load_checkpoint(path).has_tensor(_LOSS_SCALE_KEY)
    except tf.errors.OpError:
        loss_scaled = False  # an unreadable checkpoint: the restore below says why
    optimizer = make_group_optimizer(OptimConfig(warmup_steps=warmup_steps), loss_scaling=loss_scaled)
    optimizer.build(variables)
    step = tf.Variable(0, dtype=tf.int64)
    ckpt = tf.train.Checkpoint(optimizer_velocity=optimizer, step=step, **items)
    try:
        ckpt.restore(path).expect_partial().assert_existing_objects_matched()
    except (ValueError, AssertionError, tf.errors.OpError) as e:
        raise RunError(f"cannot restore {path} into the architecture of {run_dir}/{ARCH}: "
                       f"{str(e).splitlines()[0]}") from None
    if weights == "ema":
        for v, avg in zip(net.trainable_variables, ema_variables(optimizer)):
            v.assign(avg)
    elif weights != "train":
        raise ValueError(f"weights={weights!r}; expected 'ema' or 'train'")
    return LoadedRun(run_dir=run_dir, net=net, config=cfg, run_config=run_config, step=int(step.numpy()),
                     checkpoint=path)


def load_teacher(run_dir, strategy, names, **config_overrides):
    """Networks named `names`, built in `strategy`'s scope, each holding the EMA weights of the run in `run_dir`.

    config_overrides replace fields of the run's UNetConfig that hold no weights (e.g. dropout=0.0).
    Returns ({name: VelocityUNet}, LoadedRun). Raises RunError for an unusable run directory.
    """
    run = load_run(run_dir, weights="ema")
    cfg = dataclasses.replace(run.config, **config_overrides)
    with strategy.scope():
        nets = {name: VelocityUNet(cfg, name=name).build_variables() for name in names}
    for net in nets.values():
        copy_weights(run.net.trainable_variables, net.trainable_variables)
    return nets, run

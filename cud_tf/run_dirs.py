"""Loading a trained run directory: its architecture, its flags, and its (EMA) weights.

The one way every consumer (evaluator, export, TRACT and DisBack teachers) reads a run written by
`cud_tf.training.train`.
"""
import dataclasses
import json
import os

import tensorflow as tf

from cud_tf.model import make_optimizer, OptimConfig, ema_variables
from cud_tf.networks.unet import UNetConfig, VelocityUNet, checkpoint_variables, noise_encoder_config


class RunError(RuntimeError):
    """A run directory that cannot be used, with the reason in one line."""


@dataclasses.dataclass
class LoadedRun:
    run_dir: str
    net: VelocityUNet  # the velocity network holding the requested weights (EMA by default)
    config: UNetConfig
    flags: dict  # flag name -> string value, from flags.txt
    step: int
    checkpoint: str


def read_flags(run_dir) -> dict:
    """flags.txt as {name: value string} (booleans as 'true'/'false')."""
    out = {}
    path = os.path.join(run_dir, "flags.txt")
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line.startswith("--"):
                continue
            if "=" in line:
                k, v = line[2:].split("=", 1)
            elif line.startswith("--no"):
                k, v = line[4:], "false"
            else:
                k, v = line[2:], "true"
            out[k] = v
    return out


def read_arch(run_dir):
    """(UNetConfig, uses a noise encoder) from arch.json."""
    path = os.path.join(run_dir, "arch.json")
    if not os.path.exists(path):
        raise RunError(f"{run_dir} is not a training run directory (no arch.json); pass the --run_dir of a run")
    with open(path) as f:
        arch = json.load(f)
    encoder = bool(arch.pop("noise_encoder", False))
    fields = {f.name for f in dataclasses.fields(UNetConfig)}
    cfg = UNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in arch.items() if k in fields})
    return cfg, encoder


def latest_checkpoint(run_dir, checkpoint=None):
    path = checkpoint or tf.train.latest_checkpoint(os.path.join(run_dir, "checkpoints"))
    if not path:
        raise RunError(f"no checkpoint in {os.path.join(run_dir, 'checkpoints')}; train first or pass --checkpoint")
    return path


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
    flags = read_flags(run_dir)
    # Keras keeps optimizer variables in a positional list whose layout depends on the schedule: rebuild it alike.
    optimizer = make_optimizer(OptimConfig(warmup_steps=int(flags.get("warmup_steps", 0))))
    optimizer.build(variables)
    step = tf.Variable(0, dtype=tf.int64)
    ckpt = tf.train.Checkpoint(optimizer_velocity=optimizer, step=step, **items)
    try:
        ckpt.restore(path).expect_partial().assert_existing_objects_matched()
    except (ValueError, AssertionError, tf.errors.OpError) as e:
        raise RunError(f"cannot restore {path} into the architecture of {run_dir}/arch.json: "
                       f"{str(e).splitlines()[0]}") from None
    if weights == "ema":
        for v, avg in zip(net.trainable_variables, ema_variables(optimizer)):
            v.assign(avg)
    elif weights != "train":
        raise ValueError(f"weights={weights!r}; expected 'ema' or 'train'")
    return LoadedRun(run_dir=run_dir, net=net, config=cfg, flags=flags, step=int(step.numpy()),
                     checkpoint=path)

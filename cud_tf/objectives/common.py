"""What every objective shares: its output type, the networks it sees, distances, and the training point.

An objective is a pure function `loss(nets, batch, rng, step, cfg) -> LossOutput`; the model reduces the
per-example losses of each optimizer group in one place (`tf.nn.compute_average_loss`).
"""
import dataclasses
import math
from typing import Any, Dict, Optional

import tensorflow as tf

from cud_tf import interpolants
from cud_tf.networks.unet import encode_noise


@dataclasses.dataclass
class LossOutput:
    """per_example: {optimizer group: `[B]`}; metrics: {name: `[B]` per-example values, averaged by the model}."""

    per_example: Dict[str, tf.Tensor]
    metrics: Dict[str, tf.Tensor]


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """Options of the rectified-flow and CUD objectives (docs/algorithms.md sections 5-6)."""

    order: int = 1  # K, the catch-up order and the number of heads trained
    tableau: str = ""  # "" = the standard tableau of order K; "reference3" = the reference code's K=3 slope
    step_strategy: str = "uniform"  # origin | uniform | rule
    num_grid_steps: int = 16  # TN
    catchup_model: str = "train"  # train | ema
    reuse_k1: bool = False  # catch-up slope's k1 = the prediction even with dropout (exact without dropout)
    w_kd: float = 1.0
    w_gt: float = 1.0
    adaptive_weights: bool = False  # w_kd = 2k/I, w_gt = 2(1 - k/I) at iteration k of I = total_steps
    total_steps: int = 1
    distance: str = "mse"  # mse | pseudo_huber
    beta: float = 20.0  # weight of the noise encoder's KL term
    eps: float = interpolants.EPS
    label_dropout: float = 0.0  # probability of the null label (classifier-free guidance)


@dataclasses.dataclass
class Nets:
    """The networks an objective may call. `velocity` is trained; `catchup` defaults to `velocity`."""

    velocity: Any
    catchup: Optional[Any] = None
    encoder: Optional[Any] = None
    teacher: Optional[Any] = None
    extra: Dict[str, Any] = dataclasses.field(default_factory=dict)


def distance(a, b, kind="mse"):
    """Per-example distance `[B]` between `[B, H, W, C]` tensors: mean squared error, or pseudo-Huber
    sqrt(||a - b||^2 + c^2) - c with c = 0.00054 sqrt(d) (Song & Dhariwal 2023)."""
    diff = tf.cast(a, tf.float32) - tf.cast(b, tf.float32)
    sq = tf.reduce_sum(tf.square(diff), axis=[1, 2, 3])
    if kind == "mse":
        return sq / tf.cast(tf.reduce_prod(tf.shape(diff)[1:]), tf.float32)
    if kind == "pseudo_huber":
        c = 0.00054 * math.sqrt(float(a.shape[1] * a.shape[2] * a.shape[3]))
        return tf.sqrt(sq + c * c) - c
    raise ValueError(f"unknown distance {kind!r}; expected 'mse' or 'pseudo_huber'")


@dataclasses.dataclass
class TrainingPoint:
    """A point of the straight path: x0, z, x_t, u `[B, H, W, C]`; t `[B]`; kl `[B]` (zeros without encoder)."""

    x0: tf.Tensor
    z: tf.Tensor
    t: tf.Tensor
    x_t: tf.Tensor
    u: tf.Tensor
    kl: tf.Tensor


def training_point(nets: Nets, x0, rng: interpolants.Rng, eps=interpolants.EPS) -> TrainingPoint:
    """Draws t ~ U(eps, 1) and noise (reparameterised through the noise encoder when there is one)."""
    b = tf.shape(x0)[0]
    t = interpolants.t_from_uniform(rng.uniform("t", b), eps)
    noise = rng.normal("z", x0)
    if nets.encoder is not None:
        z, kl = encode_noise(nets.encoder, x0, noise, training=True)
    else:
        z, kl = noise, tf.zeros([b])
    return TrainingPoint(x0=x0, z=z, t=t, x_t=interpolants.x_t(x0=x0, z=z, t=t),
                         u=interpolants.velocity_target(x0=x0, z=z), kl=kl)


def conditioning(nets: Nets, batch, rng: interpolants.Rng, cfg: ObjectiveConfig):
    """Labels `[B]` for a class-conditional network (None otherwise), replaced by the null label with
    probability `cfg.label_dropout` so that the unconditional branch is trained too."""
    num_classes = nets.velocity.config.num_classes
    if not num_classes:
        return None
    y = tf.cast(batch["label"], tf.int32)
    if cfg.label_dropout > 0:
        drop = rng.uniform("label_dropout", tf.shape(y)[0]) < cfg.label_dropout
        y = tf.where(drop, num_classes, y)
    return y

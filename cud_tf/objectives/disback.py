"""DisBack: a one-step generator G(z) = z - v_eta(z, 1) distilled from a velocity teacher along its degradation
path (docs/algorithms.md section 9).

Stage 1 (`degradation_loss`) fits a copy of the teacher to samples of the frozen initial generator G^0; stage 2
(`loss`, `fake_loss`) trains the generator with the distribution-matching gradient against a target network and
keeps the fake network fitting the generator's samples. Which path node is the target, and on which steps the
generator is updated, is decided outside (`cud_tf.models.disback`, `cud_tf.disback_path`): these functions see the
networks they are given.
"""
import dataclasses

import tensorflow as tf

from cud_tf import interpolants
from cud_tf.objectives.common import LossOutput, Nets, conditioning, distance
from cud_tf.sampling import velocity_fn

# Reported on generator steps, zeros on fake-only steps ("loss" is the fake net's RF loss on every step).
GENERATOR_METRICS = ("generator_loss", "g_norm", "fake_target_gap")


@dataclasses.dataclass(frozen=True)
class DisbackConfig:
    """Options of both DisBack stages."""

    t_min: float = 0.02  # the distribution-matching times t ~ U(t_min, t_max)
    t_max: float = 0.98
    fake_updates_per_generator: int = 5  # the generator is updated on one step of every this many
    guidance_scale: float = 1.0  # classifier-free guidance of the target only (a class-conditional teacher)
    head: int = 1  # the head of the teacher (and path) that the generator distils
    label_dropout: float = 0.0  # null-label probability, so that the unconditional branches follow too
    eps: float = interpolants.EPS
    distance: str = "mse"

    def __post_init__(self):
        if not 0.0 <= self.t_min < self.t_max <= 1.0:
            raise ValueError(f"t range [{self.t_min}, {self.t_max}] must satisfy 0 <= t_min < t_max <= 1")
        if self.fake_updates_per_generator < 1:
            raise ValueError(f"fake_updates_per_generator={self.fake_updates_per_generator} must be >= 1")


def generate(net, z, y, head, training=False):
    """The one-step generator G(z) = z - v(z, 1) `[B,H,W,C]` of head `head` of `net` (labels y `[B]` or None)."""
    t = tf.ones(tf.shape(z)[:1], tf.float32)
    return z - tf.cast(net(z, t, y, training=training, head=head), tf.float32)


def rf_fit(net, x0, y, rng, cfg: DisbackConfig):
    """Per-example `[B]` rectified-flow loss D(v(x_t, t), z - x0) of head `cfg.head` of `net` on the (detached)
    samples x0."""
    x0 = tf.stop_gradient(x0)
    b = tf.shape(x0)[0]
    t = interpolants.t_from_uniform(rng.uniform("fit_t", b), cfg.eps)
    z = rng.normal("fit_z", x0)
    v = net(interpolants.x_t(x0=x0, z=z, t=t), t, y, training=True, head=cfg.head)
    return distance(v, interpolants.velocity_target(x0=x0, z=z), cfg.distance)


def dm_gradient(v_fake, v_target, x_g, x_t, t):
    """DMD's normalised gradient g `[B,H,W,C]` = (x0_hat_fake - x0_hat_target) / mean|x_g - x0_hat_target|
    = t (v_target - v_fake) / (...), with x0_hat = x_t - t v; the mean runs over each example's pixels."""
    x0_fake = interpolants.x0_from_v(x_t=x_t, v=v_fake, t=t)
    x0_target = interpolants.x0_from_v(x_t=x_t, v=v_target, t=t)
    scale = tf.reduce_mean(tf.abs(x_g - x0_target), axis=[1, 2, 3], keepdims=True)
    return tf.stop_gradient((x0_fake - x0_target) / tf.maximum(scale, 1e-8))


def generator_loss(x_g, g):
    """Per-example `[B]` 0.5 ||x_g - sg(x_g - g)||^2, whose gradient with respect to x_g is exactly g."""
    return 0.5 * tf.reduce_sum(tf.square(x_g - tf.stop_gradient(x_g - g)), axis=[1, 2, 3])


# Zhang et al. 2025, "DisBack" (arXiv 2408.15991), stage 1: min E ||v(x_t, t) - (z - sg(G0(z')))||^2 on G0's samples.
def degradation_loss(nets: Nets, batch, rng, step, cfg: DisbackConfig) -> LossOutput:
    """Per-example `[B]` RF loss of the degradation net `nets.velocity` on samples of the frozen initial
    generator `nets.extra["generator0"]` (the teacher); batch["image"] gives only the shape, labels the classes."""
    del step
    x = batch["image"]
    y = conditioning(nets, batch, rng, cfg)
    x_g = tf.stop_gradient(generate(nets.extra["generator0"], rng.normal("gen_z", x), y, cfg.head))
    fit = rf_fit(nets.velocity, x_g, y, rng, cfg)
    return LossOutput(per_example={"velocity": fit}, metrics={"loss": fit})


def _stage2(nets: Nets, batch, rng, cfg: DisbackConfig, train_generator: bool):
    x = batch["image"]
    b = tf.shape(x)[0]
    y = conditioning(nets, batch, rng, cfg)
    z = rng.normal("gen_z", x)
    x_g = generate(nets.velocity, z, y, cfg.head, training=train_generator)
    fake = nets.extra["fake"]
    fit = rf_fit(fake, x_g, y, rng, cfg)
    per_example, metrics = {"fake": fit}, {"fake_loss": fit}
    if not train_generator:
        zeros = tf.zeros([b])
        return LossOutput(per_example, dict(metrics, loss=fit, **{k: zeros for k in GENERATOR_METRICS}))
    t = cfg.t_min + (cfg.t_max - cfg.t_min) * rng.uniform("dm_t", b)
    x_t = tf.stop_gradient(interpolants.x_t(x0=x_g, z=rng.normal("dm_eps", x), t=t))
    v_fake = tf.cast(fake(x_t, t, y, training=False, head=cfg.head), tf.float32)
    v_target = velocity_fn(nets.teacher, cfg.head, y, guidance_scale=cfg.guidance_scale)(x_t, t)
    g = dm_gradient(tf.stop_gradient(v_fake), tf.stop_gradient(v_target), tf.stop_gradient(x_g), x_t, t)
    gen = generator_loss(x_g, g)
    per_example["velocity"] = gen
    gap = distance(v_fake, v_target)
    return LossOutput(per_example, dict(metrics, loss=fit, generator_loss=gen, fake_target_gap=gap,
                                        g_norm=tf.sqrt(tf.reduce_sum(tf.square(g), axis=[1, 2, 3]))))


# Zhang et al. 2025, "DisBack" (arXiv 2408.15991), stage 2: grad_x G = g toward the target; fake fits G's samples.
def loss(nets: Nets, batch, rng, step, cfg: DisbackConfig) -> LossOutput:
    """A step that updates both the generator `nets.velocity` (group "velocity": the distribution-matching loss
    against `nets.teacher`, the current target) and the fake net `nets.extra["fake"]` (group "fake")."""
    del step
    return _stage2(nets, batch, rng, cfg, train_generator=True)


def fake_loss(nets: Nets, batch, rng, step, cfg: DisbackConfig) -> LossOutput:
    """A step that updates the fake net alone (group "fake"), on detached generator samples; the generator's
    metrics are zeros so that both kinds of step report the same names."""
    del step
    return _stage2(nets, batch, rng, cfg, train_generator=False)

"""Rectified flow, the baseline: CUD with catch-up turned off."""
from cud_tf.objectives.common import LossOutput, Nets, ObjectiveConfig, conditioning, distance, training_point


# Liu, Gong & Liu 2022, "Flow Straight and Fast" (arXiv 2209.03003), eq. 1: min E ||(z - x0) - v(x_t, t)||^2.
def loss(nets: Nets, batch, rng, step, cfg: ObjectiveConfig) -> LossOutput:
    """Per-example `[B]` loss D(g_1(F(x_t, t)), u) (+ beta KL with the noise encoder) in group "velocity"."""
    del step
    y = conditioning(nets, batch, rng, cfg)
    p = training_point(nets, batch["image"], rng, cfg.eps)
    v = nets.velocity(p.x_t, p.t, y, training=True, head=1)
    gt = distance(v, p.u, cfg.distance)
    total = gt + cfg.beta * p.kl if nets.encoder is not None else gt
    return LossOutput(per_example={"velocity": total}, metrics={"loss": total, "gt1": gt, "kl": p.kl})

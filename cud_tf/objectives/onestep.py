"""Additional one-step training (the "two-session" stage of CUD): fit the one-step map z - f(z, 1) to stored
trajectory predictions x0_hat^(m), with a pull towards f_EMA, the moving EMA of the student that
`cud_tf.models.onestep.OnestepModel` keeps (arXiv 2305.10769; the authors' train_distill_update.py)."""
import dataclasses

import tensorflow as tf

from cud_tf.objectives.common import LossOutput, Nets, ObjectiveConfig, distance


@dataclasses.dataclass(frozen=True)
class OnestepConfig(ObjectiveConfig):
    reg_weight: float = 0.1  # weight of ||f(z, 1) - f_EMA(z, 1)||^2
    head: int = 1  # head g_k of the one-step map


# Shao et al. 2023, "Catch-Up Distillation" (arXiv 2305.10769), one-step stage: |z-f-x0_hat^(m)|^2 + 0.1|f-f_EMA|^2.
def loss(nets: Nets, batch, rng, step, cfg: OnestepConfig) -> LossOutput:
    """batch: {"z": `[B,H,W,C]` stored noise, "target": `[B,H,W,C]` x0_hat^(m) of its trajectory, and "label"
    `[B]` for class-conditional networks}; f_EMA is `nets.extra["f_ema"]` (evaluated without dropout, no gradient).
    Per-example `[B]` loss in group "velocity"."""
    del rng, step
    z, target, y = batch["z"], batch["target"], batch.get("label")
    t = tf.ones(tf.shape(z)[:1], z.dtype)
    v = nets.velocity(z, t, y, training=True, head=cfg.head)
    v_ema = tf.stop_gradient(nets.extra["f_ema"](z, t, y, training=False, head=cfg.head))
    fit = distance(z - v, target, cfg.distance)
    reg = distance(v, v_ema, cfg.distance)
    total = fit + cfg.reg_weight * reg
    return LossOutput(per_example={"velocity": total}, metrics={"loss": total, "fit": fit, "reg": reg})

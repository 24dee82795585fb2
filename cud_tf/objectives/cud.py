"""Catch-Up Distillation: each head matches the ground-truth velocity and its own output a few RK steps later."""
import tensorflow as tf

from cud_tf import interpolants, solvers
from cud_tf.objectives.common import LossOutput, Nets, ObjectiveConfig, conditioning, distance, training_point
from cud_tf.sampling import velocity_fn


def catchup_targets(f, x_t, t, h, order, tableau, u, eps=interpolants.EPS, k1=None):
    """Targets v~_i = f(x_t - i h s, t - i h), i = 1..K, with s the slope of one RK step of `tableau` from
    (x_t, t) with step h; where t - K h < eps every target of that example is u. No gradient flows.

    f: velocity function; x_t, u `[B,H,W,C]`; t, h `[B]`; k1: f(x_t, t) when already computed
    -> list of K tensors `[B,H,W,C]`. The K target points are evaluated in one batched pass of K*B examples.
    """
    x_t, t, h = tf.stop_gradient(x_t), tf.stop_gradient(t), tf.stop_gradient(h)
    k1 = None if k1 is None else tf.stop_gradient(tf.cast(k1, tf.float32))
    s = solvers.rk_slope(f, x_t, t, h, tableau, k1=k1)
    steps = [float(i) * h for i in range(1, order + 1)]
    xs = tf.concat([x_t - interpolants.bcast(ih, x_t) * s for ih in steps], axis=0)
    ts = tf.concat([t - ih for ih in steps], axis=0)
    targets = tf.split(f(xs, ts), order, axis=0)
    outside = interpolants.bcast(t - order * h < eps, x_t)
    return [tf.stop_gradient(tf.where(outside, u, v)) for v in targets]


def reuses_prediction(cfg: ObjectiveConfig, dropout: float) -> bool:
    """Whether the catch-up slope's first stage f(x_t, t) is taken from the prediction of head g_1: exact when the
    training weights compute the targets without dropout; with dropout only under `reuse_k1` (a deviation)."""
    return cfg.catchup_model == "train" and (cfg.reuse_k1 or dropout == 0.0)


def loss_weights(step, cfg: ObjectiveConfig):
    """(w_kd, w_gt): constant, or the adaptive schedule 2k/I and 2(1 - k/I) of the reference (K = 1)."""
    if not cfg.adaptive_weights:
        return tf.constant(cfg.w_kd), tf.constant(cfg.w_gt)
    frac = tf.minimum(tf.cast(step, tf.float32) / float(max(cfg.total_steps, 1)), 1.0)
    return 2.0 * frac, 2.0 * (1.0 - frac)


# Shao et al. 2023, "Catch-Up Distillation" (arXiv 2305.10769), eq. 8-10: sum_i w_kd D(g_i, v~_i) + w_gt D(g_i, u).
def loss(nets: Nets, batch, rng, step, cfg: ObjectiveConfig) -> LossOutput:
    """Per-example `[B]` CUD loss (+ beta KL with the noise encoder) in group "velocity"."""
    k_order = cfg.order
    y = conditioning(nets, batch, rng, cfg)
    p = training_point(nets, batch["image"], rng, cfg.eps)
    feats = nets.velocity.features(p.x_t, p.t, y, training=True)
    preds = [g(feats) for g in nets.velocity.heads[:k_order]]

    h = interpolants.step_size(rng.uniform("h", tf.shape(p.t)[0]), p.t, cfg.step_strategy, cfg.num_grid_steps)
    catchup_net = nets.catchup if cfg.catchup_model == "ema" else nets.velocity
    f = velocity_fn(catchup_net, head=1, labels=y, training=True)  # training mode: dropout on, as the reference
    tableau = cfg.tableau or solvers.ORDER_TO_TABLEAU[k_order]
    reuse = reuses_prediction(cfg, nets.velocity.config.dropout)
    targets = catchup_targets(f, p.x_t, p.t, h, k_order, tableau, p.u, cfg.eps, k1=preds[0] if reuse else None)

    w_kd, w_gt = loss_weights(step, cfg)
    total = cfg.beta * p.kl if nets.encoder is not None else tf.zeros_like(p.t)
    metrics = {"kl": p.kl, "boundary": tf.cast(p.t - k_order * h < cfg.eps, tf.float32)}
    for i, (pred, target) in enumerate(zip(preds, targets), start=1):
        kd, gt = distance(pred, target, cfg.distance), distance(pred, p.u, cfg.distance)
        total += w_kd * kd + w_gt * gt
        metrics[f"kd{i}"], metrics[f"gt{i}"] = kd, gt
    metrics["loss"] = total
    return LossOutput(per_example={"velocity": total}, metrics=metrics)

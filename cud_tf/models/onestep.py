"""The model of the additional one-step stage: the student, and f_EMA, a moving EMA of the student.

Shao et al. 2023, "Catch-Up Distillation" (arXiv 2305.10769); in the authors' `train_distill_update.py` f_EMA
starts as the CUD EMA weights and is updated after every optimizer step, f_EMA <- 0.9999 f_EMA + 0.0001 theta.
"""
import tensorflow as tf

from cud_tf.models.base import DiffusionModel, OptimConfig, evaluated_weights_config
from cud_tf.networks.unet import VelocityUNet
from cud_tf.objectives import onestep

EVAL_WEIGHTS = ("student", "ema")


class OnestepModel(DiffusionModel):
    """Fine-tunes `net` (the student) with the one-step objective; `f_ema` (same architecture) is the network of
    its pull term ||f(z, 1) - f_EMA(z, 1)||^2.

    After every applied update k, f_EMA <- d f_EMA + (1 - d) theta_k with d = `f_ema_decay` (no bias correction:
    f_EMA starts from the weights it was given, the CUD run's EMA); a skipped (non-finite) update leaves the
    student and f_EMA unchanged. d = 1 keeps f_EMA frozen.

    eval_weights picks what the optimizer's EMA slots hold, which is what samples, the evaluator, checkpoints'
    "ema" weights and export read: "student" (the reference's choice) sets the optimizer's EMA momentum to 0, so
    that Keras' `ema = m ema + (1 - m) theta` is the raw student after every update; "ema" keeps
    `optim_cfg.ema_decay`.
    """

    def __init__(self, net: VelocityUNet, f_ema: VelocityUNet, cfg: onestep.OnestepConfig, optim_cfg: OptimConfig,
                 global_batch_size: int, seed: int = 0, f_ema_decay: float = 0.9999,
                 eval_weights: str = "student", objective=onestep.loss, **kw):
        if not 0.0 <= f_ema_decay <= 1.0:
            raise ValueError(f"the f_EMA decay must lie in [0, 1], got {f_ema_decay}")
        optim_cfg = evaluated_weights_config(optim_cfg, eval_weights, raw=EVAL_WEIGHTS[0])
        super().__init__(net, objective, cfg, optim_cfg, global_batch_size, seed=seed,
                         extra_nets={"f_ema": f_ema}, **kw)
        self.f_ema, self.f_ema_decay, self.eval_weights = f_ema, float(f_ema_decay), eval_weights
        # Frozen for the tape; the variable list is taken before (then it is empty).
        self.f_ema_variables = list(f_ema.trainable_variables)
        f_ema.trainable = False
        if [v.shape for v in self.f_ema_variables] != [v.shape for v in net.trainable_variables]:
            raise ValueError("f_EMA and the student must have the same architecture")
        # Updates folded into f_EMA so far (= applied updates of the student): checkpointed with it.
        self.f_ema_updates = tf.Variable(0, dtype=tf.int64, trainable=False, name="f_ema_updates",
                                         aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)

    def trackables(self):
        # f_EMA's weights are saved through extra_nets ("net_f_ema").
        return dict(super().trackables(), f_ema_updates=self.f_ema_updates)

    def finish_step(self, applied):
        """f_EMA <- d f_EMA + (1 - d) theta after each applied update; a skipped (non-finite) one leaves it."""
        if self.f_ema_decay == 1.0:
            return
        d = self.f_ema_decay

        def move():
            for avg, theta in zip(self.f_ema_variables, self.net.trainable_variables, strict=True):
                avg.assign(d * avg + (1.0 - d) * theta)
            self.f_ema_updates.assign_add(1)

        tf.cond(applied, move, lambda: None)


def build_onestep_model(strategy, net_cfg, weights, cfg: onestep.OnestepConfig, optim_cfg: OptimConfig, **kw):
    """An `OnestepModel` built in `strategy`'s scope whose student and f_EMA both start as `weights` (a
    `get_weights()` list of a network of `net_cfg`: the CUD run's EMA). kw: OnestepModel's keyword arguments."""
    with strategy.scope():
        nets = []
        for name in ("velocity", "f_ema"):
            nets.append(VelocityUNet(net_cfg, name=name).build_variables())
            nets[-1].set_weights(weights)
        return OnestepModel(*nets, cfg, optim_cfg, **kw)

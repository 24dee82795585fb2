"""The model that runs TRACT's phases (Berthelot et al. 2023, arXiv 2303.04248) on `cud_tf.objectives.tract`.

`TractModel` keeps, besides the student, a teacher and a self-teacher network whose weights are swapped in
place (never new objects), so the compiled train step is traced once for every phase.
"""
import dataclasses

import tensorflow as tf

from cud_tf.models.base import DiffusionModel, OptimConfig, copy_weights, ema_variables
from cud_tf.networks.unet import VelocityUNet
from cud_tf.objectives import tract
from cud_tf.objectives.common import Nets


def ema_rate(decay, k):
    """Bias-corrected EMA rate (1 - mu) / (1 - mu^k) of update k >= 1 (float32 scalar, computed in float64).

    avg_k = avg_{k-1} + rate_k (theta_k - avg_{k-1}) equals sum_i mu^(k-i) (1 - mu) theta_i / (1 - mu^k), the
    zero-initialised EMA divided by its bias (1 - mu^k) (Kingma & Ba 2015); rate_1 = 1 copies theta_1.
    """
    k = tf.cast(k, tf.float64)
    return tf.cast((1.0 - decay) / (1.0 - tf.pow(tf.constant(decay, tf.float64), k)), tf.float32)


class TractModel(DiffusionModel):
    """The student (`net`, trained), the teacher (frozen within a phase) and the self-teacher, for TRACT.

    After every update: self-teacher <- EMA(mu_S) of the student (not with BTD's `second_step="teacher"`, which
    never calls it), inference EMA <- EMA(mu_I) of the student, both bias-corrected over the step count (as the
    TRACT and BTD reference code). The inference EMA lives in the
    optimizer's EMA slots (whose own momentum is set to 1, so Keras leaves them alone), which is where
    `sync_ema`, samples, checkpoints and `run_dir.load_run(weights="ema")` read EMA weights. At the first step of
    phase p > `self.phase` the teacher's weights become the inference EMA; `phase` is checkpointed, so a
    resumed run continues in its phase with its teacher.
    """

    def __init__(self, net: VelocityUNet, teacher: VelocityUNet, self_teacher: VelocityUNet, cfg: tract.TractConfig,
                 optim_cfg: OptimConfig, global_batch_size: int, seed: int = 0, objective=tract.loss, **kw):
        super().__init__(net, objective, cfg, dataclasses.replace(optim_cfg, ema_decay=1.0), global_batch_size,
                         seed=seed, extra_nets={"teacher": teacher, "self_teacher": self_teacher}, **kw)
        self.teacher, self.self_teacher = teacher, self_teacher
        # Frozen: the tape does not watch them. Their variable lists are taken before (then they are empty).
        self.teacher_variables = list(teacher.trainable_variables)
        self.self_teacher_variables = list(self_teacher.trainable_variables)
        teacher.trainable = self_teacher.trainable = False
        self.phase = tf.Variable(0, dtype=tf.int64, trainable=False, name="phase",
                                 aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)

    @property
    def nets(self) -> Nets:
        return Nets(velocity=self.net, teacher=self.teacher, extra={"self_teacher": self.self_teacher})

    @property
    def inference_ema_variables(self):
        return ema_variables(self.optimizers_by_group["velocity"])[:len(self.net.trainable_variables)]

    def trackables(self):
        # The frozen nets' weights as explicit lists: tf.train.Checkpoint does not reach the U-Net's blocks held
        # in lists of tuples (the student's weights are reached through its optimizer).
        return dict(super().trackables(), phase=self.phase, teacher_weights=list(self.teacher_variables),
                    self_teacher_weights=list(self.self_teacher_variables))

    def prepare_step(self):
        """At the first step of a new phase: teacher <- inference EMA, and record the phase."""
        p = tf.cast(tract.phase_of(self.step, self.objective_cfg), tf.int64)

        def begin():
            copy_weights(self.inference_ema_variables, self.teacher_variables)
            self.phase.assign(p)

        tf.cond(p > self.phase, begin, lambda: None)

    def finish_step(self, applied):
        """Bias-corrected EMAs of the student after update k = `self.step`: self-teacher (unless the teacher takes
        the second step, BTD) and inference EMA (mu_I fixed or from the phase length; `TractConfig.inference_decay`),
        also after a skipped update, as the reference: the count k goes on."""
        del applied
        cfg = self.objective_cfg
        student = self.net.trainable_variables
        emas = [(cfg.inference_decay, self.inference_ema_variables)]
        if cfg.uses_self_teacher:
            emas.append((cfg.self_teacher_decay, self.self_teacher_variables))
        for decay, averages in emas:
            rate = ema_rate(decay, self.step)
            for avg, theta in zip(averages, student, strict=True):
                avg.assign(avg + rate * (theta - avg))

"""DisBack's stage 2 model (Zhang et al. 2024, arXiv 2408.15991): the generator and the fake network trained with
one compiled step against a frozen target, around the objectives of `cud_tf.objectives.disback`.

The target is one network object: a switch reads a degradation-path node (cud_tf.disback_path) into its
variables (no retracing), checked against the fingerprint that the path's manifest recorded.
"""
from typing import Optional

import tensorflow as tf

from cud_tf.models.base import DiffusionModel, OptimConfig, evaluated_weights_config
from cud_tf.networks.unet import VelocityUNet
from cud_tf.objectives import disback
from cud_tf.objectives.common import Nets


EVAL_WEIGHTS = ("generator", "ema")


class DisbackModel(DiffusionModel):
    """The generator `net` (group "velocity"), the fake velocity network (group "fake", updated every step) and
    the frozen target (the path node in use, `nets.teacher`).

    eval_weights picks what the generator optimizer's EMA slots hold, which is what samples, the evaluator,
    checkpoints' "ema" weights and export read (`evaluated_weights_config`, as the one-step stage): "generator",
    the raw generator (the reference keeps no generator EMA), or "ema", its EMA with `optim_cfg.ema_decay`.

    The generator is updated on steps k with (k + 1) % fake_updates_per_generator == 0 (the last step of each
    group, so that steps logged at multiples of the ratio show the generator's metrics); on the other steps a
    cheaper branch computes the fake network's loss alone. Both branches live in one traced step.
    """

    def __init__(self, generator: VelocityUNet, fake: VelocityUNet, target: VelocityUNet, cfg: disback.DisbackConfig,
                 optim_cfg: OptimConfig, global_batch_size: int, seed: int = 0,
                 fake_optim_cfg: Optional[OptimConfig] = None, eval_weights: str = "generator", **kw):
        groups = {"velocity": list(generator.trainable_variables), "fake": list(fake.trainable_variables)}
        generator_optim = evaluated_weights_config(optim_cfg, eval_weights, raw=EVAL_WEIGHTS[0])
        super().__init__(generator, disback.loss, cfg, generator_optim, global_batch_size, seed=seed,
                         extra_nets={"fake": fake, "target": target}, groups=groups,
                         optim_cfgs={"velocity": generator_optim, "fake": fake_optim_cfg or optim_cfg}, **kw)
        self.fake, self.target, self.eval_weights = fake, target, eval_weights
        target.trainable = False
        self.target_node = None  # host-side: the node whose weights the target holds

    @property
    def nets(self) -> Nets:
        return Nets(velocity=self.net, teacher=self.target, extra={"fake": self.fake})

    def is_generator_step(self, step):
        """True on the last step of every group of fake_updates_per_generator steps (0-based step k)."""
        k = tf.cast(step, tf.int64) + 1
        return tf.equal(tf.math.floormod(k, self.objective_cfg.fake_updates_per_generator), 0)

    def active_groups(self, step):
        return {"velocity": self.is_generator_step(step)}

    def losses_and_grads(self, batch, step, replica_id, num_replicas):
        """The generator + fake losses on generator steps, the fake network's alone on the others. Each kind of
        step is its own XLA computation and the choice a graph cond around them: one XLA computation holding
        the cond ran 12x slower on CPU (5 vs 59 img/s, quickstart network, batch 64)."""
        generator_step, fake_step = self.objective_step(disback.loss), self.objective_step(disback.fake_loss)
        return tf.cond(self.is_generator_step(step), lambda: generator_step(batch, step, replica_id, num_replicas),
                       lambda: fake_step(batch, step, replica_id, num_replicas))

    def step_kinds(self):
        """One generator step per `fake_updates_per_generator` steps, fake-only steps the others."""
        ratio = self.objective_cfg.fake_updates_per_generator
        return [(disback.loss, 1)] + ([(disback.fake_loss, ratio - 1)] if ratio > 1 else [])

    def set_target(self, path, node: int) -> str:
        """Loads node `node` of `path` (a cud_tf.disback_path.DegradationPath) into the target network (verified
        against the manifest); returns its fingerprint."""
        sha256 = path.load_node(node, self.target)
        self.target_node = node
        return sha256

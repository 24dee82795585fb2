"""The keras.Model whose one `train_step` serves every objective.

It reduces the objective's per-example losses per optimizer group to each replica's share of the global-batch
mean (the arithmetic of `tf.nn.compute_average_loss`), all-reduces the gradients once, checks that they are
finite, clips them by global norm, applies them with AdamW (whose `use_ema` keeps the EMA of the weights) and
returns per-replica metric contributions that the training loop sums across replicas. Under the mixed_float16
policy each group's AdamW is wrapped in Keras' LossScaleOptimizer (dynamic loss scaling): the step scales each
loss by its group's scale, all-reduces, checks and clips the scaled gradients, and the LossScaleOptimizer unscales
them in `apply`.

What a method adds goes through public hooks, never through the step itself (docs/architecture.md):
`prepare_step()` before the losses and `finish_step(applied)` after the update (both in cross-replica
context, where mirrored variables may be assigned), `active_groups(step)` for optimizer groups updated on
some steps only, and `losses_and_grads(...)` for a method that chooses between objectives per step.
"""
import dataclasses
import functools
from typing import Callable, Dict, Optional

import keras
import tensorflow as tf

from cud_tf import interpolants
from cud_tf.networks.unet import VelocityUNet, checkpoint_variables
from cud_tf.objectives.common import Nets


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimisation of one optimizer group."""

    learning_rate: float = 2e-4
    warmup_steps: int = 0
    ema_decay: float = 0.9999
    grad_clip: float = 0.0  # global-norm clipping; 0 = off
    weight_decay: float = 0.0
    beta_1: float = 0.9
    beta_2: float = 0.999


class ReducedAdamW(keras.optimizers.Adam):
    """AdamW (Keras' Adam with decoupled `weight_decay`, as keras.optimizers.AdamW is) for gradients that the model
    has already summed over replicas (it all-reduces once itself, so that clipping, the gradient norm and the
    finite check see the global-batch gradient). Unlike keras.optimizers.AdamW it takes weight_decay=None, which
    skips the decay update: Keras traces and runs one per variable for any other value, 0.0 included."""

    def _all_reduce_sum_gradients(self, grads_and_vars):
        return list(grads_and_vars)


def make_optimizer(cfg: OptimConfig, use_ema=True, name=None):
    """AdamW with a linear warm-up to `learning_rate` (Keras' CosineDecay with alpha=1 is warm-up then flat)."""
    lr = cfg.learning_rate
    if cfg.warmup_steps > 0:
        lr = keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=0.0, decay_steps=1, alpha=1.0, warmup_target=cfg.learning_rate,
            warmup_steps=cfg.warmup_steps)
    return ReducedAdamW(learning_rate=lr, weight_decay=cfg.weight_decay or None, beta_1=cfg.beta_1,
                        beta_2=cfg.beta_2, use_ema=use_ema, ema_momentum=cfg.ema_decay, name=name)


LOSS_SCALE_INITIAL = 2.0 ** 15  # mixed_float16: Keras' LossScaleOptimizer's initial scale ...
LOSS_SCALE_GROWTH_STEPS = 2000  # ... doubled after this many finite steps in a row


def make_group_optimizer(cfg: OptimConfig, name=None, loss_scaling=False):
    """`make_optimizer(cfg)`, wrapped in Keras' dynamic `LossScaleOptimizer` when `loss_scaling` (mixed_float16).
    The wrapper is checkpointed around the AdamW (`inner_optimizer/...`), so float32 and bf16 checkpoints keep the
    bare AdamW's layout."""
    opt = make_optimizer(cfg, name=name)
    if loss_scaling:
        opt = keras.optimizers.LossScaleOptimizer(opt, initial_scale=LOSS_SCALE_INITIAL,
                                                  dynamic_growth_steps=LOSS_SCALE_GROWTH_STEPS,
                                                  name=f"loss_scale_{name}" if name else None)
    return opt


def is_loss_scaled(optimizer) -> bool:
    return isinstance(optimizer, keras.optimizers.LossScaleOptimizer)


def inner_optimizer(optimizer):
    """The AdamW itself: `optimizer`, or the one that a LossScaleOptimizer wraps."""
    return optimizer.inner_optimizer if is_loss_scaled(optimizer) else optimizer


def evaluated_weights_config(cfg: OptimConfig, eval_weights: str, raw: str) -> OptimConfig:
    """`cfg` for the group whose optimizer's EMA slots hold what samples, the evaluator, checkpoints' EMA weights
    and export read: `eval_weights` = `raw` (the network's own weights: EMA momentum 0, so that Keras'
    `ema = m ema + (1 - m) theta` is theta after every update) or "ema" (their EMA with `cfg.ema_decay`)."""
    if eval_weights not in (raw, "ema"):
        raise ValueError(f"eval_weights must be {raw!r} or 'ema', got {eval_weights!r}")
    return dataclasses.replace(cfg, ema_decay=0.0) if eval_weights == raw else cfg


def ema_variables(optimizer):
    """The EMA copies that Keras' optimizer keeps (`use_ema=True`), in the order of its variables (the inner
    AdamW's under a LossScaleOptimizer). Keras' own SwapEMAWeights callback reads the same attribute."""
    return inner_optimizer(optimizer)._model_variables_moving_average


def copy_weights(source, target):
    """Assigns the weights of one variable list to another of the same architecture (same shapes, order)."""
    src, dst = list(source), list(target)
    if len(src) != len(dst) or any(a.shape != b.shape for a, b in zip(src, dst)):
        raise ValueError("cannot copy weights between networks of different architectures")
    for a, b in zip(src, dst):
        b.assign(a)


def clone_network(net: VelocityUNet, name):
    """A structurally identical network (for EMA weights, teachers, targets), with its variables built."""
    return VelocityUNet(net.config, name=name).build_variables()


class DiffusionModel(keras.Model):
    """Holds the networks, one AdamW per optimizer group, the EMA network, and the step counter.

    `objective(nets, batch, rng, step, cfg) -> LossOutput`; groups maps an optimizer group name to the
    variables it trains (default: {"velocity": velocity net + noise encoder}). With `jit_compile` (None: chosen
    by measurement when training starts, cud_tf.execution) the
    objective and its gradients (every network pass of a step) run as one XLA computation per replica; the
    all-reduce, clipping and update stay outside it.
    """

    def __init__(self, net: VelocityUNet, objective: Callable, objective_cfg, optim_cfg: OptimConfig,
                 global_batch_size: int, seed: int = 0, encoder: Optional[VelocityUNet] = None,
                 extra_nets: Optional[Dict[str, VelocityUNet]] = None, groups: Optional[Dict[str, list]] = None,
                 optim_cfgs: Optional[Dict[str, OptimConfig]] = None, jit_compile: Optional[bool] = False, **kw):
        super().__init__(**kw)
        self.net, self.encoder = net, encoder
        self.objective, self.objective_cfg = objective, objective_cfg
        self.global_batch_size, self.seed, self.xla = global_batch_size, seed, jit_compile
        self._objective_steps = {}
        self.ema_net = clone_network(net, "ema_net")
        self._ema_targets = list(self.ema_net.trainable_variables)  # before freezing: then the list is empty
        self.ema_net.trainable = False
        self.extra_nets = extra_nets or {}
        if groups is None:
            groups = {"velocity": net.trainable_variables + (encoder.trainable_variables if encoder else [])}
        self.group_vars = groups
        optim_cfgs = optim_cfgs or {g: optim_cfg for g in groups}
        # mixed_float16: Keras' LossScaleOptimizer around each group's AdamW (its own dynamic scale).
        loss_scaling = keras.mixed_precision.global_policy().name == "mixed_float16"
        self.optimizers_by_group = {g: make_group_optimizer(optim_cfgs[g], name=f"adamw_{g}",
                                                            loss_scaling=loss_scaling) for g in groups}
        self.clip_norms = {g: optim_cfgs[g].grad_clip for g in groups}
        for g, opt in self.optimizers_by_group.items():
            opt.build(self.group_vars[g])  # in scope, so that a restore finds the slots and the EMA
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step",
                                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        self.skipped_updates = tf.Variable(0, dtype=tf.int64, trainable=False, name="skipped_updates",
                                           aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)

    def loss_scale(self, group) -> Optional[tf.Tensor]:
        """The current dynamic loss scale of `group`'s LossScaleOptimizer (mixed_float16), else None."""
        opt = self.optimizers_by_group[group]
        return tf.convert_to_tensor(opt.dynamic_scale) if is_loss_scaled(opt) else None

    @property
    def nets(self) -> Nets:
        return Nets(velocity=self.net, catchup=self.ema_net, encoder=self.encoder, extra=self.extra_nets)

    def trackables(self):
        """What a checkpoint must hold for an exact resume (weights, optimizers with EMA, step, dropout RNG)."""
        items = dict(net=checkpoint_variables(self.net), step=self.step, skipped_updates=self.skipped_updates)
        if self.encoder is not None:
            items["encoder"] = checkpoint_variables(self.encoder)
        for name, n in self.extra_nets.items():
            items[f"net_{name}"] = checkpoint_variables(n)
        for g, opt in self.optimizers_by_group.items():
            items[f"optimizer_{g}"] = opt  # under mixed_float16 its LossScaleOptimizer (scale, counter, AdamW)
        return items

    def sync_ema(self):
        """Copies the optimizer's EMA of the velocity net into `ema_net` (for sampling, export, catch-up=ema)."""
        opt = self.optimizers_by_group["velocity"]
        averages = ema_variables(opt)[:len(self.net.trainable_variables)]
        for target, avg in zip(self._ema_targets, averages, strict=True):
            target.assign(avg)

    def train_step(self, batch):
        """One update on this replica's part of the global batch.

        batch: {"image": `[b, H, W, C]`, "label": `[b]`}. Returns {name: scalar} contributions that sum to
        the global-batch mean across replicas.
        """
        ctx = tf.distribute.get_replica_context()
        n = ctx.num_replicas_in_sync
        step = tf.identity(self.step)
        ctx.merge_call(lambda _: self.prepare_step())  # mirrored variables are assigned in cross-replica context
        replica_id = tf.cast(ctx.replica_id_in_sync_group, tf.int32)
        metrics, local_grads = self.losses_and_grads(batch, step, replica_id, n)
        grads, finite = {}, tf.constant(True)
        for g, local in local_grads.items():
            grads[g] = ctx.all_reduce(tf.distribute.ReduceOp.SUM, local)  # the global-batch gradient
            norm, clip = tf.linalg.global_norm(grads[g]), self.clip_norms[g]
            finite = tf.logical_and(finite, tf.math.is_finite(norm))
            scale = self.loss_scale(g)
            if scale is not None:  # scaled gradients (the LossScaleOptimizer unscales them): so are norm and clip
                metrics[f"grad_norm_{g}"] = norm / scale / n
                clip = clip * scale
            else:
                metrics[f"grad_norm_{g}"] = norm / n
            if self.clip_norms[g] > 0:
                grads[g], _ = tf.clip_by_global_norm(grads[g], clip, use_norm=norm)
        self._apply_if_finite(finite, grads, self.active_groups(step))
        self.step.assign_add(1)
        ctx.merge_call(lambda dist, f: self.finish_step(dist.experimental_local_results(f)[0]), args=(finite,))
        metrics["nonfinite"] = (1.0 - tf.cast(finite, tf.float32)) / n
        for g, opt in self.optimizers_by_group.items():
            metrics[f"lr_{g}"] = tf.cast(opt.learning_rate, tf.float32) / n
        return metrics

    # -- Hooks for what a method adds (the defaults add nothing). --------------------------------------------

    def prepare_step(self):
        """Before the losses of every step, in cross-replica context: e.g. targets to refresh (CUD's catch-up
        EMA, TRACT's teacher at a phase boundary)."""
        return None

    def finish_step(self, applied):
        """After every step (`self.step` already counts it), in cross-replica context; `applied`: bool tensor,
        false when the update was skipped for a non-finite gradient. E.g. EMAs of the student."""
        return None

    def active_groups(self, step) -> Dict[str, tf.Tensor]:
        """{group: bool scalar} for groups updated only on some steps (default: every group, every step)."""
        del step
        return {}

    def losses_and_grads(self, batch, step, replica_id, num_replicas):
        """This replica's metric contributions {name: scalar} and local gradients {group: [grad per variable]}
        for `self.objective`. A method that picks its objective per step overrides this and calls
        `objective_step(objective)` for each choice."""
        return self.objective_step(self.objective)(batch, step, replica_id, num_replicas)

    def step_kinds(self):
        """[(objective, weight)]: the objectives of this model's steps and how many steps in `sum(weights)` each
        takes, which is what `cud_tf.execution.choose_xla` times (default: `self.objective` on every step)."""
        return [(self.objective, 1)]

    def objective_step(self, objective, xla=None):
        """`(batch, step, replica_id, num_replicas) -> (metrics, grads)` for `objective`: one XLA computation
        per replica when `xla` (default: the model's choice, `self.xla`), built once per objective and mode."""
        xla = self.xla if xla is None else xla
        if (objective, xla) not in self._objective_steps:
            fn = functools.partial(self._compute_losses_and_grads, objective)
            self._objective_steps[objective, xla] = tf.function(fn, jit_compile=True) if xla else fn
        return self._objective_steps[objective, xla]

    # -- The step itself. --------------------------------------------------------------------------------------

    def replica_share(self, per_example):
        """This replica's share of the global-batch mean of `per_example` `[b]`: sum / global batch size, the
        arithmetic of `tf.nn.compute_average_loss` without its run-time asserts on the (Python int) batch size,
        which XLA drops with a warning per loss term."""
        per_example = tf.convert_to_tensor(per_example)
        return tf.math.divide_no_nan(tf.reduce_sum(per_example),
                                     tf.cast(self.global_batch_size, per_example.dtype))

    def _compute_losses_and_grads(self, objective, batch, step, replica_id, num_replicas):
        """A group without a loss in the objective's output gets zero gradients."""
        rng = interpolants.Rng(interpolants.fold_seed(self.seed, step), replica_id, num_replicas)
        with tf.GradientTape(persistent=len(self.group_vars) > 1) as tape:
            out = objective(self.nets, batch, rng, step, self.objective_cfg)
            losses = {g: self.replica_share(tf.cast(v, tf.float32)) for g, v in out.per_example.items()}
            # mixed_float16: scaled before the gradient; the group's LossScaleOptimizer unscales in apply.
            losses = {g: self.optimizers_by_group[g].scale_loss(v) if is_loss_scaled(self.optimizers_by_group[g])
                      else v for g, v in losses.items()}
        metrics = {k: self.replica_share(tf.cast(v, tf.float32)) for k, v in out.metrics.items()}
        grads = {}
        for g, variables in self.group_vars.items():
            local = tape.gradient(losses[g], variables) if g in losses else [None] * len(variables)
            grads[g] = [tf.zeros_like(v) if gr is None else gr for gr, v in zip(local, variables)]
        del tape
        return metrics, grads

    def _apply_if_finite(self, finite, grads, active):
        """Applies the update of every group that is active this step (`active`: {group: bool}, default all),
        or none when a gradient is not finite (counted in skipped_updates).

        Under mixed_float16 a finite step calls each active group's LossScaleOptimizer, which unscales, applies its
        AdamW (and EMA) and grows its scale after `dynamic_growth_steps` finite steps; a skipped step lowers the
        scale of each group that was due as the LossScaleOptimizer's own non-finite branch does (halved, no
        floor; growth counter reset), and never touches the AdamW or the EMA.

        The conds run in cross-replica context, as Keras' LossScaleOptimizer does, because the optimizer's
        apply calls merge_call; the applies run in replica context (call_for_each_replica), as
        LossScaleOptimizer.apply requires."""
        def cross_replica(distribution, finite_, grads_, active_):
            first = lambda x: distribution.experimental_local_results(x)[0]  # noqa: E731

            def for_due_groups(fn, groups):
                for g in groups:
                    if g in active_:
                        tf.cond(first(active_[g]), lambda g=g: fn(g), lambda: None)
                    else:
                        fn(g)

            def apply_group(g):
                def apply(grads__):
                    self.optimizers_by_group[g].apply_gradients(zip(grads__[g], self.group_vars[g]))
                distribution.extended.call_for_each_replica(apply, args=(grads_,))

            def lower_scale(g):  # LossScaleOptimizer's non-finite branch, through its public variables
                opt = self.optimizers_by_group[g]
                opt.step_counter.assign(0)
                opt.dynamic_scale.assign(opt.dynamic_scale * 0.5)

            def skip():
                self.skipped_updates.assign_add(1)
                for_due_groups(lower_scale, [g for g, o in self.optimizers_by_group.items() if is_loss_scaled(o)])

            # Every replica computed the same flags from all-reduced gradients and the step: take the first.
            tf.cond(first(finite_), lambda: for_due_groups(apply_group, self.optimizers_by_group), skip)

        tf.distribute.get_replica_context().merge_call(cross_replica, args=(finite, grads, active))

"""Catch-Up Distillation and its rectified-flow baseline: `python -m trainers.cud --flagfile=configs/...`."""
import os

from absl import app, flags

from trainers import common

FLAGS = flags.FLAGS


def define_flags():
    common.define_flags()
    t, d = common._track, flags
    t(d.DEFINE_enum, "method", "cud", ["cud", "rf"], "cud: Catch-Up Distillation; rf: rectified flow (no catch-up).")
    t(d.DEFINE_integer, "cud_order", 1, "Catch-up order K (RK order of the targets, and heads g_1..g_K).",
      lower_bound=1, upper_bound=4)
    t(d.DEFINE_string, "cud_tableau", "", "Butcher tableau of the catch-up slope ('' = the standard one of order "
      "K; 'reference3' = the reference code's K=3 slope).")
    t(d.DEFINE_enum, "cud_step", "uniform", ["origin", "uniform", "rule"],
      "Step size h: origin 1/TN, uniform U(0, 1/TN), rule t/TN.")
    t(d.DEFINE_integer, "cud_grid_steps", 16, "TN, the sampling grid of the catch-up steps.", lower_bound=1)
    t(d.DEFINE_enum, "cud_catchup_model", "train", ["train", "ema"], "Weights that compute the catch-up targets.")
    t(d.DEFINE_boolean, "cud_reuse_k1", False, "With --cud_catchup_model=train and dropout: take the catch-up "
      "slope's first stage from the prediction pass (its dropout mask) instead of a separate pass; saves one "
      "forward pass of the batch. Without dropout the two are identical and the pass is always reused.")
    t(d.DEFINE_float, "cud_w_kd", 1.0, "Weight of the catch-up (distillation) term.", lower_bound=0.0)
    t(d.DEFINE_float, "cud_w_gt", 1.0, "Weight of the ground-truth term.", lower_bound=0.0)
    t(d.DEFINE_boolean, "cud_adaptive_weights", False, "w_kd = 2k/I, w_gt = 2(1 - k/I) over the I iterations.")
    t(d.DEFINE_enum, "distance", "mse", ["mse", "pseudo_huber"], "Distance of every loss term.")
    t(d.DEFINE_boolean, "noise_encoder", False, "Reparameterised noise encoder q_psi with a KL term.")
    t(d.DEFINE_float, "kl_beta", 20.0, "Weight beta of the noise encoder's KL term.", lower_bound=0.0)


def objective_config(num_classes):
    from cud_tf import solvers
    from cud_tf.objectives import ObjectiveConfig
    if FLAGS.cud_tableau and FLAGS.cud_tableau not in solvers.TABLEAUX:
        raise flags.ValidationError(
            f"--cud_tableau={FLAGS.cud_tableau} is unknown; expected '' or one of {sorted(solvers.TABLEAUX)}")
    return ObjectiveConfig(
        order=FLAGS.cud_order if FLAGS.method == "cud" else 1, tableau=FLAGS.cud_tableau,
        step_strategy=FLAGS.cud_step, num_grid_steps=FLAGS.cud_grid_steps, catchup_model=FLAGS.cud_catchup_model,
        reuse_k1=FLAGS.cud_reuse_k1,
        w_kd=FLAGS.cud_w_kd, w_gt=FLAGS.cud_w_gt, adaptive_weights=FLAGS.cud_adaptive_weights,
        total_steps=FLAGS.train_steps, distance=FLAGS.distance, beta=FLAGS.kl_beta,
        label_dropout=FLAGS.label_dropout if num_classes else 0.0)


def run():
    """Builds everything from the flags and trains; returns the last metrics."""
    import keras
    import tensorflow as tf

    from cud_tf import data, solvers, training
    from cud_tf.model import DiffusionModel
    from cud_tf.networks.unet import VelocityUNet, noise_encoder_config
    from cud_tf.objectives import OBJECTIVES

    if not FLAGS.run_dir:
        raise flags.ValidationError("--run_dir is required (where checkpoints, events and samples go)")
    num_heads = FLAGS.cud_order if FLAGS.method == "cud" else 1
    if FLAGS.sample_head > num_heads:
        raise flags.ValidationError(f"--sample_head={FLAGS.sample_head} but the network has {num_heads} head(s)")
    solvers.get_tableau(FLAGS.sample_method)

    tf.config.experimental.enable_op_determinism()
    keras.mixed_precision.set_global_policy(FLAGS.precision)
    strategy = training.make_strategy(FLAGS.strategy)
    dcfg = common.data_config()
    shape = data.image_shape(dcfg)
    num_classes = data.num_classes(dcfg) if FLAGS.num_classes == -1 else FLAGS.num_classes
    net_cfg = common.network_config(shape, num_heads=num_heads, num_classes=num_classes)
    data.get_builder(dcfg)  # fails fast, with a message, when the data set is not prepared
    if FLAGS.global_batch_size % strategy.num_replicas_in_sync:
        raise flags.ValidationError(f"--global_batch_size={FLAGS.global_batch_size} is not divisible by the "
                                    f"{strategy.num_replicas_in_sync} replicas")
    obj_cfg = objective_config(num_classes)
    arch = common.arch_dict(net_cfg, FLAGS.noise_encoder)
    common.prepare_run_dir(FLAGS.run_dir, arch, training.is_chief(strategy))

    keras.utils.set_random_seed(FLAGS.seed)
    with strategy.scope():
        net = VelocityUNet(net_cfg, name="velocity").build_variables()
        encoder = VelocityUNet(noise_encoder_config(net_cfg), name="encoder").build_variables() if (
            FLAGS.noise_encoder) else None
        model = DiffusionModel(net, OBJECTIVES[FLAGS.method], obj_cfg, common.optim_config(),
                               global_batch_size=FLAGS.global_batch_size, seed=FLAGS.seed, encoder=encoder,
                               nonfinite=FLAGS.nonfinite, jit_compile=FLAGS.jit_compile)
    tf.random.set_seed(None)  # the seed fixed the initial weights; the data stream depends on --seed alone
    metrics = training.train(
        model, strategy,
        lambda start: data.distribute(strategy, dcfg, FLAGS.global_batch_size, FLAGS.seed, start_batch=start),
        common.loop_config(), arch, shape)
    if os.environ.get("CUD_TF_DUMP_WEIGHTS"):
        common.dump_weights(model, os.environ["CUD_TF_DUMP_WEIGHTS"])
    return metrics


def main(argv):
    from cud_tf.data import DataNotPreparedError
    from cud_tf.training import TrainingError
    common.run_or_fail(argv, run, TrainingError, DataNotPreparedError)


if __name__ == "__main__":
    define_flags()
    app.run(main)

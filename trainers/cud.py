"""Catch-Up Distillation and its rectified-flow baseline: `python -m trainers.cud --flagfile=configs/...`."""
import os

from absl import flags

from trainers import common

FLAGS = flags.FLAGS


def define_flags():
    from cud_tf import solvers
    from cud_tf.objectives import ObjectiveConfig as C

    common.define_flags()
    d, dv = flags, common.default
    common.define(d.DEFINE_enum, "method", "cud", ["cud", "rf"],
                  "cud: Catch-Up Distillation; rf: rectified flow (no catch-up).")
    common.define(d.DEFINE_integer, "cud_order", dv(C, "order"), "Catch-up order K (RK order of the targets, and "
                  "heads g_1..g_K).", lower_bound=1, upper_bound=4)
    common.define(d.DEFINE_enum, "cud_tableau", dv(C, "tableau"), ["", *sorted(solvers.TABLEAUX)],
                  "Butcher tableau of the catch-up slope ('' = the standard one of order K; 'reference3' = the "
                  "reference code's K=3 slope).")
    common.define(d.DEFINE_enum, "cud_step", dv(C, "step_strategy"), ["origin", "uniform", "rule"],
                  "Step size h: origin 1/TN, uniform U(0, 1/TN), rule t/TN.")
    common.define(d.DEFINE_integer, "cud_grid_steps", dv(C, "num_grid_steps"), "TN, the sampling grid of the "
                  "catch-up steps.", lower_bound=1)
    common.define(d.DEFINE_enum, "cud_catchup_model", dv(C, "catchup_model"), ["train", "ema"],
                  "Weights that compute the catch-up targets.")
    common.define(d.DEFINE_boolean, "cud_reuse_k1", dv(C, "reuse_k1"), "With --cud_catchup_model=train and "
                  "dropout: take the catch-up slope's first stage from the prediction pass (its dropout mask) "
                  "instead of a separate pass. Without dropout the two are identical and the pass is always reused.")
    common.define(d.DEFINE_float, "cud_w_kd", dv(C, "w_kd"), "Weight of the catch-up (distillation) term.",
                  lower_bound=0.0)
    common.define(d.DEFINE_float, "cud_w_gt", dv(C, "w_gt"), "Weight of the ground-truth term.", lower_bound=0.0)
    common.define(d.DEFINE_boolean, "cud_adaptive_weights", dv(C, "adaptive_weights"),
                  "w_kd = 2k/I, w_gt = 2(1 - k/I) over the I iterations.")
    common.define(d.DEFINE_enum, "distance", dv(C, "distance"), ["mse", "pseudo_huber"], "Distance of every loss "
                  "term.")
    common.define(d.DEFINE_boolean, "noise_encoder", False, "Reparameterised noise encoder q_psi with a KL term.")
    common.define(d.DEFINE_float, "kl_beta", dv(C, "beta"), "Weight beta of the noise encoder's KL term.",
                  lower_bound=0.0)


def objective_config(num_classes):
    from cud_tf.objectives import ObjectiveConfig
    return ObjectiveConfig(
        order=FLAGS.cud_order if FLAGS.method == "cud" else 1, tableau=FLAGS.cud_tableau,
        step_strategy=FLAGS.cud_step, num_grid_steps=FLAGS.cud_grid_steps, catchup_model=FLAGS.cud_catchup_model,
        reuse_k1=FLAGS.cud_reuse_k1, w_kd=FLAGS.cud_w_kd, w_gt=FLAGS.cud_w_gt,
        adaptive_weights=FLAGS.cud_adaptive_weights,
        # The iteration count shapes the objective only through the adaptive schedule.
        total_steps=FLAGS.train_steps if FLAGS.cud_adaptive_weights else 1,
        distance=FLAGS.distance, beta=FLAGS.kl_beta, label_dropout=FLAGS.label_dropout if num_classes else 0.0)


def network_config():
    """The UNetConfig this trainer builds from the flags: the data set's image shape, its classes for
    --num_classes=-1, one head per catch-up order (one for rectified flow)."""
    from cud_tf import data
    dcfg = common.data_config()
    num_classes = data.num_classes(dcfg) if FLAGS.num_classes == -1 else FLAGS.num_classes
    return common.network_config(data.image_shape(dcfg), num_heads=FLAGS.cud_order if FLAGS.method == "cud" else 1,
                                 num_classes=num_classes)


def run():
    """Builds everything from the flags and trains; returns the last metrics."""
    import keras
    import tensorflow as tf

    from cud_tf import data, training
    from cud_tf.models.cud import CudModel
    from cud_tf.networks.unet import VelocityUNet, noise_encoder_config
    from cud_tf.objectives import OBJECTIVES

    common.require(run_dir=FLAGS.run_dir)
    net_cfg = network_config()
    if FLAGS.sample_head > net_cfg.num_heads:
        raise flags.ValidationError(f"--sample_head={FLAGS.sample_head} but the network has {net_cfg.num_heads} "
                                    "head(s)")
    dcfg = common.data_config()
    shape, num_classes = net_cfg.image_shape, net_cfg.num_classes
    data.get_builder(dcfg)  # fails fast, with a message, when the data set is not prepared
    obj_cfg = objective_config(num_classes)
    arch = common.arch_dict(net_cfg, FLAGS.noise_encoder)
    strategy = common.runtime(net_cfg)  # resolves --precision=auto before the run is recorded
    config = common.recorded_config("cud", net_cfg, method=FLAGS.method, objective=obj_cfg,
                                    noise_encoder=FLAGS.noise_encoder)
    with common.claimed_run_dir(arch, config, training.is_chief(strategy)):
        keras.utils.set_random_seed(FLAGS.seed)
        with strategy.scope():
            net = VelocityUNet(net_cfg, name="velocity").build_variables()
            encoder = VelocityUNet(noise_encoder_config(net_cfg), name="encoder").build_variables() if (
                FLAGS.noise_encoder) else None
            model = CudModel(net, OBJECTIVES[FLAGS.method], obj_cfg, common.optim_config(),
                             global_batch_size=FLAGS.global_batch_size, seed=FLAGS.seed, encoder=encoder,
                             jit_compile=FLAGS.jit_compile)
        tf.random.set_seed(None)  # the seed fixed the initial weights; the data stream depends on --seed alone
        metrics = training.train(
            model, strategy,
            lambda start: data.distribute(strategy, dcfg, FLAGS.global_batch_size, FLAGS.seed, start_batch=start),
            common.loop_config(), arch, shape,
            on_step=common.with_evaluation(model, shape, training.is_chief(strategy)))
    if os.environ.get("CUD_TF_DUMP_WEIGHTS"):
        common.dump_weights(model, os.environ["CUD_TF_DUMP_WEIGHTS"])
    return metrics


def main(argv):
    from cud_tf.data import DataNotPreparedError
    common.run_or_fail(argv, run, DataNotPreparedError)


def cli():
    common.cli(define_flags, main)


if __name__ == "__main__":
    cli()

"""Additional one-step training of a CUD model ("two-session", docs/onestep.md):
`python -m trainers.onestep --init_run_dir=runs/mnist_quick --flagfile=configs/mnist_onestep.cfg`.

From the CUD run's EMA weights: stored N-step Euler trajectories (cud_tf/onestep.py), one training stage per
step m of --onestep_stages, and the student fitted with a pull towards f_EMA, a moving EMA of the student
(cud_tf/models/onestep.py). The run directory holds the teacher's network (arch.json), so `trainers.evaluate`
evaluates it like any other run.
"""
import dataclasses
import os

from absl import flags

from trainers import common

FLAGS = flags.FLAGS


def define_flags():
    common.define_flags()
    t, d = common.define, flags
    t(d.DEFINE_string, "init_run_dir", None, "CUD run whose EMA weights start the student and f_EMA.")
    t(d.DEFINE_list, "onestep_stages", ["8", "11", "14"], "Steps m (of --onestep_grid_steps) whose x0_hat are the "
      "targets; one training stage per m, in this order.")
    t(d.DEFINE_list, "onestep_stage_steps", [], "Iterations of each stage (one value per stage, or one for all), "
      "as the reference counts them; sets --train_steps to their sum. Empty: --train_steps split evenly.")
    t(d.DEFINE_integer, "onestep_grid_steps", 16, "N, the Euler steps of the stored trajectories.", lower_bound=1)
    t(d.DEFINE_integer, "onestep_num_pairs", 50000, "Stored trajectories (noise z and its targets).", lower_bound=1)
    t(d.DEFINE_float, "onestep_reg_weight", 0.1, "Weight of ||f(z,1) - f_EMA(z,1)||^2.", lower_bound=0.0)
    t(d.DEFINE_float, "onestep_f_ema_decay", 0.9999, "Decay of f_EMA, the EMA of the student updated after every "
      "update (1: frozen at the CUD EMA weights).", lower_bound=0.0, upper_bound=1.0)
    t(d.DEFINE_enum, "onestep_eval_weights", "student", ["student", "ema"], "Weights that samples, evaluation and "
      "export read: the raw student (as the reference), or its EMA with --ema_decay.")
    t(d.DEFINE_integer, "onestep_head", 1, "Head g_k of the one-step map that is trained and evaluated.",
      lower_bound=1)
    t(d.DEFINE_integer, "onestep_trajectory_head", 0, "Head that drives the stored trajectories (0: "
      "--onestep_head).", lower_bound=0)
    t(d.DEFINE_integer, "onestep_gen_batch", 500, "Batch of the trajectory generation.", lower_bound=1)


def check_flags():
    """Validates the one-step flags; returns (stages, stage end steps); with --onestep_stage_steps the last end
    replaces --train_steps."""
    from cud_tf import onestep
    common.require(run_dir=FLAGS.run_dir, init_run_dir=FLAGS.init_run_dir)
    if os.path.abspath(FLAGS.run_dir) == os.path.abspath(FLAGS.init_run_dir):
        raise flags.ValidationError("--run_dir must differ from --init_run_dir (the CUD run stays untouched)")
    stages = common.int_list(FLAGS.onestep_stages, "onestep_stages")
    if not stages or not all(1 <= m <= FLAGS.onestep_grid_steps for m in stages):
        raise flags.ValidationError(
            f"--onestep_stages={FLAGS.onestep_stages} must lie in 1..{FLAGS.onestep_grid_steps}")
    stage_steps = common.int_list(FLAGS.onestep_stage_steps, "onestep_stage_steps")
    try:
        bounds = onestep.stage_bounds(len(stages), FLAGS.train_steps, stage_steps)
    except ValueError as e:
        raise flags.ValidationError(f"--onestep_stage_steps / --train_steps: {e}") from None
    return stages, bounds


def run(log=print):
    """Builds everything from the flags and trains stage after stage; returns the last metrics."""
    from cud_tf import onestep, training
    from cud_tf import run_dir as run_dir_lib
    from cud_tf.models.onestep import build_onestep_model
    from cud_tf.objectives.onestep import OnestepConfig

    stages, bounds = check_flags()
    init = run_dir_lib.load_run(FLAGS.init_run_dir)  # EMA weights
    cfg = init.config
    traj_head = FLAGS.onestep_trajectory_head or FLAGS.onestep_head
    for name, head in (("onestep_head", FLAGS.onestep_head), ("onestep_trajectory_head", traj_head)):
        if head > cfg.num_heads:
            raise flags.ValidationError(f"--{name}={head} but {FLAGS.init_run_dir} has {cfg.num_heads} head(s)")
    strategy = common.runtime(cfg, log)
    objective = OnestepConfig(reg_weight=FLAGS.onestep_reg_weight, head=FLAGS.onestep_head)
    arch = common.arch_dict(cfg, encoder=False)
    config = dict(common.recorded_config(  # the data set is the teacher's: the evaluator compares with it
        "onestep", cfg, objective=objective, stages=stages, stage_ends=bounds, grid_steps=FLAGS.onestep_grid_steps,
        num_pairs=FLAGS.onestep_num_pairs, trajectory_head=traj_head, f_ema_decay=FLAGS.onestep_f_ema_decay,
        eval_weights=FLAGS.onestep_eval_weights, init=dict(run_dir=os.path.abspath(FLAGS.init_run_dir),
                                                           checkpoint=os.path.basename(init.checkpoint))),
        dataset=init.run_config.get("dataset", FLAGS.dataset))
    with common.claimed_run_dir(arch, config, training.is_chief(strategy)):
        pairs = onestep.load_or_generate(
            os.path.join(FLAGS.run_dir, onestep.TRAJECTORIES), init.net, os.path.abspath(FLAGS.init_run_dir),
            cfg.image_shape, stages, FLAGS.onestep_grid_steps, FLAGS.onestep_num_pairs, head=traj_head,
            seed=FLAGS.seed, batch_size=FLAGS.onestep_gen_batch, log=log)
        model = build_onestep_model(
            strategy, cfg, init.net.get_weights(), objective, common.optim_config(),
            global_batch_size=FLAGS.global_batch_size, seed=FLAGS.seed, f_ema_decay=FLAGS.onestep_f_ema_decay,
            eval_weights=FLAGS.onestep_eval_weights, jit_compile=FLAGS.jit_compile)
        loop = dataclasses.replace(common.loop_config(), sample_head=FLAGS.onestep_head)
        metrics = {}
        for s, (begin, end) in enumerate(zip([0, *bounds[:-1]], bounds)):
            if int(model.step.numpy()) >= end:
                continue  # a resumed run: this stage is done
            log(f"stage {s + 1}/{len(stages)}: targets x0_hat at step {stages[s]} of {FLAGS.onestep_grid_steps}, "
                f"iterations {begin}..{end}")
            dist_dataset = lambda start, s=s, begin=begin: strategy.experimental_distribute_dataset(  # noqa: E731
                onestep.make_dataset(pairs, s, FLAGS.global_batch_size, FLAGS.seed, start - begin))
            metrics = training.train(
                model, strategy, dist_dataset, dataclasses.replace(loop, train_steps=end), arch, cfg.image_shape,
                log=log, on_step=common.with_evaluation(model, cfg.image_shape, training.is_chief(strategy)))
    return metrics


def main(argv):
    common.run_or_fail(argv, run)


def cli():
    common.cli(define_flags, main)


if __name__ == "__main__":
    cli()

"""DisBack of a trained velocity model into a one-step generator: `python -m trainers.disback --flagfile=...`.

Stage 1 (degradation recording) trains a copy of the teacher with the RF loss on samples of the frozen initial
generator G^0(z) = z - v_teacher(z, 1) and saves its weights every --disback_record_every steps: the path
s'_0 (the teacher) ... s'_N in <run_dir>/degradation/path (manifest.json lists the nodes in order).
Stage 2 (distribution backtracking) trains the generator (from the teacher) against a target that walks back
s'_{N-1} ... s'_0, while the fake network (from s'_N) keeps fitting the generator's samples. --disback_path=off
skips stage 1: the teacher is the target from the start and the fake starts from the teacher (plain
distribution matching, the paper's ablation). Both stages resume: rerun the same command.
The generator and fake take the teacher's architecture (the network flags are not used); --train_steps counts
stage-2 iterations (fake updates; the generator is updated every --disback_fake_updates of them).
Samples, `trainers.evaluate` and `trainers.export` read the raw generator (--disback_eval_weights=generator, the
reference's choice) or its EMA (--disback_eval_weights=ema, with --ema_decay); config.json records which.
"""
import dataclasses
import os

from absl import flags

from trainers import common

FLAGS = flags.FLAGS


def define_flags():
    from cud_tf.objectives.disback import DisbackConfig as C

    common.define_flags()
    t, d, dv = common.define, flags, common.default
    t(d.DEFINE_string, "disback_teacher_run_dir", None, "Run directory of the teacher (a CUD or RF run of this "
      "project); its EMA weights are the teacher, G^0 and the generator's initialisation.")
    t(d.DEFINE_enum, "disback_path", "on", ["on", "off"], "on: record the degradation path and backtrack along "
      "it; off: the teacher is the target from the start (plain distribution matching).")
    t(d.DEFINE_integer, "disback_num_nodes", 4, "N: path nodes after the teacher (stage 1 runs N * "
      "--disback_record_every steps).", lower_bound=1)
    t(d.DEFINE_integer, "disback_record_every", 100, "M: stage-1 steps between path nodes.", lower_bound=1)
    t(d.DEFINE_list, "disback_node_iterations", ["200"], "Stage-2 iterations with each target s'_{N-1}, ..., s'_1 "
      "(one value for all, or N-1 values); then the teacher s'_0 to the end.")
    t(d.DEFINE_integer, "disback_fake_updates", dv(C, "fake_updates_per_generator"),
      "Fake-network updates per generator update.", lower_bound=1)
    t(d.DEFINE_float, "disback_t_min", dv(C, "t_min"), "Smallest time of the distribution-matching gradient.",
      lower_bound=0.0, upper_bound=1.0)
    t(d.DEFINE_float, "disback_t_max", dv(C, "t_max"), "Largest time of the distribution-matching gradient.",
      lower_bound=0.0, upper_bound=1.0)
    t(d.DEFINE_float, "disback_guidance", dv(C, "guidance_scale"), "Classifier-free guidance scale w of the "
      "target (a class-conditional teacher; the generator learns the guided distribution); 1 = unguided.",
      lower_bound=0.0)
    t(d.DEFINE_enum, "disback_eval_weights", "generator", ["generator", "ema"], "Weights that samples, evaluation "
      "and export read: the raw generator (as the reference, which keeps no generator EMA), or its EMA with "
      "--ema_decay.")
    t(d.DEFINE_float, "disback_fake_learning_rate", None, "Learning rate of the fake network (default: "
      "--learning_rate).", lower_bound=0.0)


def disback_config(num_classes):
    from cud_tf.objectives.disback import DisbackConfig
    if FLAGS.disback_guidance != 1.0 and not num_classes:
        raise flags.ValidationError(f"--disback_guidance={FLAGS.disback_guidance} needs a class-conditional "
                                    "teacher; this teacher is unconditional (leave it at 1)")
    if FLAGS.disback_t_min >= FLAGS.disback_t_max:
        raise flags.ValidationError(f"--disback_t_min={FLAGS.disback_t_min} must be below "
                                    f"--disback_t_max={FLAGS.disback_t_max}")
    return DisbackConfig(t_min=FLAGS.disback_t_min, t_max=FLAGS.disback_t_max,
                         fake_updates_per_generator=FLAGS.disback_fake_updates, guidance_scale=FLAGS.disback_guidance,
                         head=FLAGS.sample_head, label_dropout=FLAGS.label_dropout if num_classes else 0.0)


def node_schedule():
    from cud_tf import disback_path as disback
    if FLAGS.disback_path == "off":
        return disback.node_schedule(0, [])
    iters = common.int_list(FLAGS.disback_node_iterations, "disback_node_iterations")
    try:
        return disback.node_schedule(FLAGS.disback_num_nodes, iters)
    except ValueError as e:
        raise flags.ValidationError(f"--disback_node_iterations: {e}") from None


def run(log=print):
    """Loads the teacher, runs stage 1 (unless --disback_path=off) and stage 2; returns stage 2's last metrics."""
    from cud_tf import data, disback_path, training
    from cud_tf.models.disback import DisbackModel

    common.require(run_dir=FLAGS.run_dir, disback_teacher_run_dir=FLAGS.disback_teacher_run_dir)
    if os.path.abspath(FLAGS.disback_teacher_run_dir) == os.path.abspath(FLAGS.run_dir):
        raise flags.ValidationError("--run_dir must differ from --disback_teacher_run_dir (the teacher stays intact)")
    schedule = node_schedule()
    strategy, nets, teacher_run, dcfg, shape = common.load_distillation_teacher(
        FLAGS.disback_teacher_run_dir, ("velocity", "fake", "target"))
    net_cfg = nets["velocity"].config
    cfg = disback_config(net_cfg.num_classes)
    path_on = FLAGS.disback_path == "on"
    arch = dict(common.arch_dict(net_cfg, False), disback_path=FLAGS.disback_path,
                disback_num_nodes=FLAGS.disback_num_nodes if path_on else 0,
                disback_record_every=FLAGS.disback_record_every if path_on else 0)
    fake_optim = common.optim_config()
    if FLAGS.disback_fake_learning_rate is not None:
        fake_optim = dataclasses.replace(fake_optim, learning_rate=FLAGS.disback_fake_learning_rate)
    config = common.recorded_config("disback", net_cfg, objective=cfg, fake_optim=fake_optim, schedule=schedule,
                                    eval_weights=FLAGS.disback_eval_weights,
                                    teacher=dict(run_dir=os.path.abspath(FLAGS.disback_teacher_run_dir),
                                                 checkpoint=os.path.basename(teacher_run.checkpoint)))
    chief = training.is_chief(strategy)

    def dist_dataset(start):
        return data.distribute(strategy, dcfg, FLAGS.global_batch_size, FLAGS.seed, start_batch=start)

    with common.claimed_run_dir(arch, config, chief):
        path = None
        if path_on:
            stage1 = dataclasses.replace(common.loop_config(), run_dir=os.path.join(FLAGS.run_dir, "degradation"))
            path = disback_path.record_degradation_path(
                nets["velocity"], cfg, strategy, dist_dataset, common.optim_config(), stage1,
                num_nodes=FLAGS.disback_num_nodes, record_every=FLAGS.disback_record_every,
                teacher_run_dir=FLAGS.disback_teacher_run_dir, global_batch_size=FLAGS.global_batch_size,
                seed=FLAGS.seed, jit_compile=FLAGS.jit_compile, log=log)
            if path is None:
                return {}
            path.load_node(FLAGS.disback_num_nodes, nets["fake"])  # the fake starts at the path's end s'_N
        with strategy.scope():
            model = DisbackModel(nets["velocity"], nets["fake"], nets["target"], cfg, common.optim_config(),
                                 global_batch_size=FLAGS.global_batch_size, seed=FLAGS.seed,
                                 fake_optim_cfg=fake_optim, eval_weights=FLAGS.disback_eval_weights,
                                 jit_compile=FLAGS.jit_compile)
        switch = disback_path.TargetSwitcher(model, path, schedule, FLAGS.train_steps,
                                             os.path.join(FLAGS.run_dir, "target_switches.jsonl"), chief, log)
        plan = ", ".join(f"s'_{node} from {first}" for first, node in schedule)
        log(f"DisBack stage 2 (path {FLAGS.disback_path}): teacher {teacher_run.checkpoint}; targets {plan}; "
            f"generator updated every {cfg.fake_updates_per_generator} steps; {FLAGS.train_steps} iterations")
        return training.train(model, strategy, dist_dataset, common.loop_config(), arch, shape, log=log,
                              on_step=common.with_evaluation(model, shape, chief, on_step=switch))


def main(argv):
    from cud_tf.data import DataNotPreparedError
    from cud_tf.disback_path import PathError
    common.run_or_fail(argv, run, DataNotPreparedError, PathError)


def cli():
    common.cli(define_flags, main)


if __name__ == "__main__":
    cli()

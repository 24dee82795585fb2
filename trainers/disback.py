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
"""
import dataclasses
import json
import os

from absl import app, flags

from trainers import common

FLAGS = flags.FLAGS


def define_flags():
    common.define_flags()
    t, d = common._track, flags
    t(d.DEFINE_string, "disback_teacher_run_dir", None, "Run directory of the teacher (a CUD or RF run of this "
      "project); its EMA weights are the teacher, G^0 and the generator's initialisation.")
    t(d.DEFINE_enum, "disback_path", "on", ["on", "off"], "on: record the degradation path and backtrack along "
      "it; off: the teacher is the target from the start (plain distribution matching).")
    t(d.DEFINE_integer, "disback_num_nodes", 4, "N: path nodes after the teacher (stage 1 runs N * "
      "--disback_record_every steps).", lower_bound=1)
    t(d.DEFINE_integer, "disback_record_every", 100, "M: stage-1 steps between path nodes.", lower_bound=1)
    t(d.DEFINE_list, "disback_node_iterations", ["200"], "Stage-2 iterations with each target s'_{N-1}, ..., s'_1 "
      "(one value for all, or N-1 values); then the teacher s'_0 to the end.")
    t(d.DEFINE_integer, "disback_fake_updates", 5, "Fake-network updates per generator update.", lower_bound=1)
    t(d.DEFINE_float, "disback_t_min", 0.02, "Smallest time of the distribution-matching gradient.",
      lower_bound=0.0, upper_bound=1.0)
    t(d.DEFINE_float, "disback_t_max", 0.98, "Largest time of the distribution-matching gradient.",
      lower_bound=0.0, upper_bound=1.0)
    t(d.DEFINE_float, "disback_guidance", 1.0, "Classifier-free guidance scale w of the target (a class-"
      "conditional teacher; the generator learns the guided distribution); 1 = unguided.", lower_bound=0.0)
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
    from cud_tf import disback
    if FLAGS.disback_path == "off":
        return disback.node_schedule(0, [])
    iters = common.int_list(FLAGS.disback_node_iterations, "disback_node_iterations")
    try:
        return disback.node_schedule(FLAGS.disback_num_nodes, iters)
    except ValueError as e:
        raise flags.ValidationError(f"--disback_node_iterations: {e}") from None


def record_path(teacher_net, cfg, strategy, dcfg, log):
    """Stage 1: trains the degradation network and writes the path nodes; returns the DegradationPath."""
    from cud_tf import data, disback, distill, training
    from cud_tf.model import DiffusionModel, clone_network
    from cud_tf.objectives import OBJECTIVES

    stage_dir = os.path.join(FLAGS.run_dir, "degradation")
    path = disback.DegradationPath(os.path.join(stage_dir, "path"))
    n, m = FLAGS.disback_num_nodes, FLAGS.disback_record_every
    meta = dict(teacher_run_dir=os.path.abspath(FLAGS.disback_teacher_run_dir), record_every=m, num_nodes=n)
    stored = {k: path.manifest().get(k) for k in meta}
    if path.nodes() and stored != meta:
        raise training.TrainingError(f"{path.directory} holds a path of other settings ({stored}); use a new "
                                     "--run_dir")
    net_cfg = teacher_net.config
    with strategy.scope():
        net = clone_network(teacher_net, "degradation")
        generator0 = clone_network(teacher_net, "generator0")
        distill.copy_weights(teacher_net.trainable_variables, net.trainable_variables)
        distill.copy_weights(teacher_net.trainable_variables, generator0.trainable_variables)
        generator0.trainable = False
        model = DiffusionModel(net, OBJECTIVES["disback_degradation"], cfg, common.optim_config(),
                               global_batch_size=FLAGS.global_batch_size, seed=FLAGS.seed,
                               nonfinite=FLAGS.nonfinite, extra_nets={"generator0": generator0},
                               jit_compile=FLAGS.jit_compile)
    chief = training.is_chief(strategy)
    recorded = {node["index"] for node in path.nodes()}

    def record(step):
        if step % m == 0 and step // m <= n and step // m not in recorded:
            path.write_node(step // m, step, net, chief=chief, **meta)
            recorded.add(step // m)
            log(f"degradation path: node s'_{step // m} recorded at stage-1 step {step}")

    arch = dict(common.arch_dict(net_cfg, False), disback_record_every=m)
    loop = dataclasses.replace(common.loop_config(), run_dir=stage_dir, train_steps=n * m, checkpoint_every=m,
                               sample_nfes=(1, 8))
    log(f"DisBack stage 1: {n} nodes every {m} steps ({n * m} steps) in {stage_dir}")
    training.train(model, strategy,
                   lambda start: data.distribute(strategy, dcfg, FLAGS.global_batch_size, FLAGS.seed,
                                                 start_batch=start),
                   loop, arch, net_cfg.image_shape, log=log, on_step=record)
    if int(model.step.numpy()) < n * m:  # SIGTERM: stage 1 saved and stopped
        return None
    path.check_complete(n)
    return path


def run(log=print):
    """Loads the teacher, runs stage 1 (unless --disback_path=off) and stage 2; returns stage 2's last metrics."""
    from cud_tf import data, disback, solvers, training

    if not FLAGS.run_dir:
        raise flags.ValidationError("--run_dir is required (where the path, checkpoints and samples go)")
    if not FLAGS.disback_teacher_run_dir:
        raise flags.ValidationError("--disback_teacher_run_dir is required (a run directory of trainers.cud)")
    if os.path.abspath(FLAGS.disback_teacher_run_dir) == os.path.abspath(FLAGS.run_dir):
        raise flags.ValidationError("--run_dir must differ from --disback_teacher_run_dir (the teacher stays intact)")
    solvers.get_tableau(FLAGS.sample_method)
    schedule = node_schedule()

    strategy, nets, teacher_run, dcfg, shape = common.load_distillation_teacher(
        FLAGS.disback_teacher_run_dir, ("velocity", "fake", "target"))
    net_cfg = nets["velocity"].config
    cfg = disback_config(net_cfg.num_classes)
    common.describe_network(net_cfg, dropout=0.0)  # flags.txt describes this run's networks
    path_on = FLAGS.disback_path == "on"
    arch = dict(common.arch_dict(net_cfg, False), disback_path=FLAGS.disback_path,
                disback_num_nodes=FLAGS.disback_num_nodes if path_on else 0,
                disback_record_every=FLAGS.disback_record_every if path_on else 0)
    chief = training.is_chief(strategy)
    common.prepare_run_dir(FLAGS.run_dir, arch, chief)

    path = None
    if path_on:
        path = record_path(nets["velocity"], cfg, strategy, dcfg, log)
        if path is None:
            return {}
        path.load_node(FLAGS.disback_num_nodes, nets["fake"])  # the fake starts at the path's end s'_N
    fake_optim = common.optim_config()
    if FLAGS.disback_fake_learning_rate is not None:
        fake_optim = dataclasses.replace(fake_optim, learning_rate=FLAGS.disback_fake_learning_rate)
    with strategy.scope():
        model = disback.DisbackModel(nets["velocity"], nets["fake"], nets["target"], cfg, common.optim_config(),
                                     global_batch_size=FLAGS.global_batch_size, seed=FLAGS.seed,
                                     nonfinite=FLAGS.nonfinite, fake_optim_cfg=fake_optim,
                                     jit_compile=FLAGS.jit_compile)
    switches_path = os.path.join(FLAGS.run_dir, "target_switches.jsonl")

    def switch_target(step):
        if step >= FLAGS.train_steps:
            return
        node = disback.target_node(step, schedule) if path_on else 0
        if node == model.target_node:
            return
        sha256 = model.set_target(path, node) if path_on else disback.fingerprint(model.target)
        model.target_node = node
        log(f"DisBack stage 2: target s'_{node} from iteration {step}")
        if chief:
            with open(switches_path, "a") as f:
                f.write(json.dumps(dict(iteration=step, node=node, sha256=sha256)) + "\n")

    plan = ", ".join(f"s'_{node} from {first}" for first, node in schedule)
    log(f"DisBack stage 2 (path {FLAGS.disback_path}): teacher {teacher_run.checkpoint}; targets {plan}; "
        f"generator updated every {cfg.fake_updates_per_generator} steps; {FLAGS.train_steps} iterations")
    return training.train(
        model, strategy,
        lambda start: data.distribute(strategy, dcfg, FLAGS.global_batch_size, FLAGS.seed, start_batch=start),
        common.loop_config(), arch, shape, log=log, on_step=switch_target)


def main(argv):
    from cud_tf.data import DataNotPreparedError
    from cud_tf.disback import PathError
    from cud_tf.run_dirs import RunError
    from cud_tf.training import TrainingError
    common.run_or_fail(argv, run, TrainingError, DataNotPreparedError, RunError, PathError)


if __name__ == "__main__":
    define_flags()
    app.run(main)

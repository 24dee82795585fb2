"""TRACT and binary time distillation of a trained velocity model: `python -m trainers.tract --flagfile=...`.

Binary time distillation (progressive distillation) is S = 2 (`--tract_schedule=1024,512,...,1`) with t at group
tops only, both half-steps by the teacher and a fixed inference EMA: `--tract_offsets=tops
--tract_second_step=teacher --tract_inference_ema=<decay>` (configs/btd_mnist.cfg). The student starts from the
teacher run's EMA weights and takes its architecture; the network flags and --ema_decay are not used.
"""
import os

from absl import flags

from trainers import common

FLAGS = flags.FLAGS


def define_flags():
    from cud_tf.objectives.tract import TractConfig as C

    common.define_flags()
    t, d, dv = common.define, flags, common.default
    t(d.DEFINE_string, "tract_teacher_run_dir", None, "Run directory of the teacher (a CUD or RF run of this "
      "project); its EMA weights are the teacher and the student's initialisation.")
    t(d.DEFINE_list, "tract_schedule", dv(C, "schedule"), "Step counts T_0 > T_1 > ... (each a multiple of the "
      "next); phase p distils T_p teacher steps into T_{p+1}. Binary time distillation: 1024,512,...,2,1.")
    t(d.DEFINE_integer, "tract_steps_per_phase", None, "Training steps per phase (default: --train_steps split "
      "equally over the phases). --train_steps below the schedule's end stops early; rerun to continue.",
      lower_bound=1)
    t(d.DEFINE_enum, "tract_teacher_solver", dv(C, "teacher_solver"), ["euler", "heun"],
      "The teacher's one step of size 1/T_p.")
    t(d.DEFINE_enum, "tract_weight", dv(C, "weight"), ["none", "truncated_snr"],
      "Per-example loss weight: none, or TRACT's truncated SNR mapped to velocity space, max(t^2, (1-t)^2).")
    t(d.DEFINE_float, "tract_teacher_guidance", dv(C, "teacher_guidance"), "Classifier-free guidance scale w of a "
      "class-conditional teacher in the first phase (the student learns the guided velocity); 1 = unguided.",
      lower_bound=0.0)
    t(d.DEFINE_float, "tract_self_teacher_decay", dv(C, "self_teacher_decay"), "EMA decay mu_S of the self-teacher.",
      lower_bound=0.0, upper_bound=1.0)
    t(d.DEFINE_float, "tract_ema_residual", dv(C, "ema_residual"), "The inference EMA decay is mu_I = "
      "residual^(1/steps_per_phase) (bias-corrected); it becomes the teacher at each phase boundary.",
      lower_bound=0.0, upper_bound=1.0)
    t(d.DEFINE_string, "tract_inference_ema", "tract", "The inference EMA decay mu_I (bias-corrected; it becomes "
      "the teacher at each phase boundary): 'tract' = --tract_ema_residual^(1/steps_per_phase), or a fixed decay "
      "in [0, 1) (binary time distillation's reference: 0.9995).")
    t(d.DEFINE_enum, "tract_offsets", dv(C, "offsets"), ["all", "tops"], "Offsets j of the drawn time t in its "
      "group of S teacher steps: all (TRACT) or tops, j = 0 only (binary time distillation).")
    t(d.DEFINE_enum, "tract_second_step", dv(C, "second_step"), ["self_teacher", "teacher"], "Who takes the step "
      "from t_mid to the group end t': the self-teacher (TRACT) or the teacher (binary time distillation; S = 2).")
    t(d.DEFINE_boolean, "tract_clip_x0", dv(C, "clip_x0"), "Teacher and self-teacher steps use the velocity "
      "(x - clip(x0_hat, -1, 1)) / t of their data prediction x0_hat = x - t v clipped to the data range.")


def schedule():
    """--tract_schedule as a checked tuple of step counts."""
    from cud_tf.objectives import tract
    steps = common.int_list(FLAGS.tract_schedule, "tract_schedule")
    try:
        tract.check_schedule(steps)
    except ValueError as e:
        raise flags.ValidationError(f"--tract_schedule: {e}") from None
    return steps


def inference_ema_decay():
    """--tract_inference_ema as TractConfig.inference_ema_decay: None for 'tract', else a decay in [0, 1)."""
    value = FLAGS.tract_inference_ema.strip()
    if value == "tract":
        return None
    try:
        decay = float(value)
    except ValueError:
        decay = None
    if decay is None or not 0.0 <= decay < 1.0:
        raise flags.ValidationError(f"--tract_inference_ema={value!r}: expected 'tract' or a decay in [0, 1), "
                                    "e.g. 0.9995")
    return decay


def tract_config(num_classes):
    """TractConfig from the flags; --tract_steps_per_phase defaults to --train_steps split over the phases (the
    resolved value is in the run's config.json, which a resume must match)."""
    from cud_tf.objectives import tract
    phases = len(schedule()) - 1
    per_phase = FLAGS.tract_steps_per_phase
    if per_phase is None:
        if FLAGS.train_steps % phases:
            raise flags.ValidationError(f"--train_steps={FLAGS.train_steps} does not split into {phases} equal "
                                        "phases; set --tract_steps_per_phase")
        per_phase = FLAGS.train_steps // phases
    total = phases * per_phase
    if FLAGS.tract_teacher_guidance != 1.0 and not num_classes:
        raise flags.ValidationError(f"--tract_teacher_guidance={FLAGS.tract_teacher_guidance} needs a class-"
                                    "conditional teacher; this teacher is unconditional (leave it at 1)")
    if FLAGS.train_steps > total:
        raise flags.ValidationError(f"--train_steps={FLAGS.train_steps} goes past the schedule's end at step "
                                    f"{total} ({phases} phases of --tract_steps_per_phase={per_phase})")
    try:
        return tract.TractConfig(
            schedule=schedule(), steps_per_phase=per_phase, teacher_solver=FLAGS.tract_teacher_solver,
            weight=FLAGS.tract_weight, head=FLAGS.sample_head, self_teacher_decay=FLAGS.tract_self_teacher_decay,
            ema_residual=FLAGS.tract_ema_residual, inference_ema_decay=inference_ema_decay(),
            offsets=FLAGS.tract_offsets, second_step=FLAGS.tract_second_step, clip_x0=FLAGS.tract_clip_x0,
            label_dropout=FLAGS.label_dropout if num_classes else 0.0, teacher_guidance=FLAGS.tract_teacher_guidance)
    except ValueError as e:  # e.g. --tract_second_step=teacher with a schedule that does not halve
        raise flags.ValidationError(f"TRACT flags: {e}") from None


def run_records(cfg, net_cfg, teacher_checkpoint):
    """(arch, config) of the run directory: the schedule in arch.json, and in config.json the whole TractConfig
    (offsets, second step, EMA decays, clipping, ...) and the teacher, which a resume must match."""
    arch = dict(common.arch_dict(net_cfg, False), tract_schedule=list(cfg.schedule),
                tract_steps_per_phase=cfg.steps_per_phase)
    config = common.recorded_config("tract", net_cfg, objective=cfg,
                                    teacher=dict(run_dir=os.path.abspath(FLAGS.tract_teacher_run_dir),
                                                 checkpoint=os.path.basename(teacher_checkpoint)))
    return arch, config


def run():
    """Loads the teacher, builds the TRACT model from the flags and trains; returns the last metrics."""
    from cud_tf import data, training
    from cud_tf.models.tract import TractModel

    common.require(run_dir=FLAGS.run_dir, tract_teacher_run_dir=FLAGS.tract_teacher_run_dir)
    if os.path.abspath(FLAGS.tract_teacher_run_dir) == os.path.abspath(FLAGS.run_dir):
        raise flags.ValidationError("--run_dir must differ from --tract_teacher_run_dir (the teacher stays intact)")
    schedule()
    inference_ema_decay()

    # The student, the teacher and the self-teacher all start from the teacher run's EMA weights, dropout off
    # as in the TRACT reference code.
    strategy, nets, teacher_run, dcfg, shape = common.load_distillation_teacher(
        FLAGS.tract_teacher_run_dir, ("velocity", "teacher", "self_teacher"))
    net_cfg = nets["velocity"].config
    cfg = tract_config(net_cfg.num_classes)
    arch, config = run_records(cfg, net_cfg, teacher_run.checkpoint)
    with common.claimed_run_dir(arch, config, training.is_chief(strategy)):
        with strategy.scope():
            model = TractModel(nets["velocity"], nets["teacher"], nets["self_teacher"], cfg, common.optim_config(),
                               global_batch_size=FLAGS.global_batch_size, seed=FLAGS.seed,
                               jit_compile=FLAGS.jit_compile)
        steps = " -> ".join(map(str, cfg.schedule))
        print(f"TRACT: {steps} sampler steps in {cfg.num_phases} phase(s) of {cfg.steps_per_phase} training "
              f"steps (offsets {cfg.offsets}, second step by the {cfg.second_step.replace('_', '-')}, inference "
              f"EMA {cfg.inference_decay:.6g}{', x0 clipped' if cfg.clip_x0 else ''}); teacher "
              f"{teacher_run.checkpoint}; stopping at step {FLAGS.train_steps} of {cfg.total_steps}")
        return training.train(
            model, strategy,
            lambda start: data.distribute(strategy, dcfg, FLAGS.global_batch_size, FLAGS.seed, start_batch=start),
            common.loop_config(), arch, shape,
            on_step=common.with_evaluation(model, shape, training.is_chief(strategy)))


def main(argv):
    from cud_tf.data import DataNotPreparedError
    common.run_or_fail(argv, run, DataNotPreparedError)


def cli():
    common.cli(define_flags, main)


if __name__ == "__main__":
    cli()

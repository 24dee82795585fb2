"""TRACT: the two-stage target, bias-corrected EMAs, phase switches without retracing, and the trainer end to end."""
import os

import numpy as np
import pytest
import tensorflow as tf
from absl import flags
from absl.testing import flagsaver

from helpers import ROOT, tiny, tiny_unet_config
from cud_tf.models import tract as tract_model
from cud_tf.models.base import OptimConfig, copy_weights
from cud_tf.networks.unet import VelocityUNet
from cud_tf.objectives import tract
from cud_tf.objectives.common import Nets
from trainers import cud as cud_trainer
from trainers import tract as tract_trainer

FLAGS = flags.FLAGS

cud_trainer.define_flags()
tract_trainer.define_flags()


def toy_teacher(x, t):
    return 0.7 * x + tf.reshape(t, [-1, 1, 1, 1]) ** 2


def toy_self_teacher(x, t):
    return -0.4 * x + 0.3 * tf.reshape(t, [-1, 1, 1, 1])


def all_groups(t_p, t_next):
    s = t_p // t_next
    k, j = np.meshgrid(np.arange(t_next), np.arange(s), indexing="ij")
    return tf.constant(k.ravel(), tf.int32), tf.constant(j.ravel(), tf.int32), s


def test_group_times_tile_each_group_from_its_upper_end():
    k, j, s = all_groups(8, 2)
    t, t_mid, t_prime, dt = (x.numpy() for x in tract.group_times(k, j, tf.constant(8), tf.constant(2)))
    np.testing.assert_allclose(t, 1.0 - (k.numpy() * 0.5 + j.numpy() / 8))
    np.testing.assert_allclose(t - t_mid, 1 / 8, atol=1e-7)
    np.testing.assert_allclose(t_prime, 1.0 - (k.numpy() + 1) * 0.5)
    np.testing.assert_allclose(dt, t - t_prime, atol=1e-7)
    assert sorted(set(np.round(t, 6))) == sorted(set(np.round(1 - np.arange(8) / 8, 6)))  # every teacher step
    assert np.all((t_mid == t_prime) == (j.numpy() == s - 1)) and np.all(t_mid >= t_prime)


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_student_euler_jump_lands_on_the_teacher_then_self_teacher_point(solver):
    k, j, s = all_groups(16, 4)
    t, t_mid, t_prime, dt = tract.group_times(k, j, tf.constant(16), tf.constant(4))
    x_t = tf.constant(np.random.RandomState(0).normal(size=(len(k), 2, 2, 1)), tf.float32)
    v_star, x_prime = tract.target_velocity(toy_teacher, toy_self_teacher, x_t, t, t_mid, t_prime, dt,
                                            j == s - 1, solver)
    # The two stages by hand, in float64.
    x, tt, tm, tq = (np.asarray(a, np.float64) for a in (x_t, t, t_mid, t_prime))
    col = lambda a: a[:, None, None, None]  # noqa: E731
    h = col(tt - tm)
    k1 = 0.7 * x + col(tt) ** 2
    if solver == "euler":
        x_mid = x - h * k1
    else:
        k2 = 0.7 * (x - h * k1) + col(tm) ** 2
        x_mid = x - h * (k1 + k2) / 2
    x_jump = x_mid - col(tm - tq) * (-0.4 * x_mid + 0.3 * col(tm))
    expected = np.where(col(j.numpy() == s - 1), x_mid, x_jump)
    np.testing.assert_allclose(x_prime.numpy(), expected, atol=1e-5)
    # One student Euler step of size t - t' with v* lands exactly there.
    jump = x - col(tt - tq) * v_star.numpy()
    np.testing.assert_allclose(jump, expected, atol=1e-5)


def test_last_offset_uses_the_teacher_step_alone():
    k, j, s = all_groups(8, 4)
    t, t_mid, t_prime, dt = tract.group_times(k, j, tf.constant(8), tf.constant(4))
    x_t = tf.ones([len(k), 2, 2, 1])
    nan_self_teacher = lambda x, t: tf.fill(tf.shape(x), np.nan)  # noqa: E731
    v_star, _ = tract.target_velocity(toy_teacher, nan_self_teacher, x_t, t, t_mid, t_prime, dt, j == s - 1)
    last = (j == s - 1).numpy()
    assert last.any() and np.isfinite(v_star.numpy()[last]).all() and np.isnan(v_star.numpy()[~last]).all()
    # j = S - 1: t - t' = h, so v* is the teacher's own velocity at (x_t, t).
    np.testing.assert_allclose(v_star.numpy()[last], toy_teacher(x_t, t).numpy()[last], atol=1e-5)


def test_truncated_snr_weight():
    w = tract.loss_weight(tf.constant([0.0, 0.25, 0.5, 0.9, 1.0]), "truncated_snr").numpy()
    np.testing.assert_allclose(w, [1.0, 0.5625, 0.25, 0.81, 1.0])
    assert (tract.loss_weight(tf.constant([0.3]), "none").numpy() == 1.0).all()


def test_bias_corrected_ema_of_a_known_sequence():
    mu, thetas = 0.9, [3.0, -1.0, 4.0, 1.0, 5.0]
    avg = 123.0  # whatever the start: the first update copies
    for k, theta in enumerate(thetas, start=1):
        avg = avg + float(tract_model.ema_rate(mu, k)) * (theta - avg)
        explicit = sum(mu ** (k - i) * (1 - mu) * th for i, th in enumerate(thetas[:k], start=1)) / (1 - mu ** k)
        assert avg == pytest.approx(explicit, rel=1e-6)
    assert float(tract_model.ema_rate(mu, 1)) == 1.0
    # mu_I = 1e-3^(1/N): float32 would lose ~1% of (1 - mu) at N = 1e5; the rate is computed in float64.
    mu_i = tract.TractConfig(steps_per_phase=100000).inference_decay
    assert float(tract_model.ema_rate(mu_i, 10 ** 9)) == pytest.approx(1 - mu_i, rel=1e-6)


def test_schedule_is_checked():
    for bad in [(32,), (32, 24, 1), (1, 2), (32, 32, 1)]:
        with pytest.raises(ValueError, match="schedule"):
            tract.TractConfig(schedule=bad)
    cfg = tract.TractConfig(schedule=(8, 4, 2, 1), steps_per_phase=5)
    assert [int(tract.phase_of(s, cfg)) for s in (0, 4, 5, 14, 15, 99)] == [0, 0, 1, 2, 2, 2]


def test_guided_teacher_guides_the_first_phase_only():
    """A class-conditional teacher sees the student's labels; --tract_teacher_guidance changes phase 0's target
    and not phase 1's (whose teacher already learnt the guided field)."""
    from cud_tf import interpolants
    from cud_tf.objectives import Nets
    tf.keras.utils.set_random_seed(3)
    net_cfg = tiny(num_classes=3)
    teacher, student, self_teacher = (VelocityUNet(net_cfg).build_variables() for _ in range(3))
    for w in teacher.trainable_variables:  # zero-initialised branches would make every label alike
        w.assign(w + tf.random.normal(w.shape, stddev=0.1, seed=2))
    nets = Nets(velocity=student, teacher=teacher, extra={"self_teacher": self_teacher})
    batch = {"image": tf.random.uniform([4, 8, 8, 1], -1, 1, seed=5), "label": tf.constant([0, 1, 2, 1])}

    def loss(guidance, step):
        cfg = tract.TractConfig(schedule=(4, 2, 1), steps_per_phase=2, teacher_guidance=guidance)
        rng = interpolants.Rng(interpolants.fold_seed(0, step))
        return tract.loss(nets, batch, rng, tf.constant(step, tf.int64), cfg).per_example["velocity"].numpy()

    assert not np.allclose(loss(3.0, 0), loss(1.0, 0), rtol=1e-4)
    np.testing.assert_allclose(loss(3.0, 2), loss(1.0, 2), rtol=1e-5, atol=1e-7)


def test_phase_switch_assigns_the_inference_ema_to_the_teacher_without_retracing():
    traces = []

    def counting_loss(*args):
        traces.append(1)  # runs once per trace, never per step
        return tract.loss(*args)

    cfg = tract.TractConfig(schedule=(4, 2, 1), steps_per_phase=2, ema_residual=0.5)
    net_cfg = tiny()
    tf.keras.utils.set_random_seed(0)
    nets = [VelocityUNet(net_cfg, name=n).build_variables() for n in ("velocity", "teacher", "self_teacher")]
    for n in nets[1:]:
        copy_weights(nets[0].trainable_variables, n.trainable_variables)
    model = tract_model.TractModel(*nets, cfg, OptimConfig(learning_rate=1e-2), global_batch_size=4, seed=1,
                               objective=counting_loss)
    images = np.random.RandomState(0).uniform(-1, 1, (4, 8, 8, 1)).astype(np.float32)
    it = iter(tf.data.Dataset.from_tensors({"image": images, "label": np.zeros(4, np.int32)}).repeat())
    step = tf.function(lambda: model.train_step(next(it)))
    values = lambda vs: [v.numpy() for v in vs]  # noqa: E731
    teacher0 = values(model.teacher_variables)

    step()  # update 1: both bias-corrected EMAs copy the student
    for avg in (model.inference_ema_variables, model.self_teacher_variables):
        for a, b in zip(values(avg), values(model.net.trainable_variables)):
            np.testing.assert_allclose(a, b, atol=1e-6)
    step()  # update 2, the end of phase 0
    ema_end_of_phase0 = values(model.inference_ema_variables)
    assert int(model.phase.numpy()) == 0
    for a, b in zip(teacher0, values(model.teacher_variables)):
        np.testing.assert_array_equal(a, b)
    step()  # the first step of phase 1 switches the teacher first
    assert int(model.phase.numpy()) == 1 and int(model.step.numpy()) == 3
    for a, b in zip(ema_end_of_phase0, values(model.teacher_variables)):
        np.testing.assert_array_equal(a, b)
    assert max(np.abs(a - b).max() for a, b in zip(teacher0, values(model.teacher_variables))) > 1e-4
    step()
    assert len(traces) == 1 and step.experimental_get_tracing_count() == 1
    assert int(model.phase.numpy()) == 1  # no second switch within the phase


def test_xla_step_does_not_depend_on_the_step_value():
    """Under XLA the loss compiles once for every step: no op needs the step counter at compile time. (A strided
    slice at the step-dependent phase, `schedule[p]`, did: every step was compiled anew, ~25x slower than graph
    mode.) The HLO of two steps of different phases is the same."""
    from cud_tf import interpolants
    net_cfg = tiny()
    tf.keras.utils.set_random_seed(0)
    student, teacher, self_teacher = (VelocityUNet(net_cfg).build_variables() for _ in range(3))
    nets = Nets(velocity=student, teacher=teacher, extra={"self_teacher": self_teacher})
    batch = {"image": tf.zeros([2, 8, 8, 1]), "label": tf.zeros([2], tf.int32)}
    cfg = tract.TractConfig(schedule=(4, 2, 1), steps_per_phase=2)

    @tf.function(jit_compile=True)
    def loss(step):
        rng = interpolants.Rng(interpolants.fold_seed(0, step))
        return tract.loss(nets, batch, rng, step, cfg).per_example["velocity"]

    hlo = [loss.experimental_get_compiler_ir(tf.constant(k, tf.int64))(stage="hlo") for k in (0, 3)]
    assert hlo[0] == hlo[1]


@pytest.mark.parametrize("name", ["tract_mnist.cfg", "btd_mnist.cfg", "tract_cifar10.cfg"])
def test_flagfiles_parse(name):
    with flagsaver.flagsaver():
        os.chdir(ROOT)
        FLAGS.unparse_flags()
        FLAGS(["trainers.tract", f"--flagfile=configs/{name}"])
        schedule = tract_trainer.schedule()
        assert FLAGS.tract_teacher_run_dir and FLAGS.run_dir
        assert FLAGS.train_steps == FLAGS.tract_steps_per_phase * (len(schedule) - 1)
        if name.startswith("btd"):  # binary time distillation: S = 2 in every phase
            assert all(a == 2 * b for a, b in zip(schedule, schedule[1:])) and schedule[-1] == 1


# -- Binary time distillation and x0 clipping, as options of the same objective. ---------------------------------

class RecordingNet:
    """A fake unconditional velocity network `v(x, t)` that records its inputs (x `[B,H,W,C]`, t `[B]`)."""

    config = type("Config", (), {"num_classes": 0})()

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, x, t, y=None, training=False, head=1):
        self.calls.append((np.asarray(x, np.float64), np.asarray(t, np.float64)))
        return self.fn(x, t)


def fake_nets(teacher_fn=toy_teacher, self_teacher_fn=toy_self_teacher):
    """(student, teacher, self-teacher, Nets); the student predicts 0, so the MSE loss is mean(v*^2)."""
    student, teacher, self_teacher = (RecordingNet(f) for f in (lambda x, t: tf.zeros_like(x), teacher_fn,
                                                                 self_teacher_fn))
    return student, teacher, self_teacher, Nets(velocity=student, teacher=teacher,
                                                extra={"self_teacher": self_teacher})


def run_loss(nets, cfg, step, batch_size=64, seed=0):
    """Per-example loss `[B]` of `tract.loss` at training step `step` on uniform images in [-1, 1]."""
    from cud_tf import interpolants
    images = tf.random.stateless_uniform([batch_size, 2, 2, 1], [seed, 0], -1, 1)
    rng = interpolants.Rng(interpolants.fold_seed(seed, step))
    return tract.loss(nets, {"image": images}, rng, tf.constant(step, tf.int64), cfg).per_example["velocity"].numpy()


def col(a):
    return np.asarray(a, np.float64)[:, None, None, None]


def np_step(v, x, t, h, solver):
    """One teacher step of size h from (x, t), by hand in float64 (v: numpy velocity)."""
    k1 = v(x, t)
    if solver == "euler":
        return x - col(h) * k1
    return x - col(h) * (k1 + v(x - col(h) * k1, t - h)) / 2


def np_toy_teacher(x, t):
    return 0.7 * x + col(t) ** 2


def np_toy_self_teacher(x, t):
    return -0.4 * x + 0.3 * col(t)


@pytest.mark.parametrize("second_step", ["self_teacher", "teacher"])
def test_tops_offsets_draw_only_group_tops(second_step):
    schedule = (16, 8, 4, 2, 1) if second_step == "teacher" else (16, 4, 1)
    for offsets in ("tops", "all"):
        cfg = tract.TractConfig(schedule=schedule, steps_per_phase=1, offsets=offsets, second_step=second_step)
        all_tops = []
        for p in range(cfg.num_phases):
            student, teacher, _, nets = fake_nets()
            run_loss(nets, cfg, step=p, seed=p)
            t = student.calls[0][1]
            np.testing.assert_allclose(teacher.calls[0][1], t)  # the teacher's step starts at the student's t
            k = (1.0 - t) * schedule[p + 1]  # t = 1 - kH exactly at a group top, k an integer
            all_tops.append(bool(np.all(np.abs(k - np.round(k)) < 1e-4)))
        # The check can fail: with TRACT's offsets most of 64 draws fall inside their groups.
        assert all(all_tops) if offsets == "tops" else not any(all_tops)


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_second_step_by_the_teacher_is_the_teachers_two_half_steps(solver):
    """BTD's target is the teacher's two steps of size h = 1/T_p from a group top; the self-teacher (here NaN
    unless it is never called) and TRACT's self-teacher jump would give other targets."""
    cfg = tract.TractConfig(schedule=(8, 4, 2, 1), steps_per_phase=1, offsets="tops", second_step="teacher",
                            teacher_solver=solver)
    nan = lambda x, t: tf.fill(tf.shape(x), np.nan)  # noqa: E731
    for p in range(cfg.num_phases):
        student, teacher, self_teacher, nets = fake_nets(self_teacher_fn=nan)
        loss = run_loss(nets, cfg, step=p, seed=p)
        assert self_teacher.calls == [] and np.isfinite(loss).all()
        x_t, t = student.calls[0]
        h = np.full_like(t, 1.0 / cfg.schedule[p])
        x_mid = np_step(np_toy_teacher, x_t, t, h, solver)
        x_prime = np_step(np_toy_teacher, x_mid, t - h, h, solver)
        np.testing.assert_allclose(loss, np.mean(((x_t - x_prime) / col(2 * h)) ** 2, axis=(1, 2, 3)), rtol=1e-4)
        # TRACT's second stage (the self-teacher's Euler jump) would give another loss.
        x_self = x_mid - col(h) * np_toy_self_teacher(x_mid, t - h)
        assert not np.allclose(loss, np.mean(((x_t - x_self) / col(2 * h)) ** 2, axis=(1, 2, 3)), rtol=1e-2)


def test_clipped_x0_velocity_is_the_velocity_of_the_clipped_prediction():
    x = tf.constant([[[[3.0]], [[0.2]]], [[[-2.5]], [[0.5]]], [[[4.0]], [[-4.0]]]])  # [3, 2, 1, 1]
    t = tf.constant([0.5, 0.25, 0.0])
    v = lambda x, t: -x  # noqa: E731  x0_hat = x (1 + t): row 0 -> 4.5 and 0.3, row 1 -> -3.125 and 0.625
    v_c = tract.clipped_x0_velocity(v)(x, t).numpy()
    x_np, t_np = x.numpy().astype(np.float64), t.numpy().astype(np.float64)
    x0_hat = x_np * (1 + col(t_np))
    expected = -x_np + (x0_hat - np.clip(x0_hat, -1, 1)) / np.where(col(t_np) > 0, col(t_np), 1.0)
    expected[2] = -x_np[2]  # t = 0: x0_hat = x whatever v is, so v is kept
    np.testing.assert_allclose(v_c, expected, rtol=1e-6)
    np.testing.assert_allclose(v_c[:2], (x_np[:2] - np.clip(x0_hat[:2], -1, 1)) / col(t_np[:2]), rtol=1e-6)
    inside = np.abs(x0_hat) <= 1
    assert inside[:2].any() and (~inside[:2]).any()
    np.testing.assert_array_equal(v_c[:2][inside[:2]], -x_np[:2][inside[:2]])  # a no-op where x0_hat is in range


@pytest.mark.parametrize("second_step", ["self_teacher", "teacher"])
def test_clip_x0_changes_the_target_as_the_formula_says(second_step):
    def np_clipped(v):
        return lambda x, t: (x - np.clip(x - col(t) * v(x, t), -1, 1)) / col(t)

    big = lambda x, t: -2.0 * x  # noqa: E731  x0_hat = (1 + 2t) x leaves [-1, 1] for some pixels
    # x0_hat = 0.9 tanh(x) stays inside [-1, 1] everywhere (t > 0 at every call: tops, S = 2).
    inside = lambda x, t: (x - 0.9 * tf.tanh(x)) / tf.reshape(t, [-1, 1, 1, 1])  # noqa: E731
    schedule = (8, 4, 2, 1) if second_step == "teacher" else (16, 4, 1)
    for p in range(len(schedule) - 1):
        losses = {}
        for clip in (False, True):
            cfg = tract.TractConfig(schedule=schedule, steps_per_phase=1, offsets="tops", second_step=second_step,
                                    clip_x0=clip)
            student, _, _, nets = fake_nets(teacher_fn=big, self_teacher_fn=big)
            losses["big", clip] = run_loss(nets, cfg, step=p, seed=p)
            losses["inside", clip] = run_loss(fake_nets(teacher_fn=inside, self_teacher_fn=inside)[3], cfg,
                                              step=p, seed=p)
        x_t, t = student.calls[0]
        h, t_prime = 1.0 / schedule[p], 1.0 - (1.0 - t + 1.0 / schedule[p + 1])
        v = np_clipped(lambda x, t: -2.0 * x)
        x_mid = x_t - h * v(x_t, t)
        x_prime = x_mid - col(t - h - t_prime) * v(x_mid, t - h)
        expected = np.mean(((x_t - x_prime) / col(t - t_prime)) ** 2, axis=(1, 2, 3))
        np.testing.assert_allclose(losses["big", True], expected, rtol=1e-4)
        assert not np.allclose(losses["big", True], losses["big", False], rtol=1e-3)
        np.testing.assert_allclose(losses["inside", True], losses["inside", False], rtol=1e-5)


def test_btd_options_are_checked():
    with pytest.raises(ValueError, match="S = 2"):
        tract.TractConfig(schedule=(1024, 32, 1), second_step="teacher")
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="inference_ema_decay"):
            tract.TractConfig(inference_ema_decay=bad)
    with pytest.raises(ValueError, match="offsets"):
        tract.TractConfig(offsets="bottoms")
    with pytest.raises(ValueError, match="second_step"):
        tract.TractConfig(second_step="student")
    assert tract.TractConfig(steps_per_phase=10, inference_ema_decay=0.9995).inference_decay == 0.9995
    assert tract.TractConfig(steps_per_phase=10).inference_decay == pytest.approx(1e-3 ** 0.1)


def test_fixed_inference_ema_decay_is_what_the_model_applies():
    """After update k the inference EMA moves by the bias-corrected rate of the fixed decay 0.9995 (not of
    residual^(1/steps_per_phase)), and BTD leaves the unused self-teacher alone."""
    cfg = tract.TractConfig(schedule=(4, 2, 1), steps_per_phase=2, offsets="tops", second_step="teacher",
                            inference_ema_decay=0.9995)
    tf.keras.utils.set_random_seed(0)
    net_cfg = tiny_unet_config(channel_mult=(1,), base_channels=4)
    nets = [VelocityUNet(net_cfg, name=n).build_variables() for n in ("velocity", "teacher", "self")]
    model = tract_model.TractModel(*nets, cfg, OptimConfig(learning_rate=1e-2), global_batch_size=4)
    for avg, theta in zip(model.inference_ema_variables, model.net.trainable_variables, strict=True):
        avg.assign(tf.zeros_like(avg))
        theta.assign(tf.ones_like(theta))
    self_teacher = [v.numpy() for v in model.self_teacher_variables]
    model.step.assign(5)
    model.finish_step(tf.constant(True))
    rate = (1 - 0.9995) / (1 - 0.9995 ** 5)  # ~0.2; TRACT's mu_I = 1e-3^(1/2) would give ~0.97
    for avg in model.inference_ema_variables:
        np.testing.assert_allclose(avg.numpy(), rate, rtol=1e-5)
    for a, b in zip(self_teacher, model.self_teacher_variables):
        np.testing.assert_array_equal(a, b.numpy())


def test_btd_flags_are_recorded_and_a_resume_must_keep_them(tmp_path):
    """configs/btd_mnist.cfg resolves to BTD's options; config.json and flags.txt record them (through the
    trainer's own run_records and claimed_run_dir, without training); flags.txt parses back to the same
    TractConfig, and a resume that changes one is refused. Bad values are one-line flag errors."""
    import json
    from cud_tf import run_dir as run_dir_lib
    from trainers import common
    run_dir = str(tmp_path / "btd")
    os.chdir(ROOT)

    def parse_config(*args):
        FLAGS.unparse_flags()
        FLAGS(["trainers.tract", *args])
        return tract_trainer.tract_config(num_classes=0)

    with flagsaver.flagsaver():
        cfg = parse_config("--flagfile=configs/btd_mnist.cfg", f"--run_dir={run_dir}")
        assert (cfg.offsets, cfg.second_step, cfg.inference_ema_decay, cfg.clip_x0) == ("tops", "teacher", 0.9, False)
        assert cfg.inference_decay == 0.9 and not cfg.uses_self_teacher
        arch, config = tract_trainer.run_records(cfg, tiny_unet_config(), "ckpt-7")
        with common.claimed_run_dir(arch, config, chief=True):
            pass
        objective = json.load(open(os.path.join(run_dir, run_dir_lib.CONFIG)))["objective"]
        assert {k: objective[k] for k in ("offsets", "second_step", "inference_ema_decay", "clip_x0")} == dict(
            offsets="tops", second_step="teacher", inference_ema_decay=0.9, clip_x0=False)
        text = open(os.path.join(run_dir, run_dir_lib.FLAGS_FILE)).read().splitlines()
        for line in ("--tract_offsets=tops", "--tract_second_step=teacher", "--tract_inference_ema=0.9",
                     "--notract_clip_x0"):
            assert line in text

        flags_file = f"--flagfile={run_dir}/{run_dir_lib.FLAGS_FILE}"
        assert parse_config(flags_file) == cfg  # a resume from the run's flags keeps every option
        parse_config(flags_file, "--tract_second_step=self_teacher")
        with pytest.raises(run_dir_lib.RunError, match="tract_second_step: teacher recorded vs self_teacher now"):
            with common.claimed_run_dir(arch, config, chief=True):
                pass

        for bad, match in ((["--tract_inference_ema=fast"], "expected 'tract' or a decay"),
                           (["--tract_inference_ema=1"], "expected 'tract' or a decay"),
                           (["--tract_schedule=1024,32,1", "--train_steps=120"], "S = 2")):
            with pytest.raises(flags.ValidationError, match=match):
                parse_config("--flagfile=configs/btd_mnist.cfg", *bad)
        tract_cfg = parse_config("--flagfile=configs/tract_mnist.cfg")  # TRACT keeps its own choices
        assert (tract_cfg.offsets, tract_cfg.second_step, tract_cfg.inference_ema_decay) == ("all", "self_teacher",
                                                                                            None)

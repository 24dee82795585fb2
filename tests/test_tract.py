"""TRACT: the two-stage target, bias-corrected EMAs, phase switches without retracing, and the trainer end to end."""
import os

import numpy as np
import pytest
import tensorflow as tf
from absl import flags
from absl.testing import flagsaver

from helpers import ROOT, tiny_unet_config
from cud_tf.models import tract as tract_model
from cud_tf.models.base import OptimConfig, copy_weights
from cud_tf.networks.unet import VelocityUNet
from cud_tf.objectives import tract
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
    net_cfg = tiny_unet_config(num_classes=3)
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
    net_cfg = tiny_unet_config()
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

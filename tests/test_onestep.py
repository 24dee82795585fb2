"""The one-step stage: objective, trajectory targets, stage bounds, the moving f_EMA and the evaluated weights of
OnestepModel, and the one-step trainer on a tiny CUD run."""
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from absl import flags
from absl.testing import flagsaver

from helpers import tiny
from cud_tf import onestep, sampling
from cud_tf.disback_path import weight_items
from cud_tf import run_dir as run_dir_lib
from cud_tf.models.base import OptimConfig, ema_variables
from cud_tf.models.onestep import OnestepModel
from cud_tf.networks.unet import VelocityUNet
from cud_tf.objectives import OBJECTIVES, Nets
from cud_tf.objectives.onestep import OnestepConfig
from trainers import cud as cud_trainer
from trainers import common
from trainers import onestep as onestep_trainer

from helpers import ROOT, TINY, parse

FLAGS = flags.FLAGS
cud_trainer.define_flags()
onestep_trainer.define_flags()
B = 4


def test_objective_is_zero_at_its_own_one_step_map_and_counts_the_pull_to_f_ema():
    net = VelocityUNet(tiny(), name="f").build_variables()
    other = VelocityUNet(tiny(), name="g").build_variables()
    z = tf.random.stateless_normal([3, 8, 8, 1], seed=[0, 1])
    ones = tf.ones([3])
    target = z - net(z, ones, head=1)
    cfg = OnestepConfig(reg_weight=0.1)
    out = OBJECTIVES["onestep"](Nets(velocity=net, extra={"f_ema": net}), {"z": z, "target": target}, None, 0, cfg)
    np.testing.assert_allclose(out.per_example["velocity"].numpy(), 0.0, atol=1e-10)
    out = OBJECTIVES["onestep"](Nets(velocity=net, extra={"f_ema": other}), {"z": z, "target": target}, None, 0, cfg)
    reg = tf.reduce_mean(tf.square(net(z, ones, head=1) - other(z, ones, head=1)), axis=[1, 2, 3])
    np.testing.assert_allclose(out.per_example["velocity"].numpy(), 0.1 * reg.numpy(), rtol=1e-5)


def test_trajectory_targets_are_x0_hat_along_the_euler_sampler():
    net = VelocityUNet(tiny(), name="f").build_variables()
    z = tf.random.stateless_normal([2, 8, 8, 1], seed=[0, 2])
    targets = onestep.trajectory_targets(net, z, None, (0, 2, 4), 4, 1)
    v = sampling.velocity_fn(net)
    np.testing.assert_allclose(targets[0].numpy(), (z - v(z, tf.ones([2]))).numpy(), atol=1e-6)
    half = z - 0.25 * v(z, tf.ones([2]))
    x_half = half - 0.25 * v(half, tf.fill([2], 0.75))
    np.testing.assert_allclose(targets[1].numpy(), (x_half - 0.5 * v(x_half, tf.fill([2], 0.5))).numpy(), atol=1e-5)
    np.testing.assert_allclose(targets[2].numpy(), sampling.generate(net, z, 4).numpy(), atol=1e-5)
    # The endpoint is the sampler's own result, op for op.
    np.testing.assert_array_equal(targets[2].numpy(), sampling.generate(net, z, 4).numpy())


def _previous_euler_targets(net, z, stages, num_steps, head):
    """The trainer's own Euler loop before the solve moved onto cud_tf/solvers.py (Python-float times)."""
    from cud_tf import interpolants
    v = sampling.velocity_fn(net, head, None)
    x, out = z, {}
    for i in range(max(stages) + 1):
        t = 1.0 - i / num_steps
        if t <= 0.0:
            out[i] = x
            break
        v_i = v(x, tf.fill(tf.shape(x)[:1], t))
        if i in stages:
            out[i] = interpolants.x0_from_v(x_t=x, v=v_i, t=t)
        x = x - v_i / num_steps
    return tf.stack([out[m] for m in stages])


@pytest.mark.parametrize("stages,num_steps,head", [((8, 11, 14), 16, 1), ((1, 3, 5), 5, 2)])
def test_trajectory_targets_equal_the_previous_euler_loop(stages, num_steps, head):
    tf.keras.utils.set_random_seed(1)
    net = VelocityUNet(tiny(num_heads=2), name="f").build_variables()
    # Perturbed weights: a velocity far from zero (the output convs start near zero) that varies along the path.
    rng = np.random.RandomState(0)
    net.set_weights([w + rng.normal(0.0, 0.2, w.shape).astype(w.dtype) for w in net.get_weights()])
    z = tf.random.stateless_normal([3, 8, 8, 1], seed=[0, 3])
    new = onestep.trajectory_targets(net, z, None, stages, num_steps, head).numpy()
    old = _previous_euler_targets(net, z, stages, num_steps, head).numpy()
    assert new.shape == (3, 3, 8, 8, 1)
    np.testing.assert_allclose(new, old, rtol=1e-5, atol=1e-5)  # float32 rounding of t = 1 - i/N and of h only
    assert not np.allclose(new[0], new[-1], atol=1e-3)  # the stages are different points of the trajectory
    with pytest.raises(ValueError, match="must lie in"):
        onestep.trajectory_targets(net, z, None, (num_steps + 1,), num_steps, head)


def test_stage_bounds_split_evenly_or_count_each_stage():
    assert onestep.stage_bounds(3, train_steps=600) == [200, 400, 600]
    assert onestep.stage_bounds(2, train_steps=9) == [4, 9]  # remainder to the last stage
    assert onestep.stage_bounds(3, train_steps=600, stage_steps=(5,)) == [5, 10, 15]  # one count for every stage
    assert onestep.stage_bounds(3, stage_steps=(1, 2, 3)) == [1, 3, 6]
    for kw, match in [(dict(train_steps=2), "fewer than"), (dict(stage_steps=(1, 2)), "give one value or 3"),
                      (dict(stage_steps=(1, 0, 2)), ">= 1"), (dict(), "give either")]:
        with pytest.raises(ValueError, match=match):
            onestep.stage_bounds(3, **kw)


def _model(strategy, f_ema_decay=0.5, eval_weights="student", ema_decay=0.9):
    cfg = tiny()
    with strategy.scope():
        tf.keras.utils.set_random_seed(0)
        net = VelocityUNet(cfg, name="velocity").build_variables()
        f_ema = VelocityUNet(cfg, name="f_ema").build_variables()
        f_ema.set_weights(net.get_weights())
        return OnestepModel(net, f_ema, OnestepConfig(), OptimConfig(learning_rate=1e-2, ema_decay=ema_decay),
                            global_batch_size=B, seed=1, f_ema_decay=f_ema_decay,
                            eval_weights=eval_weights)


def _stepper(strategy, model):
    """One compiled step (traced once) on a fixed batch: step(nan=False) -> metrics summed over replicas; with
    nan=True the noise is NaN, so the update is skipped."""
    z = np.random.RandomState(0).normal(size=(B, 8, 8, 1)).astype(np.float32)
    batch = {"z": z, "target": (0.5 * z).astype(np.float32), "label": np.zeros(B, np.int32)}
    it = iter(strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors(batch).repeat()))
    poison = tf.Variable(0.0)  # NaN poisons the noise

    @tf.function
    def run():
        out = strategy.run(lambda b: model.train_step(dict(b, z=b["z"] + poison)), args=(next(it),))
        return {k: strategy.reduce("SUM", v, axis=None) for k, v in out.items()}

    def step(nan=False):
        poison.assign(np.nan if nan else 0.0)
        return run()

    return step


def _values(variables):
    return [np.array(v.numpy(), np.float64) for v in variables]


def _assert_close(got_variables, want, atol=1e-6):
    for got, w in zip(_values(got_variables), want, strict=True):
        np.testing.assert_allclose(got, w, atol=atol)


def test_f_ema_is_the_closed_form_ema_of_the_student_and_skips_nonfinite_updates(strategy):
    model = _model(strategy, f_ema_decay=0.5, eval_weights="ema", ema_decay=0.9)
    step = _stepper(strategy, model)
    student = lambda: _values(model.net.trainable_variables)  # noqa: E731
    evaluated = ema_variables(model.optimizers_by_group["velocity"])  # what samples, evaluation and export read
    expected, keras_ema = _values(model.f_ema_variables), None  # f_EMA starts as the weights it was given
    np.testing.assert_array_equal(expected[0], student()[0])
    for _ in range(3):
        step()
        theta = student()
        expected = [0.5 * e + 0.5 * t for e, t in zip(expected, theta)]
        _assert_close(model.f_ema_variables, expected)
        # eval_weights="ema": Keras' formula on every update, a copy on the first: ema = m ema + (1 - m) theta.
        keras_ema = theta if keras_ema is None else [0.9 * e + 0.1 * t for e, t in zip(keras_ema, theta)]
        _assert_close(evaluated, keras_ema)
    assert max(np.abs(t - e).max() for t, e in zip(theta, expected)) > 1e-4  # f_EMA lags the student
    assert max(np.abs(t - e).max() for t, e in zip(theta, keras_ema)) > 1e-5  # so does the evaluated EMA
    before = _values(model.f_ema_variables)
    assert float(step(nan=True)["nonfinite"]) == 1.0  # skipped: the student and f_EMA stay as they were
    assert int(model.skipped_updates.numpy()) == 1 and int(model.step.numpy()) == 4
    for got, want in zip(_values(model.f_ema_variables), before):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(student()[0], theta[0])
    step()  # moves again on the next applied update
    _assert_close(model.f_ema_variables, [0.5 * e + 0.5 * t for e, t in zip(before, student())])
    assert int(model.f_ema_updates.numpy()) == 4


def test_student_eval_weights_are_the_raw_student_and_decay_one_freezes_f_ema():
    model = _model(tf.distribute.get_strategy(), f_ema_decay=1.0, eval_weights="student", ema_decay=0.9)
    step = _stepper(tf.distribute.get_strategy(), model)
    f_ema0 = _values(model.f_ema_variables)
    for _ in range(2):
        step()
        # The optimizer's EMA slots (what samples, evaluation and export read) hold the raw student.
        for avg, var in zip(ema_variables(model.optimizers_by_group["velocity"]), model.net.trainable_variables,
                            strict=True):
            np.testing.assert_array_equal(avg.numpy(), var.numpy())
    for got, want in zip(_values(model.f_ema_variables), f_ema0):
        np.testing.assert_array_equal(got, want)
    assert max(np.abs(a - b).max() for a, b in zip(_values(model.net.trainable_variables), f_ema0)) > 1e-4
    with pytest.raises(ValueError, match="eval_weights"):
        _model(tf.distribute.get_strategy(), eval_weights="teacher")


def _mean_loss(net, f_ema, pairs, stage):
    batch = {"z": tf.constant(pairs["z"]), "target": tf.constant(pairs["target"][stage])}
    out = OBJECTIVES["onestep"](Nets(velocity=net, extra={"f_ema": f_ema}), batch, None, 0, OnestepConfig())
    return float(tf.reduce_mean(out.per_example["velocity"]))


def test_onestep_trainer_fine_tunes_a_cud_run(tiny_cud_run, tmp_path):
    init_dir, run_dir = tiny_cud_run["run_dir"], str(tmp_path / "onestep")  # CUD K=2 with a noise encoder
    logs = []
    with flagsaver.flagsaver():
        parse(f"--flagfile={ROOT}/configs/mnist_onestep.cfg", f"--init_run_dir={init_dir}", f"--run_dir={run_dir}",
              "--onestep_stages=2,3", "--onestep_grid_steps=4", "--onestep_num_pairs=16", "--train_steps=100",
              "--onestep_stage_steps=3,5", "--onestep_f_ema_decay=0.5", "--learning_rate=5e-4", "--warmup_steps=0",
              *TINY)
        onestep_trainer.run(log=logs.append)
    assert [line for line in logs if line.startswith("stage")] == [
        "stage 1/2: targets x0_hat at step 2 of 4, iterations 0..3",
        "stage 2/2: targets x0_hat at step 3 of 4, iterations 3..8"]

    with np.load(os.path.join(run_dir, onestep.TRAJECTORIES)) as f:
        pairs = {k: f[k] for k in ("z", "target")}
    assert pairs["z"].shape == (16, 28, 28, 1) and pairs["target"].shape == (2, 16, 28, 28, 1)
    init = run_dir_lib.load_run(init_dir).net
    before = _mean_loss(init, init, pairs, 1)
    trained = run_dir_lib.load_run(run_dir, weights="train").net
    after = _mean_loss(trained, init, pairs, 1)
    assert after < 0.8 * before, (before, after)

    # The run directory is a run like any other: the teacher's network, loadable for evaluation.
    with open(os.path.join(init_dir, "arch.json")) as f:
        teacher_arch = json.load(f)
    with open(os.path.join(run_dir, "arch.json")) as f:
        arch = json.load(f)
    assert arch == {**teacher_arch, "noise_encoder": False}
    loaded = run_dir_lib.load_run(run_dir)
    assert loaded.step == 8 and loaded.config.base_channels == 8
    # The per-stage counts replace --train_steps; the teacher's data set is the run's (the evaluator's reference).
    assert loaded.run_config["stage_ends"] == [3, 8] and loaded.run_config["dataset"] == "mnist_offline"
    # Evaluated weights: the raw student (the default), recorded in flags.txt and config.json.
    assert common.read_run_flags(run_dir)["onestep_eval_weights"] == "student"
    assert loaded.run_config["eval_weights"] == "student"
    for a, b in zip(loaded.net.trainable_variables, trained.trainable_variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    # f_EMA moved off the CUD run's EMA weights (where it starts) and is checkpointed with its update count.
    reader = tf.train.load_checkpoint(loaded.checkpoint)
    assert reader.get_tensor("f_ema_updates/.ATTRIBUTES/VARIABLE_VALUE") == 8
    start = weight_items(init)  # the CUD run's EMA weights, by checkpoint key
    assert len(start) > 10
    moved = max(np.abs(reader.get_tensor(f"net_f_ema/{key.replace('/', '.S')}/.ATTRIBUTES/VARIABLE_VALUE")
                       - v.numpy()).max() for key, v in start)
    assert moved > 1e-5, moved


def test_onestep_flags_fail_with_one_line(tmp_path):
    with flagsaver.flagsaver():
        parse(f"--flagfile={ROOT}/configs/mnist_onestep.cfg", "--init_run_dir=/nonexistent",
              f"--run_dir={tmp_path}/o", "--onestep_stage_steps=1,2")
        with pytest.raises(flags.ValidationError, match="give one value or 3"):
            onestep_trainer.check_flags()
        FLAGS.onestep_stage_steps = ["a"]
        with pytest.raises(flags.ValidationError, match="comma-separated list of integers"):
            onestep_trainer.check_flags()

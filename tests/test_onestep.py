"""The one-step objective, the stored trajectory targets, and the one-step trainer on a tiny CUD run."""
import json
import os

import numpy as np
import tensorflow as tf
from absl import flags
from absl.testing import flagsaver

from helpers import tiny_unet_config
from cud_tf import sampling
from cud_tf import run_dir as run_dir_lib
from cud_tf.networks.unet import VelocityUNet
from cud_tf.objectives import OBJECTIVES, Nets
from cud_tf.objectives.onestep import OnestepConfig
from trainers import cud as cud_trainer
from trainers import onestep as onestep_trainer

from test_trainer import ROOT, TINY, parse

FLAGS = flags.FLAGS
cud_trainer.define_flags()
onestep_trainer.define_flags()


def test_objective_is_zero_at_its_own_one_step_map_and_counts_the_pull_to_f_ema():
    net = VelocityUNet(tiny_unet_config(), name="f").build_variables()
    other = VelocityUNet(tiny_unet_config(), name="g").build_variables()
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
    net = VelocityUNet(tiny_unet_config(), name="f").build_variables()
    z = tf.random.stateless_normal([2, 8, 8, 1], seed=[0, 2])
    targets = onestep_trainer.trajectory_targets(net, z, None, (0, 2, 4), 4, 1)
    v = sampling.velocity_fn(net)
    np.testing.assert_allclose(targets[0].numpy(), (z - v(z, tf.ones([2]))).numpy(), atol=1e-6)
    half = z - 0.25 * v(z, tf.ones([2]))
    x_half = half - 0.25 * v(half, tf.fill([2], 0.75))
    np.testing.assert_allclose(targets[1].numpy(), (x_half - 0.5 * v(x_half, tf.fill([2], 0.5))).numpy(), atol=1e-5)
    np.testing.assert_allclose(targets[2].numpy(), sampling.generate(net, z, 4).numpy(), atol=1e-5)


def _mean_loss(net, f_ema, pairs, stage):
    batch = {"z": tf.constant(pairs["z"]), "target": tf.constant(pairs["target"][stage])}
    out = OBJECTIVES["onestep"](Nets(velocity=net, extra={"f_ema": f_ema}), batch, None, 0, OnestepConfig())
    return float(tf.reduce_mean(out.per_example["velocity"]))


def test_onestep_trainer_fine_tunes_a_cud_run(mnist_data_dir, tmp_path):
    init_dir, run_dir = str(tmp_path / "cud"), str(tmp_path / "onestep")
    with flagsaver.flagsaver():
        parse(f"--flagfile={ROOT}/configs/mnist_quick.cfg", f"--data_dir={mnist_data_dir}", f"--run_dir={init_dir}",
              "--noise_encoder", "--train_steps=4", *TINY,
              # A teacher whose velocity is far from zero and varies along t, so the targets differ from z - f(z, 1).
              "--learning_rate=1e-2", "--warmup_steps=0", "--ema_decay=0")
        cud_trainer.run()
    with flagsaver.flagsaver():
        parse(f"--flagfile={ROOT}/configs/mnist_onestep.cfg", f"--init_run_dir={init_dir}", f"--run_dir={run_dir}",
              "--onestep_stages=2,3", "--onestep_grid_steps=4", "--onestep_num_pairs=16", "--train_steps=8",
              "--learning_rate=5e-4", "--warmup_steps=0", *TINY)
        onestep_trainer.run(log=lambda _: None)

    with np.load(os.path.join(run_dir, onestep_trainer.TRAJECTORIES)) as f:
        pairs = {k: f[k] for k in ("z", "target")}
    assert pairs["z"].shape == (16, 28, 28, 1) and pairs["target"].shape == (2, 16, 28, 28, 1)
    init = run_dir_lib.load_run(init_dir).net
    before = _mean_loss(init, init, pairs, 1)
    after = _mean_loss(run_dir_lib.load_run(run_dir, weights="train").net, init, pairs, 1)
    assert after < 0.8 * before, (before, after)

    # The run directory is a run like any other: the teacher's network, loadable for evaluation.
    with open(os.path.join(init_dir, "arch.json")) as f:
        teacher_arch = json.load(f)
    with open(os.path.join(run_dir, "arch.json")) as f:
        arch = json.load(f)
    assert arch == {**teacher_arch, "noise_encoder": False}
    loaded = run_dir_lib.load_run(run_dir)
    assert loaded.step == 8 and loaded.flags["channels"] == "8" and loaded.flags["data_dir"] == mnist_data_dir

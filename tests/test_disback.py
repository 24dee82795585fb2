"""DisBack: the distribution-matching gradient, the recorded path, target switches, and both stages end to end."""
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from absl import flags
from absl.testing import flagsaver

from helpers import ROOT, read_checkpoint_weights, tiny
from cud_tf import disback_path as disback
from cud_tf import execution
from cud_tf.models.base import OptimConfig, clone_network, ema_variables
from cud_tf.models.disback import DisbackModel
from cud_tf.networks.unet import VelocityUNet
from cud_tf.objectives import disback as objective
from trainers import cud as cud_trainer
from trainers import disback as disback_trainer

FLAGS = flags.FLAGS

cud_trainer.define_flags()
disback_trainer.define_flags()


def test_generator_loss_gradient_with_respect_to_the_samples_is_g():
    rs = np.random.RandomState(0)
    shape = (3, 4, 4, 2)
    x_g, eps, v_fake, v_target = (tf.constant(rs.normal(size=shape), tf.float32) for _ in range(4))
    t = tf.constant([0.1, 0.5, 0.9])
    x_t = (1 - t[:, None, None, None]) * x_g + t[:, None, None, None] * eps
    g = objective.dm_gradient(v_fake, v_target, x_g, x_t, t)
    # g by hand, in float64: t (v_target - v_fake) / mean|x_g - (x_t - t v_target)|.
    tt = t.numpy()[:, None, None, None].astype(np.float64)
    x0_target = x_t.numpy() - tt * v_target.numpy()
    scale = np.abs(x_g.numpy() - x0_target).mean(axis=(1, 2, 3), keepdims=True)
    np.testing.assert_allclose(g.numpy(), tt * (v_target.numpy() - v_fake.numpy()) / scale, rtol=1e-4, atol=1e-6)
    with tf.GradientTape() as tape:
        tape.watch(x_g)
        loss = tf.reduce_sum(objective.generator_loss(x_g, g))
    np.testing.assert_allclose(tape.gradient(loss, x_g).numpy(), g.numpy(), rtol=1e-6, atol=1e-7)
    assert np.abs(g.numpy()).max() > 0.01  # not a trivially zero gradient


def test_guidance_applies_to_the_target_only():
    """Class-conditional DisBack: the target's velocity is guided (w = 2.5), the fake's and generator's are not."""
    from cud_tf import interpolants
    from cud_tf.objectives.common import Nets, distance
    gen, fake, target = tiny_nets(["velocity", "fake", "target"], num_classes=3)
    for i, net in enumerate((fake, target)):
        for v in net.trainable_variables:
            v.assign(v + 0.05 * tf.random.stateless_normal(v.shape, [i, 7]))
    batch = {"image": tf.zeros([4, 8, 8, 1]), "label": tf.constant([0, 1, 2, 1])}
    cfg = objective.DisbackConfig(guidance_scale=2.5)
    rng = interpolants.Rng(interpolants.fold_seed(0, 3))
    out = objective.loss(Nets(velocity=gen, teacher=target, extra={"fake": fake}), batch, rng, 3, cfg)

    y, x = batch["label"], batch["image"]  # the same stateless draws, by hand
    x_g = objective.generate(gen, rng.normal("gen_z", x), y, head=1)
    t = 0.02 + 0.96 * rng.uniform("dm_t", 4)
    x_t = interpolants.x_t(x0=x_g, z=rng.normal("dm_eps", x), t=t)
    v_fake = fake(x_t, t, y, head=1)
    v_cond, v_uncond = target(x_t, t, y, head=1), target(x_t, t, tf.fill([4], 3), head=1)
    for w, expect_equal in ((2.5, True), (1.0, False)):
        v_target = v_uncond + w * (v_cond - v_uncond)
        g = objective.dm_gradient(v_fake, v_target, x_g, x_t, t)
        expected = 0.5 * tf.reduce_sum(tf.square(g), axis=[1, 2, 3])
        assert np.allclose(out.per_example["velocity"].numpy(), expected.numpy(), rtol=1e-4) == expect_equal
        gap = distance(v_fake, v_target).numpy()
        assert np.allclose(out.metrics["fake_target_gap"].numpy(), gap, rtol=1e-4) == expect_equal


def test_node_schedule_walks_back_to_the_teacher():
    assert disback.node_schedule(4, [10]) == [(0, 3), (10, 2), (20, 1), (30, 0)]
    schedule = disback.node_schedule(3, [5, 20])
    assert schedule == [(0, 2), (5, 1), (25, 0)]
    nodes = [disback.target_node(k, schedule) for k in range(30)]
    assert nodes == [2] * 5 + [1] * 20 + [0] * 5
    assert disback.node_schedule(1, [7]) == [(0, 0)]  # one node: the teacher is the target at once
    assert disback.node_schedule(0, []) == [(0, 0)]  # path off
    with pytest.raises(ValueError, match="one per node"):
        disback.node_schedule(4, [1, 2])


def tiny_nets(names, **overrides):
    cfg = tiny(**overrides)
    first = VelocityUNet(cfg, name=names[0]).build_variables()
    return [first] + [clone_network(first, n) for n in names[1:]]


def _perturbed(nets, scale=0.05):
    """Random offsets on every weight (a different draw per network), so that heads and networks all differ."""
    for i, net in enumerate(nets):
        for j, v in enumerate(net.trainable_variables):
            v.assign(v + scale * tf.random.stateless_normal(v.shape, [i + 11, j]))
    return nets


def _largest(grads):
    """max |gradient| over a list that may hold None (a variable the loss never reads)."""
    return max([float(tf.reduce_max(tf.abs(g))) for g in grads if g is not None] + [0.0])


def test_both_stages_train_and_read_only_the_configured_head():
    """A 2-head teacher distilled through head 2 (--sample_head=2): the generator's sample, the fake's RF fit, the
    fake's velocity in g, the target and stage 1 all use head 2; head 1's output layers get no gradient and
    changing them changes no loss."""
    from cud_tf import interpolants
    from cud_tf.objectives.common import Nets
    gen, fake, target, deg, gen0 = _perturbed(tiny_nets(["velocity", "fake", "target", "degradation", "generator0"],
                                                        num_heads=2))
    cfg = objective.DisbackConfig(head=2)
    batch = {"image": tf.zeros([4, 8, 8, 1]), "label": tf.zeros([4], tf.int32)}
    rng = interpolants.Rng(interpolants.fold_seed(0, 5))
    nets = Nets(velocity=gen, teacher=target, extra={"fake": fake})
    deg_nets = Nets(velocity=deg, extra={"generator0": gen0})

    def losses():
        out = objective.loss(nets, batch, rng, 4, cfg)
        return dict(generator=tf.reduce_sum(out.per_example["velocity"]), fake=tf.reduce_sum(out.per_example["fake"]),
                    fake_only=tf.reduce_sum(objective.fake_loss(nets, batch, rng, 3, cfg).per_example["fake"]),
                    degradation=tf.reduce_sum(objective.degradation_loss(deg_nets, batch, rng, 0, cfg)
                                              .per_example["velocity"]))

    with tf.GradientTape(persistent=True) as tape:
        before = losses()
    for name, net in (("generator", gen), ("fake", fake), ("fake_only", fake), ("degradation", deg)):
        head1, head2 = (tape.gradient(before[name], net.heads[k].trainable_variables) for k in (0, 1))
        assert _largest(head1) == 0.0, f"{name}: head 1 of {net.name} has a gradient"
        assert _largest(head2) > 0.0, f"{name}: head 2 of {net.name} has no gradient"
    assert _largest(tape.gradient(before["generator"], fake.trainable_variables)) == 0.0  # the fake score: no grad
    # Head 1 of every network changes no loss (the fake score in g and the target included); head 2 of the
    # fake does change the generator's loss (through its velocity in g).
    _perturbed([fake.heads[0], target.heads[0], gen.heads[0], gen0.heads[0], deg.heads[0]], scale=0.5)
    after = losses()
    for name in before:
        assert float(after[name]) == float(before[name]), name
    _perturbed([fake.heads[1]], scale=0.5)
    assert abs(float(losses()["generator"]) - float(before["generator"])) > 1e-6 * abs(float(before["generator"]))


def test_path_nodes_are_ordered_loadable_and_verified(tmp_path):
    net, target = tiny_nets(["degradation", "target"])
    path = disback.DegradationPath(str(tmp_path / "path"))
    written = []
    for i in range(3):
        for v in net.trainable_variables:
            v.assign(v + 0.01 * (i + 1))
        path.write_node(i, 10 * i, net, record_every=10)
        written.append([v.numpy() for v in net.trainable_variables])
    path.check_complete(2)
    assert [(n["index"], n["step"]) for n in path.nodes()] == [(0, 0), (1, 10), (2, 20)]
    with pytest.raises(disback.PathError, match="not 0..3"):
        path.check_complete(3)
    for i in (2, 0, 1):  # any order: each read gives that node's weights, into a network of another name
        path.load_node(i, target)
        for a, b in zip(written[i], target.trainable_variables):
            np.testing.assert_array_equal(a, b.numpy())
        stored = read_checkpoint_weights(os.path.join(path.directory, f"node_{i:03d}"), target)
        for a, (_, b) in zip(stored, disback.weight_items(target)):
            np.testing.assert_array_equal(a, b.numpy())
    # Tampered weights are caught by the manifest's fingerprint.
    manifest = path.manifest()
    manifest["nodes"][1]["sha256"] = "0" * 64
    with open(path.manifest_path, "w") as f:
        json.dump(manifest, f)
    with pytest.raises(disback.PathError, match="differ"):
        path.load_node(1, target)
    other = VelocityUNet(tiny(base_channels=4), name="other").build_variables()
    with pytest.raises(disback.PathError, match="cannot read"):
        path.load_node(0, other)


def test_generator_updates_every_kth_step_fake_every_step_in_one_trace(tmp_path):
    generator, fake, target = tiny_nets(["velocity", "fake", "target"])
    for v in fake.trainable_variables:  # a fake that differs from the target, so g != 0
        v.assign(v + 0.05 * tf.random.stateless_normal(v.shape, [1, 2]))
    path = disback.DegradationPath(str(tmp_path / "path"))
    path.write_node(0, 0, target)
    cfg = objective.DisbackConfig(fake_updates_per_generator=3)
    model = DisbackModel(generator, fake, target, cfg, OptimConfig(learning_rate=1e-3, ema_decay=0.5),
                                 global_batch_size=4)
    model.set_target(path, 0)
    images = np.zeros((4, 8, 8, 1), np.float32)
    it = iter(tf.data.Dataset.from_tensors({"image": images, "label": np.zeros(4, np.int32)}).repeat())
    step = tf.function(lambda: model.train_step(next(it)))
    values = lambda vs: [v.numpy() for v in vs]  # noqa: E731
    changed = lambda a, b: max(np.abs(x - y).max() for x, y in zip(a, b)) > 0  # noqa: E731
    target0 = values(target.variables)
    gen_changes, fake_changes, gen_losses = [], [], []
    for _ in range(6):
        g0, f0 = values(model.group_vars["velocity"]), values(model.group_vars["fake"])
        out = step()
        gen_changes.append(changed(g0, values(model.group_vars["velocity"])))
        fake_changes.append(changed(f0, values(model.group_vars["fake"])))
        gen_losses.append(float(out["generator_loss"]))
    assert gen_changes == [False, False, True, False, False, True]  # the last step of every 3
    assert all(fake_changes)
    assert gen_losses[2] > 0 and gen_losses[1] == 0.0
    assert step.experimental_get_tracing_count() == 1
    assert not changed(target0, values(target.variables))  # the target is frozen
    # The generator's optimizer counted its own updates only.
    assert int(model.optimizers_by_group["velocity"].iterations.numpy()) == 2
    assert int(model.optimizers_by_group["fake"].iterations.numpy()) == 6
    # By default (eval_weights="generator") what samples, the evaluator and export read, the generator
    # optimizer's EMA slots (ema_net after sync_ema), is the raw generator despite ema_decay=0.5.
    model.sync_ema()
    ema = ema_variables(model.optimizers_by_group["velocity"])
    for raw, avg in zip(generator.trainable_variables, ema, strict=True):
        np.testing.assert_array_equal(avg.numpy(), raw.numpy())
    for shown, raw in zip(model.ema_net.get_weights(), generator.get_weights(), strict=True):
        np.testing.assert_array_equal(shown, raw)


@pytest.mark.parametrize("ratio,expected_xla", [(1, False), (5, True)])
def test_xla_probe_weighs_the_step_kinds_by_how_often_they_run(tmp_path, monkeypatch, ratio, expected_xla):
    """--jit_compile unset times a generator step and, with a ratio k > 1, a fake-only step, and weighs them
    1 : k - 1: here the generator step is faster in graph mode and the fake-only step under XLA."""
    monkeypatch.setenv("CUD_TF_CACHE", str(tmp_path))
    seconds = {(False, 0): 1.0, (True, 0): 2.0, (False, 1): 1.0, (True, 1): 0.5}
    timed = []

    def fake_timer(fns, steps, warmup):
        timed.append(sorted(fns))
        return {k: [seconds[k]] * steps for k in fns}

    monkeypatch.setattr(execution, "interleaved_times", fake_timer)
    model = DisbackModel(*tiny_nets(["velocity", "fake", "target"]),
                         objective.DisbackConfig(fake_updates_per_generator=ratio), OptimConfig(), global_batch_size=4)
    assert model.step_kinds() == [(objective.loss, 1)] + ([(objective.fake_loss, ratio - 1)] if ratio > 1 else [])
    batch = {"image": np.zeros((4, 8, 8, 1), np.float32), "label": np.zeros(4, np.int32)}
    choice = execution.choose_xla(model, tf.distribute.get_strategy(), batch, log=lambda _: None)
    assert timed == [[(False, 0), (True, 0)] if ratio == 1 else [(False, 0), (False, 1), (True, 0), (True, 1)]]
    mean = lambda xla: (seconds[xla, 0] + (ratio - 1) * seconds.get((xla, 1), 0)) / ratio  # noqa: E731
    assert choice["xla"] is expected_xla and model.xla is expected_xla
    assert (choice["graph_s"], choice["xla_s"]) == (mean(False), mean(True))


def test_eval_weights_ema_keeps_the_generator_ema_decay():
    """eval_weights="ema": the generator's EMA slots average with --ema_decay (the one-step stage's mechanism,
    whose arithmetic tests/test_onestep.py checks); "generator" sets that momentum to 0; the fake's is untouched."""
    nets = tiny_nets(["velocity", "fake", "target"])
    cfg, optim = objective.DisbackConfig(), OptimConfig(ema_decay=0.5)
    momenta = {}
    for eval_weights in ("generator", "ema"):
        model = DisbackModel(*nets, cfg, optim, global_batch_size=4, eval_weights=eval_weights)
        momenta[eval_weights] = {g: float(o.ema_momentum) for g, o in model.optimizers_by_group.items()}
    assert momenta == {"generator": {"velocity": 0.0, "fake": 0.5}, "ema": {"velocity": 0.5, "fake": 0.5}}
    with pytest.raises(ValueError, match="eval_weights must be 'generator' or 'ema'"):
        DisbackModel(*nets, cfg, optim, global_batch_size=4, eval_weights="student")


@pytest.mark.parametrize("name,ratio", [("disback_mnist.cfg", 5), ("disback_cifar10.cfg", 5),
                                        ("disback_mnist_paper.cfg", 1)])
def test_flagfiles_parse(name, ratio):
    with flagsaver.flagsaver():
        os.chdir(ROOT)
        FLAGS.unparse_flags()
        FLAGS(["trainers.disback", f"--flagfile=configs/{name}"])
        schedule = disback_trainer.node_schedule()
        assert schedule[0] == (0, FLAGS.disback_num_nodes - 1) and schedule[-1][1] == 0
        assert schedule[-1][0] < FLAGS.train_steps  # the teacher is the target for the last iterations
        cfg = disback_trainer.disback_config(num_classes=0)
        assert cfg.fake_updates_per_generator == ratio
        if name == "disback_mnist_paper.cfg":  # the paper's schedule: 5 nodes, longer on the nodes near the teacher
            assert FLAGS.disback_num_nodes == 5 and FLAGS.disback_eval_weights == "generator"
            lengths = [b[0] - a[0] for a, b in zip(schedule, schedule[1:])]
            assert len(lengths) == 4 and lengths == sorted(lengths) and lengths[0] < lengths[-1]
            assert FLAGS.learning_rate == FLAGS.disback_fake_learning_rate


_DEFAULT_WEIGHTS = []


def test_generator_fake_cycles_under_each_strategy_equal_the_default(strategy):
    """Two generator/fake cycles under each strategy (MirroredStrategy over 2 logical CPUs included) give the
    default strategy's weights (the per-group conds run in cross-replica context)."""
    def cycles(strategy):
        with strategy.scope():
            generator, fake, target = tiny_nets(["velocity", "fake", "target"])
            for i, v in enumerate(generator.trainable_variables):
                v.assign(0.1 * tf.random.stateless_normal(v.shape, [3, i]))
            for a, f, t in zip(generator.trainable_variables, fake.trainable_variables, target.trainable_variables):
                f.assign(a + 0.05)
                t.assign(a)
            model = DisbackModel(generator, fake, target, objective.DisbackConfig(fake_updates_per_generator=2),
                                 OptimConfig(learning_rate=1e-3), global_batch_size=4)
        batch = {"image": np.zeros((4, 8, 8, 1), np.float32), "label": np.zeros(4, np.int32)}
        it = iter(strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors(batch).repeat()))
        step = tf.function(lambda: strategy.run(model.train_step, args=(next(it),)))
        for _ in range(4):
            step()
        assert int(model.optimizers_by_group["velocity"].iterations.numpy()) == 2
        assert int(model.optimizers_by_group["fake"].iterations.numpy()) == 4
        return [v.numpy() for v in generator.trainable_variables + fake.trainable_variables]

    default = tf.distribute.get_strategy()
    if not _DEFAULT_WEIGHTS:
        _DEFAULT_WEIGHTS.append(cycles(default))
    weights = _DEFAULT_WEIGHTS[0] if strategy is default else cycles(strategy)
    assert max(np.abs(a - b).max() for a, b in zip(_DEFAULT_WEIGHTS[0], weights)) < 1e-5

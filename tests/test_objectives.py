"""Objectives: CUD catch-up targets against a hand computation, the boundary, shapes and gradients."""
import numpy as np
import pytest
import tensorflow as tf

from helpers import tiny
from cud_tf import interpolants
from cud_tf.networks.unet import VelocityUNet, noise_encoder_config
from cud_tf.objectives import OBJECTIVES, Nets, ObjectiveConfig, cud
from cud_tf.solvers import ORDER_TO_TABLEAU

A, C = -0.7, 0.4


def f_np(x, t):
    """Toy velocity, linear in x and t."""
    return A * x + C * t[:, None]


def f_tf(x, t):
    return A * x + C * tf.reshape(t, [-1, 1, 1, 1])


def hand_slope(x, t, h, k):
    """The standard RK slope of order k, written out (steps downwards in t)."""
    hh = h[:, None]
    k1 = f_np(x, t)
    if k == 1:
        return k1
    if k == 2:
        k2 = f_np(x - hh * k1, t - h)
        return (k1 + k2) / 2
    if k == 3:
        k2 = f_np(x - hh / 2 * k1, t - h / 2)
        k3 = f_np(x - hh * (-k1 + 2 * k2), t - h)
        return (k1 + 4 * k2 + k3) / 6
    k2 = f_np(x - hh / 2 * k1, t - h / 2)
    k3 = f_np(x - hh / 2 * k2, t - h / 2)
    k4 = f_np(x - hh * k3, t - h)
    return (k1 + 2 * k2 + 2 * k3 + k4) / 6


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_catchup_targets_equal_hand_computation(k):
    rs = np.random.RandomState(k)
    x = rs.randn(5, 3).astype(np.float32)
    t = np.array([0.9, 0.6, 0.5, 0.3, 0.05], np.float32)
    h = np.array([0.05, 0.02, 0.06, 0.04, 0.02], np.float32)
    u = rs.randn(5, 3).astype(np.float32)
    got = cud.catchup_targets(f_tf, tf.reshape(x, [5, 1, 1, 3]), t, h, k, ORDER_TO_TABLEAU[k],
                              tf.reshape(u, [5, 1, 1, 3]))
    s = hand_slope(x, t, h, k)
    for i, target in enumerate(got, start=1):
        want = f_np(x - i * h[:, None] * s, t - i * h)
        outside = t - k * h < interpolants.EPS
        want[outside] = u[outside]  # the boundary: t - K h < eps takes the ground truth
        np.testing.assert_allclose(tf.reshape(target, [5, 3]), want, rtol=1e-5, atol=1e-6)
    if k >= 3:  # the last example (t = 0.05, h = 0.02) has t - K h < eps for K >= 3: every target is u there
        assert all(np.allclose(tf.reshape(g, [5, 3])[4], u[4]) for g in got)


@pytest.mark.parametrize("k", [1, 3])
def test_known_first_stage_saves_one_pass_and_changes_nothing(k):
    calls = []

    def f(x_, t_):
        calls.append(int(x_.shape[0]))
        return f_tf(x_, t_)

    x, t, h = tf.random.normal([3, 2, 2, 1], seed=7), tf.constant([0.9, 0.6, 0.4]), tf.constant([0.05, 0.1, 0.02])
    full = cud.catchup_targets(f, x, t, h, k, ORDER_TO_TABLEAU[k], tf.zeros_like(x))
    passes = list(calls)
    calls.clear()
    reused = cud.catchup_targets(f, x, t, h, k, ORDER_TO_TABLEAU[k], tf.zeros_like(x), k1=f_tf(x, t))
    assert calls == passes[1:] and passes[0] == 3  # the slope's k1 pass of the B examples is the one saved
    for a, b in zip(full, reused):
        np.testing.assert_array_equal(a, b)


def test_catchup_targets_carry_no_gradient():
    w = tf.Variable(1.5)
    x = tf.random.normal([2, 2, 2, 1], seed=5)
    with tf.GradientTape() as tape:
        targets = cud.catchup_targets(lambda x_, t_: w * f_tf(x_, t_), x, tf.constant([0.5, 0.7]),
                                      tf.constant([0.1, 0.1]), 2, "heun", tf.zeros_like(x))
        total = tf.add_n([tf.reduce_sum(v) for v in targets])
    assert tape.gradient(total, w) is None


def test_adaptive_weights():
    cfg = ObjectiveConfig(adaptive_weights=True, total_steps=100)
    np.testing.assert_allclose([float(w) for w in cud.loss_weights(25, cfg)], [0.5, 1.5])


@pytest.fixture(scope="module")
def nets():
    cfg = tiny(num_heads=3)
    net = VelocityUNet(cfg).build_variables()
    enc = VelocityUNet(noise_encoder_config(cfg)).build_variables()
    return Nets(velocity=net, catchup=net, encoder=enc)


@pytest.mark.parametrize("method,order,distance", [("rf", 1, "mse"), ("cud", 3, "pseudo_huber"),
                                                   ("cud", 2, "mse")])
def test_per_example_losses_and_gradients(nets, method, order, distance):
    batch = {"image": tf.random.uniform([4, 8, 8, 1], -1, 1, seed=6), "label": tf.zeros([4], tf.int32)}
    cfg = ObjectiveConfig(order=order, distance=distance)
    rng = interpolants.Rng(interpolants.fold_seed(0, 1))
    variables = nets.velocity.trainable_variables + nets.encoder.trainable_variables
    with tf.GradientTape() as tape:
        out = OBJECTIVES[method](nets, batch, rng, tf.constant(0, tf.int64), cfg)
        loss = tf.reduce_mean(out.per_example["velocity"])
    assert out.per_example["velocity"].shape == (4,)
    assert all(v.shape == (4,) for v in out.metrics.values())
    grads = dict(zip([v.path for v in variables], tape.gradient(loss, variables)))
    for i in range(1, order + 1):  # every trained head g_i, and the noise encoder, receive gradients
        head = [g for p, g in grads.items() if f"head{i}/" in p and "encoder" not in p]
        assert head and all(g is not None for g in head) and any(float(tf.norm(g)) > 0 for g in head)
    enc = [g for p, g in grads.items() if p.startswith(nets.encoder.name)]
    assert enc and any(g is not None and float(tf.norm(g)) > 0 for g in enc)
    untrained = [g for p, g in grads.items() if f"head{order + 1}/" in p and not p.startswith(nets.encoder.name)]
    assert all(g is None for g in untrained)

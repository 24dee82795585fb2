"""The time convention (t=0 data, t=1 noise) and replica-independent randomness."""
import numpy as np
import tensorflow as tf

from cud_tf import interpolants


def test_path_target_and_prediction_are_consistent():
    x0 = tf.random.normal([4, 3, 3, 1], seed=1)
    z = tf.random.normal([4, 3, 3, 1], seed=2)
    t = tf.constant([0.0, 0.25, 0.5, 1.0])
    xt = interpolants.x_t(x0=x0, z=z, t=t)
    np.testing.assert_allclose(xt[0], x0[0])
    np.testing.assert_allclose(xt[3], z[3])
    u = interpolants.velocity_target(x0=x0, z=z)
    # The exact velocity predicts the data from any point, and one Euler step of size t lands on x0.
    np.testing.assert_allclose(interpolants.x0_from_v(x_t=xt, v=u, t=t), x0, atol=1e-6)


def test_times_and_step_sizes():
    r = tf.constant([0.0, 0.5, 1.0])
    t = interpolants.t_from_uniform(r, eps=1e-3)
    np.testing.assert_allclose(t, [1e-3, 0.5005, 1.0], rtol=1e-6)
    np.testing.assert_allclose(interpolants.step_size(r, t, "origin", 16), [1 / 16] * 3)
    np.testing.assert_allclose(interpolants.step_size(r, t, "uniform", 16), r / 16)
    np.testing.assert_allclose(interpolants.step_size(r, t, "rule", 16), t / 16)


def test_rng_slices_of_the_global_batch_equal_one_device_draws():
    seed = interpolants.fold_seed(7, 3)
    whole = interpolants.Rng(seed).normal("z", tf.zeros([6, 2, 2, 1]))
    parts = [interpolants.Rng(seed, r, 2).normal("z", tf.zeros([3, 2, 2, 1])) for r in range(2)]
    np.testing.assert_array_equal(tf.concat(parts, 0), whole)
    a = interpolants.Rng(seed).uniform("t", 6)
    b = interpolants.Rng(seed).uniform("h", 6)
    assert not np.allclose(a, b)  # purposes are independent streams


def test_draws_are_the_same_with_and_without_xla_and_have_their_distributions():
    """uniform / normal convert TF's stateless Philox words themselves: under XLA the same uniforms bit for bit and
    the same normals to the rounding of log and cos (TF's own stateless_uniform differs between the two)."""
    seed = interpolants.fold_seed(11, "z")

    def draws():
        return interpolants.uniform([4000], seed), interpolants.normal([20000], seed)

    (u, z), (u_xla, z_xla) = tf.function(draws)(), tf.function(draws, jit_compile=True)()
    np.testing.assert_array_equal(u, u_xla)
    np.testing.assert_allclose(z, z_xla, rtol=1e-5, atol=1e-5)
    u, z = u.numpy(), z.numpy()
    assert 0.0 <= u.min() and u.max() < 1.0 and abs(u.mean() - 0.5) < 0.015 and abs(u.var() - 1 / 12) < 0.005
    assert abs(z.mean()) < 0.03 and abs(z.std() - 1.0) < 0.02 and abs(np.mean(z ** 3)) < 0.06
    assert abs(np.mean(np.abs(z) < 1.0) - 0.6827) < 0.01  # the normal's mass within one standard deviation
    np.testing.assert_array_equal(interpolants.uniform([4000], seed), u)  # stateless: the same seed, the same draw
    assert not np.array_equal(interpolants.uniform([4000], interpolants.fold_seed(12, "z")), u)

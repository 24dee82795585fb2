"""The one time convention of cud_tf: t = 0 is data, t = 1 is noise.

    x_t = (1 - t) * x0 + t * z,      u = z - x0,      x0_hat(x_t, t) = x_t - t * v.

Generation integrates dx/dt = v from t = 1 down to t = 0, so one Euler step of size h is
x_{t-h} = x_t - h * v(x_t, t). This is the convention of the Catch-Up Distillation reference code
(forked from Lee et al. 2023); it is the reverse of the original rectified-flow code. It is stated here
once and never flipped anywhere else.

Shapes: images `[B, H, W, C]`, times and step sizes `[B]` (scalars broadcast).
"""
import math
import zlib

import tensorflow as tf

EPS = 1e-5  # Training times are drawn from U(EPS, 1).
# The stateless generator, named rather than "auto_select". Its raw 32-bit words are the same under XLA and in TF's
# kernels (measured on the CPU), but the two turn them into floats differently, so `uniform` and `normal` convert
# the words themselves: a step draws the same numbers with --jit_compile and without it.
ALG = "philox"

STEP_STRATEGIES = ("origin", "uniform", "rule")


def bcast(t, x):
    """Reshapes a time `[B]` (or scalar) so that it broadcasts against `x` `[B, H, W, C]`."""
    t = tf.convert_to_tensor(t)
    if t.dtype != tf.bool:
        t = tf.cast(t, x.dtype)
    if t.shape.rank == 0:
        return t
    return tf.reshape(t, [-1] + [1] * (x.shape.rank - 1))


def x_t(*, x0, z, t):
    """Point of the straight path: `(1 - t) x0 + t z`. x0, z: `[B, H, W, C]`; t: `[B]`."""
    t = bcast(t, x0)
    return (1.0 - t) * x0 + t * z


def velocity_target(*, x0, z):
    """The constant velocity of the straight path, `u = z - x0`."""
    return z - x0


def x0_from_v(*, x_t, v, t):
    """Data predicted from any point: `x0_hat = x_t - t v`."""
    return x_t - bcast(t, x_t) * v


def t_from_uniform(r, eps=EPS):
    """Training times `t ~ U(eps, 1)` `[B]` from uniforms r ~ U(0, 1) `[B]`."""
    return eps + (1.0 - eps) * r


def step_size(r, t, strategy, num_grid_steps):
    """Per-example catch-up step sizes `[B]` (docs/algorithms.md section 2), from uniforms r `[B]`.

    origin: h = 1/TN; uniform: h ~ U(0, 1/TN) (the reference default); rule: h = t/TN.
    """
    tn = float(num_grid_steps)
    if strategy == "origin":
        return tf.ones_like(t) / tn
    if strategy == "uniform":
        return r / tn
    if strategy == "rule":
        return t / tn
    raise ValueError(f"unknown step-size strategy {strategy!r}; expected one of {STEP_STRATEGIES}")


def words(shape, seed):
    """The stateless Philox generator's uint32 words of `shape` for `seed` `[2]`: the same under XLA and in TF."""
    return tf.random.stateless_uniform(shape, seed, minval=None, maxval=None, dtype=tf.uint32, alg=ALG)


def uniform(shape, seed):
    """U[0, 1) float32 of `shape` from `words(shape, seed)`: each word's top 23 bits are the mantissa of a float in
    [1, 2), less 1. Integer and bit operations only, so XLA and TF's kernels agree exactly."""
    mantissa = tf.bitwise.bitwise_or(tf.bitwise.right_shift(words(shape, seed), 9),
                                     tf.constant(0x3F800000, tf.uint32))
    return tf.bitcast(mantissa, tf.float32) - 1.0


def normal(shape, seed):
    """N(0, 1) float32 of `shape` by Box-Muller from two `uniform` draws of `seed`: `sqrt(-2 log(1 - u1))
    cos(2 pi u2)`. XLA and TF's kernels agree to the rounding of their log and cos (a few ulps)."""
    u = uniform(tf.concat([[2], tf.cast(shape, tf.int32)], 0), seed)
    return tf.sqrt(-2.0 * tf.math.log(1.0 - u[0])) * tf.cos((2.0 * math.pi) * u[1])


def fold_seed(seed, *data):
    """Derives a stateless seed `[2]` int32 from a base seed and integers or names (step, purpose)."""
    seed = tf.convert_to_tensor(seed)
    if seed.shape.rank == 0:
        seed = tf.stack([tf.cast(seed, tf.int32), tf.constant(0, tf.int32)])
    seed = tf.cast(seed, tf.int32)
    for d in data:
        if isinstance(d, str):  # a named purpose: a stable integer
            d = zlib.crc32(d.encode()) & 0x7FFFFFFF
        seed = tf.random.experimental.stateless_fold_in(seed, tf.cast(d, tf.int64), alg=ALG)
    return tf.cast(seed, tf.int32)  # fold_in returns int64


class Rng:
    """Stateless randomness that depends on the example's global index, not on the replica count.

    Each replica draws the random tensor of the whole global batch from one seed and keeps its own slice, so
    a step under MirroredStrategy over N devices uses exactly the numbers of the same step on one device.
    `seed` `[2]` is already folded with the step; `purpose` separates independent streams.
    """

    def __init__(self, seed, replica_id=0, num_replicas=1):
        self.seed = seed
        self.replica_id = replica_id
        self.num_replicas = num_replicas

    def _slice(self, draw, batch_size, inner_shape, purpose):
        b = batch_size
        full = draw(tf.concat([[b * self.num_replicas], tf.cast(inner_shape, tf.int32)], 0),
                    fold_seed(self.seed, purpose))
        return full[self.replica_id * b:(self.replica_id + 1) * b] if self.num_replicas > 1 else full

    def uniform(self, purpose, batch_size, inner_shape=()):
        """U(0, 1) of shape `[b, *inner_shape]` float32."""
        return self._slice(uniform, batch_size, list(inner_shape), purpose)

    def normal(self, purpose, like):
        """N(0, I) with the shape of `like` `[b, ...]`."""
        shape = tf.shape(like)
        return self._slice(normal, shape[0], shape[1:], purpose)

    def child(self, purpose):
        """An independent Rng for a sub-computation."""
        return Rng(fold_seed(self.seed, purpose), self.replica_id, self.num_replicas)

"""Velocity functions of a trained network (head choice, classifier-free guidance) and image generation.

Solvers only ever see `v(x [N,H,W,C], t [N])`; this module turns a network into one.
"""
import tensorflow as tf

from cud_tf import solvers


def velocity_fn(net, head=1, labels=None, guidance_scale=1.0, training=False):
    """`v(x, t)` of head g_head. With labels `[B]` (-1 or the null label = unconditional) and a guidance
    scale w: v = v_uncond + w (v_cond - v_uncond), both branches in one batched pass; w = 1 is plain
    conditional. When N is a multiple of B (several points per example in one pass) labels are tiled."""
    num_classes = net.config.num_classes

    def v(x, t):
        if labels is None or not num_classes:
            return tf.cast(net(x, t, None, training=training, head=head), tf.float32)
        y = tf.cast(labels, tf.int32)
        y = tf.tile(y, [tf.shape(x)[0] // tf.shape(y)[0]])
        y = tf.where(y < 0, num_classes, y)
        if isinstance(guidance_scale, (int, float)) and guidance_scale == 1.0:
            return tf.cast(net(x, t, y, training=training, head=head), tf.float32)
        null = tf.fill(tf.shape(y), num_classes)
        both = net(tf.concat([x, x], 0), tf.concat([t, t], 0), tf.concat([y, null], 0), training=training,
                   head=head)
        v_cond, v_uncond = tf.split(tf.cast(both, tf.float32), 2, axis=0)
        w = tf.cast(guidance_scale, tf.float32)
        # Unconditional rows (null label) stay unguided: there v_cond == v_uncond anyway.
        return v_uncond + w * (v_cond - v_uncond)

    return v


def generate(net, z, num_steps, method="euler", head=1, labels=None, guidance_scale=1.0, grid="uniform"):
    """Images `[B,H,W,C]` in about [-1, 1] from noise z `[B,H,W,C]`: one step (`num_steps == 1` with Euler is
    the one-step map z - v(z, 1)) or a fixed-grid sampler of `num_steps` steps."""
    v = velocity_fn(net, head, labels, guidance_scale)
    return solvers.sample(v, z, num_steps, method=method, grid=grid)

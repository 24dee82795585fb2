"""Building blocks of the velocity U-Net: DDPM++ (Ho et al. 2020; Song et al. 2021) and ADM (Dhariwal & Nichol 2021).

Images are NHWC `[B, H, W, C]`; times `[B]`; embeddings `[B, E]`.
"""
import math

import keras
import tensorflow as tf
from keras import layers, ops

from cud_tf import interpolants


def zero_init():
    """Near-zero initialiser for the last conv of a residual branch or an output head (DDPM's init_scale=0)."""
    return keras.initializers.VarianceScaling(scale=1e-10, mode="fan_avg", distribution="uniform")


def attention_qkv_init():
    """Init of the DDPM++ attention's qkv projection: Glorot uniform times sqrt(0.2) (the CUD/EDM SongUNet)."""
    return keras.initializers.VarianceScaling(scale=0.2, mode="fan_avg", distribution="uniform")


def torch_default_init():
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch's default conv weight init, which ADM's attention qkv keeps."""
    return keras.initializers.VarianceScaling(scale=1.0 / 3.0, mode="fan_in", distribution="uniform")


def downsample(x):
    """2x2 box filter, stride 2 (the reference's resample_filter [1,1]): `[B, H, W, C] -> [B, H/2, W/2, C]`."""
    return ops.average_pool(x, 2, strides=2)


def upsample(x):
    """Nearest-neighbour 2x (the transposed [1,1] box filter): `[B, H, W, C] -> [B, 2H, 2W, C]`."""
    return ops.repeat(ops.repeat(x, 2, axis=1), 2, axis=2)


class GroupNorm(layers.GroupNormalization):
    """Keras' GroupNormalization (same weights gamma, beta `[C]`, same float32 statistics) computed in a form that
    TF's CPU kernels run 1.2-1.8x faster in graph mode (benchmarks/group_norm.py): `[B, H, W, C] -> [B, H, W, C]`.

    Keras reduces a `[B, H, W, G, C/G]` view over three non-adjacent axes; here the means over H, W come first,
    `[B, C]`, and the groups average those (`[B, G]`, broadcast back to `[B, 1, 1, C]`); the variance is the mean
    of squared deviations from the group mean (two passes, as Keras). Other ranks and axes: Keras' own call.
    """

    def call(self, inputs):
        if len(inputs.shape) != 4 or self.axis not in (-1, 3):
            return super().call(inputs)
        x = tf.cast(inputs, "float32")
        c, g = x.shape[-1], self.groups

        def group_mean(v):  # [B, C] -> [B, 1, 1, C]: each channel gets its group's mean
            v = tf.reduce_mean(tf.reshape(v, [-1, g, c // g]), axis=-1, keepdims=True)
            return tf.reshape(tf.broadcast_to(v, [tf.shape(v)[0], g, c // g]), [-1, 1, 1, c])

        mean = group_mean(tf.reduce_mean(x, axis=[1, 2]))
        variance = group_mean(tf.reduce_mean(tf.math.squared_difference(x, tf.stop_gradient(mean)), axis=[1, 2]))
        inv = tf.math.rsqrt(variance + self.epsilon)
        if self.scale:
            inv = inv * tf.cast(self.gamma, "float32")
        shift = -mean * inv
        if self.center:
            shift = shift + tf.cast(self.beta, "float32")
        return tf.cast(x * inv + shift, self.compute_dtype)


def group_norm(channels, **kw):
    """GroupNorm with min(32, C/4) groups and eps 1e-6, as in the reference network."""
    return GroupNorm(groups=min(32, max(1, channels // 4)), epsilon=1e-6, **kw)


def sinusoidal_embedding(t, dim, max_positions=10000.0):
    """Transformer-style embedding of raw times t `[B]` (in [0, 1]) -> `[B, dim]` float32 (DDPM)."""
    half = dim // 2
    freqs = ops.exp(ops.arange(half, dtype="float32") * (-math.log(max_positions) / (half - 1)))
    args = ops.cast(ops.reshape(t, [-1, 1]), "float32") * freqs[None, :]
    return ops.concatenate([ops.sin(args), ops.cos(args)], axis=-1)


class TimeEmbedding(layers.Layer):
    """t `[B]` (and optional labels `[B]`) -> `[B, E]`: sinusoidal(t) -> Dense E -> SiLU -> Dense E -> SiLU.

    With `num_classes > 0` a learned label embedding (row `num_classes` = the null label of
    classifier-free guidance) is added to the time embedding before the last SiLU.
    """

    def __init__(self, base_channels, emb_channels, num_classes=0, **kw):
        super().__init__(**kw)
        self.base_channels = base_channels
        self.num_classes = num_classes
        self.dense0 = layers.Dense(emb_channels, name="dense0")
        self.dense1 = layers.Dense(emb_channels, name="dense1")
        self.label_embedding = (
            layers.Embedding(num_classes + 1, emb_channels, name="label_embedding") if num_classes else None
        )

    def build(self, t_shape, y_shape=None):
        """Nothing to infer: the dense layers build on the first call."""

    def call(self, t, y=None):
        emb = self.dense1(ops.silu(self.dense0(sinusoidal_embedding(t, self.base_channels))))
        if self.label_embedding is not None:
            if y is None:
                y = ops.full(ops.shape(t), self.num_classes, dtype="int32")
            emb = emb + self.label_embedding(y)
        return ops.silu(emb)


class Dropout(layers.Dropout):
    """Keras' Dropout (same rate, scaling by 1 / (1 - rate), seed generator and checkpoint variables) with its mask
    from the Philox words themselves (`interpolants.words`, an integer comparison): a step draws the same mask with
    --jit_compile and without it (Keras' mask comes from TF's stateless uniform floats, which differ between XLA
    and TF's kernels). As fast as Keras' layer, forward and backward in graph mode. One mask entry per input entry
    (no `noise_shape`)."""

    def __init__(self, rate, **kw):
        if kw.get("noise_shape") is not None:
            raise ValueError("cud_tf's Dropout draws one mask entry per input entry: noise_shape is not supported")
        super().__init__(rate, **kw)

    def call(self, inputs, training=False):
        if not training or self.rate == 0:
            return inputs
        if self.rate == 1:  # Keras' range includes 1: everything dropped (and no 2^32 threshold in a uint32)
            return tf.zeros_like(inputs)
        seed = self.seed_generator.next()  # the state, then advanced: int64 `[2]`, kept in int32 as Keras does
        seed = tf.cast(tf.math.floormod(seed, tf.int32.max - 1), tf.int32)
        # A word below rate * 2^32 drops its entry: probability `rate` (to 2^-32).
        keep = interpolants.words(tf.shape(inputs), seed) >= tf.constant(int(self.rate * 2.0 ** 32), tf.uint32)
        return tf.where(keep, inputs * tf.cast(1.0 / (1.0 - self.rate), inputs.dtype), tf.zeros_like(inputs))


# DDPM++ residual block (Song et al. 2021; the CUD reference's UNetBlock), with ADM's options (Dhariwal & Nichol 2021).
class ResBlock(layers.Layer):
    """`x [B,H,W,C_in], emb [B,E] -> [B,H',W',C_out]`: GN -> SiLU -> conv3x3, + Dense(emb), GN -> SiLU -> dropout
    -> conv3x3 (near-zero init); skip path 1x1 conv when channels change; output (skip + h) * skip_scale.

    `resample="down"|"up"` makes it a resampling block (H' = H/2 or 2H): the 2x2 box resampling happens after the
    first GN -> SiLU, before conv0, and the skip path is resampled the same way, then a 1x1 conv when
    `resample_proj` (DDPM++'s resample_proj=True) or the channels change, else nothing (ADM's resblock_updown).
    `scale_shift_norm` (ADM's use_scale_shift_norm, a FiLM of the second GroupNorm): Dense(emb) gives
    `[scale, shift]` `[B, 2 C_out]` and h = GN(h) * (1 + scale) + shift, instead of adding Dense(emb) before it.
    """

    def __init__(self, out_channels, dropout=0.0, resample=None, resample_proj=True, scale_shift_norm=False,
                 skip_scale=math.sqrt(0.5), **kw):
        super().__init__(**kw)
        if resample not in (None, "down", "up"):
            raise ValueError(f"resample={resample!r} must be None, 'down' or 'up'")
        self.out_channels = out_channels
        self.dropout_rate = dropout
        self.resample = resample
        self.resample_proj = resample_proj
        self.scale_shift_norm = scale_shift_norm
        self.skip_scale = skip_scale

    def build(self, input_shape):
        in_channels = input_shape[-1]
        self.norm0 = group_norm(in_channels, name="norm0")
        self.conv0 = layers.Conv2D(self.out_channels, 3, padding="same", name="conv0")
        emb_out = 2 * self.out_channels if self.scale_shift_norm else self.out_channels
        self.emb_proj = layers.Dense(emb_out, name="emb_proj")
        self.norm1 = group_norm(self.out_channels, name="norm1")
        self.dropout = Dropout(self.dropout_rate)
        self.conv1 = layers.Conv2D(self.out_channels, 3, padding="same", kernel_initializer=zero_init(), name="conv1")
        project = in_channels != self.out_channels or (self.resample is not None and self.resample_proj)
        self.skip = layers.Conv2D(self.out_channels, 1, name="skip") if project else None

    def _resample(self, x):
        return downsample(x) if self.resample == "down" else upsample(x) if self.resample == "up" else x

    def _skip(self, x):
        # A 1x1 conv commutes with both box resamplings: run it at the lower resolution.
        if self.resample == "up":
            return upsample(self.skip(x) if self.skip is not None else x)
        x = self._resample(x)
        return self.skip(x) if self.skip is not None else x

    def call(self, x, emb, training=None):
        h = self.conv0(self._resample(ops.silu(self.norm0(x))))
        e = self.emb_proj(emb)[:, None, None, :]
        if self.scale_shift_norm:
            scale, shift = ops.split(e, 2, axis=-1)
            h = self.norm1(h) * (1.0 + scale) + shift
        else:
            h = self.norm1(h + e)
        h = self.conv1(self.dropout(ops.silu(h), training=training))
        return (self._skip(x) + h) * self.skip_scale


class AttnBlock(layers.Layer):
    """Keras' MultiHeadAttention over the H*W positions with a GN pre-norm and a plain residual add (cud-tf's first
    form): `[B, H, W, C] -> [B, H, W, C]`; one head of C channels, or C / head_channels heads of head_channels."""

    def __init__(self, head_channels=0, **kw):
        super().__init__(**kw)
        self.head_channels = head_channels

    def build(self, input_shape):
        c = input_shape[-1]
        self.norm = group_norm(c, name="norm")
        d = self.head_channels or c
        self.attn = layers.MultiHeadAttention(num_heads=c // d, key_dim=d, name="attn")

    def call(self, x):
        b, h, w, c = ops.shape(x)[0], x.shape[1], x.shape[2], x.shape[3]
        seq = ops.reshape(self.norm(x), [b, h * w, c])
        return x + ops.reshape(self.attn(seq, seq), [b, h, w, c])


# Self-attention of DDPM++ (Song et al. 2021; the CUD reference's UNetBlock attention) and ADM (Dhariwal & Nichol 2021).
class QKVAttnBlock(layers.Layer):
    """`[B, H, W, C] -> [B, H, W, C]`: GN -> 1x1 conv qkv `[B, H, W, 3C]` -> per head softmax(q k^T / sqrt(d)) v
    over the H*W positions (d = head_channels, or C for one head; the softmax in float32) -> 1x1 conv proj
    (near-zero init), output (proj(a) + x) * skip_scale.

    `form="ddpmpp"`: qkv init Glorot * sqrt(0.2), skip_scale sqrt(0.5) (SongUNet). `form="adm"`: qkv init
    U(+-1/sqrt(C)) (PyTorch's default, kept by ADM), skip_scale 1. qkv's channels are laid out
    `[heads, d, (q, k, v)]`, as in the reference UNetBlock.
    """

    def __init__(self, form="ddpmpp", head_channels=0, **kw):
        super().__init__(**kw)
        if form not in ("ddpmpp", "adm"):
            raise ValueError(f"form={form!r} must be 'ddpmpp' or 'adm'")
        self.form = form
        self.head_channels = head_channels
        self.skip_scale = math.sqrt(0.5) if form == "ddpmpp" else 1.0

    def build(self, input_shape):
        c = input_shape[-1]
        self.norm = group_norm(c, name="norm")
        init = attention_qkv_init() if self.form == "ddpmpp" else torch_default_init()
        self.qkv = layers.Conv2D(3 * c, 1, kernel_initializer=init, name="qkv")
        self.proj = layers.Conv2D(c, 1, kernel_initializer=zero_init(), name="proj")

    def call(self, x):
        b, h, w, c = ops.shape(x)[0], x.shape[1], x.shape[2], x.shape[3]
        d = self.head_channels or c
        qkv = ops.reshape(self.qkv(self.norm(x)), [b, h * w, c // d, d, 3])
        q, k, v = qkv[..., 0], qkv[..., 1], qkv[..., 2]  # [B, HW, heads, d]
        logits = ops.einsum("bqnd,bknd->bnqk", ops.cast(q, "float32"), ops.cast(k, "float32")) / math.sqrt(d)
        weights = ops.cast(ops.softmax(logits, axis=-1), v.dtype)
        a = ops.reshape(ops.einsum("bnqk,bknd->bqnd", weights, v), [b, h, w, c])
        return (self.proj(a) + x) * self.skip_scale


class OutputHead(layers.Layer):
    """g_i: GN -> SiLU -> conv3x3 to the output channels, initialised near zero. `[B,H,W,C0] -> [B,H,W,C_out]`."""

    def __init__(self, out_channels, **kw):
        kw.setdefault("dtype", "float32")  # velocities stay float32 under mixed precision
        super().__init__(**kw)
        self.out_channels = out_channels

    def build(self, input_shape):
        self.norm = group_norm(input_shape[-1], name="norm", dtype=self.dtype_policy)
        self.conv = layers.Conv2D(
            self.out_channels, 3, padding="same", kernel_initializer=zero_init(), name="conv", dtype=self.dtype_policy
        )

    def call(self, features):
        return self.conv(ops.silu(self.norm(ops.cast(features, self.compute_dtype))))

"""Building blocks of the DDPM++-style velocity U-Net (Ho et al. 2020; Song et al. 2021).

Images are NHWC `[B, H, W, C]`; times `[B]`; embeddings `[B, E]`.
"""
import math

import keras
from keras import layers, ops


def zero_init():
    """Near-zero initialiser for the last conv of a residual branch or an output head (DDPM's init_scale=0)."""
    return keras.initializers.VarianceScaling(scale=1e-10, mode="fan_avg", distribution="uniform")


def group_norm(channels, **kw):
    """GroupNorm with min(32, C/4) groups and eps 1e-6, as in the reference network."""
    return layers.GroupNormalization(groups=min(32, max(1, channels // 4)), epsilon=1e-6, **kw)


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

    def call(self, t, y=None):
        emb = self.dense1(ops.silu(self.dense0(sinusoidal_embedding(t, self.base_channels))))
        if self.label_embedding is not None:
            if y is None:
                y = ops.full(ops.shape(t), self.num_classes, dtype="int32")
            emb = emb + self.label_embedding(y)
        return ops.silu(emb)


class ResBlock(layers.Layer):
    """GN -> SiLU -> conv3x3, + Dense(emb), GN -> SiLU -> dropout -> conv3x3; 1x1 skip; output times sqrt(0.5)."""

    def __init__(self, out_channels, dropout=0.0, **kw):
        super().__init__(**kw)
        self.out_channels = out_channels
        self.dropout_rate = dropout

    def build(self, input_shape):
        in_channels = input_shape[-1]
        self.norm0 = group_norm(in_channels, name="norm0")
        self.conv0 = layers.Conv2D(self.out_channels, 3, padding="same", name="conv0")
        self.emb_proj = layers.Dense(self.out_channels, name="emb_proj")
        self.norm1 = group_norm(self.out_channels, name="norm1")
        self.dropout = layers.Dropout(self.dropout_rate)
        self.conv1 = layers.Conv2D(self.out_channels, 3, padding="same", kernel_initializer=zero_init(), name="conv1")
        self.skip = (
            layers.Conv2D(self.out_channels, 1, name="skip") if in_channels != self.out_channels else None
        )

    def call(self, x, emb, training=None):
        h = self.conv0(ops.silu(self.norm0(x)))
        h = h + self.emb_proj(emb)[:, None, None, :]
        h = self.conv1(self.dropout(ops.silu(self.norm1(h)), training=training))
        skip = self.skip(x) if self.skip is not None else x
        return (skip + h) * math.sqrt(0.5)


class AttnBlock(layers.Layer):
    """Single-head self-attention over the H*W positions with a GN pre-norm and a residual connection."""

    def build(self, input_shape):
        c = input_shape[-1]
        self.norm = group_norm(c, name="norm")
        self.attn = layers.MultiHeadAttention(num_heads=1, key_dim=c, name="attn")

    def call(self, x):
        b, h, w, c = ops.shape(x)[0], x.shape[1], x.shape[2], x.shape[3]
        seq = ops.reshape(self.norm(x), [b, h * w, c])
        return x + ops.reshape(self.attn(seq, seq), [b, h, w, c])


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

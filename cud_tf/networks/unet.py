"""The velocity network f_theta = g_1 o F_theta, its meta-encoder heads g_2..g_K, and the noise encoder q_psi.

A DDPM++-style U-Net (Ho et al. 2020; Song et al. 2021) with the dynamic skip connection of Catch-Up
Distillation (Shao et al. 2023, arXiv 2305.10769): phi(t) = c + t (1 - 2c), and every decoder block reads
concat[h_dec * 2 phi(t), skip * 2 (1 - phi(t))]; c = 0.5 is a plain U-Net.
"""
import dataclasses
import re

import keras
from keras import layers, ops

from cud_tf.networks.layers import AttnBlock, OutputHead, ResBlock, TimeEmbedding, group_norm


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Architecture of a velocity U-Net; the defaults are the MNIST paper network (docs/algorithms.md section 4)."""

    image_shape: tuple = (28, 28, 1)
    base_channels: int = 32
    channel_mult: tuple = (2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple = (16,)
    mid_attention: bool = True
    dropout: float = 0.13
    cskip: float = 0.25
    num_heads: int = 1  # K: g_1 plus the meta-encoders g_2..g_K
    num_classes: int = 0  # 0: unconditional
    out_channels: int = 0  # 0: the image's channels
    fixed_time: float = -1.0  # >= 0: ignore t and use this time (the noise encoder uses 1)

    def __post_init__(self):
        h, w, _ = self.image_shape
        factor = 2 ** (len(self.channel_mult) - 1)
        if h % factor or w % factor:
            raise ValueError(
                f"image shape {self.image_shape} is not divisible by {factor} (2^(levels-1) for "
                f"channel_mult={self.channel_mult}); use fewer levels or pad the images"
            )
        if not 0.0 <= self.cskip <= 1.0:
            raise ValueError(f"cskip={self.cskip} must lie in [0, 1] (0.5 turns the dynamic skip off)")
        if self.num_heads < 1:
            raise ValueError(f"num_heads={self.num_heads} must be >= 1")


class VelocityUNet(keras.Model):
    """`(x [B,H,W,C], t [B], y [B] or None) -> velocities`, one per head.

    `features(x, t, y)` returns F_theta, the last decoder feature map `[B, H, W, C0]`; `heads[i]` maps it to
    the velocity of head g_{i+1}. `call(..., head=None)` returns the list of all K velocities, or the one of
    `head` (1-based) when given.
    """

    def __init__(self, config: UNetConfig, **kw):
        super().__init__(**kw)
        self.config = config
        c = config
        nf = c.base_channels
        self.time_embedding = TimeEmbedding(nf, nf * 4, c.num_classes, name="time_embedding")
        self.conv_in = layers.Conv2D(nf, 3, padding="same", name="conv_in")
        res = c.image_shape[0]
        self.down, skip_channels, ch = [], [nf], nf
        for level, mult in enumerate(c.channel_mult):
            for i in range(c.num_res_blocks):
                ch = nf * mult
                attn = AttnBlock(name=f"down{level}_attn{i}") if res in c.attn_resolutions else None
                self.down.append((ResBlock(ch, c.dropout, name=f"down{level}_res{i}"), attn))
                skip_channels.append(ch)
            if level != len(c.channel_mult) - 1:
                self.down.append(("downsample", None))
                skip_channels.append(ch)
                res //= 2
        self.mid = [
            ResBlock(ch, c.dropout, name="mid_res0"),
            AttnBlock(name="mid_attn") if c.mid_attention else None,
            ResBlock(ch, c.dropout, name="mid_res1"),
        ]
        self.up = []
        for level in reversed(range(len(c.channel_mult))):
            for i in range(c.num_res_blocks + 1):
                self.up.append(("res", ResBlock(nf * c.channel_mult[level], c.dropout, name=f"up{level}_res{i}")))
            if res in c.attn_resolutions:
                self.up.append(("attn", AttnBlock(name=f"up{level}_attn")))
            if level != 0:
                self.up.append(("upsample", layers.Conv2D(ch, 3, padding="same", name=f"up{level}_conv")))
                res *= 2
        out_channels = c.out_channels or c.image_shape[-1]
        self.heads = [OutputHead(out_channels, name=f"head{k + 1}") for k in range(c.num_heads)]


    def phi(self, t):
        """Dynamic-skip weight phi(t) = c + t (1 - 2c), `[B]`."""
        return self.config.cskip + t * (1.0 - 2.0 * self.config.cskip)

    def features(self, x, t, y=None, training=None):
        """F_theta(x_t, t): `[B, H, W, C]` -> `[B, H, W, base_channels * channel_mult[0]]`."""
        if self.config.fixed_time >= 0:
            t = ops.full([ops.shape(x)[0]], self.config.fixed_time, dtype="float32")
        t = ops.cast(t, "float32")
        emb = self.time_embedding(t, y)
        h = self.conv_in(x)
        skips = [h]
        for block, attn in self.down:
            if block == "downsample":
                h = ops.average_pool(h, 2, strides=2)
            else:
                h = block(h, emb, training=training)
                if attn is not None:
                    h = attn(h)
            skips.append(h)
        h = self.mid[0](h, emb, training=training)
        if self.mid[1] is not None:
            h = self.mid[1](h)
        h = self.mid[2](h, emb, training=training)
        phi = ops.cast(ops.reshape(self.phi(t), [-1, 1, 1, 1]), h.dtype)
        for kind, layer in self.up:
            if kind == "res":
                h = layer(ops.concatenate([h * (2.0 * phi), skips.pop() * (2.0 * (1.0 - phi))], axis=-1), emb,
                          training=training)
            elif kind == "attn":
                h = layer(h)
            else:
                h = ops.repeat(ops.repeat(h, 2, axis=1), 2, axis=2)
                h = layer(h)
        return h

    def call(self, x, t, y=None, training=None, head=None):
        feats = self.features(x, t, y, training=training)
        if head is not None:
            return self.heads[head - 1](feats)
        return [g(feats) for g in self.heads]

    def build_variables(self):
        """Creates the variables with a one-example call; returns self."""
        h, w, c = self.config.image_shape
        y = ops.zeros([1], "int32") if self.config.num_classes else None
        self(ops.zeros([1, h, w, c]), ops.zeros([1]), y)
        return self


def checkpoint_variables(net):
    """Every variable of a network (weights and dropout RNG states), keyed by its path inside the network.

    tf.train.Checkpoint sees only a Keras 3 layer's direct layer attributes, not layers held in lists, so
    checkpoints hold this dict instead of the network object.
    """
    # `weights` would leave out the RNG states; their SeedGenerator names carry a process-wide counter.
    items = {re.sub(r"seed_generator_\d+", "seed_generator", v.path.split("/", 1)[1]): v for v in net.variables}
    if len(items) != len(net.variables):
        raise ValueError(f"{net.name}: two variables share a path; give its layers unique names")
    return items


def noise_encoder_config(config: UNetConfig) -> UNetConfig:
    """q_psi: the same network with 2C outputs (mu, log sigma^2), time fixed at 1, no dynamic skip, one head."""
    return dataclasses.replace(
        config, out_channels=2 * config.image_shape[-1], fixed_time=1.0, cskip=0.5, num_heads=1, num_classes=0
    )


def encode_noise(encoder, x0, eps, training=None):
    """Reparameterised training noise z = mu + sigma * eps and KL(N(mu, sigma^2) || N(0, I)) `[B]` (mean over dims).

    x0, eps: `[B, H, W, C]` -> z `[B, H, W, C]`, kl `[B]`.
    """
    out = encoder(x0, ops.ones([ops.shape(x0)[0]]), training=training, head=1)
    mu, logvar = ops.split(ops.cast(out, "float32"), 2, axis=-1)
    z = mu + ops.exp(0.5 * logvar) * eps
    kl = 0.5 * ops.mean(ops.square(mu) + ops.exp(logvar) - 1.0 - logvar, axis=[1, 2, 3])
    return z, kl

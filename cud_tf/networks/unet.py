"""The velocity network f_theta = g_1 o F_theta, its meta-encoder heads g_2..g_K, and the noise encoder q_psi.

A DDPM++-style U-Net (Ho et al. 2020; Song et al. 2021) with the dynamic skip connection of Catch-Up
Distillation (Shao et al. 2023, arXiv 2305.10769): phi(t) = c + t (1 - 2c), and every decoder block reads
concat[h_dec * 2 phi(t), skip * 2 (1 - phi(t))]; c = 0.5 is a plain U-Net.
"""
import dataclasses
import math
import re

import keras
from keras import layers, ops

from cud_tf.networks.layers import AttnBlock, OutputHead, QKVAttnBlock, ResBlock, TimeEmbedding, downsample, upsample


RESAMPLE = ("pool", "residual")
ATTENTION_TYPES = ("keras", "ddpmpp", "adm")
DECODER_ATTENTION = ("last", "every")


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Architecture of a velocity U-Net.

    The defaults are the MNIST paper network's layout (Shao et al. 2023) with cud-tf's first resampling and
    attention (average-pool down, nearest + 3x3 conv up, Keras attention): 1,882,945 parameters. With
    `resample="residual", attention_type="ddpmpp"` it is the reference SongUNet (DDPM++) of the CUD code:
    2,155,201 parameters. ADM (Dhariwal & Nichol 2021) is `resample="residual", resample_proj=False,
    attention_type="adm", attn_head_channels=64, scale_shift_norm=True, residual_scale=1,
    decoder_attention="every"`.
    """

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
    # "pool": average pool down, nearest + 3x3 conv up; "residual": resampling residual blocks (DDPM++ / ADM).
    resample: str = "pool"
    resample_proj: bool = True  # residual resampling: 1x1 conv on the skip path (DDPM++) or none (ADM)
    attention_type: str = "keras"  # "keras": MultiHeadAttention, x + a; "ddpmpp"/"adm": see layers.QKVAttnBlock
    attn_head_channels: int = 0  # channels per attention head (ADM: 64); 0: one head over all channels
    scale_shift_norm: bool = False  # ADM's FiLM of the residual blocks' second GroupNorm by the embedding
    residual_scale: float = math.sqrt(0.5)  # residual blocks output (skip + h) * this (DDPM++: sqrt(0.5), ADM: 1)
    decoder_attention: str = "last"  # attention after the last decoder block of a level (DDPM++) or every (ADM)

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
        for name, choices in (("resample", RESAMPLE), ("attention_type", ATTENTION_TYPES),
                              ("decoder_attention", DECODER_ATTENTION)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}={getattr(self, name)!r} must be one of {', '.join(choices)}")
        if not self.resample_proj and self.resample != "residual":
            raise ValueError("resample_proj=False applies only to resample='residual' (pool has no skip path)")
        if self.residual_scale <= 0:
            raise ValueError(f"residual_scale={self.residual_scale} must be > 0")
        if self.attn_head_channels < 0:
            raise ValueError(f"attn_head_channels={self.attn_head_channels} must be >= 0 (0: one head)")
        if self.attn_head_channels:
            widths = {self.base_channels * m for i, m in enumerate(self.channel_mult)
                      if self.image_shape[0] >> i in self.attn_resolutions}
            if self.mid_attention:
                widths.add(self.base_channels * self.channel_mult[-1])
            bad = sorted(c for c in widths if c % self.attn_head_channels)
            if bad:
                raise ValueError(f"attn_head_channels={self.attn_head_channels} does not divide the attention "
                                 f"blocks' channels {bad}")


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
                attn = self._attention(f"down{level}_attn{i}") if res in c.attn_resolutions else None
                self.down.append((self._res_block(ch, f"down{level}_res{i}"), attn))
                skip_channels.append(ch)
            if level != len(c.channel_mult) - 1:
                if c.resample == "residual":
                    self.down.append((self._res_block(ch, f"down{level}_down", resample="down"), None))
                else:
                    self.down.append(("downsample", None))
                skip_channels.append(ch)
                res //= 2
        self.mid = [
            self._res_block(ch, "mid_res0"),
            self._attention("mid_attn") if c.mid_attention else None,
            self._res_block(ch, "mid_res1"),
        ]
        self.up = []
        for level in reversed(range(len(c.channel_mult))):
            for i in range(c.num_res_blocks + 1):
                self.up.append(("res", self._res_block(nf * c.channel_mult[level], f"up{level}_res{i}")))
                if c.decoder_attention == "every" and res in c.attn_resolutions:
                    self.up.append(("attn", self._attention(f"up{level}_attn{i}")))
            if c.decoder_attention == "last" and res in c.attn_resolutions:
                self.up.append(("attn", self._attention(f"up{level}_attn")))
            if level != 0:
                if c.resample == "residual":  # keeps this level's channels, as the reference's up blocks
                    up = self._res_block(nf * c.channel_mult[level], f"up{level}_up", resample="up")
                    self.up.append(("res_up", up))
                else:  # cud-tf's first form: the conv outputs the deepest level's channels at every level
                    self.up.append(("upsample", layers.Conv2D(ch, 3, padding="same", name=f"up{level}_conv")))
                res *= 2
        out_channels = c.out_channels or c.image_shape[-1]
        self.heads = [OutputHead(out_channels, name=f"head{k + 1}") for k in range(c.num_heads)]

    def _res_block(self, channels, name, resample=None):
        c = self.config
        return ResBlock(channels, c.dropout, resample=resample, resample_proj=c.resample_proj,
                        scale_shift_norm=c.scale_shift_norm, skip_scale=c.residual_scale, name=name)

    def _attention(self, name):
        c = self.config
        if c.attention_type == "keras":
            return AttnBlock(c.attn_head_channels, name=name)
        return QKVAttnBlock(c.attention_type, c.attn_head_channels, name=name)

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
            if isinstance(block, str):  # "downsample"
                h = downsample(h)
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
            elif kind == "res_up":
                h = layer(h, emb, training=training)
            else:
                h = layer(upsample(h))
        return h

    def build(self, x_shape, t_shape=None, y_shape=None):
        """Nothing to infer: every sublayer builds with its input's shape on the first call. (Without this, Keras
        traces the whole network symbolically before that first call, which is most of `build_variables`' time.)"""

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

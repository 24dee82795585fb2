"""The velocity U-Net, its heads, the dynamic skip, the noise encoder, class conditioning, and the reference
(DDPM++) and ADM blocks: residual resampling, their attention, scale-shift norm."""
import dataclasses
import json
import math
import os

import numpy as np
import pytest
import tensorflow as tf
from absl import flags
from absl.testing import flagsaver

from helpers import tiny_unet_config
from cud_tf.networks.layers import AttnBlock, Dropout, GroupNorm, QKVAttnBlock, ResBlock, group_norm
from cud_tf.networks.unet import UNetConfig, VelocityUNet, checkpoint_variables, encode_noise, noise_encoder_config
from trainers import common
from trainers import cud as cud_trainer

FLAGS = flags.FLAGS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_heads_share_features_and_have_image_shape():
    net = VelocityUNet(tiny_unet_config(num_heads=3)).build_variables()
    x, t = tf.random.normal([2, 8, 8, 1], seed=1), tf.constant([0.3, 0.9])
    vs = net(x, t)
    assert len(vs) == 3 and all(v.shape == (2, 8, 8, 1) for v in vs)
    feats = net.features(x, t)
    assert feats.shape == (2, 8, 8, 8)
    np.testing.assert_allclose(net.heads[1](feats), net(x, t, head=2), atol=1e-6)


def test_dynamic_skip_weight():
    net = VelocityUNet(tiny_unet_config(cskip=0.25))
    np.testing.assert_allclose(net.phi(tf.constant([0.0, 0.5, 1.0])), [0.25, 0.5, 0.75])
    off = VelocityUNet(tiny_unet_config(cskip=0.5))
    np.testing.assert_allclose(off.phi(tf.constant([0.0, 1.0])), [0.5, 0.5])  # factors 2*phi = 1: plain U-Net


def test_default_network_keeps_bare_resampling():
    # The defaults are cud-tf's first form of the paper layout: average pool down, nearest + 3x3 conv up.
    net = VelocityUNet(UNetConfig()).build_variables()
    assert net.count_params() == 1_882_945
    convs = [layer for kind, layer in net.up if kind == "upsample"]
    assert [c.count_params() for c in convs] == [36_928, 36_928]  # 3x3 conv 64 -> 64
    # The residual blocks' four resampling blocks (4 x 86,528) replace those two convs: the reference's count.
    assert 1_882_945 + 4 * 86_528 - 2 * 36_928 == 2_155_201
    assert net(tf.zeros([1, 28, 28, 1]), tf.ones([1]), head=1).shape == (1, 28, 28, 1)


def _config_from_flagfile(name, image_shape, num_heads):
    """The network config of a flagfile as the CUD trainer builds it (`trainers.cud.network_config`), with
    `num_heads` heads."""
    cud_trainer.define_flags()
    with flagsaver.flagsaver():
        FLAGS.unparse_flags()
        FLAGS(["trainers.cud", f"--flagfile={os.path.join(ROOT, 'configs', name)}"])
        cfg = dataclasses.replace(cud_trainer.network_config(), num_heads=num_heads)
        assert cfg.image_shape == image_shape
        return cfg, FLAGS.noise_encoder


def _resampling_blocks(net):
    return {block.name: block for block, _ in net.down if isinstance(block, ResBlock) and block.resample} | {
        layer.name: layer for kind, layer in net.up if kind == "res_up"}


def test_mnist_paper_network_from_its_config():
    cfg, encoder = _config_from_flagfile("mnist.cfg", (28, 28, 1), num_heads=3)
    assert (cfg.resample, cfg.attention_type, encoder) == ("residual", "ddpmpp", True)
    net = VelocityUNet(cfg).build_variables()
    assert [g.count_params() for g in net.heads] == [705, 705, 705]  # GN(64) + 3x3 conv 64 -> 1
    assert net.count_params() == 2_155_201 + 2 * 705
    blocks = _resampling_blocks(net)
    # The reference's 14x14_down, 7x7_down, 14x14_up and 28x28_up.
    assert sorted(blocks) == ["down0_down", "down1_down", "up1_up", "up2_up"]
    assert {name: b.count_params() for name, b in blocks.items()} == dict.fromkeys(blocks, 86_528)
    assert not any(kind == "upsample" for kind, _ in net.up)
    attn = [layer for kind, layer in net.up if kind == "attn"] + [net.mid[1]]
    assert [type(a).__name__ for a in attn] == ["QKVAttnBlock"]  # only the middle block's (16x16 never occurs)
    enc = VelocityUNet(noise_encoder_config(cfg)).build_variables()
    assert enc.count_params() == 2_155_778
    x = tf.random.normal([2, 28, 28, 1], seed=5)
    assert net(x, tf.constant([0.2, 0.7]), head=2).shape == (2, 28, 28, 1)


def test_cifar10_paper_network_parameter_count():
    cfg, _ = _config_from_flagfile("cifar10.cfg", (32, 32, 3), num_heads=1)
    net = VelocityUNet(cfg).build_variables()  # one batch-1 call (~18 s here); never trained in tests
    assert net.count_params() == 55_732_739
    # At 256 channels, embedding 512; the bare-pool form (51,399,683) has two 3x3 up convs instead.
    blocks = _resampling_blocks(net)
    assert len(blocks) == 4 and {b.count_params() for b in blocks.values()} == {1_378_304}
    assert 55_732_739 - 4 * 1_378_304 + 2 * (256 * 256 * 9 + 256) == 51_399_683


def test_imagenet64_adm_network_parameter_count():
    cfg, encoder = _config_from_flagfile("imagenet64.cfg", (64, 64, 3), num_heads=1)
    assert not encoder and (cfg.resample_proj, cfg.attention_type, cfg.decoder_attention) == (False, "adm", "every")
    net = VelocityUNet(cfg).build_variables()  # variables only (~12 s here); never called or trained in tests
    # The authors' ADM UNetModel (guided-diffusion's, 3 output channels as consistency_models builds it; the
    # learn_sigma form of guided-diffusion's release has 6: +5,187) counts 295,899,267, checked against a
    # block-by-block count of its code: 192 channels, embedding 768, 1000 label rows. Ours adds one row, the
    # null label (index 1000), of 768: 295,900,035.
    assert net.count_params() == 295_900_035 == 295_899_267 + 768
    assert net.time_embedding.label_embedding.count_params() == 1001 * 768
    attn = [layer for kind, layer in net.up if kind == "attn"] + [a for _, a in net.down if a is not None]
    assert len(attn) == 3 * 4 + 3 * 3 and {a.head_channels for a in attn} == {64}  # 32, 16 and 8: every block


def _perturb(layer, seed=1):
    for i, w in enumerate(layer.trainable_variables):  # residual branches start at zero: perturb everything
        w.assign(w + tf.random.normal(w.shape, stddev=0.1, seed=seed + i))


def _box_down(x):
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def _box_up(x):
    return x.repeat(2, axis=1).repeat(2, axis=2)


@pytest.mark.parametrize("resample,proj", [("down", True), ("up", True), ("down", False), ("up", False)])
def test_resampling_block(resample, proj):
    block = ResBlock(64, resample=resample, resample_proj=proj)
    x, emb = tf.random.normal([2, 8, 8, 64], seed=1), tf.random.normal([2, 128], seed=2)
    out = block(x, emb)
    assert out.shape == ((2, 4, 4, 64) if resample == "down" else (2, 16, 16, 64))
    assert block.count_params() == 86_528 - (0 if proj else 64 * 64 + 64)
    box = _box_down if resample == "down" else _box_up
    if not proj:  # at init conv1 is ~0: the block is the resampled identity times sqrt(0.5) (ADM skip path)
        np.testing.assert_allclose(out, box(x.numpy()) * math.sqrt(0.5), atol=1e-4)
    _perturb(block)
    # Independent of the block's own resampling: the box filter between norm0 -> SiLU and conv0, and on the skip.
    h = block.conv0(box(tf.nn.silu(block.norm0(x)).numpy()))
    h = block.conv1(tf.nn.silu(block.norm1(h + block.emb_proj(emb)[:, None, None, :])))
    skip = box(x.numpy())
    skip = block.skip(skip) if proj else skip
    np.testing.assert_allclose(block(x, emb), (skip + h) * math.sqrt(0.5), atol=1e-4)


def test_scale_shift_norm_is_a_film_of_the_second_group_norm():
    block = ResBlock(16, scale_shift_norm=True, skip_scale=1.0)
    x, emb = tf.random.normal([2, 4, 4, 8], seed=3), tf.random.normal([2, 32], seed=4)
    block(x, emb)
    assert block.emb_proj.kernel.shape == (32, 32)  # [scale, shift]: 2 x 16
    _perturb(block)
    scale, shift = np.split(block.emb_proj(emb).numpy()[:, None, None, :], 2, axis=-1)
    h = block.norm1(block.conv0(tf.nn.silu(block.norm0(x)))) * (1.0 + scale) + shift
    np.testing.assert_allclose(block(x, emb), block.skip(x) + block.conv1(tf.nn.silu(h)), atol=1e-5)


def _attention_reference(x, qkv, heads):
    """numpy multi-head attention: qkv `[B, H, W, 3C]` laid out [heads, d, (q, k, v)] -> `[B, H, W, C]`."""
    b, h, w, c = x.shape
    d = c // heads
    qkv = qkv.reshape(b, h * w, heads, d, 3)
    q, k, v = (qkv[..., i].transpose(0, 2, 1, 3) for i in range(3))  # [B, heads, HW, d]
    logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return (p @ v).transpose(0, 2, 1, 3).reshape(b, h, w, c)


@pytest.mark.parametrize("form,head_channels", [("ddpmpp", 0), ("adm", 8)])
def test_qkv_attention(form, head_channels):
    c = 64
    attn = QKVAttnBlock(form, head_channels)
    x = tf.random.normal([2, 4, 4, c], seed=6)
    out = attn(x)
    skip_scale = math.sqrt(0.5) if form == "ddpmpp" else 1.0
    np.testing.assert_allclose(out, x * skip_scale, atol=1e-4)  # proj starts near zero (1e-5 x Glorot)
    assert attn.count_params() == 2 * c + 4 * (c * c + c)  # GN + qkv + proj
    # qkv init: Glorot uniform x sqrt(0.2) (SongUNet) or U(+-1/sqrt(C)) (PyTorch's default, ADM).
    limit = math.sqrt(0.2) * math.sqrt(6 / (c + 3 * c)) if form == "ddpmpp" else 1 / math.sqrt(c)
    assert 0.98 * limit < np.abs(attn.qkv.kernel.numpy()).max() <= limit
    _perturb(attn)
    a = _attention_reference(x.numpy(), attn.qkv(attn.norm(x)).numpy(), c // (head_channels or c))
    np.testing.assert_allclose(attn(x), (attn.proj(a) + x) * skip_scale, atol=1e-4)


def test_keras_attention_head_channels():
    one, eight = AttnBlock(), AttnBlock(head_channels=8)
    x = tf.random.normal([1, 4, 4, 64], seed=8)
    one(x), eight(x)
    assert (one.attn.num_heads, eight.attn.num_heads, eight.attn.key_dim) == (1, 8, 8)
    assert one.count_params() == eight.count_params() == 2 * 64 + 4 * (64 * 64 + 64)


@pytest.mark.parametrize("shape,groups", [((2, 6, 5, 64), 16), ((3, 4, 4, 8), 2), ((2, 3, 3, 12), 12)])
def test_group_norm_is_keras_group_normalization(shape, groups):
    """Same weights, outputs and gradients as keras.layers.GroupNormalization, and both as the definition:
    per sample and group of C/G adjacent channels, (x - mean) / sqrt(var + eps) * gamma + beta."""
    ours, keras_gn = GroupNorm(groups=groups, epsilon=1e-6), tf.keras.layers.GroupNormalization(groups, epsilon=1e-6)
    ours.build(shape), keras_gn.build(shape)
    assert [w.path.split("/")[-1] for w in ours.weights] == [w.path.split("/")[-1] for w in keras_gn.weights]
    for a, b in zip(ours.weights, keras_gn.weights):
        a.assign(tf.random.normal(a.shape, seed=11))
        b.assign(a)
    x = tf.random.normal(shape, seed=12) * 3.0 + 2.0
    w = tf.random.normal(shape, seed=13)
    results = []
    for layer in (ours, keras_gn):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
            loss = tf.reduce_sum(y * w)
        results.append([y, *tape.gradient(loss, [x, *layer.weights])])
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    xg = x.numpy().reshape(shape[0], -1, groups, shape[-1] // groups)
    mean, var = xg.mean(axis=(1, 3), keepdims=True), xg.var(axis=(1, 3), keepdims=True)
    expected = ((xg - mean) / np.sqrt(var + 1e-6)).reshape(shape) * ours.gamma.numpy() + ours.beta.numpy()
    np.testing.assert_allclose(results[0][0], expected, rtol=1e-4, atol=1e-4)


def test_group_norm_under_mixed_bfloat16_keeps_float32_statistics():
    x = tf.random.normal([2, 4, 4, 16], seed=14) + 100.0  # a large mean: bf16 statistics would lose the signal
    layer = group_norm(16, dtype="mixed_bfloat16")
    y = layer(tf.cast(x, tf.bfloat16))
    assert y.dtype == tf.bfloat16 and layer.gamma.dtype == tf.float32
    reference = group_norm(16)(tf.cast(tf.cast(x, tf.bfloat16), tf.float32))
    np.testing.assert_allclose(tf.cast(y, tf.float32), reference, atol=0.05)


def test_dropout_is_keras_dropout_with_a_mask_the_same_under_xla():
    """Rate and 1 / (1 - rate) scaling as Keras' Dropout, identity at inference, a new mask per call (the seed
    generator advances), and the same mask with and without XLA from the same seed state."""
    x = tf.ones([64, 8, 8, 4])
    layers_ = [Dropout(0.25), Dropout(0.25)]
    for layer in layers_:
        layer.build(x.shape)
    layers_[1].seed_generator.state.assign(layers_[0].seed_generator.state)
    graph, xla = tf.function(lambda: layers_[0](x, training=True)), tf.function(
        lambda: layers_[1](x, training=True), jit_compile=True)
    first, second = graph().numpy(), graph().numpy()
    assert set(np.unique(first)) == {0.0, np.float32(1 / 0.75)}
    assert abs(np.mean(first == 0) - 0.25) < 0.02
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(xla(), first)
    np.testing.assert_array_equal(xla(), second)
    np.testing.assert_array_equal(layers_[0](x, training=False), x)
    assert [v.path.split("/")[-1] for v in layers_[0].variables] == ["seed_generator_state"]
    np.testing.assert_array_equal(Dropout(1.0)(x, training=True), tf.zeros_like(x))  # Keras' range includes 1
    with pytest.raises(ValueError, match="noise_shape"):
        Dropout(0.1, noise_shape=[1, 1, 1, 4])


def test_adm_form_network():
    cfg = tiny_unet_config(resample="residual", resample_proj=False, attention_type="adm", attn_head_channels=4,
                           scale_shift_norm=True, residual_scale=1.0, decoder_attention="every",
                           channel_mult=(1, 2, 4), attn_resolutions=(8, 4), mid_attention=True, num_classes=10)
    net = VelocityUNet(cfg).build_variables()
    up_attn = [layer.name for kind, layer in net.up if kind == "attn"]
    assert up_attn == ["up1_attn0", "up1_attn1", "up0_attn0", "up0_attn1"]  # after every decoder block
    blocks = _resampling_blocks(net)
    assert all(b.skip is None for b in blocks.values())  # channels kept: identity skip paths
    _perturb(net)
    x, t, y = tf.random.normal([2, 8, 8, 1], seed=7), tf.constant([0.1, 0.8]), tf.constant([3, 10])
    v = net(x, t, y, head=1)
    assert v.shape == (2, 8, 8, 1) and np.all(np.isfinite(v))
    # Each resampling block keeps its level's channels, as the reference's (down0, down1, up2, up1).
    assert {name: b.out_channels for name, b in blocks.items()} == {"down0_down": 8, "down1_down": 16,
                                                                      "up2_up": 32, "up1_up": 16}
    assert all(b.scale_shift_norm and b.skip_scale == 1.0 for b in [net.mid[0], *blocks.values()])
    assert (net.mid[1].form, net.mid[1].head_channels) == ("adm", 4)


NEW_OPTIONS = ("resample", "resample_proj", "attention_type", "attn_head_channels", "scale_shift_norm",
               "residual_scale", "decoder_attention")


def test_block_flags_reach_the_config_and_default_to_its_defaults():
    cud_trainer.define_flags()
    with flagsaver.flagsaver():
        FLAGS.unparse_flags()
        FLAGS(["trainers.cud"])
        default = common.network_config((28, 28, 1))
        assert {k: getattr(default, k) for k in NEW_OPTIONS} == {k: getattr(UNetConfig(), k) for k in NEW_OPTIONS}
        FLAGS.unparse_flags()
        FLAGS(["trainers.cud", "--resample=residual", "--noresample_proj", "--attention_type=adm",
               "--attn_head_channels=32", "--scale_shift_norm", "--residual_scale=1", "--decoder_attention=every"])
        cfg = common.network_config((28, 28, 1))
        written = common.flags_string().split()  # flags.txt of a run with these options
    assert {k: getattr(cfg, k) for k in NEW_OPTIONS} == dict(
        resample="residual", resample_proj=False, attention_type="adm", attn_head_channels=32, scale_shift_norm=True,
        residual_scale=1.0, decoder_attention="every")
    # The options round-trip through flags.txt (a distillation run records its teacher's network in arch.json and
    # config.json instead).
    with flagsaver.flagsaver():
        FLAGS.unparse_flags()
        FLAGS(["trainers.cud", *written])
        assert common.network_config((28, 28, 1)) == cfg


@pytest.mark.parametrize("overrides,message", [
    (dict(resample="strided"), "resample='strided' must be one of pool, residual"),
    (dict(attention_type="linear"), "attention_type='linear' must be one of keras, ddpmpp, adm"),
    (dict(decoder_attention="first"), "decoder_attention='first' must be one of last, every"),
    (dict(resample_proj=False), "resample_proj=False applies only to resample='residual'"),
    (dict(residual_scale=0.0), "residual_scale=0.0 must be > 0"),
    (dict(attn_head_channels=3, attn_resolutions=(4,)), "attn_head_channels=3 does not divide"),
])
def test_bad_block_options_fail_with_one_line(overrides, message):
    with pytest.raises(ValueError, match=message) as e:
        tiny_unet_config(**overrides)
    assert "\n" not in str(e.value)


def test_quickstart_network_unchanged():
    # configs/mnist_quick.cfg keeps the bare resampling: same parameters and variable paths as before.
    cfg, _ = _config_from_flagfile("mnist_quick.cfg", (28, 28, 1), num_heads=1)
    assert (cfg.resample, cfg.attention_type, cfg.scale_shift_norm) == ("pool", "keras", False)
    net = VelocityUNet(cfg).build_variables()
    assert net.count_params() == 622_561
    assert {"up1_conv", "up2_conv"} <= {layer.name for kind, layer in net.up if kind == "upsample"}


def test_noise_encoder_reparameterisation_and_kl():
    cfg = tiny_unet_config()
    enc = VelocityUNet(noise_encoder_config(cfg)).build_variables()
    x0, eps = tf.random.normal([3, 8, 8, 1], seed=2), tf.random.normal([3, 8, 8, 1], seed=3)
    z, kl = encode_noise(enc, x0, eps)
    assert z.shape == x0.shape and kl.shape == (3,)
    # The output head starts near zero: mu = 0, log sigma^2 = 0, so z = eps and KL = 0.
    np.testing.assert_allclose(z, eps, atol=1e-4)
    np.testing.assert_allclose(kl, 0.0, atol=1e-6)
    # The encoder ignores t (fixed at 1).
    out1 = enc(x0, tf.zeros([3]), head=1)
    np.testing.assert_allclose(out1, enc(x0, tf.ones([3]), head=1))


def test_label_embedding_and_null_label():
    net = VelocityUNet(tiny_unet_config(num_classes=10)).build_variables()
    for w in net.trainable_variables:  # residual branches and heads start at zero: perturb everything
        w.assign(w + tf.random.normal(w.shape, stddev=0.1, seed=1))
    x, t = tf.random.normal([2, 8, 8, 1], seed=4), tf.constant([0.5, 0.5])
    v_null = net(x, t, None, head=1)
    np.testing.assert_allclose(v_null, net(x, t, tf.constant([10, 10]), head=1))
    assert not np.allclose(net(x, t, tf.constant([3, 3]), head=1), v_null, atol=1e-6)


def test_checkpoint_holds_every_variable(tmp_path):
    # tf.train.Checkpoint does not see Keras 3 layers held in lists: checkpoints hold checkpoint_variables(net).
    net = VelocityUNet(tiny_unet_config(dropout=0.1), name="a").build_variables()
    for v in net.trainable_variables:
        v.assign(v + 1.0)
    path = tf.train.Checkpoint(net=checkpoint_variables(net)).save(str(tmp_path / "ckpt"))
    other = VelocityUNet(net.config, name="b").build_variables()
    tf.train.Checkpoint(net=checkpoint_variables(other)).restore(path).assert_existing_objects_matched()
    assert any("seed_generator" in v.path for v in net.variables)  # the dropout RNG states are in there too
    assert len(checkpoint_variables(net)) == len(net.variables)
    for a, b in zip(net.variables, other.variables, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_run_directory_written_before_the_block_options_still_resumes(tmp_path):
    from cud_tf import run_dir
    arch = common.arch_dict(tiny_unet_config(), False)
    (tmp_path / "arch.json").write_text(json.dumps({k: v for k, v in arch.items() if k not in NEW_OPTIONS}))
    run_dir.check_architecture(str(tmp_path), arch)  # the options it lacks read as their defaults
    other = common.arch_dict(tiny_unet_config(resample="residual"), False)
    with pytest.raises(run_dir.RunError, match="resample: pool in the checkpoint vs residual now"):
        run_dir.check_architecture(str(tmp_path), other)

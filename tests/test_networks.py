"""The velocity U-Net, its heads, the dynamic skip, the noise encoder, and class conditioning."""
import numpy as np
import tensorflow as tf

from conftest import tiny_unet_config
from cud_tf.networks.unet import UNetConfig, VelocityUNet, checkpoint_variables, encode_noise, noise_encoder_config


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


def test_mnist_paper_network_structure():
    net = VelocityUNet(UNetConfig()).build_variables()
    # Bare-pool resampling: the reference quotes 2,155,201 (docs/algorithms.md, Deviations from the papers).
    assert net.count_params() == 1_882_945
    assert net(tf.zeros([1, 28, 28, 1]), tf.ones([1]), head=1).shape == (1, 28, 28, 1)


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

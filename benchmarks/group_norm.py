"""cud-tf's GroupNorm against Keras' GroupNormalization, per layer and in the network, side by side.

    python benchmarks/group_norm.py --flagfile=configs/mnist.cfg --out=runs/group_norm.json

The two compute the same function with the same weights (tests/test_networks.py); they differ in how the
statistics are reduced: Keras reduces a `[B, H, W, G, C/G]` view over three non-adjacent axes, cud-tf's
`networks.layers.GroupNorm` takes per-channel means over H, W first, then averages them per group.
- Layers: forward, and forward + backward (gradients of x, gamma, beta), graph mode and XLA, at the paper
  network's shapes (batch --batch_size).
- Network (--flagfile's; MNIST images): the one-step forward pass at --sample_batch (what the
  SavedModel serves) and the train step's forward + backward (RF loss, dropout on) at --batch_size, in graph mode
  and under XLA, one network built with each normalisation, same weights.
Every measurement alternates the variants (`cud_tf.execution.interleaved_seconds`); medians. Prints JSON and a
markdown table, and the CPU's model and vector extensions.
"""
import json
import os
import sys
from unittest import mock

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from trainers import common, cud as cud_trainer  # noqa: E402  (the network flags, which --flagfile sets)

FLAGS = flags.FLAGS
cud_trainer.define_flags()
flags.DEFINE_integer("batch_size", 128, "Batch of the layer rows and the train step.", lower_bound=1)
flags.DEFINE_integer("sample_batch", 64, "Batch of the one-step forward pass.", lower_bound=1)
flags.DEFINE_integer("steps", 5, "Timed rounds per measurement (the median is reported).", lower_bound=1)
flags.DEFINE_list("parts", ["layers", "network"], "Which parts to run.")
flags.DEFINE_string("out", "", "Write the JSON here too.")

LAYER_SHAPES = [(28, 28, 64), (14, 14, 64), (7, 7, 64), (28, 28, 128)]  # the paper network's GN inputs


def keras_group_norm(channels, **kw):
    """Keras' own layer with the network's groups and eps (what `networks.layers.group_norm` built before)."""
    import keras
    return keras.layers.GroupNormalization(groups=min(32, max(1, channels // 4)), epsilon=1e-6, **kw)


def layer_rows():
    """Per layer shape: median ms of Keras' and cud-tf's GroupNorm, forward and forward + backward, graph/XLA."""
    import tensorflow as tf

    from cud_tf import execution
    from cud_tf.networks import layers

    rows = []
    for shape in LAYER_SHAPES:
        full = (FLAGS.batch_size, *shape)
        x = tf.random.stateless_normal(full, seed=[1, 2]) * 2.0 + 0.5
        w = tf.random.stateless_normal(full, seed=[1, 3])
        fns = {}
        for name, make in (("keras", keras_group_norm), ("cud_tf", layers.group_norm)):
            layer = make(shape[-1])
            layer.build(full)

            def forward(layer=layer):
                return layer(x)

            def forward_backward(layer=layer):
                with tf.GradientTape() as tape:
                    tape.watch(x)
                    loss = tf.reduce_sum(layer(x) * w)
                return tape.gradient(loss, [x, *layer.trainable_weights])

            for jit in (False, True):
                mode = "xla" if jit else "graph"
                fns[f"{name} forward {mode}"] = tf.function(forward, jit_compile=jit)
                fns[f"{name} forward+backward {mode}"] = tf.function(forward_backward, jit_compile=jit)
        secs = execution.interleaved_seconds(fns, FLAGS.steps, warmup=2)
        for part in ("forward", "forward+backward"):
            for mode in ("graph", "xla"):
                k, c = secs[f"keras {part} {mode}"], secs[f"cud_tf {part} {mode}"]
                rows.append(dict(shape=list(full), part=part, mode=mode, keras_ms=round(1e3 * k, 2),
                                 cud_tf_ms=round(1e3 * c, 2), speedup=round(k / c, 3)))
    return rows


def network_rows():
    """The --flagfile network with each normalisation: one-step forward and train step, graph and XLA."""
    import tensorflow as tf

    from cud_tf import execution, sampling
    from cud_tf.networks import layers
    from cud_tf.networks.unet import VelocityUNet

    cfg = common.network_config((28, 28, 1), num_classes=0)
    shape = tuple(cfg.image_shape)
    nets = {"cud_tf": VelocityUNet(cfg, name="velocity").build_variables()}
    with mock.patch.object(layers, "group_norm", keras_group_norm):
        nets["keras"] = VelocityUNet(cfg, name="velocity").build_variables()
    for a, b in zip(nets["cud_tf"].weights, nets["keras"].weights):
        b.assign(a)
    z = tf.random.stateless_normal([FLAGS.sample_batch, *shape], seed=[2, 1])
    x = tf.random.stateless_normal([FLAGS.batch_size, *shape], seed=[2, 2])
    t = tf.random.stateless_uniform([FLAGS.batch_size], seed=[2, 3])
    rows = []
    for part, batch in (("one-step forward", FLAGS.sample_batch), ("train step", FLAGS.batch_size)):
        fns = {}
        for name, net in nets.items():
            def forward(net=net):
                return sampling.generate(net, z, 1, "euler", 0)

            def train_step(net=net):
                with tf.GradientTape() as tape:
                    x0 = tf.random.stateless_normal(tf.shape(x), seed=[3, 1])
                    xt = t[:, None, None, None] * x + (1.0 - t[:, None, None, None]) * x0
                    loss = tf.reduce_mean(tf.square(net(xt, t, None, training=True, head=1) - (x - x0)))
                return loss, tape.gradient(loss, net.trainable_variables)

            for jit in (False, True):
                fns[f"{name} {'xla' if jit else 'graph'}"] = tf.function(
                    forward if part == "one-step forward" else train_step, jit_compile=jit)
        secs = execution.interleaved_seconds(fns, FLAGS.steps, warmup=2)
        for mode in ("graph", "xla"):
            k, c = secs[f"keras {mode}"], secs[f"cud_tf {mode}"]
            rows.append(dict(part=part, batch=batch, mode=mode, keras_img_s=round(batch / k, 1),
                             cud_tf_img_s=round(batch / c, 1), speedup=round(k / c, 3)))
    return rows


def main(argv):
    del argv
    import tensorflow as tf

    from cud_tf import execution
    tf.get_logger().setLevel("ERROR")  # each variant is its own tf.function: TF's retracing warnings say nothing here

    result = dict(device=execution.device_name())
    if "layers" in FLAGS.parts:
        result["layers"] = layer_rows()
    if "network" in FLAGS.parts:
        result["network"] = network_rows()
    print(json.dumps(result, indent=1, default=str))
    if FLAGS.out:
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
        with open(FLAGS.out, "w") as f:
            json.dump(result, f, indent=1, default=str)
    print(f"\n{result['device']}")
    if "layers" in result:
        print("\n| GN input | pass | mode | Keras ms | cud-tf ms | speed-up |\n|---|---|---|---|---|---|")
        for r in result["layers"]:
            print(f"| {'x'.join(map(str, r['shape']))} | {r['part']} | {r['mode']} | {r['keras_ms']} | "
                  f"{r['cud_tf_ms']} | {r['speedup']:.2f}x |")
    if "network" in result:
        print("\n| network | batch | mode | Keras GN img/s | cud-tf GN img/s | speed-up |\n|---|---|---|---|---|---|")
        for r in result["network"]:
            print(f"| {r['part']} | {r['batch']} | {r['mode']} | {r['keras_img_s']} | {r['cud_tf_img_s']} | "
                  f"{r['speedup']:.2f}x |")


if __name__ == "__main__":
    app.run(main)

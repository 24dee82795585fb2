"""What the tests share (not fixtures: those are in conftest.py): paths, tiny settings, flag parsing, in-process
command lines. Test modules import this module, never each other."""
import importlib
import importlib.util
import os
import shutil

import pytest
from absl import app, flags
from absl.testing import flagsaver

FLAGS = flags.FLAGS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A trainer run small enough to trace and train in seconds on 2 cores (with the quickstart flagfile first): one
# U-Net level, so that each traced step has few ops (tracing, not compute, is what a tiny run spends its time on).
TINY = ["--channels=8", "--channel_mult=1", "--num_res_blocks=1", "--global_batch_size=8",
        "--checkpoint_every=3", "--log_every=2", "--sample_nfes=1,2", "--num_sample_images=3", "--noprogress",
        "--nojit_compile", "--strategy=default", "--precision=float32"]


def tiny_unet_config(**overrides):
    """A U-Net small enough to trace in seconds, for tests: 8x8x1 images, two levels."""
    from cud_tf.networks.unet import UNetConfig

    kw = dict(image_shape=(8, 8, 1), base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
              mid_attention=False, dropout=0.0, cskip=0.25)
    kw.update(overrides)
    return UNetConfig(**kw)


def define_all_trainer_flags():
    """Every trainer's flags, so that each flagfile in configs/ parses whichever trainer it is for."""
    from trainers import common
    common.define_all_flags()


def parse(*args, prog="trainers.cud"):
    """Parses `args` into the global FLAGS from their defaults (call inside `flagsaver.flagsaver()`)."""
    FLAGS.unparse_flags()
    FLAGS([prog, *args])


def train(trainer, *args):
    """Parses `args` and runs `trainer.run()` in-process with the flags restored afterwards."""
    with flagsaver.flagsaver():
        parse(*args)
        return trainer.run()


def run_cli(capsys, trainer, *args):
    """`python -m trainers.<trainer> args...` in-process: absl's own parsing (app.parse_flags_with_usage, as
    app.run does) and the trainer's main. Returns (exit code, stderr lines)."""
    with flagsaver.flagsaver():
        FLAGS.unparse_flags()
        code = 0
        try:
            argv = app.parse_flags_with_usage([trainer.__name__, *args])
            trainer.main(argv)
        except SystemExit as e:
            code = e.code
    return code, capsys.readouterr().err.splitlines()


def copy_run(run_dir, tmp_path, name="run"):
    """A writable copy of a session run directory (the fixtures' runs are shared: never write into them)."""
    target = os.path.join(str(tmp_path), name)
    shutil.copytree(run_dir, target)
    return target


def read_checkpoint_weights(prefix, net):
    """`net`'s float weights as stored in checkpoint `prefix`, read by name without any network object
    (tf.train.Checkpoint escapes '/' in a dict key as '.S')."""
    import tensorflow as tf
    from cud_tf.disback_path import weight_items
    reader = tf.train.load_checkpoint(prefix)
    return [reader.get_tensor(f"net/{key.replace('/', '.S')}/.ATTRIBUTES/VARIABLE_VALUE")
            for key, _ in weight_items(net)]


# ---- Export and serving: a subprocess environment, the serving protos, tiny run directories. ----

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
ENV.pop("PYTHONPATH", None)
# Exports write TF Serving warm-up requests only with its protos (the `serving` extra) installed.
HAS_SERVING = importlib.util.find_spec("tensorflow_serving") is not None
WARMUP = [] if HAS_SERVING else ["--nowarmup"]
NO_SERVING = "needs tensorflow-serving-api (pip install --no-deps tensorflow-serving-api==2.21.0)"


def serving_protos():
    return pytest.importorskip("tensorflow_serving", reason=NO_SERVING)


def write_run(run_dir, cfg, step=2, model=None):
    """A run directory in the trainer's layout (arch.json, flags.txt, checkpoints/ of DiffusionModel.trackables)
    whose EMA weights differ from its training weights, so a test can tell which were exported. `model`: a
    DiffusionModel of `cfg` (e.g. trained by the test) whose checkpoint, at its own step, to write instead."""
    import numpy as np
    import tensorflow as tf
    from cud_tf import run_dir as run_dir_lib
    from cud_tf.models.base import DiffusionModel, OptimConfig, ema_variables
    from cud_tf.networks.unet import VelocityUNet
    from cud_tf.objectives import OBJECTIVES, ObjectiveConfig
    from trainers import common

    if model is None:
        net = VelocityUNet(cfg, name="velocity").build_variables()
        model = DiffusionModel(net, OBJECTIVES["cud"], ObjectiveConfig(order=cfg.num_heads), OptimConfig(),
                               global_batch_size=8)
        rng = np.random.default_rng(0)
        for avg in ema_variables(model.optimizers_by_group["velocity"]):
            avg.assign(avg + 0.05 * rng.standard_normal(avg.shape).astype(np.float32))
        model.step.assign(step)
    step = int(model.step.numpy())
    run_dir_lib.write_json(os.path.join(run_dir, "arch.json"), common.arch_dict(cfg, False))
    run_dir_lib.write_json(os.path.join(run_dir, "config.json"), run_dir_lib.to_json(
        dict(trainer="cud", method="cud", network=cfg, objective=ObjectiveConfig(order=cfg.num_heads))))
    with open(os.path.join(run_dir, "flags.txt"), "w") as f:
        f.write(f"--method=cud\n--cud_order={cfg.num_heads}\n--channels={cfg.base_channels}\n")
    tf.train.CheckpointManager(tf.train.Checkpoint(**model.trackables()), os.path.join(run_dir, "checkpoints"),
                               max_to_keep=1).save(checkpoint_number=step)


def export_cli(*args):
    """`python -m trainers.export ...` in-process; returns the exported path."""
    from trainers import export as export_trainer
    export_trainer.define_flags()
    with flagsaver.flagsaver():
        FLAGS.unparse_flags()
        FLAGS(["trainers.export", *args])
        return export_trainer.run()


def tiny(**overrides):
    return tiny_unet_config(channel_mult=(1,), **overrides)  # one level: the fastest net to trace and save


# ---- FID: a stand-in for TTUR's Inception graph. ----

def write_test_inception_graph(path, dim=16, size=12, seed=0):
    """A frozen GraphDef shaped like TTUR's classify_image_graph_def.pb, at toy size: a decoded uint8 image
    `image:0` [H, W, 3] -> Cast -> `ExpandDims:0` [1, H, W, 3] -> bilinear resize to size x size -> (x - 128) / 128
    -> conv 3x3 -> relu -> `pool_3:0` [1, 1, 1, dim] -> `pool_3/_reshape` to the fixed [1, dim] (the real graph's
    trap for batches) -> logits -> softmax. Weights are Const nodes, as in a frozen graph. Returns
    `per_image(uint8 [H, W, 3]) -> [dim]`, the graph run the way it was built: one image through `image:0`."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    kernel = rng.normal(size=(3, 3, 3, dim)).astype(np.float32) * 0.3
    head = rng.normal(size=(dim, 5)).astype(np.float32)

    @tf.function(input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)])
    def classify(image):
        x = tf.expand_dims(tf.cast(image, tf.float32), 0, name="ExpandDims")
        x = tf.raw_ops.ResizeBilinear(images=x, size=tf.constant([size, size]))
        x = tf.nn.relu(tf.nn.conv2d((x - 128.0) * (1.0 / 128.0), tf.constant(kernel), 1, "SAME"))
        pool = tf.nn.avg_pool2d(x, size, 1, "VALID", name="pool_3")
        logits = tf.matmul(tf.reshape(pool, [1, dim], name="pool_3/_reshape"), tf.constant(head))
        return tf.nn.softmax(logits, name="softmax")

    graph = classify.get_concrete_function().graph
    with open(path, "wb") as f:
        f.write(graph.as_graph_def().SerializeToString())
    pool3 = tf.compat.v1.wrap_function(
        lambda image: tf.graph_util.import_graph_def(graph.as_graph_def(), input_map={"image:0": image},
                                                     return_elements=["pool_3:0"])[0],
        [tf.TensorSpec([None, None, 3], tf.uint8)])
    return lambda image: pool3(tf.constant(image, tf.uint8)).numpy().reshape(dim)

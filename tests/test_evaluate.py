"""The evaluator end to end on one tiny class-conditional CUD run (trained once for this file): JSON, table, plot
and sample grids under the MNIST-classifier distance; FID from a stand-in Inception GraphDef through
`python -m trainers.evaluate` with reference statistics written by `--fid_stats_out`; too few samples refused."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from absl import flags
from absl.testing import flagsaver

from cud_tf import evaluation
from cud_tf.metrics import load_statistics
from trainers import cud as cud_trainer
from trainers import evaluate

from helpers import ROOT, TINY, parse, write_test_inception_graph

FLAGS = flags.FLAGS
cud_trainer.define_flags()
evaluate.define_flags()


@pytest.fixture(scope="module")
def tiny_run(mnist_data_dir, tmp_path_factory):
    """A 2-step class-conditional CUD K=2 run of the tiny network."""
    run_dir = str(tmp_path_factory.mktemp("eval") / "run")
    with flagsaver.flagsaver():
        parse(f"--flagfile={ROOT}/configs/mnist_quick.cfg", f"--data_dir={mnist_data_dir}", f"--run_dir={run_dir}",
              "--cud_order=2", "--num_classes=-1", "--train_steps=2", *TINY)
        cud_trainer.run()
    return run_dir


def test_evaluate_end_to_end(tiny_run, classifier_dir, tmp_path):
    # 130 samples (the 128-d features need 129) in one batch: RK45 integrates a batch jointly, so one batch costs
    # half the evaluations of two. Several batches, with a remainder, are exercised by the FID test below.
    out_dir = str(tmp_path / "eval")
    with flagsaver.flagsaver():
        parse(f"--run_dir={tiny_run}", "--nfe=1,2,3", "--num_samples=130", "--eval_batch_size=130", "--sampler=heun",
              "--head=2", "--rk45", "--rk45_tol=1e-2", "--guidance_scale=1,2", f"--out_dir={out_dir}",
              f"--classifier_dir={classifier_dir}", "--min_accuracy=0.9", "--num_grid_images=4",
              "--nojit_compile")
        result = evaluate.run(log=lambda _: None)

    with open(os.path.join(out_dir, "eval_heun_head2.json")) as f:
        stored = json.load(f)
    assert stored == json.loads(json.dumps(result))
    assert stored["metric"] == "FD (MNIST classifier)" and stored["conditional"] and stored["step"] == 2
    assert stored["feature_dim"] == 128 and stored["reference"]["n"] == 10000
    assert stored["weights"] == stored["evaluated_weights"] == "ema"  # a CUD run: its EMA slots hold its EMA
    # Heun is NFE-matched (2N - 1): NFE 2 needs as many steps as NFE 1, so it is evaluated once.
    assert [(r["solver"], r["guidance_scale"], r["nfe"]) for r in stored["rows"] if r["solver"] == "heun"] == [
        ("heun", 1.0, 1), ("heun", 1.0, 3), ("heun", 2.0, 1), ("heun", 2.0, 3)]
    rk45 = [r for r in stored["rows"] if r["solver"] == "rk45"]
    assert len(rk45) == 2 and all(r["nfe"] > 3 for r in rk45)
    for r in stored["rows"]:
        assert np.isfinite(r["distance"]) and r["distance"] > 0 and 0.0 <= r["class_accuracy"] <= 1.0
        assert r["num_samples"] == 130
    table = open(os.path.join(out_dir, "eval_heun_head2.md")).read()
    assert "| sampler | guidance | NFE | FD (MNIST classifier) | samples | class accuracy |" in table
    assert "(step 2, ema weights, head 2, 130 samples" in table
    assert "| heun | 2 | 3 |" in table and "FID" not in table
    assert all(" | 130 | " in line for line in table.splitlines() if line.startswith(("| heun", "| rk45")))
    for name in ("eval_heun_head2.png", "samples_heun_head2_w1.png", "samples_heun_head2_w2.png"):
        assert os.path.getsize(os.path.join(out_dir, name)) > 1000
    from tensorboard.backend.event_processing import event_accumulator
    acc = event_accumulator.EventAccumulator(os.path.join(out_dir, "tb"), size_guidance={"tensors": 0})
    acc.Reload()
    series = {e.step: float(tf.make_ndarray(e.tensor_proto)) for e in acc.Tensors("eval/heun_head2_w2")}
    assert series == {r["nfe"]: pytest.approx(r["distance"]) for r in stored["rows"]
                      if r["solver"] == "heun" and r["guidance_scale"] == 2.0}  # FD against NFE as a scalar
    assert "eval/heun_head2_plot" in acc.Tags()["tensors"]

    # Bad input: one clear error, nothing written.
    with flagsaver.flagsaver():
        parse(f"--run_dir={tiny_run}", "--head=3", f"--out_dir={tmp_path / 'never'}")
        with pytest.raises(evaluation.EvalError, match="head=3 but the network"):
            evaluate.run(log=lambda _: None)
    assert not os.path.exists(tmp_path / "never")


def _main_fails(capsys, *args):
    """Runs the evaluator's absl main in-process; returns its stderr lines (asserting exit status 2)."""
    with flagsaver.flagsaver():
        parse(*args)
        with pytest.raises(SystemExit) as e:
            evaluate.main(["evaluate"])
    assert e.value.code == 2
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_too_few_samples_for_the_features_are_refused(tiny_run, tmp_path, capsys):
    # 10 samples give a rank-9 covariance of 128-d features: today's code printed a number, exit 0.
    never = tmp_path / "never"
    lines = _main_fails(capsys, f"--run_dir={tiny_run}", "--num_samples=10", f"--out_dir={never}",
                        f"--classifier_dir={tmp_path / 'no_classifier'}")
    assert len(lines) == 1 and "num_samples=10 is too few" in lines[0] and "129" in lines[0], lines
    graph = str(tmp_path / "g.pb")
    write_test_inception_graph(graph, dim=16)
    lines = _main_fails(capsys, f"--run_dir={tiny_run}", "--num_samples=16", f"--out_dir={never}",
                        f"--fid_inception_graph={graph}", f"--classifier_dir={tmp_path / 'no_classifier'}")
    assert len(lines) == 1 and "at least 17 samples" in lines[0], lines
    assert not never.exists() and not (tmp_path / "no_classifier").exists()  # refused before any work
    lines = _main_fails(capsys, f"--run_dir={tiny_run}", "--metric=inception", f"--out_dir={never}")
    assert len(lines) == 1 and "not FID" in lines[0] and "--fid_inception_graph" in lines[0], lines
    lines = _main_fails(capsys, f"--fid_stats_out={never / 's.npz'}", f"--fid_inception_graph={graph}",
                        f"--run_dir={tiny_run}")
    assert len(lines) == 1 and "takes no --run_dir" in lines[0], lines
    assert not never.exists()
    with pytest.raises(evaluation.EvalError, match="nfe must list positive"):
        evaluation.EvalConfig(nfes=())


def test_fid_from_a_graph_def_end_to_end(tiny_run, mnist_data_dir, classifier_dir, tmp_path, capsys):
    graph = str(tmp_path / "classify_image_graph_def.pb")
    write_test_inception_graph(graph, dim=16)
    stats = str(tmp_path / "stats" / "mnist_test.npz")
    with flagsaver.flagsaver():
        parse(f"--fid_stats_out={stats}", "--dataset=mnist_offline", f"--data_dir={mnist_data_dir}",
              "--reference_split=test[:200]", f"--fid_inception_graph={graph}")
        evaluate.main(["evaluate"])
    with np.load(stats) as d:
        assert set(d.files) == {"mu", "sigma", "n"} and d["mu"].shape == (16,) and int(d["n"]) == 200

    out_dir = str(tmp_path / "eval")
    proc = subprocess.run(
        [sys.executable, "-m", "trainers.evaluate", f"--run_dir={tiny_run}", f"--fid_inception_graph={graph}",
         f"--fid_ref={stats}", "--nfe=1,2", "--num_samples=25", "--eval_batch_size=10", f"--out_dir={out_dir}",
         f"--classifier_dir={classifier_dir}", "--min_accuracy=0.9", "--nojit_compile", "--num_grid_images=2"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(os.path.join(out_dir, "eval_euler_head1.json")) as f:
        result = json.load(f)
    assert result["metric"] == "FID" and result["metric_id"] == "fid" and result["feature_dim"] == 16
    assert result["reference"] == {"source": stats, "n": 200}
    assert result["feature_extractor"]["graph"] == graph and len(result["feature_extractor"]["graph_sha256"]) == 64
    assert [r["nfe"] for r in result["rows"]] == [1, 2]
    for r in result["rows"]:
        assert np.isfinite(r["distance"]) and r["distance"] > 0 and r["num_samples"] == 25  # batches 10 + 10 + 5
        assert 0.0 <= r["class_accuracy"] <= 1.0  # the MNIST classifier still checks the classes
    table = open(os.path.join(out_dir, "eval_euler_head1.md")).read()
    assert "| FID | samples |" in table and "reference: 200 real images" in table
    # The same reference through the library, as a notebook would load it.
    assert load_statistics(stats).n == 200


def test_in_training_evaluation_writes_fd_scalars(mnist_data_dir, classifier_dir, tmp_path):
    """--eval_every's hook (cud_tf.evaluation.TrainingEvaluation, as the trainers install it): every k steps the
    distance at each NFE as TensorBoard scalars eval/fd_nfe<n> of the run, nothing in between."""
    import tensorflow as tf
    from tensorboard.backend.event_processing import event_accumulator

    from cud_tf.metrics import mnist_classifier
    from cud_tf.models.base import OptimConfig
    from cud_tf.models.cud import CudModel
    from cud_tf.networks.unet import VelocityUNet
    from cud_tf.objectives import OBJECTIVES, ObjectiveConfig
    from helpers import tiny_unet_config

    net = VelocityUNet(tiny_unet_config(image_shape=(28, 28, 1))).build_variables()
    model = CudModel(net, OBJECTIVES["cud"], ObjectiveConfig(), OptimConfig(), global_batch_size=8)
    cfg = evaluation.EvalConfig(nfes=(1, 2), num_samples=130, batch_size=130, jit_compile=False)
    metric = evaluation.MetricConfig(classifier_dir=classifier_dir,
                                     classifier=mnist_classifier.ClassifierConfig(min_accuracy=0.9))
    lines = []
    ev = evaluation.TrainingEvaluation(model, str(tmp_path), (28, 28, 1), "mnist_offline", mnist_data_dir, 2, cfg,
                                       metric, log=lines.append)
    for step in (1, 2, 3):
        ev(step)
    acc = event_accumulator.EventAccumulator(str(tmp_path / "tb" / "eval"), size_guidance={"tensors": 0})
    acc.Reload()
    for tag in ("eval/fd_nfe1", "eval/fd_nfe2"):
        events = acc.Tensors(tag)
        assert [e.step for e in events] == [2] and float(tf.make_ndarray(events[0].tensor_proto)) > 0
    assert len(lines) == 1 and lines[0].startswith("eval at step 2: NFE 1 ")
    with pytest.raises(evaluation.EvalError, match="129"):  # too few samples for the metric: refused up front
        evaluation.TrainingEvaluation(model, str(tmp_path), (28, 28, 1), "mnist_offline", mnist_data_dir, 2,
                                      evaluation.EvalConfig(nfes=(1,), num_samples=50), metric)


def test_evaluated_weights_name_what_the_ema_slots_hold():
    """A one-step or DisBack run that evaluates its raw network keeps it in the EMA slots: the result says so."""
    assert evaluation.evaluated_weights("ema", {}) == "ema"  # a CUD, RF or TRACT run
    assert evaluation.evaluated_weights("ema", {"eval_weights": "generator"}) == "generator"
    assert evaluation.evaluated_weights("ema", {"eval_weights": "student"}) == "student"
    assert evaluation.evaluated_weights("ema", {"eval_weights": "ema"}) == "ema"
    assert evaluation.evaluated_weights("train", {"eval_weights": "generator"}) == "train"

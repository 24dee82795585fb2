"""The DisBack trainer end to end on the session's tiny CUD run: both stages with a resume, the path-off
ablation, and a resume with other path settings refused."""
import json
import os

import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver

from helpers import ROOT, read_checkpoint_weights
from cud_tf import disback_path as disback
from trainers import disback as disback_trainer

FLAGS = flags.FLAGS
disback_trainer.define_flags()


@pytest.fixture(scope="module")
def teacher_dir(tiny_cud_run):
    return tiny_cud_run["run_dir"]


def tiny_disback_flags(teacher, run_dir, data_dir):
    return [f"--flagfile={ROOT}/configs/disback_mnist.cfg", f"--disback_teacher_run_dir={teacher}",
            f"--run_dir={run_dir}", "--global_batch_size=8", "--noprogress", "--nojit_compile", "--strategy=default",
            "--precision=float32",
            "--sample_nfes=1", "--num_sample_images=2", f"--data_dir={data_dir}", "--disback_fake_updates=2"]


def test_both_stages_end_to_end_with_resume_and_path_off(teacher_dir, mnist_data_dir, tmp_path):
    run_dir = str(tmp_path / "disback")
    base = tiny_disback_flags(teacher_dir, run_dir, mnist_data_dir) + [
        "--disback_num_nodes=3", "--disback_record_every=2", "--disback_node_iterations=1,2", "--checkpoint_every=2"]
    logs = []
    with flagsaver.flagsaver():
        FLAGS.unparse_flags()
        FLAGS(["trainers.disback", *base, "--train_steps=2"])
        metrics = disback_trainer.run(log=logs.append)
    assert np.isfinite(metrics["loss"]) and metrics["loss"] > 0
    path = disback.DegradationPath(os.path.join(run_dir, "degradation", "path"))
    path.check_complete(3)
    assert [n["step"] for n in path.nodes()] == [0, 2, 4, 6]
    assert len({n["sha256"] for n in path.nodes()}) == 4  # the degradation network moved between nodes
    from cud_tf import run_dir as run_dir_lib
    teacher = run_dir_lib.load_run(teacher_dir)
    assert path.nodes()[0]["sha256"] == disback.fingerprint(teacher.net)  # s'_0 is the teacher

    # Resume stage 2 from its flags: stage 1 is complete and is not rerun; the target keeps walking back.
    with flagsaver.flagsaver():
        FLAGS.unparse_flags()
        FLAGS(["trainers.disback", f"--flagfile={run_dir}/flags.txt", "--train_steps=5"])
        disback_trainer.run(log=logs.append)
    assert not any("stage-1 step" in line and "resumed" in line for line in logs)
    with open(os.path.join(run_dir, "target_switches.jsonl")) as f:
        switches = [json.loads(line) for line in f]
    # Schedule: s'_2 for 1 iteration, s'_1 for 2, then s'_0; the resumed run (from iteration 2) reloads s'_1.
    assert [(s["iteration"], s["node"]) for s in switches] == [(0, 2), (1, 1), (2, 1), (3, 0)]
    for s in switches:  # each switch left the target holding exactly the node's stored weights
        assert s["sha256"] == path.nodes()[s["node"]]["sha256"]
    node0 = read_checkpoint_weights(os.path.join(path.directory, "node_000"), teacher.net)
    for a, (_, b) in zip(node0, disback.weight_items(teacher.net)):
        np.testing.assert_array_equal(a, b.numpy())

    evaluated = run_dir_lib.load_run(run_dir)  # what trainers.evaluate and trainers.export read ("ema" slots)
    assert disback.fingerprint(evaluated.net) != disback.fingerprint(teacher.net)
    # The default --disback_eval_weights=generator: those slots hold the raw generator, despite --ema_decay=0.99.
    assert evaluated.run_config["eval_weights"] == "generator"
    raw = run_dir_lib.load_run(run_dir, weights="train")
    assert disback.fingerprint(evaluated.net) == disback.fingerprint(raw.net)
    samples = np.load(os.path.join(run_dir, "samples.npy"))
    assert samples.shape == (1, 2, 28, 28, 1) and np.isfinite(samples).all()

    # Path off: no stage 1, the teacher is the target throughout. Evaluated through the generator's EMA here:
    # after two generator updates the EMA (decay 0.99) is no longer the raw generator.
    off_dir = str(tmp_path / "off")
    with flagsaver.flagsaver():
        FLAGS.unparse_flags()
        FLAGS(["trainers.disback", *tiny_disback_flags(teacher_dir, off_dir, mnist_data_dir), "--disback_path=off",
               "--train_steps=4", "--disback_eval_weights=ema"])
        disback_trainer.run(log=logs.append)
    assert not os.path.exists(os.path.join(off_dir, "degradation"))
    off_ema, off_raw = (run_dir_lib.load_run(off_dir, weights=w) for w in ("ema", "train"))
    assert off_ema.run_config["eval_weights"] == "ema"
    assert disback.fingerprint(off_ema.net) != disback.fingerprint(off_raw.net)
    with open(os.path.join(off_dir, "target_switches.jsonl")) as f:
        assert [json.loads(line)["node"] for line in f] == [0]

    # Another path setting on the same run directory is refused without touching it.
    with flagsaver.flagsaver():
        FLAGS.unparse_flags()
        FLAGS(["trainers.disback", f"--flagfile={run_dir}/flags.txt", "--disback_record_every=3"])
        from cud_tf.run_dir import RunError
        with pytest.raises(RunError, match="disback_record_every: 2 in the checkpoint vs 3 now"):
            disback_trainer.run(log=logs.append)

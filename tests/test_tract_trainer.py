"""The TRACT trainer end to end on the session's tiny CUD run: two phases, a resume mid-phase with its teacher,
and a resume with another schedule refused."""
import glob
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from absl import flags
from absl.testing import flagsaver

from helpers import ROOT
from cud_tf.networks.unet import VelocityUNet
from trainers import tract as tract_trainer

FLAGS = flags.FLAGS
tract_trainer.define_flags()


def checkpoint_values(run_dir, step):
    """(phase, teacher weights, inference EMA weights) of checkpoint ckpt-<step>, in network variable order."""
    from cud_tf import run_dir as run_dir_lib
    path = os.path.join(run_dir, "checkpoints", f"ckpt-{step}")
    ema = run_dir_lib.load_run(run_dir, checkpoint=path)  # the optimizer's EMA slots: the inference EMA
    teacher = VelocityUNet(ema.config, name="teacher").build_variables()
    phase = tf.Variable(-1, dtype=tf.int64)
    tf.train.Checkpoint(teacher_weights=list(teacher.trainable_variables), phase=phase).restore(
        path).expect_partial().assert_existing_objects_matched()
    values = lambda net: [v.numpy() for v in net.trainable_variables]  # noqa: E731
    return int(phase.numpy()), values(teacher), values(ema.net)


def test_end_to_end_two_phases_resume_mid_phase(tiny_cud_run, mnist_data_dir, tmp_path):
    teacher_dir, run_dir = tiny_cud_run["run_dir"], str(tmp_path / "tract")  # the teacher: CUD K=2
    tiny = ["--global_batch_size=8", "--noprogress", "--nojit_compile", "--strategy=default", "--precision=float32",
            "--sample_nfes=1,2", "--num_sample_images=3", f"--data_dir={mnist_data_dir}"]

    base = [f"--flagfile={ROOT}/configs/tract_mnist.cfg", f"--run_dir={run_dir}",
            f"--tract_teacher_run_dir={teacher_dir}", "--tract_schedule=4,2,1", "--tract_steps_per_phase=3",
            "--checkpoint_every=3", "--sample_head=2", "--tract_teacher_solver=heun",
            "--tract_weight=truncated_snr", *tiny]
    with flagsaver.flagsaver():
        FLAGS.unparse_flags()
        FLAGS(["trainers.tract", *base, "--train_steps=4"])  # stops one step into phase 1
        metrics = tract_trainer.run()
    assert np.isfinite(metrics["loss"]) and metrics["phase"] == 1.0 and metrics["student_steps"] == 1.0
    phase3, teacher3, ema3 = checkpoint_values(run_dir, 3)
    phase4, teacher4, _ = checkpoint_values(run_dir, 4)
    assert (phase3, phase4) == (0, 1) and len(teacher4) == len(ema3) > 0
    for a, b in zip(ema3, teacher4):  # the teacher of phase 1 is the inference EMA at the end of phase 0
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(teacher3, teacher4))

    with flagsaver.flagsaver():  # resume mid-phase from the run's own flags
        FLAGS.unparse_flags()
        FLAGS(["trainers.tract", f"--flagfile={run_dir}/flags.txt", "--train_steps=6",
               f"--export_model={tmp_path}/saved/mnist_tract"])  # exported when the run reaches step 6
        assert FLAGS.tract_steps_per_phase == 3 and FLAGS.tract_schedule == ["4", "2", "1"]
        tract_trainer.run()
    with open(os.path.join(tmp_path, "saved", "mnist_tract", "1", "assets.extra", "cud_tf.json")) as f:
        exported = json.load(f)
    assert exported["run"]["step"] == 6 and exported["sampler"]["default_steps"] == 1
    assert exported["sampler"]["head"] == 2  # --sample_head drives it
    phase6, teacher6, _ = checkpoint_values(run_dir, 6)
    assert phase6 == 1
    for a, b in zip(teacher4, teacher6):  # the resumed run kept its phase's teacher
        np.testing.assert_array_equal(a, b)
    samples = np.load(os.path.join(run_dir, "samples.npy"))
    assert samples.shape == (2, 3, 28, 28, 1) and np.isfinite(samples).all()

    # A schedule that does not match the checkpoint is refused, and past the schedule's end is an error.
    with flagsaver.flagsaver():
        FLAGS.unparse_flags()
        FLAGS(["trainers.tract", f"--flagfile={run_dir}/flags.txt", "--train_steps=8",
               "--tract_steps_per_phase=4"])
        from cud_tf.run_dir import RunError
        with pytest.raises(RunError, match="tract_steps_per_phase: 3 in the checkpoint vs 4 now"):
            tract_trainer.run()
        FLAGS.tract_steps_per_phase = 3
        with pytest.raises(flags.ValidationError, match="past the schedule"):
            tract_trainer.run()
        FLAGS.tract_steps_per_phase, FLAGS.train_steps = 3, 6
        FLAGS.export_model = f"{tmp_path}/saved/.hidden"  # refused before anything is trained or written
        with pytest.raises(flags.ValidationError, match="export_model.*must be letters"):
            tract_trainer.run()
        FLAGS.export_model = f"{tmp_path}/saved/mnist_tract"
        tract_trainer.run()  # a rerun of the finished run exports nothing new
    assert os.listdir(os.path.join(tmp_path, "saved", "mnist_tract")) == ["1"]
    assert sorted(glob.glob(os.path.join(run_dir, "checkpoints", "ckpt-*.index")))[-1].endswith("ckpt-6.index")
    assert os.listdir(os.path.join(tmp_path, "saved")) == ["mnist_tract"]
    assert "--tract_steps_per_phase=3" in open(os.path.join(run_dir, "flags.txt")).read()

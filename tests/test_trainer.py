"""The CUD trainer: flagfiles, flag errors, and one end-to-end run that trains, resumes and samples."""
import glob
import importlib
import os
import pkgutil
import subprocess
import sys

import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver

from trainers import common
from trainers import cud as cud_trainer

FLAGS = flags.FLAGS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every trainer's flags, so that each flagfile in configs/ parses whichever trainer it is for.
for _info in pkgutil.iter_modules([os.path.join(ROOT, "trainers")]):
    _module = importlib.import_module(f"trainers.{_info.name}")
    if hasattr(_module, "define_flags"):
        _module.define_flags()


def parse(*args):
    FLAGS.unparse_flags()
    FLAGS(["trainers.cud", *args])


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.cfg"))))
def test_every_flagfile_parses(path):
    with flagsaver.flagsaver():
        os.chdir(ROOT)  # flagfiles include their base files by paths relative to the repository
        parse(f"--flagfile={path}")
        assert any(FLAGS[name].present for name in FLAGS)  # the file set flags (parsing raises on a bad one)
        common.network_config((32, 32, 3), num_heads=FLAGS.cud_order)  # the network flags form a valid config


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "trainers.cud", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})


@pytest.mark.parametrize("args,expected", [
    (["--bogus_flag=1"], "Unknown command line flag 'bogus_flag'"),
    (["--cud_order=7"], "cud_order"),
    (["--train_steps=-5"], "train_steps"),
    (["--cud_step=sideways"], "cud_step"),
])
def test_bad_flags_exit_nonzero_with_a_clear_line(args, expected):
    proc = run_cli("--run_dir=/tmp/never_written", *args)
    assert proc.returncode != 0
    assert expected in proc.stderr
    assert not os.path.exists("/tmp/never_written")


def test_unknown_dataset_fails_fast(tmp_path):
    proc = run_cli(f"--run_dir={tmp_path / 'run'}", "--dataset=no_such_dataset_xyz", f"--data_dir={tmp_path}")
    assert proc.returncode != 0
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "no_such_dataset_xyz" in lines[0]


TINY = ["--channels=8", "--channel_mult=1,2", "--num_res_blocks=1", "--global_batch_size=8",
        "--checkpoint_every=3", "--log_every=2", "--sample_nfes=1,2", "--num_sample_images=3", "--noprogress",
        "--nojit_compile",
        "--strategy=default"]


def test_end_to_end_train_resume_sample(mnist_data_dir, tmp_path):
    run_dir = str(tmp_path / "run")
    base = [f"--flagfile={ROOT}/configs/mnist_quick.cfg", f"--data_dir={mnist_data_dir}", f"--run_dir={run_dir}",
            "--cud_order=2", "--noise_encoder", *TINY]
    with flagsaver.flagsaver():
        parse(*base, "--train_steps=4")
        metrics = cud_trainer.run()
    assert np.isfinite(metrics["loss"]) and "kd2" in metrics
    ckpts = sorted(os.listdir(os.path.join(run_dir, "checkpoints")))
    assert "ckpt-3.index" in ckpts and "ckpt-4.index" in ckpts
    assert glob.glob(os.path.join(run_dir, "tb", "events.out.tfevents.*"))
    samples = np.load(os.path.join(run_dir, "samples.npy"))
    assert samples.shape == (2, 3, 28, 28, 1) and np.isfinite(samples).all()
    assert os.path.getsize(os.path.join(run_dir, "samples.png")) > 100

    # Resume from the run's own flags.txt, with more steps: it continues at step 4.
    with flagsaver.flagsaver():
        parse(f"--flagfile={run_dir}/flags.txt", "--train_steps=6")
        assert FLAGS.cud_order == 2 and FLAGS.noise_encoder and FLAGS.channels == 8
        cud_trainer.run()
    assert "ckpt-6.index" in os.listdir(os.path.join(run_dir, "checkpoints"))

    # Another architecture in the same run directory is refused, and the checkpoints stay.
    with flagsaver.flagsaver():
        parse(f"--flagfile={run_dir}/flags.txt", "--train_steps=8", "--channels=16")
        from cud_tf.run_dir import RunError
        with pytest.raises(RunError, match="another architecture"):
            cud_trainer.run()
    assert "ckpt-6.index" in os.listdir(os.path.join(run_dir, "checkpoints"))

    # The run loads back (EMA weights by default) for evaluation, export and distillation.
    from cud_tf import run_dir
    ema, train = run_dir.load_run(run_dir), run_dir.load_run(run_dir, weights="train")
    recorded = common.read_run_flags(run_dir)  # flags.txt read back by absl: booleans named "no..." included
    assert ema.step == 6 and ema.config.num_heads == 2 and recorded["cud_order"] == 2
    assert recorded["noise_encoder"] is True and recorded["progress"] is False
    assert ema.run_config["noise_encoder"] is True and ema.run_config["objective"]["order"] == 2
    assert any(not np.allclose(a.numpy(), b.numpy()) for a, b in
               zip(ema.net.trainable_variables, train.net.trainable_variables))

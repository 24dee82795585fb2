"""Faults the trainer survives: preemption (SIGTERM), Ctrl-C (SIGINT) and SIGKILL with a bitwise-exact resume, a
second trainer on the same run directory, a resume with other settings, non-finite losses,
gradients and weights that never reach a checkpoint, corrupted checkpoints, a full disk, and bad input."""
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from absl import flags
from absl.testing import flagsaver

from helpers import tiny
from cud_tf import training
from cud_tf.models.base import DiffusionModel, OptimConfig
from cud_tf.networks.unet import VelocityUNet
from cud_tf.objectives import OBJECTIVES, ObjectiveConfig
from trainers import cud as cud_trainer

FLAGS = flags.FLAGS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
cud_trainer.define_flags()
TINY = ["--channels=8", "--channel_mult=1", "--num_res_blocks=1", "--global_batch_size=8", "--sample_nfes=1",
        "--num_sample_images=2", "--noprogress", "--nojit_compile", "--nomid_attention", "--strategy=default",
        "--precision=float32", "--log_every=100"]
B = 8


# ---- Preemption: SIGKILL between checkpoints, then SIGTERM, resume to exactly the uninterrupted weights. ----

def start(run_dir, data_dir, steps, console_defaults=False):
    """A trainer subprocess; with `console_defaults`, with the logging settings a user gets (the trainers' own)."""
    args = [sys.executable, "-m", "trainers.cud", *TINY, f"--data_dir={data_dir}", f"--run_dir={run_dir}",
            f"--train_steps={steps}", "--checkpoint_every=4", "--dropout=0.3", "--seed=5"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    if console_defaults:
        env.pop("TF_CPP_MIN_LOG_LEVEL")
    return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def latest_step(run_dir):
    path = tf.train.latest_checkpoint(os.path.join(run_dir, "checkpoints"))
    return int(path.rsplit("-", 1)[1]) if path else None


def wait_for_checkpoint(run_dir, step, proc, timeout=300):
    """Waits until checkpoint `step` (or a later one) is complete, i.e. named by the state file."""
    t0 = time.time()
    while (latest_step(run_dir) or 0) < step:
        assert proc.poll() is None, f"the run ended before checkpoint {step}: {proc.communicate()}"
        assert time.time() - t0 < timeout, f"no checkpoint {step} after {timeout} s"
        time.sleep(0.02)


def checkpoint_values(path):
    reader = tf.train.load_checkpoint(path)
    return {name: reader.get_tensor(name) for name, _ in tf.train.list_variables(path)
            if "save_counter" not in name and "OBJECT_GRAPH" not in name}


def test_sigkill_sigterm_sigint_resume_bitwise_exact(mnist_data_dir, tmp_path):
    n = 24
    reference = start(tmp_path / "reference", mnist_data_dir, n, console_defaults=True)
    chain = str(tmp_path / "chain")

    killed = start(chain, mnist_data_dir, n)  # SIGKILL between checkpoints: resumes from the last one
    wait_for_checkpoint(chain, 4, killed)
    killed.kill()
    killed.communicate()
    assert killed.returncode == -signal.SIGKILL
    resumed_at = latest_step(chain)
    assert resumed_at < n
    assert json.loads(open(os.path.join(chain, "lock")).read())["pid"] == killed.pid  # left behind by the kill

    preempted = start(chain, mnist_data_dir, n)  # SIGTERM: saves at the next step and exits cleanly
    wait_for_checkpoint(chain, resumed_at + 4, preempted)
    preempted.send_signal(signal.SIGTERM)
    out, err = preempted.communicate(timeout=120)
    assert preempted.returncode == 0, err
    assert "taking over the stale lock" in out and f"pid {killed.pid}" in out
    assert f"resumed from {chain}/checkpoints/ckpt-{resumed_at} at step {resumed_at}" in out
    stopped_at = int(re.search(r"SIGTERM: saved a checkpoint at step (\d+)", out).group(1))
    assert resumed_at + 4 <= stopped_at < n and latest_step(chain) == stopped_at
    assert not os.path.exists(os.path.join(chain, "lock"))  # released on exit

    interrupted = start(chain, mnist_data_dir, n)  # Ctrl-C: saves after the current step, exits 130
    wait_for_checkpoint(chain, stopped_at + 4, interrupted)
    interrupted.send_signal(signal.SIGINT)
    out, err = interrupted.communicate(timeout=120)
    assert interrupted.returncode == 130, err
    saved = re.search(r"interrupted: saved checkpoint (\S+) at step (\d+); resume with the same command", err)
    assert saved, err
    interrupted_at = int(saved.group(2))
    assert stopped_at + 4 <= interrupted_at < n and latest_step(chain) == interrupted_at

    finished = start(chain, mnist_data_dir, n)
    out, err = finished.communicate(timeout=240)
    assert finished.returncode == 0, err
    assert f"at step {interrupted_at}" in out
    out, err = reference.communicate(timeout=240)
    assert reference.returncode == 0, err
    # A quiet console: one start line, one end line, and at most 5 others (TF's C++ notices and warnings).
    lines = [line for line in (out + err).splitlines() if line.strip()]
    assert lines[0].startswith(f"training {tmp_path / 'reference'}: ") and "a new run" in lines[0], lines
    assert sum(line.startswith("done: step 24 in ") for line in lines) == 1, lines
    assert len(lines) <= 7, lines

    ref = checkpoint_values(os.path.join(tmp_path, "reference", "checkpoints", f"ckpt-{n}"))
    got = checkpoint_values(os.path.join(chain, "checkpoints", f"ckpt-{n}"))
    assert any("seed_generator" in name for name in ref)  # the dropout RNG is part of the checkpoint
    assert sorted(ref) == sorted(got) and len(ref) > 20
    for name in ref:
        np.testing.assert_array_equal(ref[name], got[name], err_msg=name)
    history = [json.loads(line) for line in open(os.path.join(chain, "history.jsonl"))]
    assert len(history) == 4 and history[0]["changed"] == "created"  # each invocation that got the lock


def test_a_second_trainer_on_a_locked_run_dir_exits_naming_the_holder(mnist_data_dir, tmp_path):
    from cud_tf import run_dir as run_dir_lib
    chain = str(tmp_path / "run")
    os.makedirs(chain)
    with run_dir_lib.RunLock(chain, log=None):  # this process holds the run directory, as a running trainer does
        second = start(chain, mnist_data_dir, 4)
        _, err = second.communicate(timeout=120)
        assert os.path.exists(os.path.join(chain, "lock"))
    assert second.returncode == 2
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"is in use by pid {os.getpid()} on host" in errors[0], err
    assert "wait for that trainer to end" in errors[0]
    assert sorted(os.listdir(chain)) == []  # nothing written, and the holder's lock released on exit


# ---- Library-level faults on a tiny 8x8 model: NaN batches, non-finite weights, checkpoints, disk. ----

def build_model(learning_rate=1e-3):
    with tf.distribute.get_strategy().scope():
        tf.keras.utils.set_random_seed(0)
        net = VelocityUNet(tiny(dropout=0.2)).build_variables()
        return DiffusionModel(net, OBJECTIVES["rf"], ObjectiveConfig(), OptimConfig(learning_rate=learning_rate),
                              global_batch_size=B, seed=1)


def dataset(poisoned=()):
    """make_dist_dataset: batch i is uniform noise, or NaN when i is in `poisoned`."""
    def make(start_step):
        def batch(i):
            image = tf.random.stateless_uniform([B, 8, 8, 1], [i, 0], -1.0, 1.0)
            bad = tf.reduce_any(tf.equal(i, tf.constant(list(poisoned) or [-1], tf.int64)))
            return {"image": tf.where(bad, np.nan, image), "label": tf.zeros([B], tf.int32)}
        ds = tf.data.Dataset.range(start_step, 1 << 30).map(batch)
        return tf.distribute.get_strategy().experimental_distribute_dataset(ds)
    return make


def loop(run_dir, steps, every=1, keep=3, nonfinite="skip"):
    return training.LoopConfig(run_dir=str(run_dir), train_steps=steps, checkpoint_every=every,
                               keep_checkpoints=keep, nonfinite=nonfinite, sample_nfes=(1,), num_sample_images=2,
                               progress=False)


def train(model, cfg, make_dataset, lines=None):
    lines = [] if lines is None else lines
    return training.train(model, tf.distribute.get_strategy(), make_dataset, cfg, {"arch": "tiny"}, (8, 8, 1),
                          log=lines.append)


def assert_finite_checkpoints(run_dir):
    paths = tf.train.get_checkpoint_state(os.path.join(run_dir, "checkpoints")).all_model_checkpoint_paths
    assert paths
    for path in paths:
        for name, value in checkpoint_values(path).items():
            assert np.isfinite(value).all() if value.dtype.kind == "f" else True, (path, name)
    return [int(p.rsplit("-", 1)[1]) for p in paths]


def test_nan_never_reaches_a_checkpoint(tmp_path):
    model = build_model()
    run_dir = tmp_path / "run"
    train(model, loop(run_dir, 4), dataset(poisoned=[2]))  # skip: step 3's NaN batch is dropped, counted
    assert int(model.skipped_updates.numpy()) == 1
    assert assert_finite_checkpoints(run_dir) == [2, 3, 4]
    assert np.isfinite(np.load(run_dir / "samples.npy")).all()

    # Weights that an (absurd) learning rate makes non-finite from finite gradients are never saved either.
    model.optimizers_by_group["velocity"].learning_rate = float("inf")
    other = tmp_path / "other"
    with pytest.raises(training.TrainingError, match=r"weights are not finite at step 5; nothing saved"):
        train(model, loop(other, 8), dataset())
    assert not os.path.exists(other / "checkpoints" / "checkpoint")


def test_full_disk_then_corrupted_checkpoint_keep_the_good_one(tmp_path, monkeypatch):
    run_dir = str(tmp_path / "run")
    ckpts = os.path.join(run_dir, "checkpoints")
    real_save = tf.train.CheckpointManager.save

    def full_disk(self, checkpoint_number=None, **kw):  # what a full disk did here (tmpfs of 200 KiB)
        if checkpoint_number < 4:
            return real_save(self, checkpoint_number=checkpoint_number, **kw)
        os.makedirs(os.path.join(ckpts, f"ckpt-{checkpoint_number}_temp"))
        raise tf.errors.ResourceExhaustedError(None, None, (
            f"{{{{function_node __wrapped__SaveV2}}}} {ckpts}/ckpt-{checkpoint_number}_temp/part-00000-of-00001"
            ".data-00000-of-00001.tempstate1; No space left on device [Op:SaveV2]"))

    with monkeypatch.context() as patch:
        patch.setattr(tf.train.CheckpointManager, "save", full_disk)
        with pytest.raises(training.TrainingError) as e:
            train(build_model(), loop(run_dir, 4, keep=3), dataset())
    assert str(e.value) == (f"cannot write checkpoint {ckpts}/ckpt-4: No space left on device; free space on that "
                            f"disk (or lower --keep_checkpoints) and rerun the same command to resume from "
                            f"{ckpts}/ckpt-3")
    assert latest_step(run_dir) == 3 and not glob.glob(os.path.join(ckpts, "*_temp*"))

    # Truncate the latest (ckpt-3): the restart names it, sets it aside, resumes from ckpt-2 and keeps ckpt-2.
    good = {f: open(f, "rb").read() for f in glob.glob(os.path.join(ckpts, "ckpt-2.*"))}
    data = glob.glob(os.path.join(ckpts, "ckpt-3.data-*"))[0]
    with open(data, "r+b") as f:
        f.truncate(os.path.getsize(data) // 2)
    lines = []
    model = build_model()
    train(model, loop(run_dir, 4, keep=3), dataset(), lines)
    assert any(f"checkpoint {ckpts}/ckpt-3 is unreadable" in line for line in lines), lines
    assert any(f"; resumed from {ckpts}/ckpt-2 at step 2;" in line for line in lines), lines
    assert int(model.step.numpy()) == 4 and latest_step(run_dir) == 4
    for f, content in good.items():  # the good checkpoint survived the next saves, byte for byte
        assert open(f, "rb").read() == content
    assert os.path.exists(os.path.join(ckpts, "corrupt", os.path.basename(data)))


# ---- Bad input through the command line: one clear line, non-zero exit, earlier results intact. ----

def cli(capsys, *args):
    with flagsaver.flagsaver():
        FLAGS.unparse_flags()
        argv = FLAGS(["trainers.cud", *args])
        with pytest.raises(SystemExit) as e:
            cud_trainer.main(argv)
    assert e.value.code != 0
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    return errors[0]


def test_stop_mode_exits_nonzero_with_a_clear_line(mnist_data_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    line = cli(capsys, *TINY, f"--data_dir={mnist_data_dir}", f"--run_dir={run_dir}", "--train_steps=6",
               "--checkpoint_every=1", "--nonfinite=stop", "--learning_rate=1e38")
    step = int(re.match(r"error: non-finite loss or gradient at step (\d+) \(update skipped, nothing saved\); "
                        r"lower --learning_rate", line).group(1))
    saved = assert_finite_checkpoints(str(run_dir))
    assert max(saved) == step - 1 and not os.path.exists(run_dir / "samples.png")


def test_unwritable_run_dir(mnist_data_dir, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    line = cli(capsys, *TINY, f"--data_dir={mnist_data_dir}", f"--run_dir={blocker}/run")
    assert line == f"error: cannot write the run directory {blocker}/run: Not a directory; choose a writable " \
                   "--run_dir with free space"


def test_image_shape_that_does_not_match_the_run(mnist_data_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    arch = {"image_shape": [32, 32, 3]}
    (run_dir / "arch.json").write_text(json.dumps(arch))
    (run_dir / "flags.txt").write_text("--dataset=cifar10\n")
    line = cli(capsys, *TINY, f"--data_dir={mnist_data_dir}", f"--run_dir={run_dir}")
    assert "image_shape: [32, 32, 3] in the checkpoint vs [28, 28, 1] now" in line
    assert "pass the --dataset it was trained on" in line
    assert (run_dir / "flags.txt").read_text() == "--dataset=cifar10\n"
    assert json.loads((run_dir / "arch.json").read_text()) == arch
    assert sorted(os.listdir(run_dir)) == ["arch.json", "flags.txt"]


def test_ctrl_c_with_stdout_gone_still_asks_for_a_checkpoint(monkeypatch):
    """A trainer started by a process that has died (its stdout a pipe with no reader) still saves on Ctrl-C: the
    handler's message must not raise BrokenPipeError out of wherever the main thread was (as during the
    samples of a step, before that step's checkpoint)."""
    class GonePipe:
        def write(self, _):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

    with training._StopFlag() as stop:
        monkeypatch.setattr(sys, "stdout", GonePipe())
        signal.raise_signal(signal.SIGINT)
        assert stop.stop and stop.signal == signal.SIGINT
        monkeypatch.undo()
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C still quits at once
            signal.raise_signal(signal.SIGINT)

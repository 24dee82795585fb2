"""The CUD trainer: flag errors, --help, and one end-to-end run (the session's tiny run) that trains, samples,
resumes, refuses another architecture or other settings, and reads back. Every flagfile: test_configs.py."""
import glob
import json
import os
import sys

import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver

from helpers import ROOT, copy_run, define_all_trainer_flags, parse, run_cli
from trainers import common
from trainers import cud as cud_trainer

FLAGS = flags.FLAGS
define_all_trainer_flags()


@pytest.mark.parametrize("args,expected", [
    (["--bogus_flag=1"], "Unknown command line flag 'bogus_flag'"),
    (["--cud_order=7"], "cud_order"),
    (["--train_steps=-5"], "train_steps"),
    (["--cud_step=sideways"], "cud_step"),
    (["--sample_method=leapfrog"], "sample_method"),
])
def test_bad_flags_exit_nonzero_with_a_clear_line(args, expected, capsys):
    code, err = run_cli(capsys, cud_trainer, "--run_dir=/tmp/never_written", *args)
    assert code != 0
    assert any(expected in line for line in err), err
    assert not os.path.exists("/tmp/never_written")


def test_unknown_dataset_fails_fast(tmp_path, capsys):
    code, err = run_cli(capsys, cud_trainer, f"--run_dir={tmp_path / 'run'}", "--dataset=no_such_dataset_xyz",
                        f"--data_dir={tmp_path}")
    lines = [line for line in err if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "no_such_dataset_xyz" in lines[0]
    assert not os.path.exists(tmp_path / "run")


def test_help_lists_the_trainers_own_and_shared_flags(monkeypatch):
    monkeypatch.setattr(sys, "argv", [os.path.join(ROOT, "trainers", "cud.py")])  # as `python -m trainers.cud`
    common.register_help()
    text = FLAGS.main_module_help()
    for name in ("--cud_order", "--[no]noise_encoder", "--run_dir", "--learning_rate", "--sample_method"):
        assert name in text, name
    assert "<euler|heun|reference3|rk3|rk4>" in text  # the sampler is a choice, listed


def test_end_to_end_train_resume_sample(tiny_cud_run, mnist_data_dir, tmp_path):
    source = tiny_cud_run["run_dir"]
    metrics = tiny_cud_run["metrics"]
    assert np.isfinite(metrics["loss"]) and "kd2" in metrics
    ckpts = sorted(os.listdir(os.path.join(source, "checkpoints")))
    assert "ckpt-3.index" in ckpts and "ckpt-4.index" in ckpts
    events = glob.glob(os.path.join(source, "tb", "events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing import event_accumulator
    acc = event_accumulator.EventAccumulator(os.path.dirname(events[0]), size_guidance={"tensors": 0})
    acc.Reload()
    plugins = acc.PluginTagToContent("hparams")  # the resolved configuration in the HParams dashboard
    assert "_hparams_/session_start_info" in plugins
    from tensorboard.plugins.hparams import plugin_data_pb2
    info = plugin_data_pb2.HParamsPluginData.FromString(plugins["_hparams_/session_start_info"]).session_start_info
    assert info.hparams["objective.order"].number_value == 2 and info.hparams["noise_encoder"].bool_value
    assert "config" in acc.Tags()["tensors"]  # and as text
    samples = np.load(os.path.join(source, "samples.npy"))
    assert samples.shape == (2, 3, 28, 28, 1) and np.isfinite(samples).all()
    assert os.path.getsize(os.path.join(source, "samples.png")) > 100
    assert not os.path.exists(os.path.join(source, "lock"))  # released at the end

    # Resume from the run's own flags.txt, with more steps: it continues at step 4.
    run_dir = copy_run(source, tmp_path)
    with flagsaver.flagsaver():
        parse(f"--flagfile={run_dir}/flags.txt", f"--run_dir={run_dir}", "--train_steps=6")
        assert FLAGS.cud_order == 2 and FLAGS.noise_encoder and FLAGS.channels == 8
        cud_trainer.run()
    assert "ckpt-6.index" in os.listdir(os.path.join(run_dir, "checkpoints"))
    history = [json.loads(line) for line in open(os.path.join(run_dir, "history.jsonl"))]
    assert history[0]["changed"] == "created" and history[1]["changed"] == {"run_dir": run_dir, "train_steps": 6}

    from cud_tf.run_dir import RunError
    flags_before = open(os.path.join(run_dir, "flags.txt")).read()
    # Another architecture in the same run directory is refused, and the checkpoints stay.
    with flagsaver.flagsaver():
        parse(f"--flagfile={run_dir}/flags.txt", "--train_steps=8", "--channels=16")
        with pytest.raises(RunError, match="another architecture"):
            cud_trainer.run()
    # So is another objective (other step sizes and learning rate), naming the flags, before anything is written.
    with flagsaver.flagsaver():
        parse(f"--flagfile={run_dir}/flags.txt", "--train_steps=8", "--cud_step=origin", "--learning_rate=1e-3")
        with pytest.raises(RunError, match=r"other settings \(--cud_step: uniform recorded vs origin now, "
                                           r"--learning_rate: 0.01 recorded vs 0.001 now\)"):
            cud_trainer.run()
    assert "ckpt-6.index" in os.listdir(os.path.join(run_dir, "checkpoints"))
    assert "ckpt-8.index" not in os.listdir(os.path.join(run_dir, "checkpoints"))
    assert open(os.path.join(run_dir, "flags.txt")).read() == flags_before
    assert len(open(os.path.join(run_dir, "history.jsonl")).readlines()) == 2

    # The run loads back (EMA weights by default) for evaluation, export and distillation.
    from cud_tf import run_dir as run_dir_lib
    ema, train = run_dir_lib.load_run(run_dir), run_dir_lib.load_run(run_dir, weights="train")
    recorded = common.read_run_flags(run_dir)  # flags.txt read back by absl: booleans named "no..." included
    assert ema.step == 6 and ema.config.num_heads == 2 and recorded["cud_order"] == 2
    assert recorded["noise_encoder"] is True and recorded["progress"] is False
    assert ema.run_config["noise_encoder"] is True and ema.run_config["objective"]["order"] == 2
    assert any(not np.allclose(a.numpy(), b.numpy()) for a, b in
               zip(ema.net.trainable_variables, train.net.trainable_variables))

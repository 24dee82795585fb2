"""The run directory's owner: the lock, resumes that must match the recorded run, flags read back by absl, the
history of invocations, and atomic writes (unit tests; the trainers' use is in test_trainer and test_faults)."""
import json
import os
import subprocess
import sys

import pytest
from absl import flags

from cud_tf import run_dir
from helpers import tiny_unet_config


def definitions():
    fv = flags.FlagValues()
    flags.DEFINE_boolean("noise_encoder", False, "", flag_values=fv)
    flags.DEFINE_boolean("progress", True, "", flag_values=fv)
    flags.DEFINE_string("method", "cud", "", flag_values=fv)
    flags.DEFINE_integer("train_steps", 10, "", flag_values=fv)
    flags.DEFINE_list("sample_nfes", ["1"], "", flag_values=fv)
    return fv


NAMES = ["noise_encoder", "progress", "method", "train_steps", "sample_nfes"]


def test_flags_read_back_by_absl_keep_booleans_named_no(tmp_path):
    path = tmp_path / "flags.txt"
    path.write_text("--noise_encoder\n--noprogress\n--method=rf\n--sample_nfes=1,2\n")
    fv = definitions()
    values = run_dir.parse_flags_file(str(path), fv, NAMES)
    assert values == {"noise_encoder": True, "progress": False, "method": "rf", "train_steps": 10,
                      "sample_nfes": ["1", "2"]}
    assert fv["method"].value == "cud" and not fv["method"].present  # the definitions' own values untouched


def open_run(directory, fv, config=None, arch=None):
    run_dir.open_run(str(directory), arch=arch or {"channels": 8}, config=config or {"objective": {"order": 1}},
                     flags_text="".join(f"{fv[n].serialize()}\n" for n in NAMES), definitions=fv, names=NAMES,
                     mutable={"train_steps", "sample_nfes", "progress"})


def test_a_resume_must_match_the_recorded_settings_and_is_appended_to_the_history(tmp_path):
    fv = definitions()
    fv(["prog", "--noise_encoder", "--train_steps=4"])
    open_run(tmp_path, fv)
    recorded = {name: (tmp_path / name).read_text() for name in ("arch.json", "config.json", "flags.txt")}
    fv["train_steps"].value, fv["progress"].value = 8, False  # how long and how it is observed: may change
    open_run(tmp_path, fv)
    history = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert history[0]["changed"] == "created" and history[1]["changed"] == {"progress": False, "train_steps": 8}
    assert "--train_steps=8" in (tmp_path / "flags.txt").read_text()

    flags_now = (tmp_path / "flags.txt").read_text()
    fv["method"].value, fv["noise_encoder"].value = "rf", False
    with pytest.raises(run_dir.RunError, match=r"other settings \(--method: cud recorded vs rf now, --noise_encoder: "
                                               r"True recorded vs False now\)"):
        open_run(tmp_path, fv)
    fv["method"].value, fv["noise_encoder"].value = "cud", True
    with pytest.raises(run_dir.RunError, match=r"another configuration \(objective.order: 1 recorded vs 2 now\)"):
        open_run(tmp_path, fv, config={"objective": {"order": 2}})
    with pytest.raises(run_dir.RunError, match="another architecture"):
        open_run(tmp_path, fv, arch={"channels": 16})
    assert (tmp_path / "flags.txt").read_text() == flags_now  # refused resumes write nothing
    # A configuration field that a later cud-tf added (absent from the record) is no difference; a removed one is.
    open_run(tmp_path, fv, config={"objective": {"order": 1, "added_later": "tops"}})
    with pytest.raises(run_dir.RunError, match=r"another configuration \(objective.order: 1 recorded vs None now\)"):
        open_run(tmp_path, fv, config={"objective": {}})
    assert {n: (tmp_path / n).read_text() for n in ("arch.json", "config.json")} == {
        n: recorded[n] for n in ("arch.json", "config.json")}
    assert len((tmp_path / "history.jsonl").read_text().splitlines()) == 3


def test_lock_is_exclusive_names_its_holder_and_a_dead_holder_is_taken_over(tmp_path):
    lines = []
    with run_dir.RunLock(str(tmp_path), log=lines.append):
        holder = json.loads((tmp_path / "lock").read_text())
        assert holder["pid"] == os.getpid()
        with pytest.raises(run_dir.RunError, match=f"in use by pid {os.getpid()} on host {holder['host']}"):
            run_dir.RunLock(str(tmp_path)).acquire()
    assert not (tmp_path / "lock").exists()

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    holder["pid"] = int(dead.stdout)  # a process of this host that has exited
    (tmp_path / "lock").write_text(json.dumps(holder))
    with run_dir.RunLock(str(tmp_path), log=lines.append):
        assert json.loads((tmp_path / "lock").read_text())["pid"] == os.getpid()
    assert lines == [f"taking over the stale lock of {tmp_path} (pid {holder['pid']} on {holder['host']} is gone)"]

    holder["host"] = "another-host.example"  # a holder elsewhere is never taken over
    (tmp_path / "lock").write_text(json.dumps(holder))
    with pytest.raises(run_dir.RunError, match="on host another-host.example"):
        run_dir.RunLock(str(tmp_path)).acquire()


def test_write_atomically_leaves_the_old_file_on_failure(tmp_path):
    path = str(tmp_path / "a.json")
    run_dir.write_json(path, {"a": 1})

    def fail(f):
        f.write("{half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        run_dir.write_atomically(path, fail)
    assert json.load(open(path)) == {"a": 1} and os.listdir(tmp_path) == ["a.json"]


def test_config_json_of_frozen_dataclasses():
    cfg = run_dir.to_json({"network": tiny_unet_config(), "nested": {"t": (1, 2)}})
    assert cfg["network"]["channel_mult"] == [1, 2] and cfg["nested"]["t"] == [1, 2]

"""MultiWorkerMirroredStrategy through the real trainer: two worker processes on 127.0.0.1 (TF_CONFIG) end with
identical weights, and only the chief writes its run directory."""
import json
import os
import socket
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--channels=8", "--channel_mult=1", "--num_res_blocks=1", "--global_batch_size=8", "--sample_nfes=1",
        "--num_sample_images=2", "--noprogress", "--nojit_compile", "--nomid_attention", "--log_every=2",
        "--precision=float32",
        "--dropout=0.2"]


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def test_two_workers_train_in_lockstep_and_only_the_chief_writes(mnist_data_dir, tmp_path):
    workers = [f"127.0.0.1:{p}" for p in free_ports(2)]
    procs = []
    for i in range(2):
        (tmp_path / f"tmp{i}").mkdir()
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "TMPDIR": str(tmp_path / f"tmp{i}"),
               "CUD_TF_DUMP_WEIGHTS": str(tmp_path / f"weights{i}.npz"),
               "TF_CONFIG": json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}})}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "trainers.cud", *TINY, "--strategy=multiworker", f"--data_dir={mnist_data_dir}",
             f"--run_dir={tmp_path / f'run{i}'}", "--train_steps=4", "--checkpoint_every=2"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        results = [p.communicate(timeout=400) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]

    chief, worker = (np.load(tmp_path / f"weights{i}.npz") for i in range(2))
    assert len(chief.files) == len(worker.files) > 20
    for name in chief.files:
        np.testing.assert_array_equal(chief[name], worker[name], err_msg=name)

    run0 = tmp_path / "run0"
    assert {"tb", "samples.png", "flags.txt", "arch.json", "checkpoints"} <= set(os.listdir(run0))
    assert os.path.exists(run0 / "checkpoints" / "ckpt-4.index")
    assert "--strategy=multiworker" in (run0 / "flags.txt").read_text()
    assert not os.path.exists(tmp_path / "run1")  # the other worker wrote nothing there...
    # ...and removed its temporary checkpoints (autograph's generated modules and their bytecode may stay)
    left = [f for f in os.listdir(tmp_path / "tmp1") if not f.startswith(("__autograph_generated", "__pycache__"))]
    assert left == []

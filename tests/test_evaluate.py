"""The evaluator end to end on a tiny class-conditional CUD run: JSON, table, plot and sample grids."""
import json
import os

import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver

from trainers import cud as cud_trainer
from trainers import evaluate

from test_trainer import ROOT, TINY, parse

FLAGS = flags.FLAGS
cud_trainer.define_flags()
evaluate.define_flags()


def test_evaluate_end_to_end(mnist_data_dir, classifier_dir, tmp_path):
    run_dir = str(tmp_path / "run")
    with flagsaver.flagsaver():
        parse(f"--flagfile={ROOT}/configs/mnist_quick.cfg", f"--data_dir={mnist_data_dir}", f"--run_dir={run_dir}",
              "--cud_order=2", "--num_classes=-1", "--train_steps=2", *TINY)
        cud_trainer.run()

    out_dir = str(tmp_path / "eval")
    with flagsaver.flagsaver():
        parse(f"--run_dir={run_dir}", "--nfe=1,2,3", "--num_samples=40", "--eval_batch_size=20", "--sampler=heun",
              "--head=2", "--rk45", "--rk45_tol=1e-3", "--guidance_scale=1,2", f"--out_dir={out_dir}",
              f"--classifier_dir={classifier_dir}", "--min_accuracy=0.9", "--num_grid_images=4",
              "--nojit_compile")
        result = evaluate.run(log=lambda _: None)

    with open(os.path.join(out_dir, "eval_heun_head2.json")) as f:
        stored = json.load(f)
    assert stored == json.loads(json.dumps(result))
    assert stored["metric"] == "FD (MNIST classifier)" and stored["conditional"] and stored["step"] == 2
    # Heun is NFE-matched (2N - 1): NFE 2 needs as many steps as NFE 1, so it is evaluated once.
    assert [(r["solver"], r["guidance_scale"], r["nfe"]) for r in stored["rows"] if r["solver"] == "heun"] == [
        ("heun", 1.0, 1), ("heun", 1.0, 3), ("heun", 2.0, 1), ("heun", 2.0, 3)]
    rk45 = [r for r in stored["rows"] if r["solver"] == "rk45"]
    assert len(rk45) == 2 and all(r["nfe"] > 3 for r in rk45)
    for r in stored["rows"]:
        assert np.isfinite(r["distance"]) and r["distance"] > 0 and 0.0 <= r["class_accuracy"] <= 1.0
    table = open(os.path.join(out_dir, "eval_heun_head2.md")).read()
    assert "| heun | 2 | 3 |" in table and "FD (MNIST classifier)" in table and "FID" not in table
    for name in ("eval_heun_head2.png", "samples_heun_head2_w1.png", "samples_heun_head2_w2.png"):
        assert os.path.getsize(os.path.join(out_dir, name)) > 1000

    # Bad input: one clear error, nothing written.
    with flagsaver.flagsaver():
        parse(f"--run_dir={run_dir}", "--head=3", f"--out_dir={tmp_path / 'never'}")
        with pytest.raises(flags.ValidationError, match="--head=3 but the network"):
            evaluate.run(log=lambda _: None)
    assert not os.path.exists(tmp_path / "never")

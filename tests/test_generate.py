"""`python -m trainers.generate`: sample grids and arrays at several NFEs from a run and from its SavedModel."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from absl import flags
from absl.testing import flagsaver

from helpers import ENV, ROOT, WARMUP, export_cli, tiny, write_run
from trainers import generate as generate_trainer

FLAGS = flags.FLAGS
generate_trainer.define_flags()
SEED = 3


def generate_cli(*args):
    """`python -m trainers.generate ...` in-process; returns the paths written."""
    with flagsaver.flagsaver():
        FLAGS.unparse_flags()
        FLAGS(["trainers.generate", *args])
        return generate_trainer.run()


def fails(capsys, *args):
    """Runs the command expecting a one-line error and a non-zero exit; returns that line."""
    with flagsaver.flagsaver(), pytest.raises(SystemExit) as info:
        FLAGS.unparse_flags()
        FLAGS(["trainers.generate", *args])
        generate_trainer.main(["trainers.generate"])
    assert info.value.code != 0
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: "), errors
    return errors[0]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("generate")


@pytest.fixture(scope="module")
def run_dir(written_run):
    return written_run


@pytest.fixture(scope="module")
def exported(workdir, run_dir):
    """Head 2, Euler, serving_default = 1 step, generate up to 2 steps and 4 images."""
    return export_cli(f"--run_dir={run_dir}", "--name=tiny", f"--export_dir={workdir / 'saved_models'}", "--head=2",
                      "--max_images=4", "--max_steps=2", *WARMUP)


@pytest.fixture(scope="module")
def ema_net(run_dir):
    from cud_tf import run_dir as run_dir_lib
    return run_dir_lib.load_run(run_dir).net


def reference(net, nfe_steps, n, method="euler", head=2, labels=None, w=1.0):
    """In-process samples [len(nfe_steps), n, 8, 8, 1] from the generate signature's noise."""
    from cud_tf import export, sampling
    z = export.noise(SEED, n, (8, 8, 1))
    y = None if labels is None else tf.constant(labels, tf.int32)
    return np.stack([np.clip(sampling.generate(net, z, k, method, head, y, w).numpy(), -1, 1) for k in nfe_steps])


def test_sample_grid_upscales_and_labels_every_block():
    from cud_tf import summaries
    rows = np.random.default_rng(0).uniform(-1, 1, [3, 16, 8, 8, 1]).astype(np.float32)
    grid = summaries.sample_grid(rows, [1, 2, 4])
    assert grid.dtype == np.uint8 and grid.ndim == 3 and grid.shape[2] == 1
    assert grid.shape[1] >= summaries.MIN_WIDTH
    scale = summaries.MIN_IMAGE // 8  # 8 px images are upscaled to >= 48 px: scale 6 (16 of them: > 512 px)
    big = summaries.to_uint8(rows[1, 3]).repeat(scale, 0).repeat(scale, 1)
    gray = grid[..., 0]
    hits = [(y, x) for y in range(gray.shape[0] - big.shape[0]) for x in range(gray.shape[1] - big.shape[1])
            if gray[y, x] == big[0, 0, 0] and np.array_equal(gray[y:y + big.shape[0], x:x + big.shape[1]], big[..., 0])]
    assert len(hits) == 1  # row 1, image 3, nearest-neighbour upscaled, appears exactly once
    (y, x), = hits
    assert grid.shape[0] / 3 < y + big.shape[0] and y < 2 * grid.shape[0] / 3  # in the second of three blocks
    first_column = x - 3 * (8 + 2) * scale  # images are 8 * scale wide, padded by 2 * scale
    assert first_column > 0 and np.array_equal(  # image 0 of row 1 is there: the label column is left of it
        gray[y:y + big.shape[0], first_column:first_column + big.shape[1]],
        summaries.to_uint8(rows[1, 0]).repeat(scale, 0).repeat(scale, 1)[..., 0])
    label_column = gray[:, :first_column]
    dark_rows = np.flatnonzero((label_column < 128).any(axis=1))
    assert dark_rows.size  # the labels are drawn left of the images ...
    blocks = np.split(dark_rows, np.flatnonzero(np.diff(dark_rows) > 3 * scale) + 1)
    assert len(blocks) == 3  # ... one per block
    assert summaries.sample_grid(rows, [1, 2, 4], scale=1).shape[1] < summaries.MIN_WIDTH  # an explicit scale wins
    assert summaries.sample_grid(rows[:, :5], [1, 2, 4]).shape[1] >= summaries.MIN_WIDTH  # 5 images: upscaled more
    color = summaries.sample_grid(rows.repeat(3, axis=-1), ["a", "b", "c"])
    assert color.shape[2] == 3
    with pytest.raises(ValueError, match="one label per row"):
        summaries.sample_grid(rows, [1, 2])


def test_generate_from_run_writes_the_grid_and_the_array(run_dir, ema_net, workdir):
    png, npy, meta = generate_cli(f"--run_dir={run_dir}", "--nfe=1,2,4", "--num_images=6", f"--seed={SEED}",
                                  "--head=2", f"--out={workdir / 'from_run'}/")
    assert os.path.basename(png) == "samples_euler_head2_seed3.png"
    samples = np.load(npy)
    assert samples.shape == (3, 6, 8, 8, 1) and samples.dtype == np.float32
    expected = reference(ema_net, [1, 2, 4], 6)
    np.testing.assert_allclose(samples, expected, atol=1e-5)
    assert np.abs(expected[0] - expected[2]).max() > 1e-3  # the rows differ by more than the tolerance
    image = tf.io.decode_png(tf.io.read_file(png)).numpy()
    assert image.shape[1] >= 500 and image.shape[2] == 1
    with open(meta) as f:
        info = json.load(f)
    assert [r["nfe"] for r in info["rows"]] == [1, 2, 4] and info["png_shape"] == list(image.shape)


def test_saved_model_uses_its_signatures_and_matches_the_run(exported, ema_net, workdir):
    """NFE 1 = serving_default (1 step), NFE 2 = generate (<= 2 steps, <= 4 images), NFE 4 = velocity; more
    images than generate's cap go through velocity (serving_default in batches of 4)."""
    out = str(workdir / "from_export")
    cmd = [sys.executable, "-m", "trainers.generate", f"--saved_model={exported}", "--nfe=1,2,4", "--num_images=6",
           f"--seed={SEED}", f"--out={out}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    four = generate_cli(f"--saved_model={exported}", "--nfe=1,2,4", "--num_images=4", f"--seed={SEED}",
                        f"--out={workdir / 'four'}")
    with open(four[2]) as f:
        assert [r["how"] for r in json.load(f)["rows"]] == [
            "signature serving_default", "signature generate", "signature velocity"]
    expected = reference(ema_net, [1, 2, 4], 6)
    np.testing.assert_allclose(np.load(four[1]), expected[:, :4], atol=1e-5)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert stdout.split() == ["wrote", out + ".png", out + ".npy", out + ".json"]
    np.testing.assert_allclose(np.load(out + ".npy"), expected, atol=1e-5)
    with open(out + ".json") as f:
        info = json.load(f)
    assert [r["how"] for r in info["rows"]] == ["signature serving_default"] + ["signature velocity"] * 2
    assert info["head"] == 2 and info["source"]["version"] == 1
    assert tf.io.decode_png(tf.io.read_file(out + ".png")).shape[1] >= 500


def test_saved_model_other_sampler_through_velocity(exported, ema_net, workdir):
    base = os.path.dirname(exported)  # a model's folder: its latest version (the only one here)
    _, npy, meta = generate_cli(f"--saved_model={base}", "--sampler=heun", "--nfe=3", "--num_images=2",
                                f"--seed={SEED}", f"--out={workdir / 'heun'}")
    np.testing.assert_allclose(np.load(npy), reference(ema_net, [2], 2, method="heun"), atol=1e-5)
    with open(meta) as f:
        info = json.load(f)
    assert info["rows"] == [{"nfe": 3, "steps": 2, "how": "signature velocity"}]
    assert info["source"]["saved_model"] == exported


def test_one_step_only_export_refuses_other_nfes(workdir, run_dir, capsys):
    path = export_cli(f"--run_dir={run_dir}", "--name=onestep", f"--export_dir={workdir / 'saved_models'}",
                      "--head=2", "--signatures=serving_default", *WARMUP)
    assert set(tf.saved_model.load(path).signatures) == {"serving_default"}
    _, npy, _ = generate_cli(f"--saved_model={path}", "--nfe=1", "--num_images=2", f"--out={workdir / 'one'}")
    assert np.load(npy).shape == (1, 2, 8, 8, 1)
    out = workdir / "refused"
    error = fails(capsys, f"--saved_model={path}", "--nfe=1,2", f"--out={out}")
    assert "cannot sample NFE 2 with euler" in error and "serving_default (euler, 1 step(s) = NFE 1)" in error
    assert "no velocity signature" in error and not os.path.exists(str(out) + ".npy")


@pytest.mark.parametrize("args,message", [
    (["--nfe=1,2"], "exactly one of --run_dir"),
    (["--head=1"], "exported with head 2"),
    (["--sampler=heun", "--nfe=2"], "NFE 2 is not reachable with the heun sampler (its NFEs: 1, 3, 5, 7"),
    (["--labels=1"], "need a class-conditional model"),
    (["--nfe=1,x"], "--nfe must be a comma-separated list of integers"),
    (["--guidance_scale=1,2"], "--guidance_scale takes one value"),
])
def test_bad_requests_fail_with_one_line(exported, run_dir, capsys, tmp_path, args, message):
    source = [f"--saved_model={exported}"] + ([f"--run_dir={run_dir}"] if "exactly" in message else [])
    assert message in fails(capsys, *source, *args, f"--out={tmp_path}/x")
    assert not os.listdir(tmp_path)


def test_conditional_run_and_export_agree_with_guidance(workdir, capsys):
    from cud_tf import run_dir as run_dir_lib
    run = str(workdir / "cond_run")
    os.makedirs(run)
    write_run(run, tiny(num_classes=3))
    path = export_cli(f"--run_dir={run}", "--name=cond", f"--export_dir={workdir / 'saved_models'}",
                      "--max_images=4", "--max_steps=2", *WARMUP)
    args = ["--nfe=1,2", "--num_images=4", f"--seed={SEED}", "--labels=2,-1,0", "--guidance_scale=8"]
    _, from_run, _ = generate_cli(f"--run_dir={run}", *args, f"--out={workdir / 'cond_a'}")
    _, from_export, meta = generate_cli(f"--saved_model={path}", *args, f"--out={workdir / 'cond_b'}")
    net = run_dir_lib.load_run(run).net
    expected = reference(net, [1, 2], 4, head=1, labels=[2, -1, 0, 2], w=8.0)
    np.testing.assert_allclose(np.load(from_run), expected, atol=1e-5)
    np.testing.assert_allclose(np.load(from_export), expected, atol=1e-5)
    with open(meta) as f:
        assert json.load(f)["labels"] == [2, -1, 0, 2]
    plain = reference(net, [1], 4, head=1, labels=[2, -1, 0, 2])
    # Guidance changes the images by more than the tolerance (a tiny random net's labels matter little).
    assert np.abs(plain[0] - expected[0]).max() > 1e-4
    assert "labels=[3] must lie in [-1, 2]" in fails(capsys, f"--saved_model={path}", "--labels=3")
    assert "exceeds the export's max_guidance=10.0" in fails(capsys, f"--saved_model={path}", "--guidance_scale=11")

"""SavedModel export for TF Serving: signatures, a reload without the project, serving protos, warm-up requests,
the model config, input checks."""
import json
import re
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from absl import flags
from absl.testing import flagsaver

from helpers import ENV, ROOT, WARMUP, export_cli, serving_protos, tiny, write_run
from trainers import export as export_trainer

FLAGS = flags.FLAGS
export_trainer.define_flags()
SEED, NUM_IMAGES, NUM_STEPS = 7, 3, 2


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def run_dir(written_run):
    return written_run


@pytest.fixture(scope="module")
def exported(workdir, run_dir):
    return export_cli(f"--run_dir={run_dir}", "--name=cud_mnist", f"--export_dir={workdir / 'saved_models'}",
                      "--head=2", "--max_images=4", "--max_steps=8", *WARMUP)


@pytest.fixture(scope="module")
def cond_run_dir(workdir):
    path = str(workdir / "cond_run")
    os.makedirs(path)
    write_run(path, tiny(num_classes=3))
    return path


RELOAD = """
import sys, numpy as np, tensorflow as tf
m = tf.saved_model.load(sys.argv[1])
gen = m.signatures["generate"](seed=tf.constant({seed}, tf.int64), num_images=tf.constant({n}),
                               num_steps=tf.constant({steps}))
gen2 = m.signatures["generate"](seed=tf.constant({seed}, tf.int64), num_images=tf.constant({n}),
                                num_steps=tf.constant({steps}))
z = np.random.default_rng(1).standard_normal([{n}, 8, 8, 1]).astype(np.float32)
one = m.signatures["serving_default"](noise=tf.constant(z))
v = m.signatures["velocity"](x=tf.constant(z), t=tf.constant([1.0, 0.5, 0.0]))
assert not any(k.split(".")[0] in ("cud_tf", "trainers") for k in sys.modules), "the project was imported"
np.savez(sys.argv[2], gen=gen["images"].numpy(), gen2=gen2["images"].numpy(), z=z, one=one["images"].numpy(),
         v=v["v"].numpy())
""".format(seed=SEED, n=NUM_IMAGES, steps=NUM_STEPS)


@pytest.fixture(scope="module")
def commands(workdir, exported, cond_run_dir):
    """Starts every command-line check at once, right after the first export (each pays a TensorFlow import;
    running them side by side with the in-process tests keeps the module fast). Tests read them by name."""
    out = workdir / "commands"
    out.mkdir()
    cmds = {
        "show": ["saved_model_cli", "show", "--all", "--dir", exported],
        # saved_model_cli run loads through a TF1 session, as the C++ loader of TF Serving does.
        "run": ["saved_model_cli", "run", "--dir", exported, "--tag_set", "serve", "--signature_def", "generate",
                "--input_exprs", f"seed={SEED};num_images=2;num_steps=1", "--outdir", str(out / "run")],
        # -I: isolated (no PYTHONPATH, no current directory on sys.path); cwd outside the repository.
        "reload": [sys.executable, "-I", "-c", RELOAD, exported, str(out / "reload.npz")],
        # The second export of the same name, through the command line.
        "export2": [sys.executable, "-m", "trainers.export", f"--run_dir={cond_run_dir}", "--name=cud_mnist",
                    f"--export_dir={workdir / 'saved_models'}", "--max_images=4", "--max_guidance=4",
                    *WARMUP],
    }
    procs = {k: subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                                 cwd=ROOT if k == "export2" else out) for k, c in cmds.items()}
    results = {}

    def result(name):
        if name not in results:
            stdout, stderr = procs[name].communicate(timeout=300)
            results[name] = (procs[name].returncode, stdout, stderr)
            assert procs[name].returncode == 0, f"{cmds[name]} failed:\n{stderr[-3000:]}"
        return results[name]

    yield out, result
    for p in procs.values():
        if p.poll() is None:
            p.kill()
            p.communicate()


@pytest.fixture(scope="module")
def loaded(exported):
    return tf.saved_model.load(exported)


@pytest.fixture(scope="module")
def ema_net(run_dir):
    from cud_tf import run_dir as run_dir_lib
    return run_dir_lib.load_run(run_dir).net


def reference(net, z, num_steps, labels=None, guidance_scale=1.0, head=2):
    """In-process sampling with the library, clipped to the exported value range."""
    from cud_tf import sampling
    return np.clip(sampling.generate(net, z, num_steps, "euler", head, labels, guidance_scale).numpy(), -1, 1)


def test_saved_model_cli_show_lists_the_signatures(commands):
    _, result = commands
    out = result("show")[1]
    blocks = {b.split("'")[0]: b for b in out.split("signature_def['")[1:]}
    assert set(blocks) >= {"serving_default", "generate", "velocity"}
    for name in ("serving_default", "generate", "velocity"):
        assert "Method name is: tensorflow/serving/predict" in blocks[name]
    expect = {
        "serving_default": [("inputs", "noise", "DT_FLOAT", "(-1, 8, 8, 1)"),
                            ("outputs", "images", "DT_FLOAT", "(-1, 8, 8, 1)"),
                            ("outputs", "images_uint8", "DT_UINT8", "(-1, 8, 8, 1)")],
        "generate": [("inputs", "seed", "DT_INT64", "()"), ("inputs", "num_images", "DT_INT32", "()"),
                     ("inputs", "num_steps", "DT_INT32", "()"), ("outputs", "images", "DT_FLOAT", "(-1, 8, 8, 1)"),
                     ("outputs", "images_uint8", "DT_UINT8", "(-1, 8, 8, 1)")],
        "velocity": [("inputs", "x", "DT_FLOAT", "(-1, 8, 8, 1)"), ("inputs", "t", "DT_FLOAT", "(-1)"),
                     ("outputs", "v", "DT_FLOAT", "(-1, 8, 8, 1)")],
    }
    for name, parts in expect.items():
        for kind, key, dtype, shape in parts:
            text = f"{kind}['{key}'] tensor_info:\n        dtype: {dtype}\n        shape: {shape}"
            assert text in blocks[name], (name, text)
    assert "labels" not in out  # an unconditional network takes no labels


def test_export_layout_and_metadata(exported):
    assert os.path.basename(exported) == "1"
    assert os.path.isfile(os.path.join(exported, "saved_model.pb"))
    with open(os.path.join(exported, "assets.extra", "cud_tf.json")) as f:
        meta = json.load(f)
    assert meta["image"] == {"shape": [8, 8, 1], "dtype": "float32", "value_range": [-1.0, 1.0],
                             "uint8": "round((images + 1) * 127.5)"}
    assert meta["caps"] == {"max_images": 4, "max_steps": 8, "max_guidance": 10.0}
    assert meta["sampler"]["method"] == "euler" and meta["sampler"]["head"] == 2
    assert meta["run"]["step"] == 2 and meta["run"]["weights"] == "ema"
    assert meta["run"]["config"]["objective"]["order"] == 2 and meta["run"]["config"]["method"] == "cud"
    assert meta["code_version"] and meta["signatures"]["generate"]["inputs"]["seed"] == ["int64", []]


def test_models_config_parses_and_lists_only_models_the_docs_create():
    """models.config is what the server accepts: TF Serving's own proto parses it; every model is one that an
    export command in docs/serving.md creates, under /models/<name> (where the docs mount saved_models/); no
    version label names a version that may not be loaded at start-up (the server refuses those unless
    --allow_version_labels_for_unavailable_models is passed, and no documented command passes it)."""
    serving_protos()
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2
    with open(os.path.join(ROOT, "saved_models", "models.config")) as f:
        config = text_format.Parse(f.read(), model_server_config_pb2.ModelServerConfig())
    with open(os.path.join(ROOT, "docs", "serving.md")) as f:
        docs = f.read()
    created = set(re.findall(r"python -m trainers\.export [^\n]*--name=([A-Za-z0-9_.-]+)", docs))
    models = config.model_config_list.config
    assert models and {c.name for c in models} <= created, (sorted(c.name for c in models), sorted(created))
    assert 'source="$PWD/saved_models",target=/models ' in docs  # the Docker command of models.config
    for c in models:
        assert c.base_path == f"/models/{c.name}" and c.model_platform == "tensorflow"
        assert not c.version_labels or "--allow_version_labels_for_unavailable_models" in docs, c.name
        # A policy pinning specific versions would fail on a fresh export directory (only version 1 exists).
        assert c.model_version_policy.WhichOneof("policy_choice") in (None, "latest"), c.name


def warmup_logs(path):
    from tensorflow_serving.apis import prediction_log_pb2
    return [prediction_log_pb2.PredictionLog.FromString(r.numpy())
            for r in tf.data.TFRecordDataset(os.path.join(path, "assets.extra", "tf_serving_warmup_requests"))]


def check_warmup(path, expected_signatures):
    """The export's warm-up file holds one PredictRequest per signature, with exactly that signature's input
    names, dtypes and ranks, and each request runs on the loaded SavedModel (as TF Serving runs them)."""
    logs = warmup_logs(path)
    assert [log.WhichOneof("log_type") for log in logs] == ["predict_log"] * len(logs)
    requests = [log.predict_log.request for log in logs]
    assert sorted(r.model_spec.signature_name for r in requests) == sorted(expected_signatures)
    m = tf.saved_model.load(path)
    assert set(m.signatures) == set(expected_signatures)
    for r in requests:
        fn = m.signatures[r.model_spec.signature_name]
        _, specs = fn.structured_input_signature
        inputs = {k: tf.constant(tf.make_ndarray(p)) for k, p in r.inputs.items()}
        assert {k: (v.dtype, v.shape.rank) for k, v in inputs.items()} == {
            k: (s.dtype, s.shape.rank) for k, s in specs.items()}, r.model_spec.signature_name
        assert all(s.shape.is_compatible_with(inputs[k].shape) for k, s in specs.items())
        outputs = fn(**inputs)
        assert set(outputs) == set(fn.structured_outputs)
    with open(os.path.join(path, "assets.extra", "cud_tf.json")) as f:
        meta = json.load(f)
    assert meta["warmup"]["signatures"] == [r.model_spec.signature_name for r in requests]
    return requests


def test_warmup_requests_match_the_signatures(exported, commands, tmp_path, run_dir):
    serving_protos()
    requests = check_warmup(exported, ["serving_default", "generate", "velocity"])
    assert all(r.model_spec.name == "cud_mnist" for r in requests)
    _, result = commands
    cond = result("export2")[1].split()[-1]  # the class-conditional export: labels and guidance_scale too
    requests = {r.model_spec.signature_name: r for r in check_warmup(cond, ["serving_default", "generate",
                                                                            "velocity"])}
    assert set(requests["generate"].inputs) == {"seed", "num_images", "num_steps", "labels", "guidance_scale"}
    assert set(requests["velocity"].inputs) == {"x", "t", "labels"}
    only = export_cli(f"--run_dir={run_dir}", "--name=one", f"--export_dir={tmp_path}", "--head=2",
                      "--signatures=serving_default")
    check_warmup(only, ["serving_default"])


def test_predict_request_protos_round_trip(loaded):
    serving_protos()
    from tensorflow_serving.apis import predict_pb2
    request = predict_pb2.PredictRequest()
    request.model_spec.name, request.model_spec.signature_name = "cud_mnist", "generate"
    for key, value in {"seed": np.int64(SEED), "num_images": np.int32(2), "num_steps": np.int32(NUM_STEPS)}.items():
        request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
    request = predict_pb2.PredictRequest.FromString(request.SerializeToString())  # over the wire

    fn = loaded.signatures[request.model_spec.signature_name]
    _, specs = fn.structured_input_signature
    inputs = {k: tf.constant(tf.make_ndarray(p)) for k, p in request.inputs.items()}
    assert {k: (v.dtype, v.shape.rank) for k, v in inputs.items()} == {
        k: (s.dtype, s.shape.rank) for k, s in specs.items()}
    outputs = fn(**inputs)
    response = predict_pb2.PredictResponse()
    for key, value in outputs.items():
        response.outputs[key].CopyFrom(tf.make_tensor_proto(value.numpy()))
    response = predict_pb2.PredictResponse.FromString(response.SerializeToString())
    images = tf.make_ndarray(response.outputs["images"])
    assert images.shape == (2, 8, 8, 1) and images.dtype == np.float32
    assert tf.make_ndarray(response.outputs["images_uint8"]).dtype == np.uint8
    np.testing.assert_array_equal(images, outputs["images"].numpy())


@pytest.mark.parametrize("signature,inputs,message", [
    ("generate", dict(seed=np.int64(1), num_images=np.int32(5), num_steps=np.int32(1)),
     "num_images must lie in [1, 4]"),
    ("generate", dict(seed=np.int64(1), num_images=np.int32(1), num_steps=np.int32(9)),
     "num_steps must lie in [1, 8]"),
    ("generate", dict(seed=np.int64(1), num_images=np.int32(1), num_steps=np.int32(0)),
     "num_steps must lie in [1, 8]"),
    ("serving_default", dict(noise=np.zeros([2, 8, 8, 3], np.float32)), "noise must have shape [B, 8, 8, 1]"),
    ("serving_default", dict(noise=np.zeros([5, 8, 8, 1], np.float32)), "batch B must lie in [1, 4]"),
    ("serving_default", dict(noise=np.full([1, 8, 8, 1], np.nan, np.float32)), "noise must be finite"),
    ("velocity", dict(x=np.zeros([2, 8, 8, 1], np.float32), t=np.array([0.5], np.float32)),
     "t must have shape [B]"),
    ("velocity", dict(x=np.zeros([1, 8, 8, 1], np.float32), t=np.array([1.5], np.float32)),
     "t must lie in [0, 1]"),
    ("serving_default", dict(noise=np.zeros([1, 8, 8, 1], np.float64)), "expected to be a float tensor"),
])
def test_bad_inputs_fail_with_the_documented_message(loaded, signature, inputs, message):
    with pytest.raises(tf.errors.InvalidArgumentError) as info:
        loaded.signatures[signature](**{k: tf.constant(v) for k, v in inputs.items()})
    assert message in str(info.value)


def test_saved_model_cli_run_generate(commands, ema_net):
    from cud_tf import export
    out, result = commands
    result("run")
    images, pixels = np.load(out / "run" / "images.npy"), np.load(out / "run" / "images_uint8.npy")
    assert images.shape == (2, 8, 8, 1) and pixels.dtype == np.uint8
    np.testing.assert_allclose(images, reference(ema_net, export.noise(SEED, 2, (8, 8, 1)), 1), atol=1e-3)
    np.testing.assert_array_equal(pixels, np.round((images + 1) * 127.5).astype(np.uint8))


def test_reload_without_the_project_matches_in_process_sampling(commands, ema_net, run_dir):
    from cud_tf import export, sampling
    from cud_tf import run_dir as run_dir_lib
    out, result = commands
    result("reload")
    r = np.load(out / "reload.npz")
    expected = reference(ema_net, export.noise(SEED, NUM_IMAGES, (8, 8, 1)), NUM_STEPS)
    np.testing.assert_allclose(r["gen"], expected, atol=1e-3)
    np.testing.assert_array_equal(r["gen"], r["gen2"])  # same seed, same images
    np.testing.assert_allclose(r["one"], reference(ema_net, r["z"], 1), atol=1e-3)  # one step: z - v(z, 1)
    t = tf.constant([1.0, 0.5, 0.0])
    np.testing.assert_allclose(r["v"], sampling.velocity_fn(ema_net, 2)(r["z"], t).numpy(), atol=1e-3)
    train_net = run_dir_lib.load_run(run_dir, weights="train").net  # the EMA weights were exported, not these
    assert np.abs(r["v"] - sampling.velocity_fn(train_net, 2)(r["z"], t).numpy()).max() > 1e-2


def test_second_export_gets_the_next_version_with_conditional_inputs(commands, exported, cond_run_dir):
    """A class-conditional run exported under the same name becomes version 2; version 1 stays as it was."""
    from cud_tf import export
    from cud_tf import run_dir as run_dir_lib
    before = os.stat(os.path.join(exported, "saved_model.pb"))
    _, result = commands
    path = result("export2")[1].split()[-1]
    assert path == os.path.join(os.path.dirname(exported), "2")
    after = os.stat(os.path.join(exported, "saved_model.pb"))
    assert (after.st_mtime_ns, after.st_size) == (before.st_mtime_ns, before.st_size)
    assert sorted(os.listdir(os.path.dirname(path))) == ["1", "2"]  # no temporary folder left behind

    m = tf.saved_model.load(path)
    labels, w = tf.constant([0, 2, -1]), tf.constant(2.5)
    out = m.signatures["generate"](seed=tf.constant(SEED, tf.int64), num_images=tf.constant(3),
                                   num_steps=tf.constant(2), labels=labels, guidance_scale=w)
    net = run_dir_lib.load_run(cond_run_dir).net
    np.testing.assert_allclose(
        out["images"].numpy(), reference(net, export.noise(SEED, 3, (8, 8, 1)), 2, labels, w, head=1), atol=1e-3)
    _, specs = m.signatures["velocity"].structured_input_signature
    assert specs["labels"].dtype == tf.int32 and "guidance_scale" not in specs
    _, specs = m.signatures["serving_default"].structured_input_signature
    assert set(specs) == {"noise", "labels", "guidance_scale"}
    for kw, message in [
            (dict(labels=labels, guidance_scale=tf.constant(4.5)), "guidance_scale must lie in [0.0, 4.0]"),
            (dict(labels=tf.constant([0, 3, 1]), guidance_scale=w), "labels must lie in [-1, 2]"),
            (dict(labels=tf.constant([0, 1]), guidance_scale=w), "labels must have shape [num_images]")]:
        with pytest.raises(tf.errors.InvalidArgumentError) as info:
            m.signatures["generate"](seed=tf.constant(1, tf.int64), num_images=tf.constant(3),
                                     num_steps=tf.constant(1), **kw)
        assert message in str(info.value)


@pytest.mark.parametrize("args,message", [
    (["--name=x"], "no arch.json"),
    (["--name=../x"], "model name '../x' must be"),
    (["--name=x", "--sampler=rk9"], "sampler='rk9' is unknown"),
    (["--name=x", "--head=3"], "head=3 but the network has 2 head(s)"),
    (["--name=x", "--signatures=generate,predict"], "expected a non-empty subset of ['serving_default', "),
])
def test_cli_errors_are_one_line_and_write_nothing(run_dir, tmp_path, capsys, args, message):
    if message == "no arch.json":
        run_dir = str(tmp_path / "not_a_run")
    with flagsaver.flagsaver(), pytest.raises(SystemExit) as info:
        FLAGS.unparse_flags()
        FLAGS(["trainers.export", f"--run_dir={run_dir}", f"--export_dir={tmp_path / 'out'}", *WARMUP, *args])
        export_trainer.main(["trainers.export"])
    assert info.value.code != 0
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: ") and message in errors[0]
    assert not os.path.exists(tmp_path / "out" / "x")
